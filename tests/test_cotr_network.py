"""Tests of the CoTr network (architectures/cotr.py).

Forward passes use a tiny configuration (widths 8/16/24/24, d_model 24, 4 heads, 1 layer) on
small patches; the paper configuration (48x192x192) is only built, for its parameter count.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from nnunet_ext.architectures.blocks import AXIS_ORDERS
from nnunet_ext.architectures.blocks.ws_conv import WSConv3d
from nnunet_ext.architectures.cotr import CoTr, paper_cotr

SMALL = dict(features=(8, 16, 24, 24), d_model=24, n_heads=4, n_layers=1, d_ffn=48)
DEFAULT_STRIDES = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))  # cumulative (8, 16, 16)


def small(input_channels=1, num_classes=2, patch_size=(8, 32, 32), **kwargs) -> CoTr:
    return CoTr(input_channels=input_channels, num_classes=num_classes, patch_size=patch_size,
                **{**SMALL, **kwargs})


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_net() -> CoTr:
    """Built once (about 42 M parameters to initialise); never run forward."""
    return paper_cotr()


def expected_shape(batch, classes, size, scale):
    return (batch, classes, *(int(round(s * f)) for s, f in zip(size, scale)))


# ---------------------------------------------------------------------------------------------
# shapes and deep supervision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, strides, channels, classes", [
    # default strides, cumulative (8, 16, 16): 16 = 2*8, 64 = 4*16, 48 = 3*16
    ((16, 64, 48), DEFAULT_STRIDES, 1, 2),
    # cumulative (4, 16, 16): 40 = 10*4, 112 = 7*16, 96 = 6*16 (odd multiple in y)
    ((40, 112, 96), ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)), 3, 5),
    # cumulative (4, 16, 16), thin z, all odd multiples: 12 = 3*4, 48 = 3*16, 80 = 5*16
    ((12, 48, 80), ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)), 1, 5),
    # stem stride (1, 1, 1): the final upsample is a no-op; cumulative (4, 8, 8)
    ((8, 24, 40), ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)), 3, 2),
])
def test_deep_supervision_shapes_follow_the_scales(patch, strides, channels, classes):
    net = small(channels, classes, patch, strides=strides, deep_supervision=True)
    scales = net.deep_supervision_scales()
    assert len(scales) == len(strides)  # full result + one head per decoder stage
    out = net(torch.randn(1, channels, *patch))
    assert isinstance(out, list) and len(out) == len(scales)
    for o, scale in zip(out, scales):
        assert tuple(o.shape) == expected_shape(1, classes, patch, scale)
    assert tuple(out[0].shape) == (1, classes, *patch)


def test_deep_supervision_scales_are_the_official_ones_for_the_paper_strides(paper_net):
    net = paper_net
    assert net.deep_supervision_scales() == [[1, 1, 1], [1, .5, .5], [.5, .25, .25], [.25, .125, .125]]
    assert net.decoder.deep_supervision is True


def test_without_deep_supervision_a_single_tensor_equal_to_the_full_resolution_output():
    torch.manual_seed(0)
    net = small(3, 5, (16, 64, 48), deep_supervision=True).eval()
    x = torch.randn(2, 3, 16, 64, 48)
    with torch.no_grad():
        outputs = net(x)
        net.decoder.deep_supervision = False  # what nnU-Net does for inference
        single = net(x)
    assert isinstance(single, torch.Tensor)
    assert single.shape == (2, 5, 16, 64, 48)
    torch.testing.assert_close(single, outputs[0])
    assert isinstance(small(deep_supervision=False)(torch.randn(1, 1, 8, 32, 32)), torch.Tensor)


def test_decoder_wiring_transformer_tokens_then_cnn_skips():
    """Stage k input = upconv_k(previous) + skip_k: transformer level 0, then layer1, then the stem."""
    torch.manual_seed(0)
    net = small(deep_supervision=True).eval()
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0] if isinstance(inputs[0], torch.Tensor) else list(inputs[0]), output)
        return hook

    net.encoder.register_forward_hook(keep("encoder"))
    net.transformer.register_forward_hook(keep("transformer"))
    for i, (up, stage) in enumerate(zip(net.decoder.upconvs, net.decoder.stages)):
        up.register_forward_hook(keep(f"up{i}"))
        stage.register_forward_hook(keep(f"stage{i}"))
    with torch.no_grad():
        net(torch.randn(1, 1, 8, 32, 32))
    levels = seen["encoder"][1]
    transformer_in, tokens = seen["transformer"]
    assert all(a is b for a, b in zip(transformer_in, levels[-2:]))  # last two CNN levels
    assert seen["up0"][0] is tokens[1]  # the deepest tokens are up-convolved first
    skips = [tokens[0], levels[1], levels[0]]
    for i, skip in enumerate(skips):
        torch.testing.assert_close(seen[f"stage{i}"][0], seen[f"up{i}"][1] + skip)
        if i > 0:
            assert seen[f"up{i}"][0] is seen[f"stage{i - 1}"][1]


def test_inputs_other_than_the_patch_size_work_if_divisible():
    net = small(patch_size=(16, 64, 48), deep_supervision=True)
    out = net(torch.randn(1, 1, 8, 48, 32))
    assert [tuple(o.shape[2:]) for o in out] == [(8, 48, 32), (8, 24, 16), (4, 12, 8), (2, 6, 4)]
    with pytest.raises(ValueError, match=r"\(8, 40, 32\).*\(8, 16, 16\)"):
        net(torch.randn(1, 1, 8, 40, 32))


def test_more_encoder_layers_are_supported():
    # stem + 4 residual layers, cumulative (8, 16, 16); deepest level 2x2x2
    net = CoTr(1, 2, (16, 32, 32), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
               features=(8, 8, 16, 24, 24), blocks_per_layer=(1, 1, 1, 1), d_model=24, n_heads=4,
               n_layers=1, d_ffn=48, deep_supervision=True)
    out = net(torch.randn(1, 1, 16, 32, 32))
    assert len(out) == 5
    for o, scale in zip(out, net.deep_supervision_scales()):
        assert tuple(o.shape) == expected_shape(1, 2, (16, 32, 32), scale)


# ---------------------------------------------------------------------------------------------
# gradients, precision, variants
# ---------------------------------------------------------------------------------------------
def test_gradient_reaches_deformable_offsets_attention_weights_and_stem():
    torch.manual_seed(0)
    net = small(deep_supervision=True)
    attn = net.transformer.layers[0].self_attn
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0  # zero-initialised
    out = net(torch.randn(2, 1, 8, 32, 32))
    sum((o ** 2).mean() for o in out).backward()
    for param in (attn.sampling_offsets.weight, attn.sampling_offsets.bias, attn.attention_weights.weight,
                  attn.attention_weights.bias, net.encoder.stem[0].weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_is_finite(dtype):
    torch.manual_seed(0)
    net = small(deep_supervision=True)
    with torch.autocast("cpu", dtype=dtype):
        out = net(torch.randn(1, 1, 8, 32, 32))
    assert all(o.dtype == dtype and torch.isfinite(o).all() for o in out)
    sum(o.float().sum() for o in out).backward()
    assert torch.isfinite(net.transformer.layers[0].self_attn.sampling_offsets.weight.grad).all()


def test_both_axis_orders_run_and_differ():
    torch.manual_seed(0)
    nets = {order: small(axis_order=order).eval() for order in AXIS_ORDERS}
    nets["official"].load_state_dict(nets["corrected"].state_dict())
    x = torch.randn(1, 1, 8, 32, 64)
    with torch.no_grad():
        outs = {order: net(x) for order, net in nets.items()}
    assert all(o.shape == (1, 2, 8, 32, 64) and torch.isfinite(o).all() for o in outs.values())
    assert not torch.allclose(outs["corrected"], outs["official"])  # same weights, other sampling


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_other_norms_run(norm):
    net = small(norm=norm, norm_groups=4, deep_supervision=True)
    kind = nn.BatchNorm3d if norm == "batch" else nn.GroupNorm
    assert any(isinstance(m, kind) for m in net.modules())
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in net.modules())
    out = net(torch.randn(2, 1, 8, 32, 32))
    assert torch.isfinite(out[0]).all()


def test_weight_standardisation_makes_output_invariant_to_filter_shifts():
    """Adding a constant to a filter changes nothing after standardisation (IN alone can't undo it)."""
    x = torch.randn(1, 1, 8, 32, 32)
    for weight_std in (True, False):
        torch.manual_seed(0)
        net = small(weight_std=weight_std).eval()
        convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and not isinstance(m, nn.ConvTranspose3d)]
        ws_convs = [m for m in convs if isinstance(m, WSConv3d)]
        # all encoder / decoder-block convs; not the 1x1 heads (as official)
        assert len(ws_convs) == (len(convs) - 4 if weight_std else 0)
        with torch.no_grad():
            before = net(x)
            net.encoder.stem[0].weight.add_(0.3)
            after = net(x)
        assert torch.allclose(before, after, atol=1e-4) == weight_std


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def test_unknown_axis_order_raises():
    with pytest.raises(ValueError, match="axis_order.*'diagonal'"):
        small(axis_order="diagonal")


