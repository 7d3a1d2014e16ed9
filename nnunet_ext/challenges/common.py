"""The conversion engine shared by the KiTS21, AMOS22 and SegRap2023 converters.

A challenge module only *describes* its release: which case folders/files form which case, which
channel is which, which labels exist (a :class:`ConversionPlan`). This module does the work the
three have in common, once:

- checks before anything of a case is written: every channel and the label are decoded in full with
  the reader nnU-Net uses for the dataset (:mod:`nnunet_ext.image_checks`; a truncated ``.nii.gz``,
  which ITK reads without complaint, is caught by its gzip stream), intensities must be finite, all
  files must share one 3D grid (size, spacing, origin, direction, with the tolerance of nnU-Net's
  ``--verify_dataset_integrity``), and the label must hold whole numbers among the dataset's labels.
  A case that fails is reported and left out (its earlier outputs removed), never resampled;
- streaming and parallelism: ``num_processes`` worker processes decode and check one case each
  (read-only), the main process writes each checked case as its result arrives, so memory does not
  grow with the dataset and an interrupt (Ctrl-C) stops workers that write nothing;
- one write path: every file goes through :mod:`nnunet_ext.atomic_io` (temporary name in the
  target folder, fsync, rename); the dataset folder is created through a staging folder, so it is
  absent or carries its marker. A case interrupted while being written is removed again, so no case
  is left half in the dataset; temporaries of killed runs are removed at the next start;
- resume: a case whose outputs already exist and verify (copy: byte-identical to the source and a
  complete gzip stream; link: a symlink to the source, whose gzip stream is complete) is skipped;
  anything else is written again;
- one run per dataset: a lock on the dataset folder (:func:`atomic_io.exclusive`) makes a second
  convert into it wait, then refuse;
- the source is only ever read: outputs are new files (copies) or symlinks to it, and an nnUNet_raw
  inside the release is refused.
"""
from __future__ import annotations

import contextlib
import filecmp
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Sequence

import numpy as np

from nnunet_ext import atomic_io, raw_dataset
from nnunet_ext.image_io import ImageHeader
from nnunet_ext.errors import UserFacingError

FILE_ENDING = ".nii.gz"
#: Key in dataset.json (and the marker file) identifying a dataset written by ``nnunet-ext convert``.
METADATA_KEY = "nnunet_ext_challenge"
#: Written when a conversion starts, so a re-run recognises its own half-finished folder.
MARKER_NAME = ".nnunet_ext_convert.json"
#: Temporary names of earlier versions of this module (``.<name>.partial-<hex>``), removed at start.
_LEGACY_TEMP_TAG = ".partial-"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
#: How long a second convert into the same dataset waits for the first before it is refused.
LOCK_TIMEOUT_SECONDS = 60.0

COPY, LINK = "copy", "link"
CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"
_READY = "ready"  # checked by a worker, to be written by the main process


# --------------------------------------------------------------------------------------
# What a challenge module hands to the engine
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSource:
    """One case of a release: its channel files in channel order and its label file (None: unlabelled).

    ``split`` is "Tr" (imagesTr/labelsTr), "Va" (imagesVa, and labelsVa when there is a label: validation
    cases, kept apart from the test cases) or "Ts" (imagesTs, and labelsTs when there is a label).
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
    written: bool = True  # False: every case failed and no dataset folder existed, so none was created

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == FAILED]

    def format(self) -> str:
        lines = [f"Summary: {len(self.results)} cases: {self.count(CONVERTED)} converted, "
                 f"{self.count(SKIPPED)} skipped (already complete, verified), {self.count(FAILED)} failed"]
        lines += [f"  failed {r.case_id}: {r.detail}" for r in self.failed]
        if self.written:
            lines.append(f"Dataset: {self.dataset_folder} (numTraining {self.num_training})")
        else:
            lines.append(f"Dataset: nothing written; every case failed, so {self.dataset_folder} was not created")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Geometry and content checks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry(ImageHeader):
    """Header of an image file (:class:`nnunet_ext.image_io.ImageHeader`, read without loading voxels)
    that can say how another file's grid differs from it."""

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
    """Header of ``path``, voxels not decoded (:func:`nnunet_ext.image_io.read_header`: the releases' files are
    SimpleITK formats); raises RuntimeError (SimpleITK's) if the file cannot be read."""
    from dataclasses import asdict

    from nnunet_ext.image_io import read_header

    return Geometry(**asdict(read_header(path)))


