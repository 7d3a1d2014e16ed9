"""Shared network blocks (architectures/blocks): the stride/topology rules every network takes its
strides from, the weight-standardised conv of CoTr and DoDNet, the V-Net encoder/decoder of MC-Net+
and LeFeD (with their checkpoint names), and the deformable encoder layer's residual scale."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.architectures.blocks.deformable_attention import (DeformableTransformerEncoderLayer,
                                                                  MultiScaleDeformableAttention3D)
from nnunet_ext.architectures.blocks.topology import (as_strides, bottleneck_size, cumulative_strides,
                                                      divisibility_problem, downsampling_strides, leading_strides,
                                                      require_full_resolution_first, stage_sizes, strided_stages,
                                                      total_stride)
from nnunet_ext.architectures.blocks.vnet import VNetDecoder, VNetEncoder
from nnunet_ext.architectures.blocks.ws_conv import WSConv3d

NNUNET_BCV = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]  # nnU-Net's 6-stage BCV plan
SHALLOW = [[1, 1, 1], [2, 2, 2], [1, 2, 2]]


# --- topology -------------------------------------------------------------------------------------

def test_strides_and_sizes():
    assert as_strides([1, 2, [1, 2, 2]]) == [[1, 1, 1], [2, 2, 2], [1, 2, 2]]
    assert as_strides([1, 2], dim=2) == [[1, 1], [2, 2]] and as_strides([[1, 1], 2]) == [[1, 1], [2, 2]]
    assert total_stride(NNUNET_BCV) == (8, 32, 32) and total_stride([2, 2]) == (4, 4, 4)
    assert cumulative_strides(NNUNET_BCV[:3]) == [(1, 1, 1), (1, 2, 2), (2, 4, 4)] and cumulative_strides([]) == []
    assert stage_sizes((9, 20, 20), SHALLOW) == [[9, 20, 20], [9, 20, 20], [4, 10, 10], [4, 5, 5]]
    assert bottleneck_size((16, 64, 64), NNUNET_BCV) == (2, 2, 2)


def test_indivisible_sizes_are_refused_with_the_nearest_valid_ones():
    assert divisibility_problem((8, 64, 64), NNUNET_BCV) is None
    assert divisibility_problem((12, 64, 40), NNUNET_BCV) == (
        "not divisible by the cumulative stride (8, 32, 32) of strides [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], "
        "[2, 2, 2], [1, 2, 2]]: every axis must be a multiple of (8, 32, 32) (minimum (8, 32, 32); nearest valid "
        "sizes (8, 64, 32) or (16, 64, 64))")
    with pytest.raises(ValueError, match=r"^a patch \[12, 64, 40\] is not divisible"):
        bottleneck_size([12, 64, 40], NNUNET_BCV, "a patch")
    with pytest.raises(ValueError, match="not 2D like the strides"):
        bottleneck_size([16, 64, 64], [[1, 1], [2, 2]])


def test_the_rules_take_the_paper_depth_from_any_plan():
    # DoDNet: the first five stage strides, stem included
    assert leading_strides(NNUNET_BCV, 5) == NNUNET_BCV[:5]
    assert leading_strides(SHALLOW, 5) == SHALLOW + [[1, 1, 1]] * 2
    # TransDoDNet (padded), MC-Net+ (not padded), LeFeD (padded, any dimension): the steps after the first stage
    assert downsampling_strides(NNUNET_BCV, 5) == NNUNET_BCV[1:]
    assert downsampling_strides(SHALLOW, 4) == SHALLOW[1:] + [[1, 1, 1]] * 2
    assert downsampling_strides(SHALLOW, 4, pad=False) == SHALLOW[1:]
    assert downsampling_strides([1, 2, 2], 3, dim=2) == [[2, 2], [2, 2], [1, 1]]
    with pytest.raises(ValueError, match="no downsampling after the first stage"):
        downsampling_strides([[1, 1, 1]], 4, pad=False)
    # CoTr: steps that do not downsample are left out; a shallow plan keeps a full-resolution stem
    assert strided_stages(NNUNET_BCV, 4) == NNUNET_BCV[1:5]
    assert strided_stages([[1, 1, 1], [2, 2, 2], [1, 1, 1], [1, 2, 2]], 4) == [[1, 1, 1], [2, 2, 2], [1, 2, 2],
                                                                              [1, 1, 1]]
    # every rule keeps nnU-Net's patch divisible
    for strides in (leading_strides(NNUNET_BCV, 5), downsampling_strides(NNUNET_BCV, 4), strided_stages(NNUNET_BCV, 4)):
        assert divisibility_problem((8, 64, 64), strides) is None


@pytest.mark.parametrize("plans", [[[2, 2, 2], [2, 2, 2]], []])
def test_plans_whose_first_stage_downsamples_are_refused(plans):
    with pytest.raises(ValueError, match="MyNet keeps its first stage at full resolution"):
        require_full_resolution_first(plans, "MyNet")
    require_full_resolution_first(SHALLOW, "MyNet")


# --- weight standardisation -----------------------------------------------------------------------

def test_weight_standardisation():
    torch.manual_seed(0)
    conv = WSConv3d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(7).add_(3)
    weight = conv.standardised_weight().flatten(1)
    torch.testing.assert_close(weight.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(weight.std(1), torch.ones(6), atol=1e-5, rtol=0)  # unbiased, as the official
    x = torch.randn(2, 4, 5, 5, 5)
    raw = conv.weight.flatten(1)
    expected = (raw - raw.mean(1, keepdim=True)) / raw.std(1, keepdim=True)
    torch.testing.assert_close(conv(x), F.conv3d(x, expected.view_as(conv.weight), padding=1), rtol=1e-4, atol=1e-4)
    before = conv(x)
    with torch.no_grad():  # a filter's scale and offset do not matter
        conv.weight.mul_(0.1).sub_(5)
    torch.testing.assert_close(conv(x), before, rtol=1e-3, atol=1e-3)


def test_float32_statistics_change_only_low_precision_weights():
    """CoTr standardises in float32, DoDNet in the weight's dtype: bit-identical for float32 and
    float64 weights (values, and gradients arriving contiguous), different for bf16 ones, where float32
    is the more precise."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        plain = WSConv3d(3, 5, 3, bias=False).to(dtype)
        promoted = WSConv3d(3, 5, 3, bias=False, float32_statistics=True).to(dtype)
        promoted.load_state_dict(plain.state_dict())
        a, b = plain.standardised_weight(), promoted.standardised_weight()
        gradient = torch.randn_like(a)
        a.backward(gradient)
        b.backward(gradient)
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
        assert torch.equal(plain.weight.grad, promoted.weight.grad)
    plain = WSConv3d(16, 32, 3, bias=False)
    with torch.no_grad():
        plain.weight.add_(3)  # an offset the standardisation removes: bf16 arithmetic loses precision there
    promoted = WSConv3d(16, 32, 3, bias=False, float32_statistics=True)
    promoted.load_state_dict(plain.state_dict())
    plain, promoted = plain.to(torch.bfloat16), promoted.to(torch.bfloat16)
    reference = WSConv3d(16, 32, 3, bias=False).double()
    reference.load_state_dict(plain.state_dict())  # the same bf16 values, standardised in float64
    exact = reference.standardised_weight()
    low, high = plain.standardised_weight(), promoted.standardised_weight()
    assert low.dtype == high.dtype == torch.bfloat16
    assert (high.double() - exact).abs().max() < 0.01 < (low.double() - exact).abs().max()