def test_patch_size_not_divisible_by_the_strides_raises_naming_the_values():
    with pytest.raises(ValueError, match=r"\(12, 64, 40\).*\[1, 2, 2\].*multiple of \(8, 16, 16\)"):
        small(patch_size=(12, 64, 40))
    with pytest.raises(ValueError, match=r"multiple of \(4, 16, 16\)"):
        small(patch_size=(10, 32, 32), strides=((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(features=(8, 16, 24, 48)), "features\\[-1\\] == features\\[-2\\] == d_model"),
    (dict(strides=((1, 2, 2), (2, 2, 2), (2, 2, 2))), "one stride per entry"),
    (dict(norm="layer"), "norm must be one of"),
    (dict(norm="group"), "divisible by 16"),
    (dict(patch_size=(32, 32)), "patch_size"),
])
def test_inconsistent_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


# ---------------------------------------------------------------------------------------------
# paper configuration (built only, never run forward)
# ---------------------------------------------------------------------------------------------
def test_paper_parameter_count_and_split(paper_net):
    net = paper_net
    assert (net.input_channels, net.num_classes, net.patch_size) == (1, 14, (48, 192, 192))
    total = n_params(net)
    assert abs(total - 41_872_504) <= 0.01 * 41_872_504
    assert total == 41_872_504  # exact, see the module docstring
    assert n_params(net.encoder) == 20_500_800  # 20.50 M
    assert n_params(net.transformer) == 9_316_992  # 9.32 M
    assert n_params(net.decoder) == 12_054_712  # 12.05 M
    assert n_params(net.encoder) + n_params(net.transformer) + n_params(net.decoder) == total


