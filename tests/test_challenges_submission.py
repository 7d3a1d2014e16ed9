"""``nnunet-ext submit``: export to each challenge's format and the validator, round trip and failures."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from challenges_helpers import predictions_like, read_array
from nnunet_ext.challenges import segrap2023
from nnunet_ext.challenges.replicas import (SHAPE, box_labels, kits_labels, write_amos22_replica,
                                            write_kits21_replica, write_segrap2023_replica, write_volume)
from nnunet_ext.challenges.registry import submission_format
from nnunet_ext.challenges.submission import validate_submission
from nnunet_ext.cli.main import main


@pytest.fixture
def kits_test(tmp_path):
    """KiTS21 release-layout test folder (images only) and matching predictions."""
    data = write_kits21_replica(tmp_path / "release", num_labelled=0, num_test=3)
    predictions_like(tmp_path / "pred", {p.name: p / "imaging.nii.gz" for p in data.iterdir()},
                      lambda rng: kits_labels(rng))
    return data, tmp_path / "pred"


def test_kits21_round_trip_is_valid_and_keeps_the_label_values(tmp_path, kits_test, capsys):
    data, predictions = kits_test
    assert main(["submit", "kits21", str(predictions), str(tmp_path / "sub"), "--images", str(data)]) == 0
    assert "VALID: case list, naming, grids" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [f"case_0000{i}.nii.gz" for i in range(3)]
    written = sitk.ReadImage(str(tmp_path / "sub" / "case_00001.nii.gz"))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(written), read_array(predictions / "case_00001.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(written))) == {0, 1, 2, 3}
    assert main(["submit", "kits21", "--check-only", str(tmp_path / "sub"), "--images", str(data)]) == 0


def test_validator_reports_missing_case_wrong_grid_values_dtype_and_stray_files(tmp_path, kits_test, capsys):
    data, predictions = kits_test
    submission = tmp_path / "sub"
    assert main(["submit", "kits21", str(predictions), str(submission), "--images", str(data)]) == 0
    (submission / "case_00000.nii.gz").unlink()
    write_volume(np.zeros((8, 16, 15), np.uint8), submission / "case_00001.nii.gz")
    bad = read_array(submission / "case_00002.nii.gz").astype(np.int16)
    bad[0, 0, 0] = 7
    write_volume(bad, submission / "case_00002.nii.gz")
    (submission / "notes.txt").write_text("hi")
    capsys.readouterr()
    assert main(["submit", "kits21", "--check-only", str(submission), "--images", str(data)]) == 1
    out = capsys.readouterr().out
    assert "case_00000: missing: no case_00000.nii.gz" in out
    assert "case_00001: grid differs from the test image imaging.nii.gz: size (15, 16, 8) != (16, 16, 8)" in out
    assert "case_00002: dtype 16-bit signed integer, expected 8-bit unsigned integer (uint8)" in out
    assert "case_00002: unexpected label values [7]; allowed [0, 1, 2, 3]" in out
    assert "notes.txt: unexpected file" in out and "INVALID: 5 problem(s)" in out


@pytest.fixture
def amos_validation(tmp_path):
    """The Zenodo release's imagesVa (two CT and one MRI validation case) and task-1 predictions of the CT cases."""
    release = write_amos22_replica(tmp_path / "release", ct=1, mri=0, validation=2, validation_mri=1, test=1)
    images = release / "imagesVa"
    ct = {p.name[:-7]: p for p in images.iterdir() if int(p.name[5:9]) <= 500}
    predictions_like(tmp_path / "pred", ct, lambda rng: box_labels(rng, range(1, 16)).astype(np.int16))
    return images, tmp_path / "pred"


