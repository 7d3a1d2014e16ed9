"""TransDoDNet: DoDNet with a CNN-Transformer hybrid encoder and one task query per task.

Follows Xie, Zhang, Xia, Shen, "Learning from partially labeled data for multi-organ and tumor
segmentation" (TPAMI 2023) and its official code (github.com/jianpengz/DoDNet, folder
``TransDoD``: ``models/TransDoDNet.py``, ``models/ResCNN2.py``, ``models/deformable_transformer.py``,
``models/ops/modules/ms_deform_attn.py``; ``train.py`` defaults), written anew on nnunet-ext's
shared pieces:

* backbone: 3D ResNet-50 (official ``ResCNN2.ResNet``): stem conv 3x3x3 ``in -> 32`` stride
  (1, 2, 2) + IN + ReLU, conv 3x3x3 32 -> 32 + IN + ReLU (the official max-pool is built but never
  used, so it is left out), then bottleneck layers [3, 4, 6, 3] of widths 64/128/256/320 x 4, each
  downsampling 2x2x2 in its first block (1x1 projection shortcut + IN). InstanceNorm (affine) + ReLU.
  The five strides (stem, layer 1-4) are a constructor argument; :func:`strides_from_plans` takes
  them from nnU-Net's plans;
* transformer (official ``DeformableTransformer``; hidden 192, 8 heads, 4 points, FFN 768,
  dropout 0.1, ReLU, post-norm): the last 3 backbone levels, each projected by 1x1 conv (bias) +
  IN to 192 channels, go through :class:`~nnunet_ext.architectures.blocks.deformable_attention.
  DeformableEncoder` (3 layers, sine encoding with ``pos_offset=0``) - nnunet-ext's one deformable
  attention; the decoder here (3 layers) runs the ``num_tasks`` task queries (learned
  ``nn.Embedding(num_tasks, 2 * 192)`` split into query position and content) through
  self-attention (``nn.MultiheadAttention``), deformable cross-attention to the encoder memory
  (:class:`MultiScaleDeformableAttention3D`) from reference points ``sigmoid(Linear(query_pos))``,
  and an FFN. Official details kept: the fixed per-level offset normalisers ``16 * 2**(L-1-l)``
  (``ms_deform_attn.py`` l.62-64) and its sampling-direction init, and the DeepNorm residual scale
  of every encoder and decoder sub-layer (``x * alpha + f(x)``), applied whatever the ``deepnorm``
  flag, as officially: the flag (True in the official ``train.py``) only chooses DeepNorm's
  initialisation (``_deepnorm_init``) over Deformable DETR's;
* CNN decoder (official ``add_memory=2``): bottleneck = 1x1 conv(memory of the coarsest level) +
  1x1 conv(last backbone level), each + IN + ReLU, to 256; then per level a transposed conv
  (kernel = stride), plus the level's skip through 1x1 conv + IN + ReLU, and one basic residual
  block: 256 -> 128 -> 64 -> 32 (the stem's resolution); pre-class 1x1 conv 32 -> 8 + IN + ReLU;
* controller: MLP 192 -> 192 -> ReLU -> 162 on the last decoder layer's task query, generating
  the 8 -> 8 -> 8 -> 2 dynamic head (:func:`nnunet_ext.architectures.dodnet.dynamic_head`, one
  grouped conv per layer), applied at the stem's resolution; the logits are then upsampled
  trilinearly by the stem's stride (official ``self.upsample``).

The official code generates heads for all task queries and the loss picks the sample's task
(``preds[i_b, task_id]``); here only the sample's own query goes through the controller and the
head, which gives the same outputs for the picked task at 1/num_tasks of the head's cost (the
other queries still shape it through the decoder's self-attention).

Label coding, eval-mode merged-class scores and task selection are DoDNet's
(:class:`~nnunet_ext.architectures.dodnet.SigmoidLabelCoding`, ``DoDNet.forward``/``_tasks``).
No deep supervision (official ``deep_supervision=False``).

``axis_order``: ``"corrected"`` (default) or ``"official"`` deformable sampling, as in CoTr
(:mod:`nnunet_ext.architectures.blocks.deformable_attention`); official weights need ``"official"``
(``paper_network("TransDoDNet", conventions="official")``).

torch.compile: no graph break in training or eval mode, with or without a label coding (before:
23, from the deformable attention reading level shapes out of tensors); the task is a tensor, so
one compiled graph serves every task (``tests/test_compile.py``).

Official weights: ``official_key_map()`` / ``from_official_state_dict(sd)`` /
``official_state_dict()`` rename between our keys and those of the official ``TransDoDNet``
(all under ``ResCNN_DeformTR.``: ``backbone``, ``input_proj``, ``transformer.encoder``,
``transformer.decoder``, ``transformer.level_embed``, ``transformer.reference_points``,
``query_embed``, ``controller``, ``memory_conv3_l0``, ``cnn_bottle``, ``transposeconv_stage<i>``,
``shortcut_conv<i>``, ``stage<i>_de``, ``precls_conv``); only with ``axis_order="official"``.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.architectures.blocks.deformable_attention import (DeformableEncoder,
                                                                  DeformableTransformerEncoderLayer,
                                                                  EncoderOutput, MultiScaleDeformableAttention3D,
                                                                  split_levels)
from nnunet_ext.architectures.blocks.nnunet_v1 import OfficialNames, OfficialStateDict
from nnunet_ext.architectures.blocks.topology import as_strides, downsampling_strides
from nnunet_ext.architectures.dodnet import (HEAD_FEATURES, MOTS_TASKS, DoDNet, SigmoidLabelCoding, dynamic_head,
                                             dynamic_head_sizes, init_head_conditioning)
from nnunet_ext.tasks.conditioning import TaskConditioning

PAPER_STRIDES: tuple[tuple[int, int, int], ...] = ((1, 2, 2),) + ((2, 2, 2),) * 4  # stem, layer 1-4
PAPER_BLOCKS: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
PAPER_WIDTHS: tuple[int, ...] = (64, 128, 256, 320)  # bottleneck planes; outputs x EXPANSION
PAPER_DECODER: tuple[int, ...] = (32, 64, 128, 256)  # decoder channels at stem, layer 1, 2, 3 resolution
EXPANSION = 4
STEM_CHANNELS = 32
OFFSET_NORMALIZER_BASE = 16  # official ``inx``


def deepnorm_coefficients(encoder_layers: int, decoder_layers: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """DeepNet's ``((alpha, beta) encoder, (alpha, beta) decoder)``: residual scale and init gain
    (official ``deepnorm.get_deepnorm_coefficients``; (1, 1) for a side without layers)."""
    n, m = encoder_layers, decoder_layers
    if m == 0:
        return ((2 * n) ** 0.25, (8 * n) ** -0.25), (1.0, 1.0)
    if n == 0:
        return (1.0, 1.0), ((2 * m) ** 0.25, (8 * m) ** -0.25)
    return (0.81 * ((n ** 4) * m) ** 0.0625, 0.87 * ((n ** 4) * m) ** -0.0625), ((3 * m) ** 0.25, (12 * m) ** -0.25)


def deepnorm_init(layers: nn.Module, gain: float) -> None:
    """Official ``_deepnorm_init`` on one side's layers: FFN, value and output projections
    xavier_normal with gain beta, every other weight matrix (attention offsets and weights, the
    query self-attention) xavier_normal with gain 1; biases keep the attention's own init."""
    for name, p in layers.named_parameters():
        if "weight" in name and any(part in name for part in ("linear", "output_proj", "value_proj")):
            nn.init.xavier_normal_(p, gain=gain)
        elif "weight" in name and p.dim() > 1:
            nn.init.xavier_normal_(p, gain=1.0)


