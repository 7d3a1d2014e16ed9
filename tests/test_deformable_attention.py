"""Tests of the shared 3D multi-scale deformable attention (architectures/blocks).

Small tensors only: the whole file runs in a few seconds on two CPU cores.
"""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_ext.architectures.blocks import (
    AXIS_ORDERS,
    DeformableEncoder,
    DeformableTransformerEncoderLayer,
    MultiScaleDeformableAttention3D,
    PositionEmbeddingSine3D,
    get_reference_points,
    level_start_index,
    ms_deform_attn_core,
    split_levels,
)

ANISO_SHAPES = [(3, 7, 5), (2, 4, 3)]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def naive_trilinear(volume: torch.Tensor, x: float, y: float, z: float) -> torch.Tensor:
    """Sample volume (D, H, W, C) at normalised (x, y, z) = (w, h, d) in [0, 1].

    align_corners=False: normalised 0 and 1 are the outer voxel edges, so the continuous voxel
    index is ``coord * size - 0.5``; corners outside the volume read zero (padding "zeros").
    """
    depth, height, width, _ = volume.shape
    iz, iy, ix = z * depth - 0.5, y * height - 0.5, x * width - 0.5
    z0, y0, x0 = math.floor(iz), math.floor(iy), math.floor(ix)
    result = torch.zeros(volume.shape[-1], dtype=volume.dtype)
    for cz in (z0, z0 + 1):
        for cy in (y0, y0 + 1):
            for cx in (x0, x0 + 1):
                if 0 <= cz < depth and 0 <= cy < height and 0 <= cx < width:
                    weight = (1 - abs(iz - cz)) * (1 - abs(iy - cy)) * (1 - abs(ix - cx))
                    result += weight * volume[cz, cy, cx]
    return result


def naive_core(value, shapes, locations, weights):
    """Loop over batch, queries, heads, levels and points; hand-written trilinear sampling."""
    n, _, n_heads, head_dim = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    out = torch.zeros(n, lq, n_heads, head_dim, dtype=value.dtype)
    start = 0
    for lvl, (d, h, w) in enumerate(shapes):
        level = value[:, start:start + d * h * w].reshape(n, d, h, w, n_heads, head_dim)
        start += d * h * w
        for b in range(n):
            for q in range(lq):
                for m in range(n_heads):
                    for p in range(n_points):
                        x, y, z = locations[b, q, m, lvl, p].tolist()
                        sample = naive_trilinear(level[b, :, :, :, m], x, y, z)
                        out[b, q, m] += weights[b, q, m, lvl, p] * sample
    return out.reshape(n, lq, n_heads * head_dim)


def probe_attention(axis_order: str, shape, offset=(0.0, 0.0, 0.0)) -> MultiScaleDeformableAttention3D:
    """One level, one head, one point, d_model 3, identity projections, fixed offset (voxels).

    With a value whose channels are the d, h and w voxel index, the output is the continuous
    voxel position that was sampled - the attention's geometry made observable.
    """
    attn = MultiScaleDeformableAttention3D(d_model=3, n_levels=1, n_heads=1, n_points=1,
                                           axis_order=axis_order).double()
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(3))
            proj.bias.zero_()
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor(offset))
    return attn


