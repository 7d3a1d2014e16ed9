"""Boundary targets made on the training device, and BA-Net's boundary-aware loss.

BA-Net (Hu et al., KiPA22 / AMOS22, github.com/ShishuaiHu/BA-Net) supervises a second decoder
with the boundaries of the *augmented* label patch. The official code computes them per sample
with skimage on the CPU: for every pair of consecutive class values ``level`` it takes
``(seg > level) - erosion(seg > level, cube(3))`` and marks the union; the result is then
downsampled like nnU-Net's deep-supervision targets and binarised.

Here the same target comes from one min-pooling of the label map, on the device, for the whole
batch: a voxel lies on the inner boundary of some threshold mask ``seg > level`` exactly when its
value is larger than the smallest value in its 3x3(x3) neighbourhood (take ``level`` = that
minimum, which is itself a label value below the voxel's). The patch border does not count as
an edge (min-pooling ignores padding, like an erosion with border value 1), as in
skimage/scipy erosion of the official code.

* Region-based datasets (dataset.json ``regions``, e.g. KiTS): nnU-Net's targets are one binary
  channel per region; the boundary is the union of every region's inner boundary.
* Ignore label: ignored voxels count as inside every structure (the ignore label is nnU-Net's
  highest label value, and its region channel is OR-ed into every region), so no boundary is
  invented along an unannotated area, and the ignored voxels themselves get the boundary
  target ``IGNORE`` that the boundary loss skips.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BOUNDARY_IGNORE = 2  # boundary target value for ignored voxels (targets are 0 = inside/outside, 1 = boundary)


def _min_pool3(x: torch.Tensor) -> torch.Tensor:
    """Minimum over the 3x3(x3) neighbourhood, per channel; padding never wins."""
    pool = F.max_pool3d if x.ndim == 5 else F.max_pool2d
    return -pool(-x, kernel_size=3, stride=1, padding=1)


def label_boundaries(segmentation: torch.Tensor, ignore_label: int | None = None) -> torch.Tensor:
    """Boundary map of a label map batch ``(B, 1, *spatial)`` (2D or 3D), values 0/1/``BOUNDARY_IGNORE``."""
    seg = segmentation.float()
    boundary = (seg > _min_pool3(seg))
    if ignore_label is None:
        return boundary.to(seg.dtype)
    ignored = seg == ignore_label
    return torch.where(ignored, torch.full_like(seg, BOUNDARY_IGNORE), (boundary & ~ignored).to(seg.dtype))


def region_boundaries(regions: torch.Tensor, has_ignore_channel: bool = False) -> torch.Tensor:
    """Boundary map of region targets ``(B, R[+1], *spatial)``; with an ignore channel it is the last one."""
    masks = regions.float()
    if has_ignore_channel:
        ignored = masks[:, -1:] > 0
        masks = torch.maximum(masks[:, :-1], ignored.to(masks.dtype))
    boundary = (masks > _min_pool3(masks)).any(dim=1, keepdim=True)
    if not has_ignore_channel:
        return boundary.to(masks.dtype)
    return torch.where(ignored, torch.full_like(boundary, BOUNDARY_IGNORE, dtype=masks.dtype),
                       (boundary & ~ignored).to(masks.dtype))


def downsample_like(boundary: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-exact downsampling to ``shape``: what nnU-Net's DownsampleSegForDSTransform does to labels."""
    if tuple(boundary.shape[2:]) == tuple(shape):
        return boundary
    return F.interpolate(boundary, size=tuple(shape), mode="nearest-exact")


class BoundaryTargets(nn.Module):
    """Deep-supervision boundary targets from nnU-Net's deep-supervision label targets.

    ``from_each_scale=False`` (default, as the official code): boundaries of the full-resolution
    target, downsampled to each scale as nnU-Net downsamples labels. ``True``: boundaries of each
    scale's own (already downsampled) label target, one voxel thick at every scale.
    """

    def __init__(self, has_regions: bool, ignore_label: int | None, from_each_scale: bool = False):
        super().__init__()
        self.has_regions = has_regions
        self.ignore_label = ignore_label
        self.from_each_scale = from_each_scale

    def boundaries(self, target: torch.Tensor) -> torch.Tensor:
        if self.has_regions:
            return region_boundaries(target, has_ignore_channel=self.ignore_label is not None)
        return label_boundaries(target, self.ignore_label)

    @torch.no_grad()
    def forward(self, targets: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.from_each_scale:
            return [self.boundaries(t) for t in targets]
        full = self.boundaries(targets[0])
        return [full] + [downsample_like(full, t.shape[2:]) for t in targets[1:]]


class BoundaryAwareLoss(nn.Module):
    """BA-Net's loss: segmentation loss + boundary loss (1:1), both over all deep-supervision scales.

    The network returns ``[seg_0, ..., seg_{n-1}, bdr_0, ..., bdr_{n-1}]`` (full resolution
    first in each half); ``targets`` are nnU-Net's ``n`` deep-supervision label targets.
    """

    def __init__(self, segmentation_loss: nn.Module, boundary_loss: nn.Module, boundary_targets: BoundaryTargets):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.boundary_loss = boundary_loss
        self.boundary_targets = boundary_targets

    def forward(self, outputs: Sequence[torch.Tensor], targets: List[torch.Tensor]) -> torch.Tensor:
        n = len(targets)
        if len(outputs) != 2 * n:
            raise ValueError(f"BoundaryAwareLoss expects {2 * n} outputs (segmentation and boundary at {n} scales), "
                             f"got {len(outputs)}; is the network BA-Net with deep supervision enabled?")
        segmentation, boundary = list(outputs[:n]), list(outputs[n:])
        return self.segmentation_loss(segmentation, targets) + \
            self.boundary_loss(boundary, self.boundary_targets(targets))
