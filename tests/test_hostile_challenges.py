"""Hostile inputs to ``nnunet-ext convert`` (each challenge) and ``nnunet-ext submit``.

Every refusal: exit status non-zero, a message naming the problem, no traceback, inputs
byte-identical, no partial output (the dataset folder or OUT absent, or exactly as before). Ctrl-C
leaves only whole cases (convert) or the previous submission (submit), and a rerun finishes the job;
concurrent converts into one dataset take turns and give a single run's dataset.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from challenges_helpers import predictions_like, read_array, tree_digest
from nnunet_ext import atomic_io
from nnunet_ext.challenges import common, segrap2023, submission
from nnunet_ext.challenges.replicas import (box_labels, kits_labels, write_amos22_replica, write_kits21_replica,
                                            write_segrap2023_replica, write_volume)
from nnunet_ext.testing.harness import stock_command
from nnunet_ext.testing.hostile import assert_refused, run_cli, snapshot, temporaries

SHAPE = (8, 16, 16)


# --------------------------------------------------------------------------------------
# One-case releases and ways to damage their files
# --------------------------------------------------------------------------------------


def _kits(root: Path):
    data = write_kits21_replica(root, num_labelled=1, num_test=0)
    case = data / "case_00000"
    return data, ["kits21"], {"image": case / "imaging.nii.gz", "label": case / "aggregated_MAJ_seg.nii.gz"}


def _amos(root: Path):
    base = write_amos22_replica(root, ct=1, mri=0, validation=0, test=0)
    files = {"image": base / "imagesTr" / "amos_0001.nii.gz", "label": base / "labelsTr" / "amos_0001.nii.gz",
             "json": base / "dataset.json"}
    return base, ["amos22", "--task", "1"], files


def _segrap(root: Path):
    base = write_segrap2023_replica(root, num_labelled=1)
    case = base / segrap2023.IMAGE_FOLDER / "segrap_0000"
    labels = base / (segrap2023.IMAGE_FOLDER + segrap2023.LABELS_SUFFIX)
    files = {"image": case / "image.nii.gz", "contrast": case / "image_contrast.nii.gz",
             "label": labels / "Task001" / "segrap_0000.nii.gz", "labels": labels / "Task001"}
    return base, ["segrap2023", "--task", "oar"], files


def _env(raw: Path) -> dict[str, str]:
    """The environment of a convert run into ``raw`` (created, as nnU-Net's set-up check wants)."""
    raw.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, nnUNet_raw=str(raw))


RELEASES = {"kits21": _kits, "amos22": _amos, "segrap2023": _segrap}
FOLDERS = {"kits21": "Dataset500_KiTS21", "amos22": "Dataset500_AMOS22Task1", "segrap2023": "Dataset500_SegRap2023OAR"}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def not_an_image(path: Path) -> None:
    path.write_text("patient notes, not an image\n")


def as_2d(path: Path) -> None:
    write_volume(np.zeros(SHAPE[1:], np.int16), path, spacing=(0.8, 0.8), origin=(0.0, 0.0))


def other_spacing(path: Path) -> None:
    write_volume(read_array(path), path, spacing=(0.8, 0.8, 3.0))


def other_size(path: Path) -> None:
    write_volume(np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.int16), path)


def out_of_range(path: Path) -> None:
    array = read_array(path)
    array[0, 0, 0] = 99
    write_volume(array, path)


def float_labels(path: Path) -> None:
    write_volume(np.full(SHAPE, 0.5, np.float32), path)


def nan_voxel(path: Path) -> None:
    array = read_array(path).astype(np.float32)
    array[1, 2, 3] = np.nan
    write_volume(array, path)


def delete(path: Path) -> None:
    path.unlink()


def rewrite_json(edit):
    def damage(path: Path) -> None:
        release = json.loads(path.read_text())
        edit(release)
        path.write_text(json.dumps(release))
    return damage


def drop_training_label(release: dict) -> None:
    del release["training"][0]["label"]


def drop_training_image(release: dict) -> None:
    del release["training"][0]["image"]


def image_outside_release(release: dict) -> None:
    release["training"][0]["image"] = "../../../etc/amos_0001.nii.gz"


