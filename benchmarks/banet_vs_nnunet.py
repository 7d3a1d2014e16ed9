"""BA-Net (network + boundary-aware loss) against nnU-Net's default U-Net (network + its loss).

Same topology (nnU-Net's 3d_fullres default for the patch), same patch and batch, one run on
one device; reports seconds per training step (forward, loss, backward, SGD step), the ratio,
peak memory and parameter counts, and the share of a BA-Net step spent making boundary
targets (target: < 5 %). Usage: ``python benchmarks/banet_vs_nnunet.py [--patch 128 128 128]
[--batch 2] [--classes 5] [--device cuda]``. On a CPU use a small patch (e.g. 64 64 64).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_ext import compat
from nnunet_ext.architectures.banet import BANet, nnunet_default_topology_3d
from nnunet_ext.losses.boundary import BoundaryAwareLoss, BoundaryTargets

sys.path.insert(0, str(Path(__file__).parent))
from step_timing import measure_training_step, memory_ratio  # noqa: E402


def ds_weights(n: int) -> np.ndarray:
    """nnU-Net's deep-supervision weights: 1/2^i, lowest output 0, normalised."""
    weights = np.array([1 / 2 ** i for i in range(n)])
    weights[-1] = 0
    return weights / weights.sum()


def label_targets(shapes, classes: int, batch: int, device) -> list:
    """A blobby label patch at full resolution, nearest-downsampled like nnU-Net's DS targets."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((batch, 1, *[max(2, s // 8) for s in shapes[0]]), generator=generator)
    full = F.interpolate(noise, size=tuple(shapes[0]), mode="trilinear")
    seg = torch.clamp((full * classes).floor(), max=classes - 1).to(device)
    return [F.interpolate(seg, size=tuple(s), mode="nearest-exact") for s in shapes]


class NnUNetLoss:
    def __init__(self, classes: int, batch: int, device: str):
        self.classes, self.batch, self.device, self.loss, self.targets = classes, batch, device, None, None

    def __call__(self, outputs, x):
        if self.loss is None:
            self.targets = label_targets([o.shape[2:] for o in outputs], self.classes, self.batch, self.device)
            self.loss = compat.deep_supervision_loss(compat.dice_ce_loss(True), ds_weights(len(outputs)))
        return self.loss(outputs, self.targets)


class BANetLoss(NnUNetLoss):
    def __call__(self, outputs, x):
        if self.loss is None:
            n = len(outputs) // 2
            self.targets = label_targets([o.shape[2:] for o in outputs[:n]], self.classes, self.batch, self.device)
            weights = ds_weights(n)
            self.loss = BoundaryAwareLoss(compat.deep_supervision_loss(compat.dice_ce_loss(True), weights),
                                          compat.deep_supervision_loss(compat.dice_ce_loss(True), weights),
                                          BoundaryTargets(False, None))
        return self.loss(outputs, self.targets)


def boundary_target_seconds(shapes, classes: int, batch: int, device: torch.device, repeats: int = 5) -> float:
    targets = label_targets(shapes, classes, batch, device)
    make = BoundaryTargets(False, None)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        make(targets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    topology = nnunet_default_topology_3d(args.patch)
    shape = (args.batch, 1, *args.patch)
    banet = measure_training_step(functools.partial(BANet, input_channels=1, num_classes=args.classes,
                                                    deep_supervision=True, **topology), shape, args.device,
                                  args.steps, functools.partial(BANetLoss, args.classes, args.batch, args.device))
    unet = measure_training_step(functools.partial(PlainConvUNet, 1, num_classes=args.classes,
                                                   deep_supervision=True, **topology), shape, args.device,
                                 args.steps, functools.partial(NnUNetLoss, args.classes, args.batch, args.device))
    cumulative = np.cumprod(np.array(topology["strides"]), axis=0)[:-1]
    ds_shapes = [[p // c for p, c in zip(args.patch, cum)] for cum in cumulative]
    targets_s = boundary_target_seconds(ds_shapes, args.classes, args.batch, torch.device(args.device))
    print(json.dumps({
        "benchmark": "banet_vs_nnunet_default_unet", "device": args.device, "patch": args.patch,
        "batch": args.batch, "stages": topology["n_stages"], "banet": banet, "nnunet_unet": unet,
        "time_ratio_banet_over_unet": banet["seconds_per_step"] / unet["seconds_per_step"],
        "memory_ratio_banet_over_unet": memory_ratio(banet, unet),
        "boundary_targets_seconds": targets_s,
        "boundary_targets_share_of_banet_step": targets_s / banet["seconds_per_step"],
    }))


if __name__ == "__main__":
    main()
