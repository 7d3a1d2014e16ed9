"""CoTr against nnU-Net's default PlainConvUNet: forward+backward time, peak memory, parameters.

Both networks at the same patch and batch, measured in one run on the same device, and reported
as a ratio. Usage: ``python benchmarks/cotr_vs_unet.py [--patch 48 192 192] [--batch 2]
[--device cuda] [--steps 5]``. On a CPU, use a small patch (e.g. 16 64 64). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_ext.architectures.cotr import CoTr


def nnunet_default_unet(num_classes: int, strides) -> PlainConvUNet:
    """nnU-Net's 3d_fullres U-Net for the same pooling as CoTr's encoder (plus nnU-Net's extra stage)."""
    n_stages = len(strides) + 1
    features = [min(32 * 2 ** i, 320) for i in range(n_stages)]
    kernels = [[1 if s[0] == 1 and i == 0 else 3, 3, 3] for i, s in enumerate([[1, 1, 1]] + list(strides))]
    return PlainConvUNet(1, n_stages, features, torch.nn.Conv3d, kernels, [[1, 1, 1]] + list(strides), 2,
                         num_classes, 2, True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)


def measure(network: torch.nn.Module, patch, batch: int, device: torch.device, steps: int) -> dict:
    network = network.to(device).train()
    optimiser = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(batch, 1, *patch, device=device)
    autocast = torch.autocast(device.type, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):  # first step is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            outputs = network(x)
            loss = sum(o.float().mean() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    result = {"seconds_per_step": sorted(times)[len(times) // 2],
              "parameters": sum(p.numel() for p in network.parameters())}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
    return result


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
    cotr = measure(CoTr(input_channels=1, num_classes=args.classes, patch_size=args.patch, strides=strides,
                        deep_supervision=True), args.patch, args.batch, device, args.steps)
    unet = measure(nnunet_default_unet(args.classes, strides), args.patch, args.batch, device, args.steps)
    report = {"benchmark": "cotr_vs_plainconvunet", "device": str(device), "patch": args.patch, "batch": args.batch,
              "cotr": cotr, "plainconvunet": unet,
              "time_ratio_cotr_over_unet": cotr["seconds_per_step"] / unet["seconds_per_step"]}
    if "peak_memory_gb" in cotr:
        report["memory_ratio_cotr_over_unet"] = cotr["peak_memory_gb"] / unet["peak_memory_gb"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
