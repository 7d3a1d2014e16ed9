"""Tests of CoTr's planner (plans/cotr.py) and trainer (trainers/cotr.py).

* pure planner rules (strides, patch size, memory policy, too-small errors): no dataset;
* CoTrPlanner on the harness dataset (a private copy of the planned harness root; CoTr plans in-process);
* trainer: deep-supervision scales and loss weights against the network, schedule, networks
  built from CoTr plans and from nnU-Net's default plans;
* end to end through the stock CLI: CoTr plans (narrow widths, for the CPU) and ``-tr
  CoTrTrainer`` alone on nnU-Net's default plans (paper widths).

CoTrTrainer is found by nnU-Net's own lookup through a user folder in ``nnUNet_extTrainer``
(``cotr_test_index.py``), so these tests do not depend on its registry entry.
"""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from planned_roots import planned_harness_root

from nnunet_ext import compat
from nnunet_ext.architectures.cotr import CoTr, deep_supervision_scales_for_strides
from nnunet_ext.plans.cotr import (COTR_CLASS_NAME, COTR_PLANS, CoTrPlanner, CoTrPlanningError, cotr_patch_size,
                                   cotr_strides, minimum_shape, total_stride)
from nnunet_ext.testing.harness import (NnUNetRoot, check_pipeline_outputs, run_stock,
                                        run_stock_pipeline)
from nnunet_ext.trainers.base import NNUNET_GRAD_CLIP, nnUNetExtTrainer
from nnunet_ext.trainers.cotr import (CoTrTrainer, deep_supervision_weights,
                                      strides_from_pool_op_kernel_sizes)

PAPER_STRIDES = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
BCV_SPACING = (3.0, 0.76, 0.76)  # nnU-Net's target spacing for BCV (Task017)
CPU_PLANS = "nnUNetPlans_CoTrCPU"
ARCH_KEYS = {"patch_size", "strides", "features", "blocks_per_layer", "norm", "d_model", "n_heads", "n_layers",
             "d_ffn", "dropout", "n_points", "axis_order"}


class CPUCoTrPlanner(CoTrPlanner):
    """CoTr's planning rules with narrow widths, so the end-to-end run trains in seconds on a CPU."""

    features = (8, 16, 24, 24)
    d_model, n_heads, n_layers, d_ffn = 24, 4, 1, 48


def stub_planner(gpu_memory_target_in_gb: float = 8, input_channels: int = 1, classes: int = 14) -> CoTrPlanner:
    """A CoTrPlanner without a dataset: enough state for its CoTr configuration step."""
    planner = CoTrPlanner.__new__(CoTrPlanner)
    planner._estimators = {}
    planner.UNet_vram_target_GB = gpu_memory_target_in_gb
    planner.dataset_json = {"channel_names": {str(i): "CT" for i in range(input_channels)},
                            "labels": {str(i): i for i in range(classes)}}
    return planner