def _members(path):
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def test_amos22_validation_zip_holds_results_with_one_uint8_file_per_task_image(tmp_path, amos_validation, capsys):
    images, predictions = amos_validation
    out = tmp_path / "task1.zip"
    assert main(["submit", "amos22", "--task", "1", str(predictions), str(out), "--images", str(images)]) == 0
    output = capsys.readouterr().out
    assert "VALID: case list" in output and "scored only on all 100 images" in output  # the replica has 2, not 100
    assert _members(out) == ["results/", "results/amos_0101.nii.gz", "results/amos_0102.nii.gz"]
    with zipfile.ZipFile(out) as archive:
        (tmp_path / "x.nii.gz").write_bytes(archive.read("results/amos_0102.nii.gz"))
    written = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    assert written.GetPixelID() == sitk.sitkUInt8 and int(sitk.GetArrayFromImage(written).max()) == 15
    assert np.array_equal(sitk.GetArrayFromImage(written), read_array(predictions / "amos_0102.nii.gz"))
    assert main(["submit", "amos22", "--task", "1", "--check-only", str(out), "--images", str(images)]) == 0
    # task 2 expects the MRI validation case too: one-to-one or invalid, and nothing is written
    capsys.readouterr()
    assert main(["submit", "amos22", "--task", "2", str(predictions), str(tmp_path / "task2.zip"),
                 "--images", str(images)]) == 1
    output = capsys.readouterr().out
    assert "amos_0601: missing: no prediction amos_0601.nii.gz" in output and "scored only on all 120" in output
    assert not (tmp_path / "task2.zip").exists()


def test_amos22_refuses_values_outside_the_label_space_and_writes_nothing(tmp_path, amos_validation, capsys):
    images, predictions = amos_validation
    write_volume(np.full(SHAPE, 16, np.uint8), predictions / "amos_0102.nii.gz")
    assert main(["submit", "amos22", "--task", "1", str(predictions), str(tmp_path / "sub.zip"),
                 "--images", str(images)]) == 1
    out = capsys.readouterr().out
    assert "amos_0102: amos_0102.nii.gz holds label values [16] outside the AMOS22 task 1 validation label space" in out
    assert "Nothing was written" in out and not (tmp_path / "sub.zip").exists()


def test_amos22_zip_needs_a_zip_name_and_the_image_list(tmp_path, amos_validation, capsys):
    images, predictions = amos_validation
    assert main(["submit", "amos22", "--task", "1", str(predictions), str(tmp_path / "sub"),
                 "--images", str(images)]) == 2
    assert "takes one zip file: give OUT as a file name ending in .zip" in capsys.readouterr().err
    assert main(["submit", "amos22", "--task", "1", str(predictions), str(tmp_path / "sub.zip")]) == 2
    assert "matches the images one-to-one: give them with --images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: --task is required
        main(["submit", "amos22", str(predictions), str(tmp_path / "sub.zip"), "--images", str(images)])
    assert exited.value.code == 2 and "required: --task" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "release"]


def test_amos22_check_only_reads_a_hand_built_zip_without_unpacking_stray_members(tmp_path, amos_validation,
                                                                                   capsys):
    images, predictions = amos_validation
    hand_built = tmp_path / "hand.zip"
    with zipfile.ZipFile(hand_built, "w") as archive:
        archive.write(predictions / "amos_0101.nii.gz", "results/amos_0101.nii.gz")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.write(predictions / "amos_0101.nii.gz", "results/amos_0101.nii.gz")  # twice
        archive.write(predictions / "amos_0102.nii.gz", "amos_0102.nii.gz")  # not in results/
        archive.writestr("results/../../escape.nii.gz", b"x")
        archive.writestr("results/notes.txt", b"my notes")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["submit", "amos22", "--task", "1", "--check-only", str(hand_built), "--images", str(images)]) == 1
    out = capsys.readouterr().out
    assert "results/amos_0101.nii.gz: listed twice in the zip" in out
    assert "amos_0102.nii.gz: unexpected member; the zip may hold only results/amos_0008.nii.gz files" in out
    assert "results/../../escape.nii.gz: unexpected member" in out and "results/notes.txt: unexpected member" in out
    assert "amos_0102: missing: no amos_0102.nii.gz" in out and "INVALID: 6 problem(s)" in out
    assert "amos_0101: dtype 16-bit signed integer, expected 8-bit unsigned integer" in out  # hand-built: int16
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and not (tmp_path.parent / "escape.nii.gz").exists()
    (tmp_path / "notzip.zip").write_text("not a zip")
    assert main(["submit", "amos22", "--task", "1", "--check-only", str(tmp_path / "notzip.zip"),
                 "--images", str(images)]) == 1
    assert "notzip.zip: is not a zip archive" in capsys.readouterr().out


