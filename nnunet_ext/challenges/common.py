"""The conversion engine shared by the KiTS21, AMOS22 and SegRap2023 converters.

A challenge module only *describes* its release: which case folders/files form which case, which
channel is which, which labels exist (a :class:`ConversionPlan`). This module does the work the
three have in common, once:

- streaming: one case at a time (a worker reads the headers and the label of one case, then copies
  or links its files), so memory does not grow with the dataset;
- geometry checks: every channel and the label must agree in size, spacing, origin and direction
  with the same tolerance nnU-Net's ``--verify_dataset_integrity`` applies, so a case we accept is
  accepted there too. A case that does not is reported and skipped, never resampled;
- label checks: a label file with values outside the dataset's labels is reported and skipped;
- resume: a case whose outputs already exist and verify (copy: same byte size as the source and a
  readable header with the source's geometry; link: a symlink to the source) is skipped. Every file
  is written under a temporary name in its target folder and renamed into place, so an interrupted
  run leaves either a complete file or a temporary one that the next run removes;
- parallelism: ``num_processes`` worker processes, results reported as they finish;
- the source is only ever read: outputs are new files (copies) or symlinks to it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from nnunet_ext.errors import UserFacingError

FILE_ENDING = ".nii.gz"
#: Key in dataset.json (and the marker file) identifying a dataset written by ``nnunet-ext convert``.
METADATA_KEY = "nnunet_ext_challenge"
#: Written when a conversion starts, so a re-run recognises its own half-finished folder.
MARKER_NAME = ".nnunet_ext_convert.json"
_TEMP_TAG = ".partial-"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")

COPY, LINK = "copy", "link"
CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"


# --------------------------------------------------------------------------------------
# What a challenge module hands to the engine
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSource:
    """One case of a release: its channel files in channel order and its label file (None: unlabelled).

    ``split`` is "Tr" (imagesTr/labelsTr) or "Ts" (imagesTs, and labelsTs when there is a label).
    """

    case_id: str
    images: tuple[str, ...]
    label: str | None = None
    split: str = "Tr"


@dataclass
class ConversionPlan:
    """Everything needed to convert one release into one nnU-Net raw dataset.

    ``dataset_json`` is complete except ``numTraining``, which is counted after the run.
    ``problems`` are cases found broken while listing the release (a missing file, say): they are
    reported as failed cases without being attempted. ``identity`` (challenge and options) decides
    whether an existing dataset folder is the same conversion.
    """

    challenge: str
    identity: dict[str, Any]
    dataset_json: dict[str, Any]
    allowed_labels: frozenset[int]
    cases: list[CaseSource]
    problems: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    status: str  # CONVERTED, SKIPPED or FAILED
    detail: str = ""


@dataclass
class ConversionSummary:
    dataset_folder: Path
    results: list[CaseResult]
    num_training: int

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == FAILED]

    def format(self) -> str:
        lines = [f"Summary: {len(self.results)} cases: {self.count(CONVERTED)} converted, "
                 f"{self.count(SKIPPED)} skipped (already complete, verified), {self.count(FAILED)} failed"]
        lines += [f"  failed {r.case_id}: {r.detail}" for r in self.failed]
        lines.append(f"Dataset: {self.dataset_folder} (numTraining {self.num_training})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Header of an image file: read without loading voxels (SimpleITK ReadImageInformation)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_type: str
    components: int

    def mismatch(self, other: "Geometry", dims: int | None = None) -> str:
        """Empty if ``other`` has the same grid (first ``dims`` axes), else what differs.

        np.allclose with its default tolerances is what nnU-Net's dataset integrity check uses.
        """
        d = dims or len(self.size)
        if self.size[:d] != other.size[:d]:
            return f"size {other.size[:d]} != {self.size[:d]}"
        for name in ("spacing", "origin"):
            mine, theirs = getattr(self, name)[:d], getattr(other, name)[:d]
            if not np.allclose(mine, theirs):
                return f"{name} {_fmt(theirs)} != {_fmt(mine)}"
        if not np.allclose(_direction_block(self.direction, d), _direction_block(other.direction, d)):
            return f"direction {_fmt(other.direction)} != {_fmt(self.direction)}"
        return ""


def _direction_block(direction: Sequence[float], d: int) -> np.ndarray:
    n = int(round(len(direction) ** 0.5))
    return np.asarray(direction, dtype=float).reshape(n, n)[:d, :d]


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Header of ``path``; raises RuntimeError (SimpleITK's) if the file cannot be read."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return Geometry(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                    tuple(reader.GetDirection()), sitk.GetPixelIDValueAsString(reader.GetPixelID()),
                    reader.GetNumberOfComponents())


def check_case_geometry(images: Sequence[str], label: str | None) -> str:
    """Empty if all channels and the label share one 3D grid, else a message naming the file."""
    reference = read_geometry(images[0])
    if len(reference.size) != 3 or reference.components != 1:
        return f"{Path(images[0]).name}: expected a 3D single-component image, got size {reference.size} " \
               f"with {reference.components} components"
    for other in list(images[1:]) + ([label] if label else []):
        problem = reference.mismatch(read_geometry(other))
        if problem:
            return f"geometry of {Path(other).name} differs from {Path(images[0]).name}: {problem}"
    return ""


def unexpected_label_values(label: str, allowed: frozenset[int]) -> str:
    """Empty if the label file holds whole numbers from ``allowed`` only, else what it holds."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(label))  # keep a reference: the view below does not own its memory
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            return f"{Path(label).name}: label values are not whole numbers (dtype {array.dtype})"
    values = {int(v) for v in np.unique(array)}
    extra = sorted(values - allowed)
    if extra:
        return f"{Path(label).name}: unexpected label values {extra}; allowed {sorted(allowed)}"
    return ""