@contextlib.contextmanager
def nnunet_folders(root: NnUNetRoot, results: Path | None = None):
    """nnU-Net's folder variables for in-process calls (nnU-Net 2.8 reads them at use)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("nnUNet_raw", str(root.raw))
        patch.setenv("nnUNet_preprocessed", str(root.preprocessed))
        patch.setenv("nnUNet_results", str(results or root.results))
        yield


def read_plans(root: NnUNetRoot, plans: str) -> dict:
    return json.loads((root.preprocessed / root.dataset_name / f"{plans}.json").read_text())


# ---------------------------------------------------------------------------------------------
# planner rules (no dataset)
# ---------------------------------------------------------------------------------------------
def test_strides_rule_reproduces_the_official_bcv_strides():
    assert cotr_strides(BCV_SPACING, (48, 192, 192)) == PAPER_STRIDES


@pytest.mark.parametrize("spacing", [(2.5, 1.0, 1.0), BCV_SPACING, (5.0, 0.7, 0.7)])
def test_anisotropic_spacing_gives_an_in_plane_stem(spacing):
    strides = cotr_strides(spacing, (64, 256, 256))
    assert strides[0] == [1, 2, 2]
    assert all(s[1:] == [2, 2] for s in strides)  # in-plane always downsampled 16x at these sizes


def test_strides_follow_nnunet_pooling_rules():
    assert cotr_strides((1.0, 1.0, 1.0), (64, 64, 64)) == [[2, 2, 2]] * 4  # isotropic: z in the stem
    # 5 mm slices: z waits until in-plane spacing is within 2x (as nnU-Net pools), cumulative (4, 16, 16)
    assert cotr_strides((5.0, 1.0, 1.0), (40, 256, 256)) == [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    # short z extent: z stops once its map would drop below 2 voxels
    assert cotr_strides((1.0, 1.0, 1.0), (12, 64, 64)) == [[2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]


def test_too_small_shape_errors_naming_the_minimum():
    with pytest.raises(CoTrPlanningError) as error:
        cotr_patch_size((2.5, 1.0, 1.0), (4, 8, 8), fits=lambda patch, strides: True)
    message = str(error.value)
    assert "too small" in message and "(16, 32, 32)" in message and "32 voxels" in message
    assert minimum_shape((2.5, 1.0, 1.0)) == (16, 32, 32)
    # the minimum itself plans, with the paper's strides and no padding
    assert cotr_patch_size((2.5, 1.0, 1.0), (16, 32, 32), fits=lambda p, s: True) == ((16, 32, 32), PAPER_STRIDES)


def test_bcv_median_shape_plans_the_paper_patch_and_memory_target_scales_it():
    bcv_median = (148, 512, 512)  # BCV after resampling to BCV_SPACING
    patch, strides = stub_planner().cotr_configuration(BCV_SPACING, bcv_median, {})
    assert (patch, strides) == ((48, 192, 192), PAPER_STRIDES)
    small, _ = stub_planner(gpu_memory_target_in_gb=4).cotr_configuration(BCV_SPACING, bcv_median, {})
    large, _ = stub_planner(gpu_memory_target_in_gb=16).cotr_configuration(BCV_SPACING, bcv_median, {})
    assert np.prod(small) < np.prod(patch) < np.prod(large)
    for candidate in (small, large):
        assert all(p % t == 0 for p, t in zip(candidate, total_stride(PAPER_STRIDES)))


def test_memory_target_too_small_for_any_patch_errors():
    with pytest.raises(CoTrPlanningError, match="memory target"):
        cotr_patch_size(BCV_SPACING, (148, 512, 512), fits=lambda patch, strides: False)


# ---------------------------------------------------------------------------------------------
# planner on the harness dataset
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cotr_root(tmp_path_factory) -> NnUNetRoot:
    """A private copy of the planned harness root (fingerprint, nnU-Net's plans) + CoTr plans (paper and
    CPU widths); CPU plans preprocessed."""
    root = planned_harness_root(tmp_path_factory)
    with nnunet_folders(root):
        assert compat.plan_dataset(root.dataset_id, CoTrPlanner) == COTR_PLANS
        assert compat.plan_dataset(root.dataset_id, CPUCoTrPlanner, plans_name=CPU_PLANS) == CPU_PLANS
        compat.preprocess(root.dataset_id, CPU_PLANS, ["3d_fullres"], 1)
    return root


def test_cotr_plans_name_the_cotr_class_with_json_arch_kwargs(cotr_root):
    plans = read_plans(cotr_root, COTR_PLANS)
    assert plans["plans_name"] == COTR_PLANS and plans["experiment_planner_used"] == "CoTrPlanner"
    assert set(plans["configurations"]) == {"3d_fullres"}
    config = plans["configurations"]["3d_fullres"]
    architecture = config["architecture"]
    assert architecture["network_class_name"] == COTR_CLASS_NAME
    assert architecture["_kw_requires_import"] == []
    kwargs = architecture["arch_kwargs"]
    assert ARCH_KEYS <= set(kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs
    # paper widths by default
    assert kwargs["features"] == [64, 192, 384, 384] and kwargs["blocks_per_layer"] == [3, 3, 2]
    assert (kwargs["d_model"], kwargs["n_heads"], kwargs["n_layers"], kwargs["d_ffn"], kwargs["n_points"]) == \
        (384, 6, 6, 1536, 4)
    # harness 16x40x40 at 2.5 x 1 x 1 mm: in-plane stem, patch padded to the cumulative stride (8, 16, 16)
    assert kwargs["strides"] == PAPER_STRIDES
    assert config["patch_size"] == kwargs["patch_size"] == [16, 48, 48]
    assert all(p % t == 0 for p, t in zip(config["patch_size"], total_stride(kwargs["strides"])))
    assert config["batch_size"] == 2
    CoTr(input_channels=1, num_classes=5, **kwargs)  # the plans' kwargs build the network


def test_cotr_plans_keep_nnunet_spacing_and_preprocessing(cotr_root):
    ours = read_plans(cotr_root, COTR_PLANS)["configurations"]["3d_fullres"]
    nnunet = read_plans(cotr_root, "nnUNetPlans")["configurations"]["3d_fullres"]
    for key in ("spacing", "median_image_size_in_voxels", "normalization_schemes", "use_mask_for_norm",
                "resampling_fn_data_kwargs", "resampling_fn_seg_kwargs", "batch_dice"):
        assert ours[key] == nnunet[key], key
    assert ours["data_identifier"] == f"{COTR_PLANS}_3d_fullres"


def test_narrow_planner_changes_widths_only(cotr_root):
    paper = read_plans(cotr_root, COTR_PLANS)["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    narrow = read_plans(cotr_root, CPU_PLANS)["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert narrow["features"] == [8, 16, 24, 24] and narrow["d_model"] == 24
    assert (narrow["patch_size"], narrow["strides"]) == (paper["patch_size"], paper["strides"])


# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------
def make_trainer(root: NnUNetRoot, plans_name: str, results: Path) -> CoTrTrainer:
    plans = read_plans(root, plans_name)
    dataset_json = json.loads((root.preprocessed / root.dataset_name / "dataset.json").read_text())
    with nnunet_folders(root, results):
        return compat.instantiate_trainer(CoTrTrainer, plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def build(trainer: CoTrTrainer, deep_supervision: bool = True) -> CoTr:
    return CoTrTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                  1, trainer.label_manager.num_segmentation_heads, deep_supervision)


def test_strides_from_nnunet_pooling():
    nnunet_bcv = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert strides_from_pool_op_kernel_sizes(nnunet_bcv) == PAPER_STRIDES
    harness = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert strides_from_pool_op_kernel_sizes(harness) == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert strides_from_pool_op_kernel_sizes([[1, 1, 1], [2, 2, 2]]) == [[1, 1, 1], [2, 2, 2], [1, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="3D"):
        strides_from_pool_op_kernel_sizes([[1, 1], [2, 2]])


def test_deep_supervision_weights_are_the_official_ones():
    assert np.allclose(deep_supervision_weights(4), np.array([8, 4, 2, 1]) / 15)
    for n in (2, 3, 5):
        weights = deep_supervision_weights(n)
        assert len(weights) == n and np.isclose(weights.sum(), 1) and np.all(weights > 0)


def test_schedule_is_the_papers(cotr_root, tmp_path):
    trainer = make_trainer(cotr_root, CPU_PLANS, tmp_path)
    assert (trainer.initial_lr, trainer.weight_decay, trainer.num_epochs, trainer.num_iterations_per_epoch) == \
        (1e-2, 3e-5, 1000, 250)
    trainer.network = build(trainer)
    optimizer, scheduler = trainer.configure_optimizers()
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-2, 0.99, True, 3e-5)
    assert type(scheduler).__name__ == "PolyLRScheduler" and scheduler.exponent == 0.9
    assert scheduler.max_steps == 1000
    # gradient clipping at 12 is nnU-Net's train_step, which the base runs unchanged at grad_clip 12
    assert CoTrTrainer.train_step is nnUNetExtTrainer.train_step and CoTrTrainer.grad_clip == NNUNET_GRAD_CLIP
    assert "clip_grad_norm_(self.network.parameters(), 12)" in inspect.getsource(compat.base_trainer_class().train_step)


@pytest.mark.parametrize("plans_name", [CPU_PLANS, "nnUNetPlans"])
def test_deep_supervision_scales_and_loss_match_the_network(cotr_root, tmp_path, plans_name):
    trainer = make_trainer(cotr_root, plans_name, tmp_path)
    scales = trainer._get_deep_supervision_scales()  # before any network exists, as nnU-Net calls it
    loss = trainer._build_loss()
    network = build(trainer)
    assert scales == network.deep_supervision_scales() == deep_supervision_scales_for_strides(network.strides)
    assert len(loss.weight_factors) == len(scales) == len(network.deep_supervision_scales())
    assert np.allclose(loss.weight_factors, deep_supervision_weights(len(scales)))

    # nnU-Net's own target downsampling with these scales gives targets shaped like the outputs
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    patch = tuple(trainer.configuration_manager.patch_size)
    segmentation = torch.randint(0, trainer.label_manager.num_segmentation_heads, (1, *patch), dtype=torch.int16)
    targets = DownsampleSegForDSTransform(ds_scales=scales)(segmentation=segmentation)["segmentation"]
    with torch.set_grad_enabled(plans_name == CPU_PLANS):  # backward through the narrow network only (CPU time)
        outputs = network(torch.randn(1, 1, *patch))
        assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[1:]) for t in targets]
        value = loss(outputs, [t[None].float() for t in targets])
    assert torch.isfinite(value)
    if value.requires_grad:
        value.backward()
        assert all(p.grad is not None for p in network.decoder.ds_heads.parameters())  # every output is trained

    trainer.network = network
    trainer.set_deep_supervision_enabled(False)
    assert network.decoder.deep_supervision is False
    assert isinstance(network(torch.randn(1, 1, *patch)), torch.Tensor)
    trainer.set_deep_supervision_enabled(True)
    assert network.decoder.deep_supervision is True

    trainer.enable_deep_supervision = False
    assert trainer._get_deep_supervision_scales() is None


def test_build_from_nnunet_default_plans(cotr_root, tmp_path):
    """``-tr CoTrTrainer`` on nnUNetPlans: paper widths, nnU-Net's patch, strides from its pooling."""
    trainer = make_trainer(cotr_root, "nnUNetPlans", tmp_path)
    patch = tuple(trainer.configuration_manager.patch_size)
    classes = trainer.label_manager.num_segmentation_heads
    assert patch == (16, 40, 40)
    network = build(trainer)
    assert isinstance(network, CoTr) and network.features == (64, 192, 384, 384)
    assert network.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    with torch.no_grad():
        outputs = network(torch.randn(2, 1, *patch))
    expected = [(2, classes, *(round(p * s) for p, s in zip(patch, scale)))
                for scale in network.deep_supervision_scales()]
    assert [tuple(o.shape) for o in outputs] == expected
    inference = build(trainer, deep_supervision=False)  # what nnU-Net's predictor builds
    with torch.no_grad():
        assert tuple(inference(torch.randn(1, 1, *patch)).shape) == (1, classes, *patch)


