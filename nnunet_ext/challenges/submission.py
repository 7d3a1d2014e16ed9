"""Challenge submissions from nnU-Net predictions, and a validator to run before uploading.

nnU-Net writes one ``<case>.nii.gz`` label map per test case, in the dataset's label space, on the
test image's grid. Each challenge wants its own naming, values, data type and format:

- KiTS21: ``case_XXXXX.nii.gz``, uint8, 0 background, 1 kidney, 2 tumour, 3 cyst. Our KiTS21 dataset
  is region-based and nnU-Net's export paints the regions with ``regions_class_order`` [1, 3, 2],
  so its predictions already hold these values (tested); export only checks and casts.
- AMOS22: ``amos_XXXX.nii.gz``, uint8, 0..15 as in the release's dataset.json.
- SegRap2023: the challenge ran algorithm containers that write, per case, one 4D ``.mha``: the
  binary masks of the 45 OARs (task 1) or of GTVp and GTVnd (task 2) stacked along a fourth axis in
  a fixed order, shape [N, *image shape] as numpy sees it (SimpleITK JoinSeries of 3D images), with
  the image's spacing (organisers' ``stacked_results_to_4d_mha.py`` and Docker example). We write
  ``segrap_XXXX.mha`` in that format, uint8 0/1, the 3D grid copied from the prediction; the OAR
  masks are unions of the 54 predicted classes (:data:`segrap2023.OAR_COMPOSITION`). Inside a
  container, name the file as the container's input file instead.

The validator checks a submission folder against the test images: every test case present and no
other file, each file decoded in full (a truncated ``.nii.gz`` is caught by its gzip stream), same
size/spacing/origin/direction as the image (the tolerance of nnU-Net's checks), only the allowed
whole-number values, uint8, and for SegRap2023 a fourth axis of the right length.

Export is all or nothing: every prediction is decoded and checked (3D label map, whole numbers in
the dataset's label space, the test image's grid, every test case predicted) while the files are
written into a staging folder beside OUT through :mod:`nnunet_ext.atomic_io`; the staged folder is
validated and only then put in place, replacing an earlier submission whole. A problem, an error or
Ctrl-C leaves OUT as it was. An OUT holding anything but this challenge's submission files is
refused, and one submit at a time may write an OUT (a lock beside it).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nnunet_ext import atomic_io
from nnunet_ext.challenges import amos22, kits21, segrap2023
from nnunet_ext.challenges.common import FILE_ENDING, Geometry, read_geometry
from nnunet_ext.errors import UserFacingError

CHALLENGES = ("kits21", "amos22", "segrap2023")
#: How long a second submit into the same OUT waits for the first before it is refused.
LOCK_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class SubmissionFormat:
    """What one challenge (task) expects in a submission folder, and how to get there from nnU-Net."""

    title: str
    case_pattern: re.Pattern
    extension: str
    prediction_values: frozenset[int]  # allowed in nnU-Net's predictions (the dataset's label values)
    submission_values: frozenset[int]
    release_image: str  # path of a case's image in the release's test folder, "{case}" replaced
    channels: tuple[tuple[str, tuple[int, ...]], ...] | None = None  # 4D: per channel, the predicted values

    def example(self) -> str:
        return {"KiTS21": "case_00300", "AMOS22": "amos_0001"}.get(self.title, "segrap_0001") + self.extension

    def to_submission(self, labels: np.ndarray) -> np.ndarray:
        """A prediction's label map -> the submission array (3D uint8 labels, or [N, ...] uint8 masks)."""
        if self.channels is None:
            return labels.astype(np.uint8)
        return np.stack([np.isin(labels, values) for _, values in self.channels]).astype(np.uint8)


def submission_format(challenge: str, task: str | None = None) -> SubmissionFormat:
    if challenge == "kits21":
        return SubmissionFormat("KiTS21", kits21.CASE_PATTERN, FILE_ENDING, frozenset(kits21.SOURCE_LABELS),
                                frozenset(kits21.SOURCE_LABELS), "{case}/" + kits21.IMAGE_FILE)
    if challenge == "amos22":
        values = frozenset(range(amos22.NUM_LABELS))
        return SubmissionFormat("AMOS22", amos22.CASE_PATTERN, FILE_ENDING, values, values, "{case}" + FILE_ENDING)
    if challenge == "segrap2023":
        if task not in segrap2023.TASKS:
            raise UserFacingError(f"segrap2023 needs --task {{{','.join(segrap2023.TASKS)}}} (got {task!r}).")
        if task == "oar":
            channels = tuple(segrap2023.OAR_COMPOSITION.items())
        else:
            channels = tuple((name, (value,)) for name, value in segrap2023.GTV_LABELS.items())
        return SubmissionFormat(f"SegRap2023 {task.upper()}", segrap2023.CASE_PATTERN, ".mha",
                                frozenset(segrap2023.task_labels(task).values()), frozenset({0, 1}),
                                "{case}/" + segrap2023.CHANNEL_FILES[0], channels)
    raise UserFacingError(f"unknown challenge {challenge!r}; choose one of {', '.join(CHALLENGES)}.")


