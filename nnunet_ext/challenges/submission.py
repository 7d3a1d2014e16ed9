"""Challenge submissions from nnU-Net predictions, and a validator to run before uploading.

nnU-Net writes one ``<case>.nii.gz`` label map per test case, in the dataset's label space, on the
test image's grid. Each challenge's :class:`~nnunet_ext.challenges.definition.SubmissionFormat` (from
its module, through :mod:`nnunet_ext.challenges.registry`) says what its leaderboard takes: naming,
values, data type, file type, a 4D stack of masks, and whether the files go into a zip (AMOS22:
``results/amos_XXXX.nii.gz``). The facts and their sources are in each challenge's module and how-to page.

The validator checks a submission (folder or zip) against the expected case list (``--images``: the
test or validation images, nnU-Net's ``<case>_0000.nii.gz`` or the release's layout, restricted to the
task's cases): every case present and no other file, each file decoded in full (a truncated
``.nii.gz`` is caught by its gzip stream), same size/spacing/origin/direction as the image (the
tolerance of nnU-Net's checks), only the allowed whole-number values, uint8, and for a 4D stack the
right number of masks. In a zip, members are checked by name before anything is extracted (into a
temporary folder of ours), so a hand-built zip with stray or escaping names is reported, never unpacked.

Export is all or nothing: every prediction is decoded and checked (3D label map, whole numbers in
the dataset's label space, the test image's grid, every expected case predicted) while the files are
written into a staging folder beside OUT through :mod:`nnunet_ext.atomic_io`; the staged files are
validated and only then put in place (a folder replacing an earlier submission whole, or the zip
written atomically). A problem, an error or Ctrl-C leaves OUT as it was. An OUT holding anything but
this challenge's submission is refused, and one submit at a time may write an OUT (a lock beside it).
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nnunet_ext import atomic_io
from nnunet_ext.challenges import archive
from nnunet_ext.challenges.common import FILE_ENDING, Geometry, read_geometry
from nnunet_ext.challenges.definition import SubmissionFormat
from nnunet_ext.errors import UserFacingError

#: How long a second submit into the same OUT waits for the first before it is refused.
LOCK_TIMEOUT_SECONDS = 60.0


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
        against = f" against {self.expected} images" if self.expected is not None else \
            " (no --images: case list and geometry not checked)"
        lines = [f"Checked {self.checked} {title} {self.what} in {self.folder}{against}."]
        lines += [f"  {where}: {problem}" for where, problem in sorted(self.problems)]
        if not self.ok:
            lines.append(f"INVALID: {len(self.problems)} problem(s). Fix them before uploading.")
        elif self.expected is None:
            lines.append("VALID as far as checked (naming, label values, dtype); add --images to check the case "
                         "list and the grids too.")
        else:
            lines.append(f"VALID: case list, naming, grids, label values and dtype as {title} requires.")
        return "\n".join(lines + self.notes)


def _case_of(name: str, suffix: str, pattern: re.Pattern) -> str | None:
    if not name.endswith(suffix):
        return None
    case = name[: -len(suffix)]
    return case if pattern.match(case) else None


def reference_images(fmt: SubmissionFormat, images_dir: str | os.PathLike) -> dict[str, Path]:
    """Images by case (nnU-Net's ``<case>_0000.nii.gz`` or the release's layout), the task's cases only."""
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
    if fmt.selects is not None:
        found = {case: path for case, path in found.items() if fmt.selects(case)}
    if not found:
        raise UserFacingError(
            f"no {fmt.title} images in {folder}: expected nnU-Net's <case>_0000{FILE_ENDING} files or the "
            f"release's layout ({fmt.release_image.format(case=fmt.example_case)}) of this task's cases.")
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


