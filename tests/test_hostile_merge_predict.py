"""Hostile input to ``nnunet-ext merge`` and ``nnunet-ext predict --task``: refused with one line, nothing written.

Every refusal is checked with :func:`nnunet_ext.testing.hostile.assert_refused`: exit code non-zero,
a message naming the problem, no traceback, inputs byte-identical, no partial output and no
temporary files. Interrupts (Ctrl-C) and concurrent runs are checked for "no partial output" and
"a rerun / the second run gives what a single run gives" (predict, like nnUNetv2_predict, keeps
the cases it finished, each file whole, and ``--continue_prediction`` does the rest). Images are
tiny (8 x 16 x 16) and written here, so the whole file runs in seconds; the predictor is a
stand-in that hands per-task label maps to the writers (the real one: tests/test_predict_parity.py,
tests/test_predict_all_tasks.py and tests/test_universal.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext import atomic_io
from nnunet_ext.tasks import merge as merge_module
from nnunet_ext.tasks.merge import merge_datasets
from nnunet_ext.testing.hostile import assert_refused, run_cli, run_command, snapshot, temporaries

SHAPE = (8, 16, 16)
SPACING = (1.0, 1.0, 2.0)  # SimpleITK order (x, y, z)
ALPHA_LABELS = {"background": 0, "liver": 1, "kidney": 2}
BETA_LABELS = {"background": 0, "spleen": 1, "liver": 2}  # liver has another value than in Alpha
OUTPUT = "Dataset900_Out"
MERGE = ["merge", "-d", "1", "2", "-o", "900", "-np", "1", "--name", "Out"]  # -np 1: monkeypatches reach it


# ---------------------------------------------------------------------------- tiny raw datasets


def _write(array: np.ndarray, path: Path, spacing=SPACING, direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: array.ndim])
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def _intensities(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


def _label(shape=SHAPE, values=(1, 2)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    for k, value in enumerate(values):
        label[1 + 3 * k: 3 + 3 * k] = value
    return label


def _make_source(raw: Path, dataset_id: int, name: str, labels: dict, channels: int, train: int = 2,
                 test: int = 1) -> Path:
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    for i in range(train + test):
        images = "imagesTr" if i < train else "imagesTs"
        for c in range(channels):
            _write(_intensities(100 * dataset_id + 10 * i + c), folder / images / f"c{i}_{c:04d}.nii.gz")
        if i < train:
            _write(_label(), folder / "labelsTr" / f"c{i}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): "MRI" for c in range(channels)}, "labels": labels, "numTraining": train,
        "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Alpha (1 channel, 2 training + 1 test case) and Beta (2 channels) in a fresh nnUNet_raw."""
    root = tmp_path / "nnUNet_raw"
    _make_source(root, 1, "Alpha", ALPHA_LABELS, 1)
    _make_source(root, 2, "Beta", BETA_LABELS, 2)
    return root


def _env(raw: Path) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(raw))


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(outcome, command: str) -> str:
    """The refusal is exactly one line ``nnunet-ext CMD: error: ...`` on stderr."""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"nnunet-ext {command}: error: "), outcome.output
    return lines[0]


# ---------------------------------------------------------------------------- merge: bad sources


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _source(raw: Path, name: str) -> Path:
    return next(raw.glob(f"Dataset*_{name}"))


def _two_d_case(raw: Path) -> None:
    alpha = _source(raw, "Alpha")
    _write(_intensities(7, SHAPE[1:]), alpha / "imagesTr" / "c1_0000.nii.gz")
    _write(_label(SHAPE[1:], values=(1,)), alpha / "labelsTr" / "c1.nii.gz")


def _float_label(raw: Path) -> None:
    label = _label().astype(np.float32)
    label[0, 0, 0] = 0.5
    _write(label, _source(raw, "Alpha") / "labelsTr" / "c0.nii.gz")


def _use_reader(dataset_json: Path, reader: str) -> None:
    content = json.loads(dataset_json.read_text())
    dataset_json.write_text(json.dumps({**content, "overwrite_image_reader_writer": reader}))


def _nan_image(raw: Path, split: str = "imagesTr", case: str = "c1", value: float = np.nan) -> None:
    """A NaN/Inf voxel, in datasets read with NibabelIO: ITK's NIfTI reader (SimpleITKIO) hands NaN and Inf
    to nnU-Net as 0, nibabel keeps them; the check sees what the dataset's own reader returns."""
    image = _intensities(3)
    image[4, 8, 8] = value
    _write(image, _source(raw, "Beta") / split / f"{case}_0001.nii.gz")
    for name in ("Alpha", "Beta"):
        _use_reader(_source(raw, name) / "dataset.json", "NibabelIO")


def _json_file(raw: Path, text: str | None) -> None:
    path = _source(raw, "Beta") / "dataset.json"
    if text is None:
        path.unlink()
    else:
        path.write_text(text)