def check_case_geometry(images: Sequence[str], label: str | None) -> str:
    """Empty if all channels and the label share one 3D grid, else a message naming the file."""
    reference = read_geometry(images[0])
    if len(reference.size) != 3 or reference.components != 1:
        return f"{Path(images[0]).name}: expected a 3D single-component image, got size {reference.size} " \
               f"with {reference.components} components. Convert it to one 3D image or leave the case out"
    for other in list(images[1:]) + ([label] if label else []):
        problem = reference.mismatch(read_geometry(other))
        if problem:
            return f"geometry of {Path(other).name} differs from {Path(images[0]).name}: {problem}. Resample it " \
                   f"onto {Path(images[0]).name}'s grid (nearest neighbour for a label) or leave the case out; " \
                   f"nothing is resampled here"
    return ""


def unexpected_label_values(label: str, allowed: frozenset[int], array: np.ndarray | None = None) -> str:
    """Empty if the label file holds whole numbers from ``allowed`` only, else what it holds.

    ``array``: the label's voxels when already decoded (otherwise the file is read).
    """
    if array is None:
        from nnunet_ext import image_io

        array = image_io.read_images([label], image_io.reader_writer(None, label))[0]
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
            return f"{Path(label).name}: label values are not whole numbers ({read_geometry(label).pixel_type})"
    values = {int(v) for v in np.unique(array)}
    extra = sorted(values - allowed)
    if extra:
        return f"{Path(label).name}: unexpected label values {extra}; allowed {sorted(allowed)}"
    return ""


def check_case_content(case: CaseSource, reader, allowed_labels: frozenset[int]) -> str:
    """Empty if every file of ``case`` decodes in full and passes the checks, else what is wrong and the fix.

    ``reader``: nnU-Net's reader/writer for the dataset (:func:`nnunet_ext.image_checks.reader_for`).
    Raises :class:`UserFacingError` (naming the file) for a file that cannot be decoded or holds NaN/Inf.
    """
    from nnunet_ext import image_checks

    for path in case.images:
        data, info = image_checks.read_image(path, reader)
        image_checks.check_intensities(data, info)  # also NaN/Inf stored in float NIfTI files
        del data
    labels = None
    if case.label:
        labels, _ = image_checks.read_image(case.label, reader, what="label")
        image_checks.check_stored_values(case.label, "label values")
    problem = check_case_geometry(case.images, case.label)
    if problem:
        return problem
    if case.label:
        problem = unexpected_label_values(case.label, allowed_labels, labels)
        if problem:
            return f"{problem}. Fix the segmentation ({case.label}) or leave the case out."
    return ""


# --------------------------------------------------------------------------------------
# Per-case work: checks in worker processes (read-only), writes in the main process
# --------------------------------------------------------------------------------------


def case_outputs(case: CaseSource, folder: Path) -> list[tuple[str, Path]]:
    """(source file, nnU-Net target path) pairs of one case, channels first, label last."""
    pairs = [(src, raw_dataset.image_file(folder, case.case_id, c, FILE_ENDING, case.split))
             for c, src in enumerate(case.images)]
    if case.label:
        pairs.append((case.label, raw_dataset.label_file(folder, case.case_id, FILE_ENDING, case.split)))
    return pairs


def _complete_stream(path: str | os.PathLike) -> bool:
    from nnunet_ext.image_checks import verify_gzip_stream

    return not str(path).endswith(".gz") or verify_gzip_stream(Path(path)) is None


