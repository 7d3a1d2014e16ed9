"""Check images before anything is written from them: decoded in full, consistent with their siblings.

Reading only an image header (what SimpleITK's ``ReadImageInformation`` does) accepts a truncated
``.nii.gz``; the failure then surfaces hours later inside training. Every command that writes
from user images (merge, convert, preprocess-unlabeled, predict --task) first passes each case
through :func:`check_case`, which decodes every file with the reader nnU-Net itself would use for
the dataset (``dataset.json``'s ``overwrite_image_reader_writer`` or the file ending) and refuses,
in one message naming the file, the problem and the fix:

- a file that cannot be decoded (truncated, corrupt, empty, not an image);
- NaN or infinite intensities (also those stored in a float NIfTI file, which ITK's NIfTI reader,
  nnU-Net's default for ``.nii.gz``, silently reads as 0);
- an image of another dimensionality than the dataset's (2D in a 3D dataset, or the reverse);
- channels or a label whose shape, spacing or direction disagree with the case's first channel;
- labels that are not whole numbers or not among the dataset's label values.

Files are decoded through :mod:`nnunet_ext.image_io`, the one image I/O path.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from nnunet_ext import image_io
from nnunet_ext.errors import UserFacingError

#: nnU-Net marks the missing axis of a 2D image with a spacing of 999 x the largest real spacing
_DUMMY_SPACING_FACTOR = 999


@dataclass(frozen=True)
class ImageInfo:
    """What the checks compare between files of one case and between cases."""
    path: Path
    shape: tuple[int, ...]        # spatial shape as nnU-Net's reader returns it (z, y, x); z = 1 for 2D
    spacing: tuple[float, ...]    # nnU-Net's spacing (z, y, x)
    direction: tuple[float, ...] | None
    channels: int
    spatial_dims: int             # 2 or 3


#: the reader/writer instance nnU-Net would use for a dataset (or, without one, a file): image_io's
reader_for = image_io.reader_writer
#: stdout/stderr silenced at the file-descriptor level while a reader runs (image_io's)
silenced = image_io.silenced


def verify_gzip_stream(path: Path, chunk: int = 1 << 22) -> str | None:
    """None if ``path`` is one complete gzip stream (CRC and length checked), else what is wrong.

    Needed because ITK's NIfTI reader returns a partly zero image for a truncated ``.nii.gz``.
    """
    decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        with open(path, "rb") as handle:
            while not decompressor.eof:
                block = handle.read(chunk)
                if not block:
                    return "the gzip stream ends early (file truncated)"
                decompressor.decompress(block, 0)
                while decompressor.unconsumed_tail:
                    decompressor.decompress(decompressor.unconsumed_tail, 0)
    except zlib.error as error:
        return f"the gzip stream is corrupt ({error})"
    return None


def is_two_d_spacing(spacing: Sequence[float]) -> bool:
    """True for nnU-Net's spacing of a 2D image (or dataset): the dummy axis is 999 x the largest real one."""
    spacing = sorted(abs(float(s)) for s in spacing)
    return len(spacing) == 3 and spacing[-1] >= _DUMMY_SPACING_FACTOR * 0.999 * spacing[-2]


def _geometry(path: Path, data: np.ndarray, properties: dict) -> ImageInfo:
    spacing = tuple(float(s) for s in properties.get("spacing", ()))
    shape = tuple(int(s) for s in data.shape[1:])
    two_d = len(shape) == 3 and shape[0] == 1 and is_two_d_spacing(spacing)
    direction = None
    for key in ("sitk_stuff", "nibabel_stuff", "tiff_stuff"):
        extra = properties.get(key)
        if isinstance(extra, dict):
            value = extra.get("direction", extra.get("reoriented_affine", extra.get("original_affine")))
            if value is not None:
                direction = tuple(float(v) for v in np.asarray(value, dtype=float).ravel())
            break
    return ImageInfo(path, shape, spacing, direction, int(data.shape[0]), 2 if two_d else 3)


def read_image(path: str | os.PathLike, reader, *, what: str = "image") -> tuple[np.ndarray, ImageInfo]:
    """Decode ``path`` completely; any failure becomes a :class:`UserFacingError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"{path}: {what} file is missing. Add it, or remove the case from the dataset.")
    if path.stat().st_size == 0:
        raise UserFacingError(f"{path}: {what} file is empty (0 bytes). Re-export or re-download it.")
    if path.name.endswith(".gz"):
        problem = verify_gzip_stream(path)
        if problem:
            raise UserFacingError(f"{path}: {what} cannot be decoded: {problem}. Re-export or re-download it.")
    try:
        data, properties = image_io.read_images([path], reader)
    except Exception as error:  # the readers raise RuntimeError, OSError, EOFError, zlib/gzip errors, ...
        raise UserFacingError(f"{path}: {what} cannot be decoded (truncated, corrupt or not an image: "
                              f"{reader_complaint(error)}). Re-export or re-download it.") from None
    return data, _geometry(path, data, properties)


def reader_complaint(error: Exception) -> str:
    """The informative part of a reader's exception, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK: "Exception thrown in SimpleITK ImageFileReader_Execute: /src/...cxx:490:", then ITK's lines
    lines = [line for line in lines if not line.startswith("Exception thrown in") and ".cxx:" not in line
             and not line.startswith("Reason:")]
    text = lines[0] if lines else type(error).__name__
    return text[:160]