def index_ramps(shape) -> torch.Tensor:
    """(1, S, 3) tokens whose channels are the d, h, w index of the voxel (W fastest)."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], -1)[None]


def run_probe(attn, shape, reference_points):
    tokens = index_ramps(shape)
    shapes = torch.tensor([shape])
    return attn(tokens.new_zeros(1, reference_points.shape[1], 3), reference_points, tokens, shapes,
                level_start_index(shapes))


def random_inputs(shapes, n=2, lq=5, d_model=12, n_levels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(d * h * w for d, h, w in shapes)
    query = torch.randn(n, lq, d_model, generator=g)
    src = torch.randn(n, s, d_model, generator=g)
    ref = torch.rand(n, lq, n_levels, 3, generator=g)
    return query, ref, src, torch.tensor(shapes)


# ---------------------------------------------------------------------------------------------
# core
# ---------------------------------------------------------------------------------------------
def test_core_matches_naive_trilinear_reference():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 5), (2, 3, 2)]
    n, lq, n_heads, head_dim, n_points = 2, 4, 2, 3, 3
    s = sum(d * h * w for d, h, w in shapes)
    value = torch.randn(n, s, n_heads, head_dim, generator=g, dtype=torch.float64)
    # some locations fall outside [0, 1]: they must read (partly) zeros
    locations = torch.rand(n, lq, n_heads, len(shapes), n_points, 3, generator=g, dtype=torch.float64)
    locations = locations * 1.4 - 0.2
    assert ((locations < 0) | (locations > 1)).any()
    weights = torch.rand(n, lq, n_heads, len(shapes) * n_points, generator=g, dtype=torch.float64).softmax(-1)
    weights = weights.view(n, lq, n_heads, len(shapes), n_points)

    out = ms_deform_attn_core(value, torch.tensor(shapes), locations, weights)

    assert out.shape == (n, lq, n_heads * head_dim)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_core(value, shapes, locations, weights), atol=1e-5, rtol=0)


def test_core_rejects_inconsistent_shapes():
    value = torch.zeros(1, 10, 1, 2)
    with pytest.raises(ValueError, match="tokens"):
        ms_deform_attn_core(value, torch.tensor([[2, 2, 2]]), torch.zeros(1, 1, 1, 1, 1, 3),
                            torch.ones(1, 1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# module: shapes, gradients, validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis_order", AXIS_ORDERS)
def test_module_output_shape_odd_anisotropic_levels(axis_order):
    attn = MultiScaleDeformableAttention3D(d_model=12, n_levels=2, n_heads=3, n_points=2,
                                           axis_order=axis_order)
    query, ref, src, shapes = random_inputs(ANISO_SHAPES)
    out = attn(query, ref, src, shapes, level_start_index(shapes))
    assert out.shape == query.shape
    assert torch.isfinite(out).all()


def test_gradients_reach_all_projections():
    attn = MultiScaleDeformableAttention3D(d_model=12, n_levels=2, n_heads=3, n_points=2)
    assert attn.sampling_offsets.weight.abs().sum() == 0  # zero init: the grad must still flow
    query, ref, src, shapes = random_inputs(ANISO_SHAPES)
    out = attn(query, ref, src, shapes)
    (out * torch.randn_like(out)).sum().backward()
    for layer in (attn.sampling_offsets, attn.attention_weights, attn.value_proj, attn.output_proj):
        assert layer.weight.grad is not None
        assert layer.weight.grad.abs().sum() > 0


def test_init_spreads_points_per_head():
    """Deformable-DETR init: offsets weight 0, bias = head direction * point index (1..P)."""
    attn = MultiScaleDeformableAttention3D(d_model=12, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 3)
    torch.testing.assert_close(bias[:, :, 2], 3 * bias[:, :, 0])
    torch.testing.assert_close(bias[:, 0], bias[:, 1])  # same on every level
    assert torch.allclose(bias[:, 0, 0].abs().amax(-1), torch.ones(4))  # on the unit cube
    assert len({tuple(v.tolist()) for v in bias[:, 0, 0]}) == 4  # a different direction per head
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


def test_invalid_configuration_errors_name_the_values():
    with pytest.raises(ValueError, match=r"'dhw'.*corrected.*official|corrected.*official.*'dhw'"):
        MultiScaleDeformableAttention3D(d_model=12, n_heads=3, axis_order="dhw")
    with pytest.raises(ValueError, match="'xyz'"):
        get_reference_points([(2, 2, 2)], torch.ones(1, 1, 3), axis_order="xyz")
    with pytest.raises(ValueError, match="'zyx'"):
        DeformableEncoder(d_model=12, d_ffn=8, n_levels=1, n_heads=2, num_layers=1, axis_order="zyx")
    with pytest.raises(ValueError, match=r"d_model \(10\).*n_heads \(4\)"):
        MultiScaleDeformableAttention3D(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="'swish'"):
        DeformableTransformerEncoderLayer(d_model=12, n_heads=3, activation="swish")


# ---------------------------------------------------------------------------------------------
# module: axis semantics
# ---------------------------------------------------------------------------------------------
def test_corrected_samples_reference_and_offsets_in_dhw():
    """corrected: reference (d, h, w) in [0, 1] and offsets in voxels of (D, H, W).

    The value channels are ramps along D, H and W; the output is therefore the sampled
    continuous voxel position, which must be ``ref * size - 0.5 + offset`` per axis.
    """
    shape = (4, 7, 5)
    offset = (0.5, -1.25, 0.75)
    ref = torch.tensor([[0.3, 0.55, 0.6], [0.5, 0.25, 0.45], [0.7, 0.6, 0.35]], dtype=torch.float64)
    out = run_probe(probe_attention("corrected", shape, offset), shape, ref[None, :, None])[0]
    expected = ref * torch.tensor(shape) - 0.5 + torch.tensor(offset)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_official_axis_quirk_is_reproduced():
    """official (CoTr/TransDoDNet code): reference points are stacked (d, w, h), offsets are
    divided by (D, W, H), and grid_sample reads components as (x, y, z) = (W, H, D).

    So component 0 (normalised by D) moves along W, component 1 (by W) along H and component 2
    (by H) along D: for reference (a, b, c) and voxel offsets (o0, o1, o2) the sampled position
    is D-axis ``(c + o2/H)*D - .5``, H-axis ``(b + o1/W)*H - .5``, W-axis ``(a + o0/D)*W - .5``.
    """
    shape = (4, 7, 5)
    depth, height, width = shape
    offset = (0.5, -1.25, 0.75)
    # chosen so that every sampled position stays inside the volume (no zero padding involved)
    ref = torch.tensor([[0.3, 0.55, 0.6], [0.5, 0.45, 0.25], [0.7, 0.6, 0.35]], dtype=torch.float64)
    out = run_probe(probe_attention("official", shape, offset), shape, ref[None, :, None])[0]
    a, b, c = ref.unbind(-1)
    o0, o1, o2 = offset
    expected = torch.stack([(c + o2 / height) * depth - 0.5, (b + o1 / width) * height - 0.5,
                            (a + o0 / depth) * width - 0.5], -1)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_encoder_reference_points_sample_own_voxel_only_when_corrected():
    """Zero offsets + encoder reference points: corrected returns every token's own voxel; the
    official ordering returns voxel (h, w, d) on a cube and something else on anisotropic maps."""
    aniso, cube = (3, 7, 5), (4, 4, 4)
    for shape in (aniso, cube):
        ref = get_reference_points([shape], torch.ones(1, 1, 3), axis_order="corrected")
        out = run_probe(probe_attention("corrected", shape), shape, ref)
        torch.testing.assert_close(out, index_ramps(shape), atol=1e-5, rtol=0)  # float32 refs

    ref = get_reference_points([cube], torch.ones(1, 1, 3), axis_order="official")
    out = run_probe(probe_attention("official", cube), cube, ref)
    own = index_ramps(cube)
    torch.testing.assert_close(out, own[..., [1, 2, 0]], atol=1e-5, rtol=0)  # (d,h,w) reads (h,w,d)

    ref = get_reference_points([aniso], torch.ones(1, 1, 3), axis_order="official")
    out = run_probe(probe_attention("official", aniso), aniso, ref)
    assert (out - index_ramps(aniso)).abs().max() > 0.5


def test_official_and_corrected_differ_on_anisotropic_input():
    torch.manual_seed(0)
    corrected = MultiScaleDeformableAttention3D(d_model=12, n_levels=2, n_heads=3, n_points=2)
    official = MultiScaleDeformableAttention3D(d_model=12, n_levels=2, n_heads=3, n_points=2,
                                               axis_order="official")
    official.load_state_dict(corrected.state_dict())
    query, _, src, shapes = random_inputs(ANISO_SHAPES)
    valid = torch.ones(2, 2, 3)
    lq = 100  # tokens of the (3, 7, 5) level
    out_c = corrected(query[:, :1].expand(-1, lq, -1), get_reference_points(shapes, valid)[:, :lq],
                      src, shapes)
    out_o = official(query[:, :1].expand(-1, lq, -1),
                     get_reference_points(shapes, valid, axis_order="official")[:, :lq], src, shapes)
    assert (out_c - out_o).abs().max() > 1e-2


def test_reference_points_are_voxel_centres_scaled_by_valid_ratios():
    shapes = [(2, 3, 4), (1, 2, 2)]
    ref = get_reference_points(shapes, torch.ones(1, 2, 3))
    assert ref.shape == (1, 2 * 3 * 4 + 1 * 2 * 2, 2, 3)
    # token 5 of level 0 = voxel (d, h, w) = (0, 1, 1) with W fastest
    torch.testing.assert_close(ref[0, 5, 0], torch.tensor([0.5 / 2, 1.5 / 3, 1.5 / 4]))
    torch.testing.assert_close(ref[0, :, 0], ref[0, :, 1])  # same relative position on all levels
    official = get_reference_points(shapes, torch.ones(1, 2, 3), axis_order="official")
    torch.testing.assert_close(official, ref[..., [0, 2, 1]])
    # padded level: normalised by the valid extent of its own level, rescaled per level
    valid = torch.tensor([[[1.0, 1.0, 0.5], [1.0, 0.5, 1.0]]])
    scaled = get_reference_points(shapes, valid)
    # (0.5/2, 1.5/3, 1.5/(0.5*4)) on its own valid extent, times each level's valid ratios
    torch.testing.assert_close(scaled[0, 5, 0], torch.tensor([0.25, 0.5, 0.375]))
    torch.testing.assert_close(scaled[0, 5, 1], torch.tensor([0.25, 0.25, 0.75]))


# ---------------------------------------------------------------------------------------------
# module: padding mask, mixed precision
# ---------------------------------------------------------------------------------------------
def test_padding_mask_removes_masked_values():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention3D(d_model=12, n_levels=2, n_heads=3, n_points=2)
    with torch.no_grad():
        attn.value_proj.bias.normal_()  # a masked token must not even contribute its bias
        attn.output_proj.bias.normal_()
    query, ref, src, shapes = random_inputs(ANISO_SHAPES)
    mask = torch.zeros(src.shape[:2], dtype=torch.bool)
    mask[:, ::3] = True
    out = attn(query, ref, src, shapes, input_padding_mask=mask)
    perturbed = src.masked_fill(mask[..., None], 100.0)
    torch.testing.assert_close(attn(query, ref, perturbed, shapes, input_padding_mask=mask), out)
    assert (attn(query, ref, perturbed, shapes) - out).abs().max() > 1.0  # without the mask it matters
    everything = torch.ones_like(mask)
    only_bias = attn(query, ref, src, shapes, input_padding_mask=everything)
    torch.testing.assert_close(only_bias, attn.output_proj.bias.expand_as(only_bias).detach())


def test_autocast_bf16_cpu_runs_and_stays_close():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention3D(d_model=12, n_levels=2, n_heads=3, n_points=2)
    query, ref, src, shapes = random_inputs(ANISO_SHAPES)
    reference = attn(query, ref, src, shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref, src, shapes)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()

    encoder = DeformableEncoder(d_model=12, d_ffn=16, dropout=0.0, n_levels=2, n_heads=3, num_layers=1)
    feats = [torch.randn(1, 12, *s) for s in ANISO_SHAPES]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = encoder(feats)
    assert all(torch.isfinite(o).all() for o in outs)
    # a model cast to bf16 (no autocast) must run too: float32 positions may not leak into it
    outs = encoder.to(torch.bfloat16)([f.to(torch.bfloat16) for f in feats])
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in outs)


# ---------------------------------------------------------------------------------------------
# positional encoding
# ---------------------------------------------------------------------------------------------
def test_position_embedding_shape_channel_order_and_values():
    feats, shape = 8, (2, 3, 4, 5)
    pe = PositionEmbeddingSine3D(num_pos_feats=feats)
    pos = pe(shape)
    assert pos.shape == (2, 3 * feats, 3, 4, 5)
    torch.testing.assert_close(pos, pe(torch.zeros(shape, dtype=torch.bool)))  # shape == empty mask
    torch.testing.assert_close(pos, pe(shape))  # deterministic
    # block k depends only on axis k: d, then h, then w (CoTr's cat(pos_d, pos_y, pos_x))
    for block, axis in enumerate((2, 3, 4)):
        part = pos[:, block * feats:(block + 1) * feats]
        others = [a for a in (2, 3, 4) if a != axis]
        assert torch.equal(part, part.narrow(others[0], 0, 1).narrow(others[1], 0, 1).expand_as(part))
        assert not torch.equal(part, part.narrow(axis, 0, 1).expand_as(part))
    # exact values along h (size 4): e = (i + 1 - 0.5) / (4 + 1e-6) * 2pi, channel c uses
    # sin (even c) / cos (odd c) of e / 10000**(3*(c//3)/feats)
    e = (torch.arange(4, dtype=torch.float32) + 0.5) / (4 + 1e-6) * 2 * math.pi
    h_block = pos[0, feats:2 * feats, 0, :, 0]  # (feats, H)
    for c in range(feats):
        freq = 10000 ** (3 * (c // 3) / feats)
        expected = torch.sin(e / freq) if c % 2 == 0 else torch.cos(e / freq)
        torch.testing.assert_close(h_block[c], expected)


def test_position_embedding_offset_and_padding():
    no_offset = PositionEmbeddingSine3D(num_pos_feats=4, offset=0.0)((1, 1, 1, 3))
    e = torch.arange(1, 4, dtype=torch.float32) / (3 + 1e-6) * 2 * math.pi  # TransDoDNet variant
    torch.testing.assert_close(no_offset[0, 8, 0, 0], torch.sin(e))
    mask = torch.zeros(1, 2, 2, 4, dtype=torch.bool)
    mask[..., 2:] = True  # padded W: positions normalised by the 2 valid voxels
    padded = PositionEmbeddingSine3D(num_pos_feats=4)(mask)
    torch.testing.assert_close(padded[..., :2], PositionEmbeddingSine3D(num_pos_feats=4)((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="7"):
        PositionEmbeddingSine3D(num_pos_feats=7)


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis_order", AXIS_ORDERS)
def test_encoder_round_trip_cotr_scaled_down(axis_order):
    torch.manual_seed(0)
    encoder = DeformableEncoder(d_model=48, d_ffn=96, dropout=0.1, activation="gelu", n_levels=2,
                                n_heads=6, n_points=4, num_layers=2, axis_order=axis_order)
    feats = [torch.randn(2, 48, 3, 6, 5), torch.randn(2, 48, 2, 3, 3)]
    outs = encoder(feats)
    assert [o.shape for o in outs] == [f.shape for f in feats]
    encoded = encoder.encode(feats)
    assert encoded.memory.shape == (2, 90 + 18, 48)
    assert encoded.level_start_index.tolist() == [0, 90]
    assert encoded.padding_mask is None
    # random weights: a plain sum of LayerNorm outputs has zero gradient w.r.t. its input
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for layer in encoder.layers:
        assert layer.self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    # at init the query (hence position + level embedding) only reaches the output through the
    # zero-initialised offset/weight projections; once those are non-zero it gets gradient
    with torch.no_grad():
        for layer in encoder.layers:
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    encoder.zero_grad()
    sum((o * torch.randn_like(o)).sum() for o in encoder(feats)).backward()
    assert encoder.level_embed.grad.abs().sum() > 0


def test_split_levels_inverts_flattening():
    feats = [torch.randn(2, 4, 3, 7, 5), torch.randn(2, 4, 2, 4, 3)]
    flat = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
    for a, b in zip(split_levels(flat, [f.shape[2:] for f in feats]), feats):
        assert torch.equal(a, b)


def test_encoder_with_padding_masks_ignores_padded_content():
    torch.manual_seed(0)
    encoder = DeformableEncoder(d_model=12, d_ffn=16, dropout=0.0, n_levels=2, n_heads=3, num_layers=1).eval()
    feats = [torch.randn(1, 12, 3, 7, 5), torch.randn(1, 12, 2, 4, 3)]
    masks = [torch.zeros(1, *f.shape[2:], dtype=torch.bool) for f in feats]
    masks[0][..., 4:] = True
    masks[1][..., 2:] = True
    out = encoder(feats, masks)
    changed = [f.masked_fill(m[:, None], 50.0) for f, m in zip(feats, masks)]
    out_changed = encoder(changed, masks)
    for o, oc, m in zip(out, out_changed, masks):
        torch.testing.assert_close(o.masked_select(~m[:, None]), oc.masked_select(~m[:, None]))


def test_cotr_detrans_parameter_count():
    """CoTr's DeTrans: d_model 384, 6 heads, 4 points, 2 levels, FFN 1536, 6 layers (9.32 M)."""
    encoder = DeformableEncoder(d_model=384, d_ffn=1536, dropout=0.1, activation="gelu", n_levels=2,
                                n_heads=6, n_points=4, num_layers=6)
    d, heads, levels, points, ffn = 384, 6, 2, 4, 1536
    attention = (d * heads * levels * points * 3 + heads * levels * points * 3
                 + d * heads * levels * points + heads * levels * points + 2 * (d * d + d))
    per_layer = attention + (d * ffn + ffn) + (ffn * d + d) + 2 * (2 * d)
    expected = 6 * per_layer + levels * d
    count = sum(p.numel() for p in encoder.parameters())
    assert count == expected == 9_316_992
    assert abs(count - 9.32e6) / 9.32e6 < 0.01
