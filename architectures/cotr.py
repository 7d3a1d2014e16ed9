"""CoTr: CNN encoder + deformable transformer (DeTrans) + CNN decoder, as an nnU-Net v2 network.

Xie et al., "CoTr: Efficiently Bridging CNN and Transformer for 3D Medical Image Segmentation",
MICCAI 2021; official code github.com/YtongXie/CoTr (nnU-Net v1), files below relative to
``CoTr_package/CoTr/network_architecture/``. This is a re-implementation configured only by
keyword arguments, so an nnU-Net v2 plans file can name ``nnunet_ext.architectures.cotr.CoTr``
with JSON ``arch_kwargs`` (``patch_size``, ``strides``, ``features``, ...).

Architecture (defaults = the paper / BCV configuration)
-------------------------------------------------------
Encoder (``CNNBackbone.py``, ``Backbone(depth=9)``), ``self.encoder``:

* stem: conv 7x7x7 (padding 3, stride ``strides[0]`` = (1, 2, 2)), norm, act -> 64 ch;
* ``len(features) - 1`` residual layers (192, 384, 384 channels, 3, 3, 2 blocks), layer ``i``
  downsampling by ``strides[i]`` in its first block. The official encoder block
  (``CNNBackbone.ResBlock``) has a SINGLE 3x3x3 conv: ``act(norm(conv(x)) + shortcut(x))``;
  the shortcut is identity, except in every layer's first block, where it is conv1x1(stride)
  + norm. (Official ``_make_layer`` tests ``stride != 1`` with a tuple stride, which is always
  true, so the first block of every layer has the projection, even where stride and channels
  would allow identity; kept, it is what the parameter count needs.)

Transformer (``DeTrans/``), ``self.transformer``: the project's
:class:`~nnunet_ext.architectures.blocks.deformable_attention.DeformableEncoder` on the outputs of
the last two encoder layers (two levels, 384 ch at strides (4, 8, 8) and (8, 16, 16) of the
input): 3D sine positional encoding (d_model/3 per axis, voxel-centre offset 0.5) + learned
level embedding, 6 post-norm layers of multi-scale deformable self-attention (6 heads, 4 points)
+ FFN 1536, dropout 0.1, GELU. Encoder only, no queries.

Decoder (``ResTranUnet.py``, ``U_ResTran3D``), ``self.decoder``: from the deepest level up, for
each encoder level ``k = L-1, ..., 0`` (``L`` = number of encoder layers):
``x = ConvTranspose3d(features[k+1] -> features[k], kernel = stride = strides[k+1])(x) + skip_k``,
``x = ResBlock(x)``, ``ds = Conv1x1(features[k] -> classes)(x)``. The skips are the
transformer's level-0 tokens (for ``k = L-1``), then the encoder layers' and the stem's
outputs (CNN features, not transformer tokens). The decoder ResBlock is
``x + act(norm(conv(act(norm(conv(x))))))`` (two conv-norm-act, residual add, no act after
it). Finally ``result = Conv1x1(trilinear upsample by strides[0](x))`` - the classifier is
applied after upsampling, as in the official code.

Deep supervision
----------------
``forward`` returns ``[result, ds_0, ds_1, ..., ds_{L-1}]`` (official ``[result, ds0, ds1,
ds2]``), highest resolution first, as nnU-Net's deep-supervision loss expects. ``ds_k`` is the
head on the decoder stage at encoder level ``k``; its scale relative to the input is
``1 / prod(strides[:k+1])`` per axis. For the default strides:

======  ======================  ============================
output  scale (z, y, x)         BCV 48x192x192 output shape
======  ======================  ============================
result  (1, 1, 1)               48 x 192 x 192
ds_0    (1, 1/2, 1/2)           48 x 96 x 96
ds_1    (1/2, 1/4, 1/4)         24 x 48 x 48
ds_2    (1/4, 1/8, 1/8)         12 x 24 x 24
======  ======================  ============================

This is the official trainer's ``deep_supervision_scales = [[1,1,1]] + 1/cumprod([[1,2,2],
[2,2,2],[2,2,2],[2,2,2]])[:-1]``; :meth:`CoTr.deep_supervision_scales` computes it from the
strides. Note that the scales are not nnU-Net's usual "halve everything" pyramid: ``ds_0`` is
at half resolution in-plane but full resolution in z. With ``decoder.deep_supervision = False``
(what nnU-Net sets for inference) ``forward`` returns only ``result``.

Parameter count
---------------
:func:`paper_cotr` (1 input channel, 14 classes) has exactly 41,872,504 parameters, the
number counted from the official code: encoder 20,500,800, transformer 9,316,992, decoder 12,054,712 (20.50 M,
9.32 M, 12.05 M as the official code prints). Independent of the norm type (IN with affine,
BN, SyncBN and GN all have 2 parameters per channel) and of ``weight_std``.

Where this differs from the official code
-----------------------------------------
* Generality: strides, widths, depths, number of encoder layers (>= 2), classes and input
  channels are arguments (the official code hard-codes the BCV values and 1 input channel).
  The two transformer levels are always the last two encoder levels, which requires
  ``features[-1] == features[-2] == d_model`` (the decoder adds the level-0 tokens to the
  up-convolved level-1 tokens).
* ``axis_order="corrected"`` (default) fixes the official mix-up of the (D, H, W) axes in the
  deformable sampling; ``"official"`` reproduces it (see the block's module docstring).
* Initialisation: the constructor applies the official init (kaiming-normal fan_out for every
  conv and transposed conv, norms 1/0; the transformer keeps its own Deformable-DETR init).
  nnU-Net's ``get_network_from_plans`` then applies :meth:`CoTr.initialize`, nnU-Net's
  ``InitWeights_He(1e-2)`` (fan_in) to the convs only, like for every nnU-Net network; the
  official trainer did not (it only re-applied ``InitWeights_He`` when Dice was 0 at epoch 100).
* Mixed precision: the deformable sampling runs in float32 inside autocast (block docstring).

torch.compile
-------------
No graph break (``torch._dynamo.explain``, training and eval mode; ``tests/test_compile.py``): the
transformer keeps the level shapes as Python ints and tests no padding mask in Python (before,
14 breaks). Compiled training steps equal eager ones within float tolerance.

Official weights
----------------
``official_key_map()`` / ``from_official_state_dict(sd)`` / ``official_state_dict()`` rename
between our keys and those of the official ``ResTranUnet`` (all under ``U_ResTran3D.``:
``backbone.conv1`` / ``norm1`` / ``layer<i>.<b>.conv1`` / ``norm1`` / ``downsample``,
``encoder_Detrans.level_embed`` / ``encoder.layers``, ``transposeconv_stage<k>``,
``stage<k>_de.resconv<j>.conv`` / ``.norm``, ``ds<k>_cls_conv``, ``cls_conv``); only with
``axis_order="official"`` and the official three residual layers.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch.nn.functional as F
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn

from nnunet_ext.architectures.blocks.deformable_attention import AXIS_ORDERS, DeformableEncoder
from nnunet_ext.architectures.blocks.nnunet_v1 import OfficialNames, OfficialStateDict
from nnunet_ext.architectures.blocks.topology import (cumulative_strides, divisibility_problem, stage_sizes,
                                                      strided_stages, total_stride)
from nnunet_ext.architectures.blocks.ws_conv import WSConv3d

NORMS: tuple[str, ...] = ("instance", "batch", "syncbatch", "group")
ACTIVATIONS: tuple[str, ...] = ("leakyrelu", "relu")

IntTriple = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: Sequence[int] = (1, 1, 1),
          weight_std: bool = False) -> nn.Conv3d:
    """Bias-free 'same' conv (padding kernel//2), weight-standardised if asked (as official; the
    statistics in float32, which keeps fp16/bf16 weights precise)."""
    if weight_std:
        return WSConv3d(in_channels, out_channels, kernel_size, stride=tuple(stride), padding=kernel_size // 2,
                        bias=False, float32_statistics=True)
    return nn.Conv3d(in_channels, out_channels, kernel_size, stride=tuple(stride), padding=kernel_size // 2,
                     bias=False)


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, eps=1e-5, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "syncbatch":
        return nn.SyncBatchNorm(channels)
    if kind == "group":
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _activation(kind: str) -> nn.Module:
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=1e-2, inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


class _LayerCfg:
    """Norm / activation / weight-std choice shared by every conv block of one network."""

    def __init__(self, norm: str, activation: str, weight_std: bool, norm_groups: int) -> None:
        self.norm, self.activation, self.weight_std, self.norm_groups = norm, activation, weight_std, norm_groups

    def conv(self, cin: int, cout: int, kernel: int, stride: Sequence[int] = (1, 1, 1)) -> nn.Conv3d:
        return _conv(cin, cout, kernel, stride, self.weight_std)

    def norm_layer(self, channels: int) -> nn.Module:
        return _norm(self.norm, channels, self.norm_groups)

    def act(self) -> nn.Module:
        return _activation(self.activation)


class EncoderBlock(nn.Module):
    """Official ``CNNBackbone.ResBlock``: ``act(norm(conv3x3x3_stride(x)) + shortcut(x))``.

    ``project=True``: shortcut = conv1x1(stride) + norm (first block of every layer), else
    identity (needs same channels and stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], project: bool,
                 cfg: _LayerCfg) -> None:
        super().__init__()
        stride = tuple(int(s) for s in stride)
        if not project and (in_channels != out_channels or any(s != 1 for s in stride)):
            raise ValueError("an identity shortcut needs equal channels and stride 1")
        self.stride = stride
        self.out_channels = out_channels
        self.conv = cfg.conv(in_channels, out_channels, 3, stride)
        self.norm = cfg.norm_layer(out_channels)
        self.shortcut = (nn.Sequential(cfg.conv(in_channels, out_channels, 1, stride), cfg.norm_layer(out_channels))
                         if project else nn.Identity())
        self.act = cfg.act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)) + self.shortcut(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        out = [i // s for i, s in zip(input_size, self.stride)]
        n_convs = 2 if isinstance(self.shortcut, nn.Sequential) else 1
        return n_convs * int(np.prod([self.out_channels, *out], dtype=np.int64))


class DecoderBlock(nn.Module):
    """Official ``ResTranUnet.ResBlock``: ``x + cna2(cna1(x))``, cna = conv3x3x3-norm-act."""

    def __init__(self, channels: int, cfg: _LayerCfg) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Sequential(cfg.conv(channels, channels, 3), cfg.norm_layer(channels), cfg.act())
        self.conv2 = nn.Sequential(cfg.conv(channels, channels, 3), cfg.norm_layer(channels), cfg.act())

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x)) + x

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        return 2 * int(np.prod([self.channels, *input_size], dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# encoder / decoder
# ---------------------------------------------------------------------------------------------
class CoTrEncoder(nn.Module):
    """The CNN backbone: stem + residual layers; returns every level's output, stem first."""

    def __init__(self, input_channels: int, features: Sequence[int], strides: Sequence[IntTriple],
                 blocks_per_layer: Sequence[int], cfg: _LayerCfg, stem_kernel_size: int = 7) -> None:
        super().__init__()
        self.features = tuple(features)
        self.strides = tuple(strides)
        self.stem = nn.Sequential(cfg.conv(input_channels, features[0], stem_kernel_size, strides[0]),
                                  cfg.norm_layer(features[0]), cfg.act())
        self.layers = nn.ModuleList()
        for i, n_blocks in enumerate(blocks_per_layer, start=1):
            blocks = [EncoderBlock(features[i - 1], features[i], strides[i], True, cfg)]
            blocks += [EncoderBlock(features[i], features[i], (1, 1, 1), False, cfg) for _ in range(n_blocks - 1)]
            self.layers.append(nn.Sequential(*blocks))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outputs = [x]
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        size = [i // s for i, s in zip(input_size, self.strides[0])]
        total = int(np.prod([self.features[0], *size], dtype=np.int64))
        for layer, stride in zip(self.layers, self.strides[1:]):
            total += layer[0].compute_conv_feature_map_size(size)
            size = [i // s for i, s in zip(size, stride)]
            total += sum(block.compute_conv_feature_map_size(size) for block in layer[1:])
        return total


class CoTrDecoder(nn.Module):
    """Up-convolutions + skips + decoder ResBlocks, deep-supervision heads, final classifier.

    ``deep_supervision`` is read at every forward (nnU-Net switches it off for inference).
    """

    def __init__(self, features: Sequence[int], strides: Sequence[IntTriple], num_classes: int,
                 cfg: _LayerCfg, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.features = tuple(features)
        self.strides = tuple(strides)
        self.num_classes = num_classes
        n_layers = len(features) - 1
        # index k = encoder level the stage works at (0 = stem resolution); built deepest first
        # so that module order follows the data flow.
        levels = list(reversed(range(n_layers)))
        self.upconvs = nn.ModuleList(
            nn.ConvTranspose3d(features[k + 1], features[k], strides[k + 1], stride=strides[k + 1], bias=False)
            for k in levels)
        self.stages = nn.ModuleList(DecoderBlock(features[k], cfg) for k in levels)
        self.ds_heads = nn.ModuleList(nn.Conv3d(features[k], num_classes, 1) for k in levels)
        self.cls_conv = nn.Conv3d(features[0], num_classes, 1)

    def forward(self, skips: Sequence[Tensor]) -> Union[Tensor, list[Tensor]]:
        """``skips``: one map per level, stem first; the last is the deepest (the input)."""
        x = skips[-1]
        ds_outputs = []
        for upconv, stage, head, skip in zip(self.upconvs, self.stages, self.ds_heads, reversed(skips[:-1])):
            x = stage(upconv(x) + skip)
            if self.deep_supervision:
                ds_outputs.append(head(x))
        full_size = [s * f for s, f in zip(x.shape[2:], self.strides[0])]
        if any(f != 1 for f in self.strides[0]):
            x = F.interpolate(x, size=full_size, mode="trilinear", align_corners=False)
        result = self.cls_conv(x)
        if not self.deep_supervision:
            return result
        return [result] + ds_outputs[::-1]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        n_layers = len(self.features) - 1
        sizes = stage_sizes(input_size, self.strides)
        total = 0
        for k, stage in zip(reversed(range(n_layers)), self.stages):
            size = sizes[k + 1]  # resolution of encoder level k (sizes[0] is the input)
            total += int(np.prod([self.features[k], *size], dtype=np.int64))  # up-conv output
            total += stage.compute_conv_feature_map_size(size)
            if self.deep_supervision:
                total += int(np.prod([self.num_classes, *size], dtype=np.int64))
        # upsampled features and the full-resolution logits
        total += int(np.prod([self.features[0] + self.num_classes, *input_size], dtype=np.int64))
        return total


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------
def deep_supervision_scales_for_strides(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """Scales of CoTr's outputs ``[result, ds_0, ...]`` for these strides, without building the network
    (trainers need them for target downsampling before the network exists): full resolution, then
    ``1 / cumulative stride`` after the stem and every residual layer but the last."""
    return [[1.0, 1.0, 1.0]] + [[1.0 / float(c) for c in cumulative] for cumulative in cumulative_strides(strides[:-1])]


PAPER_STRIDED_STAGES = 4  # stem + three residual layers


def strides_from_plans(pool_op_kernel_sizes: Sequence[Sequence[int]],
                       n_stages: int = PAPER_STRIDED_STAGES) -> list[list[int]]:
    """CoTr's per-stage strides from an nnU-Net 3D plan's pooling
    (:func:`~nnunet_ext.architectures.blocks.topology.strided_stages`).

    nnU-Net's list starts with the first stage's ``[1, 1, 1]``, then one entry per pooling. With at
    least ``n_stages`` poolings CoTr takes the first ``n_stages`` (nnU-Net's BCV plan
    ``[1,2,2], [2,2,2], [2,2,2], [2,2,2], [1,2,2]`` gives the paper's strides); with fewer, the
    stem keeps nnU-Net's full-resolution first stage (``[1, 1, 1]``), then come the poolings, and
    any missing deepest stages get stride 1. Either way the product divides nnU-Net's patch size,
    because it is a sub-product of nnU-Net's poolings.
    """
    pools = [[int(v) for v in p] for p in pool_op_kernel_sizes]
    if any(len(p) != 3 for p in pools):
        raise ValueError(f"CoTr is a 3D network; these plans are not 3D (pool_op_kernel_sizes {pools}). "
                         f"Train CoTrTrainer on a 3d configuration (3d_fullres).")
    return strided_stages(pools, n_stages)


def _as_triple_list(values, name: str) -> tuple[IntTriple, ...]:
    try:
        triples = tuple(tuple(int(v) for v in row) for row in values)
    except TypeError as err:
        raise ValueError(f"{name} must be a sequence of (z, y, x) int triples, got {values!r}") from err
    if any(len(t) != 3 or any(v < 1 for v in t) for t in triples):
        raise ValueError(f"{name} must be a sequence of positive (z, y, x) int triples, got {values!r}")
    return triples


OFFICIAL_PREFIX = "U_ResTran3D"  # the official ResTranUnet wraps everything in this module


class CoTr(nn.Module, OfficialStateDict):
    """CoTr for nnU-Net v2; see the module docstring for the architecture and the deviations.

    Args:
        input_channels, num_classes: set by nnU-Net from the dataset.
        patch_size: (z, y, x) training patch; every axis must be a multiple of the product of
            ``strides`` on that axis (the network's total downsampling). Inputs of any size with
            that divisibility work, the patch size is only validated.
        strides: (z, y, x) stride of the stem, then of each residual layer (one more entry than
            ``blocks_per_layer``). Default (1,2,2),(2,2,2),(2,2,2),(2,2,2): total (8, 16, 16).
        features: channels of the stem and of each residual layer. Requires at least two
            residual layers and ``features[-1] == features[-2] == d_model`` (the last two levels
            are the transformer's two token levels).
        blocks_per_layer: encoder blocks per residual layer (the first one downsamples).
        norm: "instance" (default, affine), "batch", "syncbatch" or "group".
        norm_groups: groups of "group" norm (official: 16); every width must be divisible by it.
        activation: "leakyrelu" (slope 1e-2, default, as CoTr's nnU-Net trainer) or "relu".
        weight_std: weight-standardised convolutions (official ``Conv3d_wd``).
        d_model, n_heads, n_layers, d_ffn, dropout, n_points: DeTrans hyper-parameters.
        axis_order: "corrected" (default) or "official" deformable sampling (``AXIS_ORDERS``).
        deep_supervision: return ``[result, ds_0, ...]`` (see :meth:`deep_supervision_scales`).
    """

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int],
                 strides: Sequence[Sequence[int]] = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
                 features: Sequence[int] = (64, 192, 384, 384), blocks_per_layer: Sequence[int] = (3, 3, 2),
                 norm: str = "instance", weight_std: bool = False, d_model: int = 384, n_heads: int = 6,
                 n_layers: int = 6, d_ffn: int = 1536, dropout: float = 0.1, n_points: int = 4,
                 axis_order: str = "corrected", deep_supervision: bool = False,
                 activation: str = "leakyrelu", norm_groups: int = 16) -> None:
        super().__init__()
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or any(p < 1 for p in patch):
            raise ValueError(f"patch_size must be 3 positive ints (z, y, x), got {patch_size!r}")
        strides_t = _as_triple_list(strides, "strides")
        features_t = tuple(int(f) for f in features)
        blocks_t = tuple(int(b) for b in blocks_per_layer)
        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if input_channels < 1 or num_classes < 1:
            raise ValueError(f"input_channels and num_classes must be >= 1, got {input_channels}, {num_classes}")
        if len(features_t) < 3 or any(f < 1 for f in features_t):
            raise ValueError(f"features must be >= 3 positive widths (stem + at least two residual layers), "
                             f"got {features!r}")
        if len(strides_t) != len(features_t) or len(blocks_t) != len(features_t) - 1:
            raise ValueError(f"need one stride per entry of features (stem + layers) and one block count per "
                             f"residual layer: got {len(features_t)} features {features_t}, {len(strides_t)} "
                             f"strides, {len(blocks_t)} blocks_per_layer {blocks_t}")
        if any(b < 1 for b in blocks_t):
            raise ValueError(f"blocks_per_layer must be >= 1, got {blocks_t}")
        if not features_t[-1] == features_t[-2] == d_model:
            raise ValueError(f"the last two encoder levels feed the transformer: features[-1] == features[-2] "
                             f"== d_model is required, got features {features_t}, d_model {d_model}")
        if d_model % n_heads != 0 or d_model % 6 != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}) and by 6 "
                             f"(3D sine encoding)")
        if norm == "group" and any(f % norm_groups for f in features_t):
            raise ValueError(f"group norm with {norm_groups} groups needs every width divisible by "
                             f"{norm_groups}, got features {features_t}")
        problem = divisibility_problem(patch, strides_t)
        if problem is not None:
            raise ValueError(f"patch_size {patch} is {problem}")

        self.input_channels = int(input_channels)
        self.num_classes = int(num_classes)
        self.patch_size = patch
        self.strides = strides_t
        self.features = features_t
        self.total_stride = total_stride(strides_t)
        cfg = _LayerCfg(norm, activation, bool(weight_std), int(norm_groups))
        self.encoder = CoTrEncoder(self.input_channels, features_t, strides_t, blocks_t, cfg)
        self.decoder = CoTrDecoder(features_t, strides_t, self.num_classes, cfg, bool(deep_supervision))
        self._official_init()  # before the transformer exists: its own init stays untouched
        self.transformer = DeformableEncoder(d_model=d_model, d_ffn=d_ffn, dropout=dropout, activation="gelu",
                                             n_levels=2, n_heads=n_heads, n_points=n_points, num_layers=n_layers,
                                             axis_order=axis_order, pos_offset=0.5)

    # -- helpers ---------------------------------------------------------------------------------
    def _official_init(self) -> None:
        """Official init of encoder and decoder: kaiming-normal fan_out for (transposed) convs, norms 1/0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, (nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm3d, nn.GroupNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's ``InitWeights_He(1e-2)`` for one module (``network.apply(network.initialize)``).

        Touches only (transposed) convolutions; the transformer has none, so its own
        Deformable-DETR init (zero sampling-offset weights, direction biases, xavier) survives.
        """
        InitWeights_He(1e-2)(module)

    # -- nnU-Net hooks ------------------------------------------------------------------------
    def deep_supervision_scales(self) -> list[list[float]]:
        """Scale per axis, relative to the input, of every deep-supervision output, in output order.

        ``[[1, 1, 1], 1/strides[0], 1/(strides[0]*strides[1]), ...]`` - one entry per decoder
        stage after the full-resolution result; default strides give
        ``[[1,1,1], [1,.5,.5], [.5,.25,.25], [.25,.125,.125]]``. These are the outputs'
        scales when ``decoder.deep_supervision`` is on (off: only the first).
        """
        return deep_supervision_scales_for_strides(self.strides)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Rough number of feature-map values of one forward pass (batch 1), for VRAM estimates.

        Counted like dynamic-network-architectures: one map per convolution output (norms and
        activations are not counted), plus the up-convolutions, heads, the upsampled map and, for
        each transformer layer and token, the value projection, offsets, attention weights,
        the sampled values (n_levels * n_points * d_model), output projection, the two norms,
        the FFN hidden and output.
        """
        input_size = [int(i) for i in input_size]
        if len(input_size) != 3:
            raise ValueError(f"give the spatial size (z, y, x) only, got {input_size}")
        total = self.encoder.compute_conv_feature_map_size(input_size)
        total += self.decoder.compute_conv_feature_map_size(input_size)
        sizes = stage_sizes(input_size, self.strides)
        tokens = sum(int(np.prod(s, dtype=np.int64)) for s in sizes[-2:])
        t = self.transformer
        layer0 = t.layers[0]
        attn = layer0.self_attn
        per_token = (attn.d_model * (5 + attn.n_levels * attn.n_points)
                     + attn.n_heads * attn.n_levels * attn.n_points * 4 + layer0.linear1.out_features)
        total += len(t.layers) * tokens * per_token
        return int(total)

    # -- official weights ---------------------------------------------------------------------
    def official_weights_problem(self) -> str | None:
        if self.transformer.axis_order != "official":
            return (f"CoTr was built with axis_order={self.transformer.axis_order!r}: official weights need "
                    f"axis_order='official' (paper_network('CoTr', conventions='official'))")
        if len(self.features) != 4:
            return f"the official CoTr has 3 residual layers; this one has {len(self.features) - 1}"
        return None

    def _official_names(self) -> OfficialNames:
        """Names of the official ``ResTranUnet`` (``ResTranUnet.py``, ``CNNBackbone.py``, ``DeTrans/``)."""
        names, root = OfficialNames(), OFFICIAL_PREFIX
        names.add(self.encoder.stem[0], f"{root}.backbone.conv1")
        names.add(self.encoder.stem[1], f"{root}.backbone.norm1")
        for index, layer in enumerate(self.encoder.layers, start=1):
            for b, block in enumerate(layer):
                prefix = f"{root}.backbone.layer{index}.{b}"
                names.add(block.conv, f"{prefix}.conv1")
                names.add(block.norm, f"{prefix}.norm1")
                if isinstance(block.shortcut, nn.Sequential):
                    names.sequential(block.shortcut, f"{prefix}.downsample")
        names.parameter("transformer.level_embed", f"{root}.encoder_Detrans.level_embed")
        names.tree(self.transformer.layers, f"{root}.encoder_Detrans.encoder.layers")
        levels = reversed(range(len(self.features) - 1))  # the decoder's modules are built deepest first
        decoder = self.decoder
        for level, up, stage, head in zip(levels, decoder.upconvs, decoder.stages, decoder.ds_heads):
            names.add(up, f"{root}.transposeconv_stage{level}")
            for j, conv in ((1, stage.conv1), (2, stage.conv2)):
                names.add(conv[0], f"{root}.stage{level}_de.resconv{j}.conv")
                names.add(conv[1], f"{root}.stage{level}_de.resconv{j}.norm")
            names.add(head, f"{root}.ds{level}_cls_conv")
        names.add(decoder.cls_conv, f"{root}.cls_conv")
        return names

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Union[Tensor, list[Tensor]]:
        if x.dim() != 5 or x.shape[1] != self.input_channels:
            raise ValueError(f"expected input (N, {self.input_channels}, z, y, x), got {tuple(x.shape)}")
        if any(s % t for s, t in zip(x.shape[2:], self.total_stride)):
            problem = divisibility_problem(x.shape[2:], self.strides)
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} is {problem}")
        levels = self.encoder(x)
        tokens = self.transformer(levels[-2:])
        return self.decoder(levels[:-2] + list(tokens))


def paper_cotr(axis_order: str = "corrected") -> CoTr:
    """CoTr as trained on BCV: 1 channel, 14 classes, patch 48x192x192, deep supervision."""
    return CoTr(input_channels=1, num_classes=14, patch_size=(48, 192, 192), deep_supervision=True,
                axis_order=axis_order)