def remove_folder(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


# challenge, file, damage, exit status, words the message must contain
CONVERT_CASES = [
    ("kits21", "image", truncate, 1, ["imaging.nii.gz", "truncated", "re-download"]),
    ("amos22", "label", truncate, 1, ["labelsTr/amos_0001.nii.gz", "truncated"]),
    ("segrap2023", "contrast", truncate, 1, ["image_contrast.nii.gz", "truncated"]),
    ("segrap2023", "contrast", empty, 1, ["image_contrast.nii.gz", "empty (0 bytes)"]),
    ("kits21", "label", not_an_image, 1, ["aggregated_MAJ_seg.nii.gz", "cannot be decoded"]),
    ("amos22", "image", as_2d, 1, ["amos_0001.nii.gz", "expected a 3D single-component image"]),
    ("segrap2023", "contrast", other_size, 1, ["image_contrast.nii.gz", "differs from image.nii.gz", "size"]),
    ("kits21", "label", other_spacing, 1, ["aggregated_MAJ_seg.nii.gz", "spacing", "resample"]),
    ("segrap2023", "label", other_spacing, 1, ["segrap_0000.nii.gz", "spacing", "leave the case out"]),
    ("kits21", "label", out_of_range, 1, ["aggregated_MAJ_seg.nii.gz", "unexpected label values [99]"]),
    ("segrap2023", "label", out_of_range, 1, ["segrap_0000.nii.gz", "unexpected label values [99]"]),
    ("amos22", "label", float_labels, 1, ["amos_0001.nii.gz", "not whole numbers"]),
    ("segrap2023", "image", nan_voxel, 1, ["image.nii.gz", "1 of its voxel values", "nan or infinite"]),
    ("kits21", "label", nan_voxel, 1, ["aggregated_MAJ_seg.nii.gz", "nan or infinite"]),
    ("kits21", "image", delete, 1, ["missing", "imaging.nii.gz"]),
    ("segrap2023", "contrast", delete, 1, ["missing", "image_contrast.nii.gz"]),
    ("amos22", "image", delete, 1, ["missing", "imagesTr/amos_0001.nii.gz"]),
    ("segrap2023", "labels", remove_folder, 2, ["Task001 not found"]),
    ("amos22", "json", delete, 2, ["does not look like the AMOS22 release", "dataset.json"]),
    ("amos22", "json", not_an_image, 2, ["dataset.json cannot be read as json"]),
    ("amos22", "json", rewrite_json(drop_training_label), 1, ["training case amos_0001 has no 'label'",
                                                              "dataset.json"]),
    ("amos22", "json", rewrite_json(drop_training_image), 1, ["needs an 'image' path", "dataset.json"]),
    ("amos22", "json", rewrite_json(image_outside_release), 1, ["inside the release", "../../../etc"]),
]


@pytest.mark.parametrize("challenge, key, damage, status, needles", CONVERT_CASES,
                         ids=[f"{c[0]}-{c[1]}-{getattr(c[2], '__name__', 'json')}" for c in CONVERT_CASES])
def test_convert_refuses_a_damaged_release(tmp_path, challenge, key, damage, status, needles):
    src, arguments, files = RELEASES[challenge](tmp_path / "release")
    damage(files[key])
    raw = tmp_path / "raw"
    raw.mkdir()
    before = snapshot(src, raw)
    outcome = run_cli(["convert", arguments[0], str(src), *arguments[1:], "-d", "500", "-np", "1"],
                      dict(os.environ, nnUNet_raw=str(raw)))
    assert outcome.returncode == status, outcome.output
    # the only case failed, so no dataset folder was created: raw is as it was (the lock file aside)
    assert_refused(outcome, needles, before=before, after=snapshot(src, raw), absent=[raw / FOLDERS[challenge]],
                   clean=[raw])


@pytest.mark.parametrize("options", [["--link"], ["-np", "2"]], ids=["link", "two-processes"])
def test_convert_refuses_truncated_files_when_linking_and_in_parallel(tmp_path, options):
    release = write_kits21_replica(tmp_path / "release", num_labelled=2, num_test=0)
    for case in ("case_00000", "case_00001"):
        truncate(release / case / "aggregated_MAJ_seg.nii.gz")
    raw, env = tmp_path / "raw", _env(tmp_path / "raw")
    before = snapshot(release, raw)
    outcome = run_cli(["convert", "kits21", str(release), "-d", "500", *options], env)
    assert outcome.returncode == 1
    assert_refused(outcome, ["failed case_00000", "failed case_00001", "truncated", "every case failed"],
                   before=before, after=snapshot(release, raw), absent=[raw / "Dataset500_KiTS21"], clean=[raw])


HOSTILE_NAMES = ['a"; touch pwned; "', "$(touch pwned)", "x\ny", "../Escape", "K i", ""]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=["quote", "substitution", "newline", "parent", "space", "empty"])
def test_convert_refuses_hostile_dataset_names_and_writes_nothing(tmp_path, name):
    src, arguments, _ = _kits(tmp_path / "release")
    raw = tmp_path / "raw"
    raw.mkdir()
    before = snapshot(src, raw)
    outcome = run_cli(["convert", "kits21", str(src), "-d", "500", "--name", name], _env(raw))
    assert_refused(outcome, ["dataset name", "letters, digits"], before=before, after=snapshot(src, raw), clean=[raw])
    assert list(raw.iterdir()) == [] and not (tmp_path / "Escape").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("argument, needles", [(["-d", "0"], ["dataset id 0", "1..999"]),
                                               (["-d", "1000"], ["dataset id 1000"]),
                                               (["-d", "500", "-np", "0"], ["-np must be at least 1"])])
