"""The stock nnU-Net commands, run as a user would, with our base trainer (and nnU-Net's own as control)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from planned_roots import planned_harness_root

from nnunet_ext import compat
from nnunet_ext.testing.harness import (NnUNetRoot, check_pipeline_outputs, load_trainer, make_nnunet_root,
                                        run_stock, run_stock_pipeline)
from nnunet_ext.trainers.base import nnUNetExtTrainer

TRAINER = "nnUNetExtTrainer"
CONTROL = "HarnessControlTrainer"  # plain nnU-Net trainer, short schedule: if it fails, the harness is broken
CONTROL_FOLDER = str(Path(__file__).parent / "control_trainers")


@pytest.fixture(scope="module")
def stock_root(tmp_path_factory) -> NnUNetRoot:
    """The harness dataset, not planned: the pipeline below plans it with the stock command."""
    return make_nnunet_root(tmp_path_factory.mktemp("stock_root"))


@pytest.fixture(scope="module")
def pipeline(stock_root):
    """Our base trainer through the stock commands from the raw dataset on (``nnUNetv2_plan_and_preprocess``
    included), with nnU-Net's default inference (worker processes, mirroring), next to a user's own
    trainer folder in nnUNet_extTrainer."""
    return run_stock_pipeline(stock_root, TRAINER, extra_env={"nnUNet_extTrainer": CONTROL_FOLDER},
                              default_inference=True)


def test_plan_train_predict_evaluate(stock_root, pipeline):
    check_pipeline_outputs(stock_root, pipeline)
    assert "num_epochs = 1 (was 1000)" in pipeline.train_output


def _planned_files(root: NnUNetRoot) -> dict[str, bytes]:
    folder = root.preprocessed / root.dataset_name
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != "splits_final.json"}  # splits: written by training


def test_stock_planning_writes_what_the_in_process_planning_of_the_shared_roots_writes(stock_root, pipeline,
                                                                                        tmp_path_factory):
    """The shared test roots are planned by nnU-Net's functions in the test process (planned_roots.py);
    the stock command must write the same files, byte for byte."""
    fresh_copy = planned_harness_root(tmp_path_factory)  # not the session's root: tests add to that one
    stock, in_process = _planned_files(stock_root), _planned_files(fresh_copy)
    assert sorted(stock) == sorted(in_process) and len(stock) > 10
    assert json.loads(stock["nnUNetPlans.json"]) == json.loads(in_process["nnUNetPlans.json"])
    assert [name for name in stock if stock[name] != in_process[name]] == []


@pytest.mark.slow  # ~45 s; what it would catch (a broken harness) breaks every stock pipeline of the default run
def test_control_trainer_passes_the_harness(nnunet_root):
    result = run_stock_pipeline(nnunet_root, CONTROL, extra_env={"nnUNet_extTrainer": CONTROL_FOLDER})
    check_pipeline_outputs(nnunet_root, result)
    assert "set by the environment" not in result.train_output


def test_short_run_variables_leave_nnunets_own_trainers_alone(nnunet_root, tmp_path, monkeypatch):
    for variable, value in {"NNUNET_EXT_NUM_EPOCHS": "1", "NNUNET_EXT_ITERS_PER_EPOCH": "2",
                            "NNUNET_EXT_VAL_ITERS": "1"}.items():
        monkeypatch.setenv(variable, value)
    schedules = {}
    for trainer_class in (compat.base_trainer_class(), nnUNetExtTrainer):
        trainer = load_trainer(nnunet_root, trainer_class, monkeypatch, tmp_path)
        trainer.initialize()  # where our trainers apply the variables
        schedules[trainer_class] = (trainer.num_epochs, trainer.num_iterations_per_epoch,
                                    trainer.num_val_iterations_per_epoch)
    assert schedules == {compat.base_trainer_class(): (1000, 250, 50), nnUNetExtTrainer: (1, 2, 1)}


@pytest.mark.slow  # ~50 s: three more stock commands that read the model folder the pipeline checks
def test_find_best_configuration_export_and_predict_from_model_folder(stock_root, pipeline, tmp_path):
    env = stock_root.env()
    run_stock(["nnUNetv2_find_best_configuration", stock_root.dataset_id, "-c", "3d_fullres", "-tr", TRAINER,
               "-f", 0, "-np", 1], env)
    inference_info = stock_root.results / stock_root.dataset_name / "inference_instructions.txt"
    assert TRAINER in inference_info.read_text()

    archive = tmp_path / "model.zip"
    run_stock(["nnUNetv2_export_model_to_zip", "-d", stock_root.dataset_id, "-o", archive, "-c", "3d_fullres",
               "-tr", TRAINER, "-f", 0], env)
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
    assert any(name.endswith(f"{TRAINER}__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth") for name in names)

    output = tmp_path / "from_model_folder"
    run_stock(["nnUNetv2_predict_from_modelfolder", "-i", stock_root.dataset_raw / "imagesTs", "-o", output,
               "-m", pipeline.model_folder, "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1, "--disable_tta"], env)
    assert sorted(p.name for p in output.glob("*.nii.gz")) == \
        sorted(p.name for p in (stock_root.dataset_raw / "labelsTs").glob("*.nii.gz"))