def output_is_complete(source: str, target: Path, mode: str) -> bool:
    """Whether ``target`` is a finished output of ``source`` (the resume check).

    copy: a regular file byte-identical to the source, with a complete gzip stream; link: a symlink to
    the source, whose gzip stream is complete. A truncated or foreign file is therefore redone.
    """
    try:
        if mode == LINK:
            return target.is_symlink() and os.readlink(target) == os.path.abspath(source) and _complete_stream(source)
        if target.is_symlink() or not target.is_file():
            return False
        if target.stat().st_size != os.stat(source).st_size:
            return False  # truncated or foreign
        return filecmp.cmp(source, target, shallow=False) and _complete_stream(target)
    except OSError:
        return False


def _place(source: str, target: Path, mode: str) -> None:
    """Copy or symlink ``source`` to ``target`` through the atomic write path."""
    raw_dataset.place_file(source, target, raw_dataset.SYMLINK if mode == LINK else raw_dataset.COPY)


def examine_case(case: CaseSource, folder: Path, mode: str, allowed_labels: frozenset[int],
                 reader) -> tuple[CaseSource, CaseResult]:
    """Verify a case's existing outputs or check its source files; reads only, never raises.

    The result is SKIPPED (outputs complete), FAILED (the detail says why and what to do) or ready to
    be written by :func:`write_case`.
    """
    try:
        if all(output_is_complete(src, dst, mode) for src, dst in case_outputs(case, folder)):
            return case, CaseResult(case.case_id, SKIPPED, "verified")
        problem = check_case_content(case, reader, allowed_labels)
    except UserFacingError as error:
        problem = str(error)
    except Exception as error:  # a file vanished or changed between the checks, a reader's own error, ...
        problem = f"could not check it ({type(error).__name__}: {_last_line(error)}); check its files"
    return case, CaseResult(case.case_id, FAILED if problem else _READY, problem)


def _last_line(error: Exception) -> str:
    """The informative line of an error (SimpleITK's first lines are a source location)."""
    from nnunet_ext.image_checks import reader_complaint

    return reader_complaint(error)


def write_case(case: CaseSource, folder: Path, mode: str) -> CaseResult:
    """Write every output of a checked case. Interrupted or failing, the case's outputs are removed again
    (KeyboardInterrupt is re-raised), so no case is left half in the dataset."""
    pairs = case_outputs(case, folder)
    try:
        for src, dst in pairs:
            _place(src, dst, mode)
    except OSError as error:  # full disk, permissions: this case is left out, the summary says why
        _remove_outputs(pairs)
        return CaseResult(case.case_id, FAILED, f"could not write {error.filename or folder}: "
                                                f"{error.strerror or error}. Free space or fix the permissions and "
                                                f"run again.")
    except BaseException:
        _remove_outputs(pairs)
        raise
    return CaseResult(case.case_id, CONVERTED, f"{len(pairs)} files, {case.split}")


def _remove_outputs(pairs: Iterable[tuple[str, Path]]) -> None:
    """Remove this case's outputs from *our* dataset folder, so a failing case is not half in it."""
    for _, target in pairs:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


def _examine_star(arguments: tuple) -> tuple[CaseSource, CaseResult]:
    return examine_case(*arguments)