def validate_submission(fmt: SubmissionFormat, submission: str | os.PathLike,
                        images_dir: str | os.PathLike | None = None) -> Report:
    """Check a submission (a folder, or for a zip format the .zip); with ``images_dir``, also against the
    expected case list (the task's images there) and their grids."""
    submission = Path(submission)
    references = reference_images(fmt, images_dir) if images_dir is not None else None
    if fmt.archive_folder is None:
        if not submission.is_dir():
            raise UserFacingError(f"{submission} is not a folder; a {fmt.title} submission is a folder of "
                                  f"{fmt.example()} files.")
        return _validate_folder(fmt, submission, references, images_dir, submission)
    if not submission.is_file():
        raise UserFacingError(f"{submission} is not a file; a {fmt.title} submission is one .zip holding "
                              f"{fmt.archive_folder}/{fmt.example()} files.")
    with tempfile.TemporaryDirectory(prefix="nnunet-ext-submission-") as scratch:
        problems, _ = archive.extract(fmt, submission, Path(scratch))
        report = _validate_folder(fmt, Path(scratch), references, images_dir, submission)
    report.problems = problems + report.problems
    return report


def _validate_folder(fmt: SubmissionFormat, folder: Path, references: dict[str, Path] | None, images_dir,
                     shown: Path) -> Report:
    report = Report(shown, expected=len(references) if references is not None else None)
    submitted = {}
    for entry in sorted(folder.iterdir()):
        case = _case_of(entry.name, fmt.extension, fmt.case_pattern)
        if case is None:
            report.add(entry.name, f"unexpected file; {fmt.title} expects only files named like {fmt.example()}")
        else:
            submitted[case] = entry
    if references is not None:
        for case in sorted(set(references) - set(submitted)):
            report.add(case, f"missing: no {case}{fmt.extension} for image {references[case]}")
        for case in sorted(set(submitted) - set(references)):
            report.add(case, f"{submitted[case].name} is not one of this task's images in {images_dir}")
        _note_official_count(fmt, references, report)
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


def _note_official_count(fmt: SubmissionFormat, references: dict[str, Path], report: Report) -> None:
    if fmt.official_count is not None and len(references) != fmt.official_count:
        report.notes.append(f"Note: {fmt.title} is scored only on all {fmt.official_count} images of the phase "
                            f"(the release's own folder); --images holds {len(references)} of this task's images "
                            f"({fmt.source}).")


def _file_problems(fmt: SubmissionFormat, image, reference: Path | None) -> list[str]:
    import SimpleITK as sitk

    problems = []
    channels = fmt.channels or ()
    dims = 3 if fmt.channels is None else 4
    if image.GetDimension() != dims or image.GetNumberOfComponentsPerPixel() != 1:
        what = "a 3D label map" if dims == 3 else f"a 4D image of {len(channels)} stacked masks"
        return [f"expected {what}, got a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
                f"component(s), size {image.GetSize()}"]
    if dims == 4 and image.GetSize()[3] != len(channels):
        problems.append(f"fourth axis has {image.GetSize()[3]} masks, expected {len(channels)} "
                        f"({', '.join(name for name, _ in channels[:3])}, ...)")
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
            raise UserFacingError(f"OUT {out} overlaps {what} {folder}, which is only read. Give a new "
                                  f"{'file' if out.suffix == '.zip' else 'folder'} outside it as OUT.")


def _refuse_foreign_output(fmt: SubmissionFormat, out: Path) -> None:
    """An existing OUT may be empty or hold a previous submission of this challenge (then it is replaced)."""
    if not out.exists() and not out.is_symlink():
        return
    if fmt.archive_folder is not None:
        if out.is_symlink() or not out.is_file() or not archive.is_submission_archive(fmt, out):
            raise UserFacingError(f"OUT {out} exists and is not a {fmt.title} submission zip written by nnunet-ext "
                                  f"submit; it was left untouched. Give a new .zip name, or remove it yourself.")
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
            problems.append((case, f"{path.name} is not one of this task's images in {images_dir}; not exported"))
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
    for case in sorted(set(references or {}) - set(cases.values())):
        problems.append((case, f"missing: no prediction {case}{FILE_ENDING} for image {(references or {})[case]}"))
    return problems


def _check_output_name(fmt: SubmissionFormat, out: Path, images_dir) -> None:
    if fmt.archive_folder is None:
        return
    if out.suffix != ".zip":
        raise UserFacingError(f"{fmt.title} takes one zip file: give OUT as a file name ending in .zip (e.g. "
                              f"{out.name or 'submission'}.zip), not {out}.")
    if images_dir is None:
        raise UserFacingError(f"{fmt.title} scores a zip only when it matches the images one-to-one: give them with "
                              f"--images (nnU-Net's imagesVa/imagesTs of the converted dataset, or the release's "
                              f"folder).")