# --- V-Net ------------------------------------------------------------------------------------------

def test_vnet_encoder_and_decoder_shapes_feedback_gates_and_checkpoint_names():
    torch.manual_seed(0)
    widths, convs, strides = [4, 8, 16], [1, 2, 3], [[1, 2, 2], [2, 2, 2]]
    encoder = VNetEncoder(2, widths, convs, strides, dropout_p=0.5).eval()
    x = torch.randn(2, 2, 4, 8, 8)
    skips = encoder(x)
    assert [tuple(s.shape) for s in skips] == [(2, 4, 4, 8, 8), (2, 8, 4, 4, 4), (2, 16, 2, 2, 2)]
    feedback = [torch.zeros_like(s) for s in skips]
    feedback[0] += 1.0
    assert all(torch.equal(a, b) for a, b in zip(encoder(x, [torch.zeros_like(s) for s in skips]), skips))
    assert not torch.equal(encoder(x, feedback)[-1], skips[-1])  # feedback enters every later stage
    with pytest.raises(ValueError, match="feedback needs 3 tensors"):
        encoder(x, feedback[:2])
    decoder = VNetDecoder(3, widths, convs, strides, "linear", dropout_p=0.5).eval()
    logits, features = decoder(skips)
    assert logits.shape == (2, 3, 4, 8, 8)
    assert [tuple(f.shape) for f in features] == [(2, 4, 4, 8, 8), (2, 8, 4, 4, 4), (2, 16, 2, 2, 2)]
    assert features[-1] is skips[-1]
    ones = [torch.ones_like(s) for s in skips]  # gates of one: the bottleneck doubles, the skips stay
    doubled = skips[:-1] + [2 * skips[-1]]
    torch.testing.assert_close(decoder(skips, ones)[0], decoder(doubled)[0], rtol=0, atol=0)
    # the state-dict names MC-Net+ and LeFeD checkpoints were saved with
    assert "downsamplings.0.0.weight" in encoder.state_dict()

    class DownsNamed(VNetEncoder):
        downsampling_name = "downs"

    assert "downs.0.0.weight" in DownsNamed(2, widths, convs, strides, 0.5).state_dict()


