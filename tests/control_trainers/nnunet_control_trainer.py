"""The harness's control: nnU-Net's own trainer with a short schedule, nothing of nnunet-ext.

Found by nnU-Net through a user-set ``nnUNet_extTrainer`` folder (this one), which also checks
that our start-up hook keeps a user's search path working next to ours.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class HarnessControlTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