# ---------------------------------------------------------------------------------------------
# end to end, stock CLI
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_folder(tmp_path_factory) -> str:
    """A user trainer folder for nnU-Net's lookup (CoTrTrainer is not in the registry yet)."""
    folder = tmp_path_factory.mktemp("cotr_trainer_index")
    (folder / "cotr_test_index.py").write_text("from nnunet_ext.trainers.cotr import CoTrTrainer  # noqa: F401\n")
    return str(folder)


def cpu_env(trainer_folder: str) -> dict:
    # nnU-Net's final validation spawns nnUNet_def_n_proc (default 8) export workers; one is plenty here
    return {"nnUNet_extTrainer": trainer_folder, "nnUNet_def_n_proc": "1"}


@pytest.fixture(scope="module")
def cotr_pipeline(cotr_root, trainer_folder):
    """Train (1 epoch), predict and evaluate a narrow CoTr with the stock CLI, once for this module."""
    return run_stock_pipeline(cotr_root, "CoTrTrainer", plans=CPU_PLANS, extra_env=cpu_env(trainer_folder),
                              evaluate=False)  # nnU-Net's evaluator on plain labels: test_end_to_end


def test_stock_pipeline_with_cotr_plans(cotr_root, cotr_pipeline):
    result = cotr_pipeline
    check_pipeline_outputs(cotr_root, result)
    plans = json.loads((result.model_folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == COTR_CLASS_NAME
    checkpoint = compat.read_checkpoint(result.fold_folder / "checkpoint_final.pth")
    assert any(key.startswith("transformer.") for key in checkpoint["network_weights"])
    assert "num_epochs = 1 (was 1000)" in result.train_output


@pytest.mark.slow  # ~1 min; find_best/export of our base trainer: test_end_to_end (slow too)
def test_find_best_configuration_and_export_on_a_cotr_model(cotr_root, cotr_pipeline, trainer_folder, tmp_path):
    """nnU-Net's model-selection and zip export/install work on a CoTr model folder, and the
    installed copy predicts like the original."""
    result = cotr_pipeline
    env = cotr_root.env(**cpu_env(trainer_folder))
    run_stock(["nnUNetv2_find_best_configuration", cotr_root.dataset_id, "-c", "3d_fullres", "-tr", "CoTrTrainer",
               "-p", CPU_PLANS, "-f", 0, "-np", 1], env)
    information = json.loads((cotr_root.results / cotr_root.dataset_name / "inference_information.json").read_text())
    best = information["best_model_or_ensemble"]["selected_model_or_models"]
    assert best == [{"configuration": "3d_fullres", "trainer": "CoTrTrainer", "plans_identifier": CPU_PLANS}]
    instructions = (cotr_root.results / cotr_root.dataset_name / "inference_instructions.txt").read_text()
    assert "-tr CoTrTrainer" in instructions and f"-p {CPU_PLANS}" in instructions

    archive = tmp_path / "cotr_model.zip"
    run_stock(["nnUNetv2_export_model_to_zip", "-d", cotr_root.dataset_id, "-o", archive, "-c", "3d_fullres",
               "-tr", "CoTrTrainer", "-p", CPU_PLANS, "-f", 0], env)
    assert archive.stat().st_size > 0
    installed_results = tmp_path / "installed_results"
    installed_results.mkdir()
    installed_env = {**env, "nnUNet_results": str(installed_results)}
    run_stock(["nnUNetv2_install_pretrained_model_from_zip", archive], installed_env)
    predictions = tmp_path / "installed_predictions"
    run_stock(["nnUNetv2_predict", "-i", cotr_root.dataset_raw / "imagesTs", "-o", predictions,
               "-d", cotr_root.dataset_id, "-c", "3d_fullres", "-f", 0, "-tr", "CoTrTrainer", "-p", CPU_PLANS,
               "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_tta", "--disable_progress_bar"],
              installed_env)  # as run_stock_pipeline predicts
    import SimpleITK as sitk

    for original in sorted(result.predictions.glob("*.nii.gz")):
        again = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / original.name)))
        assert np.array_equal(again, sitk.GetArrayFromImage(sitk.ReadImage(str(original)))), original.name


@pytest.mark.slow
def test_stock_pipeline_on_nnunet_default_plans(nnunet_root, trainer_folder):
    """``-tr CoTrTrainer`` alone (paper widths, nnUNetPlans) trains, validates and predicts."""
    result = run_stock_pipeline(nnunet_root, "CoTrTrainer", extra_env=cpu_env(trainer_folder))
    check_pipeline_outputs(nnunet_root, result)
    checkpoint = compat.read_checkpoint(result.fold_folder / "checkpoint_final.pth")
    n_parameters = sum(v.numel() for v in checkpoint["network_weights"].values())
    assert n_parameters > 40_000_000  # paper widths (41.8 M for the harness's 5 outputs)