# --------------------------------------------------------------------------------------
# Per-case work (runs in worker processes)
# --------------------------------------------------------------------------------------


def case_outputs(case: CaseSource, folder: Path) -> list[tuple[str, Path]]:
    """(source file, nnU-Net target path) pairs of one case, channels first, label last."""
    pairs = [(src, folder / f"images{case.split}" / f"{case.case_id}_{c:04d}{FILE_ENDING}")
             for c, src in enumerate(case.images)]
    if case.label:
        pairs.append((case.label, folder / f"labels{case.split}" / f"{case.case_id}{FILE_ENDING}"))
    return pairs


def output_is_complete(source: str, target: Path, mode: str) -> bool:
    """Whether ``target`` is a finished output of ``source`` (the resume check)."""
    if mode == LINK:
        return target.is_symlink() and os.readlink(target) == os.path.abspath(source)
    if target.is_symlink() or not target.is_file():
        return False
    if target.stat().st_size != os.stat(source).st_size:
        return False  # truncated or foreign
    try:
        return not read_geometry(source).mismatch(read_geometry(target))
    except RuntimeError:
        return False


def _place(source: str, target: Path, mode: str) -> None:
    """Copy or symlink ``source`` to ``target`` through a temporary name and an atomic rename."""
    temporary = target.with_name(f".{target.name}{_TEMP_TAG}{uuid.uuid4().hex[:8]}")
    try:
        if mode == LINK:
            os.symlink(os.path.abspath(source), temporary)
        else:
            shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    finally:
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()


def convert_case(case: CaseSource, folder: Path, mode: str, allowed_labels: frozenset[int]) -> CaseResult:
    """Convert one case; never raises (a failure is a result, so one bad case cannot stop the run)."""
    pairs = case_outputs(case, folder)
    try:
        if all(output_is_complete(src, dst, mode) for src, dst in pairs):
            return CaseResult(case.case_id, SKIPPED, "verified")
        problem = check_case_geometry(case.images, case.label)
        if not problem and case.label:
            problem = unexpected_label_values(case.label, allowed_labels)
        if problem:
            _remove_outputs(pairs)
            return CaseResult(case.case_id, FAILED, problem)
        for src, dst in pairs:
            if not output_is_complete(src, dst, mode):
                _place(src, dst, mode)
        return CaseResult(case.case_id, CONVERTED, f"{len(pairs)} files, {case.split}")
    except (OSError, RuntimeError) as error:  # unreadable file, full disk, ...
        return CaseResult(case.case_id, FAILED, f"{type(error).__name__}: {str(error).strip().splitlines()[0]}")


def _remove_outputs(pairs: Iterable[tuple[str, Path]]) -> None:
    """Remove this case's earlier outputs from *our* dataset folder, so a now-failing case is not half in it."""
    for _, target in pairs:
        if target.is_symlink() or target.exists():
            target.unlink()


def _convert_star(arguments: tuple) -> CaseResult:
    return convert_case(*arguments)


# --------------------------------------------------------------------------------------
# The dataset folder
# --------------------------------------------------------------------------------------


def validate_dataset_id_and_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise UserFacingError(f"dataset id {dataset_id} must be in 1..999 (nnU-Net uses three digits).")
    if not _NAME_PATTERN.match(name):
        raise UserFacingError(f"dataset name {name!r} may use only letters, digits, '_' and '-', e.g. KiTS21.")
    return f"Dataset{dataset_id:03d}_{name}"