def test_convert_refuses_bad_numbers(tmp_path, argument, needles):
    src, _, _ = _kits(tmp_path / "release")
    raw = tmp_path / "raw"
    raw.mkdir()
    before = snapshot(src, raw)
    outcome = run_cli(["convert", "kits21", str(src), *argument], dict(os.environ, nnUNet_raw=str(raw)))
    assert_refused(outcome, needles, before=before, after=snapshot(src, raw), clean=[raw])


def test_convert_refuses_an_nnunet_raw_inside_the_release(tmp_path):
    src, _, _ = _kits(tmp_path / "release")
    before = snapshot(src)
    outcome = run_cli(["convert", "kits21", str(src), "-d", "500"], dict(os.environ, nnUNet_raw=str(src)))
    assert_refused(outcome, ["overlap", "only read"], before=before, after=snapshot(src))


def test_convert_leaves_a_foreign_dataset_folder_alone(tmp_path):
    src, _, _ = _kits(tmp_path / "release")
    foreign = tmp_path / "raw" / "Dataset500_KiTS21"
    (foreign / "imagesTr").mkdir(parents=True)
    (foreign / "imagesTr" / "mine_0000.nii.gz").write_bytes(b"someone's work")
    before = snapshot(src, tmp_path / "raw")
    outcome = run_cli(["convert", "kits21", str(src), "-d", "500"], dict(os.environ, nnUNet_raw=str(tmp_path / "raw")))
    assert_refused(outcome, ["not written by nnunet-ext convert", "left untouched"], before=before,
                   after=snapshot(src, tmp_path / "raw"), clean=[tmp_path / "raw"])


def test_a_convert_into_a_dataset_in_use_waits_then_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "LOCK_TIMEOUT_SECONDS", 0.3)
    src, _, _ = _kits(tmp_path / "release")
    raw = tmp_path / "raw"
    raw.mkdir()
    before = snapshot(src, raw)
    with atomic_io.exclusive(raw / "Dataset500_KiTS21", "nnunet-ext convert"):  # another run holds it
        outcome = run_cli(["convert", "kits21", str(src), "-d", "500"], dict(os.environ, nnUNet_raw=str(raw)))
    assert_refused(outcome, ["waiting up to", "in use by another nnunet-ext convert", "nothing was written"],
                   before=before, after=snapshot(src, raw), absent=[raw / "Dataset500_KiTS21"], clean=[raw])


