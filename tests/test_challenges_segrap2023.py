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
    assert dataset["labels"]["TemporalLobe_Hippocampus_OverLap_L"] == 6 and dataset["labels"]["Trachea"] == 54
    assert dataset["labels"]["Larynx_PharynxConst_OverLap"] == 51 and dataset["labels"]["PharynxConst"] == 52
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


# The nine classes the release marks as shared by two OARs, letter for letter (see segrap2023's module doc).
OVERLAP_CLASSES = {6: "TemporalLobe_Hippocampus_OverLap_L", 7: "TemporalLobe_Hippocampus_OverLap_R",
                   20: "MiddleEar_TympanicCavity_OverLap_L", 21: "MiddleEar_TympanicCavity_OverLap_R",
                   24: "MiddleEar_VestibulSemi_OverLap_L", 25: "MiddleEar_VestibulSemi_OverLap_R",
                   30: "MiddleEar_ETbone_OverLap_L", 31: "MiddleEar_ETbone_OverLap_R",
                   51: "Larynx_PharynxConst_OverLap"}


def test_class_names_are_the_releases_and_agree_with_the_composition():
    names = segrap2023.oar_class_names()
    assert sorted(names) == list(range(1, 55)) and len(set(names.values())) == 54
    assert {value: name for value, name in names.items() if "OverLap" in name} == OVERLAP_CLASSES
    composition = segrap2023.OAR_COMPOSITION
    for value, name in names.items():
        owners = {oar for oar, classes in composition.items() if value in classes} - {"Brain"}
        if value in OVERLAP_CLASSES:  # in exactly the two OARs the name joins, on the name's side
            stem, _, side = name.partition("_OverLap")
            first, second = stem.split("_")
            assert owners == {first + side, second + side}, (value, owners)
        else:  # an OAR's own class carries the OAR's name
            assert name in composition and value in composition[name], (value, name)


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


def test_the_image_archive_unpacked_into_a_folder_of_the_same_name_is_found(monkeypatch, tmp_path, release):
    """The image archive unpacks into SegRap2023_Training_Set_120cases/ again (see the module doc)."""
    nested = tmp_path / "nested"
    outer = nested / segrap2023.IMAGE_FOLDER
    outer.mkdir(parents=True)
    (release / segrap2023.IMAGE_FOLDER).rename(outer / segrap2023.IMAGE_FOLDER)
    (release / (segrap2023.IMAGE_FOLDER + segrap2023.LABELS_SUFFIX)).rename(
        nested / (segrap2023.IMAGE_FOLDER + segrap2023.LABELS_SUFFIX))
    assert convert(monkeypatch, tmp_path / "raw", "segrap2023", nested, "-d", 335, "--task", "gtv") == 0
    folder = tmp_path / "raw" / "Dataset335_SegRap2023GTV"
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
