"""Our trainers under nnU-Net's DDP (``-num_gpus 2``), on CPU: 2 processes, gloo (nnunet_ext.testing.ddp)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunet_ext import compat
from nnunet_ext.testing.ddp import run_cpu_ddp
from nnunet_ext.trainers.base import METHOD_STATE_KEY

PROBE_FOLDER = str(Path(__file__).parent / "ddp_trainers")


def _check_ddp_run(reports: list[dict], iterations: int, epochs: int = 1) -> None:
    first, second = reports
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 for r in reports)
    assert all(r["is_ddp"] and r["network_is_ddp"] for r in reports)
    assert [r["local_rank"] for r in reports] == [0, 1]
    # nnU-Net's per-process split of the plans' global batch: sizes add up, foreground oversampling
    # keeps the global share (round(2 * (1 - 0.33)) = 1 random patch, 1 oversampled -> rank 0 random, rank 1 fg)
    assert first["global_batch_size"] == 2 and [r["batch_size"] for r in reports] == [1, 1]
    assert [r["oversample_foreground_percent"] for r in reports] == [0.0, 1.0]
    # DDP averaged the gradients: both processes hold the same weights after training, and the logged loss
    # is the all-gathered mean
    assert first["parameter_sum"] == second["parameter_sum"]
    assert first["parameter_abs_sum"] == second["parameter_abs_sum"]
    assert first["train_loss"] == second["train_loss"]
    assert all(r["current_epoch"] == epochs for r in reports)


def test_base_trainer_trains_and_validates_under_ddp_with_two_processes(nnunet_root, tmp_path):
    env = nnunet_root.env(epochs=1, iterations=1, nnUNet_n_proc_DA="0")
    reports = run_cpu_ddp(env, "nnUNetExtTrainer", nnunet_root.dataset_id, tmp_path / "reports", fold=2)
    _check_ddp_run(reports, iterations=1)
    fold = Path(reports[0]["output_folder"])
    checkpoint = compat.read_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint["current_epoch"] == 1
    assert not any(k.startswith("module.") for k in checkpoint["network_weights"])  # unwrapped, loads without DDP
    # the validation cases were split over the two processes; rank 0 gathered all of them
    splits = json.loads((nnunet_root.preprocessed / nnunet_root.dataset_name / "splits_final.json").read_text())
    validation = {f"{case}.nii.gz" for case in splits[2]["val"]}
    assert {p.name for p in (fold / "validation").glob("*.nii.gz")} == validation
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(validation)
    # one log per process is nnU-Net's; the short schedule applied on both
    assert "num_epochs = 1 (was 1000)" in "".join(p.read_text() for p in fold.glob("training_log_*.txt"))


@pytest.mark.slow
def test_method_state_is_saved_once_and_every_process_resumes_it_with_c(nnunet_root, tmp_path):
    env = nnunet_root.env(epochs=1, iterations=2, nnUNet_n_proc_DA="0", nnUNet_extTrainer=PROBE_FOLDER)
    first = run_cpu_ddp(env, "DDPProbeTrainer", nnunet_root.dataset_id, tmp_path / "first", fold=3)
    _check_ddp_run(first, iterations=2)
    assert [r["method_state"] for r in first] == [{"probe_steps": 2}] * 2
    fold = Path(first[0]["output_folder"])
    assert compat.read_checkpoint(fold / "checkpoint_final.pth")[METHOD_STATE_KEY] == {"probe_steps": 2}
    env["NNUNET_EXT_NUM_EPOCHS"] = "2"  # as after a requeue: --c, one more epoch
    resumed = run_cpu_ddp(env, "DDPProbeTrainer", nnunet_root.dataset_id, tmp_path / "resumed", fold=3,
                          continue_training=True)
    _check_ddp_run(resumed, iterations=2, epochs=2)
    assert [r["method_state"] for r in resumed] == [{"probe_steps": 4}] * 2
    assert compat.read_checkpoint(fold / "checkpoint_final.pth")[METHOD_STATE_KEY] == {"probe_steps": 4}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["BANetTrainer", "CoTrTrainer"])
def test_method_trainers_under_ddp(nnunet_root, tmp_path, trainer):
    env = nnunet_root.env(epochs=1, iterations=1, nnUNet_n_proc_DA="0")
    reports = run_cpu_ddp(env, trainer, nnunet_root.dataset_id, tmp_path / "reports", fold=4)
    _check_ddp_run(reports, iterations=1)
    assert (Path(reports[0]["output_folder"]) / "validation" / "summary.json").is_file()


def test_the_trainers_keep_nnunets_ddp_batch_split():
    """Our supervised trainers take nnU-Net's per-process split unchanged (a method that overrides it must
    document its DDP behaviour, as the semi-supervised base does)."""
    from nnunet_ext.trainers.banet import BANetTrainer
    from nnunet_ext.trainers.base import nnUNetExtTrainer
    from nnunet_ext.trainers.cotr import CoTrTrainer

    base = compat.base_trainer_class()._set_batch_size_and_oversample
    for trainer in (nnUNetExtTrainer, BANetTrainer, CoTrTrainer):
        assert trainer._set_batch_size_and_oversample is base, trainer.__name__
    assert torch.distributed.is_available()


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["nnUNetUniversalTrainer", "UniSegTrainer", "DoDNetTrainer"])
def test_universal_trainers_under_ddp(universal_root, tmp_path, trainer):
    """Each process draws its own single-task batches (so one DDP step may average two tasks'
    gradients); every parameter must take part in each step (no find_unused_parameters in nnU-Net)."""
    env = universal_root.env(epochs=1, iterations=2, nnUNet_n_proc_DA="0")
    reports = run_cpu_ddp(env, trainer, universal_root.dataset_id, tmp_path / "reports", fold=1)
    first, second = reports
    assert all(r["is_ddp"] and r["network_is_ddp"] for r in reports)
    assert first["parameter_sum"] == second["parameter_sum"] and all(r["current_epoch"] == 1 for r in reports)
    assert (Path(first["output_folder"]) / "validation" / "summary_per_task.json").is_file()