def test_two_concurrent_converts_take_turns_and_give_a_single_runs_dataset(tmp_path):
    release = write_kits21_replica(tmp_path / "release", num_labelled=3, num_test=0)
    assert run_cli(["convert", "kits21", str(release), "-d", "500"], _env(tmp_path / "single")).returncode == 0
    env = dict(_env(tmp_path / "raw"), OMP_NUM_THREADS="1")
    command = [stock_command("nnunet-ext"), "convert", "kits21", str(release), "-d", "500", "-np", "1"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert not any("Traceback" in output for output in outputs)
    # each case was written once: one run converted all three, the other found them complete
    assert sorted("3 converted, 0 skipped" in o for o in outputs) == [False, True], outputs
    assert any("0 converted, 3 skipped" in o for o in outputs), outputs
    assert tree_digest(tmp_path / "raw" / "Dataset500_KiTS21") == tree_digest(tmp_path / "single" / "Dataset500_KiTS21")
    assert not temporaries(tmp_path / "raw")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_ctrl_c_mid_convert_leaves_whole_cases_and_a_rerun_finishes(monkeypatch, tmp_path, processes):
    release = write_kits21_replica(tmp_path / "release", num_labelled=3, num_test=1)
    arguments = ["convert", "kits21", str(release), "-d", "500", "-np", processes]
    assert run_cli(arguments, _env(tmp_path / "single")).returncode == 0
    raw, inputs = tmp_path / "raw", snapshot(release)
    placed, place = [], common._place

    def interrupted_at_the_fourth_file(source, target, mode):
        placed.append(target)
        if len(placed) == 4:
            raise KeyboardInterrupt
        place(source, target, mode)

    monkeypatch.setattr(common, "_place", interrupted_at_the_fourth_file)
    outcome = run_cli(arguments, _env(raw))
    assert outcome.returncode == 130 and "Traceback" not in outcome.output
    assert "Interrupted after" in outcome.output and "Run the same command again to finish" in outcome.output
    folder = raw / "Dataset500_KiTS21"
    assert not (folder / "dataset.json").exists() and not temporaries(raw) and snapshot(release) == inputs
    cases = {p.name[:10] for sub in ("imagesTr", "labelsTr", "imagesTs") for p in (folder / sub).iterdir()}
    assert 1 <= len(cases) <= 2  # the files written before the interrupt, as whole cases only
    for case in cases:  # every case present is complete and byte-identical to its source
        expected = tree_digest(tmp_path / "single" / "Dataset500_KiTS21")
        present = {k: v for k, v in tree_digest(folder).items() if case in k}
        assert present == {k: v for k, v in expected.items() if case in k}
    # a temporary of a run killed on another host long ago is removed by the rerun
    stale = folder / "imagesTr" / f"{atomic_io.TEMP_PREFIX}otherhost.12345.deadbeef.case_00001_0000.nii.gz"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    monkeypatch.setattr(common, "_place", place)
    rerun = run_cli(arguments, dict(os.environ, nnUNet_raw=str(raw)))
    assert rerun.returncode == 0, rerun.output
    assert f"{len(cases)} skipped (already complete, verified)" in rerun.output
    assert tree_digest(folder) == tree_digest(tmp_path / "single" / "Dataset500_KiTS21")
    assert not temporaries(raw)


@pytest.mark.slow  # ~9 s: two cold starts of nnunet-ext and a worker pool; the in-process tests above cover the logic
def test_a_real_ctrl_c_stops_the_worker_pool_without_tracebacks_and_a_rerun_finishes(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: workers and main process alike."""
    release = write_kits21_replica(tmp_path / "release", num_labelled=12, num_test=0, shape=(32, 96, 96))
    env = dict(_env(tmp_path / "raw"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [stock_command("nnunet-ext"), "convert", "kits21", str(release), "-d", "500", "-np", "2"]
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        run = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while "[2/12]" not in log.read_text() and run.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=120) == 130, log.read_text()
    output = log.read_text()
    assert "Traceback" not in output and "Interrupted after" in output, output
    folder = tmp_path / "raw" / "Dataset500_KiTS21"
    images = {p.name[:10] for p in (folder / "imagesTr").iterdir()}
    assert images == {p.name[:10] for p in (folder / "labelsTr").iterdir()} and 2 <= len(images) < 12
    assert not temporaries(tmp_path / "raw")
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"{len(images)} skipped (already complete, verified)" in rerun.stdout, rerun.stdout
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 12


def test_rerun_redoes_an_output_that_is_not_a_complete_image(tmp_path):
    """A case file cut short at the same size (kill -9 on a file system that preallocates) is redone, not trusted."""
    release = write_kits21_replica(tmp_path / "release", num_labelled=2, num_test=0)
    env = _env(tmp_path / "raw")
    arguments = ["convert", "kits21", str(release), "-d", "500"]
    assert run_cli(arguments, env).returncode == 0
    folder = tmp_path / "raw" / "Dataset500_KiTS21"
    reference = tree_digest(folder)
    output = folder / "imagesTr" / "case_00001_0000.nii.gz"
    data = output.read_bytes()
    output.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # same size, zero tail
    rerun = run_cli(arguments, env)
    assert rerun.returncode == 0 and "case_00001: converted" in rerun.output and "case_00000: skipped" in rerun.output
    assert tree_digest(folder) == reference


# --------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------


@pytest.fixture
def kits_predictions(tmp_path):
    """A KiTS21 test folder (release layout, 2 cases) and nnU-Net-style predictions for it."""
    data = write_kits21_replica(tmp_path / "release", num_labelled=0, num_test=2)
    predictions = predictions_like(tmp_path / "pred", {p.name: p / "imaging.nii.gz" for p in sorted(data.iterdir())},
                                   kits_labels)
    return data, predictions


def four_d(path: Path) -> None:
    write_volume(np.zeros((2, *SHAPE), np.uint8), path, spacing=(0.8, 0.8, 2.5, 1.0), origin=(0.0,) * 4)


def kits_value_7(path: Path) -> None:
    write_volume(np.full(SHAPE, 7, np.uint8), path)


# damage to case_00000's prediction (or to the test image), exit status, words the message must contain
SUBMIT_CASES = [
    ("pred", truncate, 1, ["case_00000.nii.gz", "truncated", "predict this case again"]),
    ("pred", empty, 1, ["case_00000.nii.gz", "empty (0 bytes)"]),
    ("pred", not_an_image, 1, ["case_00000.nii.gz", "cannot be read"]),
    ("pred", float_labels, 1, ["case_00000.nii.gz", "not whole numbers", "not probabilities"]),
    ("pred", kits_value_7, 1, ["case_00000.nii.gz", "label values [7] outside the kits21 label space"]),
    ("pred", other_size, 1, ["case_00000.nii.gz", "grid differs from the test image", "size"]),
    ("pred", four_d, 1, ["case_00000.nii.gz", "expected a 3d label map"]),
    ("pred", delete, 1, ["missing: no prediction case_00000.nii.gz"]),
    ("image", not_an_image, 2, ["--images", "imaging.nii.gz cannot be read"]),
]


@pytest.mark.parametrize("where, damage, status, needles", SUBMIT_CASES,
                         ids=[f"{c[0]}-{c[1].__name__}" for c in SUBMIT_CASES])
def test_submit_refuses_a_malformed_prediction_and_writes_nothing(tmp_path, kits_predictions, where, damage, status,
                                                                 needles):
    data, predictions = kits_predictions
    damage(predictions / "case_00000.nii.gz" if where == "pred" else data / "case_00000" / "imaging.nii.gz")
    before = snapshot(data, predictions)
    outcome = run_cli(["submit", "kits21", str(predictions), str(tmp_path / "sub"), "--images", str(data)])
    assert outcome.returncode == status, outcome.output
    assert_refused(outcome, needles, before=before, after=snapshot(data, predictions), absent=[tmp_path / "sub"],
                   clean=[tmp_path])


def test_segrap_export_refuses_values_outside_the_task(tmp_path):
    release = write_segrap2023_replica(tmp_path / "release", num_labelled=0, num_test=1)
    images = release / segrap2023.IMAGE_FOLDER
    predictions = predictions_like(tmp_path / "pred", {"segrap_0000": images / "segrap_0000" / "image.nii.gz"},
                                   lambda rng: box_labels(rng, (1, 2, 3)))
    before = snapshot(release, predictions)
    outcome = run_cli(["submit", "segrap2023", str(predictions), str(tmp_path / "sub"), "--task", "gtv",
                       "--images", str(images)])
    assert_refused(outcome, ["segrap_0000.nii.gz holds label values [3]", "nothing was written"], before=before,
                   after=snapshot(release, predictions), absent=[tmp_path / "sub"], clean=[tmp_path])


def _foreign_out(tmp_path, predictions):
    out = tmp_path / "sub"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    return out, ["notes.txt", "left untouched"]


def _out_inside_predictions(tmp_path, predictions):
    return predictions / "sub", ["overlaps the prediction folder"]


def _out_is_a_file(tmp_path, predictions):
    (tmp_path / "sub").write_text("a file")
    return tmp_path / "sub", ["exists and is not a folder"]


def _out_is_the_release(tmp_path, predictions):
    return tmp_path / "release", ["overlaps the --images folder"]


@pytest.mark.parametrize("make_out", [_foreign_out, _out_inside_predictions, _out_is_a_file, _out_is_the_release])
def test_submit_refuses_an_output_it_must_not_overwrite(tmp_path, kits_predictions, make_out):
    data, predictions = kits_predictions
    out, needles = make_out(tmp_path, predictions)
    before = snapshot(tmp_path)
    outcome = run_cli(["submit", "kits21", str(predictions), str(out), "--images", str(data)])
    assert outcome.returncode == 2
    assert_refused(outcome, needles, before=before, after=snapshot(tmp_path), clean=[tmp_path])


def test_check_only_reports_a_truncated_float_or_3d_submission(tmp_path, kits_predictions):
    data, predictions = kits_predictions
    assert run_cli(["submit", "kits21", str(predictions), str(tmp_path / "sub"), "--images", str(data)]).returncode == 0
    truncate(tmp_path / "sub" / "case_00000.nii.gz")  # ITK would read it without complaint
    float_labels(tmp_path / "sub" / "case_00001.nii.gz")
    before = snapshot(tmp_path)
    outcome = run_cli(["submit", "kits21", "--check-only", str(tmp_path / "sub"), "--images", str(data)])
    assert_refused(outcome, ["case_00000.nii.gz cannot be read", "truncated",
                             "case_00001: values are not whole numbers", "invalid: 3 problem(s)"],
                   before=before, after=snapshot(tmp_path))
    release = write_segrap2023_replica(tmp_path / "segrap", num_labelled=0, num_test=1)
    write_volume(np.zeros(SHAPE, np.uint8), tmp_path / "segrap_sub" / "segrap_0000.mha")
    before = snapshot(tmp_path)
    outcome = run_cli(["submit", "segrap2023", "--task", "gtv", "--check-only", str(tmp_path / "segrap_sub"),
                       "--images", str(release / segrap2023.IMAGE_FOLDER)])
    assert_refused(outcome, ["expected a 4d image of 2 stacked masks, got a 3d image"], before=before,
                   after=snapshot(tmp_path))


def test_ctrl_c_mid_submit_keeps_the_previous_submission_and_a_rerun_replaces_it(monkeypatch, tmp_path,
                                                                                kits_predictions):
    data, predictions = kits_predictions
    out = tmp_path / "sub"
    arguments = ["submit", "kits21", str(predictions), str(out), "--images", str(data)]
    assert run_cli(arguments).returncode == 0
    previous = snapshot(out)
    new = read_array(predictions / "case_00001.nii.gz")
    new[new == 3] = 2
    reference = sitk.ReadImage(str(data / "case_00001" / "imaging.nii.gz"))
    write_volume(new, predictions / "case_00001.nii.gz", spacing=reference.GetSpacing(), origin=reference.GetOrigin())
    written, write = [], submission._write

    def interrupted_at_the_second_file(*arguments_):
        written.append(arguments_[-1])
        if len(written) == 2:
            raise KeyboardInterrupt
        write(*arguments_)

    monkeypatch.setattr(submission, "_write", interrupted_at_the_second_file)
    outcome = run_cli(arguments)
    assert outcome.returncode == 130 and "Traceback" not in outcome.output
    assert "Interrupted: nothing was written" in outcome.output
    assert snapshot(out) == previous and not temporaries(tmp_path)
    monkeypatch.setattr(submission, "_write", write)
    assert run_cli(arguments).returncode == 0
    assert np.array_equal(read_array(out / "case_00001.nii.gz"), new)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["pred", "release", "sub"]


def test_a_submit_into_an_output_in_use_waits_then_is_refused(monkeypatch, tmp_path, kits_predictions):
    monkeypatch.setattr(submission, "LOCK_TIMEOUT_SECONDS", 0.3)
    data, predictions = kits_predictions
    before = snapshot(tmp_path)
    with atomic_io.exclusive(tmp_path / "sub", "nnunet-ext submit"):
        outcome = run_cli(["submit", "kits21", str(predictions), str(tmp_path / "sub"), "--images", str(data)])
    assert_refused(outcome, ["in use by another nnunet-ext submit"], before=before, after=snapshot(tmp_path),
                   absent=[tmp_path / "sub"], clean=[tmp_path])


def test_submit_writes_into_a_folder_with_a_shell_like_name_without_running_it(tmp_path, kits_predictions,
                                                                               monkeypatch):
    data, predictions = kits_predictions
    monkeypatch.chdir(tmp_path)
    out = tmp_path / '$(touch pwned); "x\ny'
    outcome = run_cli(["submit", "kits21", str(predictions), str(out), "--images", str(data)])
    assert outcome.returncode == 0 and "VALID" in outcome.output
    assert sorted(p.name for p in out.iterdir()) == ["case_00000.nii.gz", "case_00001.nii.gz"]
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------
# challenge-infer and container: every refusal comes before any prediction, nothing is written
# --------------------------------------------------------------------------------------


def _fake_model(folder: Path, channels: int = 1, labels: dict | None = None) -> Path:
    """A model folder with what the checks read (no network: the refusals come before the predictor)."""
    import torch

    (folder / "fold_0").mkdir(parents=True)
    labels = labels or {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {str(c): "CT" for c in range(channels)},
                                                     "labels": labels, "file_ending": ".nii.gz"}))
    (folder / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {}}}))
    torch.save({"network_weights": {}}, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _mha(path: Path, array: np.ndarray | None = None, spacing=(0.8, 0.8, 2.5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.zeros(SHAPE, np.int16) if array is None else array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), True)
    return path


def _kits_input(root: Path) -> Path:
    return _mha(root / "images" / "ct" / "5a6b1c2d-uuid.mha")


def _segrap_unpaired(root: Path) -> Path:
    for name in ("a.mha", "b.mha"):
        _mha(root / "images" / "head-neck-ct" / name)
    _mha(root / "images" / "head-neck-contrast-enhanced-ct" / "a.mha")
    _mha(root / "images" / "head-neck-contrast-enhanced-ct" / "c.mha")
    return root


def _segrap_other_grid(root: Path) -> Path:
    _mha(root / "images" / "head-neck-ct" / "x.mha")
    _mha(root / "images" / "head-neck-contrast-enhanced-ct" / "y.mha", spacing=(0.8, 0.8, 3.0))
    return root


def _kits_truncated(root: Path) -> Path:
    truncate(_kits_input(root))
    return root


def _kits_nan(root: Path) -> Path:
    array = np.zeros(SHAPE, np.float32)
    array[1, 2, 3] = np.nan
    _mha(root / "images" / "ct" / "n.mha", array)
    return root


def _amos_flat(root: Path) -> Path:
    write_volume(np.zeros(SHAPE, np.int16), root / "7e1f.nii.gz")
    return root


# challenge (+ task), how to lay out --input, model (channels, labels), output root, words the message must contain
INFER_CASES = [
    (["kits21"], lambda root: root.mkdir(), {}, None, ["images/ct/<uuid>.mha", "not found"]),
    (["kits21"], _kits_truncated, {}, None, ["5a6b1c2d-uuid.mha", "cannot be decoded"]),
    (["kits21"], _kits_nan, {}, None, ["n.mha", "nan or infinite"]),
    (["kits21"], _kits_input, {"labels": {"background": 0, **{f"l{i}": i for i in range(1, 5)}}}, None,
     ["predicts label values [0, 1, 2, 3, 4]", "takes only [0, 1, 2, 3]"]),
    (["segrap2023", "--task", "gtv"], _segrap_unpaired, {"channels": 2, "labels": {"background": 0, "GTVp": 1,
                                                                                    "GTVnd": 2}}, None,
     ["b.mha has no contrast-enhanced ct partner", "share their file name"]),
    (["segrap2023", "--task", "gtv"], _segrap_other_grid, {"channels": 2, "labels": {"background": 0, "GTVp": 1,
                                                                                      "GTVnd": 2}}, None,
     ["y.mha", "spacing", "share one grid"]),
    (["segrap2023", "--task", "oar"], _segrap_other_grid, {"channels": 1}, None,
     ["takes 1 input channel(s)", "receives 2 (non-contrast ct, contrast-enhanced ct)"]),
    (["amos22", "--task", "2"], _amos_flat, {}, "input", ["is the input folder", "only read"]),
]


@pytest.mark.parametrize("challenge, layout, model, output, needles", INFER_CASES,
                         ids=["missing-folder", "truncated", "nan", "labels", "unpaired", "grid", "channels",
                              "output-is-input"])
def test_challenge_infer_refuses_before_predicting_and_writes_nothing(tmp_path, monkeypatch, challenge, layout, model,
                                                                      output, needles):
    from nnunet_ext import compat

    monkeypatch.setattr(compat, "predictor", lambda *a, **k: pytest.fail("predicted despite a refusal"))
    model_folder = _fake_model(tmp_path / "model", **model)
    layout(tmp_path / "input")
    out = tmp_path / ("input" if output == "input" else "output")
    before = snapshot(tmp_path)
    outcome = run_cli(["challenge-infer", *challenge, "--input", str(tmp_path / "input"), "--output", str(out),
                       "-m", str(model_folder), "-device", "cpu"])
    assert outcome.returncode == 2, outcome.output
    assert_refused(outcome, needles, before=before, after=snapshot(tmp_path), absent=[tmp_path / "output"],
                   clean=[tmp_path])


def test_challenge_infer_refuses_a_model_without_the_checkpoint(tmp_path):
    model = _fake_model(tmp_path / "model")
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    _kits_input(tmp_path / "input")
    outcome = run_cli(["challenge-infer", "kits21", "--input", str(tmp_path / "input"), "--output",
                       str(tmp_path / "output"), "-m", str(model), "-f", "0"])
    assert_refused(outcome, ["has no checkpoint_final.pth in fold_0"], absent=[tmp_path / "output"])


def _wheel(tmp_path: Path) -> Path:
    import zipfile

    wheel = tmp_path / "nnunet_ext-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("nnunet_ext/__init__.py", "")
    return wheel


def _foreign_build(tmp_path: Path) -> list[str]:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "Dockerfile").write_text("FROM mine\n")
    return []


def _not_a_wheel(tmp_path: Path) -> list[str]:
    (tmp_path / "nnunet_ext-0.1.0-py3-none-any.whl").write_text("not a zip")
    return []


# extra arguments (or a function preparing the case and returning them), words the message must contain
CONTAINER_CASES = [
    (["-tr", 'nnUNetTrainer"; rm -rf /; "'], ["-tr", "not a name nnu-net writes", "dockerfile"]),
    (["-tr", "nnUNetTrainer\nRUN evil"], ["-tr", "line break"]),
    (["-c", "3d_fullres$(id)"], ["-c", "not a name"]),
    (["--base-image", "ubuntu:22.04"], ["--base-image", "pytorch/pytorch:tag"]),
    (["--base-image", "pytorch/pytorch:latest\nRUN evil"], ["--base-image", "line break"]),
    (["--task", "gtv"], ["unrecognized arguments: --task"]),  # kits21 has no tasks
    (_foreign_build, ["already holds files not written by nnunet-ext container", "left untouched"]),
    (_not_a_wheel, ["--wheel", "not a wheel"]),
]


@pytest.mark.parametrize("extra, needles", CONTAINER_CASES,
                         ids=["quote", "newline", "substitution", "not-pytorch", "image-newline", "task",
                              "foreign-output", "wheel"])
def test_container_refuses_values_that_would_reach_the_dockerfile_and_writes_nothing(tmp_path, extra, needles):
    results = tmp_path / "results"
    _fake_model(results / "Dataset950_Fake" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    wheel = _wheel(tmp_path)
    if callable(extra):
        extra = extra(tmp_path)
    before = snapshot(tmp_path)
    arguments = ["container", "kits21", "-d", "950", "-f", "0", "--wheel", str(wheel), "-o", str(tmp_path / "build"),
                 *extra]
    outcome = run_cli(arguments, dict(os.environ, nnUNet_results=str(results)))
    assert outcome.returncode == 2, outcome.output
    assert_refused(outcome, needles, before=before, after=snapshot(tmp_path), clean=[tmp_path])


def test_container_refuses_a_model_that_does_not_fit_the_challenge(tmp_path):
    results = tmp_path / "results"
    _fake_model(results / "Dataset951_Gtv" / "nnUNetTrainer__nnUNetPlans__3d_fullres", channels=2,
                labels={"background": 0, "GTVp": 1, "GTVnd": 2})
    wheel = _wheel(tmp_path)
    before = snapshot(results, wheel)
    outcome = run_cli(["container", "kits21", "-d", "951", "-f", "0", "--wheel", str(wheel), "-o",
                       str(tmp_path / "build")], dict(os.environ, nnUNet_results=str(results)))
    assert_refused(outcome, ["takes 2 input channel(s)", "kits21 container receives 1 (ct)"],
                   before=before, after=snapshot(results, wheel), absent=[tmp_path / "build"], clean=[tmp_path])
    outcome = run_cli(["container", "segrap2023", "--task", "gtv", "-d", "951", "-f", "0", "1", "--wheel",
                       str(wheel), "-o", str(tmp_path / "build")], dict(os.environ, nnUNet_results=str(results)))
    assert_refused(outcome, ["no checkpoint_final.pth in fold_1"], before=before, after=snapshot(results, wheel),
                   absent=[tmp_path / "build"], clean=[tmp_path])


def test_amos_zip_refuses_predictions_that_do_not_match_the_case_list(tmp_path):
    release = write_amos22_replica(tmp_path / "release", ct=1, mri=0, validation=2, validation_mri=1, test=0)
    images = release / "imagesVa"
    predictions = predictions_like(tmp_path / "pred", {p.name[:-7]: p for p in images.iterdir()},
                                   lambda rng: box_labels(rng, (1, 2)))
    (predictions / "amos_0102.nii.gz").unlink()
    before = snapshot(release, predictions)
    outcome = run_cli(["submit", "amos22", "--task", "1", str(predictions), str(tmp_path / "sub.zip"),
                       "--images", str(images)])
    assert outcome.returncode == 1
    assert_refused(outcome, ["amos_0601.nii.gz is not one of this task's images", "not exported",
                             "missing: no prediction amos_0102.nii.gz", "nothing was written"],
                   before=before, after=snapshot(release, predictions), absent=[tmp_path / "sub.zip"], clean=[tmp_path])
