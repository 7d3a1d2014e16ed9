"""CoTr's experiment planner: nnU-Net's planning, with a CoTr network in the 3d_fullres configuration.

Xie et al., CoTr, MICCAI 2021 (github.com/YtongXie/CoTr). The official code trained on nnU-Net v1's
3d_fullres plans (BCV: spacing 3 x 0.76 x 0.76 mm, patch 48x192x192, batch 2) with a fixed network
(stem stride (1,2,2), then three stride-2 layers). This planner writes ``nnUNetPlans_CoTr`` whose
``3d_fullres`` configuration names :class:`nnunet_ext.architectures.cotr.CoTr` with JSON
``arch_kwargs``, so the stock ``nnUNetv2_preprocess/train/predict -p nnUNetPlans_CoTr`` build it.

What comes from nnU-Net unchanged: target spacing, transpose, normalisation, resampling, the
initial patch (nnU-Net's aspect-ratio patch clipped to the median shape) and ``batch_dice``
(nnU-Net's rule, applied to CoTr's patch: True when the patch covers so little of the median
image that nnU-Net finds a 3d_lowres stage worth planning - as in the official run, whose BCV
plans had two stages). The plans hold ``3d_fullres`` only: CoTr is a full-resolution 3D method, and a 2d
U-Net or a cascade under a CoTr plans name would only mislead.

Strides (:func:`cotr_strides`) - nnU-Net's pooling rules applied to CoTr's fixed four
downsampling stages (the stem and three residual layers; the transformer reads the last two):
at each stage an axis is downsampled by 2 when

1. its current spacing is less than 2x the finest current spacing among the axes that can still
   be downsampled (nnU-Net's ``get_pool_and_conv_props``: coarse axes wait until the others have
   caught up), and
2. its current feature map still has at least ``2 * min_edge`` voxels (nnU-Net's
   ``featuremap_min_edge_length`` rule; CoTr's deepest level is a token map for the deformable
   transformer, not a 3x3x3 conv bottleneck, so ``min_edge`` is 2 rather than nnU-Net's 4).

BCV (3.0, 0.76, 0.76): 3.0/0.76 > 2 -> stem (1,2,2); then 3.0/1.52 < 2 -> (2,2,2) x 3, the
official strides. Isotropic data gets (2,2,2) x 4; coarser z (e.g. 5 x 1 x 1 mm) gets
(1,2,2), (1,2,2), (2,2,2), (2,2,2); a short z extent stops z striding early. If at some stage no
axis can be downsampled, planning fails with an error naming the minimum shape.

Patch size (:func:`cotr_patch_size`): nnU-Net's initial patch, padded up to a multiple of the
cumulative stride (as nnU-Net pads to its pooling), then reduced nnU-Net-style - the axis that
is largest relative to the median shape first, by one stride multiple, strides recomputed - until
``CoTr.compute_conv_feature_map_size`` of the candidate (batch 2) is at most the value of the
paper's network at 48x192x192 / batch 2, scaled by ``gpu_memory_target_in_gb / 8`` (as nnU-Net
scales its U-Net reference; 8 GB is nnU-Net's default target, and CoTr at BCV needs about 8 GB,
nnU-Net Revisited). Batch size 2, as the paper.

Widths are class attributes (``features``, ``d_model``, ...), paper values by default; a subclass
can narrow them (tests do, for CPU runs). The memory reference always is the paper network.
"""
from __future__ import annotations

import math
from copy import deepcopy
from typing import Callable, List, Sequence, Tuple, Union

import numpy as np

from nnunet_ext import compat

COTR_PLANS = "nnUNetPlans_CoTr"
COTR_CLASS_NAME = "nnunet_ext.architectures.cotr.CoTr"
COTR_DOWNSAMPLING_STAGES = 4  # stem + three residual layers (architectures/cotr.py)
COTR_MIN_EDGE = 2
PAPER_PATCH = (48, 192, 192)
PAPER_BATCH_SIZE = 2
PAPER_INPUT_CHANNELS, PAPER_CLASSES = 1, 14  # BCV


class CoTrPlanningError(ValueError):
    """The dataset cannot get a valid CoTr configuration (too small, 2D, memory target too low)."""


def total_stride(strides: Sequence[Sequence[int]]) -> Tuple[int, ...]:
    return tuple(int(v) for v in np.prod(np.asarray(strides, dtype=np.int64), axis=0))


def spacing_only_strides(spacing: Sequence[float], n_stages: int = COTR_DOWNSAMPLING_STAGES) -> List[List[int]]:
    """The strides rule 1 alone gives (no extent limit): CoTr's full downsampling at this spacing."""
    current = [float(s) for s in spacing]
    strides = []
    for _ in range(n_stages):
        finest = min(current)
        stride = [2 if s / finest < 2 else 1 for s in current]
        current = [s * f for s, f in zip(current, stride)]
        strides.append(stride)
    return strides


def minimum_shape(spacing: Sequence[float], n_stages: int = COTR_DOWNSAMPLING_STAGES,
                  min_edge: int = COTR_MIN_EDGE) -> Tuple[int, ...]:
    """Smallest shape that gets the full (spacing-only) downsampling with ``min_edge`` voxels left."""
    return tuple(min_edge * t for t in total_stride(spacing_only_strides(spacing, n_stages)))


