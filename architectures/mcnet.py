"""MC-Net / MC-Net+: one V-Net encoder, several decoders that differ only in how they upsample.

Follows Wu et al., "Mutual consistency learning for semi-supervised medical image segmentation"
(MedIA 2022) and its official code (github.com/ycwu1997/MC-Net, ``networks/VNet.py``), written
anew for nnU-Net v2:

* blocks: ``architectures/blocks/vnet.py`` (shared with LeFeD);
* encoder: V-Net with ``base_filters`` (16) doubling per level, no cap; convs 3x3x3 + BatchNorm +
  ReLU, 1, 2, 3, 3, 3 per level; downsampling by a strided conv whose kernel equals its stride,
  + BN + ReLU; Dropout3d(0.5) on the bottleneck (training mode only, shared by all decoders);
* decoders: upsample to the level above (``transpose``: ConvTranspose3d(k = s = stride);
  ``trilinear``: trilinear with align_corners=True + 3x3x3 conv; ``nearest``: nearest + 3x3x3
  conv; each + BN + ReLU), add the skip (V-Net's additive skips, not concatenation), the level's
  conv block; each decoder has its own Dropout3d(0.5) before its 1x1 head.
  ``num_decoders`` = 1 is V-Net, 2 is MC-Net, 3 is MC-Net+ (the official order of kinds).

Plan-driven (where we had to decide): the official net always downsamples 4 times by 2x2x2.
Here ``strides`` lists the per-level downsampling (any count >= 1, anisotropic allowed), so the
network follows nnU-Net's patch and spacing; :func:`strides_from_plans` takes them from
nnU-Net's plans (at most 4, the official depth). Conv counts per level follow the official
pattern (1, 2, then 3s); decoder level l has as many convs as encoder level l (as official).
Any patch divisible by the product of the strides works.

Official weights: the official ``MCNet3d_v2`` (``MCNet3d_v1`` for 2 decoders, ``VNet`` for 1) is
this network at the default configuration (no conventions to switch); ``official_key_map()`` /
``from_official_state_dict(sd)`` / ``official_state_dict()`` rename between our keys and the
official ``encoder.block_one.conv.0.weight``-style names (see :func:`name_vnet_encoder`).
Needs the official depth (4 downsamplings, 1/2/3/3/3 convs) and decoder kinds in the official
order; shapes (filters, classes, channels) are checked when the weights are loaded.

Outputs: in training mode (or with ``decoder.deep_supervision`` True), a list of every decoder's
logits, decoder 1 first. In eval mode with deep supervision off (what nnU-Net's predictor and
validation use) one tensor: ``inference="first"`` decoder 1 only (the paper's choice; only
decoder 1 is run), ``"mean"`` the mean of all decoders' logits (the official
``test_single_case_average_output``, which averages logits, not probabilities).

torch.compile: no graph break; training and eval mode are separate graphs (different outputs).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nnunet_ext.architectures.blocks.nnunet_v1 import OfficialNames, OfficialStateDict
from nnunet_ext.architectures.blocks.topology import (downsampling_strides, require_full_resolution_first,
                                                      total_stride)
from nnunet_ext.architectures.blocks.vnet import UPSAMPLING_MODES, VNetDecoder, VNetEncoder

UPSAMPLING_KINDS = ("transpose", "trilinear", "nearest")  # the official decoders 1, 2, 3
_BLOCK_MODES = dict(zip(UPSAMPLING_KINDS, UPSAMPLING_MODES))  # the shared VNetUp's names of the same three
INFERENCE_MODES = ("first", "mean")
OFFICIAL_STRIDES = ((2, 2, 2),) * 4
OFFICIAL_MAX_DOWNSAMPLINGS = 4


def official_convs_per_level(num_levels: int) -> list[int]:
    """1, 2, 3, 3, ... convs per resolution level (official: 1, 2, 3, 3, 3 for 5 levels)."""
    return [min(level + 1, 3) for level in range(num_levels)]


def strides_from_plans(plan_strides: Sequence[Sequence[int] | int],
                       max_downsamplings: int = OFFICIAL_MAX_DOWNSAMPLINGS) -> list[list[int]]:
    """MCNet's downsampling from nnU-Net's plans ``strides`` (= pool op kernel sizes): the steps after
    the plans' stride-1 first stage, at most ``max_downsamplings`` of them (the paper's V-Net depth,
    4, where the plans allow it; fewer where the patch is too small), not padded
    (:func:`~nnunet_ext.architectures.blocks.topology.downsampling_strides`)."""
    require_full_resolution_first(plan_strides, "MC-Net+")
    return downsampling_strides(plan_strides, max_downsamplings, pad=False)


# The official V-Net's module names (``networks/VNet.py`` of ycwu1997/MC-Net; LeFeD's ``my_net.py``
# copies them): encoder stages full resolution first, decoder steps deepest first.
OFFICIAL_ENCODER_STAGES = ("block_one", "block_two", "block_three", "block_four", "block_five")
OFFICIAL_DECODER_UPS = ("block_five_up", "block_six_up", "block_seven_up", "block_eight_up")
OFFICIAL_DECODER_STAGES = ("block_six", "block_seven", "block_eight", "block_nine")
OFFICIAL_CONVS_PER_LEVEL = (1, 2, 3, 3, 3)


def name_vnet_encoder(names: OfficialNames, stages, downsamplings, prefix: str = "encoder") -> None:
    """Official V-Net encoder names: stage ``k`` is ``block_<k>.conv.<i>`` (the ``Sequential`` of
    conv, BN, ReLU per layer, as ours), its downsampling ``block_<k>_dw.conv.<i>``."""
    for name, stage in zip(OFFICIAL_ENCODER_STAGES, stages):
        names.sequential(stage, f"{prefix}.{name}.conv")
    for name, down in zip(OFFICIAL_ENCODER_STAGES, downsamplings):
        names.sequential(down, f"{prefix}.{name}_dw.conv")


def name_vnet_decoder(names: OfficialNames, ups, stages, head: nn.Module, prefix: str) -> None:
    """Official V-Net decoder names (``Decoder``): the official ``Upsampling_function`` is one
    ``Sequential`` holding ``[ConvTranspose, BN]`` (mode 0) or ``[Upsample, conv, BN]`` (modes 1, 2),
    so the conv is ``conv.0`` or ``conv.1``; stages ``block_six`` .. ``block_nine``; head ``out_conv``."""
    for name, up in zip(OFFICIAL_DECODER_UPS, ups):
        first = 0 if up.mode == "transposed" else 1
        names.add(up.conv, f"{prefix}.{name}.conv.{first}")
        names.add(up.norm, f"{prefix}.{name}.conv.{first + 1}")
    for name, stage in zip(OFFICIAL_DECODER_STAGES, stages):
        names.sequential(stage, f"{prefix}.{name}.conv")
    names.add(head, f"{prefix}.out_conv")


class MCNetDecoders(nn.Module):
    """The decoders, and the ``deep_supervision`` switch nnU-Net flips (here: all outputs or one)."""

    def __init__(self, decoders: Sequence[VNetDecoder], inference: str, deep_supervision: bool):
        super().__init__()
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference={inference!r}; use one of {INFERENCE_MODES}")
        self.decoders = nn.ModuleList(decoders)
        self.inference = inference
        self.deep_supervision = bool(deep_supervision)

    def forward(self, skips: Sequence[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        if self.training or self.deep_supervision:
            return [decoder(skips)[0] for decoder in self.decoders]
        if self.inference == "first":
            return self.decoders[0](skips)[0]
        return torch.stack([decoder(skips)[0] for decoder in self.decoders]).mean(0)


class MCNet(nn.Module, OfficialStateDict):
    """MC-Net+ (3 decoders), MC-Net (2) or V-Net (1); keyword arguments a plan or trainer can give.

    ``strides``: per-level downsampling, deepest last (default the official 4 x 2x2x2; see
    :func:`strides_from_plans`). ``convs_per_level``: default 1, 2, 3, 3, ... (official).
    ``upsampling``: the decoders' kinds (default the first ``num_decoders`` of transpose,
    trilinear, nearest). ``deep_supervision``: return all decoders' logits also in eval mode.
    """

    def __init__(self, input_channels: int, num_classes: int,
                 strides: Sequence[Sequence[int]] = OFFICIAL_STRIDES, num_decoders: int = 3,
                 base_filters: int = 16, convs_per_level: Sequence[int] | None = None,
                 upsampling: Sequence[str] | None = None, dropout_p: float = 0.5, inference: str = "first",
                 deep_supervision: bool = False):
        super().__init__()
        strides = [[int(s) for s in stride] for stride in strides]
        if not strides or any(len(stride) != 3 or min(stride) < 1 for stride in strides):
            raise ValueError(f"MCNet is 3D: strides must be a non-empty list of 3 positive ints each, got {strides}")
        if upsampling is None:
            if not 1 <= num_decoders <= len(UPSAMPLING_KINDS):
                raise ValueError(f"num_decoders={num_decoders}: the paper has 1 to {len(UPSAMPLING_KINDS)} "
                                 f"(V-Net, MC-Net, MC-Net+); give `upsampling` explicitly for more")
            upsampling = UPSAMPLING_KINDS[:num_decoders]
        elif len(upsampling) != num_decoders:
            raise ValueError(f"upsampling {list(upsampling)} does not name num_decoders={num_decoders} decoders")
        num_levels = len(strides) + 1
        convs = list(convs_per_level) if convs_per_level is not None else official_convs_per_level(num_levels)
        if len(convs) != num_levels:
            raise ValueError(f"convs_per_level needs {num_levels} entries (one per level), got {convs}")
        unknown = [kind for kind in upsampling if kind not in _BLOCK_MODES]
        if unknown:
            raise ValueError(f"unknown upsampling {unknown[0]!r}; use one of {UPSAMPLING_KINDS}")
        features = [base_filters * 2 ** level for level in range(num_levels)]
        self.strides = strides
        self.convs_per_level = tuple(convs)
        self.total_stride = total_stride(strides)
        self.encoder = VNetEncoder(input_channels, features, convs, strides, dropout_p)
        self.decoder = MCNetDecoders([VNetDecoder(num_classes, features, convs, strides, _BLOCK_MODES[kind], dropout_p)
                                      for kind in upsampling], inference, deep_supervision)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        if any(size % stride for size, stride in zip(x.shape[2:], self.total_stride)):
            raise ValueError(f"MCNet input {tuple(x.shape[2:])} is not divisible by its total stride "
                             f"{self.total_stride} (the additive skips need exact sizes)")
        return self.decoder(self.encoder(x))

    def official_weights_problem(self) -> str | None:
        kinds = [UPSAMPLING_KINDS[UPSAMPLING_MODES.index(decoder.mode)] for decoder in self.decoder.decoders]
        if len(self.strides) != len(OFFICIAL_DECODER_UPS) or self.convs_per_level != OFFICIAL_CONVS_PER_LEVEL:
            return (f"the official V-Net has 4 downsamplings and {list(OFFICIAL_CONVS_PER_LEVEL)} convs per level; "
                    f"this MCNet has {len(self.strides)} and {list(self.convs_per_level)}")
        if kinds != list(UPSAMPLING_KINDS[:len(kinds)]):
            return (f"the official decoders upsample as {list(UPSAMPLING_KINDS[:len(kinds)])} in this order; this "
                    f"MCNet's upsample as {kinds}")
        return None

    def _official_names(self) -> OfficialNames:
        """Names of the official ``MCNet3d_v2`` / ``MCNet3d_v1`` / ``VNet`` (decoders ``decoder1`` ..)."""
        names = OfficialNames()
        name_vnet_encoder(names, self.encoder.stages, self.encoder.downsamplings)
        for index, decoder in enumerate(self.decoder.decoders, start=1):
            name_vnet_decoder(names, decoder.ups, decoder.stages, decoder.head, f"decoder{index}")
        return names


def paper_mcnet(num_decoders: int = 3) -> MCNet:
    """The LA configuration of the paper: 1 channel, 2 classes, 4 x 2x2x2 downsampling (patch
    112x112x80 is divisible by 16), 16 base filters; 3 decoders = MC-Net+ (15,246,566 parameters),
    2 = MC-Net (12,347,716), 1 = V-Net (9,448,866)."""
    return MCNet(input_channels=1, num_classes=2, strides=OFFICIAL_STRIDES, num_decoders=num_decoders)
