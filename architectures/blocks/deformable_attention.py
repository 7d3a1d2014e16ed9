"""3D multi-scale deformable attention and the deformable transformer encoder built from it.

This is the one deformable-attention implementation of nnunet-ext. It follows

* Deformable DETR (Zhu et al., ICLR 2021), extended to volumes as in
* CoTr (Xie et al., MICCAI 2021, github.com/YtongXie/CoTr): the "DeTrans" encoder, and
* TransDoDNet (Zhang et al., jianpengz/DoDNet, folder ``TransDoD``), which reuses the same
  encoder/attention code.

Everything is plain PyTorch (``torch.nn.functional.grid_sample``), so no CUDA extension has to
be compiled; the official CoTr code uses the same pure-PyTorch path.

Axis conventions
----------------
Feature maps are ``(N, C, D, H, W)``. ``grid_sample`` on a 5D input takes grid coordinates in
``(x, y, z)`` order, where ``x`` indexes ``W``, ``y`` indexes ``H`` and ``z`` indexes ``D``.

``axis_order="corrected"`` (default)
    Reference points, sampling offsets and offset normalisers are all ``(d, h, w)``; the
    sampling locations are flipped to ``(w, h, d) = (x, y, z)`` right before ``grid_sample``.
    A query with zero offsets therefore samples exactly its own voxel.

``axis_order="official"``
    Reproduces the official CoTr / TransDoDNet code (CoTr repo, paths below relative to
    ``CoTr_package/CoTr/network_architecture/DeTrans/``):

    * ``DeformableTrans.py`` l.143-151 (``get_reference_points``): ``meshgrid`` over
      ``(D, H, W)`` gives ``ref_d, ref_y, ref_x`` (voxel centres), each is normalised by its own
      size (times the valid ratio), and they are stacked as ``(ref_d, ref_x, ref_y)`` - comment
      "D W H". l.154 multiplies by the valid ratios, which ``get_valid_ratio`` (l.46-56) stacks
      in the same ``(d, w, h)`` order, so that part is self-consistent.
    * ``ops/modules/ms_deform_attn.py`` l.89-91: the offset normaliser is
      ``stack(D, W, H)``, again consistent with the ``(d, w, h)`` reference points.
    * ``ops/functions/ms_deform_attn_func.py`` l.22 and l.27-28: the locations become
      ``2 * loc - 1`` and are handed to ``grid_sample`` unchanged, with the value reshaped to
      ``(N*heads, C, D, H, W)``. ``grid_sample`` reads component 0 as x (the W axis),
      component 1 as y (H) and component 2 as z (D).

    Net effect: the normalised d coordinate moves along W, the normalised w coordinate along
    H and the normalised h coordinate along D. With zero offsets the query at voxel
    ``(d, h, w)`` of a level of shape ``(D, H, W)`` samples the continuous position
    ``(D*(h+.5)/H - .5, H*(w+.5)/W - .5, W*(d+.5)/D - .5)`` - for a cube the voxel
    ``(h, w, d)``, a cyclic permutation of its own position - and an offset component ``k``
    is divided by ``(D, W, H)[k]`` but applied along ``(W, H, D)[k]``. Offsets are learned,
    so a network can partly compensate, but weights trained with the official code only behave
    as trained under the official ordering, so it is kept as an option. In "official" mode
    the attention expects reference points in ``(d, w, h)`` order (``get_reference_points(...,
    axis_order="official")`` produces them) and the offset components of ``sampling_offsets``
    have the official layout.

TransDoDNet's copy (``TransDoD/models/deformable_transformer.py`` l.313-328,
``TransDoD/models/ops/functions/ms_deform_attn_func.py`` l.63-81) has the same ordering. Its
attention uses fixed per-level offset normalisers (``TransDoD/models/ops/modules/
ms_deform_attn.py`` l.62-64) and another direction init (l.75) - override
``MultiScaleDeformableAttention3D._offset_normalizer`` / ``_sampling_directions`` for those - and
its sine encoding omits the ``-0.5`` shift
(``PositionEmbeddingSine3D(offset=0.0)``, ``DeformableEncoder(pos_offset=0.0)``).

Mixed precision
---------------
``grid_sample`` needs value and grid of one dtype. The sampling is done in float32 (float64
for float64 input) with autocast disabled locally, and the result is cast back to the value's
dtype. Casting the grid down to fp16/bf16 instead (what the official code does) would cost
precision where it matters: in bf16 (8 mantissa bits) a coordinate in [-1, 1] is only good to
about 1/256 of the axis, a sizeable fraction of a voxel on 100-voxel maps. Float32 sampling
costs little next to the projections.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AXIS_ORDERS: tuple[str, ...] = ("corrected", "official")

# The official code stacks reference points / valid ratios / offset normalisers as (d, w, h);
# indexing a (d, h, w) tensor with this gives that order (and is its own inverse).
_DHW_TO_DWH = [0, 2, 1]

SpatialShapes = Union[Tensor, Sequence[Sequence[int]]]


def _check_axis_order(axis_order: str) -> str:
    if axis_order not in AXIS_ORDERS:
        raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
    return axis_order


def _shapes_as_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int, int]]:
    """(L, 3) tensor or nested sequence -> list of python (D, H, W) tuples (for reshapes). The
    networks pass python shapes: reading a tensor here syncs the GPU and breaks torch.compile graphs."""
    rows = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
    shapes = [tuple(int(s) for s in row) for row in rows]
    if any(len(s) != 3 for s in shapes):
        raise ValueError(f"spatial shapes must be (D, H, W) triples, got {shapes}")
    return shapes


def _shapes_as_tensor(spatial_shapes: SpatialShapes, device: torch.device) -> Tensor:
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes.to(device=device, dtype=torch.long)
    return torch.as_tensor(_shapes_as_list(spatial_shapes), dtype=torch.long, device=device)


def level_start_index(spatial_shapes: SpatialShapes, device: Optional[torch.device] = None) -> Tensor:
    """Start of each level in the flattened token sequence, shape (L,), on ``device`` (default: the
    shapes' device, the CPU for python shapes)."""
    if device is None:
        device = spatial_shapes.device if isinstance(spatial_shapes, Tensor) else torch.device("cpu")
    sizes = _shapes_as_tensor(spatial_shapes, device).prod(1)
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


# ---------------------------------------------------------------------------------------------
# core sampling
# ---------------------------------------------------------------------------------------------
def _sampling_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16 (coordinate precision), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def ms_deform_attn_core(value: Tensor, value_spatial_shapes: SpatialShapes,
                        sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Weighted sum of trilinearly sampled values: the parameter-free part of the attention.

    Args:
        value: (N, S, n_heads, head_dim), S = sum_l D_l*H_l*W_l, each level flattened with W
            fastest (``x.flatten(2)`` of an (N, C, D, H, W) map).
        value_spatial_shapes: (L, 3) in (D, H, W).
        sampling_locations: (N, Lq, n_heads, L, P, 3), normalised to [0, 1] (0 and 1 are the
            outer edges of the first/last voxel, ``align_corners=False``) and already in
            grid_sample's (x, y, z) = (w, h, d) order. Locations outside [0, 1] read zeros.
        attention_weights: (N, Lq, n_heads, L, P), normalised over L*P by the caller.

    Returns:
        (N, Lq, n_heads*head_dim) in ``value``'s dtype.

    One ``grid_sample`` per level (levels have different shapes); heads are folded into the
    batch and points into the grid, so nothing loops over heads or points. Sampling runs in
    float32 (float64 for float64 input) with autocast off (see module docstring).
    """
    n, s, n_heads, head_dim = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = _shapes_as_list(value_spatial_shapes)
    if len(shapes) != n_levels:
        raise ValueError(f"{len(shapes)} spatial shapes for {n_levels} sampled levels")
    sizes = [d * h * w for d, h, w in shapes]
    if sum(sizes) != s:
        raise ValueError(f"value has {s} tokens but spatial shapes {shapes} sum to {sum(sizes)}")

    out_dtype = value.dtype
    dtype = _sampling_dtype(value.dtype)
    device_type = value.device.type  # the meta device (shape checks) has no autocast
    no_autocast = (torch.autocast(device_type=device_type, enabled=False)
                   if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext())
    with no_autocast:
        value = value.to(dtype)
        # grid_sample's grid lives in [-1, 1]; with align_corners=False -1/+1 are voxel edges,
        # which is exactly what the [0, 1] normalisation of the reference points means.
        grids = 2 * sampling_locations.to(dtype) - 1
        weights = attention_weights.to(dtype)
        output = value.new_zeros(n * n_heads, head_dim, lq)
        for lvl, (value_l, (d, h, w)) in enumerate(zip(value.split(sizes, dim=1), shapes)):
            # (N, S_l, M, C) -> (N*M, C, D, H, W)
            value_l = value_l.permute(0, 2, 3, 1).reshape(n * n_heads, head_dim, d, h, w)
            # (N, Lq, M, P, 3) -> (N*M, 1, Lq, P, 3): queries x points form the output "H x W"
            grid_l = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(n * n_heads, 1, lq, n_points, 3)
            sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)[:, :, 0]  # (N*M, C, Lq, P)
            weights_l = weights[:, :, :, lvl].permute(0, 2, 1, 3).reshape(n * n_heads, 1, lq, n_points)
            output = output + (sampled * weights_l).sum(-1)
        output = output.view(n, n_heads * head_dim, lq).transpose(1, 2).contiguous()
    return output.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# attention module
# ---------------------------------------------------------------------------------------------
class MultiScaleDeformableAttention3D(nn.Module):
    """Multi-scale deformable attention on 3D feature maps (Deformable DETR / CoTr).

    Every query attends to ``n_points`` learned locations around its reference point on each of
    ``n_levels`` feature maps and per head; locations and weights are predicted from the query.
    This costs O(Lq * L * P) instead of O(Lq * S), which is what makes attention over
    multi-scale 3D feature maps affordable.

    Args:
        d_model: token width; must be divisible by ``n_heads``.
        n_levels: number of feature levels in ``input_flatten``.
        n_heads: attention heads.
        n_points: sampling points per head and level.
        axis_order: ``"corrected"`` or ``"official"`` (see module docstring).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 axis_order: str = "corrected") -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.axis_order = _check_axis_order(axis_order)
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 3)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Deformable-DETR init as in CoTr: start from a fixed spread of sampling points.

        Offset weights are zero, so at init every head samples along its own direction (unit
        vectors spread over angles 2*pi*k/n_heads, scaled to the unit cube's surface) at
        distances 1..n_points voxels; uniform attention weights; xavier projections.
        """
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = self._sampling_directions(thetas)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.n_heads, 1, 1, 3).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    @staticmethod
    def _sampling_directions(thetas: Tensor) -> Tensor:
        """(n_heads, 3) initial sampling direction of each head from its angle: CoTr's
        ``(cos, sin cos, sin sin)``. A hook for variants with another init (TransDoDNet's)."""
        return torch.stack([thetas.cos(), thetas.sin() * thetas.cos(), thetas.sin() * thetas.sin()], -1)

    def _offset_normalizer(self, spatial_shapes: Tensor) -> Tensor:
        """(L, 3) divisors turning offsets (in voxels) into normalised units.

        Same component order as the reference points: (D, H, W) for "corrected", (D, W, H) for
        "official". A hook so variants with other normalisers (TransDoDNet's fixed per-level
        constants) can reuse this module by overriding it.
        """
        shapes = spatial_shapes.float()
        return shapes[:, _DHW_TO_DWH] if self.axis_order == "official" else shapes

    def _to_grid_order(self, locations: Tensor) -> Tensor:
        """Sampling locations -> grid_sample's (x, y, z).

        "corrected": (d, h, w) -> (w, h, d). "official": passed unchanged, as the official code
        does, so its (d, w, h) components land on (W, H, D).
        """
        return locations if self.axis_order == "official" else locations.flip(-1)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: SpatialShapes, input_level_start_index: Optional[Tensor] = None,
                input_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Attend from ``query`` to the flattened multi-level ``input_flatten``.

        Args:
            query: (N, Lq, C), positional encoding already added.
            reference_points: (N, Lq, L, 3) in [0, 1]; (d, h, w) for "corrected", (d, w, h) for
                "official" (as produced by :func:`get_reference_points`).
            input_flatten: (N, S, C).
            input_spatial_shapes: (L, 3) in (D, H, W); python ints (a tensor works, at the cost of a
                device sync and a torch.compile graph break).
            input_level_start_index: (L,); accepted for Deformable-DETR signature compatibility
                (the CUDA kernel needs it), unused here because the shapes determine the split.
            input_padding_mask: (N, S) bool, True = padding; those values contribute zero.

        Returns:
            (N, Lq, C).
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        shapes = _shapes_as_list(input_spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"expected ({self.n_levels}, 3) spatial shapes, got ({len(shapes)}, 3)")
        if reference_points.shape[-1] != 3 or reference_points.shape[-2] != self.n_levels:
            raise ValueError(f"reference_points must be (N, Lq, {self.n_levels}, 3), "
                             f"got {tuple(reference_points.shape)}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)

        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 3)
        logits = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(logits, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)

        normalizer = self._offset_normalizer(torch.as_tensor(shapes, dtype=torch.long, device=query.device))  # (L, 3)
        # at least float32 so that reference point + small offset keeps sub-voxel precision
        dtype = _sampling_dtype(value.dtype)
        locations = (reference_points.to(dtype)[:, :, None, :, None, :]
                     + offsets.to(dtype) / normalizer.to(dtype)[None, None, None, :, None, :])
        output = ms_deform_attn_core(value, shapes, self._to_grid_order(locations), weights)
        return self.output_proj(output)


# ---------------------------------------------------------------------------------------------
# positional encoding and reference points
# ---------------------------------------------------------------------------------------------
class PositionEmbeddingSine3D(nn.Module):
    """Fixed 3D sine positional encoding (DETR generalised to volumes, as in CoTr).

    Output channels are three blocks of ``num_pos_feats``: d, then h, then w (CoTr's
    ``position_encoding.py`` l.57 concatenates ``(pos_d, pos_y, pos_x)``). Inside a block,
    channel ``i`` is ``sin`` for even ``i`` and ``cos`` for odd ``i`` of ``pos / T**(3*(i//3)/F)``
    (interleaved, DETR's stack/flatten). The ``3*(i//3)`` exponent (DETR uses ``2*(i//2)``) is
    CoTr's and TransDoDNet's; it is kept so pretrained weights see the same encoding.

    ``pos`` is the 1-based cumulative count of non-padding voxels along the axis; with
    ``normalize`` it becomes ``(pos - offset) / (count + 1e-6) * scale``. CoTr uses
    ``offset=0.5`` (voxel centres, as Deformable DETR); TransDoDNet uses ``offset=0``.

    Args:
        num_pos_feats: channels per axis; must be even (sin/cos pairs).
        temperature: frequency base ``T``.
        normalize: scale positions to ``(0, scale]`` so the encoding does not depend on size.
        scale: range after normalisation.
        offset: subtracted from the count before normalisation.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0.5) -> None:
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Union[Tensor, Sequence[int]], device: Optional[torch.device] = None) -> Tensor:
        """Encoding for a padding mask (N, D, H, W) bool (True = padding) or a shape (N, D, H, W).

        Returns (N, 3*num_pos_feats, D, H, W), float32.
        """
        if not isinstance(mask, Tensor):
            mask = torch.zeros(tuple(int(s) for s in mask), dtype=torch.bool, device=device)
        if mask.dim() != 4:
            raise ValueError(f"mask must be (N, D, H, W), got shape {tuple(mask.shape)}")
        not_mask = ~mask
        embeds = [not_mask.cumsum(axis, dtype=torch.float32) for axis in (1, 2, 3)]  # d, h, w
        if self.normalize:
            eps = 1e-6
            lasts = [embeds[0][:, -1:], embeds[1][:, :, -1:], embeds[2][:, :, :, -1:]]
            embeds = [(e - self.offset) / (last + eps) * self.scale for e, last in zip(embeds, lasts)]

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (3 * torch.div(dim_t, 3, rounding_mode="floor") / self.num_pos_feats)
        blocks = []
        for embed in embeds:
            pos = embed[..., None] / dim_t
            blocks.append(torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=5).flatten(4))
        return torch.cat(blocks, dim=4).permute(0, 4, 1, 2, 3)


def get_valid_ratios(mask: Tensor) -> Tensor:
    """(N, D, H, W) padding mask -> (N, 3) fraction of non-padded extent per axis, (d, h, w)."""
    _, d, h, w = mask.shape
    valid_d = (~mask[:, :, 0, 0]).sum(1).float() / d
    valid_h = (~mask[:, 0, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, 0, :]).sum(1).float() / w
    return torch.stack([valid_d, valid_h, valid_w], -1)


def get_reference_points(spatial_shapes: SpatialShapes, valid_ratios: Tensor,
                         device: Optional[torch.device] = None,
                         axis_order: str = "corrected") -> Tensor:
    """Encoder reference points: every voxel centre of every level, normalised.

    Args:
        spatial_shapes: (L, 3) in (D, H, W).
        valid_ratios: (N, L, 3) in (d, h, w), the unpadded fraction per level and axis (ones
            without padding).
        device: where to build them (defaults to ``valid_ratios.device``).
        axis_order: "corrected" -> components (d, h, w); "official" -> (d, w, h), the order of
            CoTr's ``get_reference_points`` that "official" attention expects.

    Returns:
        (N, S, L, 3). A token's centre is normalised by its own level's valid extent, then
        rescaled by every level's valid ratio, so the same relative position is referenced on
        all levels (Deformable DETR).
    """
    _check_axis_order(axis_order)
    device = valid_ratios.device if device is None else device
    valid_ratios = valid_ratios.to(device=device, dtype=torch.float32)
    per_level = []
    for lvl, shape in enumerate(_shapes_as_list(spatial_shapes)):
        axes = [torch.linspace(0.5, size - 0.5, size, dtype=torch.float32, device=device) for size in shape]
        centres = torch.stack([g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij")], -1)  # (S_l, 3)
        extent = valid_ratios[:, lvl] * torch.tensor(shape, dtype=torch.float32, device=device)  # (N, 3)
        per_level.append(centres[None] / extent[:, None])
    reference_points = torch.cat(per_level, 1)[:, :, None] * valid_ratios[:, None]
    return reference_points[..., _DHW_TO_DWH] if axis_order == "official" else reference_points


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------
def _activation(name: str):
    activations = {"relu": F.relu, "gelu": F.gelu}
    if name not in activations:
        raise ValueError(f"activation must be one of {tuple(activations)}, got {name!r}")
    return activations[name]


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + FFN (Deformable DETR / CoTr).

    ``x = LN(x * a + drop(attn(x + pos, x)))``, then ``x = LN(x * a + drop(W2 drop(act(W1 x))))``;
    ``a = res_scale``: 1 (Deformable DETR, CoTr) or DeepNorm's alpha (TransDoDNet).
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 axis_order: str = "corrected", res_scale: float = 1.0) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.self_attn = MultiScaleDeformableAttention3D(d_model, n_levels, n_heads, n_points, axis_order)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Optional[Tensor], reference_points: Tensor,
                spatial_shapes: SpatialShapes, level_start_index: Optional[Tensor] = None,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """src, pos: (N, S, C); the position only enters the query (values stay content-only)."""
        query = src if pos is None else src + pos
        attended = self.self_attn(query, reference_points, src, spatial_shapes, level_start_index,
                                  padding_mask)
        src = self.norm1(self._residual(src) + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(self._residual(src) + self.dropout3(ffn))

    def _residual(self, x: Tensor) -> Tensor:
        return x if self.res_scale == 1.0 else x * self.res_scale


class EncoderOutput(NamedTuple):
    """Flattened encoder result plus what a deformable decoder needs to attend to it."""

    memory: Tensor  # (N, S, C)
    spatial_shapes: tuple[tuple[int, int, int], ...]  # (D, H, W) per level, python ints (no device sync)
    level_start_index: Tensor  # (L,)
    valid_ratios: Tensor  # (N, L, 3), (d, h, w)
    padding_mask: Optional[Tensor]  # (N, S) bool or None


def split_levels(memory: Tensor, spatial_shapes: SpatialShapes) -> list[Tensor]:
    """(N, S, C) tokens -> list of (N, C, D_l, H_l, W_l) maps (inverse of the flattening)."""
    shapes = _shapes_as_list(spatial_shapes)
    chunks = memory.split([d * h * w for d, h, w in shapes], dim=1)
    return [c.transpose(1, 2).reshape(memory.shape[0], memory.shape[2], *shape)
            for c, shape in zip(chunks, shapes)]


class DeformableEncoder(nn.Module):
    """Multi-level deformable transformer encoder on 3D maps: CoTr's DeTrans.

    Takes ``[(N, d_model, D_l, H_l, W_l)]`` for ``n_levels`` levels (any shapes), adds the sine
    positional encoding and a learned per-level embedding to the queries, runs ``num_layers``
    encoder layers over all levels' tokens jointly and returns the maps in the input shapes.
    CoTr: d_model 384, d_ffn 1536, dropout 0.1, gelu, 2 levels, 6 heads, 4 points, 6 layers.

    Args:
        d_model: channels of every level; must be divisible by 6 (three axes of sin/cos pairs)
            and by ``n_heads``.
        d_ffn, dropout, activation, n_levels, n_heads, n_points, axis_order: as in
            :class:`DeformableTransformerEncoderLayer`.
        num_layers: encoder depth.
        pos_offset: :class:`PositionEmbeddingSine3D` ``offset`` (0.5 CoTr, 0.0 TransDoDNet).
    """

    def __init__(self, d_model: int = 384, d_ffn: int = 1536, dropout: float = 0.1,
                 activation: str = "gelu", n_levels: int = 2, n_heads: int = 6, n_points: int = 4,
                 num_layers: int = 6, axis_order: str = "corrected", pos_offset: float = 0.5) -> None:
        super().__init__()
        if d_model % 6 != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by 6 for the 3D sine encoding")
        self.axis_order = _check_axis_order(axis_order)
        self.d_model = d_model
        self.n_levels = n_levels
        self.position_embedding = PositionEmbeddingSine3D(d_model // 3, normalize=True, offset=pos_offset)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        layer = DeformableTransformerEncoderLayer(d_model, d_ffn, dropout, activation, n_levels,
                                                  n_heads, n_points, axis_order)
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """As CoTr's DeformableTransformer: xavier for all matrices, then the attention's own
        init again (xavier would overwrite its zero offset/weight init), normal level embedding."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention3D):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def encode(self, features: Sequence[Tensor], masks: Optional[Sequence[Tensor]] = None) -> EncoderOutput:
        """Run the encoder and keep the flat token layout (for a deformable decoder).

        Args:
            features: ``n_levels`` maps (N, d_model, D_l, H_l, W_l).
            masks: optional (N, D_l, H_l, W_l) bool padding masks (True = padding); CoTr has none.
        """
        if len(features) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} feature levels, got {len(features)}")
        device = features[0].device
        n = features[0].shape[0]
        shapes = tuple((int(f.shape[2]), int(f.shape[3]), int(f.shape[4])) for f in features)
        padded = masks is not None
        if masks is None:
            masks = [torch.zeros((n, *shape), dtype=torch.bool, device=device) for shape in shapes]

        srcs, poss = [], []
        for lvl, (feature, mask) in enumerate(zip(features, masks)):
            pos = self.position_embedding(mask).flatten(2).transpose(1, 2) + self.level_embed[lvl]
            srcs.append(feature.flatten(2).transpose(1, 2))
            poss.append(pos.to(feature.dtype))  # a bf16/fp16 model must not get a float32 query
        src = torch.cat(srcs, 1)
        pos = torch.cat(poss, 1)
        # Without masks (CoTr, TransDoDNet) there is no padding: no mask in the attention and valid ratios of
        # exactly 1, decided without reading mask values (that would sync the GPU and break compiled graphs).
        # Given masks are used as they are; an all-False mask gives the same values as none.
        padding_mask = torch.cat([m.flatten(1) for m in masks], 1) if padded else None
        start_index = level_start_index(shapes, device)
        valid_ratios = (torch.stack([get_valid_ratios(m) for m in masks], 1) if padded
                        else torch.ones((n, len(shapes), 3), dtype=torch.float32, device=device))
        reference_points = get_reference_points(shapes, valid_ratios, device, self.axis_order)

        memory = src
        for layer in self.layers:
            memory = layer(memory, pos, reference_points, shapes, start_index, padding_mask)
        return EncoderOutput(memory, shapes, start_index, valid_ratios, padding_mask)

    def forward(self, features: Sequence[Tensor], masks: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
        """Encode ``features`` and return them as maps of the input shapes."""
        encoded = self.encode(features, masks)
        return split_levels(encoded.memory, encoded.spatial_shapes)
