"""``nnunet-ext convert amos22``: both release forms, tasks 1/2, validation kept apart from test, refusals."""
from __future__ import annotations

import json

import pytest

from challenges_helpers import convert, read_array, tree_digest
from nnunet_ext.challenges.replicas import AMOS_LABELS, write_amos22_replica, write_volume


@pytest.fixture
def release(tmp_path):
    return write_amos22_replica(tmp_path / "release", ct=2, mri=1, validation=1, test=1)


def _names(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_task2_takes_ct_and_mri_labels_from_the_release_json(monkeypatch, tmp_path, release):
    before = tree_digest(release)
    assert convert(monkeypatch, tmp_path / "raw", "amos22", release, "-d", 321, "-np", 2) == 0
    folder = tmp_path / "raw" / "Dataset321_AMOS22Task2"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {name: value for value, name in enumerate(AMOS_LABELS)}
    assert dataset["labels"]["prostate/uterus"] == 15 and dataset["numTraining"] == 3
    assert dataset["channel_names"] == {"0": "either_CT_or_MR"}  # not "CT": MRI must not get the HU window
    assert _names(folder / "imagesTr") == ["amos_0001_0000.nii.gz", "amos_0002_0000.nii.gz", "amos_0501_0000.nii.gz"]
    assert _names(folder / "labelsTr") == ["amos_0001.nii.gz", "amos_0002.nii.gz", "amos_0501.nii.gz"]
    assert _names(folder / "imagesVa") == ["amos_0101_0000.nii.gz"]  # validation: predict, submit, score locally
    assert _names(folder / "labelsVa") == ["amos_0101.nii.gz"]
    assert _names(folder / "imagesTs") == ["amos_0201_0000.nii.gz"] and not (folder / "labelsTs").exists()
    assert (folder / "labelsTr" / "amos_0501.nii.gz").read_bytes() == \
        (release / "labelsTr" / "amos_0501.nii.gz").read_bytes()
    assert tree_digest(release) == before


def test_task1_is_ct_only(monkeypatch, tmp_path, release):
    assert convert(monkeypatch, tmp_path / "raw", "amos22", release, "-d", 322, "--task", 1) == 0
    folder = tmp_path / "raw" / "Dataset322_AMOS22Task1"
    assert _names(folder / "labelsTr") == ["amos_0001.nii.gz", "amos_0002.nii.gz"]
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"} and dataset["numTraining"] == 2


def test_mri_variant_merges_with_task1_into_a_two_task_universal_dataset(monkeypatch, tmp_path, release):
    raw = tmp_path / "raw"
    assert convert(monkeypatch, raw, "amos22", release, "-d", 323, "--task", "1") == 0
    assert convert(monkeypatch, raw, "amos22", release, "-d", 324, "--task", "mri") == 0
    mri = raw / "Dataset324_AMOS22MRI"
    assert _names(mri / "labelsTr") == ["amos_0501.nii.gz"]
    assert json.loads((mri / "dataset.json").read_text())["channel_names"] == {"0": "MRI"}
    from nnunet_ext.tasks.merge import merge_datasets
    from nnunet_ext.tasks.task_map import TaskMap

    merged = merge_datasets(raw, [323, 324], 325, "AMOS22CTMRI")
    task_map = TaskMap.from_dataset_json(merged.folder / "dataset.json")
    assert task_map.names == ("AMOS22Task1", "AMOS22MRI")
    assert task_map.task("AMOS22Task1").annotated_values == task_map.task("AMOS22MRI").annotated_values  # shared organs
    assert len(task_map.labels) == len(AMOS_LABELS)


def test_include_validation_trains_on_validation_cases(monkeypatch, tmp_path, release):
    assert convert(monkeypatch, tmp_path / "raw", "amos22", release, "-d", 323, "--include-validation") == 0
    folder = tmp_path / "raw" / "Dataset323_AMOS22Task2"
    assert "amos_0101.nii.gz" in _names(folder / "labelsTr")
    assert _names(folder / "imagesTs") == ["amos_0201_0000.nii.gz"] and not (folder / "imagesVa").exists()
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 4


def test_include_validation_without_labelsva_is_refused(monkeypatch, tmp_path, capsys):
    release = write_amos22_replica(tmp_path / "release", validation_labels=False)
    assert convert(monkeypatch, tmp_path / "raw", "amos22", release, "-d", 324, "--include-validation") == 2
    assert f"--include-validation needs the validation labels in {release / 'labelsVa'}" in capsys.readouterr().err


def test_missing_file_and_bad_label_values_fail_only_their_cases(monkeypatch, tmp_path, release, capsys):
    (release / "imagesTr" / "amos_0002.nii.gz").unlink()
    label = release / "labelsTr" / "amos_0501.nii.gz"
    array = read_array(label)
    array[0, 0, 0] = 16
    write_volume(array, label)
    assert convert(monkeypatch, tmp_path / "raw", "amos22", release, "-d", 325) == 1
    out = capsys.readouterr().out
    assert f"failed amos_0002: missing {release / 'imagesTr' / 'amos_0002.nii.gz'}" in out
    assert "failed amos_0501: amos_0501.nii.gz: unexpected label values [16]" in out
    folder = tmp_path / "raw" / "Dataset325_AMOS22Task2"
    assert _names(folder / "labelsTr") == ["amos_0001.nii.gz"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 1


def test_refuses_a_folder_without_either_release_json_naming_both(monkeypatch, tmp_path, release, capsys):
    (tmp_path / "not_amos").mkdir()
    assert convert(monkeypatch, tmp_path / "raw", "amos22", tmp_path / "not_amos", "-d", 326) == 2
    error = capsys.readouterr().err
    assert "does not look like the AMOS22 release: neither" in error
    assert "not_amos/dataset.json (the Zenodo release)" in error
    assert "not_amos/task1_dataset.json / " in error and "task2_dataset.json (the first-stage release)" in error
    assert not (tmp_path / "raw" / "Dataset326_AMOS22Task2").exists()


@pytest.fixture
def first_stage(tmp_path):
    return write_amos22_replica(tmp_path / "first", ct=2, mri=1, validation=2, validation_mri=1, first_stage=True)


@pytest.mark.parametrize("task, training, validation", [
    ("1", ["amos_0001", "amos_0002"], ["amos_0101", "amos_0102"]),
    ("2", ["amos_0001", "amos_0002", "amos_0501"], ["amos_0101", "amos_0102", "amos_0601"])])
def test_first_stage_release_puts_its_imagests_into_imagesva(monkeypatch, tmp_path, first_stage, task, training,
                                                              validation):
    assert sorted(p.name for p in first_stage.iterdir()) == ["imagesTr", "imagesTs", "labelsTr", "task1_dataset.json",
                                                             "task2_dataset.json"]
    assert convert(monkeypatch, tmp_path / "raw", "amos22", first_stage, "-d", 327, "--task", task) == 0
    folder = tmp_path / "raw" / f"Dataset327_AMOS22Task{task}"
    assert _names(folder / "labelsTr") == [f"{case}.nii.gz" for case in training]
    assert _names(folder / "imagesVa") == [f"{case}_0000.nii.gz" for case in validation]
    assert not (folder / "labelsVa").exists() and not (folder / "imagesTs").exists()
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == len(training)


def test_first_stage_release_refusals_name_the_missing_file(monkeypatch, tmp_path, first_stage, capsys):
    (first_stage / "task2_dataset.json").unlink()
    assert convert(monkeypatch, tmp_path / "raw", "amos22", first_stage, "-d", 328, "--task", "2") == 2
    error = capsys.readouterr().err
    assert f"{first_stage / 'task2_dataset.json'} is missing" in error and "found only task1_dataset.json" in error
    assert convert(monkeypatch, tmp_path / "raw", "amos22", first_stage, "-d", 328, "--task", "1",
                   "--include-validation") == 2
    assert "the first-stage release (task1_dataset.json) has none" in capsys.readouterr().err
    assert not (tmp_path / "raw" / "Dataset328_AMOS22Task2").exists()
    assert not (tmp_path / "raw" / "Dataset328_AMOS22Task1").exists()


def test_refuses_another_task_into_the_same_folder(monkeypatch, tmp_path, release, capsys):
    assert convert(monkeypatch, tmp_path / "raw", "amos22", release, "-d", 329, "--name", "AMOS") == 0
    before = tree_digest(tmp_path / "raw")
    assert convert(monkeypatch, tmp_path / "raw", "amos22", release, "-d", 329, "--name", "AMOS", "--task", 1) == 2
    assert "already holds a different conversion" in capsys.readouterr().err
    assert tree_digest(tmp_path / "raw") == before
