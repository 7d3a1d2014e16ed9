"""``nnunet-ext convert segrap2023``: two CT channels, OAR (54 classes) and GTV tasks, checks and refusals."""
from __future__ import annotations

import json

import pytest

from challenges_helpers import convert, read_array, tree_digest
from nnunet_ext.challenges import segrap2023
from nnunet_ext.challenges.replicas import write_segrap2023_replica, write_volume


@pytest.fixture
def release(tmp_path):
    return write_segrap2023_replica(tmp_path / "release", num_labelled=2, num_test=1)


def test_oar_task_pairs_the_two_cts_as_channels_and_keeps_the_54_classes(monkeypatch, tmp_path, release):
    before = tree_digest(release)
    assert convert(monkeypatch, tmp_path / "raw", "segrap2023", release, "-d", 331, "--task", "oar") == 0
    folder = tmp_path / "raw" / "Dataset331_SegRap2023OAR"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "CT"} and dataset["numTraining"] == 2
    assert sorted(dataset["labels"].values()) == list(range(55)) and dataset["labels"]["Brain"] == 1
    assert dataset["labels"]["TemporalLobe_Hippocampus_L"] == 6 and dataset["labels"]["Trachea"] == 54
    case = release / segrap2023.IMAGE_FOLDER / "segrap_0000"
    assert (folder / "imagesTr" / "segrap_0000_0000.nii.gz").read_bytes() == (case / "image.nii.gz").read_bytes()
    assert (folder / "imagesTr" / "segrap_0000_0001.nii.gz").read_bytes() == \
        (case / "image_contrast.nii.gz").read_bytes()
    labels = release / (segrap2023.IMAGE_FOLDER + segrap2023.LABELS_SUFFIX)
    assert (folder / "labelsTr" / "segrap_0001.nii.gz").read_bytes() == \
        (labels / "Task001" / "segrap_0001.nii.gz").read_bytes()
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["segrap_0002_0000.nii.gz",
                                                                      "segrap_0002_0001.nii.gz"]
    assert tree_digest(release) == before


def test_gtv_task_is_a_separate_dataset_from_task002(monkeypatch, tmp_path, release):
    assert convert(monkeypatch, tmp_path / "raw", "segrap2023", release, "-d", 332, "--task", "gtv") == 0
    folder = tmp_path / "raw" / "Dataset332_SegRap2023GTV"
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "GTVp": 1, "GTVnd": 2}
    labels = release / (segrap2023.IMAGE_FOLDER + segrap2023.LABELS_SUFFIX)
    assert (folder / "labelsTr" / "segrap_0000.nii.gz").read_bytes() == \
        (labels / "Task002" / "segrap_0000.nii.gz").read_bytes()


def test_oar_composition_covers_the_54_classes_in_the_official_order():
    composition = segrap2023.OAR_COMPOSITION
    assert len(composition) == 45
    assert list(composition)[:3] == ["Brain", "BrainStem", "Chiasm"] and list(composition)[-1] == "Trachea"
    assert set().union(*composition.values()) == set(range(1, 55))
    names = segrap2023.oar_class_names()
    assert len(set(names.values())) == 54
    for name, classes in composition.items():  # an OAR made of one class gives that class its name
        if len(classes) == 1:
            assert names[classes[0]] == name


def test_channel_geometry_mismatch_and_missing_channel_fail_their_cases(monkeypatch, tmp_path, release, capsys):
    contrast = release / segrap2023.IMAGE_FOLDER / "segrap_0000" / "image_contrast.nii.gz"
    write_volume(read_array(contrast), contrast, origin=(0.0, 0.0, 0.0))
    (release / segrap2023.IMAGE_FOLDER / "segrap_0001" / "image_contrast.nii.gz").unlink()
    assert convert(monkeypatch, tmp_path / "raw", "segrap2023", release, "-d", 333, "--task", "oar") == 1
    out = capsys.readouterr().out
    assert "failed segrap_0000: geometry of image_contrast.nii.gz differs from image.nii.gz: origin" in out
    assert "failed segrap_0001: missing" in out and "image_contrast.nii.gz" in out


def test_refuses_a_release_without_the_label_folder(monkeypatch, tmp_path, release, capsys):
    task002 = release / (segrap2023.IMAGE_FOLDER + segrap2023.LABELS_SUFFIX) / "Task002"
    for path in task002.iterdir():
        path.unlink()
    task002.rmdir()
    assert convert(monkeypatch, tmp_path / "raw", "segrap2023", release, "-d", 334, "--task", "gtv") == 2
    assert f"{task002} not found" in capsys.readouterr().err
    assert convert(monkeypatch, tmp_path / "raw", "segrap2023", tmp_path, "-d", 334, "--task", "gtv") == 2
    assert "does not look like the SegRap2023 release" in capsys.readouterr().err
