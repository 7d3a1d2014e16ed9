"""Merge several nnU-Net v2 raw datasets into one multi-task ("universal") raw dataset.

Why: UniSeg, DoDNet and other universal models train one network on many partially labelled
datasets. nnU-Net plans, preprocesses and trains one dataset at a time, so the sources are
merged into a new raw dataset that the stock ``nnUNetv2_plan_and_preprocess`` accepts, plus a
``tasks`` section in its dataset.json (format: :mod:`nnunet_ext.tasks.task_map`) that says
which case comes from which source, which merged labels it annotates and how many channels it
really has. The sources are only read, never modified.

What the merged dataset holds:

* Cases: ``<case_prefix><source case id>``, prefix ``T<task id><task name>_`` (e.g.
  ``T00Liver_liver_012``): unique and traceable to the source case. imagesTs cases are merged
  the same way (no labels).
* Images: hard links to the source files by default (no extra disk space; falls back to a copy
  where the filesystem refuses a link), copies with ``copy=True``. Nothing ever writes to a raw
  image, so linked files stay identical to the sources. Any format nnU-Net reads works (the
  sources' reader/writer, e.g. SimpleITKIO for .nii.gz/.nrrd/.mha, NibabelIO, NaturalImage2DIO for
  .png), except Tiff3DIO (its spacing files beside the images are not carried over).
* Channels: the merged channel count is the largest of the sources'. A case with fewer
  channels gets zero images for the missing ones (:func:`nnunet_ext.image_io.write_zero_channel`,
  the rule ``predict --task`` shares: channel 0's grid; for SimpleITK formats also its pixel
  type); the network is told the task's real count through ``num_channels``. Merged channel i
  keeps its name if every task has channel i with that same name, unless the name is CT and
  some task is padded there (nnU-Net's CT normalisation uses global intensity statistics that
  zero images would distort); otherwise it is named ``zscore`` (nnU-Net's per-image z-score,
  safe for any modality and for zero images). The tasks' own channel names are kept in the
  tasks section.
* Labels: always newly written, remapped voxel-wise into the merged label space
  (:mod:`nnunet_ext.tasks.label_space` has the policy: shared names, ``--no-share-labels``,
  regions refused, ignore label kept). Labels of structures a source does not annotate are 0
  there; the task-aware loss must treat 0 as "background or not annotated" for that task. They are
  read and written with the sources' reader/writer (:mod:`nnunet_ext.image_io`), on the source
  label's grid.

Before anything is written, every image and label of every source is decoded in full with the
reader nnU-Net uses for that source and checked against its siblings (truncated or corrupt files,
NaN/Inf intensities, a case of another dimensionality, channels or labels off the case's grid,
label values that are not whole numbers or not in the source's dataset.json); each refusal names
the file, the problem and the fix.

Checks and writes run in ``num_processes`` worker processes (``-np``; the output is the same
file for file as with one), with a progress bar on a terminal. Writing goes through
:mod:`nnunet_ext.raw_dataset` and :mod:`nnunet_ext.atomic_io`: a fresh merge is built in a private staging
folder beside the output and moved into place at the end, so an interrupted merge (Ctrl-C, kill)
leaves no output (a killed run's staging folder is removed by the next merge). Concurrent merges
to one output take turns on a lock (``.DatasetNNN_NAME.lock`` in nnUNet_raw): the second waits,
saying so, and then finds the first's result. The merge's inputs (source dataset.json hashes, case
lists, options) are stored in dataset.json under ``nnunet_ext_merge``: re-running the same merge
verifies the output (every file present and intact) and writes only what is missing or broken,
each file atomically; an output that exists with other content is refused, untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nnunet_ext import atomic_io, image_io, raw_dataset
from nnunet_ext.image_checks import verify_gzip_stream
from nnunet_ext.parallel import Workers, progress
from nnunet_ext.tasks.label_space import LabelSpace, SourceLabels, build_label_space
from nnunet_ext.tasks.sources import (MergeError, SourceDataset, case_checks, check_case_files, dimensionality,
                                      find_dataset_folder, read_source)
from nnunet_ext.tasks.task_map import TASKS_KEY, TaskMap

METADATA_KEY = "nnunet_ext_merge"
MERGE_FORMAT_VERSION = 1
DEFAULT_NAME = "Merged"
PAD_CHANNEL_NAME = "zscore"  # nnU-Net maps it to per-image z-score normalisation
#: how long a second merge to the same output waits for the first before it is refused
LOCK_TIMEOUT_S = 1800.0
#: the zero-channel rule, shared with ``predict --task`` (re-exported here for its callers)
write_zero_channel = image_io.write_zero_channel

__all__ = ["MergeError", "MergeOptions", "MergePlan", "MergeResult", "check_sources", "merge_datasets",
           "merged_channel_names", "parse_rename_labels", "plan_merge", "write_zero_channel"]


@dataclass(frozen=True)
class MergeOptions:
    """How to merge; everything here except ``copy`` decides the merged content."""

    task_names: tuple[str, ...] | None = None  # default: source names without DatasetXXX_
    share_labels: bool = True
    separate_labels: tuple[str, ...] = ()
    rename_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # task -> {old: new}
    copy: bool = False  # copy image files instead of hard-linking them

    def content_options(self) -> dict[str, Any]:
        return {"share_labels": self.share_labels, "separate_labels": sorted(self.separate_labels),
                "rename_labels": {t: dict(sorted(m.items())) for t, m in sorted(self.rename_labels.items())}}


@dataclass(frozen=True)
class _Job:
    """One file of the merged dataset: ``kind`` is image (link/copy), pad (zero channel) or label (remap)."""

    kind: str
    source: Path
    target: str  # relative to the merged folder
    task: str


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will write, computed before anything is written."""

    folder: Path
    dataset_json: dict[str, Any]
    jobs: tuple[_Job, ...]
    label_space: LabelSpace
    task_map: TaskMap
    sources: tuple[SourceDataset, ...] = ()
    reader_writer: Any = None  # the sources' image reader/writer (nnU-Net's, see image_io)


