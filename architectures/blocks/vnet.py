"""V-Net building blocks shared by the semi-supervised networks (MC-Net+, LeFeD).

Both official codes build on the same V-Net (``networks/VNet.py`` of ycwu1997/MC-Net and of
maxwell0027/LeFeD): non-residual stages of 3x3(x3) conv + BatchNorm + ReLU, downsampling by a
conv whose kernel equals its stride, and decoders that upsample in one of three ways (the
official ``mode_upsampling`` 0, 1, 2). Written once here, for 2D and 3D (the dimension follows
the stride's length), so a plan-driven network can take any per-axis stride from nnU-Net.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLING_MODES = ("transposed", "linear", "nearest")  # official mode_upsampling 0, 1, 2


def vnet_ops(dim: int):
    """(conv, transposed conv, norm, dropout, linear interpolation mode) of a 2D or 3D V-Net."""
    if dim == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.Dropout3d, "trilinear"
    if dim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Dropout2d, "bilinear"
    raise ValueError(f"the V-Net is built for 2D or 3D strides, got {dim}D")


class VNetConvStage(nn.Sequential):
    """``n`` x (3x3(x3) conv with bias, BatchNorm, ReLU): a V-Net stage (non-residual, as official)."""

    def __init__(self, n: int, in_channels: int, out_channels: int, dim: int = 3):
        conv, _, norm, _, _ = vnet_ops(dim)
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [conv(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                       norm(out_channels), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class VNetDown(nn.Sequential):
    """Downsampling by a conv whose kernel equals its stride, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int]):
        conv, _, norm, _, _ = vnet_ops(len(stride))
        super().__init__(conv(in_channels, out_channels, tuple(stride), stride=tuple(stride)), norm(out_channels),
                         nn.ReLU(inplace=True))


def upsample(x: torch.Tensor, stride: Sequence[int], mode: str) -> torch.Tensor:
    """Interpolation by an integer stride per axis: ``mode`` is F.interpolate's; the linear modes use
    ``align_corners=True`` (official)."""
    if all(s == 1 for s in stride):
        return x
    size = [n * s for n, s in zip(x.shape[2:], stride)]
    return F.interpolate(x, size=size, mode=mode, align_corners=None if mode == "nearest" else True)


class VNetUp(nn.Module):
    """Upsampling by ``stride``, BatchNorm, ReLU: ``"transposed"`` (kernel = stride), ``"linear"``
    ((bi/tri)linear interpolation, ``align_corners=True``, then a 3x3(x3) conv) or ``"nearest"``
    (nearest interpolation, then a 3x3(x3) conv), as the official ``mode_upsampling`` 0, 1, 2."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], mode: str):
        super().__init__()
        if mode not in UPSAMPLING_MODES:
            raise ValueError(f"upsampling mode {mode!r}: one of {UPSAMPLING_MODES}")
        conv, transposed, norm, _, linear = vnet_ops(len(stride))
        self.stride, self.mode = tuple(int(s) for s in stride), mode
        self.interpolation = linear if mode == "linear" else "nearest"
        self.conv = transposed(in_channels, out_channels, self.stride, stride=self.stride) if mode == "transposed" \
            else conv(in_channels, out_channels, 3, padding=1)
        self.norm, self.act = norm(out_channels), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "transposed":
            x = upsample(x, self.stride, self.interpolation)
        return self.act(self.norm(self.conv(x)))