MERGE_SOURCE_CASES = {
    "truncated_image": (lambda raw: _truncate(_source(raw, "Alpha") / "imagesTr" / "c1_0000.nii.gz"),
                        ["c1_0000.nii.gz", "truncated"]),
    "truncated_label": (lambda raw: _truncate(_source(raw, "Beta") / "labelsTr" / "c0.nii.gz", 0.9),
                        ["labelsTr/c0.nii.gz", "truncated"]),
    "zero_byte_image": (lambda raw: (_source(raw, "Beta") / "imagesTr" / "c0_0001.nii.gz").write_bytes(b""),
                        ["c0_0001.nii.gz", "empty (0 bytes)"]),
    "text_named_nii_gz": (lambda raw: (_source(raw, "Alpha") / "imagesTs" / "c2_0000.nii.gz").write_text(
        "patient notes, not an image\n"), ["imagesTs/c2_0000.nii.gz", "cannot be decoded"]),
    "2d_case_in_3d_source": (_two_d_case, ["c1_0000.nii.gz", "a 2D image in a 3D dataset"]),
    "channel_with_other_shape": (lambda raw: _write(_intensities(5, (8, 16, 15)),
                                                    _source(raw, "Beta") / "imagesTr" / "c1_0001.nii.gz"),
                                 ["c1_0001.nii.gz", "shape", "every channel of a case must share one grid"]),
    "label_with_other_spacing": (lambda raw: _write(_label(), _source(raw, "Alpha") / "labelsTr" / "c0.nii.gz",
                                                    spacing=(1.0, 1.0, 3.0)),
                                 ["labelsTr/c0.nii.gz", "spacing", "Resample it"]),
    "label_with_other_direction": (lambda raw: _write(_label(), _source(raw, "Alpha") / "labelsTr" / "c1.nii.gz",
                                                      direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)),
                                   ["labelsTr/c1.nii.gz", "direction"]),
    "label_value_not_in_dataset_json": (lambda raw: _write(_label(values=(1, 7)),
                                                           _source(raw, "Beta") / "labelsTr" / "c1.nii.gz"),
                                        ["labelsTr/c1.nii.gz", "[7]", "not in the dataset's labels"]),
    "float_label_0.5": (_float_label, ["labelsTr/c0.nii.gz", "not whole numbers"]),
    "nan_intensity": (_nan_image, ["c1_0001.nii.gz", "NaN or infinite"]),
    "inf_intensity_in_test_case": (lambda raw: _nan_image(raw, "imagesTs", "c2", np.inf),
                                   ["imagesTs/c2_0001.nii.gz", "NaN or infinite"]),
    "missing_channel_file": (lambda raw: (_source(raw, "Beta") / "imagesTr" / "c0_0001.nii.gz").unlink(),
                             ["c0_XXXX.nii.gz", "missing channel(s) [1]"]),
    "missing_label_file": (lambda raw: (_source(raw, "Alpha") / "labelsTr" / "c1.nii.gz").unlink(),
                           ["labelsTr/c1.nii.gz", "is missing"]),
    "dataset_json_missing": (lambda raw: _json_file(raw, None), ["Dataset002_Beta/dataset.json", "does not exist"]),
    "dataset_json_invalid": (lambda raw: _json_file(raw, '{"labels": {"background": 0,'),
                             ["Dataset002_Beta/dataset.json", "cannot be read as JSON"]),
    "dataset_json_not_an_object": (lambda raw: _json_file(raw, "[1, 2, 3]"), ["must hold a JSON object"]),
}


@pytest.mark.parametrize("case", list(MERGE_SOURCE_CASES))
def test_merge_refuses_bad_source_files_before_writing(raw: Path, case: str) -> None:
    mutate, needles = MERGE_SOURCE_CASES[case]
    mutate(raw)
    before = snapshot(raw)
    outcome = run_cli(MERGE, _env(raw))
    assert_refused(outcome, needles, before=before, after=snapshot(raw), absent=[raw / OUTPUT], clean=[raw])
    _error_line(outcome, "merge")
    assert outcome.returncode == 2


def test_merge_refuses_sources_of_different_dimensionality(raw: Path) -> None:
    alpha = _source(raw, "Alpha")
    for path in sorted(alpha.rglob("*.nii.gz")):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        _write(array[0], path)  # every Alpha case 2D, Beta 3D
    before = snapshot(raw)
    outcome = run_cli(MERGE, _env(raw))
    assert_refused(outcome, ["different dimensionality", "Dataset001_Alpha is 2D", "Dataset002_Beta is 3D"],
                   before=before, after=snapshot(raw), absent=[raw / OUTPUT], clean=[raw])


HOSTILE_ARGUMENTS = {
    "task_name_with_quotes": (["--task-names", 'a"; touch {pwned}; "', "B"], ["task name", "only letters"]),
    "task_name_with_newline": (["--task-names", "a\nb", "B"], ["task name 'a\\nb'", "only letters"]),
    "dataset_name_with_command_substitution": (["--name", "$(touch {pwned})"], ["--name", "only letters"]),
    "rename_label_with_newline": (["--rename-label", "Alpha:liver=li\nver"], ["expected TASK:OLD=NEW"]),
    "rename_label_unknown_task": (["--rename-label", 'x";id;":liver=a'], ["unknown task"]),
}


@pytest.mark.parametrize("case", list(HOSTILE_ARGUMENTS))
def test_merge_refuses_hostile_names_without_running_them(raw: Path, tmp_path: Path, case: str) -> None:
    extra, needles = HOSTILE_ARGUMENTS[case]
    pwned = tmp_path / "pwned"
    argv = MERGE[:-2] + [a.format(pwned=pwned) for a in extra] if "--name" in extra else \
        MERGE + [a.format(pwned=pwned) for a in extra]
    before = snapshot(raw)
    outcome = run_cli(argv, _env(raw))
    assert_refused(outcome, needles, before=before, after=snapshot(raw), absent=[raw / OUTPUT], clean=[raw])
    _error_line(outcome, "merge")
    assert not pwned.exists()
    assert [p.name for p in raw.iterdir()] and all(p.name.startswith("Dataset00") for p in raw.iterdir())


def test_merge_refuses_an_output_folder_with_foreign_content(raw: Path) -> None:
    foreign = raw / OUTPUT
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    before = snapshot(raw)
    outcome = run_cli(MERGE, _env(raw))
    assert_refused(outcome, [OUTPUT, "not written by 'nnunet-ext merge'", "left untouched"],
                   before=before, after=snapshot(raw), clean=[raw])
    assert (foreign / "notes.txt").read_text() == "mine\n"


