"""BA-Net: boundary targets, network, trainer and the stock pipeline (plain and region-based data)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from scipy import ndimage
from torch import nn

from nnunet_ext import compat
from nnunet_ext.architectures.banet import BANet, nnunet_default_topology_3d, paper_banet
from nnunet_ext.losses.boundary import (BOUNDARY_IGNORE, BoundaryAwareLoss, BoundaryTargets, label_boundaries,
                                        region_boundaries)
from nnunet_ext.testing.harness import (NnUNetRoot, check_pipeline_outputs, load_trainer, make_nnunet_root,
                                        run_stock, run_stock_pipeline)
from nnunet_ext.trainers.banet import BANET_CLASS_NAME, BANetTrainer, banet_architecture


# ---------------------------------------------------------------------------------------------
# reference boundary maker: the official per-sample scipy recipe, written out slowly
# ---------------------------------------------------------------------------------------------
def reference_mask_boundary(mask: np.ndarray) -> np.ndarray:
    """mask minus its 3x3(x3) erosion; the patch border is not an edge (as skimage's erosion)."""
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=1)


def reference_label_boundaries(seg: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
    """Official recipe per sample: union over thresholds between consecutive present classes."""
    out = np.zeros(seg.shape, dtype=np.float32)
    for b in range(seg.shape[0]):
        sample = seg[b, 0]
        values = sorted(set(np.unique(sample).tolist()))
        boundary = np.zeros(sample.shape, dtype=bool)
        for level in values[:-1]:
            boundary |= reference_mask_boundary(sample > level)
        if ignore_label is not None:
            boundary &= sample != ignore_label
        out[b, 0] = boundary
        if ignore_label is not None:
            out[b, 0][sample == ignore_label] = BOUNDARY_IGNORE
    return out


def reference_region_boundaries(regions: np.ndarray, has_ignore: bool) -> np.ndarray:
    out = np.zeros((regions.shape[0], 1, *regions.shape[2:]), dtype=np.float32)
    for b in range(regions.shape[0]):
        channels = regions[b].astype(bool)
        ignored = channels[-1] if has_ignore else np.zeros(channels.shape[1:], dtype=bool)
        masks = channels[:-1] if has_ignore else channels
        boundary = np.zeros(masks.shape[1:], dtype=bool)
        for mask in masks:
            boundary |= reference_mask_boundary(mask | ignored)
        out[b, 0] = boundary & ~ignored
        out[b, 0][ignored] = BOUNDARY_IGNORE if has_ignore else 0
    return out


def random_label_map(shape, n_classes: int, seed: int, ignore_label: int | None = None) -> np.ndarray:
    """Blobby random labels (smoothed noise, quantised) so structures have interiors and edges."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=[0] + [1.5] * (len(shape) - 1))
    edges = np.quantile(noise, np.linspace(0, 1, n_classes + 1)[1:-1])
    seg = np.digitize(noise, edges)
    if ignore_label is not None:
        seg[rng.random(shape) < 0.05] = ignore_label  # scattered unannotated voxels
        seg[:, :3] = ignore_label  # and a whole unannotated slab
    return seg[:, None].astype(np.int16)


@pytest.mark.parametrize("spatial", [(24, 24), (12, 20, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("ignore", [False, True], ids=["no_ignore", "ignore"])
def test_label_boundaries_equal_the_scipy_reference(spatial, ignore):
    ignore_label = 4 if ignore else None
    for seed in range(3):
        seg = random_label_map((2, *spatial), n_classes=4, seed=seed, ignore_label=ignore_label)
        ours = label_boundaries(torch.from_numpy(seg), ignore_label).numpy()
        expected = reference_label_boundaries(seg, ignore_label)
        assert expected[expected == 1].size > 0, "the random map has no boundary: the test would be empty"
        np.testing.assert_array_equal(ours, expected)


def test_label_boundaries_skip_absent_classes_and_work_on_non_contiguous_values():
    seg = random_label_map((2, 10, 18, 18), n_classes=3, seed=7) * 3  # values 0, 3, 6
    ours = label_boundaries(torch.from_numpy(seg)).numpy()
    np.testing.assert_array_equal(ours, reference_label_boundaries(seg))


@pytest.mark.parametrize("spatial", [(24, 24), (12, 20, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("ignore", [False, True], ids=["no_ignore", "ignore"])
def test_region_boundaries_equal_the_scipy_reference(spatial, ignore):
    """KiTS-style nested regions (kidney+masses, masses, tumour) as nnU-Net's region targets."""
    seg = random_label_map((2, *spatial), n_classes=4, seed=11, ignore_label=4 if ignore else None)[:, 0]
    regions = [(1, 2, 3), (2, 3), (2,)]
    channels = [np.isin(seg, r) for r in regions] + ([seg == 4] if ignore else [])
    target = np.stack(channels, axis=1).astype(np.int16)
    ours = region_boundaries(torch.from_numpy(target), has_ignore_channel=ignore).numpy()
    np.testing.assert_array_equal(ours, reference_region_boundaries(target, ignore))


def test_deep_supervision_targets_downsample_like_nnunet_or_come_from_each_scale():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    seg = torch.from_numpy(random_label_map((2, 16, 32, 32), n_classes=4, seed=3))
    scales = [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]]
    ds_targets = [torch.stack([DownsampleSegForDSTransform(scales)(segmentation=s)["segmentation"][i]
                               for s in seg]) for i in range(len(scales))]
    official = BoundaryTargets(has_regions=False, ignore_label=None)(ds_targets)
    full = torch.from_numpy(reference_label_boundaries(seg.numpy()))
    expected = [torch.stack([DownsampleSegForDSTransform(scales)(segmentation=b)["segmentation"][i] for b in full])
                for i in range(len(scales))]
    for ours, reference in zip(official, expected):
        assert torch.equal(ours, reference)
    per_scale = BoundaryTargets(has_regions=False, ignore_label=None, from_each_scale=True)(ds_targets)
    for ours, target in zip(per_scale, ds_targets):
        np.testing.assert_array_equal(ours.numpy(), reference_label_boundaries(target.numpy()))
    assert not torch.equal(per_scale[2], official[2])  # the two modes differ at coarse scales


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------
def plain_kwargs(dim: int, n_stages: int = 4, strides=None) -> dict:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    strides = strides or [[1] * dim] + [[2] * dim] * (n_stages - 1)
    return dict(n_stages=n_stages, features_per_stage=[8, 16, 24, 32][:n_stages], conv_op=conv,
                kernel_sizes=[[3] * dim] * n_stages, strides=strides, n_conv_per_stage=[2] * n_stages,
                n_conv_per_stage_decoder=[2] * (n_stages - 1), conv_bias=True, norm_op=norm,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


@pytest.mark.parametrize("dim,patch,strides", [
    (2, (48, 40), None),
    (3, (16, 40, 40), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),  # anisotropic, like the harness plans
], ids=["2d", "3d"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_deep_supervision_outputs(dim, patch, strides, channels):
    network = BANet(input_channels=channels, num_classes=5, deep_supervision=True, **plain_kwargs(dim, 4, strides))
    outputs = network(torch.randn(2, channels, *patch))
    stride_list = strides or [[1] * dim] + [[2] * dim] * 3
    cumulative = np.cumprod(np.array(stride_list), axis=0)[:-1]
    expected_spatial = [tuple(int(p // c) for p, c in zip(patch, cum)) for cum in cumulative]
    assert len(outputs) == 2 * 3
    assert [tuple(o.shape) for o in outputs[:3]] == [(2, 5, *s) for s in expected_spatial]
    assert [tuple(o.shape) for o in outputs[3:]] == [(2, 2, *s) for s in expected_spatial]
    network.decoder.deep_supervision = False
    network.eval()
    with torch.no_grad():
        single = network(torch.randn(1, channels, *patch))
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (1, 5, *patch)


def test_residual_encoder_plans_build_a_residual_banet():
    kwargs = plain_kwargs(3, 4)
    kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
    network = BANet(input_channels=1, num_classes=3, deep_supervision=True, **kwargs)
    assert type(network.encoder).__name__ == "ResidualEncoder"
    assert len(network(torch.randn(1, 1, 16, 32, 32))) == 6
    with pytest.raises(ValueError, match="exactly one of n_conv_per_stage"):
        BANet(input_channels=1, num_classes=3, n_conv_per_stage=2, **kwargs)


def test_segmentation_loss_alone_trains_the_boundary_decoder_through_the_modulation():
    network = BANet(input_channels=1, num_classes=3, deep_supervision=True, **plain_kwargs(3, 3))
    outputs = network(torch.randn(2, 1, 16, 32, 32))
    outputs[0].square().mean().backward()  # full-resolution segmentation output only
    boundary = network.decoder.boundary
    for name, module in [("stages", boundary.stages), ("transpconvs", boundary.transpconvs)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient in boundary {name}"
    # every boundary head except... all heads modulate a stage, so all of them receive gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in boundary.seg_layers.parameters())


def test_modulation_uses_the_boundary_probability():
    """Zeroing the boundary heads gives softmax 1/2 everywhere, i.e. a uniform 1.5 modulation."""
    torch.manual_seed(0)
    network = BANet(input_channels=1, num_classes=3, deep_supervision=False, **plain_kwargs(2, 3)).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        for head in network.decoder.boundary.seg_layers:
            head.weight.zero_()
            head.bias.zero_()
        uniform = network(x)
        for head in network.decoder.boundary.seg_layers:
            head.bias.copy_(torch.tensor([0.0, 3.0]))  # boundary probability ~0.95 everywhere
        changed = network(x)
    assert not torch.allclose(uniform, changed)


def test_paper_configuration_adds_the_boundary_decoder_to_nnunets_default_network():
    """Paper: 31.2 M (nnU-Net, 5 pools, 32..320, 5 classes) -> about 48.4 M with the boundary
    decoder; exactly 48,366,848 in the official generic_BANetV2 = ours in the official convention,
    which drops the 20 biases of the decoders' transposed convs and heads (800 + 800 + 5*5 + 5*2)."""
    kwargs = nnunet_default_topology_3d((128, 128, 128))
    with torch.device("meta"):  # sizes only
        unet = PlainConvUNet(1, num_classes=5, deep_supervision=True, **kwargs)
        n_banet, n_official = (sum(p.numel() for p in paper_banet(c).parameters()) for c in ("default", "official"))
    n_unet = sum(p.numel() for p in unet.parameters())
    assert abs(n_unet - 31.2e6) < 0.01 * 31.2e6
    assert (n_banet, n_official) == (48_368_483, 48_366_848)
    assert n_banet - n_official == 2 * (320 + 256 + 128 + 64 + 32) + 5 * 5 + 5 * 2
    assert abs((n_banet - n_unet) - 17.2e6) < 0.01 * 17.2e6
    assert kwargs["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5


def test_feature_map_size_counts_both_decoders():
    kwargs = plain_kwargs(3, 4)
    banet = BANet(input_channels=1, num_classes=3, **kwargs)
    unet = PlainConvUNet(1, num_classes=3, **kwargs)
    size = (16, 32, 32)
    assert banet.compute_conv_feature_map_size(size) > unet.compute_conv_feature_map_size(size)


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
def test_boundary_aware_loss_is_segmentation_plus_boundary_over_scales():
    seg_loss = compat.deep_supervision_loss(compat.dice_ce_loss(batch_dice=True), [0.5, 0.5])
    bdr_loss = compat.deep_supervision_loss(compat.dice_ce_loss(batch_dice=True), [0.5, 0.5])
    loss = BoundaryAwareLoss(seg_loss, bdr_loss, BoundaryTargets(False, None))
    seg = torch.from_numpy(random_label_map((2, 8, 16, 16), 3, seed=1))
    targets = [seg, seg[:, :, :, ::2, ::2]]
    outputs = [torch.randn(2, 3, 8, 16, 16), torch.randn(2, 3, 8, 8, 8),
               torch.randn(2, 2, 8, 16, 16), torch.randn(2, 2, 8, 8, 8)]
    bdr_targets = BoundaryTargets(False, None)(targets)
    expected = seg_loss(outputs[:2], targets) + bdr_loss(outputs[2:], bdr_targets)
    assert torch.allclose(loss(outputs, targets), expected)
    with pytest.raises(ValueError, match="expects 4 outputs"):
        loss(outputs[:2], targets)


# ---------------------------------------------------------------------------------------------
# trainer and stock pipeline
# ---------------------------------------------------------------------------------------------
REGION_LABELS = {"background": 0, "liver": [1, 4], "lesion": 4, "kidney": 2, "spleen": 3}
REGION_ORDER = [1, 4, 2, 3]


def make_region_root(base: Path) -> NnUNetRoot:
    """The harness dataset as a region-based dataset (liver incl. lesion, lesion, kidney, spleen)."""
    root = make_nnunet_root(base, dataset_id=993, name="HarnessRegions")
    dataset_json = root.dataset_raw / "dataset.json"
    content = json.loads(dataset_json.read_text())
    content["labels"] = REGION_LABELS
    content["regions_class_order"] = REGION_ORDER
    dataset_json.write_text(json.dumps(content, indent=2))
    return root


def _trainer(root: NnUNetRoot, results: Path, monkeypatch) -> BANetTrainer:
    return load_trainer(root, BANetTrainer, monkeypatch, results)

def test_trainer_builds_banet_from_nnunet_default_plans(nnunet_root, tmp_path, monkeypatch):
    trainer = _trainer(nnunet_root, tmp_path, monkeypatch)
    class_name, kwargs, _ = banet_architecture(trainer.configuration_manager)
    assert class_name == BANET_CLASS_NAME
    assert kwargs == trainer.configuration_manager.network_arch_init_kwargs  # same topology as nnU-Net's U-Net
    heads = trainer.label_manager.num_segmentation_heads
    network = BANetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                      heads, True)
    assert isinstance(network, BANet)
    patch = tuple(trainer.configuration_manager.patch_size)
    outputs = network(torch.randn(2, 1, *patch))
    scales = trainer._get_deep_supervision_scales()
    assert len(outputs) == 2 * len(scales)
    for output, scale in zip(outputs, scales + scales):
        assert tuple(output.shape[2:]) == tuple(round(p * s) for p, s in zip(patch, scale))
    loss = trainer._build_loss()
    assert isinstance(loss, BoundaryAwareLoss)
    assert np.allclose(loss.boundary_loss.weight_factors, loss.segmentation_loss.weight_factors)


def test_trainer_refuses_plans_for_other_networks(nnunet_root, tmp_path, monkeypatch):
    trainer = _trainer(nnunet_root, tmp_path, monkeypatch)
    trainer.configuration_manager.configuration["architecture"]["network_class_name"] = \
        "nnunet_ext.architectures.cotr.CoTr"
    with pytest.raises(ValueError, match="PlainConvUNet or ResidualEncoderUNet.*-p nnUNetPlans"):
        banet_architecture(trainer.configuration_manager)


def test_trainer_refuses_training_without_deep_supervision(nnunet_root, tmp_path, monkeypatch):
    trainer = _trainer(nnunet_root, tmp_path, monkeypatch)
    trainer.enable_deep_supervision = False
    with pytest.raises(RuntimeError, match="deep supervision cannot be disabled"):
        trainer.initialize()


@pytest.fixture(scope="module")
def banet_pipeline(nnunet_root):
    return run_stock_pipeline(nnunet_root, "BANetTrainer", evaluate=False)  # evaluated: test_end_to_end


def test_stock_pipeline_plain_labels(nnunet_root, banet_pipeline):
    check_pipeline_outputs(nnunet_root, banet_pipeline)
    checkpoint = compat.read_checkpoint(banet_pipeline.fold_folder / "checkpoint_final.pth")
    assert any(key.startswith("decoder.boundary.") for key in checkpoint["network_weights"])


@pytest.mark.slow  # ~1 min; stock --c of our trainers is checked in the default run by test_two_stream_loader
def test_resume_continues_from_the_checkpoint(nnunet_root, banet_pipeline):
    """``--c`` after a finished 1-epoch run with a 2-epoch schedule trains exactly one more epoch."""
    env = nnunet_root.env(epochs=2)
    before = compat.read_checkpoint(banet_pipeline.fold_folder / "checkpoint_final.pth")
    result = run_stock(["nnUNetv2_train", nnunet_root.dataset_id, "3d_fullres", 0, "-tr", "BANetTrainer",
                        "-device", "cpu", "--c"], env)
    after = compat.read_checkpoint(banet_pipeline.fold_folder / "checkpoint_final.pth")
    assert (before["current_epoch"], after["current_epoch"]) == (1, 2)
    assert "Epoch 1" in result.stdout and "Epoch 0" not in result.stdout
    key = next(k for k in after["network_weights"] if k.startswith("decoder.boundary.seg_layers"))
    assert not torch.equal(before["network_weights"][key], after["network_weights"][key])


@pytest.mark.slow
def test_stock_pipeline_region_based(tmp_path_factory):
    root = make_region_root(tmp_path_factory.mktemp("banet_regions"))
    result = run_stock_pipeline(root, "BANetTrainer")
    check_pipeline_outputs(root, result)  # predictions hold only regions_class_order values
    regions = {tuple(sorted(int(v) for v in key.strip("()").split(",") if v.strip())) for key in result.summary["mean"]}
    assert regions == {(1, 4), (4,), (2,), (3,)}, result.summary["mean"].keys()
