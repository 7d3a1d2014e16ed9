"""CoTr against nnU-Net's default PlainConvUNet: forward+backward time, peak memory, parameters.

Both networks at the same patch and batch, measured in one run on the same device, and reported
as a ratio. Usage: ``python benchmarks/cotr_vs_unet.py [--patch 48 192 192] [--batch 2]
[--device cuda] [--steps 5]``. On a CPU, use a small patch (e.g. 16 64 64). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_ext.architectures.cotr import CoTr

sys.path.insert(0, str(Path(__file__).parent))
from step_timing import measure_training_step, memory_ratio  # noqa: E402


def nnunet_default_unet(num_classes: int, strides) -> PlainConvUNet:
    """nnU-Net's 3d_fullres U-Net for the same pooling as CoTr's encoder (plus nnU-Net's extra stage)."""
    n_stages = len(strides) + 1
    features = [min(32 * 2 ** i, 320) for i in range(n_stages)]
    kernels = [[1 if s[0] == 1 and i == 0 else 3, 3, 3] for i, s in enumerate([[1, 1, 1]] + list(strides))]
    return PlainConvUNet(1, n_stages, features, torch.nn.Conv3d, kernels, [[1, 1, 1]] + list(strides), 2,
                         num_classes, 2, True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 192, 192])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    strides = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    shape = (args.batch, 1, *args.patch)
    cotr = measure_training_step(functools.partial(CoTr, input_channels=1, num_classes=args.classes,
                                                   patch_size=args.patch, strides=strides, deep_supervision=True),
                                 shape, str(device), args.steps)
    unet = measure_training_step(functools.partial(nnunet_default_unet, args.classes, strides), shape, str(device),
                                 args.steps)
    report = {"benchmark": "cotr_vs_plainconvunet", "device": str(device), "patch": args.patch, "batch": args.batch,
              "cotr": cotr, "plainconvunet": unet,
              "time_ratio_cotr_over_unet": cotr["seconds_per_step"] / unet["seconds_per_step"]}
    report["memory_ratio_cotr_over_unet"] = memory_ratio(cotr, unet)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