@dataclass
class MergeResult:
    """What happened: ``status`` is created, verified (complete already) or completed (files added)."""

    folder: Path
    task_map: TaskMap
    status: str
    linked: int = 0
    copied: int = 0
    padded: int = 0
    labels: int = 0


def parse_rename_labels(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["TASK:OLD=NEW", ...]`` (the CLI's --rename-label) -> {task: {old: new}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        match = re.match(r"^([^:]+):([^=]+)=(.+)$", item)
        if match is None:
            raise MergeError(f"--rename-label {item!r}: expected TASK:OLD=NEW, e.g. --rename-label Liver:Liver=liver.")
        task, old, new = match.groups()
        out.setdefault(task, {})[old] = new
    return out


def merged_channel_names(per_task: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """Channel names of the merged dataset (policy in the module docstring)."""
    count = max(len(names) for names in per_task)
    merged = {}
    for channel in range(count):
        present = [names[str(channel)] for names in per_task if str(channel) in names]
        padded = len(present) < len(per_task)
        same = len(set(present)) == 1
        merged[str(channel)] = present[0] if same and not (padded and present[0].casefold() == "ct") \
            else PAD_CHANNEL_NAME
    return merged


def _task_names(sources: Sequence[SourceDataset], given: Sequence[str] | None) -> list[str]:
    if given is not None and len(given) != len(sources):
        raise MergeError(f"--task-names gives {len(given)} name(s) for {len(sources)} dataset(s); give one per -d.")
    names = list(given) if given is not None else [s.short_name for s in sources]
    for name, source in zip(names, sources):
        if not raw_dataset.is_valid_name(name):
            raise MergeError(f"task name {name!r} (of {source.name}) must use only letters, digits, '_' or '-'; "
                             f"choose names with --task-names.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MergeError(f"task name(s) {duplicates} would be used twice "
                         f"({[s.name for s, n in zip(sources, names) if n in duplicates]}); "
                         f"give unique names with --task-names.")
    return names


def _check_same(sources: Sequence[SourceDataset], key: str, what: str) -> Any:
    values = {s.name: s.dataset_json.get(key) for s in sources}
    if len(set(map(json.dumps, values.values()))) > 1:
        raise MergeError(f"the datasets have different {what}: {values}. nnU-Net needs one {what} per dataset; "
                         f"convert the sources to the same {what} before merging.")
    return next(iter(values.values()))


def _check_output(raw_root: Path, output_id: int, folder_name: str, source_ids: Sequence[int]) -> None:
    if output_id in source_ids:
        raise MergeError(f"output id {output_id} is one of the source ids {list(source_ids)}; choose a new id "
                         f"with -o (sources are never overwritten).")
    taken = raw_dataset.other_folders_with_id(raw_root, output_id, folder_name)
    if taken:
        raise MergeError(f"dataset id {output_id} is already taken by {taken} in {raw_root}; nnU-Net could not "
                         f"tell it apart from {folder_name}. Choose another id with -o.")


def plan_merge(raw_root: str | os.PathLike, source_ids: Sequence[int], output_id: int, name: str = DEFAULT_NAME,
               options: MergeOptions = MergeOptions()) -> MergePlan:
    """Read and check the sources and compute the merged dataset.json and file list (writes nothing)."""
    raw_root = Path(raw_root)
    source_ids = list(source_ids)
    if not source_ids:
        raise MergeError("give at least one source dataset id with -d.")
    if len(set(source_ids)) != len(source_ids):
        raise MergeError(f"dataset ids {source_ids} list a dataset twice; list each once.")
    if isinstance(output_id, bool) or not isinstance(output_id, int) or not 1 <= output_id <= 999:
        raise MergeError(f"output id {output_id!r} must be a whole number in 1..999.")
    if not raw_dataset.is_valid_name(name):
        raise MergeError(f"--name {name!r} must use only letters, digits, '_' or '-', e.g. Universal.")
    folder = raw_root / raw_dataset.folder_name(output_id, name)
    sources = [read_source(find_dataset_folder(raw_root, i)) for i in source_ids]
    _check_output(raw_root, output_id, folder.name, source_ids)
    ending = _check_same(sources, "file_ending", "file ending")
    reader = _check_same(sources, "overwrite_image_reader_writer", "image reader (overwrite_image_reader_writer)")
    tasks = _task_names(sources, options.task_names)
    space = build_label_space(
        [SourceLabels(t, s.name, s.dataset_json["labels"], s.dataset_json.get("regions_class_order") is not None)
         for t, s in zip(tasks, sources)],
        share=options.share_labels, separate=options.separate_labels, rename=options.rename_labels)

    width = max(2, len(str(len(sources) - 1)))
    channels = max(s.num_channels for s in sources)
    section: dict[str, Any] = {}
    jobs: list[_Job] = []
    for task_id, (task, source) in enumerate(zip(tasks, sources)):
        prefix = f"T{task_id:0{width}d}{task}_"
        task_labels = space.tasks[task]
        section[task] = {
            "task_id": task_id, "source": source.name, "case_prefix": prefix,
            "num_channels": source.num_channels, "channel_names": source.channel_names,
            "labels": task_labels.labels, "to_source": {str(k): v for k, v in task_labels.to_source.items()},
            "source_labels": source.dataset_json["labels"],
        }
        for split, cases in (("train", source.training), ("test", source.test)):
            short = "Tr" if split == "train" else "Ts"
            for case in cases:
                merged_case = prefix + case
                for c in range(channels):
                    target = raw_dataset.image_file("", merged_case, c, ending, short).as_posix()
                    if c < source.num_channels:
                        jobs.append(_Job("image", source.image(split, case, c), target, task))
                    else:
                        jobs.append(_Job("pad", source.image(split, case, 0), target, task))
                if split == "train":
                    jobs.append(_Job("label", source.label(case),
                                     raw_dataset.label_file("", merged_case, ending).as_posix(), task))

    dataset_json = raw_dataset.dataset_json(
        merged_channel_names([s.channel_names for s in sources]), space.labels,
        sum(len(s.training) for s in sources), ending, name=name,
        description=f"Merged by nnunet-ext from {', '.join(s.name for s in sources)}; see 'tasks'.",
        overwrite_image_reader_writer=reader, extra={TASKS_KEY: section, METADATA_KEY: {
            "tool": "nnunet_ext.tasks.merge", "format_version": MERGE_FORMAT_VERSION,
            "sources": [s.fingerprint() for s in sources], "options": options.content_options()}})
    dataset_json = json.loads(json.dumps(dataset_json))  # exactly what a re-read gives (str keys, lists)
    return MergePlan(folder, dataset_json, tuple(jobs), space, TaskMap.from_dataset_json(dataset_json),
                     tuple(sources), sources[0].reader_writer())


# --- checking the sources' files ------------------------------------------------------------------


def check_sources(plan: MergePlan, workers: Workers | None = None) -> None:
    """Decode every image and label of every source in full and check it against its siblings
    (:func:`nnunet_ext.tasks.sources.check_case_files`, in ``workers``' processes); the sources must share
    one dimensionality. The first bad case in source and case order is the one refused."""
    workers = workers or Workers(1)
    checks = [(source, check) for source in plan.sources for check in case_checks(source)]
    found: dict[str, list] = {source.name: [] for source in plan.sources}
    # closing: the generator ends at once on an error or Ctrl-C (the workers stop with their with block)
    with contextlib.closing(workers.imap(check_case_files, [check for _, check in checks])) as infos:
        for info, (source, _) in zip(progress(infos, total=len(checks), desc="checking sources"), checks):
            found[source.name].append(info)  # (infos first: the generator runs to its end, workers kept)
    dims = {source.name: dimensionality(source, found[source.name]) for source in plan.sources}
    if len(set(dims.values())) > 1:
        described = ", ".join(f"{name} is {d}D" for name, d in dims.items())
        raise MergeError(f"the datasets have different dimensionality ({described}); nnU-Net trains one "
                         f"dimensionality per dataset. Merge the 2D and the 3D datasets separately.")


# --- writing ------------------------------------------------------------------------------------


def _remap_label(source: Path, target: Path, lookup: Mapping[int, int], dataset: str, rw: Any = None) -> None:
    """Rewrite a label map with merged values, on its own grid, with the source's reader/writer (the checks
    have refused values the source's dataset.json lacks; the table check here only guards that invariant)."""
    table: np.ndarray = np.full(max(lookup) + 1, -1, dtype=np.int64)
    for source_value, merged_value in lookup.items():
        table[source_value] = merged_value
    try:
        image_io.relabel_segmentation(source, target, table, rw if rw is not None else
                                      image_io.reader_writer(None, source))
    except ValueError as error:
        raise MergeError(f"{error}; {dataset}/dataset.json declares the label values {sorted(lookup)}. Fix the "
                         f"label file or the dataset.json.") from None


def _write_file(job: tuple) -> str:
    """One zero channel ("pad") or remapped label ("label"): (kind, source, target, lookup, dataset, reader/writer).
    Runs in a worker process with -np (module-level, so picklable)."""
    kind, source, target, lookup, dataset, rw = job
    if kind == "pad":
        write_zero_channel(source, target, rw)
    else:
        _remap_label(source, target, lookup, dataset, rw)
    return kind


def _run_jobs(plan: MergePlan, folder: Path, jobs: Sequence[_Job], copy: bool, result: MergeResult,
              workers: Workers | None = None) -> None:
    """Images are linked (or copied) here; zero channels and labels are written in ``workers``' processes.
    Each file is complete or absent; which process wrote it does not change its bytes."""
    workers = workers or Workers(1)
    lookups = {task: plan.label_space.lookup_table(task) for task in plan.label_space.tasks}
    sources = {t.name: t.source for t in plan.task_map}
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for job in jobs:
        target = folder / job.target
        if target.exists() or target.is_symlink():
            target.unlink()  # a file that failed the intact check of a re-run: written again
    written = [(job.kind, job.source, folder / job.target, lookups[job.task], sources[job.task], plan.reader_writer)
               for job in jobs if job.kind != "image"]
    with progress(total=len(jobs), desc=f"merging into {plan.folder.name}") as bar:
        for job in jobs:
            if job.kind == "image":
                placed = raw_dataset.place_file(job.source, folder / job.target,
                                                raw_dataset.COPY if copy else raw_dataset.HARDLINK)
                result.linked += placed == "linked"
                result.copied += placed == "copied"
                bar.update()
        try:
            with contextlib.closing(workers.imap(_write_file, written, ordered=False)) as kinds:
                for kind in kinds:
                    result.padded += kind == "pad"
                    result.labels += kind == "label"
                    bar.update()
        except BaseException:  # Ctrl-C or an error: the workers are stopped; remove what they left half-written
            workers.close()
            for sub in ("imagesTr", "labelsTr", "imagesTs"):
                atomic_io.remove_stale_temporaries(folder / sub)
            raise


def _intact(job: _Job, target: Path) -> bool:
    """A cheap completeness check of one output file of an earlier run (every file we write appears
    complete or not at all; this catches files truncated by older versions or by hand)."""
    if not target.is_file():
        return False
    size = target.stat().st_size
    if job.kind == "image":
        return size == job.source.stat().st_size
    return size > 0 and (not target.name.endswith(".gz") or verify_gzip_stream(target) is None)


def _describe_difference(stored: Mapping[str, Any], planned: Mapping[str, Any]) -> str:
    old, new = stored.get(METADATA_KEY, {}), planned[METADATA_KEY]
    if old.get("options") != new["options"]:
        return f"other options (then: {old.get('options')}, now: {new['options']})"
    old_sources = {s.get("folder"): s for s in old.get("sources", [])}
    if list(old_sources) != [s["folder"] for s in new["sources"]]:
        return f"other sources (then: {list(old_sources)}, now: {[s['folder'] for s in new['sources']]})"
    changed = [s["folder"] for s in new["sources"] if old_sources.get(s["folder"]) != s]
    if changed:
        return f"sources changed since (dataset.json or case list of {changed})"
    keys = sorted(k for k in set(stored) | set(planned) if stored.get(k) != planned.get(k))
    return f"a different dataset.json (keys {keys})"


def _pending_jobs(plan: MergePlan) -> tuple[_Job, ...] | None:
    """None when the output is still to be created (absent, or an empty folder); else the jobs whose
    file is missing or not intact in the output of this same merge (empty: complete). Anything else
    at the output is refused."""
    folder = plan.folder
    if not folder.exists() and not folder.is_symlink():
        return None
    stored = None
    try:
        stored = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if isinstance(stored, dict) and METADATA_KEY in stored:
        if stored != plan.dataset_json:
            raise MergeError(
                f"{folder} already exists from a merge with {_describe_difference(stored, plan.dataset_json)}; "
                f"it was left untouched. Choose another id with -o, or delete {folder} and merge again.")
        return tuple(job for job in plan.jobs if not _intact(job, folder / job.target))
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        return None
    raise MergeError(f"{folder} already exists and was not written by 'nnunet-ext merge'; it was left "
                     f"untouched. Choose another id with -o or name with --name.")


def _create(plan: MergePlan, copy: bool, result: MergeResult, workers: Workers | None = None) -> None:
    """Build the whole merged dataset in a private staging folder and move it into place (an empty folder
    made beforehand is replaced)."""
    with raw_dataset.new_dataset_folder(plan.folder) as staging:
        _run_jobs(plan, staging, plan.jobs, copy, result, workers)
        raw_dataset.write_dataset_json(staging, plan.dataset_json)


def merge_datasets(raw_root: str | os.PathLike, source_ids: Sequence[int], output_id: int,
                   name: str = DEFAULT_NAME, options: MergeOptions = MergeOptions(),
                   num_processes: int = 1) -> MergeResult:
    """Merge the raw datasets ``source_ids`` of ``raw_root`` into ``Dataset<output_id>_<name>``.

    Every source file is decoded and checked before anything is written. Safe to repeat: the same
    merge again verifies and completes the output; anything else that exists there is refused and
    left untouched. Concurrent runs on one output take turns (lock). Sources are only read.
    ``num_processes`` worker processes check and write (the output does not depend on it).
    """
    plan = plan_merge(raw_root, source_ids, output_id, name, options)
    result = MergeResult(plan.folder, plan.task_map, "created")
    if _pending_jobs(plan) == ():
        result.status = "verified"  # complete already: nothing is read further or written
        return result
    with Workers(num_processes) as workers:  # one set of processes checks, then writes
        check_sources(plan, workers)
        with atomic_io.exclusive(plan.folder, "merge", timeout=LOCK_TIMEOUT_S):
            atomic_io.remove_stale_temporaries(plan.folder.parent)  # staging folders of killed merges
            pending = _pending_jobs(plan)  # again: another merge may have finished while we waited
            if pending is None:
                _create(plan, options.copy, result, workers)
            elif pending:
                result.status = "completed"
                for sub in ("imagesTr", "labelsTr", "imagesTs"):
                    atomic_io.remove_stale_temporaries(plan.folder / sub)
                _run_jobs(plan, plan.folder, pending, options.copy, result, workers)
            else:
                result.status = "verified"
    return result
