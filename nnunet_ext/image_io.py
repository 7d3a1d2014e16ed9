"""One image I/O path: images are read and written by the reader/writer nnU-Net picks for the dataset.

nnU-Net reads every raw image through one interface (``nnunetv2.imageio``: ``SimpleITKIO``,
``NibabelIO``, ``NaturalImage2DIO``, ``Tiff3DIO``, ...), chosen by dataset.json's
``overwrite_image_reader_writer`` or else by the file ending (:func:`reader_writer`). ``nnunet-ext
merge`` (labels, zero channels), the input checks of merge, convert, preprocess-unlabeled and
predict --task (:mod:`nnunet_ext.image_checks`), the demo's figure and the test harness read and
write through this module with that instance, so a dataset nnU-Net reads is read the same way by
them; every write goes through :mod:`nnunet_ext.atomic_io` (complete or absent).

Where nnU-Net's interface is not enough, and what is done instead:

* Header-only reading (:func:`read_header`): the interface always decodes the voxels. Where only
  the geometry is needed and the file is one SimpleITK reads (the formats of ``SimpleITKIO``), its
  header is read with SimpleITK, for speed. The full-decode checks of
  :mod:`nnunet_ext.image_checks` never rely on it.
* Zero channels (:func:`write_zero_channel`): written with the reference's reader/writer as a
  segmentation of zeros on the reference's grid; for ``SimpleITKIO`` datasets from the reference's
  header alone (no decode; the zero image keeps the reference's pixel type).
* New images without a reference (:func:`write_volume`, the synthetic datasets we generate): nnU-Net's
  writers write segmentations only (cast to uint8/uint16), so float images are written with SimpleITK,
  whose format follows the file ending (``.nii.gz``, ``.nrrd``, ``.mha``).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from nnunet_ext import atomic_io

#: reader/writers that read every file with SimpleITK (``sitk.ReadImage``): a header read sees their geometry
SIMPLEITK_READERS = ("SimpleITKIO", "SimpleITKIOWithReorient")
#: reader/writers whose ``write_seg`` writes exactly the one file it is given (Tiff3DIO also writes a
#: ``<name>.json`` of the spacing beside it; unknown custom writers are treated like it)
SINGLE_FILE_WRITERS = (*SIMPLEITK_READERS, "NibabelIO", "NibabelIOWithReorient", "NaturalImage2DIO")

__all__ = ["ImageHeader", "SIMPLEITK_READERS", "read_header", "read_images", "read_segmentation", "reader_writer",
           "reader_writer_name", "relabel_segmentation", "silenced", "write_segmentation", "write_volume",
           "write_zero_channel"]


def reader_writer(dataset_json: Mapping[str, Any] | None, example_file: str | os.PathLike) -> Any:
    """The reader/writer instance nnU-Net uses for this dataset (``overwrite_image_reader_writer``, else the
    file ending), or, without a dataset.json, for ``example_file``'s ending. Raises RuntimeError when nnU-Net
    has none."""
    from nnunet_ext import compat

    return compat.image_reader_writer(dict(dataset_json) if dataset_json is not None else None,
                                      os.fspath(example_file))


def reader_writer_name(instance: Any) -> str:
    """The class name of a reader/writer, as dataset.json's ``overwrite_image_reader_writer`` spells it."""
    return type(instance).__name__


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Silence stdout/stderr at the file-descriptor level: nnU-Net's readers print diagnostics and ITK's
    C++ readers write to fd 2 before failing; our one-line messages replace them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (*saved, null):
            os.close(descriptor)


def read_images(files: Sequence[str | os.PathLike], rw: Any) -> tuple[np.ndarray, dict]:
    """``rw.read_images``: (channels, z, y, x) float32 and nnU-Net's properties (its diagnostics silenced)."""
    with silenced():
        return rw.read_images(tuple(os.fspath(f) for f in files))


def read_segmentation(path: str | os.PathLike, rw: Any) -> tuple[np.ndarray, dict]:
    """``rw.read_seg``: the label map as (z, y, x) integers (z = 1 for 2D) and nnU-Net's properties.

    Values are cast, not checked: callers that need whole numbers check them first
    (:func:`nnunet_ext.image_checks.check_labels`). Raises ValueError for a file of several channels.
    """
    with silenced():
        data, properties = rw.read_seg(os.fspath(path))
    if data.shape[0] != 1:
        raise ValueError(f"{path} holds {data.shape[0]} channels, not one label map")
    return data[0].astype(np.int64), properties


