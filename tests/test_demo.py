"""``nnunet-ext demo`` end to end, as a user runs it."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from nnunet_ext.demo import DEMO_MARKER, dice_per_class, dice_table, prepare_workdir
from nnunet_ext.errors import UserFacingError
from nnunet_ext.testing.harness import stock_command


def run_demo(*arguments, timeout=1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and not k.startswith("NNUNET_EXT_")}
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([stock_command("nnunet-ext"), "demo", *map(str, arguments)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def parse_dice_table(stdout: str) -> dict[str, float]:
    table = stdout.split("Dice on the held-out test cases")[1]
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d\.\d{3})$", table, re.MULTILINE)}


def check_demo_outputs(result: subprocess.CompletedProcess, workdir) -> dict[str, float]:
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    dice = parse_dice_table(result.stdout)
    assert set(dice) == {"liver", "kidney", "spleen", "lesion", "mean"}, dice
    figure = workdir / "demo_figure.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Figure:          {figure}" in result.stdout
    predictions = sorted((workdir / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 3
    summary = json.loads((workdir / "predictions" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 3
    assert (workdir / DEMO_MARKER).is_file()
    assert "=== [6/6]" in result.stdout  # every step announced itself
    return dice


def test_short_demo_runs_the_whole_pipeline(tmp_path):
    workdir = tmp_path / "demo"
    check_demo_outputs(run_demo("--workdir", workdir, "--epochs", 1, "--iters", 2), workdir)


@pytest.mark.slow
def test_short_demo_can_be_rerun_in_place(tmp_path):
    workdir = tmp_path / "demo"
    check_demo_outputs(run_demo("--workdir", workdir, "--epochs", 1, "--iters", 2), workdir)
    # a previous demo's folder is accepted again (the user's data check only refuses foreign folders)
    check_demo_outputs(run_demo("--workdir", workdir, "--epochs", 1, "--iters", 1), workdir)


@pytest.mark.slow
def test_universal_demo_merges_trains_and_predicts_every_task(tmp_path):
    """``--trainer`` of a universal trainer: merge, plan, train, then predict and evaluate each task."""
    workdir = tmp_path / "demo"
    result = run_demo("--workdir", workdir, "--trainer", "nnUNetUniversalTrainer", "--epochs", 1, "--iters", 1)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "=== [5/5]" in result.stdout
    table = result.stdout.split("Dice on the held-out test cases")[1]
    for task in ("SynthLiverKidney", "SynthLiverSpleenLesion", "SynthKidneySpleen"):
        assert re.search(rf"^{task}: \w+\s+\d\.\d{{3}}$", table, re.MULTILINE), table
        assert (workdir / "predictions" / task / "summary.json").is_file()
    assert (workdir / "demo_figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_previous_demos_folder_is_reused_and_a_foreign_one_refused(tmp_path):
    """The in-process half of the rerun check (the pipeline rerun itself is the slow test above)."""
    workdir = prepare_workdir(tmp_path / "demo")
    (workdir / "nnUNet_raw").mkdir()
    assert prepare_workdir(workdir) == workdir and (workdir / "nnUNet_raw").is_dir()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    with pytest.raises(UserFacingError, match="not made by 'nnunet-ext demo'. Nothing was changed"):
        prepare_workdir(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_the_figure_reads_every_file_with_the_datasets_reader_writer(tmp_path):
    """The demo's figure from a tiny raw dataset, its predictions and an nnU-Net summary (no training)."""
    import numpy as np

    from nnunet_ext import image_io, raw_dataset
    from nnunet_ext.datasets.figures import save_prediction_figure

    raw = tmp_path / "Dataset001_Fig"
    label = np.zeros((6, 16, 16), np.uint8)
    label[2:4, 4:12, 4:12] = 1
    raw_dataset.write_case_arrays(raw, "c0", [label.astype(np.float32) * 100], label, (2.0, 1.0, 1.0), ".nii.gz",
                                  split="Ts")
    (tmp_path / "pred").mkdir()
    image_io.write_volume(label, tmp_path / "pred" / "c0.nii.gz", (2.0, 1.0, 1.0))
    summary = {"metric_per_case": [{"prediction_file": str(tmp_path / "pred" / "c0.nii.gz"),
                                    "metrics": {"1": {"Dice": 1.0}}}]}
    dataset_json = {"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    figure = save_prediction_figure(raw, tmp_path / "pred", dataset_json, tmp_path / "f.png", summary)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_default_demo_learns_the_large_organ(tmp_path):
    workdir = tmp_path / "demo"
    dice = check_demo_outputs(run_demo("--workdir", workdir), workdir)
    assert dice["liver"] > 0.6, dice


def test_dice_table_and_summary_parsing():
    summary = {"mean": {"1": {"Dice": 0.9}, "2": {"Dice": 0.5}, "3": {"Dice": 0.0}}}
    dice = dice_per_class(summary, {"background": 0, "liver": 1, "kidney": 2, "lesion": 3})
    assert dice == {"liver": 0.9, "kidney": 0.5, "lesion": 0.0}
    table = dice_table(dice)
    assert "liver   0.900" in table and "mean    0.467" in table
