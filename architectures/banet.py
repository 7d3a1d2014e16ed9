"""BA-Net: a boundary-aware U-Net with a shared encoder, a boundary decoder and a segmentation decoder.

Follows the official code (github.com/ShishuaiHu/BA-Net, ``generic_BANetV2``, KiPA22 and AMOS22
branches) on nnU-Net v2's building blocks:

* encoder: dynamic-network-architectures' ``PlainConvEncoder`` (or ``ResidualEncoder`` when
  ``n_blocks_per_stage`` is given), configured exactly like nnU-Net's ``PlainConvUNet`` /
  ``ResidualEncoderUNet`` from the plans (any stage count, strides, kernel sizes, 2D or 3D, any
  input channels);
* two ``UNetDecoder``s on the same skips: boundary (2-channel heads: inside/outside vs boundary)
  and segmentation (``num_classes`` heads), each with its own transposed convs, conv blocks
  and a head at every scale;
* at every decoder stage, the segmentation decoder's upsampled features are modulated by the
  boundary probability of the same stage before the skip concatenation:
  ``x = (1 + softmax(boundary_logits)[:, 1:2]) * transpconv(x)``; the boundary map is not
  detached, so the segmentation loss also trains the boundary decoder.

Outputs: with deep supervision, one flat list ``[seg_0, ..., seg_{n-1}, bdr_0, ..., bdr_{n-1}]``
(full resolution first in each half; :class:`nnunet_ext.losses.boundary.BoundaryAwareLoss`
splits it). A flat list of tensors keeps nnU-Net's validation step (``output[0]``) and
``torch.compile`` working without state on the module (no graph break; ``tests/test_compile.py``).
Without deep supervision (what nnU-Net's predictor builds) only the full-resolution segmentation
logits are returned.

``conventions`` (constructor keyword, settable in the plans' ``arch_kwargs``):

* ``"default"``: nnU-Net v2's decoders (each decoder stage with its skip's kernel; biased transposed
  convolutions and 1x1 heads);
* ``"official"``: the official ``generic_BANetV2``, whose state dict loads strictly after
  :meth:`BANet.from_official_state_dict` (48,366,848 parameters at :func:`paper_banet`'s
  configuration): nnU-Net v1's decoders, i.e. no biases on the transposed convolutions and heads
  of both decoders (20 tensors at 5 pools; the outputs equal the default's when those biases are
  zero) and each decoder stage with the next-coarser stage's kernel (the same network for plans
  whose stages share one kernel), see :mod:`nnunet_ext.architectures.blocks.nnunet_v1`. Plain
  encoder only (the official network is nnU-Net v1's ``Generic_UNet``).
"""
from __future__ import annotations

from typing import List, Sequence, Type, Union

import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from nnunet_ext.architectures.blocks.nnunet_v1 import (OfficialNames, OfficialStateDict, check_conventions,
                                                       decoder_view, remove_decoder_biases, require_two_convs,
                                                       v1_decoder_kernel_sizes)

BOUNDARY_CHANNELS = 2  # softmax over {not boundary, boundary}, as the official heads

IntOrList = Union[int, List[int], tuple]