def same_grid(reference: ImageInfo, other: ImageInfo) -> str | None:
    """None if ``other`` lies on ``reference``'s grid (shape, spacing, direction), else what differs."""
    if reference.shape != other.shape:
        return f"shape {other.shape} differs from {reference.path.name}'s {reference.shape}"
    if len(reference.spacing) != len(other.spacing) or not np.allclose(reference.spacing, other.spacing, rtol=1e-4,
                                                                        atol=1e-4):
        return f"spacing {other.spacing} differs from {reference.path.name}'s {reference.spacing}"
    if reference.direction is not None and other.direction is not None and (
            len(reference.direction) != len(other.direction)
            or not np.allclose(reference.direction, other.direction, atol=1e-4)):
        return f"direction {other.direction} differs from {reference.path.name}'s {reference.direction}"
    return None


def check_stored_values(path: str | os.PathLike, what: str = "voxel values") -> None:
    """Refuse NaN/Inf stored in a floating-point NIfTI file.

    ITK's NIfTI reader (nnU-Net's SimpleITKIO) returns them as 0, so decoded voxels cannot show them;
    nibabel reads the stored values. Other formats need nothing here (their readers keep NaN).
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        return
    import nibabel

    image = nibabel.load(os.fspath(path))
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return
    stored = np.asanyarray(image.dataobj)
    bad = int(stored.size - np.count_nonzero(np.isfinite(stored)))
    if bad:
        raise UserFacingError(f"{path}: {bad} of its {what} are NaN or infinite (nnU-Net's reader would silently "
                              f"read them as 0). Fix or remove those values and run again.")


def check_intensities(data: np.ndarray, info: ImageInfo) -> None:
    if not np.isfinite(data).all():
        bad = int(np.size(data) - np.isfinite(data).sum())
        raise UserFacingError(f"{info.path}: {bad} voxel(s) are NaN or infinite. Fix or remove those values "
                              f"(e.g. replace them with the image's minimum) and run again.")
    check_stored_values(info.path)


def check_labels(data: np.ndarray, info: ImageInfo, allowed: Iterable[int] | None) -> set[int]:
    """The label values present; refuses non-integers and values outside ``allowed``."""
    if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
        raise UserFacingError(f"{info.path}: label values are not whole numbers. Save the segmentation as integer "
                              f"labels (e.g. uint8) without interpolation.")
    present = {int(v) for v in np.unique(data)}
    if allowed is not None:
        unexpected = sorted(present - {int(v) for v in allowed})
        if unexpected:
            raise UserFacingError(f"{info.path}: label value(s) {unexpected} are not in the dataset's labels "
                                  f"{sorted(int(v) for v in allowed)}. Fix the segmentation or add the label to "
                                  f"dataset.json's \"labels\".")
    return present


def check_case(images: Sequence[str | os.PathLike], reader, *, label: str | os.PathLike | None = None,
               allowed_labels: Iterable[int] | None = None, spatial_dims: int | None = None) -> ImageInfo:
    """Decode and check one case (its channel files and optional label); returns the first channel's info.

    ``spatial_dims`` (2 or 3) is the dataset's dimensionality, when known from its other cases.
    """
    if not images:
        raise UserFacingError("a case without image files was given; this is a bug in the caller")
    reference: ImageInfo | None = None
    for path in images:
        data, info = read_image(path, reader)
        check_intensities(data, info)
        if reference is None:
            reference = info
            if spatial_dims is not None and info.spatial_dims != spatial_dims:
                raise UserFacingError(f"{info.path}: a {info.spatial_dims}D image in a {spatial_dims}D dataset. "
                                      f"Remove it or convert it to {spatial_dims}D.")
        else:
            problem = same_grid(reference, info)
            if problem:
                raise UserFacingError(f"{info.path}: {problem}; every channel of a case must share one grid. "
                                      f"Resample it onto {reference.path.name}'s grid.")
    assert reference is not None
    if label is not None:
        data, info = read_image(label, reader, what="label")
        check_stored_values(info.path, "label values")
        problem = same_grid(reference, info)
        if problem:
            raise UserFacingError(f"{info.path}: {problem}; a label must share its image's grid. "
                                  f"Resample it (nearest neighbour) onto {reference.path.name}'s grid.")
        check_labels(data, info, allowed_labels)
    return reference


def dataset_label_values(dataset_json: dict) -> set[int] | None:
    """Every integer label value a dataset.json allows (regions: their member values), with the ignore label."""
    labels: dict[str, Any] = dataset_json.get("labels") or {}
    values: set[int] = set()
    for value in labels.values():
        members = value if isinstance(value, (list, tuple)) else [value]
        for member in members:
            try:
                values.add(int(member))
            except (TypeError, ValueError):
                return None
    return values or None