def _ignore_interrupts() -> None:
    """Pool initializer: Ctrl-C reaches the main process, which stops the read-only workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------------------
# The dataset folder
# --------------------------------------------------------------------------------------


def validate_dataset_id_and_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise UserFacingError(f"dataset id {dataset_id} must be in 1..999 (nnU-Net uses three digits).")
    if not _NAME_PATTERN.fullmatch(name):
        raise UserFacingError(f"dataset name {name!r} may use only letters, digits, '_' and '-', e.g. KiTS21.")
    return f"Dataset{dataset_id:03d}_{name}"


def _stored_identity(folder: Path) -> dict | None:
    for path in (folder / "dataset.json", folder / MARKER_NAME):
        try:
            return json.loads(path.read_text())[METADATA_KEY]["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _refuse_output_inside_source(raw_root: Path, source: str) -> None:
    if not source:
        return
    src, raw = Path(source).resolve(), raw_root.resolve()
    if raw == src or src in raw.parents or raw in src.parents:
        raise UserFacingError(
            f"nnUNet_raw ({raw_root}) and the release SRC ({source}) overlap; the release is only read and the "
            f"dataset must be written outside it. Set nnUNet_raw to a folder outside the release.")


def check_dataset_folder(raw_root: Path, dataset_id: int, folder: Path, plan: ConversionPlan) -> None:
    """Refuse (writing nothing) a dataset id used by another folder or a folder holding something else."""
    if raw_root.exists() and not raw_root.is_dir():
        raise UserFacingError(f"nnUNet_raw {raw_root} is not a folder. Point nnUNet_raw at a folder.")
    if raw_root.is_dir():
        others = sorted(p.name for p in raw_root.iterdir()
                        if p.name.startswith(f"Dataset{dataset_id:03d}_") and p.name != folder.name)
        if others:
            raise UserFacingError(
                f"dataset id {dataset_id} is already used by {raw_root / others[0]}; nnU-Net could not tell "
                f"{folder.name} from it. Choose another id with -d, or rename/remove that folder yourself.")
    if (folder.is_symlink() and not folder.exists()) or (folder.exists() and not folder.is_dir()):
        raise UserFacingError(f"{folder} exists and is not a folder (or is a broken link); it was left untouched. "
                              f"Choose another id with -d (or --name), or remove it yourself.")
    if folder.exists() and any(folder.iterdir()):
        stored = _stored_identity(folder)
        if stored != plan.identity:
            what = ("a different conversion " + json.dumps(stored) if stored
                    else "data not written by nnunet-ext convert")
            raise UserFacingError(
                f"{folder} already holds {what}; it was left untouched. This run is {json.dumps(plan.identity)}. "
                f"Choose another id with -d (or --name), or remove the folder yourself.")


def _subfolders(plan: ConversionPlan) -> set[str]:
    return {f"images{c.split}" for c in plan.cases} | {f"labels{c.split}" for c in plan.cases if c.label} \
        | {"imagesTr", "labelsTr"}


def prepare_dataset_folder(folder: Path, plan: ConversionPlan) -> None:
    """Create the dataset folder (staged: it appears with its subfolders and marker) or tidy an existing one.

    Tidying removes temporaries of killed runs (ours, and the ``.partial-`` names of earlier versions).
    """
    if not folder.exists():
        with raw_dataset.new_dataset_folder(folder, sorted(_subfolders(plan))) as staging:
            atomic_io.write_json(staging / MARKER_NAME, {METADATA_KEY: _metadata(plan)})
        return
    for sub in _subfolders(plan):
        (folder / sub).mkdir(exist_ok=True)
    for directory in [folder, *(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())]:
        atomic_io.remove_stale_temporaries(directory)
        for stale in directory.glob(f".*{_LEGACY_TEMP_TAG}*"):
            with contextlib.suppress(OSError):
                stale.unlink()
    atomic_io.write_json(folder / MARKER_NAME, {METADATA_KEY: _metadata(plan)})


def _metadata(plan: ConversionPlan) -> dict[str, Any]:
    return {"identity": plan.identity, "source": plan.source, "converter": "nnunet-ext convert"}


def _count_training_cases(folder: Path) -> int:
    """numTraining must equal the labelled training cases on disk, or nnU-Net's integrity check fails."""
    return raw_dataset.count_training_cases(folder, FILE_ENDING)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _examined(plan: ConversionPlan, folder: Path, mode: str, num_processes: int,
              reader) -> Generator[tuple[CaseSource | None, CaseResult], None, None]:
    for case_id, problem in plan.problems:
        yield None, CaseResult(case_id, FAILED, problem)
    jobs = [(case, folder, mode, plan.allowed_labels, reader) for case in plan.cases]
    if num_processes <= 1 or len(jobs) <= 1:
        yield from map(_examine_star, jobs)
        return
    import multiprocessing

    with multiprocessing.Pool(min(num_processes, len(jobs)), initializer=_ignore_interrupts) as pool:
        yield from pool.imap_unordered(_examine_star, jobs, chunksize=1)