def write_segmentation(values: np.ndarray, target: str | os.PathLike, properties: dict, rw: Any) -> None:
    """``rw.write_seg`` (uint8, or uint16 from 255 on, as nnU-Net writes) to ``target`` through the atomic
    write path; ``values`` is (z, y, x) (z = 1 for 2D), ``properties`` those of the reference it lies on.

    A writer that adds files beside its image (Tiff3DIO's spacing ``.json``) writes into a private folder
    first; each file is then moved into place, the image last.
    """
    target = Path(target)
    if reader_writer_name(rw) in SINGLE_FILE_WRITERS:
        atomic_io.write_with(target, lambda temporary: rw.write_seg(values, os.fspath(temporary), properties))
        return
    with atomic_io.scratch_folder(target) as scratch:
        rw.write_seg(values, os.fspath(scratch / target.name), properties)
        for path in sorted(scratch.iterdir(), key=lambda p: p.name == target.name):
            atomic_io.fsync_file(path)
            atomic_io.move_into_place(path, target.parent / path.name)


def relabel_segmentation(source: str | os.PathLike, target: str | os.PathLike, lut: np.ndarray, rw: Any) -> None:
    """Write ``lut[values]`` of the label map ``source`` to ``target``, on ``source``'s grid. Raises ValueError
    for a value outside ``0..len(lut)-1`` or a negative entry of ``lut`` it selects (no mapping)."""
    values, properties = read_segmentation(source, rw)
    inside = (values >= 0) & (values < len(lut))
    mapped = np.where(inside, lut[np.clip(values, 0, len(lut) - 1)], -1)
    if np.any(mapped < 0):
        raise ValueError(f"{source} holds value(s) {np.unique(values[mapped < 0]).tolist()[:10]} without a mapping")
    write_segmentation(mapped, target, properties, rw)


# --- headers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageHeader:
    """An image file's header (SimpleITK's view: x, y, z order), read without decoding voxels."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_type: str
    components: int


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Header of a file SimpleITK reads (``SimpleITKIO``'s formats), voxels not decoded (for speed: the
    geometry checks of a conversion read every file's header). Raises RuntimeError (SimpleITK's) if the
    file cannot be read."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    reader.ReadImageInformation()
    return ImageHeader(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                       tuple(reader.GetDirection()), sitk.GetPixelIDValueAsString(reader.GetPixelID()),
                       reader.GetNumberOfComponents())


# --- zero channels --------------------------------------------------------------------------------


def write_zero_channel(reference: str | os.PathLike, target: str | os.PathLike, rw: Any = None) -> None:
    """The zero-channel rule, used by ``nnunet-ext merge`` and ``predict --task``: a channel a task's cases do
    not have is an image of zeros on the grid of the case's channel 0 (``reference``): same size, spacing,
    origin and direction, read back by the dataset's reader/writer exactly as the reference's grid. The
    network is told the task's real channel count (``num_channels``), so the zeros only fill the input.

    ``rw``: the dataset's reader/writer (default: nnU-Net's for the reference's file ending). SimpleITK
    formats are written from the reference's header alone, keeping its pixel type and components (the
    callers have decoded the reference in full already); other formats go through the reader/writer.
    """
    if rw is None:
        rw = reader_writer(None, reference)
    if reader_writer_name(rw) in SIMPLEITK_READERS:
        _write_zero_like_header(reference, target)
        return
    data, properties = read_images([reference], rw)
    write_segmentation(np.zeros(data.shape[1:], dtype=np.uint8), target, properties, rw)


def _write_zero_like_header(reference: str | os.PathLike, target: str | os.PathLike) -> None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(reference))
    reader.ReadImageInformation()
    components = reader.GetNumberOfComponents()
    size = list(reader.GetSize())
    image = sitk.Image(size, reader.GetPixelID(), components) if components > 1 else \
        sitk.Image(size, reader.GetPixelID())
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    atomic_io.write_with(target, lambda temporary: sitk.WriteImage(image, os.fspath(temporary), True))


# --- new images -----------------------------------------------------------------------------------


def write_volume(array: np.ndarray, target: str | os.PathLike, spacing_zyx: Sequence[float]) -> None:
    """A new (z, y, x) image of ``array``'s type with spacing ``spacing_zyx``, origin 0 and identity direction,
    written atomically by SimpleITK in the format of ``target``'s ending (see the module docstring: nnU-Net's
    writers write segmentations only). SimpleITK wants the spacing as (x, y, z), hence the reversal."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    atomic_io.write_with(target, lambda temporary: sitk.WriteImage(image, os.fspath(temporary), True))
