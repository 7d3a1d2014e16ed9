"""``nnunet-ext submit``: export to each challenge's format and the validator, round trip and failures."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from challenges_helpers import predictions_like, read_array
from nnunet_ext.challenges import segrap2023
from nnunet_ext.challenges.replicas import (SHAPE, box_labels, kits_labels, write_amos22_replica,
                                            write_kits21_replica, write_segrap2023_replica, write_volume)
from nnunet_ext.challenges.submission import submission_format, validate_submission
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


def test_amos22_export_casts_to_uint8_and_refuses_values_outside_the_label_space(tmp_path, capsys):
    release = write_amos22_replica(tmp_path / "release", ct=1, mri=0, validation=0, test=2)
    images = {p.name[:-7]: p for p in (release / "imagesTs").iterdir()}
    predictions_like(tmp_path / "pred", images, lambda rng: box_labels(rng, range(1, 16)).astype(np.int16))
    assert main(["submit", "amos22", str(tmp_path / "pred"), str(tmp_path / "sub"),
                 "--images", str(release / "imagesTs")]) == 0
    written = sitk.ReadImage(str(tmp_path / "sub" / "amos_0201.nii.gz"))
    assert written.GetPixelID() == sitk.sitkUInt8 and int(sitk.GetArrayFromImage(written).max()) == 15
    write_volume(np.full(SHAPE, 16, np.uint8), tmp_path / "pred" / "amos_0202.nii.gz")
    shutil.rmtree(tmp_path / "sub")
    capsys.readouterr()
    assert main(["submit", "amos22", str(tmp_path / "pred"), str(tmp_path / "sub"),
                 "--images", str(release / "imagesTs")]) == 1
    out = capsys.readouterr().out
    assert "amos_0202: amos_0202.nii.gz holds label values [16] outside the AMOS22 label space" in out
    assert "Nothing was written" in out and not (tmp_path / "sub").exists()  # all or nothing: no half submission


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
    assert main(["submit", "amos22", str(predictions), str(tmp_path / "sub")]) == 2  # KiTS names, not AMOS
    assert "no AMOS22 predictions" in capsys.readouterr().err
