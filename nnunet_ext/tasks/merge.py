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
  image, so linked files stay identical to the sources.
* Channels: the merged channel count is the largest of the sources'. A case with fewer
  channels gets zero images for the missing ones, with its first channel's geometry and pixel
  type; the network is told the task's real count through ``num_channels``. Merged channel i
  keeps its name if every task has channel i with that same name, unless the name is CT and
  some task is padded there (nnU-Net's CT normalisation uses global intensity statistics that
  zero images would distort); otherwise it is named ``zscore`` (nnU-Net's per-image z-score,
  safe for any modality and for zero images). The tasks' own channel names are kept in the
  tasks section.
* Labels: always newly written, remapped voxel-wise into the merged label space
  (:mod:`nnunet_ext.tasks.label_space` has the policy: shared names, ``--no-share-labels``,
  regions refused, ignore label kept). Labels of structures a source does not annotate are 0
  there; the task-aware loss must treat 0 as "background or not annotated" for that task.

Writing is atomic: a fresh merge is written into a hidden temporary sibling folder and renamed
into place. The merge's inputs (source dataset.json hashes, case lists, options) are stored in
dataset.json under ``nnunet_ext_merge``: re-running the same merge verifies the output and
completes missing files; an output that exists with other content is refused, untouched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nnunet_ext.tasks.label_space import LabelSpace, SourceLabels, build_label_space
from nnunet_ext.tasks.sources import MergeError, SourceDataset, find_dataset_folder, read_source
from nnunet_ext.tasks.task_map import TASKS_KEY, TaskMap

METADATA_KEY = "nnunet_ext_merge"
MERGE_FORMAT_VERSION = 1
DEFAULT_NAME = "Merged"
PAD_CHANNEL_NAME = "zscore"  # nnU-Net maps it to per-image z-score normalisation
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")

__all__ = ["MergeError", "MergeOptions", "MergePlan", "MergeResult", "merge_datasets", "merged_channel_names",
           "parse_rename_labels", "plan_merge"]


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
        if not _NAME.match(name):
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
    prefix = f"Dataset{output_id:03d}_"
    taken = sorted(p.name for p in raw_root.iterdir() if p.name.startswith(prefix) and p.name != folder_name)
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
    if not _NAME.match(name):
        raise MergeError(f"--name {name!r} must use only letters, digits, '_' or '-', e.g. Universal.")
    folder = raw_root / f"Dataset{output_id:03d}_{name}"
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
        for split, cases, images in (("train", source.training, "imagesTr"), ("test", source.test, "imagesTs")):
            for case in cases:
                merged_case = prefix + case
                for c in range(channels):
                    target = f"{images}/{merged_case}_{c:04d}{ending}"
                    if c < source.num_channels:
                        jobs.append(_Job("image", source.image(split, case, c), target, task))
                    else:
                        jobs.append(_Job("pad", source.image(split, case, 0), target, task))
                if split == "train":
                    jobs.append(_Job("label", source.label(case), f"labelsTr/{merged_case}{ending}", task))

    dataset_json: dict[str, Any] = {
        "name": name,
        "description": f"Merged by nnunet-ext from {', '.join(s.name for s in sources)}; see 'tasks'.",
        "channel_names": merged_channel_names([s.channel_names for s in sources]),
        "labels": space.labels,
        "numTraining": sum(len(s.training) for s in sources),
        "file_ending": ending,
    }
    if reader is not None:
        dataset_json["overwrite_image_reader_writer"] = reader
    dataset_json[TASKS_KEY] = section
    dataset_json[METADATA_KEY] = {
        "tool": "nnunet_ext.tasks.merge", "format_version": MERGE_FORMAT_VERSION,
        "sources": [s.fingerprint() for s in sources], "options": options.content_options(),
    }
    dataset_json = json.loads(json.dumps(dataset_json))  # exactly what a re-read gives (str keys, lists)
    return MergePlan(folder, dataset_json, tuple(jobs), space, TaskMap.from_dataset_json(dataset_json))


# --- writing ------------------------------------------------------------------------------------


def _temporary(target: Path) -> Path:
    """A hidden sibling that keeps the file ending (SimpleITK picks the format from it)."""
    return target.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{target.name}")


