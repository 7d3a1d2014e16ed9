"""The merged label space of several nnU-Net datasets (pure logic, no files).

Why a shared space: a universal model (UniSeg, DoDNet, ...) learns "liver" once from every
dataset that annotates a liver, so the same structure name in two sources gets ONE merged
value. Different names get different values; background is 0. ``share=False`` (CLI
``--no-share-labels``) gives every task its own values instead, with names prefixed by the
task name (``Liver_liver``); ``separate`` does that for chosen names only (e.g. a "tumour"
that means a liver tumour in one source and a kidney tumour in another: names cannot tell).

Policy, decided here once:

* Merged values are assigned in task order, then in each source's label-value order, so the
  same merge always gives the same numbers.
* Region-based sources (a label value that is a list of several values, or a
  ``regions_class_order``) are refused: a region overlaps other labels, so it cannot be
  remapped voxel-wise into one label map. Convert such a source to plain labels first.
  A name that is a region in one source and a plain label in another is reported as a
  collision (same name, different meanings) before that.
* Within a source, two names with the same value are refused (the remap would be ambiguous),
  as are a background that is not 0 and values that are not whole numbers.
* Names that differ only in case, spaces, ``_`` or ``-`` ("Liver" vs "liver") across sources
  are refused: they would silently become two labels. The fix is ``rename`` (CLI
  ``--rename-label TASK:OLD=NEW``), to share them or to keep them clearly apart.
* nnU-Net's ignore label (the name ``ignore``) of any source becomes the merged ``ignore``
  label, which nnU-Net requires to be the highest value. Ignore voxels stay ignored.

A task's label map holds 0 for "background or a structure this task does not annotate":
voxels of unannotated structures cannot be told apart in the source, so it is the task-aware
loss (through :class:`nnunet_ext.tasks.task_map.TaskMap`) that must not treat 0 as background
for the structures a task lacks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from nnunet_ext.errors import UserFacingError

BACKGROUND = "background"
IGNORE = "ignore"  # nnU-Net's reserved name for its ignore label


class LabelSpaceError(UserFacingError, ValueError):
    """Labels that cannot be merged; the message names the dataset(s) and the fix."""


@dataclass(frozen=True)
class SourceLabels:
    """One source's labels as they enter the merge: its task name, folder and dataset.json labels."""

    task: str
    source: str  # dataset folder name, for messages
    labels: Mapping[str, Any]
    has_regions_class_order: bool = False


@dataclass(frozen=True)
class TaskLabels:
    """One task in the merged space: merged names -> merged values and merged -> source values."""

    labels: dict[str, int]  # includes background (and ignore if the source has one)
    to_source: dict[int, int]  # merged value -> source value


@dataclass(frozen=True)
class LabelSpace:
    """The merged ``labels`` of dataset.json and the per-task view of it."""

    labels: dict[str, int]  # background 0, consecutive values, ignore (if any) last
    tasks: dict[str, TaskLabels] = field(default_factory=dict)

    def lookup_table(self, task: str) -> dict[int, int]:
        """Source value -> merged value for one task (what the label remap applies)."""
        return {source: merged for merged, source in self.tasks[task].to_source.items()}


def _normalised(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).casefold()


def _plain_value(name: str, value: Any, source: SourceLabels) -> int | None:
    """The integer value of a plain label, or None for a region (a list of several values)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            return None
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise LabelSpaceError(f"{source.source}/dataset.json: label {name!r} has value {value!r}; nnU-Net label "
                              f"values are whole numbers >= 0. Fix the dataset.json of {source.source}.")
    return int(value)


def _check_source(source: SourceLabels) -> dict[str, int]:
    """Validate one source's labels; return its plain labels name -> value."""
    where = f"{source.source}/dataset.json"
    if BACKGROUND not in source.labels:
        raise LabelSpaceError(f"{where} declares no 'background' label; nnU-Net needs \"background\": 0. "
                              f"Fix the dataset.json of {source.source}.")
    plain: dict[str, int] = {}
    regions = []
    for name, value in source.labels.items():
        number = _plain_value(name, value, source)
        if number is None:
            regions.append(name)
        else:
            plain[name] = number
    if regions or source.has_regions_class_order:
        what = f"region label(s) {regions}" if regions else "'regions_class_order'"
        raise LabelSpaceError(
            f"{where} is region-based ({what}); merge supports plain label maps only, because a region overlaps "
            f"other labels and cannot be remapped voxel-wise. Merge a copy of {source.source} whose dataset.json "
            f"lists each structure once with a single value (and no regions_class_order).")
    if plain[BACKGROUND] != 0:
        raise LabelSpaceError(f"{where}: 'background' is {plain[BACKGROUND]}, nnU-Net needs 0. "
                              f"Fix the dataset.json of {source.source}.")
    by_value: dict[int, str] = {}
    for name, value in plain.items():
        if value in by_value:
            raise LabelSpaceError(f"{where}: labels {by_value[value]!r} and {name!r} both have value {value}, so "
                                  f"the remap into the merged space would be ambiguous. Give each structure its "
                                  f"own value in {source.source}, or drop one of the names.")
        by_value[value] = name
    return plain


