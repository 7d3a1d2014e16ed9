"""A tiny semi-supervised trainer for the tests of nnUNetSemiSupervisedTrainer.

Found by nnU-Net's own lookup through ``nnUNet_extTrainer`` (this folder), like a user's trainer.
Its loss is the supervised loss plus a ramped entropy term on the unlabelled part, so both parts of
the batch reach the loss; every step logs what it got, for the end-to-end test to check.
"""
import torch

from nnunet_ext.trainers.semi_supervised import nnUNetSemiSupervisedTrainer, sigmoid_rampup, unlabeled_part


class SemiSupervisedTestTrainer(nnUNetSemiSupervisedTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.recorded_batches = []

    def train_step(self, batch: dict) -> dict:
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        record = {"labeled_count": batch["labeled_count"], "data": int(batch["data"].shape[0]),
                  "target": int(target.shape[0]), "keys": list(batch["keys"]),
                  "unlabeled_keys": list(batch["unlabeled_keys"]), "iteration": self.training_iteration}
        self.recorded_batches.append(record)
        self.print_to_log_file(f"semi-test batch: {record}")
        return super().train_step(batch)

    def compute_loss(self, outputs, target, labeled_count: int) -> torch.Tensor:
        supervised = super().compute_loss(outputs, target, labeled_count)
        highest = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        probabilities = torch.softmax(unlabeled_part(highest, labeled_count).float(), dim=1)
        entropy = -(probabilities * torch.log(probabilities + 1e-8)).sum(1).mean()
        return supervised + sigmoid_rampup(self.training_iteration, 10) * 0.1 * entropy
