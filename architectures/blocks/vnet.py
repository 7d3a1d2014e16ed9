"""V-Net building blocks shared by the semi-supervised networks (MC-Net+, LeFeD).

Both official codes build on the same V-Net (``networks/VNet.py`` of ycwu1997/MC-Net and of
maxwell0027/LeFeD): non-residual stages of 3x3(x3) conv + BatchNorm + ReLU, downsampling by a
conv whose kernel equals its stride, and decoders that upsample in one of three ways (the
official ``mode_upsampling`` 0, 1, 2), add the skip and end in a dropout and a 1x1 head. Written
once here (blocks, :class:`VNetEncoder`, :class:`VNetDecoder`), for 2D and 3D (the dimension
follows the stride's length), so a plan-driven network can take any per-axis stride from nnU-Net.
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


def _dropout(dim: int, p: float) -> nn.Module:
    return vnet_ops(dim)[3](p=p) if p > 0 else nn.Identity()


class VNetEncoder(nn.Module):
    """V-Net encoder: ``len(widths)`` conv stages (``convs[k]`` layers at ``widths[k]`` channels, full
    resolution first), a strided-conv downsampling after every stage but the last (``strides``, one
    fewer than ``widths``), dropout on the bottleneck. Returns every stage's output (nnU-Net's skip
    order: full resolution first, bottleneck last).

    ``feedback`` (LeFeD): one tensor per stage added to the stage's output before it is used (and
    before the bottleneck dropout). ``downsampling_name``: the attribute, hence the state-dict name,
    of the downsampling convs (MC-Net+'s checkpoints say ``downsamplings``, LeFeD's ``downs``).
    """

    downsampling_name = "downsamplings"

    def __init__(self, input_channels: int, widths: Sequence[int], convs: Sequence[int],
                 strides: Sequence[Sequence[int]], dropout_p: float) -> None:
        super().__init__()
        dim = len(strides[0])
        self.stages = nn.ModuleList(VNetConvStage(convs[k], input_channels if k == 0 else widths[k], widths[k], dim)
                                    for k in range(len(widths)))
        self.add_module(self.downsampling_name, nn.ModuleList(VNetDown(widths[k], widths[k + 1], stride)
                                                              for k, stride in enumerate(strides)))
        self.dropout = _dropout(dim, dropout_p)
        self.widths = list(widths)

    def forward(self, x: torch.Tensor, feedback: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if feedback is not None and len(feedback) != len(self.stages):
            raise ValueError(f"feedback needs {len(self.stages)} tensors (one per encoder stage), got {len(feedback)}")
        downsamplings = self._modules[self.downsampling_name]
        skips = []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if feedback is not None:
                x = x + feedback[k]
            if k == len(self.stages) - 1:
                x = self.dropout(x)
            skips.append(x)
            if k < len(downsamplings):
                x = downsamplings[k](x)
        return skips


class VNetDecoder(nn.Module):
    """One V-Net decoder: from the bottleneck up, upsample (:class:`VNetUp`, ``mode``), add the skip,
    the level's conv stage (``convs[k]`` layers at level ``k``, the encoder's count); then dropout and
    a 1x1 head. Returns ``(logits, features)``; ``features`` (full resolution first) are the upsampled
    maps before each skip is added and, last, the bottleneck as used.

    ``gates`` (LeFeD's decoder 2): one map per level; the bottleneck becomes ``x + x * gates[-1]``
    and every skip ``skip * gates[k]``.
    """

    def __init__(self, num_classes: int, widths: Sequence[int], convs: Sequence[int],
                 strides: Sequence[Sequence[int]], mode: str, dropout_p: float) -> None:
        super().__init__()
        dim = len(strides[0])
        levels = range(len(strides) - 1, -1, -1)  # the level each upsampling step reaches, deepest first
        self.mode = mode
        self.ups = nn.ModuleList(VNetUp(widths[k + 1], widths[k], strides[k], mode) for k in levels)
        self.stages = nn.ModuleList(VNetConvStage(convs[k], widths[k], widths[k], dim) for k in levels)
        self.dropout = _dropout(dim, dropout_p)
        self.head = vnet_ops(dim)[0](widths[0], num_classes, 1)

    def forward(self, skips: Sequence[torch.Tensor], gates: Sequence[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = skips[-1]
        if gates is not None:
            x = x + x * gates[-1]
        features = [x]
        for i, (up, stage) in enumerate(zip(self.ups, self.stages)):
            level = len(skips) - 2 - i
            upsampled = up(x)
            features.append(upsampled)
            skip = skips[level] if gates is None else skips[level] * gates[level]
            x = stage(upsampled + skip)
        return self.head(self.dropout(x)), features[::-1]
