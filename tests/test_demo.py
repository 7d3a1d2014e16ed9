"""``nnunet-ext demo`` end to end, as a user runs it."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from nnunet_ext.demo import DEMO_MARKER, dice_per_class, dice_table
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


def test_short_demo_runs_the_whole_pipeline_and_can_be_rerun_in_place(tmp_path):
    workdir = tmp_path / "demo"
    check_demo_outputs(run_demo("--workdir", workdir, "--epochs", 1, "--iters", 2), workdir)
    # a previous demo's folder is accepted again (the user's data check only refuses foreign folders)
    check_demo_outputs(run_demo("--workdir", workdir, "--epochs", 1, "--iters", 1), workdir)


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