@dataclass
class Report:
    """Problems per case or file; valid when there are none."""

    folder: Path
    checked: int = 0
    expected: int | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed last (e.g. that nothing was written)
    what: str = "submission files"

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, problem: str) -> None:
        self.problems.append((where, problem))

    def format(self, title: str) -> str:
        against = f" against {self.expected} test images" if self.expected is not None else \
            " (no --images: case list and geometry not checked)"
        lines = [f"Checked {self.checked} {title} {self.what} in {self.folder}{against}."]
        lines += [f"  {where}: {problem}" for where, problem in sorted(self.problems)]
        if not self.ok:
            lines.append(f"INVALID: {len(self.problems)} problem(s). Fix them before uploading.")
        elif self.expected is None:
            lines.append(f"VALID as far as checked (naming, label values, dtype); add --images to check the case "
                         f"list and the grids too.")
        else:
            lines.append(f"VALID: case list, naming, grids, label values and dtype as {title} requires.")
        return "\n".join(lines + self.notes)


def _case_of(name: str, suffix: str, pattern: re.Pattern) -> str | None:
    if not name.endswith(suffix):
        return None
    case = name[: -len(suffix)]
    return case if pattern.match(case) else None


def reference_images(fmt: SubmissionFormat, images_dir: str | os.PathLike) -> dict[str, Path]:
    """Test images by case: nnU-Net's imagesTs layout (``<case>_0000.nii.gz``) or the release's layout."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise UserFacingError(f"--images {folder} is not a folder.")
    found = {}
    for entry in folder.iterdir():
        case = _case_of(entry.name, "_0000" + FILE_ENDING, fmt.case_pattern)
        if case:
            found[case] = entry
            continue
        release_image = folder / fmt.release_image.format(case=entry.name.split(".")[0])
        if fmt.case_pattern.match(entry.name.split(".")[0]) and release_image.is_file():
            found[entry.name.split(".")[0]] = release_image
    if not found:
        raise UserFacingError(
            f"no {fmt.title} test images in {folder}: expected nnU-Net's <case>_0000{FILE_ENDING} files or the "
            f"release's layout ({fmt.release_image.format(case=fmt.example().split('.')[0])}).")
    return found


def _last_line(error: Exception) -> str:
    """The informative line of a SimpleITK error (its first lines are a source location)."""
    from nnunet_ext.image_checks import reader_complaint

    return reader_complaint(error)


def _reference_geometry(path: Path) -> Geometry:
    try:
        return read_geometry(path)
    except RuntimeError as error:
        raise UserFacingError(f"--images: the test image {path} cannot be read ({_last_line(error)}). Restore it, or "
                              f"point --images at the test images.") from None


def read_label_file(path: Path) -> tuple[Any, str]:
    """Decode ``path`` in full with SimpleITK: (image, "") or (None, what is wrong with it).

    A ``.gz`` file's gzip stream is verified first: ITK reads a truncated ``.nii.gz`` without complaint.
    """
    import SimpleITK as sitk

    from nnunet_ext.image_checks import silenced, verify_gzip_stream

    if not path.is_file():
        return None, "is a broken symbolic link" if path.is_symlink() else "is not a file"
    if path.stat().st_size == 0:
        return None, "is empty (0 bytes)"
    if path.name.endswith(".gz"):
        problem = verify_gzip_stream(path)
        if problem:
            return None, f"cannot be read: {problem}"
    try:
        with silenced():  # ITK prints its complaint to fd 2 before raising; ours replaces it
            return sitk.ReadImage(str(path)), ""
    except RuntimeError as error:
        return None, f"cannot be read ({_last_line(error)})"


def _label_values(array: np.ndarray) -> set[int] | None:
    """The values of a label array; None when they are not all whole numbers."""
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all() or not np.equal(np.mod(array, 1), 0).all():
            return None
    return {int(v) for v in np.unique(array)}


def validate_submission(fmt: SubmissionFormat, folder: str | os.PathLike,
                        images_dir: str | os.PathLike | None = None) -> Report:
    """Check a submission folder; with ``images_dir``, also against the test-image list and their grids."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserFacingError(f"{folder} is not a folder.")
    references = reference_images(fmt, images_dir) if images_dir is not None else None
    report = Report(folder, expected=len(references) if references is not None else None)
    submitted = {}
    for entry in sorted(folder.iterdir()):
        case = _case_of(entry.name, fmt.extension, fmt.case_pattern)
        if case is None:
            report.add(entry.name, f"unexpected file; {fmt.title} expects only files named like {fmt.example()}")
        else:
            submitted[case] = entry
    if references is not None:
        for case in sorted(set(references) - set(submitted)):
            report.add(case, f"missing: no {case}{fmt.extension} for test image {references[case]}")
        for case in sorted(set(submitted) - set(references)):
            report.add(case, f"{submitted[case].name} is not one of the test images in {images_dir}")
    for case, path in submitted.items():
        report.checked += 1
        image, problem = read_label_file(path)
        if image is None:
            report.add(case, f"{path.name} {problem}")
            continue
        reference = references.get(case) if references else None
        for problem in _file_problems(fmt, image, reference):
            report.add(case, problem)
    return report