class BoundaryAwareDecoder(nn.Module):
    """A boundary ``UNetDecoder`` and a segmentation ``UNetDecoder``, run stage by stage together.

    ``deep_supervision`` is the switch nnU-Net flips for inference; both decoders always build
    their heads (as UNetDecoder does), so weights load in either mode. ``official``: nnU-Net v1's
    kernel rule and bias-free transposed convs and heads (module docstring).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, n_conv_per_stage: IntOrList,
                 deep_supervision: bool, nonlin_first: bool = False, official: bool = False):
        super().__init__()
        if official:  # a view with v1's kernels (the default passes the encoder, as PlainConvUNet does)
            encoder = decoder_view(encoder, kernel_sizes=v1_decoder_kernel_sizes(encoder.kernel_sizes))
        self.segmentation = UNetDecoder(encoder, num_classes, n_conv_per_stage, deep_supervision,
                                        nonlin_first=nonlin_first)
        self.boundary = UNetDecoder(encoder, BOUNDARY_CHANNELS, n_conv_per_stage, True, nonlin_first=nonlin_first)
        if official:
            remove_decoder_biases(self.segmentation)
            remove_decoder_biases(self.boundary)
        self.deep_supervision = deep_supervision

    @property
    def deep_supervision(self) -> bool:
        return self.segmentation.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.segmentation.deep_supervision = bool(value)

    def forward(self, skips: Sequence[torch.Tensor]):
        seg, bdr = self.segmentation, self.boundary
        x = y = skips[-1]
        seg_outputs, bdr_outputs = [], []
        last = len(seg.stages) - 1
        for s in range(len(seg.stages)):
            skip = skips[-(s + 2)]
            y = bdr.stages[s](torch.cat((bdr.transpconvs[s](y), skip), 1))
            boundary_logits = bdr.seg_layers[s](y)
            modulation = 1 + torch.softmax(boundary_logits, 1)[:, 1:2]
            x = seg.stages[s](torch.cat((modulation * seg.transpconvs[s](x), skip), 1))
            if self.deep_supervision:
                seg_outputs.append(seg.seg_layers[s](x))
                bdr_outputs.append(boundary_logits)
            elif s == last:
                return seg.seg_layers[s](x)
        return seg_outputs[::-1] + bdr_outputs[::-1]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        return self.segmentation.compute_conv_feature_map_size(input_size) + \
            self.boundary.compute_conv_feature_map_size(input_size)


class BANet(AbstractDynamicNetworkArchitectures, OfficialStateDict):
    """BA-Net configured by the same keyword arguments as nnU-Net's ``PlainConvUNet`` (plans ``arch_kwargs``).

    Give ``n_blocks_per_stage`` instead of ``n_conv_per_stage`` (nnU-Net's residual-encoder
    plans, ``ResidualEncoderUNet``'s keywords) for a residual encoder. ``conventions``:
    ``"default"`` or ``"official"`` (module docstring).
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: IntOrList, conv_op: Type[_ConvNd],
                 kernel_sizes: IntOrList, strides: IntOrList, num_classes: int,
                 n_conv_per_stage_decoder: IntOrList, n_conv_per_stage: IntOrList | None = None,
                 conv_bias: bool = False, norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 dropout_op: Type[_DropoutNd] | None = None, dropout_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False,
                 n_blocks_per_stage: IntOrList | None = None,
                 block: Type[BasicBlockD] | Type[BottleneckD] = BasicBlockD,
                 bottleneck_channels: IntOrList | None = None, stem_channels: int | None = None,
                 conventions: str = "default"):
        super().__init__()
        self.conventions = check_conventions(conventions)
        official = conventions == "official"
        if (n_conv_per_stage is None) == (n_blocks_per_stage is None):
            raise ValueError("BANet needs exactly one of n_conv_per_stage (plain encoder, nnU-Net's PlainConvUNet "
                             "plans) and n_blocks_per_stage (residual encoder, nnU-Net's ResEnc plans); got "
                             f"n_conv_per_stage={n_conv_per_stage}, n_blocks_per_stage={n_blocks_per_stage}.")
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
        if len(n_conv_per_stage_decoder) != n_stages - 1:
            raise ValueError(f"n_conv_per_stage_decoder needs n_stages - 1 = {n_stages - 1} entries, "
                             f"got {list(n_conv_per_stage_decoder)}")
        if official:
            if n_conv_per_stage is None:
                raise ValueError("conventions='official': the official BA-Net is nnU-Net v1's Generic_UNet with a "
                                 "plain encoder; give n_conv_per_stage (nnUNetPlans), not n_blocks_per_stage")
            bottleneck_convs = n_conv_per_stage if isinstance(n_conv_per_stage, int) else n_conv_per_stage[-1]
            require_two_convs([bottleneck_convs, *n_conv_per_stage_decoder], "bottleneck and decoder stage")
        if n_conv_per_stage is not None:
            self.encoder = PlainConvEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes,
                                            strides, n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs,
                                            dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True,
                                            nonlin_first=nonlin_first)
            self.key_to_stem = "encoder.stages.0"
            self.keys_to_in_proj = ("encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv")
        else:
            self.encoder = ResidualEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes,
                                           strides, n_blocks_per_stage, conv_bias, norm_op, norm_op_kwargs,
                                           dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, block,
                                           bottleneck_channels, return_skips=True, disable_default_stem=False,
                                           stem_channels=stem_channels)
            self.key_to_stem = "encoder.stem"
            self.keys_to_in_proj = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
        self.key_to_encoder = "encoder.stages"
        self.decoder = BoundaryAwareDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                            nonlin_first=nonlin_first, official=official)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map voxels, for nnU-Net's VRAM estimate (encoder + both decoders)."""
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    def _official_names(self) -> OfficialNames:
        """Names of the official ``generic_BANetV2`` (boundary decoder ``conv_blocks_boundary``,
        ``tb``, ``bdr_outputs``; segmentation decoder as Generic_UNet's)."""
        names = OfficialNames()
        names.plain_encoder(self.encoder)
        names.decoder(self.decoder.boundary, "conv_blocks_boundary", "tb", "bdr_outputs")
        names.decoder(self.decoder.segmentation, "conv_blocks_localization", "tu", "seg_outputs")
        return names

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He initialisation (what PlainConvUNet uses)."""
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        InitWeights_He(1e-2)(module)


def nnunet_default_topology_3d(patch_size: Sequence[int] = (128, 128, 128), max_features: int = 320) -> dict:
    """nnU-Net's 3d_fullres topology for an isotropic patch: halve every axis down to 4 voxels.

    (ExperimentPlanner's rule for isotropic spacing: 3x3x3 kernels, 32 base features doubling to
    320, 2 convs per stage.) Used for the paper configuration, not for training: training
    takes the topology from the dataset's plans.
    """
    n_pools = min(int(p).bit_length() - 3 for p in patch_size)  # 128 -> 5 pools (128 / 2^5 = 4)
    n_stages = n_pools + 1
    return dict(n_stages=n_stages, features_per_stage=[min(32 * 2 ** i, max_features) for i in range(n_stages)],
                conv_op=nn.Conv3d, kernel_sizes=[[3, 3, 3]] * n_stages,
                strides=[[1, 1, 1]] + [[2, 2, 2]] * n_pools, n_conv_per_stage=[2] * n_stages,
                n_conv_per_stage_decoder=[2] * (n_stages - 1), conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def paper_banet(conventions: str = "default") -> BANet:
    """KiPA22 configuration: 1 channel, 5 classes (background + renal vein, kidney, renal artery,
    tumour), nnU-Net's 3d_fullres default topology for a 128x128x128 patch: 48,368,483 parameters;
    48,366,848 with ``conventions="official"`` (the official count)."""
    return BANet(input_channels=1, num_classes=5, deep_supervision=True, conventions=conventions,
                 **nnunet_default_topology_3d((128,) * 3))
