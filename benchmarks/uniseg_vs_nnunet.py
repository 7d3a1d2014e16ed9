"""UniSeg against nnU-Net's default U-Net, and the task-aware loader against nnU-Net's loader.

1. Training step (forward, loss, backward, SGD step) of UniSeg + partial-label Dice+CE vs
   nnU-Net's PlainConvUNet + Dice+CE, same topology (UniSeg's paper plan: 6 stages 32..320,
   first kernel 1x3x3), same patch and batch, one run on one device: seconds per step, ratio,
   peak memory, parameters.
2. Loader throughput (batches/s, nnU-Net's augmentation included, single process) of
   ``TaskAwareDataLoader`` vs ``nnUNetDataLoader`` on the same preprocessed data: the synthetic
   partially labelled family, merged and preprocessed with nnU-Net in a temporary folder.

Usage: ``python benchmarks/uniseg_vs_nnunet.py [--patch 64 192 192] [--batch 2] [--device cuda]
[--loader-batches 30]``; on a CPU use a small patch (e.g. 32 64 64). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_ext import compat
from nnunet_ext.architectures.uniseg import UniSeg
from nnunet_ext.losses.partial_label import PartialLabelLoss

sys.path.insert(0, str(Path(__file__).parent))
from banet_vs_nnunet import ds_weights, label_targets  # noqa: E402
from step_timing import measure_training_step, memory_ratio  # noqa: E402

TASK_CHANNELS = [1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 2]  # the official 11 tasks
CLASSES = 4


def topology() -> dict:
    return dict(n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=nn.Conv3d,
                kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5, strides=[[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * 4,
                n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5, conv_bias=True,
                norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"inplace": True})


def build_uniseg(patch) -> UniSeg:
    network = UniSeg(input_channels=max(TASK_CHANNELS), num_classes=CLASSES, deep_supervision=True,
                     patch_size=list(patch), task_channels=TASK_CHANNELS, **topology())
    network.set_task(0)
    return network


class Loss:
    def __init__(self, batch: int, device: str, partial: bool):
        self.batch, self.device, self.partial, self.loss, self.targets = batch, device, partial, None, None

    def __call__(self, outputs, x):
        if self.loss is None:
            self.targets = label_targets([o.shape[2:] for o in outputs], 3, self.batch, self.device)
            base = compat.dice_ce_loss(True, ignore_label=CLASSES if self.partial else None)
            if self.partial:  # task 0 annotates 3 of the 4 classes, as in the official task_class
                base = PartialLabelLoss(base, [[True, True, True, False]], None, CLASSES)
            self.loss = compat.deep_supervision_loss(base, ds_weights(len(outputs)))
        return self.loss(outputs, self.targets)


def loader_throughput(batches: int) -> dict:
    """Batches/s of both loaders on the merged synthetic family, nnU-Net's augmentation in-process."""
    from nnunet_ext.testing.harness import make_universal_root, plan_and_preprocess
    from nnunet_ext.trainers.universal import nnUNetUniversalTrainer
    from nnunet_ext.tasks.sampling import TaskAwareDataLoader

    with tempfile.TemporaryDirectory() as folder:
        root = make_universal_root(folder)
        plan_and_preprocess(root)
        os.environ.update({"nnUNet_raw": str(root.raw), "nnUNet_preprocessed": str(root.preprocessed),
                           "nnUNet_results": str(root.results), "nnUNet_n_proc_DA": "0"})
        plans = json.loads((root.preprocessed / root.dataset_name / "nnUNetPlans.json").read_text())
        dataset_json = json.loads((root.preprocessed / root.dataset_name / "dataset.json").read_text())
        trainer = compat.instantiate_trainer(nnUNetUniversalTrainer, plans, "3d_fullres", 0, dataset_json,
                                             torch.device("cpu"))
        trainer.initialize()
        trainer.dataset_class = compat.dataset_class_of_folder(trainer.preprocessed_dataset_folder)
        train_tf, _, initial = compat.trainer_data_transforms(trainer)
        dataset, _ = trainer.get_tr_and_val_datasets()
        patch = trainer.configuration_manager.patch_size
        common = dict(oversample_foreground_percent=trainer.oversample_foreground_percent, transforms=train_tf)
        loaders = {
            "nnunet": compat.nnunet_data_loader_class()(dataset, trainer.batch_size, initial, patch,
                                                         trainer.label_manager, **common),
            "task_aware": TaskAwareDataLoader(dataset, trainer.batch_size, initial, patch, trainer.label_manager,
                                              trainer.task_map, **common),
        }
        result = {}
        for name, loader in loaders.items():
            next(loader)  # warm-up
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            result[f"{name}_batches_per_s"] = batches / (time.perf_counter() - start)
        result["ratio_task_aware_over_nnunet"] = result["task_aware_batches_per_s"] / result["nnunet_batches_per_s"]
        result["patch"] = list(patch)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 192, 192])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loader-batches", type=int, default=30)
    args = parser.parse_args()
    shape_uniseg = (args.batch, max(TASK_CHANNELS), *args.patch)
    uniseg = measure_training_step(functools.partial(build_uniseg, args.patch), shape_uniseg, args.device,
                                   args.steps, functools.partial(Loss, args.batch, args.device, True))
    unet = measure_training_step(functools.partial(PlainConvUNet, 1, num_classes=CLASSES, deep_supervision=True,
                                                   **topology()), (args.batch, 1, *args.patch), args.device,
                                 args.steps, functools.partial(Loss, args.batch, args.device, False))
    report = {"benchmark": "uniseg_vs_nnunet_default_unet", "device": args.device, "patch": args.patch,
              "batch": args.batch, "uniseg": uniseg, "nnunet_unet": unet,
              "time_ratio_uniseg_over_unet": uniseg["seconds_per_step"] / unet["seconds_per_step"],
              "memory_ratio_uniseg_over_unet": memory_ratio(uniseg, unet)}
    if args.loader_batches:
        report["loader"] = loader_throughput(args.loader_batches)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