def _file_problems(fmt: SubmissionFormat, image, reference: Path | None) -> list[str]:
    import SimpleITK as sitk

    problems = []
    dims = 3 if fmt.channels is None else 4
    if image.GetDimension() != dims or image.GetNumberOfComponentsPerPixel() != 1:
        what = "a 3D label map" if dims == 3 else f"a 4D image of {len(fmt.channels)} stacked masks"
        return [f"expected {what}, got a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
                f"component(s), size {image.GetSize()}"]
    if dims == 4 and image.GetSize()[3] != len(fmt.channels):
        problems.append(f"fourth axis has {image.GetSize()[3]} masks, expected {len(fmt.channels)} "
                        f"({', '.join(name for name, _ in fmt.channels[:3])}, ...)")
    if image.GetPixelID() != sitk.sitkUInt8:
        problems.append(f"dtype {image.GetPixelIDTypeAsString()}, expected 8-bit unsigned integer (uint8)")
    values = _label_values(sitk.GetArrayViewFromImage(image))
    if values is None:
        problems.append("values are not whole numbers; a submission holds labels, not probabilities")
    elif sorted(values - fmt.submission_values):
        problems.append(f"unexpected label values {sorted(values - fmt.submission_values)}; allowed "
                        f"{sorted(fmt.submission_values)}")
    if reference is not None:
        mismatch = _reference_geometry(reference).mismatch(_geometry_of(image), dims=3)
        if mismatch:
            problems.append(f"grid differs from the test image {reference.name}: {mismatch}")
    return problems


def _geometry_of(image) -> Geometry:
    import SimpleITK as sitk

    return Geometry(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                    tuple(image.GetDirection()), sitk.GetPixelIDValueAsString(image.GetPixelID()),
                    image.GetNumberOfComponentsPerPixel())


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


class _NotWritten(Exception):
    """Raised inside the staged output to discard it: the report lists why."""

    def __init__(self, report: Report):
        super().__init__("submission not written")
        self.report = report


def _refuse_overlapping_folders(predictions: Path, out: Path, images_dir: str | os.PathLike | None) -> None:
    """OUT is written as a whole: it must not be, contain or lie inside an input folder."""
    inputs = [("the prediction folder PRED_DIR", predictions)]
    if images_dir is not None:
        inputs.append(("the --images folder", Path(images_dir)))
    target = out.resolve()
    for what, folder in inputs:
        folder = folder.resolve()
        if target == folder or folder in target.parents or target in folder.parents:
            raise UserFacingError(f"OUT {out} overlaps {what} {folder}, which is only read. Give a new folder "
                                  f"outside it as OUT.")


def _refuse_foreign_output(fmt: SubmissionFormat, out: Path) -> None:
    """An existing OUT may be empty or hold a previous submission of this challenge (then it is replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserFacingError(f"OUT {out} exists and is not a folder; it was left untouched. Give a new folder.")
    foreign = sorted(entry.name for entry in out.iterdir() if entry.is_symlink() or not entry.is_file()
                     or _case_of(entry.name, fmt.extension, fmt.case_pattern) is None)
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserFacingError(f"OUT {out} holds {shown}, which is not a {fmt.title} submission written by nnunet-ext "
                              f"submit; it was left untouched. Give a new or empty folder as OUT, or remove it "
                              f"yourself.")


def _prediction_problem(fmt: SubmissionFormat, path: Path, image, reference: Path | None) -> tuple[Any, str]:
    """(label array, "") for a prediction that can be exported, else (None, what is wrong and what to do)."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return None, (f"{path.name}: expected a 3D label map as nnUNetv2_predict writes it, got a "
                      f"{image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} component(s), size "
                      f"{image.GetSize()}; not exported")
    labels = sitk.GetArrayFromImage(image)
    values = _label_values(labels)
    if values is None:
        return None, (f"{path.name} holds values that are not whole numbers ({image.GetPixelIDTypeAsString()}): a "
                      f"label map is needed, not probabilities; not exported")
    extra = sorted(values - fmt.prediction_values)
    if extra:
        return None, (f"{path.name} holds label values {extra} outside the {fmt.title} label space "
                      f"{sorted(fmt.prediction_values)}; not exported")
    if reference is not None:
        mismatch = _reference_geometry(reference).mismatch(_geometry_of(image), dims=3)
        if mismatch:
            return None, (f"{path.name}: grid differs from the test image {reference}: {mismatch}; predict from the "
                          f"test images themselves; not exported")
    return labels, ""