def cotr_strides(spacing: Sequence[float], patch_size: Sequence[int], n_stages: int = COTR_DOWNSAMPLING_STAGES,
                 min_edge: int = COTR_MIN_EDGE) -> List[List[int]]:
    """Per-stage (z, y, x) strides for a patch at a spacing (module docstring, rules 1 and 2)."""
    if len(spacing) != 3 or len(patch_size) != 3:
        raise CoTrPlanningError(f"CoTr is a 3D network: need a 3D spacing and patch size, got spacing {spacing} "
                                f"and patch size {patch_size}")
    current_spacing = [float(s) for s in spacing]
    current_size = [int(p) for p in patch_size]
    strides = []
    for stage in range(n_stages):
        valid = [a for a in range(3) if current_size[a] >= 2 * min_edge]
        if not valid:
            raise CoTrPlanningError(
                f"A patch of {tuple(int(p) for p in patch_size)} voxels at spacing {tuple(spacing)} is too small for "
                f"CoTr: it downsamples {n_stages} times (stem + {n_stages - 1} residual layers), and at stage "
                f"{stage + 1} no axis has {2 * min_edge} voxels left to halve (feature map {tuple(current_size)}, "
                f"strides so far {strides}). Minimum: one axis of at least {2 * min_edge * 2 ** (n_stages - 1)} "
                f"voxels; the paper's full downsampling at this spacing, strides "
                f"{spacing_only_strides(spacing, n_stages)}, needs a median image shape of at least "
                f"{minimum_shape(spacing, n_stages, min_edge)} (after resampling to the target spacing).")
        finest = min(current_spacing[a] for a in valid)
        stride = [2 if a in valid and current_spacing[a] / finest < 2 else 1 for a in range(3)]
        for a in range(3):
            if stride[a] == 2:
                current_spacing[a] *= 2
                current_size[a] = math.ceil(current_size[a] / 2)
        strides.append(stride)
    return strides


def nnunet_initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float]) -> np.ndarray:
    """nnU-Net's starting patch: 256^3 voxels in the spacing's aspect ratio, clipped to the median shape
    (``ExperimentPlanner.get_plans_for_configuration``, 3D)."""
    tmp = 1 / np.asarray(spacing, dtype=np.float64)
    initial = [round(i) for i in tmp * (256 ** 3 / np.prod(tmp)) ** (1 / 3)]
    return np.array([min(i, j) for i, j in zip(initial, median_shape)])


def cotr_patch_size(spacing: Sequence[float], median_shape: Sequence[float],
                    fits: Callable[[Tuple[int, ...], List[List[int]]], bool],
                    n_stages: int = COTR_DOWNSAMPLING_STAGES,
                    min_edge: int = COTR_MIN_EDGE) -> Tuple[Tuple[int, ...], List[List[int]]]:
    """Patch size and strides: nnU-Net's initial patch, padded to the cumulative stride, shrunk until ``fits``.

    ``fits(patch, strides)`` is the memory test. Raises :class:`CoTrPlanningError` for shapes too
    small for CoTr or when even the smallest patch does not fit.
    """
    median_shape = [float(m) for m in median_shape]
    if any(m <= 0 for m in median_shape):
        raise CoTrPlanningError(f"median shape must be positive, got {median_shape}")
    initial = nnunet_initial_patch_size(spacing, median_shape)

    def topology(candidate):
        strides = cotr_strides(spacing, candidate, n_stages, min_edge)
        return [int(p) for p in compat.pad_shape(candidate, total_stride(strides))], strides

    patch, strides = topology(initial)
    while not fits(tuple(patch), strides):
        # nnU-Net's reduction: the axis largest relative to the median shape, by one multiple of the
        # cumulative stride, re-deriving the stride first so that no valid size is skipped.
        axis = int(np.argsort([p / m for p, m in zip(patch, median_shape)])[-1])
        smaller = list(patch)
        smaller[axis] -= total_stride(strides)[axis]
        try:
            if smaller[axis] >= 1:
                smaller[axis] = patch[axis] - total_stride(cotr_strides(spacing, smaller, n_stages, min_edge))[axis]
            if smaller[axis] < 1:
                raise CoTrPlanningError(f"axis {axis} cannot shrink below {patch[axis]}")
            patch, strides = topology(smaller)
        except CoTrPlanningError as err:
            raise CoTrPlanningError(
                f"CoTr does not fit the GPU memory target even at patch {tuple(patch)} (strides {strides}): "
                f"a smaller patch is too small for CoTr ({err}). Raise gpu_memory_target_in_gb or plan "
                f"narrower widths.") from err
    return tuple(patch), strides