def export_submission(fmt: SubmissionFormat, predictions: str | os.PathLike, out: str | os.PathLike,
                      images_dir: str | os.PathLike | None = None,
                      log: Callable[[str], None] = print) -> Report:
    """Check every prediction, write the submission files, validate them, then put OUT in place.

    All or nothing: if any prediction cannot be exported or the written files do not validate, the
    report lists why and ``out`` is left as it was. ``out`` may be absent, empty or an earlier
    submission of this challenge (replaced whole); anything else is refused. One run per ``out``.
    A zip format (``fmt.archive_folder``) needs ``images_dir``, the case list the zip must match.
    """
    predictions, out = Path(predictions), Path(out)
    if not predictions.is_dir():
        raise UserFacingError(f"{predictions} is not a folder of nnU-Net predictions.")
    _check_output_name(fmt, out, images_dir)
    _refuse_overlapping_folders(predictions, out, images_dir)
    files = sorted(p for p in predictions.iterdir() if p.name.endswith(FILE_ENDING))
    cases = {p: _case_of(p.name, FILE_ENDING, fmt.case_pattern) for p in files}
    if not any(cases.values()):
        raise UserFacingError(f"no {fmt.title} predictions in {predictions}: expected nnU-Net outputs named like "
                              f"{fmt.example_case}{FILE_ENDING}.")
    references = reference_images(fmt, images_dir) if images_dir is not None else None
    target = out.resolve()
    _refuse_foreign_output(fmt, target)  # before the lock: a refusal leaves no lock file
    with atomic_io.exclusive(target, "nnunet-ext submit", timeout=LOCK_TIMEOUT_SECONDS):
        _refuse_foreign_output(fmt, target)
        atomic_io.remove_stale_temporaries(target.parent)
        try:
            with _staging(fmt, target) as staging:
                report = _export_and_check(fmt, cases, references, staging, predictions, images_dir, log)
                report.folder = out
                if not report.ok:
                    raise _NotWritten(report)
                if fmt.archive_folder is not None:
                    archive.write_archive(fmt, staging, target)
        except _NotWritten as refused:
            report = refused.report
            report.notes.append(f"Nothing was written: {out} is as it was. Fix the problems above and run again.")
        except KeyboardInterrupt:
            log(f"Interrupted: nothing was written, {out} is as it was. Run the same command again.")
            raise
    return report


def _staging(fmt: SubmissionFormat, target: Path):
    """Where the files are written first: the folder that becomes OUT, or (zip) a scratch folder beside it."""
    if fmt.archive_folder is None:
        return atomic_io.staged_folder(target, replace=True)
    return atomic_io.scratch_folder(target)


def _export_and_check(fmt: SubmissionFormat, cases: dict[Path, str | None], references: dict[str, Path] | None,
                      staging: Path, predictions: Path, images_dir, log: Callable[[str], None]) -> Report:
    problems = _export_into(fmt, cases, references, staging, images_dir, log)
    report = Report(predictions, checked=sum(case is not None for case in cases.values()),
                    expected=len(references) if references else None, problems=problems, what="predictions")
    if report.ok:
        report = _validate_folder(fmt, staging, references, images_dir, staging)
    elif references is not None:
        _note_official_count(fmt, references, report)
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


def prediction_labels(fmt: SubmissionFormat, path: Path, image, reference: Path | None) -> tuple[Any, str]:
    """(label array, "") for a decoded prediction that fits ``fmt`` (3D, whole numbers in its label space, on
    ``reference``'s grid), else (None, what is wrong)."""
    return _prediction_problem(fmt, path, image, reference)


def write_file(fmt: SubmissionFormat, labels: np.ndarray, prediction, target: Path) -> None:
    """Write one file of ``fmt`` (label map or 4D stack) from ``labels`` on ``prediction``'s grid, atomically."""
    _write(fmt, fmt.to_submission(labels), prediction, target)
