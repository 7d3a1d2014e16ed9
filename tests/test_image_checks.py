"""Full-decode image checks: what header-only reading let through is refused with a named file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext import image_checks
from nnunet_ext.errors import UserFacingError


def _write(path: Path, array: np.ndarray, spacing=None, direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path), True)
    return path


@pytest.fixture
def case(tmp_path):
    rng = np.random.default_rng(0)
    image = _write(tmp_path / "c_0000.nii.gz", rng.random((6, 12, 12)).astype(np.float32))
    label = _write(tmp_path / "c.nii.gz", rng.integers(0, 3, (6, 12, 12)).astype(np.uint8))
    return tmp_path, image, label


def _reader(path):
    return image_checks.reader_for({"file_ending": ".nii.gz"}, path)


def test_a_good_case_passes_and_reports_its_geometry(case):
    _, image, label = case
    info = image_checks.check_case([image], _reader(image), label=label, allowed_labels=[0, 1, 2], spatial_dims=3)
    assert info.shape == (6, 12, 12) and info.spatial_dims == 3 and info.channels == 1


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_gzip_is_refused_although_itk_reads_it(case, cut):
    folder, image, _ = case
    data = image.read_bytes()
    truncated = folder / "t_0000.nii.gz"
    truncated.write_bytes(data[:int(len(data) * cut)])
    sitk.ReadImage(str(truncated))  # ITK itself does not notice: the reason for the gzip check
    with pytest.raises(UserFacingError, match=r"t_0000\.nii\.gz: image cannot be decoded: the gzip stream ends early"):
        image_checks.check_case([truncated], _reader(truncated))


@pytest.mark.parametrize("content, needle", [(b"", "empty"), (b"not an image at all", "cannot be decoded")])
def test_empty_and_foreign_files_are_refused(case, content, needle):
    folder, _, _ = case
    bad = folder / "bad_0000.nii.gz"
    bad.write_bytes(content)
    with pytest.raises(UserFacingError, match=needle):
        image_checks.check_case([bad], _reader(bad))


def test_missing_file_is_named(case):
    folder, _, _ = case
    with pytest.raises(UserFacingError, match="missing"):
        image_checks.check_case([folder / "nope_0000.nii.gz"], _reader(folder / "x.nii.gz"))


def test_dimensionality_against_the_dataset(case):
    folder, image, _ = case
    flat = _write(folder / "flat_0000.nii.gz", np.zeros((12, 12), np.float32))
    with pytest.raises(UserFacingError, match="a 2D image in a 3D dataset"):
        image_checks.check_case([flat], _reader(flat), spatial_dims=3)
    with pytest.raises(UserFacingError, match="a 3D image in a 2D dataset"):
        image_checks.check_case([image], _reader(image), spatial_dims=2)


def test_channel_grid_mismatch(case):
    folder, image, _ = case
    other = _write(folder / "c_0001.nii.gz", np.zeros((6, 12, 11), np.float32))
    with pytest.raises(UserFacingError, match=r"c_0001\.nii\.gz: shape .* differs"):
        image_checks.check_case([image, other], _reader(image))


def test_label_spacing_and_direction_mismatch(case):
    folder, image, _ = case
    spaced = _write(folder / "s.nii.gz", np.zeros((6, 12, 12), np.uint8), spacing=(1.0, 1.0, 2.0))
    with pytest.raises(UserFacingError, match="spacing .* differs"):
        image_checks.check_case([image], _reader(image), label=spaced)
    turned = _write(folder / "d.nii.gz", np.zeros((6, 12, 12), np.uint8), direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))
    with pytest.raises(UserFacingError, match="direction .* differs"):
        image_checks.check_case([image], _reader(image), label=turned)


def test_labels_must_be_whole_and_known(case):
    folder, image, label = case
    with pytest.raises(UserFacingError, match=r"label value\(s\) \[2\] are not in the dataset's labels"):
        image_checks.check_case([image], _reader(image), label=label, allowed_labels=[0, 1])
    fractional = _write(folder / "f.nii.gz", np.full((6, 12, 12), 0.5, np.float32))
    with pytest.raises(UserFacingError, match="not whole numbers"):
        image_checks.check_case([image], _reader(image), label=fractional)


def test_nan_and_inf_intensities(case):
    folder, _, _ = case
    array = np.zeros((6, 12, 12), np.float32)
    array[1, 2, 3] = np.nan
    array[2, 2, 3] = np.inf
    # .mha keeps NaN through ITK; NIfTI is covered by the stored-value check below
    bad = _write(folder / "n_0000.mha", array)
    with pytest.raises(UserFacingError, match=r"n_0000\.mha: 2 voxel\(s\) are NaN or infinite"):
        image_checks.check_case([bad], image_checks.reader_for({"file_ending": ".mha"}, bad))


def test_dataset_label_values_include_region_members():
    assert image_checks.dataset_label_values({"labels": {"background": 0, "a": 1, "ab": [1, 2]}}) == {0, 1, 2}
    assert image_checks.dataset_label_values({"labels": {}}) is None


def test_nan_stored_in_float_nifti_is_refused_although_itk_reads_zero(case):
    folder, _, _ = case
    array = np.zeros((6, 12, 12), np.float32)
    array[1, 2, 3] = np.nan
    bad = _write(folder / "nan_0000.nii.gz", array)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(bad)))).all()  # ITK shows 0
    with pytest.raises(UserFacingError, match=r"nan_0000\.nii\.gz: 1 of its voxel values are NaN or infinite"):
        image_checks.check_case([bad], _reader(bad))