def _stored_identity(folder: Path) -> dict | None:
    for path in (folder / "dataset.json", folder / MARKER_NAME):
        try:
            return json.loads(path.read_text())[METADATA_KEY]["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def prepare_dataset_folder(raw_root: Path, dataset_id: int, name: str, plan: ConversionPlan) -> Path:
    """The dataset folder, created or recognised as this same conversion; refuses anything else."""
    folder_name = validate_dataset_id_and_name(dataset_id, name)
    folder = raw_root / folder_name
    if raw_root.is_dir():
        others = sorted(p.name for p in raw_root.iterdir()
                        if p.name.startswith(f"Dataset{dataset_id:03d}_") and p.name != folder_name)
        if others:
            raise UserFacingError(
                f"dataset id {dataset_id} is already used by {raw_root / others[0]}; nnU-Net could not tell "
                f"{folder_name} from it. Choose another id with -d, or rename/remove that folder yourself.")
    if folder.exists() and any(folder.iterdir()):
        stored = _stored_identity(folder)
        if stored != plan.identity:
            what = "a different conversion " + json.dumps(stored) if stored else "data not written by nnunet-ext convert"
            raise UserFacingError(
                f"{folder} already holds {what}; it was left untouched. This run is {json.dumps(plan.identity)}. "
                f"Choose another id with -d (or --name), or remove the folder yourself.")
    for sub in {f"images{c.split}" for c in plan.cases} | {f"labels{c.split}" for c in plan.cases if c.label} \
            | {"imagesTr", "labelsTr"}:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for stale in (folder / sub).glob(f".*{_TEMP_TAG}*"):  # our own temporaries from an interrupted run
            stale.unlink()
    _write_json_atomically(folder / MARKER_NAME, {METADATA_KEY: _metadata(plan)})
    return folder


def _metadata(plan: ConversionPlan) -> dict[str, Any]:
    return {"identity": plan.identity, "source": plan.source, "converter": "nnunet-ext convert"}


def _write_json_atomically(path: Path, content: dict) -> None:
    temporary = path.with_name(f".{path.name}{_TEMP_TAG}{uuid.uuid4().hex[:8]}")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)


def _count_training_cases(folder: Path) -> int:
    """numTraining must equal the labelled training cases on disk, or nnU-Net's integrity check fails."""
    return sum(1 for p in (folder / "labelsTr").iterdir()
               if p.name.endswith(FILE_ENDING) and not p.name.startswith("."))


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _results(plan: ConversionPlan, folder: Path, mode: str, num_processes: int) -> Iterator[CaseResult]:
    for case_id, problem in plan.problems:
        yield CaseResult(case_id, FAILED, problem)
    jobs = [(case, folder, mode, plan.allowed_labels) for case in plan.cases]
    if num_processes <= 1 or len(jobs) <= 1:
        yield from map(_convert_star, jobs)
        return
    import multiprocessing

    with multiprocessing.Pool(min(num_processes, len(jobs))) as pool:
        yield from pool.imap_unordered(_convert_star, jobs, chunksize=1)


def run_conversion(plan: ConversionPlan, raw_root: str | os.PathLike, dataset_id: int, name: str,
                   num_processes: int = 1, mode: str = COPY,
                   log: Callable[[str], None] = print) -> ConversionSummary:
    """Convert (or complete, or verify) ``plan`` into ``raw_root/DatasetXXX_name``; one log line per case."""
    if mode not in (COPY, LINK):
        raise ValueError(f"mode must be {COPY!r} or {LINK!r}, got {mode!r}")
    if not plan.cases and not plan.problems:
        raise UserFacingError(f"no cases found in {plan.source}; nothing to convert.")
    folder = prepare_dataset_folder(Path(raw_root), dataset_id, name, plan)
    total = len(plan.cases) + len(plan.problems)
    log(f"Converting {total} {plan.challenge} cases into {folder} ({mode}, {num_processes} process(es))")
    results = []
    for index, result in enumerate(_results(plan, folder, mode, num_processes), start=1):
        results.append(result)
        log(f"[{index}/{total}] {result.case_id}: {result.status}" + (f" ({result.detail})" if result.detail else ""))
        if hasattr(sys.stdout, "flush"):
            sys.stdout.flush()
    results.sort(key=lambda r: r.case_id)
    num_training = _count_training_cases(folder)
    dataset_json = dict(plan.dataset_json, numTraining=num_training, file_ending=FILE_ENDING)
    dataset_json[METADATA_KEY] = _metadata(plan)
    _write_json_atomically(folder / "dataset.json", dataset_json)
    return ConversionSummary(folder, results, num_training)