class CoTrPlanner(compat.experiment_planner_class()):
    """nnU-Net's ExperimentPlanner with a CoTr ``3d_fullres`` configuration (see the module docstring)."""

    # CoTr widths, depths and transformer (paper / BCV); JSON-able, copied into arch_kwargs.
    features: Tuple[int, ...] = (64, 192, 384, 384)
    blocks_per_layer: Tuple[int, ...] = (3, 3, 2)
    norm: str = "instance"
    activation: str = "leakyrelu"
    weight_std: bool = False
    d_model: int = 384
    n_heads: int = 6
    n_layers: int = 6
    d_ffn: int = 1536
    dropout: float = 0.1
    n_points: int = 4
    axis_order: str = "corrected"

    CoTr_featuremap_min_edge_length: int = COTR_MIN_EDGE
    CoTr_batch_size: int = PAPER_BATCH_SIZE
    CoTr_reference_corresp_GB: float = 8.0  # the paper configuration's memory class (nnU-Net's default target)

    _reference_estimate: int | None = None  # of the paper network at PAPER_PATCH; computed once per process

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = COTR_PLANS,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self._estimators = {}  # strides -> CoTr instance, for compute_conv_feature_map_size

    # -- CoTr configuration -----------------------------------------------------------------------
    def cotr_arch_kwargs(self, patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> dict:
        return {
            "patch_size": [int(p) for p in patch_size],
            "strides": [[int(s) for s in stride] for stride in strides],
            "features": [int(f) for f in self.features],
            "blocks_per_layer": [int(b) for b in self.blocks_per_layer],
            "norm": self.norm,
            "activation": self.activation,
            "weight_std": bool(self.weight_std),
            "d_model": int(self.d_model),
            "n_heads": int(self.n_heads),
            "n_layers": int(self.n_layers),
            "d_ffn": int(self.d_ffn),
            "dropout": float(self.dropout),
            "n_points": int(self.n_points),
            "axis_order": self.axis_order,
        }

    @classmethod
    def reference_estimate(cls) -> int:
        """compute_conv_feature_map_size of the paper network (BCV: 1 channel, 14 classes) at 48x192x192."""
        if CoTrPlanner._reference_estimate is None:
            from nnunet_ext.architectures.cotr import paper_cotr

            CoTrPlanner._reference_estimate = int(paper_cotr().compute_conv_feature_map_size(PAPER_PATCH))
        return CoTrPlanner._reference_estimate

    def memory_reference(self) -> float:
        """The per-batch estimate that fits ``gpu_memory_target_in_gb`` (paper at batch 2 = 8 GB)."""
        return self.reference_estimate() * PAPER_BATCH_SIZE * self.UNet_vram_target_GB / self.CoTr_reference_corresp_GB

    def estimate(self, patch_size: Sequence[int], strides: Sequence[Sequence[int]], input_channels: int,
                 num_classes: int) -> int:
        """compute_conv_feature_map_size of this planner's CoTr (deep supervision on, as in training)."""
        from nnunet_ext.architectures.cotr import CoTr

        key = (tuple(map(tuple, strides)), input_channels, num_classes)
        if key not in self._estimators:
            kwargs = self.cotr_arch_kwargs(total_stride(strides), strides)  # smallest valid patch: cheap to check
            self._estimators[key] = CoTr(input_channels=input_channels, num_classes=num_classes,
                                         deep_supervision=True, **kwargs)
        return int(self._estimators[key].compute_conv_feature_map_size(patch_size))

    def cotr_configuration(self, spacing, median_shape, _cache: dict) -> Tuple[Tuple[int, ...], List[List[int]]]:
        input_channels = len(self.dataset_json["channel_names"].keys() if "channel_names" in self.dataset_json
                             else self.dataset_json["modality"].keys())
        num_classes = len(self.dataset_json["labels"].keys())
        reference = self.memory_reference()

        def fits(patch, strides):
            key = f"cotr_{patch}_{strides}"
            if key not in _cache:
                _cache[key] = self.estimate(patch, strides, input_channels, num_classes)
            return _cache[key] * self.CoTr_batch_size <= reference

        return cotr_patch_size(spacing, median_shape[:3], fits, COTR_DOWNSAMPLING_STAGES,
                               self.CoTr_featuremap_min_edge_length)

    # -- nnU-Net hooks ----------------------------------------------------------------------------
    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        """nnU-Net's configuration (normalisation, resampling, ...); 3d_fullres gets CoTr, patch and batch."""
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if data_identifier != self.generate_data_identifier("3d_fullres"):
            return plan  # 2d / 3d_lowres: only computed for nnU-Net's own decisions, not written
        patch_size, strides = self.cotr_configuration(spacing, median_shape, _cache)
        plan = deepcopy(plan)
        plan["patch_size"] = patch_size
        plan["batch_size"] = self.CoTr_batch_size
        plan["architecture"] = {
            "network_class_name": COTR_CLASS_NAME,
            "arch_kwargs": self.cotr_arch_kwargs(patch_size, strides),
            "_kw_requires_import": [],
        }
        return plan

    def save_plans(self, plans):
        configurations = plans["configurations"]
        if "3d_fullres" not in configurations:
            raise CoTrPlanningError(f"CoTr is a 3D network, but {self.dataset_name} has no 3d_fullres configuration "
                                    f"(nnU-Net found it 2D).")
        plans["configurations"] = {"3d_fullres": configurations["3d_fullres"]}
        super().save_plans(plans)
