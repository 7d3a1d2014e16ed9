"""LeFeD: a V-Net with two decoders whose feature discrepancy is fed back into the encoder.

Follows the paper (Zeng et al., TMI 2025) and the official code (github.com/maxwell0027/LeFeD,
``networks/my_net.py``, read for understanding; it does not run as published) on our own blocks:

* encoder: V-Net (16 base filters, 1/2/3/3/3 conv-BN-ReLU layers per stage, stride-k convs of
  kernel k for downsampling, ``Dropout3d(0.3)`` on the bottleneck);
* decoder 1: transposed-conv upsampling; decoder 2: trilinear (``align_corners=True``) + 3x3x3
  conv upsampling; both with 3/3/2/1 conv layers per stage, additive skips and ``Dropout3d(0.5)``
  before the 1x1 classifier. The paper names the 0.5 dropout with decoder 2; the official
  ``Decoder`` class applies it in both decoders (``has_dropout`` is shared) and so do we;
* decoder 2 is gated by decoder 1: with ``w_k = sigmoid(f1_k).detach()`` (``f1_k`` = decoder 1's
  feature at stage k), the bottleneck becomes ``x5 + x5 * w5`` and every skip ``x_k * w_k``, so the
  gate passes no gradient into decoder 1;
* five 1x1 side heads on decoder 1's stage features (bottleneck + the four upsampled features
  before the skip is added, as official), upsampled to the patch by trilinear interpolation
  (``align_corners=True``) one stage at a time, as the official ``SideConv`` does with its
  repeated x2 upsampling;
* feedback: ``forward(x, feedback=[...])`` adds five tensors to the five encoder stage outputs
  (before downsampling; before the bottleneck dropout), the trainer's detached
  ``1e-3 * (decoder 2 features - decoder 1 features)`` of the previous pass.

Order convention (ours): every list of five per-stage tensors (``feedback``, ``features1``,
``features2``, ``side``) is ordered like nnU-Net's skips, full resolution first, bottleneck last.
The official code orders decoder features and feedback bottleneck first.

Plans: ``strides`` are the four downsampling strides (nnU-Net's per-stage ``strides`` without the
first, see :func:`strides_from_plans`), so patch size and anisotropy follow the plans; the default is the
official four isotropic stride-2 steps. 2D strides give the same network with 2D ops.

Outputs: ``decoder.deep_supervision`` is the switch nnU-Net flips. On (or ``training_outputs=True``,
what the trainer passes), ``forward`` returns :class:`LeFeDOutput`; off (nnU-Net's predictor and
validation), decoder 1's logits only, computed in one pass without decoder 2 or the side heads.
Parameters (LA: 1 channel, 2 classes): 12,348,718 = encoder 7,376,896 + decoder 1 2,071,970 +
decoder 2 2,898,850 + side heads 1,002, as counted from the official code.

Official weights: this network is the official ``LeFeD_Net`` (no conventions to switch);
``official_key_map()`` / ``from_official_state_dict(sd)`` / ``official_state_dict()`` rename
between our keys and the official ones (the V-Net names of MC-Net, ``encoder.*``, ``decoder1.*``,
``decoder2.*``, and the side heads ``sideconv1.side1`` (full resolution) .. ``side5`` (bottleneck)).

The V-Net blocks (stages, encoder, decoders) are ``architectures/blocks/vnet.py``'s, shared with
MC-Net+.

torch.compile: no graph break; with and without the training outputs (``deep_supervision``) and
with and without feedback are separate graphs.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from nnunet_ext.architectures.blocks.nnunet_v1 import OfficialNames, OfficialStateDict
from nnunet_ext.architectures.blocks.topology import downsampling_strides, require_full_resolution_first
from nnunet_ext.architectures.blocks.vnet import VNetDecoder, VNetEncoder, upsample, vnet_ops
from nnunet_ext.architectures.mcnet import name_vnet_decoder, name_vnet_encoder

ISOTROPIC_STRIDES = ((2, 2, 2),) * 4
ENCODER_CONVS = (1, 2, 3, 3, 3)  # conv layers per stage, full resolution first (official; the decoders' 3/3/2/1)
FEEDBACK_SCALE = 1e-3  # official factor of the feature discrepancy


class LeFeDOutput(NamedTuple):
    """Training outputs: logits of both decoders, side logits (patch size) and per-stage features."""

    logits1: torch.Tensor
    logits2: torch.Tensor
    side: list[torch.Tensor]
    features1: list[torch.Tensor]
    features2: list[torch.Tensor]


def strides_from_plans(plan_strides: Sequence[Sequence[int] | int], dim: int | None = None) -> list[list[int]]:
    """The V-Net's four downsampling strides from nnU-Net's per-stage ``strides`` (first stage first):
    the steps after the plans' stride-1 first stage, the first four (the plans' patch is divisible by
    their product), fewer padded with stride 1 (a stage that keeps the resolution)
    (:func:`~nnunet_ext.architectures.blocks.topology.downsampling_strides`). ``dim``: the plans'
    dimensionality where the strides are given as ints."""
    require_full_resolution_first(plan_strides, "LeFeD", dim)
    return downsampling_strides(plan_strides, 4, dim)


class LeFeDEncoder(VNetEncoder):
    """The V-Net encoder (``encoder.downs`` in LeFeD's state dicts); ``forward(x, feedback)`` adds the
    feedback to the five stage outputs (before the bottleneck dropout, as official)."""

    downsampling_name = "downs"


class LeFeDSideHeads(nn.Module):
    """1x1 heads on decoder 1's five stage features, upsampled to the patch stage by stage."""

    def __init__(self, num_classes: int, strides: Sequence[Sequence[int]], widths: Sequence[int]):
        super().__init__()
        self.strides = [tuple(s) for s in strides]
        conv, _, _, _, self.interpolation = vnet_ops(len(strides[0]))
        self.heads = nn.ModuleList(conv(w, num_classes, 1) for w in widths)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for k, (head, feature) in enumerate(zip(self.heads, features)):
            y = head(feature)
            for level in range(k - 1, -1, -1):
                y = upsample(y, self.strides[level], self.interpolation)
            outputs.append(y)
        return outputs


class LeFeDDecoders(nn.Module):
    """Both decoders (the shared :class:`VNetDecoder`: decoder 2 takes decoder 1's gates) and the side
    heads; ``deep_supervision`` is the switch nnU-Net flips."""

    def __init__(self, num_classes: int, strides: Sequence[Sequence[int]], widths: Sequence[int],
                 dropout: float = 0.5, deep_supervision: bool = True):
        super().__init__()
        self.decoder1 = VNetDecoder(num_classes, widths, ENCODER_CONVS, strides, "transposed", dropout)
        self.decoder2 = VNetDecoder(num_classes, widths, ENCODER_CONVS, strides, "linear", dropout)
        self.side = LeFeDSideHeads(num_classes, strides, widths)
        self.deep_supervision = deep_supervision


class LeFeD(nn.Module, OfficialStateDict):
    """LeFeD network (see the module docstring). Configured by keyword arguments only, as plans do."""

    def __init__(self, input_channels: int, num_classes: int,
                 strides: Sequence[Sequence[int]] = ISOTROPIC_STRIDES, base_features: int = 16,
                 encoder_dropout: float = 0.3, decoder_dropout: float = 0.5, deep_supervision: bool = True):
        super().__init__()
        strides = tuple(tuple(int(v) for v in s) for s in strides)
        if len(strides) != 4 or len({len(s) for s in strides}) != 1:
            raise ValueError(f"LeFeD needs four downsampling strides of one dimensionality, got {strides} "
                             f"(from nnU-Net plans use strides_from_plans(plans_strides))")
        self.strides = strides
        widths = [base_features * 2 ** k for k in range(len(ENCODER_CONVS))]
        self.encoder = LeFeDEncoder(input_channels, widths, ENCODER_CONVS, strides, encoder_dropout)
        self.decoder = LeFeDDecoders(num_classes, strides, widths, decoder_dropout, deep_supervision)

    def forward(self, x: torch.Tensor, feedback: Sequence[torch.Tensor] | None = None,
                training_outputs: bool | None = None) -> LeFeDOutput | torch.Tensor:
        """``training_outputs`` None follows ``decoder.deep_supervision``; False: decoder 1's logits only."""
        skips = self.encoder(x, feedback)
        logits1, features1 = self.decoder.decoder1(skips)
        full = self.decoder.deep_supervision if training_outputs is None else training_outputs
        if not full:
            return logits1
        gates = [torch.sigmoid(f).detach() for f in features1]
        logits2, features2 = self.decoder.decoder2(skips, gates)
        return LeFeDOutput(logits1, logits2, self.decoder.side(features1), features1, features2)

    def official_weights_problem(self) -> str | None:
        if len(self.strides[0]) != 3:
            return f"the official LeFeD_Net is 3D; this LeFeD has {len(self.strides[0])}D strides"
        return None

    def _official_names(self) -> OfficialNames:
        """Names of the official ``LeFeD_Net`` (``networks/my_net.py``)."""
        names = OfficialNames()
        name_vnet_encoder(names, self.encoder.stages, self.encoder.downs)
        for prefix, decoder in (("decoder1", self.decoder.decoder1), ("decoder2", self.decoder.decoder2)):
            name_vnet_decoder(names, decoder.ups, decoder.stages, decoder.head, prefix)
        for level, head in enumerate(self.decoder.side.heads, start=1):
            names.add(head, f"sideconv1.side{level}")
        return names


def discrepancy_feedback(output: LeFeDOutput, scale: float = FEEDBACK_SCALE) -> list[torch.Tensor]:
    """The next pass's feedback: ``scale * (decoder 2 features - decoder 1 features)``, detached."""
    return [scale * (f2.detach() - f1.detach()) for f1, f2 in zip(output.features1, output.features2)]


def paper_lefed() -> LeFeD:
    """LA configuration of the paper: 1 channel, 2 classes, four isotropic stride-2 steps (patch
    96x96x96 for training, 112x112x80 for testing; the parameters do not depend on the patch)."""
    return LeFeD(input_channels=1, num_classes=2)