class _Output:
    """The dataset folder as the main process writes it: created at the first case that needs it."""

    def __init__(self, folder: Path, plan: ConversionPlan, mode: str):
        self.folder, self.plan, self.mode = folder, plan, mode
        self.ready = folder.exists()
        if self.ready:
            prepare_dataset_folder(folder, plan)

    def apply(self, case: CaseSource | None, result: CaseResult) -> CaseResult:
        if result.status == _READY:
            if not self.ready:
                prepare_dataset_folder(self.folder, self.plan)
                self.ready = True
            assert case is not None  # a case that was listed, not a listing problem, is ready
            return write_case(case, self.folder, self.mode)
        if result.status == FAILED and case is not None and self.ready:
            _remove_outputs(case_outputs(case, self.folder))
        return result


def run_conversion(plan: ConversionPlan, raw_root: str | os.PathLike, dataset_id: int, name: str,
                   num_processes: int = 1, mode: str = COPY,
                   log: Callable[[str], None] = print) -> ConversionSummary:
    """Convert (or complete, or verify) ``plan`` into ``raw_root/DatasetXXX_name``; one log line per case."""
    from nnunet_ext.image_checks import reader_for

    if mode not in (COPY, LINK):
        raise ValueError(f"mode must be {COPY!r} or {LINK!r}, got {mode!r}")
    if not plan.cases and not plan.problems:
        raise UserFacingError(f"no cases found in {plan.source}; nothing to convert.")
    raw_root = Path(raw_root)
    folder = raw_root / validate_dataset_id_and_name(dataset_id, name)
    _refuse_output_inside_source(raw_root, plan.source)
    reader = reader_for(dict(plan.dataset_json, file_ending=FILE_ENDING), f"case{FILE_ENDING}")
    check_dataset_folder(raw_root, dataset_id, folder, plan)  # before the lock: a refusal leaves no lock file
    with atomic_io.exclusive(folder, "nnunet-ext convert", timeout=LOCK_TIMEOUT_SECONDS):
        check_dataset_folder(raw_root, dataset_id, folder, plan)  # again: another run may have finished meanwhile
        atomic_io.remove_stale_temporaries(raw_root)  # a staged dataset folder of a killed run
        output = _Output(folder, plan, mode)
        results = _convert_all(plan, output, num_processes, reader, log)
        if not output.ready:
            return ConversionSummary(folder, results, 0, written=False)
        num_training = _count_training_cases(folder)
        dataset_json = dict(plan.dataset_json, numTraining=num_training, file_ending=FILE_ENDING)
        dataset_json[METADATA_KEY] = _metadata(plan)
        raw_dataset.write_dataset_json(folder, dataset_json)
    return ConversionSummary(folder, results, num_training)


def _convert_all(plan: ConversionPlan, output: _Output, num_processes: int, reader,
                 log: Callable[[str], None]) -> list[CaseResult]:
    total = len(plan.cases) + len(plan.problems)
    log(f"Converting {total} {plan.challenge} cases into {output.folder} ({output.mode}, {num_processes} process(es))")
    results: list[CaseResult] = []
    try:
        # closing: an interrupt stops the worker pool at once, not when the generator is collected
        with contextlib.closing(_examined(plan, output.folder, output.mode, num_processes, reader)) as examined:
            for index, (case, result) in enumerate(examined, start=1):
                result = output.apply(case, result)
                results.append(result)
                log(f"[{index}/{total}] {result.case_id}: {result.status}"
                    + (f" ({result.detail})" if result.detail else ""))
                if hasattr(sys.stdout, "flush"):
                    sys.stdout.flush()
    except KeyboardInterrupt:
        done = sum(r.status in (CONVERTED, SKIPPED) for r in results)
        log(f"Interrupted after {len(results)} of {total} cases: the {done} written or verified are complete, a "
            f"case interrupted while being written was removed again, dataset.json is not updated. Run the same "
            f"command again to finish.")
        raise
    return sorted(results, key=lambda r: r.case_id)