def test_amos22_test_phase_zip_from_the_converted_datasets_imagests(monkeypatch, tmp_path, capsys):
    from challenges_helpers import convert

    release = write_amos22_replica(tmp_path / "release", ct=1, mri=0, validation=1, test=2)
    assert convert(monkeypatch, tmp_path / "raw", "amos22", release, "-d", 341, "--task", "1") == 0
    images = tmp_path / "raw" / "Dataset341_AMOS22Task1" / "imagesTs"
    references = {p.name[:-12]: p for p in images.iterdir()}
    predictions_like(tmp_path / "pred", references, lambda rng: box_labels(rng, (1, 2)))
    assert main(["submit", "amos22", "--task", "1", "--phase", "test", str(tmp_path / "pred"),
                 str(tmp_path / "test.zip"), "--images", str(images)]) == 0
    assert _members(tmp_path / "test.zip") == ["results/", "results/amos_0201.nii.gz", "results/amos_0202.nii.gz"]
    assert "scored only on all" not in capsys.readouterr().out  # no official count is stated for the test phase


def test_segrap2023_oar_export_stacks_45_masks_built_from_the_54_classes(tmp_path, capsys):
    release = write_segrap2023_replica(tmp_path / "release", num_labelled=0, num_test=1)
    images = release / segrap2023.IMAGE_FOLDER
    labels = np.zeros(SHAPE, np.uint8)
    labels[0, 0, :4] = [6, 2, 12, 51]  # temporal lobe+hippocampus L, brainstem, lens L, larynx+pharynx constrictor
    predictions_like(tmp_path / "pred", {"segrap_0000": images / "segrap_0000" / "image.nii.gz"}, lambda rng: labels)
    assert main(["submit", "segrap2023", str(tmp_path / "pred"), str(tmp_path / "sub"), "--task", "oar",
                 "--images", str(images)]) == 0
    stacked = sitk.ReadImage(str(tmp_path / "sub" / "segrap_0000.mha"))
    assert stacked.GetSize() == (16, 16, 8, 45) and stacked.GetPixelID() == sitk.sitkUInt8
    assert stacked.GetSpacing()[:3] == sitk.ReadImage(str(images / "segrap_0000" / "image.nii.gz")).GetSpacing()
    masks = sitk.GetArrayFromImage(stacked)  # (45, z, y, x)
    order = list(segrap2023.OAR_COMPOSITION)
    inside = {name for index, name in enumerate(order) if masks[index, 0, 0, 0]}
    assert inside == {"Brain", "TemporalLobe_L", "Hippocampus_L"}
    assert {name for index, name in enumerate(order) if masks[index, 0, 0, 1]} == {"Brain", "BrainStem"}
    assert {name for index, name in enumerate(order) if masks[index, 0, 0, 2]} == {"Eye_L", "Lens_L"}
    assert {name for index, name in enumerate(order) if masks[index, 0, 0, 3]} == {"Larynx", "PharynxConst"}
    assert int(masks.sum()) == 9


def test_segrap2023_gtv_validator_rejects_a_stack_of_the_wrong_length(tmp_path, capsys):
    release = write_segrap2023_replica(tmp_path / "release", num_labelled=0, num_test=1)
    images = release / segrap2023.IMAGE_FOLDER
    predictions_like(tmp_path / "pred", {"segrap_0000": images / "segrap_0000" / "image.nii.gz"},
                      lambda rng: box_labels(rng, (1, 2)))
    assert main(["submit", "segrap2023", str(tmp_path / "pred"), str(tmp_path / "sub"), "--task", "gtv",
                 "--images", str(images)]) == 0
    assert sitk.ReadImage(str(tmp_path / "sub" / "segrap_0000.mha")).GetSize()[3] == 2
    report = validate_submission(submission_format("segrap2023", "oar"), tmp_path / "sub", images)
    assert [problem for _, problem in report.problems] == [
        "fourth axis has 2 masks, expected 45 (Brain, BrainStem, Chiasm, ...)"]


def test_submit_usage_errors_exit_2(tmp_path, kits_test, capsys):
    data, predictions = kits_test
    assert main(["submit", "kits21", "--check-only", str(predictions), str(tmp_path / "x")]) == 2
    assert main(["submit", "kits21", str(predictions)]) == 2
    assert main(["submit", "kits21", str(predictions), str(predictions)]) == 2
    assert main(["submit", "amos22", "--task", "1", str(predictions), str(tmp_path / "sub.zip"),
                 "--images", str(data)]) == 2  # KiTS names, not AMOS
    assert "no AMOS22 task 1 validation predictions" in capsys.readouterr().err
