"""Default and official conventions: ``paper_network(name, conventions)`` for every registered network,
exact parameter counts per convention, the official parameter names and shapes of UniSeg and BA-Net
(tests/fixtures/official_keys, written down from the official code), strict loading of
official-format state dicts, and what exactly differs between the two conventions (ClassSAM: the
preprocessing only)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunet_ext import compat
from nnunet_ext.architectures import NETWORKS, paper_network
from nnunet_ext.architectures.banet import BANet
from nnunet_ext.architectures.blocks.deformable_attention import DeformableEncoder, MultiScaleDeformableAttention3D
from nnunet_ext.architectures.uniseg import UniSeg
from nnunet_ext.registry import CONVENTIONS, paper_networks
from small_networks import small_network

FIXTURES = Path(__file__).parent / "fixtures" / "official_keys"
OFFICIAL_FORMAT = {"UniSeg": "uniseg", "BANet": "banet"}  # network -> fixture of the official names


def on_meta(name: str, conventions: str) -> nn.Module:
    """The paper network without memory or init cost: counts, names and shapes need no values."""
    with torch.device("meta"):
        return paper_network(name, conventions)


def official_keys(name: str) -> dict:
    return json.loads((FIXTURES / f"{OFFICIAL_FORMAT[name]}.json").read_text())


# --- every registered network ----------------------------------------------------------------------

@pytest.mark.parametrize("conventions", CONVENTIONS)
@pytest.mark.parametrize("name", NETWORKS)
def test_exact_parameter_count_per_network_and_convention(name, conventions):
    entry, network = paper_networks()[name], on_meta(name, conventions)
    counted = sum(p.numel() for p in network.parameters())
    assert counted == (entry.parameters if conventions == "default" else entry.official_parameters)
    if entry.trainable_parameters is not None:
        assert sum(p.numel() for p in network.parameters() if p.requires_grad) == entry.trainable_parameters


@pytest.mark.parametrize("name", NETWORKS)
def test_official_convention_changes_only_what_the_registry_says(name):
    entry = paper_networks()[name]
    default, official = on_meta(name, "default"), on_meta(name, "official")
    same_shapes = ({k: v.shape for k, v in default.state_dict().items()}
                   == {k: v.shape for k, v in official.state_dict().items()})
    if not entry.official_kwargs:  # MC-Net+, LeFeD, DoDNet: ours is the official network
        assert same_shapes and type(default) is type(official)
    elif dict(entry.official_kwargs) == {"axis_order": "official"}:  # CoTr, TransDoDNet: sampling order only
        assert same_shapes
        for network, order in ((default, "corrected"), (official, "official")):
            modules = [m for m in network.modules() if isinstance(m, (MultiScaleDeformableAttention3D,
                                                                      DeformableEncoder))]
            assert modules and {m.axis_order for m in modules} == {order}
    else:  # UniSeg, BA-Net: kernels and biases; ClassSAM: the preprocessing only, the same layers
        assert dict(entry.official_kwargs) == {"conventions": "official"}
        assert (default.conventions, official.conventions) == ("default", "official")
        assert same_shapes == (name in SAME_LAYERS)


SAME_LAYERS = {"ClassSAM"}  # official conventions with the default's layers (another preprocessing)


def test_unknown_conventions_are_refused():
    with pytest.raises(ValueError, match=r"conventions must be one of \('default', 'official'\), got 'offical'"):
        paper_network("DoDNet", "offical")
    with pytest.raises(ValueError, match="conventions must be one of"):
        BANet(input_channels=1, num_classes=3, conventions="v1", **banet_kwargs())


# --- official names and shapes (UniSeg, BA-Net) ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OFFICIAL_FORMAT))
def test_official_names_and_shapes_match_the_official_code_one_to_one(name):
    fixture = official_keys(name)
    network = on_meta(name, "official")
    key_map = network.official_key_map()
    assert set(key_map) == set(network.state_dict())  # every key of ours has an official name ...
    assert set(key_map.values()) == set(fixture["keys"])  # ... and every official key is used
    shapes = {key: list(value.shape) for key, value in network.state_dict().items()}
    assert {key: fixture["keys"][official] for key, official in key_map.items()} == shapes
    assert sum(p.numel() for p in network.parameters()) == fixture["parameters"]


@pytest.mark.parametrize("name", sorted(OFFICIAL_FORMAT))
def test_an_official_format_state_dict_loads_strictly_and_round_trips(name):
    generator = torch.Generator().manual_seed(0)
    official = {key: torch.randn(shape, generator=generator) for key, shape in official_keys(name)["keys"].items()}
    network = on_meta(name, "official")
    network.load_state_dict(network.from_official_state_dict(official), strict=True, assign=True)
    back = network.official_state_dict()
    assert set(back) == set(official) and all(torch.equal(back[key], official[key]) for key in official)


@pytest.mark.parametrize("name", sorted(OFFICIAL_FORMAT))
def test_mismatching_official_state_dicts_are_refused_with_the_names(name):
    network = on_meta(name, "official")
    official = {key: torch.empty(shape, device="meta") for key, shape in official_keys(name)["keys"].items()}
    first, second = list(official)[:2]
    broken = dict(official, extra_head=torch.empty(1, device="meta"))
    del broken[first]
    broken[second] = torch.empty(3, 1, device="meta")
    with pytest.raises(ValueError) as error:
        network.from_official_state_dict(broken)
    message = str(error.value)
    assert f"missing: {first}" in message and "unexpected: extra_head" in message
    assert f"mis-shaped: {second} (3, 1)" in message


@pytest.mark.parametrize("name", sorted(OFFICIAL_FORMAT))
def test_the_default_convention_has_no_official_key_map(name):
    with pytest.raises(ValueError, match="conventions='official'"):
        on_meta(name, "default").official_key_map()


# --- UniSeg: small plans, real forward ---------------------------------------------------------------

UNISEG_SMALL = dict(n_stages=4, features_per_stage=[4, 8, 16, 16], conv_op=nn.Conv3d,
                    kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                    strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=2,
                    n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                    norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                    nonlin_kwargs={"negative_slope": 1e-2, "inplace": True})
UNISEG_PATCH = [8, 24, 16]


def small_uniseg(conventions: str, task_channels=(1, 4, 2), seed: int = 0) -> UniSeg:
    torch.manual_seed(seed)
    network = UniSeg(max(task_channels), num_classes=3, deep_supervision=True, patch_size=UNISEG_PATCH,
                     task_channels=list(task_channels), conventions=conventions, **UNISEG_SMALL)
    network.apply(UniSeg.initialize)
    return network


def test_uniseg_official_decoder_kernels_biases_and_input_convs():
    default, official = small_uniseg("default"), small_uniseg("official")
    kernels = [[tuple(b.conv.kernel_size) for b in stage.convs] for stage in official.decoder.stages]
    assert kernels == [[(3, 3, 3)] * 2] * 3  # v1: the last stage takes stage 1's kernel, not stage 0's (1, 3, 3)
    assert [tuple(b.conv.kernel_size) for b in default.decoder.stages[-1].convs] == [(1, 3, 3)] * 2
    for decoder, biased in ((default.decoder, True), (official.decoder, False)):
        assert all((m.bias is not None) == biased for m in [*decoder.transpconvs, *decoder.seg_layers])
    assert sorted(small_uniseg("official", task_channels=(1, 1)).input_convs) == ["1", "2", "4"]
    assert sorted(small_uniseg("default", task_channels=(1, 1)).input_convs) == ["1"]
    with pytest.raises(ValueError, match=r"input convs for \(1, 2, 4\) channels only"):
        small_uniseg("official", task_channels=(1, 3))


def test_uniseg_official_forward_shapes_and_official_weights_reproduce_the_outputs():
    source, target = small_uniseg("official", seed=0), small_uniseg("official", seed=1)
    target.load_state_dict(target.from_official_state_dict(source.official_state_dict()), strict=True)
    x = torch.randn(2, 4, *UNISEG_PATCH)
    spatial = [UNISEG_PATCH, [8, 12, 8], [4, 6, 4]]
    for task in range(3):
        source.set_task(task)
        target.set_task(task)
        outputs = source(x)
        assert [list(o.shape) for o in outputs] == [[2, 3, *s] for s in spatial]
        for a, b in zip(outputs, target(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- BA-Net: small plans, real forward --------------------------------------------------------------

def banet_kwargs(kernels=((3, 3, 3),) * 4) -> dict:
    return dict(n_stages=4, features_per_stage=[8, 16, 24, 32], conv_op=nn.Conv3d,
                kernel_sizes=[list(k) for k in kernels], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def small_banet(conventions: str, seed: int = 0, **overrides) -> BANet:
    torch.manual_seed(seed)
    network = BANet(input_channels=1, num_classes=3, deep_supervision=True, conventions=conventions,
                    **{**banet_kwargs(), **overrides})
    network.apply(BANet.initialize)
    return network


def test_banet_official_has_no_decoder_biases_and_v1_kernels_in_both_decoders():
    official = on_meta("BANet", "official")
    unbiased = [m for d in (official.decoder.segmentation, official.decoder.boundary)
                for m in [*d.transpconvs, *d.seg_layers]]
    assert len(unbiased) == 20 and all(m.bias is None for m in unbiased)
    anisotropic = banet_kwargs(((1, 3, 3),) + ((3, 3, 3),) * 3)["kernel_sizes"]
    for conventions, last in (("default", (1, 3, 3)), ("official", (3, 3, 3))):
        network = small_banet(conventions, kernel_sizes=anisotropic)
        for decoder in (network.decoder.segmentation, network.decoder.boundary):
            assert [tuple(b.conv.kernel_size) for b in decoder.stages[-1].convs] == [last] * 2


def test_banet_official_equals_default_with_zero_decoder_biases():
    """With one kernel for all stages, the conventions differ only by the 20 biases: zero there,
    the default network computes exactly the official one."""
    default, official = small_banet("default", seed=0), small_banet("official", seed=1)
    with torch.no_grad():
        for decoder in (default.decoder.segmentation, default.decoder.boundary):
            for module in [*decoder.transpconvs, *decoder.seg_layers]:
                module.bias.zero_()
    result = official.load_state_dict(default.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(".encoder." in key or key.endswith(".bias") for key in result.unexpected_keys)
    x = torch.randn(2, 1, 8, 32, 32)
    outputs = official(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 8, 32, 32), (2, 3, 8, 16, 16), (2, 3, 4, 8, 8),
                                                 (2, 2, 8, 32, 32), (2, 2, 8, 16, 16), (2, 2, 4, 8, 8)]
    for a, b in zip(default(x), outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_banet_official_needs_the_plain_encoder():
    kwargs = banet_kwargs()
    kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
    with pytest.raises(ValueError, match="plain encoder"):
        BANet(input_channels=1, num_classes=3, conventions="official", **kwargs)


# --- ClassSAM: SurgicalSAM's preprocessing, the same layers -----------------------------------------------

def test_class_sam_conventions_differ_only_in_the_preprocessing():
    """One state dict loads strictly into both conventions; from the same image embedding both compute the
    same logits; only the image SAM's encoder gets differs (official: the uint8 frame of an rgb_to_0_1
    patch, SAM's ResizeLongestSide; tests/test_pretrained_finetune.py checks it against SamPredictor)."""
    default, _ = small_network("ClassSAM", "default")
    official, _ = small_network("ClassSAM", "official", seed=1)
    official.load_state_dict(default.state_dict(), strict=True)
    frame = torch.randint(0, 256, (2, 3, 24, 40), generator=torch.Generator().manual_seed(0))
    x = frame.float() / 255  # nnU-Net's rgb_to_0_1
    default.eval(), official.eval()
    with torch.no_grad():
        embeddings = default.encode(x)
        torch.testing.assert_close(official.decode(embeddings, x.shape[-2:]), default.decode(embeddings, x.shape[-2:]),
                                   rtol=0, atol=0)
        (image, frame_size), (official_image, official_frame_size) = default.to_sam_input(x), official.to_sam_input(x)
        assert frame_size == official_frame_size and image.shape == official_image.shape
        assert not torch.allclose(image, official_image, atol=0.1)
        pixels = official_image * official.pixel_std + official.pixel_mean  # official: whole grey levels
        visible = pixels[..., :frame_size[0], :frame_size[1]]
        torch.testing.assert_close(visible, visible.round(), rtol=0, atol=1e-3)
        assert not torch.equal(official(x), default(x))