def _place_image(source: Path, target: Path, copy: bool, result: MergeResult) -> None:
    tmp = _temporary(target)
    if not copy:
        try:
            os.link(source, tmp)
            os.replace(tmp, target)
            result.linked += 1
            return
        except OSError:
            pass  # other filesystem, or links not allowed: copy instead
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    result.copied += 1


def _write_image(image, target: Path) -> None:
    import SimpleITK as sitk

    tmp = _temporary(target)
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_zero_channel(reference: Path, target: Path) -> None:
    """A zero image with the reference file's size, geometry and pixel type (header read only)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(reference))
    reader.ReadImageInformation()
    components = reader.GetNumberOfComponents()
    size = list(reader.GetSize())
    image = sitk.Image(size, reader.GetPixelID(), components) if components > 1 else \
        sitk.Image(size, reader.GetPixelID())
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    _write_image(image, target)


def _remap_label(source: Path, target: Path, lookup: Mapping[int, int], dataset: str) -> None:
    """Rewrite a label map with merged values; a value the source's dataset.json lacks is an error."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MergeError(f"{source} is a multi-component image, not a label map; fix {dataset}.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise MergeError(f"{source} holds non-integer values; a label map holds whole numbers. Fix {dataset}.")
    values = array.astype(np.int64, copy=False)
    table = np.full(max(lookup) + 1, -1, dtype=np.int64)
    for source_value, merged_value in lookup.items():
        table[source_value] = merged_value
    inside = (values >= 0) & (values < len(table))
    merged = np.where(inside, table[np.clip(values, 0, len(table) - 1)], -1)
    if np.any(merged < 0):
        unexpected = np.unique(values[merged < 0]).tolist()
        raise MergeError(f"{source} holds label value(s) {unexpected[:10]} that {dataset}/dataset.json does not "
                         f"declare (declared: {sorted(lookup)}). Fix the label file or the dataset.json.")
    dtype = np.uint8 if merged.max(initial=0) <= np.iinfo(np.uint8).max else np.uint16
    out = sitk.GetImageFromArray(merged.astype(dtype))
    out.CopyInformation(image)
    _write_image(out, target)


def _run_jobs(plan: MergePlan, folder: Path, copy: bool, result: MergeResult, only_missing: bool) -> None:
    lookups = {task: plan.label_space.lookup_table(task) for task in plan.label_space.tasks}
    sources = {t.name: t.source for t in plan.task_map}
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for job in plan.jobs:
        target = folder / job.target
        if only_missing and target.is_file():
            continue
        if job.kind == "image":
            _place_image(job.source, target, copy, result)
        elif job.kind == "pad":
            _write_zero_channel(job.source, target)
            result.padded += 1
        else:
            _remap_label(job.source, target, lookups[job.task], sources[job.task])
            result.labels += 1
    text = json.dumps(plan.dataset_json, indent=2) + "\n"
    if only_missing and (folder / "dataset.json").is_file():
        return
    tmp = _temporary(folder / "dataset.json")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / "dataset.json")


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


def merge_datasets(raw_root: str | os.PathLike, source_ids: Sequence[int], output_id: int,
                   name: str = DEFAULT_NAME, options: MergeOptions = MergeOptions()) -> MergeResult:
    """Merge the raw datasets ``source_ids`` of ``raw_root`` into ``Dataset<output_id>_<name>``.

    Safe to repeat: the same merge again verifies and completes the output; anything else that
    exists there is refused and left untouched. Sources are only read.
    """
    plan = plan_merge(raw_root, source_ids, output_id, name, options)
    folder = plan.folder
    result = MergeResult(folder, plan.task_map, "created")
    if folder.exists() or folder.is_symlink():
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
            if all((folder / job.target).is_file() for job in plan.jobs):
                result.status = "verified"  # nothing is written
            else:
                result.status = "completed"
                _run_jobs(plan, folder, options.copy, result, only_missing=True)
            return result
        if not folder.is_dir() or any(folder.iterdir()):
            raise MergeError(f"{folder} already exists and was not written by 'nnunet-ext merge'; it was left "
                             f"untouched. Choose another id with -o or name with --name.")
    tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        _run_jobs(plan, tmp, options.copy, result, only_missing=False)
        if folder.is_dir():
            folder.rmdir()  # only when empty (checked above)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # our own temporary folder only
    return result