# ---------------------------------------------------------------------------- merge: interrupts and concurrency


class _InterruptAfter:
    """Wraps a writer; Ctrl-C (KeyboardInterrupt) at its ``count``-th call, as a user's ^C would arrive."""

    def __init__(self, writer, count: int) -> None:
        self.writer, self.count, self.calls = writer, count, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.count:
            raise KeyboardInterrupt
        return self.writer(*args, **kwargs)


def _reference_merge(raw: Path, tmp_path: Path) -> dict[str, str]:
    """Checksums of what one uninterrupted merge of these sources writes (in a copy of nnUNet_raw)."""
    copy = tmp_path / "reference_raw"
    shutil.copytree(raw, copy)
    merge_datasets(copy, [1, 2], 900, "Out")
    return _checksums(copy / OUTPUT)


def test_ctrl_c_mid_merge_leaves_nothing_and_a_rerun_finishes(raw: Path, tmp_path: Path, monkeypatch) -> None:
    expected = _reference_merge(raw, tmp_path)
    before = snapshot(raw)
    monkeypatch.setattr(merge_module, "_remap_label", _InterruptAfter(merge_module._remap_label, 3))
    outcome = run_cli(MERGE, _env(raw))
    assert_refused(outcome, ["Interrupted"], before=before, after=snapshot(raw), absent=[raw / OUTPUT], clean=[raw])
    assert outcome.returncode == 130
    monkeypatch.undo()
    rerun = run_cli(MERGE, _env(raw))
    assert rerun.returncode == 0 and "Wrote" in rerun.stdout, rerun.output
    assert _checksums(raw / OUTPUT) == expected
    assert not temporaries(raw)


def test_ctrl_c_while_completing_keeps_every_file_whole_and_a_rerun_completes(raw: Path, monkeypatch) -> None:
    merge_datasets(raw, [1, 2], 900, "Out")
    complete = _checksums(raw / OUTPUT)
    removed = ["labelsTr/T00Alpha_c0.nii.gz", "labelsTr/T01Beta_c1.nii.gz", "imagesTr/T00Alpha_c1_0001.nii.gz"]
    for name in removed:
        (raw / OUTPUT / name).unlink()
    _truncate(raw / OUTPUT / "labelsTr" / "T01Beta_c0.nii.gz")  # e.g. from a version without atomic writes
    monkeypatch.setattr(merge_module, "_remap_label", _InterruptAfter(merge_module._remap_label, 2))
    outcome = run_cli(MERGE, _env(raw))
    assert outcome.returncode == 130 and not temporaries(raw)
    partial = _checksums(raw / OUTPUT)
    assert all(complete[name] == digest for name, digest in partial.items()), "a file was left half-written"
    monkeypatch.undo()
    result = merge_datasets(raw, [1, 2], 900, "Out")
    assert result.status == "completed" and _checksums(raw / OUTPUT) == complete


def test_staging_folder_of_a_killed_merge_is_removed_by_the_next(raw: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().split(".")[0]
    leftover = raw / f"{atomic_io.STAGING_PREFIX}{host}.{dead.stdout.strip()}.0badc0de.{OUTPUT}"
    (leftover / "labelsTr").mkdir(parents=True)
    (leftover / "labelsTr" / "T00Alpha_c0.nii.gz").write_bytes(b"\x1f\x8b half")
    result = merge_datasets(raw, [1, 2], 900, "Out")
    assert result.status == "created" and not leftover.exists() and not temporaries(raw)


def test_merge_is_refused_clearly_while_another_merge_holds_the_output(raw: Path, monkeypatch) -> None:
    held, release = threading.Event(), threading.Event()

    def other_merge() -> None:
        with atomic_io.exclusive(raw / OUTPUT, "merge"):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=other_merge)
    holder.start()
    try:
        assert held.wait(30)
        monkeypatch.setattr(merge_module, "LOCK_TIMEOUT_S", 0.3)
        before = snapshot(raw)
        outcome = run_cli(MERGE, _env(raw))
    finally:
        release.set()
        holder.join()
    assert_refused(outcome, ["waiting up to 0.3 s", f"{OUTPUT} is in use by another merge", "nothing was written"],
                   before=before, after=snapshot(raw), absent=[raw / OUTPUT], clean=[raw])


def test_merge_waits_for_the_other_and_then_gives_a_single_runs_result(raw: Path, tmp_path: Path) -> None:
    expected = _reference_merge(raw, tmp_path)
    held, release = threading.Event(), threading.Event()

    def other_merge() -> None:
        with atomic_io.exclusive(raw / OUTPUT, "merge"):
            held.set()
            release.wait(30)
            merge_module._create(merge_module.plan_merge(raw, [1, 2], 900, "Out"), False,
                                 merge_module.MergeResult(raw / OUTPUT, None, "created"))

    holder = threading.Thread(target=other_merge)
    holder.start()
    assert held.wait(30)
    threading.Timer(0.5, release.set).start()
    outcome = run_cli(MERGE, _env(raw))
    holder.join()
    assert outcome.returncode == 0, outcome.output
    assert "another merge is using" in outcome.stderr and "already holds this merge" in outcome.stdout
    assert _checksums(raw / OUTPUT) == expected and not temporaries(raw)