def test_parameter_count_does_not_depend_on_norm_or_weight_std():
    counts = {n_params(small(features=(16, 16, 48, 48), d_model=48, norm=norm, weight_std=ws))
              for norm in ("instance", "batch", "syncbatch", "group") for ws in (False, True)}
    assert len(counts) == 1


def test_feature_map_size_estimate_scales_with_volume(paper_net):
    net = small(deep_supervision=True)
    base = net.compute_conv_feature_map_size((8, 32, 32))
    assert isinstance(base, int) and base > 0
    assert net.compute_conv_feature_map_size((16, 64, 64)) == 8 * base
    # larger than the full-resolution logits plus the stem output alone
    assert base > (2 + 8) * 8 * 32 * 32
    paper = paper_net.compute_conv_feature_map_size((48, 192, 192))
    assert paper > 64 * 48 * 96 * 96


# ---------------------------------------------------------------------------------------------
# nnU-Net integration
# ---------------------------------------------------------------------------------------------
def test_nnunet_builds_it_from_plans_and_initialises_convs_only():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = {"patch_size": [16, 64, 48], "strides": [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                   "features": [8, 16, 24, 24], "blocks_per_layer": [3, 3, 2], "norm": "instance",
                   "weight_std": False, "d_model": 24, "n_heads": 4, "n_layers": 1, "d_ffn": 48,
                   "dropout": 0.1, "n_points": 4, "axis_order": "corrected"}
    arch_kwargs = json.loads(json.dumps(arch_kwargs))  # what a plans file round trip gives
    torch.manual_seed(0)
    net = get_network_from_plans("nnunet_ext.architectures.cotr.CoTr", arch_kwargs, [], input_channels=2,
                                 output_channels=3, allow_init=True, deep_supervision=True)
    assert isinstance(net, CoTr) and net.decoder.deep_supervision is True
    out = net(torch.randn(1, 2, 16, 64, 48))
    assert [tuple(o.shape) for o in out] == [(1, 3, 16, 64, 48), (1, 3, 16, 32, 24), (1, 3, 8, 16, 12),
                                             (1, 3, 4, 8, 6)]

    # nnU-Net applied network.initialize = InitWeights_He(1e-2): kaiming normal with fan_in
    stem = net.encoder.stem[0].weight  # (8, 2, 7, 7, 7): fan_in 686, fan_out 2744
    assert stem.std().item() == pytest.approx(math.sqrt(2 / 686), rel=0.1)
    direct = CoTr(2, 3, (16, 64, 48), **SMALL).encoder.stem[0].weight  # official init: fan_out
    assert direct.std().item() == pytest.approx(math.sqrt(2 / 2744), rel=0.1)
    # ... and left the transformer's own init alone
    attn = net.transformer.layers[0].self_attn
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert attn.sampling_offsets.bias.abs().max() == attn.n_points  # the direction grid, 1..n_points

    net.decoder.deep_supervision = False
    assert net(torch.randn(1, 2, 16, 64, 48)).shape == (1, 3, 16, 64, 48)
