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
other file, same size/spacing/origin/direction as the image (the tolerance of nnU-Net's checks),
only the allowed values, uint8, and for SegRap2023 a fourth axis of the right length.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nnunet_ext.challenges import amos22, kits21, segrap2023
from nnunet_ext.challenges.common import FILE_ENDING, Geometry, read_geometry
from nnunet_ext.errors import UserFacingError

CHALLENGES = ("kits21", "amos22", "segrap2023")


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

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, problem: str) -> None:
        self.problems.append((where, problem))

    def format(self, title: str) -> str:
        against = f" against {self.expected} test images" if self.expected is not None else \
            " (no --images: case list and geometry not checked)"
        lines = [f"Checked {self.checked} {title} submission files in {self.folder}{against}."]
        lines += [f"  {where}: {problem}" for where, problem in sorted(self.problems)]
        if not self.ok:
            lines.append(f"INVALID: {len(self.problems)} problem(s). Fix them before uploading.")
        elif self.expected is None:
            lines.append(f"VALID as far as checked (naming, label values, dtype); add --images to check the case "
                         f"list and the grids too.")
        else:
            lines.append(f"VALID: case list, naming, grids, label values and dtype as {title} requires.")
        return "\n".join(lines)


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


def validate_submission(fmt: SubmissionFormat, folder: str | os.PathLike,
                        images_dir: str | os.PathLike | None = None) -> Report:
    """Check a submission folder; with ``images_dir``, also against the test-image list and their grids."""
    import SimpleITK as sitk

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
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            report.add(case, f"cannot read {path.name}: {str(error).strip().splitlines()[0]}")
            continue
        for problem in _file_problems(fmt, image, references.get(case) if references else None):
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
    values = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(image))}
    extra = sorted(values - fmt.submission_values)
    if extra:
        problems.append(f"unexpected label values {extra}; allowed {sorted(fmt.submission_values)}")
    if reference is not None:
        mismatch = read_geometry(reference).mismatch(_geometry_of(image), dims=3)
        if mismatch:
            problems.append(f"grid differs from the test image {reference.name}: {mismatch}")
    return problems


def _geometry_of(image) -> Geometry:
    import SimpleITK as sitk

    return Geometry(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                    tuple(image.GetDirection()), sitk.GetPixelIDValueAsString(image.GetPixelID()),
                    image.GetNumberOfComponentsPerPixel())


def export_submission(fmt: SubmissionFormat, predictions: str | os.PathLike, out: str | os.PathLike,
                      images_dir: str | os.PathLike | None = None,
                      log: Callable[[str], None] = print) -> Report:
    """Write the submission files for every prediction, then validate the folder (the returned report)."""
    import SimpleITK as sitk

    predictions, out = Path(predictions), Path(out)
    if not predictions.is_dir():
        raise UserFacingError(f"{predictions} is not a folder of nnU-Net predictions.")
    if out.resolve() == predictions.resolve():
        raise UserFacingError(f"OUT must be a new folder, not the prediction folder {predictions}.")
    files = sorted(p for p in predictions.iterdir() if p.name.endswith(FILE_ENDING))
    cases = {p: _case_of(p.name, FILE_ENDING, fmt.case_pattern) for p in files}
    if not any(cases.values()):
        raise UserFacingError(f"no {fmt.title} predictions in {predictions}: expected nnU-Net outputs named like "
                              f"{fmt.example().split('.')[0]}{FILE_ENDING}.")
    out.mkdir(parents=True, exist_ok=True)
    export_problems = []
    for index, (path, case) in enumerate(cases.items(), start=1):
        if case is None:
            export_problems.append((path.name, "not a case name of this challenge; not exported"))
            continue
        prediction = sitk.ReadImage(str(path))
        labels = sitk.GetArrayFromImage(prediction)
        extra = sorted({int(v) for v in np.unique(labels)} - fmt.prediction_values)
        if extra:
            export_problems.append((case, f"{path.name} holds label values {extra} outside the {fmt.title} "
                                          f"label space {sorted(fmt.prediction_values)}; not exported"))
            continue
        _write(fmt, fmt.to_submission(labels), prediction, out / f"{case}{fmt.extension}")
        log(f"[{index}/{len(cases)}] {case}{fmt.extension}")
    report = validate_submission(fmt, out, images_dir)
    report.problems = export_problems + report.problems
    return report


def _write(fmt: SubmissionFormat, array: np.ndarray, prediction, target: Path) -> None:
    """Write through a temporary name; 4D stacks are JoinSeries of 3D masks on the prediction's grid."""
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
    temporary = target.with_name(f".{target.stem}-{uuid.uuid4().hex[:8]}{fmt.extension}")
    try:
        sitk.WriteImage(image, str(temporary), True)
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