def _export_into(fmt: SubmissionFormat, cases: dict[Path, str | None], references: dict[str, Path] | None,
                 staging: Path, images_dir, log: Callable[[str], None]) -> list[tuple[str, str]]:
    """Check every prediction and, while none has failed, write its submission file into ``staging``."""
    problems: list[tuple[str, str]] = []
    for index, (path, case) in enumerate(cases.items(), start=1):
        if case is None:
            problems.append((path.name, "not a case name of this challenge; not exported"))
            continue
        if references is not None and case not in references:
            problems.append((case, f"{path.name} is not one of the test images in {images_dir}; not exported"))
            continue
        image, problem = read_label_file(path)
        if image is None:
            problems.append((case, f"{path.name} {problem}; predict this case again"))
            continue
        labels, problem = _prediction_problem(fmt, path, image, references.get(case) if references else None)
        if problem:
            problems.append((case, problem))
        elif not problems:  # once anything failed nothing will be kept: only check the rest
            _write(fmt, fmt.to_submission(labels), image, staging / f"{case}{fmt.extension}")
            log(f"[{index}/{len(cases)}] {case}{fmt.extension}")
    for case in sorted(set(references or ()) - set(cases.values())):
        problems.append((case, f"missing: no prediction {case}{FILE_ENDING} for test image {references[case]}"))
    return problems


def export_submission(fmt: SubmissionFormat, predictions: str | os.PathLike, out: str | os.PathLike,
                      images_dir: str | os.PathLike | None = None,
                      log: Callable[[str], None] = print) -> Report:
    """Check every prediction, write the submission files, validate them, then put the folder in place.

    All or nothing: if any prediction cannot be exported or the written folder does not validate,
    the report lists why and ``out`` is left as it was. ``out`` may be absent, empty or an earlier
    submission of this challenge (replaced whole); anything else is refused. One run per ``out``.
    """
    predictions, out = Path(predictions), Path(out)
    if not predictions.is_dir():
        raise UserFacingError(f"{predictions} is not a folder of nnU-Net predictions.")
    _refuse_overlapping_folders(predictions, out, images_dir)
    files = sorted(p for p in predictions.iterdir() if p.name.endswith(FILE_ENDING))
    cases = {p: _case_of(p.name, FILE_ENDING, fmt.case_pattern) for p in files}
    if not any(cases.values()):
        raise UserFacingError(f"no {fmt.title} predictions in {predictions}: expected nnU-Net outputs named like "
                              f"{fmt.example().split('.')[0]}{FILE_ENDING}.")
    references = reference_images(fmt, images_dir) if images_dir is not None else None
    target = out.resolve()
    _refuse_foreign_output(fmt, target)  # before the lock: a refusal leaves no lock file
    with atomic_io.exclusive(target, "nnunet-ext submit", timeout=LOCK_TIMEOUT_SECONDS):
        _refuse_foreign_output(fmt, target)
        atomic_io.remove_stale_temporaries(target.parent)
        try:
            with atomic_io.staged_folder(target, replace=True) as staging:
                problems = _export_into(fmt, cases, references, staging, images_dir, log)
                report = Report(predictions, checked=sum(case is not None for case in cases.values()),
                                expected=len(references) if references else None, problems=problems,
                                what="predictions")
                if report.ok:
                    report = validate_submission(fmt, staging, images_dir)
                    report.folder = out
                if not report.ok:
                    raise _NotWritten(report)
        except _NotWritten as refused:
            report = refused.report
            report.notes.append(f"Nothing was written: {out} is as it was. Fix the problems above and run again.")
        except KeyboardInterrupt:
            log(f"Interrupted: nothing was written, {out} is as it was. Run the same command again.")
            raise
    return report


def _write(fmt: SubmissionFormat, array: np.ndarray, prediction, target: Path) -> None:
    """Write through the atomic write path; 4D stacks are JoinSeries of 3D masks on the prediction's grid."""
    import SimpleITK as sitk

    if fmt.channels is None:
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(prediction)
    else:
        masks = []
        for mask in array:
            masks.append(sitk.GetImageFromArray(mask, isVector=False))
            masks[-1].CopyInformation(prediction)
        image = sitk.JoinSeries(masks)
    atomic_io.write_with(target, lambda temporary: sitk.WriteImage(image, str(temporary), True))