def test_two_concurrent_merge_commands_give_a_single_runs_result(raw: Path, tmp_path: Path) -> None:
    """Two real ``nnunet-ext merge`` processes on one output (today's raw OSError)."""
    expected = _reference_merge(raw, tmp_path)
    command = [shutil.which("nnunet-ext") or "nnunet-ext", *MERGE]
    processes = [subprocess.Popen(command, env=_env(raw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert sorted("Wrote" in out for out, _ in outputs) == [False, True], outputs
    assert any("already holds this merge" in out for out, _ in outputs), outputs
    assert all("Traceback" not in err for _, err in outputs), outputs
    assert _checksums(raw / OUTPUT) == expected and not temporaries(raw)


def test_rerun_of_an_identical_merge_writes_nothing(raw: Path) -> None:
    first = run_cli(MERGE, _env(raw))
    assert first.returncode == 0, first.output
    before = {p: p.stat().st_mtime_ns for p in (raw / OUTPUT).rglob("*")}
    again = run_command([shutil.which("nnunet-ext") or "nnunet-ext", *MERGE], env=_env(raw))
    assert again.returncode == 0 and "already holds this merge, complete; nothing written" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (raw / OUTPUT).rglob("*")} == before


# ---------------------------------------------------------------------------- predict --task


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A model folder of a merge of Alpha and Beta: dataset.json, plans.json and fold_0 checkpoints (the
    network itself comes from the stand-in predictor below)."""
    import torch

    root = tmp_path_factory.mktemp("model_root")
    raw = root / "nnUNet_raw"
    _make_source(raw, 1, "Alpha", ALPHA_LABELS, 1)
    _make_source(raw, 2, "Beta", BETA_LABELS, 2)
    merged = merge_datasets(raw, [1, 2], 900, "Out").folder
    folder = root / "Dataset900_Out" / "nnUNetUniversalTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(merged / "dataset.json", folder / "dataset.json")
    (folder / "plans.json").write_text(json.dumps({"original_median_spacing_after_transp": [2.0, 1.0, 1.0]}))
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth"):
        torch.save({"name": name}, folder / "fold_0" / name)
    shutil.copytree(_source(raw, "Beta") / "imagesTs", root / "beta_images")
    return folder


@pytest.fixture
def predict_case(model: Path, tmp_path: Path):
    """A private copy of the model folder and of Beta's test images (2 channels) per test."""
    model_copy, images = tmp_path / "model", tmp_path / "images"
    shutil.copytree(model, model_copy)
    shutil.copytree(model.parents[1] / "beta_images", images)
    return model_copy, images, tmp_path / "predictions"


def _predict(model: Path, images: Path, output: Path, task: str = "Beta", *extra: str):
    return run_cli(["predict", "--task", task, "-i", str(images), "-o", str(output), "-m", str(model),
                    "-device", "cpu", "-npp", "1", "-nps", "1", *extra])


def _model_json(model: Path, text: str) -> None:
    (model / "dataset.json").write_text(text)


def _foreign_output(output: Path) -> None:
    output.mkdir()
    (output / "my_segmentation.nii.gz").write_bytes(b"precious")


def _other_task_output(output: Path) -> None:
    output.mkdir()
    (output / "dataset.json").write_text(json.dumps({"labels": ALPHA_LABELS, "file_ending": ".nii.gz",
                                                      "nnunet_ext_task": {"task": "Alpha"}}))


PREDICT_CASES = {
    # name: (change(model, images, output), extra CLI arguments, task, needles)
    "model_without_checkpoint_final": (
        lambda m, i, o: (m / "fold_0" / "checkpoint_final.pth").unlink(), [], "Beta",
        ["no checkpoint_final.pth in fold_0", "fold_0: checkpoint_best.pth, checkpoint_latest.pth",
         "-chk checkpoint_best.pth"]),
    "truncated_checkpoint": (lambda m, i, o: _truncate(m / "fold_0" / "checkpoint_final.pth"), [], "Beta",
                             ["checkpoint_final.pth is truncated", "-chk checkpoint_best.pth"]),
    "missing_fold": (lambda m, i, o: None, ["-f", "3"], "Beta", ["no checkpoint_final.pth in fold_3"]),
    "fold_not_a_number": (lambda m, i, o: None, ["-f", "0;id"], "Beta", ["a fold is a number"]),
    "checkpoint_as_a_path": (lambda m, i, o: None, ["-chk", "../../../etc/passwd"], "Beta", ["not a path"]),
    "model_dataset_json_invalid": (lambda m, i, o: _model_json(m, "{not json"), [], "Beta",
                                   ["dataset.json cannot be read as JSON"]),
    "model_without_plans": (lambda m, i, o: (m / "plans.json").unlink(), [], "Beta",
                            ["plans.json cannot be read", "restore it from nnUNet_preprocessed"]),
    "model_folder_missing": (lambda m, i, o: shutil.rmtree(m), [], "Beta",
                             ["is not a trained nnU-Net model folder"]),
    "task_name_with_quotes": (lambda m, i, o: None, [], 'a"; touch pwned; "',
                              ["Unknown task 'a\"; touch pwned; \"'", "Beta"]),
    "task_name_with_newline": (lambda m, i, o: None, [], "Beta\nrm -rf /", ["Unknown task 'Beta\\nrm -rf /'"]),
    "part_id_not_below_num_parts": (lambda m, i, o: None, ["-num_parts", "2", "-part_id", "2"], "Beta",
                                    ["-part_id 2 with -num_parts 2", "from 0 to 1"]),
    "no_parts": (lambda m, i, o: None, ["-num_parts", "0"], "Beta", ["-num_parts 0", "1 or more"]),
    "step_size_zero": (lambda m, i, o: None, ["-step_size", "0"], "Beta", ["-step_size 0.0", "above 0"]),
    "negative_processes": (lambda m, i, o: None, ["-nps", "-1"], "Beta", ["-nps -1", "0 or more"]),
    "truncated_input_image": (lambda m, i, o: _truncate(i / "c2_0001.nii.gz"), [], "Beta",
                              ["c2_0001.nii.gz", "truncated"]),
    "text_file_as_input": (lambda m, i, o: (i / "c2_0000.nii.gz").write_text("hello"), [], "Beta",
                           ["c2_0000.nii.gz", "cannot be decoded"]),
    "nan_in_input": (lambda m, i, o: (_write(np.full(SHAPE, np.nan, np.float32), i / "c2_0001.nii.gz"),
                                      _use_reader(m / "dataset.json", "NibabelIO")), [], "Beta",
                     ["c2_0001.nii.gz", "NaN or infinite"]),
    "input_channel_with_other_shape": (lambda m, i, o: _write(_intensities(1, (8, 15, 16)), i / "c2_0001.nii.gz"),
                                       [], "Beta", ["c2_0001.nii.gz", "shape"]),
    "2d_input_for_a_3d_model": (lambda m, i, o: [_write(_intensities(c, SHAPE[1:]), i / f"c2_{c:04d}.nii.gz")
                                                 for c in range(2)], [], "Beta", ["a 2D image in a 3D dataset"]),
    "missing_channel_file": (lambda m, i, o: (i / "c2_0001.nii.gz").unlink(), [], "Beta",
                             ["channel files [0]", "task 'Beta' needs 2 channels"]),
    "channel_numbers_with_a_gap": (lambda m, i, o: (i / "c2_0001.nii.gz").rename(i / "c2_0002.nii.gz"), [], "Alpha",
                                   ["channel files [0, 2]", "task 'Alpha' needs 1 (or 2, already padded)"]),
    "input_folder_missing": (lambda m, i, o: shutil.rmtree(i), [], "Beta", ["does not exist"]),
    "output_with_foreign_content": (lambda m, i, o: _foreign_output(o), [], "Beta",
                                    ["not written by 'nnunet-ext predict'", "my_segmentation.nii.gz"]),
    "output_with_another_tasks_predictions": (lambda m, i, o: _other_task_output(o), [], "Beta",
                                              ["holds predictions of task 'Alpha'"]),
    "continue_into_another_tasks_predictions": (lambda m, i, o: _other_task_output(o), ["--continue_prediction"],
                                                "Beta", ["holds predictions of task 'Alpha'"]),
}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_predict_refuses_hostile_input_before_writing(predict_case, case: str, monkeypatch) -> None:
    model, images, output = predict_case
    change, extra, task, needles = PREDICT_CASES[case]
    change(model, images, output)
    monkeypatch.setattr("nnunet_ext.compat.nnunet_predictor", _no_predictor)
    before = snapshot(model, images, output)
    outcome = _predict(model, images, output, task, *extra)
    assert_refused(outcome, needles, before=before, after=snapshot(model, images, output),
                   absent=[] if output.exists() else [output], clean=[output.parent])
    _error_line(outcome, "predict")
    assert not (Path.cwd() / "pwned").exists()


def _no_predictor(*args, **kwargs):
    raise AssertionError("the predictor was built although the input should have been refused")


# merged values of the model fixture: liver 1, kidney 2 (Alpha), spleen 3 (Beta). What the stand-in network
# predicts, in merged values: as Alpha kidney in slices 0-3; as Beta spleen in slices 2-5 and liver in slice 6
# (so the two tasks overlap in slices 2-3); slice 7 is background for both
_FAKE_MAPS = {0: [(slice(0, 4), 2)], 1: [(slice(2, 6), 3), (slice(6, 7), 1)]}
_ANNOTATED = [[True, True, True, False], [True, True, False, True]]  # Alpha, Beta over merged classes 0-3
ARGS_FILE = "predict_from_raw_data_args.json"


class _FakePredictor:
    """Stands in for nnU-Net's predictor of a universal model; records its arguments."""

    calls: list[dict] = []

    def __init__(self, *args, **kwargs) -> None:
        import torch

        _FakePredictor.calls.append({"predictor": args})
        self.network = type("Net", (), {"set_task": lambda self, task_id: None,
                                        "annotated_classes": torch.tensor(_ANNOTATED)})()
        self.trainer_name = "nnUNetUniversalTrainer"
        self.configuration_manager = type("Configuration", (), {"previous_stage_name": None})()

    def initialize_from_trained_model_folder(self, folder, folds, checkpoint_name):
        _FakePredictor.calls.append({"folds": tuple(folds), "checkpoint": checkpoint_name})


def _fake_map(task_id: int, classes: list[int]) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    for rows, value in _FAKE_MAPS[task_id]:
        label[rows] = classes.index(value)
    return label


def _fake_predict_stacked_cases(predictor, network, block_channels, image_files, case_ids, write_case,
                                save_probabilities=False, *args) -> None:
    """Stands in for nnU-Net's prediction and export: per case and task, the map of ``_FAKE_MAPS`` in the task's
    block class indices (one-hot probabilities), handed to the writer with the geometry nnU-Net's reader
    gives the case's first channel, as nnU-Net's export hands it over."""
    from nnunet_ext import compat

    _FakePredictor.calls.append({"stacked_tasks": network.task_ids, "block_channels": list(block_channels),
                                 "cases": list(case_ids), "inputs": [[Path(f).name for f in files]
                                                                     for files in image_files]})
    for files, case_id in zip(image_files, case_ids):
        reader = compat.image_reader_writer(None, os.fspath(files[0]))
        _, properties = reader.read_images([os.fspath(files[0])])
        blocks = []
        for task_id, classes in zip(network.task_ids, network.classes):
            segmentation = _fake_map(task_id, classes)
            probabilities = np.moveaxis(np.eye(len(classes), dtype=np.float32)[segmentation], -1, 0)
            blocks.append((segmentation, probabilities if save_probabilities else None))
        write_case(case_id, blocks, properties, reader)


def _use_fakes(monkeypatch) -> None:
    monkeypatch.setattr("nnunet_ext.compat.nnunet_predictor", _FakePredictor)
    monkeypatch.setattr("nnunet_ext.compat.predict_stacked_cases", _fake_predict_stacked_cases)
    monkeypatch.setattr("nnunet_ext.compat.probabilities_resampled_by_interpolation", lambda predictor: True)


@pytest.fixture
def fake_predictor(monkeypatch):
    _FakePredictor.calls = []
    _use_fakes(monkeypatch)
    return _FakePredictor


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _outputs(folder: Path) -> dict[str, str]:
    """Checksums of a prediction folder's files except the recorded arguments (which name the folder)."""
    return {name: digest for name, digest in _checksums(folder).items() if not name.endswith(ARGS_FILE)}


def _more_cases(images: Path, *cases: str) -> None:
    for case in cases:
        for channel in sorted(images.glob("c2_*.nii.gz")):
            shutil.copy(channel, images / channel.name.replace("c2_", f"{case}_"))


def test_predict_with_chk_best_when_final_is_missing(predict_case, fake_predictor) -> None:
    model, images, output = predict_case
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    before = snapshot(images)
    outcome = _predict(model, images, output, "Beta", "-chk", "checkpoint_best.pth")
    assert outcome.returncode == 0, outcome.output
    assert {"folds": (0,), "checkpoint": "checkpoint_best.pth"} in fake_predictor.calls
    label = _read(output / "c2.nii.gz")
    assert (label[2:6] == 1).all() and (label[6] == 2).all() and (label[:2] == 0).all() and (label[7] == 0).all()
    written = json.loads((output / "dataset.json").read_text())
    assert written["labels"] == BETA_LABELS and written["nnunet_ext_task"]["task"] == "Beta"
    assert (output / "plans.json").read_bytes() == (model / "plans.json").read_bytes()
    arguments = json.loads((output / ARGS_FILE).read_text())
    assert arguments["overwrite"] and arguments["num_parts"] == 1 and not arguments["save_probabilities"]
    assert arguments["nnunet_ext_predict"]["checkpoint"] == "checkpoint_best.pth"
    assert snapshot(images) == before and not temporaries(output.parent)
    # an earlier prediction of the same task is ours: predicting again replaces its files
    again = _predict(model, images, output, "Beta", "-chk", "checkpoint_best.pth")
    assert again.returncode == 0, again.output
    assert sorted(p.name for p in output.iterdir()) == ["c2.nii.gz", "dataset.json", "plans.json", ARGS_FILE]


def test_predict_pads_a_one_channel_task_to_the_merged_channel_count(predict_case, fake_predictor) -> None:
    model, images, output = predict_case
    (images / "c2_0001.nii.gz").unlink()
    outcome = _predict(model, images, output, "Alpha")
    assert outcome.returncode == 0, outcome.output
    stacked = next(call for call in fake_predictor.calls if "inputs" in call)
    assert stacked["inputs"] == [["c2_0000.nii.gz", "c2_0001.nii.gz"]] and stacked["stacked_tasks"] == (0,)
    label = _read(output / "c2.nii.gz")
    assert (label[:4] == 2).all() and (label[4:] == 0).all()  # Alpha's own kidney value


def test_probabilities_are_in_the_tasks_label_order(predict_case, fake_predictor) -> None:
    """Beta's labels are background 0, spleen 1, liver 2; its block of merged classes is background, liver (1),
    spleen (3): the .npz channels follow Beta's values, and the .pkl holds the case's properties."""
    from nnunet_ext import compat

    model, images, output = predict_case
    outcome = _predict(model, images, output, "Beta", "--save_probabilities")
    assert outcome.returncode == 0, outcome.output
    assert next(call for call in fake_predictor.calls if "block_channels" in call)["block_channels"] == [3]
    probabilities = np.load(output / "c2.npz")["probabilities"]
    assert probabilities.shape == (3, *SHAPE) and probabilities.dtype == np.float32
    assert np.array_equal(probabilities.argmax(0), _read(output / "c2.nii.gz"))
    assert np.allclose(probabilities.sum(0), 1)
    assert compat.load_case_properties(output / "c2.pkl")["sitk_stuff"]["spacing"] == SPACING
    assert json.loads((output / ARGS_FILE).read_text())["save_probabilities"] is True


def test_ctrl_c_mid_predict_leaves_whole_cases_and_continue_finishes(predict_case, fake_predictor,
                                                                     monkeypatch) -> None:
    from nnunet_ext.tasks import predict as predict_module

    model, images, output = predict_case
    _more_cases(images, "c3", "c4")
    reference = output.parent / "reference"
    assert _predict(model, images, reference).returncode == 0
    before = snapshot(model, images)
    monkeypatch.setattr(predict_module, "write_segmentation", _InterruptAfter(predict_module.write_segmentation, 2))
    outcome = _predict(model, images, output)
    assert_refused(outcome, ["Interrupted"], before=before, after=snapshot(model, images), clean=[output.parent])
    # what nnUNetv2_predict leaves: the folder's metadata and the finished case, each file complete
    assert sorted(p.name for p in output.iterdir()) == ["c2.nii.gz", "dataset.json", "plans.json", ARGS_FILE]
    assert _outputs(output) == {k: v for k, v in _outputs(reference).items() if not k.startswith(("c3", "c4"))}
    monkeypatch.undo()
    _use_fakes(monkeypatch)
    fake_predictor.calls.clear()
    rerun = _predict(model, images, output, "Beta", "--continue_prediction")
    assert rerun.returncode == 0, rerun.output
    assert "1 already there" in rerun.stdout
    assert next(call for call in fake_predictor.calls if "cases" in call)["cases"] == ["c3", "c4"]
    assert _outputs(output) == _outputs(reference)
    assert json.loads((output / ARGS_FILE).read_text())["overwrite"] is False


def test_parts_split_the_cases_as_nnunet_and_continue_skips_finished_ones(predict_case, fake_predictor) -> None:
    model, images, output = predict_case
    _more_cases(images, "c0", "c1", "c3")
    for part in (1, 0):
        fake_predictor.calls.clear()
        outcome = _predict(model, images, output, "Beta", "-num_parts", "2", "-part_id", str(part))
        assert outcome.returncode == 0, outcome.output
        cases = next(call for call in fake_predictor.calls if "cases" in call)["cases"]
        assert cases == [["c0", "c2"], ["c1", "c3"]][part]  # sorted(case ids)[part_id::num_parts]
    reference = output.parent / "reference"
    assert _predict(model, images, reference).returncode == 0
    assert _outputs(output) == _outputs(reference)
    fake_predictor.calls.clear()
    done = _predict(model, images, output, "Beta", "--continue_prediction", "--save_probabilities")
    assert done.returncode == 0, done.output  # the .npz files are missing: every case is predicted again
    assert next(call for call in fake_predictor.calls if "cases" in call)["cases"] == ["c0", "c1", "c2", "c3"]
    fake_predictor.calls.clear()
    again = _predict(model, images, output, "Beta", "--continue_prediction", "--save_probabilities")
    assert again.returncode == 0 and "4 already there" in again.stdout
    assert not [call for call in fake_predictor.calls if "cases" in call or "folds" in call]  # no model loaded


# ---------------------------------------------------------------------------- predict --task all / A,B


def _predict_several(model: Path, images: Path, output: Path, tasks: str = "all", *extra: str):
    return run_cli(["predict", "--task", tasks, "-i", str(images), "-o", str(output), "-m", str(model),
                    "-device", "cpu", "-npp", "1", "-nps", "1", *extra])


def _single_task_output(output: Path) -> None:
    output.mkdir()
    (output / "c2.nii.gz").write_bytes(b"an earlier single-task prediction")
    (output / "dataset.json").write_text(json.dumps({"labels": BETA_LABELS, "file_ending": ".nii.gz",
                                                      "nnunet_ext_task": {"task": "Beta"}}))


def _task_folder_with(output: Path, task: str, writer) -> None:
    output.mkdir()
    writer(output / task)


def _no_tasks_section(model: Path) -> None:
    content = json.loads((model / "dataset.json").read_text())
    content.pop("tasks")
    (model / "dataset.json").write_text(json.dumps(content))


ALL_TASKS_CASES = {
    # name: (change(model, images, output), --task value, extra CLI arguments, needles)
    "unknown_task_in_the_list": (lambda m, i, o: None, "Alpha,Gamma,Delta", [],
                                 ["Unknown tasks 'Gamma', 'Delta' in --task", "['Alpha', 'Beta']"]),
    "all_with_names": (lambda m, i, o: None, "all,Alpha", [], ["'all' already means every task"]),
    "empty_name_in_the_list": (lambda m, i, o: None, "Alpha,,Beta", [], ["empty task name"]),
    "task_listed_twice": (lambda m, i, o: None, "Beta,Alpha,Beta", [], ["lists 'Beta' more than once"]),
    "combine_with_one_task": (lambda m, i, o: None, "Beta", ["--combine"], ["--combine merges the label maps of "
                                                                           "several tasks"]),
    "model_not_trained_on_a_merged_dataset": (lambda m, i, o: _no_tasks_section(m), "all", [],
                                              ["not trained on a merged multi-task dataset", "nnUNetv2_predict"]),
    "case_without_every_tasks_channels": (lambda m, i, o: (i / "c2_0001.nii.gz").unlink(), "all", [],
                                          ["channel files [0]", "task 'Beta' needs 2 channels"]),
    "output_with_foreign_content": (lambda m, i, o: _foreign_output(o), "all", [],
                                    ["not written by 'nnunet-ext predict'", "my_segmentation.nii.gz"]),
    "output_holding_a_single_task_prediction": (lambda m, i, o: _single_task_output(o), "Alpha,Beta", [],
                                                ["holds a prediction of the single task 'Beta'",
                                                 "one subfolder each"]),
    "task_folder_with_foreign_content": (lambda m, i, o: _task_folder_with(o, "Beta", _foreign_output), "all", [],
                                         ["Beta", "not written by 'nnunet-ext predict'", "my_segmentation.nii.gz"]),
    "task_folder_with_another_tasks_predictions": (lambda m, i, o: _task_folder_with(o, "Beta", _other_task_output),
                                                   "all", [], ["holds predictions of task 'Alpha'"]),
    "output_is_a_file": (lambda m, i, o: o.write_bytes(b"x"), "all", [], ["exists and is not a folder"]),
    "part_id_negative": (lambda m, i, o: None, "all", ["-num_parts", "2", "-part_id", "-1"], ["-part_id -1"]),
}


@pytest.mark.parametrize("case", list(ALL_TASKS_CASES))
def test_predict_several_tasks_refuses_bad_input_before_writing(predict_case, case: str, monkeypatch) -> None:
    model, images, output = predict_case
    change, tasks, extra, needles = ALL_TASKS_CASES[case]
    change(model, images, output)
    monkeypatch.setattr("nnunet_ext.compat.nnunet_predictor", _no_predictor)
    before = snapshot(model, images, output)
    outcome = _predict_several(model, images, output, tasks, *extra)
    assert_refused(outcome, needles, before=before, after=snapshot(model, images, output),
                   absent=[] if output.exists() else [output], clean=[output.parent])
    _error_line(outcome, "predict")


class _NotConditioned(_FakePredictor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.network, self.trainer_name = object(), "nnUNetTrainer"


class _Cascade(_FakePredictor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.configuration_manager.previous_stage_name = "3d_lowres"


@pytest.mark.parametrize("predictor, needles", [
    (_NotConditioned, ["is not task-conditioned (trainer nnUNetTrainer)", "nnUNetv2_predict"]),
    (_Cascade, ["is a cascade stage", "3d_lowres"])])
def test_predict_refuses_a_model_it_cannot_condition_before_writing(predict_case, predictor, needles,
                                                                   monkeypatch) -> None:
    model, images, output = predict_case
    monkeypatch.setattr("nnunet_ext.compat.nnunet_predictor", predictor)
    before = snapshot(model, images)
    for outcome in (_predict_several(model, images, output), _predict(model, images, output)):
        assert_refused(outcome, needles, before=before, after=snapshot(model, images), absent=[output],
                       clean=[output.parent])
        _error_line(outcome, "predict")


@pytest.mark.parametrize("order", ["Alpha,Beta", "Beta,Alpha"])
def test_combine_gives_overlaps_to_the_first_listed_task(predict_case, fake_predictor, order: str) -> None:
    model, images, output = predict_case
    outcome = _predict_several(model, images, output, order, "--combine")
    assert outcome.returncode == 0, outcome.output
    assert sorted(p.name for p in output.iterdir()) == ["Alpha", "Beta", "combined"]
    combined = _read(output / "combined" / "c2.nii.gz")
    assert (combined[:2] == 2).all() and (combined[4:6] == 3).all() and (combined[6] == 1).all()
    assert (combined[2:4] == (2 if order == "Alpha,Beta" else 3)).all()  # the overlap: first listed wins
    assert (combined[7] == 0).all()
    alpha, beta = _read(output / "Alpha" / "c2.nii.gz"), _read(output / "Beta" / "c2.nii.gz")
    assert (alpha[:4] == 2).all() and (alpha[4:] == 0).all()  # Alpha's own kidney value
    assert (beta[2:6] == 1).all() and (beta[:2] == 0).all() and (beta[6] == 2).all()  # Beta's spleen, liver
    written = json.loads((output / "combined" / "dataset.json").read_text())
    assert written["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    assert written["nnunet_ext_task"]["tasks"] == order.split(",")
    assert json.loads((output / "Beta" / "dataset.json").read_text())["labels"] == BETA_LABELS
    for folder in ("Alpha", "Beta", "combined"):  # each folder as nnUNetv2_predict's: plans and arguments
        assert (output / folder / "plans.json").read_bytes() == (model / "plans.json").read_bytes()
        assert json.loads((output / folder / ARGS_FILE).read_text())["output_folder_or_list_of_truncated_output_"
                                                                      "files"] == str(output / folder)


def test_several_tasks_equal_single_task_runs_and_rerun_replaces(predict_case, fake_predictor) -> None:
    model, images, output = predict_case
    before = snapshot(images)
    options = ["--save_probabilities", "-num_parts", "2", "-part_id", "0"]
    outcome = _predict_several(model, images, output, "Beta", "--task", "Alpha", *options)  # repeated --task
    assert outcome.returncode == 0, outcome.output
    stacked = next(call for call in fake_predictor.calls if "stacked_tasks" in call)
    assert stacked["stacked_tasks"] == (1, 0) and stacked["block_channels"] == [3, 3]  # background + 2 annotated
    for task in ("Alpha", "Beta"):  # a single-task run writes the same files
        single = output.parent / f"single_{task}"
        assert _predict(model, images, single, task, *options).returncode == 0
        assert _outputs(single) == _outputs(output / task)
        assert sorted(_outputs(single)) == ["c2.nii.gz", "c2.npz", "c2.pkl", "dataset.json", "plans.json"]
    again = _predict_several(model, images, output, "all", "--combine")  # an earlier output: files replaced
    assert again.returncode == 0, again.output
    assert sorted(p.name for p in output.iterdir()) == ["Alpha", "Beta", "combined"]
    assert _outputs(output / "Alpha") == _outputs(output.parent / "single_Alpha")  # the .npz is kept
    one = _predict(model, images, output, "Alpha")  # one task into the several-task layout: pointed to its folder
    assert one.returncode == 2 and "holds predictions of several tasks" in one.stderr
    assert f"-o {output / 'Alpha'}" in one.stderr
    assert snapshot(images) == before and not temporaries(output.parent)


def test_ctrl_c_mid_several_task_predict_leaves_whole_files_and_continue_finishes(predict_case, fake_predictor,
                                                                                 monkeypatch) -> None:
    from nnunet_ext.tasks import predict as predict_module

    model, images, output = predict_case
    _more_cases(images, "c3")
    reference = output.parent / "reference"
    assert _predict_several(model, images, reference, "all", "--combine").returncode == 0
    before = snapshot(model, images)
    # c2: Alpha's, Beta's and the combined map written; c3: Alpha's written, then ^C
    monkeypatch.setattr(predict_module, "write_segmentation", _InterruptAfter(predict_module.write_segmentation, 5))
    outcome = _predict_several(model, images, output, "all", "--combine")
    assert_refused(outcome, ["Interrupted"], before=before, after=snapshot(model, images), clean=[output.parent])
    written = _outputs(output)
    assert "Alpha/c3.nii.gz" in written and "Beta/c3.nii.gz" not in written
    assert written == {k: v for k, v in _outputs(reference).items() if k in written}
    monkeypatch.undo()
    _use_fakes(monkeypatch)
    fake_predictor.calls.clear()
    rerun = _predict_several(model, images, output, "all", "--combine", "--continue_prediction")
    assert rerun.returncode == 0, rerun.output
    assert next(call for call in fake_predictor.calls if "cases" in call)["cases"] == ["c3"]
    assert _outputs(output) == _outputs(reference)
    assert not temporaries(output.parent)