def _norm_act(channels: int, act: bool = True) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels, affine=True)] + ([nn.ReLU(inplace=True)] if act else [])


def _conv1(in_channels: int, out_channels: int, stride: Sequence[int] = (1, 1, 1), bias: bool = False) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 1, tuple(stride), 0, bias=bias)


def _conv3(in_channels: int, out_channels: int, stride: Sequence[int] = (1, 1, 1)) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 3, tuple(stride), 1, bias=False)


class Bottleneck(nn.Module):
    """Official ``ResCNN2.Bottleneck``: 1x1 -> 3x3x3 (stride) -> 1x1 (x4), IN, ReLU after the sum."""

    def __init__(self, in_channels: int, planes: int, stride: Sequence[int] = (1, 1, 1), expansion: int = EXPANSION):
        super().__init__()
        out = planes * expansion
        self.body = nn.Sequential(_conv1(in_channels, planes), *_norm_act(planes), _conv3(planes, planes, stride),
                                  *_norm_act(planes), _conv1(planes, out), *_norm_act(out, act=False))
        self.shortcut: nn.Module = nn.Identity()
        if any(s != 1 for s in stride) or in_channels != out:
            self.shortcut = nn.Sequential(_conv1(in_channels, out, stride), *_norm_act(out, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class BasicBlock(nn.Module):
    """Official ``ResCNN2.BasicBlock`` (decoder): (3x3x3 conv + IN) x 2 + identity, ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv3(channels, channels), *_norm_act(channels), _conv3(channels, channels),
                                  *_norm_act(channels, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + x)


class ResNet3D(nn.Module):
    """Official ``ResCNN2.ResNet`` (depth 50 by default); returns the stem output and every layer's."""

    def __init__(self, input_channels: int, strides: Sequence[Sequence[int]], blocks: Sequence[int] = PAPER_BLOCKS,
                 widths: Sequence[int] = PAPER_WIDTHS, stem_channels: int = STEM_CHANNELS, expansion: int = EXPANSION):
        super().__init__()
        self.stem = nn.Sequential(_conv3(input_channels, stem_channels, strides[0]), *_norm_act(stem_channels),
                                  _conv3(stem_channels, stem_channels), *_norm_act(stem_channels))
        layers, channels = [], stem_channels
        for planes, count, stride in zip(widths, blocks, strides[1:]):
            layer = [Bottleneck(channels, planes, stride, expansion)]
            channels = planes * expansion
            layer += [Bottleneck(channels, planes, (1, 1, 1), expansion) for _ in range(count - 1)]
            layers.append(nn.Sequential(*layer))
        self.layers = nn.ModuleList(layers)
        self.out_channels = [stem_channels] + [w * expansion for w in widths]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = [self.stem(x)]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        return outputs


class TransDoDAttention(MultiScaleDeformableAttention3D):
    """The shared deformable attention with TransDoDNet's two differences (official
    ``ms_deform_attn.py``): fixed offset normalisers ``16 * 2**(L-1-l)`` per level (finest level
    first; isotropic, so the axis order does not matter) and its sampling-direction init
    ``(sin cos, cos, sin)`` of the head angle."""

    @staticmethod
    def _sampling_directions(thetas: torch.Tensor) -> torch.Tensor:
        return torch.stack([thetas.sin() * thetas.cos(), thetas.cos(), thetas.sin()], -1)

    def _offset_normalizer(self, spatial_shapes: torch.Tensor) -> torch.Tensor:
        levels = torch.tensor([OFFSET_NORMALIZER_BASE * 2 ** (i - 1) for i in range(self.n_levels, 0, -1)],
                              dtype=torch.float32, device=spatial_shapes.device)
        return levels[:, None].expand(-1, 3)


class DeepNormEncoderLayer(DeformableTransformerEncoderLayer):
    """The shared encoder layer with TransDoDNet's attention; its ``res_scale`` is DeepNorm's alpha:
    ``LN(x * alpha + drop(f(x)))`` (official ``forward_post`` with ``res_scale``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attn = self.self_attn
        self.self_attn = TransDoDAttention(attn.d_model, attn.n_levels, attn.n_heads, attn.n_points, attn.axis_order)


class TaskQueryDecoderLayer(nn.Module):
    """Official ``DeformableTransformerDecoderLayer.forward_post``: query self-attention, deformable
    cross-attention to the encoder memory, FFN; each ``LN(x * alpha + drop(f(x)))``."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 axis_order: str = "corrected", res_scale: float = 1.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.cross_attn = TransDoDAttention(d_model, n_levels, n_heads, n_points, axis_order)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.dropout3, self.dropout4, self.norm3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.res_scale = res_scale

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                encoded: EncoderOutput) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm2(tgt * self.res_scale + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, reference_points, encoded.memory, encoded.spatial_shapes,
                                   encoded.level_start_index, encoded.padding_mask)
        tgt = self.norm1(tgt * self.res_scale + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt * self.res_scale + self.dropout4(ffn))


class TaskQueryDecoder(nn.Module):
    """``num_layers`` :class:`TaskQueryDecoderLayer` over learned task queries; returns the last
    layer's queries ``(N, num_tasks, d_model)`` (the official controller reads ``hs[-1]``)."""

    def __init__(self, num_queries: int, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int, num_layers: int, axis_order: str = "corrected", res_scale: float = 1.0):
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, 2 * d_model)  # official: query position | content
        self.reference_points = nn.Linear(d_model, 3)
        layer = TaskQueryDecoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points, axis_order, res_scale)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official ``DeformableTransformer._reset_parameters``: xavier for matrices, then the
        attention's own init, xavier (gain 1) + zero bias for the reference-point head."""
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention3D):
                m._reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.constant_(self.reference_points.bias, 0.0)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        n = encoded.memory.shape[0]
        query_pos, tgt = self.query_embed.weight.to(encoded.memory.dtype).chunk(2, dim=1)
        query_pos, tgt = query_pos.unsqueeze(0).expand(n, -1, -1), tgt.unsqueeze(0).expand(n, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # (N, Q, 3), same on every level
        reference = reference[:, :, None] * encoded.valid_ratios[:, None].to(reference.dtype)
        for layer in self.layers:
            tgt = layer(tgt, query_pos, reference, encoded)
        return tgt


OFFICIAL_PREFIX = "ResCNN_DeformTR"  # the official TransDoDNet wraps everything in this module


def _name_indexed(names: OfficialNames, body: nn.Sequential, prefix: str, pairs: Sequence[tuple[int, str]]) -> None:
    for index, name in pairs:
        names.add(body[index], f"{prefix}.{name}")


class TransDoDNet(TaskConditioning, OfficialStateDict):
    """TransDoDNet; tasks, label coding and eval-mode outputs exactly as :class:`DoDNet`.

    ``strides``: five strides (stem, layer 1-4), see :func:`strides_from_plans`. Widths and depths
    are constructor arguments so tests can build narrow variants; the defaults are the paper's."""

    def __init__(self, input_channels: int = 1, num_tasks: int = MOTS_TASKS, head_channels: int = 2, *,
                 strides: Sequence[Sequence[int] | int] = PAPER_STRIDES, blocks: Sequence[int] = PAPER_BLOCKS,
                 widths: Sequence[int] = PAPER_WIDTHS, stem_channels: int = STEM_CHANNELS,
                 expansion: int = EXPANSION, decoder_channels: Sequence[int] = PAPER_DECODER,
                 hidden: int = 192, heads: int = 8, ffn: int = 768, encoder_layers: int = 3, decoder_layers: int = 3,
                 points: int = 4, levels: int = 3, dropout: float = 0.1, deepnorm: bool = True,
                 axis_order: str = "corrected", coding: SigmoidLabelCoding | None = None,
                 deep_supervision: bool = False):
        super().__init__()
        strides = as_strides(strides, 3)
        if len(strides) != len(widths) + 1 or len(blocks) != len(widths) or any(len(s) != 3 for s in strides):
            raise ValueError(f"need one 3D stride for the stem and one per layer ({len(widths) + 1}) and one block "
                             f"count per layer, got strides {strides} and blocks {list(blocks)}")
        if len(decoder_channels) != len(widths) or decoder_channels[0] != stem_channels:
            raise ValueError(f"decoder_channels needs one entry per layer, the first = stem_channels "
                             f"({stem_channels}), got {list(decoder_channels)}")
        if not 1 <= levels <= len(widths):
            raise ValueError(f"levels must be in 1..{len(widths)}, got {levels}")
        init_head_conditioning(self, num_tasks, head_channels, coding)
        self.input_channels, self.head_channels, self.strides = input_channels, head_channels, strides
        self.levels = levels

        self.backbone = ResNet3D(input_channels, strides, blocks, widths, stem_channels, expansion)
        channels = self.backbone.out_channels
        self.input_proj = nn.ModuleList(nn.Sequential(_conv1(c, hidden, bias=True), *_norm_act(hidden, act=False))
                                        for c in channels[-levels:])
        # the residual scale applies whatever ``deepnorm`` (official); the flag picks the init below
        (enc_alpha, enc_beta), (dec_alpha, dec_beta) = deepnorm_coefficients(encoder_layers, decoder_layers)
        self.encoder = DeformableEncoder(hidden, ffn, dropout, "relu", levels, heads, points, encoder_layers,
                                         axis_order, pos_offset=0.0)
        self.encoder.layers = nn.ModuleList(
            DeepNormEncoderLayer(hidden, ffn, dropout, "relu", levels, heads, points, axis_order, res_scale=enc_alpha)
            for _ in range(encoder_layers))
        self.encoder._reset_parameters()
        self.query_decoder = TaskQueryDecoder(num_tasks, hidden, ffn, dropout, levels, heads, points, decoder_layers,
                                              axis_order, dec_alpha)
        if deepnorm:  # official: instead of DETR's _reset_parameters; the reference points keep nn.Linear's init
            deepnorm_init(self.encoder.layers, enc_beta)
            deepnorm_init(self.query_decoder.layers, dec_beta)
            self.query_decoder.reference_points.reset_parameters()
        weight_sizes, bias_sizes = dynamic_head_sizes(head_channels)
        self.controller = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, sum(weight_sizes) + sum(bias_sizes)))

        top = decoder_channels[-1]
        self.memory_conv = nn.Sequential(_conv1(hidden, top), *_norm_act(top))
        self.cnn_bottle = nn.Sequential(_conv1(channels[-1], top), *_norm_act(top))
        # level i (0 = stem resolution) receives the upsampled level i + 1 and skip channels[i]
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(decoder_channels[min(i + 1, len(decoder_channels) - 1)], decoder_channels[i],
                               kernel_size=tuple(strides[i + 1]), stride=tuple(strides[i + 1]), bias=False)
            for i in range(len(widths)))
        self.skip = nn.ModuleList(
            nn.Sequential(_conv1(channels[i], decoder_channels[i]), *_norm_act(decoder_channels[i]))
            for i in range(len(widths)))
        self.decoder_blocks = nn.ModuleList(BasicBlock(c) for c in decoder_channels)
        self.precls = nn.Sequential(_conv1(decoder_channels[0], HEAD_FEATURES), *_norm_act(HEAD_FEATURES))
        self.decoder = _NoDeepSupervision()
        self.decoder.deep_supervision = deep_supervision

        for m in self.modules():  # official init of the CNN parts (the transformer keeps its own)
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def _shared_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        """What every task shares: all task queries (B, num_tasks, hidden), the CNN decoder's pre-class
        features and the input's spatial size."""
        features = self.backbone(x)
        encoded = self.encoder.encode([proj(f) for proj, f in zip(self.input_proj, features[-self.levels:])])
        queries = self.query_decoder(encoded)  # (B, num_tasks, hidden)
        memory = split_levels(encoded.memory, encoded.spatial_shapes)[-1]
        y = self.memory_conv(memory) + self.cnn_bottle(features[-1])
        for level in reversed(range(len(self.up))):
            y = self.up[level](y) + self.skip[level](features[level])
            y = self.decoder_blocks[level](y)
        return queries, self.precls(y), x.shape[2:]

    def _task_head(self, shared: tuple[torch.Tensor, torch.Tensor, torch.Size], tasks: torch.Tensor) -> torch.Tensor:
        """The tasks' own query -> controller -> dynamic head: the only per-task compute."""
        queries, features, size = shared
        own = queries[torch.arange(queries.shape[0], device=queries.device), tasks.to(queries.device)]
        logits = dynamic_head(features, self.controller(own), self.head_channels)
        if logits.shape[2:] != size:  # official: trilinear x stem stride
            logits = F.interpolate(logits, size=size, mode="trilinear", align_corners=False)
        return logits

    def official_weights_problem(self) -> str | None:
        if self.encoder.axis_order != "official":
            return (f"TransDoDNet was built with axis_order={self.encoder.axis_order!r}: official weights need "
                    f"axis_order='official' (paper_network('TransDoDNet', conventions='official'))")
        return None

    def _official_names(self) -> OfficialNames:
        """Names of the official ``TransDoDNet`` (``models/TransDoDNet.py``, ``ResCNN2.py``,
        ``deformable_transformer.py``)."""
        names, root = OfficialNames(), OFFICIAL_PREFIX
        _name_indexed(names, self.backbone.stem, f"{root}.backbone", ((0, "conv1"), (1, "norm1"), (3, "conv2"),
                                                                      (4, "norm2")))
        bottleneck = ((0, "conv1"), (1, "norm1"), (3, "conv2"), (4, "norm2"), (6, "conv3"), (7, "norm3"))
        for index, layer in enumerate(self.backbone.layers, start=1):
            for b, block in enumerate(layer):
                _name_indexed(names, block.body, f"{root}.backbone.layer{index}.{b}", bottleneck)
                if isinstance(block.shortcut, nn.Sequential):
                    names.sequential(block.shortcut, f"{root}.backbone.layer{index}.{b}.downsample")
        for index, proj in enumerate(self.input_proj):
            names.sequential(proj, f"{root}.input_proj.{index}")
        names.parameter("encoder.level_embed", f"{root}.transformer.level_embed")
        names.tree(self.encoder.layers, f"{root}.transformer.encoder.layers")
        names.tree(self.query_decoder.layers, f"{root}.transformer.decoder.layers")
        names.add(self.query_decoder.reference_points, f"{root}.transformer.reference_points")
        names.add(self.query_decoder.query_embed, f"{root}.query_embed")
        names.sequential(self.controller, f"{root}.controller")
        names.sequential(self.memory_conv, f"{root}.memory_conv3_l0")
        names.sequential(self.cnn_bottle, f"{root}.cnn_bottle")
        for level, (up, skip, block) in enumerate(zip(self.up, self.skip, self.decoder_blocks)):
            names.add(up, f"{root}.transposeconv_stage{level}")
            names.sequential(skip, f"{root}.shortcut_conv{level}")
            _name_indexed(names, block.body, f"{root}.stage{level}_de", ((0, "conv1"), (1, "norm1"), (3, "conv2"),
                                                                         (4, "norm2")))
        names.sequential(self.precls, f"{root}.precls_conv")
        return names

    # task selection, head logits (``(B, head_channels, *x.shape[2:])``), logit keeping, eval-mode class
    # scores and all-task outputs: DoDNet's, not a copy
    head_logits = DoDNet.head_logits
    _tasks = DoDNet._tasks
    forward = DoDNet.forward
    _class_scores = DoDNet._class_scores
    forward_tasks = DoDNet.forward_tasks


class _NoDeepSupervision(nn.Module):
    """Holds nnU-Net's ``decoder.deep_supervision`` switch; TransDoDNet has no deep supervision."""

    deep_supervision = False


def strides_from_plans(plan_strides: Sequence[Sequence[int] | int],
                       stages: int = len(PAPER_STRIDES)) -> list[list[int]]:
    """TransDoDNet's five strides from nnU-Net's plans: the plans' downsampling strides (after
    their stride-1 first stage) become the stem's and layers 1-4's, padded with stride 1 when the
    plans downsample fewer times (:func:`~nnunet_ext.architectures.blocks.topology.downsampling_strides`).
    Depth and widths stay the paper's; 64x192x192 plans of [1,1,1], [1,2,2], [2,2,2] x 4 give the
    official network exactly."""
    return downsampling_strides(plan_strides, stages, 3)


def paper_transdodnet(axis_order: str = "corrected") -> TransDoDNet:
    """MOTS configuration: 7 tasks, 1 CT channel, 2 sigmoid channels, official strides
    (patch 64x192x192); 39,049,941 parameters, as the official model."""
    return TransDoDNet(input_channels=1, num_tasks=MOTS_TASKS, head_channels=2, axis_order=axis_order)