# --- plans ------------------------------------------------------------------------------------------

def test_conventions_come_from_the_plans_arch_kwargs():
    """A plans file sets ``"conventions": "official"`` in ``arch_kwargs``; nnU-Net's builder passes it on."""
    ops = {"conv_op": "torch.nn.modules.conv.Conv3d", "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
           "nonlin": "torch.nn.LeakyReLU"}
    banet = {**banet_kwargs(), **ops, "conventions": "official"}
    network = compat.network_from_plans(f"{BANet.__module__}.BANet", banet, tuple(ops), 1, 3, True)
    assert network.conventions == "official" and network.decoder.segmentation.seg_layers[0].bias is None
    uniseg = {**UNISEG_SMALL, **ops, "conventions": "official", "patch_size": UNISEG_PATCH, "task_channels": [1, 2]}
    network = compat.network_from_plans(f"{UniSeg.__module__}.UniSeg", uniseg, tuple(ops), 2, 3, True)
    assert network.conventions == "official" and network.decoder.transpconvs[0].bias is None


# --- paper configuration forward (slow on CPU) --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, shape", [("UniSeg", (1, 4, 64, 192, 192)), ("BANet", (1, 1, 128, 128, 128))])
def test_paper_forward_shapes_in_the_official_convention(name, shape):
    network = paper_network(name, "official")
    if name == "UniSeg":
        network.set_task(9)
    with torch.no_grad():
        outputs = network(torch.randn(*shape))
    assert tuple(outputs[0].shape[2:]) == shape[2:]
