"""The stock nnU-Net commands, run as a user would, with nnU-Net's trainer (control) and ours."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from nnunet_ext.testing.harness import check_pipeline_outputs, run_stock, run_stock_pipeline

CONTROL = "HarnessControlTrainer"  # plain nnU-Net trainer, short schedule: if it fails, the harness is broken
TRAINERS = [CONTROL, "nnUNetExtTrainer"]
CONTROL_FOLDER = str(Path(__file__).parent / "control_trainers")


@pytest.fixture(scope="module")
def pipelines(nnunet_root):
    return {trainer: run_stock_pipeline(nnunet_root, trainer, extra_env={"nnUNet_extTrainer": CONTROL_FOLDER})
            for trainer in TRAINERS}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_plan_train_predict_evaluate(nnunet_root, pipelines, trainer):
    check_pipeline_outputs(nnunet_root, pipelines[trainer])


def test_short_run_variables_set_the_schedule_of_our_trainer_only(pipelines):
    assert "num_epochs = 1 (was 1000)" in pipelines["nnUNetExtTrainer"].train_output
    assert "set by the environment" not in pipelines[CONTROL].train_output


def test_find_best_configuration_export_and_predict_from_model_folder(nnunet_root, pipelines, tmp_path):
    trainer = "nnUNetExtTrainer"
    env = nnunet_root.env()
    run_stock(["nnUNetv2_find_best_configuration", nnunet_root.dataset_id, "-c", "3d_fullres", "-tr", trainer,
               "-f", 0, "-np", 1], env)
    inference_info = nnunet_root.results / nnunet_root.dataset_name / "inference_instructions.txt"
    assert trainer in inference_info.read_text()

    archive = tmp_path / "model.zip"
    run_stock(["nnUNetv2_export_model_to_zip", "-d", nnunet_root.dataset_id, "-o", archive, "-c", "3d_fullres",
               "-tr", trainer, "-f", 0], env)
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
    assert any(name.endswith(f"{trainer}__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth") for name in names)

    output = tmp_path / "from_model_folder"
    run_stock(["nnUNetv2_predict_from_modelfolder", "-i", nnunet_root.dataset_raw / "imagesTs", "-o", output,
               "-m", pipelines[trainer].model_folder, "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1], env)
    assert sorted(p.name for p in output.glob("*.nii.gz")) == \
        sorted(p.name for p in (nnunet_root.dataset_raw / "labelsTs").glob("*.nii.gz"))