def test_vnet_blocks_follow_the_stride_dimension():
    encoder = VNetEncoder(1, [4, 8], [1, 1], [[2, 2]], dropout_p=0.0)
    decoder = VNetDecoder(2, [4, 8], [1, 1], [[2, 2]], "nearest", dropout_p=0.0)
    logits, _ = decoder(encoder(torch.randn(1, 1, 8, 8)))
    assert logits.shape == (1, 2, 8, 8) and isinstance(encoder.dropout, torch.nn.Identity)


# --- deformable attention -------------------------------------------------------------------------------

def test_encoder_layer_residual_scale():
    torch.manual_seed(0)
    layer = DeformableTransformerEncoderLayer(12, 16, 0.0, "relu", n_levels=1, n_heads=2, n_points=2).eval()
    scaled = DeformableTransformerEncoderLayer(12, 16, 0.0, "relu", n_levels=1, n_heads=2, n_points=2,
                                               res_scale=1.5).eval()
    scaled.load_state_dict(layer.state_dict())
    src, pos = torch.randn(1, 8, 12), torch.randn(1, 8, 12)
    reference = torch.rand(1, 8, 1, 3)
    plain = layer(src, pos, reference, [(2, 2, 2)])
    by_hand = layer.norm1(src * 1.5 + layer.self_attn(src + pos, reference, src, [(2, 2, 2)]))
    by_hand = layer.norm2(by_hand * 1.5 + layer.linear2(F.relu(layer.linear1(by_hand))))
    torch.testing.assert_close(scaled(src, pos, reference, [(2, 2, 2)]), by_hand)
    assert not torch.allclose(plain, by_hand)


def test_sampling_direction_hook_sets_the_initial_offsets():
    class Axial(MultiScaleDeformableAttention3D):
        @staticmethod
        def _sampling_directions(thetas):
            return torch.stack([torch.ones_like(thetas), torch.zeros_like(thetas), torch.zeros_like(thetas)], -1)

    attention = Axial(12, n_levels=1, n_heads=2, n_points=2)
    assert attention.sampling_offsets.bias.view(2, 1, 2, 3).tolist() == [[[[1, 0, 0], [2, 0, 0]]]] * 2