def _check_kinds_across_sources(sources: Sequence[SourceLabels], renamed: Sequence[Mapping[str, str]]) -> None:
    """Same name as a region in one source and a plain label in another: different meanings."""
    kinds: dict[str, tuple[str, str]] = {}
    for source, names in zip(sources, renamed):
        for name, value in source.labels.items():
            kind = "region" if isinstance(value, (list, tuple)) and len(value) > 1 else "label"
            merged = names.get(name, name)
            if merged in kinds and kinds[merged][0] != kind:
                other_kind, other = kinds[merged]
                raise LabelSpaceError(
                    f"label name {merged!r} collides with different meanings: a {other_kind} in {other} but a "
                    f"{kind} in {source.source}. Rename one of them with --rename-label {source.task}:{name}=<NEW>.")
            kinds.setdefault(merged, (kind, source.source))


def build_label_space(sources: Sequence[SourceLabels], share: bool = True, separate: Sequence[str] = (),
                      rename: Mapping[str, Mapping[str, str]] | None = None) -> LabelSpace:
    """Merge the sources' labels (see the module docstring for the policy).

    ``rename`` maps task -> {source name: name in the merged space}; ``separate`` lists merged
    names that are kept per task even when ``share`` is on.
    """
    for source in sources:
        if not isinstance(source.labels, Mapping):
            raise LabelSpaceError(f"{source.source}/dataset.json: 'labels' must be a mapping name -> value, got "
                                  f"{type(source.labels).__name__}. Fix the dataset.json of {source.source}.")
    rename = {task: dict(names) for task, names in (rename or {}).items()}
    tasks = [s.task for s in sources]
    unknown = sorted(set(rename) - set(tasks))
    if unknown:
        raise LabelSpaceError(f"--rename-label names unknown task(s) {unknown}; the tasks are {tasks}.")
    renamed = [rename.get(s.task, {}) for s in sources]
    for source, names in zip(sources, renamed):
        missing = sorted(set(names) - set(source.labels))
        if missing:
            raise LabelSpaceError(f"--rename-label {source.task}:{missing[0]}=...: {source.source} has no label "
                                  f"{missing[0]!r}; its labels are {list(source.labels)}.")
        bad = sorted(n for n in names if n in (BACKGROUND, IGNORE)) + \
            sorted(n for n in names.values() if n in (BACKGROUND, IGNORE))
        if bad:
            raise LabelSpaceError(f"--rename-label: {bad[0]!r} is reserved by nnU-Net and cannot be renamed to or "
                                  f"from.")
    _check_kinds_across_sources(sources, renamed)
    plains = [_check_source(s) for s in sources]

    kept_apart = set(separate)
    merged: dict[str, int] = {BACKGROUND: 0}
    seen_spelling: dict[str, tuple[str, str, str]] = {}  # normalised -> (merged name, source, task)
    per_task: dict[str, tuple[dict[str, int], dict[int, int]]] = {}
    has_ignore = False
    for source, plain, names in zip(sources, plains, renamed):
        labels, to_source = {BACKGROUND: 0}, {0: 0}
        for name, value in sorted(plain.items(), key=lambda item: item[1]):
            if name == BACKGROUND:
                continue
            if name == IGNORE:
                has_ignore = True
                continue  # gets its value once all other labels are known
            base = names.get(name, name)
            merged_name = base if share and base not in kept_apart else f"{source.task}_{base}"
            key = _normalised(merged_name)
            if key in seen_spelling and seen_spelling[key][0] != merged_name:
                other_name, other_source, other_task = seen_spelling[key]
                raise LabelSpaceError(
                    f"label {merged_name!r} of {source.source} and {other_name!r} of {other_source} differ only in "
                    f"spelling and would become two labels. To share one label use --rename-label "
                    f"{source.task}:{name}={other_name}; to keep them apart rename one clearly, e.g. --rename-label "
                    f"{source.task}:{name}={source.task}_{base}.")
            seen_spelling.setdefault(key, (merged_name, source.source, source.task))
            if merged_name in labels:
                raise LabelSpaceError(f"{source.source}: two labels become {merged_name!r} in the merged space; "
                                      f"check --rename-label for task {source.task}.")
            if merged_name not in merged:
                merged[merged_name] = len(merged)
            labels[merged_name] = merged[merged_name]
            to_source[merged[merged_name]] = value
        per_task[source.task] = (labels, to_source)
    if has_ignore:
        ignore_value = len(merged)
        merged[IGNORE] = ignore_value
        for source, plain in zip(sources, plains):
            if IGNORE in plain:
                labels, to_source = per_task[source.task]
                labels[IGNORE] = ignore_value
                to_source[ignore_value] = plain[IGNORE]
    return LabelSpace(merged, {task: TaskLabels(labels, to_source) for task, (labels, to_source) in per_task.items()})
