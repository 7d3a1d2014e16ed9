"""Read the ``tasks`` section of a merged dataset.json: which case belongs to which task, and what
each task annotates.

Everything multi-dataset builds on this one small class: the task-aware sampler (case -> task),
the partial-label loss (which merged labels a task annotates: for a task, a voxel labelled 0
means "background or a structure this task does not annotate"), UniSeg/DoDNet (task ids and
per-task input channels) and task-aware prediction export (merged values -> the source's
values). It is saved in checkpoints through :meth:`TaskMap.to_dict`, so a trained model knows
its tasks without the raw dataset.

The section is written by :mod:`nnunet_ext.tasks.merge`; one entry per task, in task-id order::

    "tasks": {
      "LiverKidney": {
        "task_id": 0,
        "source": "Dataset971_LiverKidney",
        "case_prefix": "T00LiverKidney_",
        "num_channels": 1,
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "kidney": 2},
        "to_source": {"0": 0, "1": 1, "2": 2},
        "source_labels": {"background": 0, "liver": 1, "kidney": 2}
      }, ...
    }

``labels`` are merged names -> merged values of the structures the task annotates (plus
background and, if the source has one, ``ignore``); ``to_source`` maps each of those merged
values back to the source's value (JSON keys are strings); ``channel_names`` and
``source_labels`` are the source's own, verbatim. Merged case ids are ``case_prefix`` + the
source's case id; preprocessed case identifiers are the same strings.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from nnunet_ext.errors import UserFacingError
from nnunet_ext.tasks.label_space import BACKGROUND, IGNORE

TASKS_KEY = "tasks"


class TaskMapError(UserFacingError, ValueError):
    """A ``tasks`` section that is missing or inconsistent; the message says what and where."""


@dataclass(frozen=True)
class Task:
    """One task (= one source dataset) of a merged dataset."""

    name: str
    task_id: int
    source: str
    case_prefix: str
    num_channels: int
    channel_names: dict[str, str]
    labels: dict[str, int]
    to_source: dict[int, int]
    source_labels: dict[str, Any]

    @property
    def annotated_values(self) -> tuple[int, ...]:
        """Merged foreground values this task annotates (no background, no ignore), ascending."""
        return tuple(sorted(v for n, v in self.labels.items() if n not in (BACKGROUND, IGNORE)))

    @property
    def ignore_value(self) -> int | None:
        """Merged value of the ignore label if this task's source has one."""
        return self.labels.get(IGNORE)

    def to_dict(self) -> dict[str, Any]:
        """The task's entry in the ``tasks`` section (JSON-serialisable)."""
        return {
            "task_id": self.task_id, "source": self.source, "case_prefix": self.case_prefix,
            "num_channels": self.num_channels, "channel_names": dict(self.channel_names),
            "labels": dict(self.labels), "to_source": {str(k): v for k, v in self.to_source.items()},
            "source_labels": dict(self.source_labels),
        }

    @classmethod
    def from_dict(cls, name: str, entry: Mapping[str, Any]) -> "Task":
        required = ("task_id", "source", "case_prefix", "num_channels", "channel_names", "labels", "to_source")
        if not isinstance(entry, Mapping):
            raise TaskMapError(f"tasks[{name!r}] must be a mapping, got {type(entry).__name__}.")
        missing = [k for k in required if k not in entry]
        if missing:
            raise TaskMapError(f"tasks[{name!r}] lacks {missing}; re-create the merged dataset with "
                               f"'nnunet-ext merge'.")
        try:
            return cls(name=str(name), task_id=int(entry["task_id"]), source=str(entry["source"]),
                       case_prefix=str(entry["case_prefix"]), num_channels=int(entry["num_channels"]),
                       channel_names={str(k): str(v) for k, v in entry["channel_names"].items()},
                       labels={str(k): int(v) for k, v in entry["labels"].items()},
                       to_source={int(k): int(v) for k, v in entry["to_source"].items()},
                       source_labels=dict(entry.get("source_labels", {})))
        except (TypeError, ValueError, AttributeError) as error:
            raise TaskMapError(f"tasks[{name!r}] is malformed ({error}); re-create the merged dataset with "
                               f"'nnunet-ext merge'.") from None


class TaskMap:
    """Tasks of a merged dataset, in task-id order (0, 1, ...), with the lookups training needs."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self._tasks = tuple(sorted(tasks, key=lambda t: t.task_id))
        self._by_name = {t.name: t for t in self._tasks}
        self._validate()
        labels: dict[str, int] = {}
        for task in self._tasks:
            labels.update(task.labels)
        self._labels = dict(sorted(labels.items(), key=lambda item: item[1]))

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, tasks_section: Mapping[str, Any]) -> "TaskMap":
        """From a ``tasks`` section (as in dataset.json, or as returned by :meth:`to_dict`)."""
        if not isinstance(tasks_section, Mapping) or not tasks_section:
            raise TaskMapError("the 'tasks' section is empty or not a mapping; it is written by 'nnunet-ext merge'.")
        return cls([Task.from_dict(name, entry) for name, entry in tasks_section.items()])

    @classmethod
    def from_dataset_json(cls, dataset_json: Mapping[str, Any] | str | os.PathLike) -> "TaskMap":
        """From a merged dataset.json (its path or its loaded content)."""
        where = "dataset.json"
        if isinstance(dataset_json, Mapping):
            content: Mapping[str, Any] = dataset_json
        else:
            where = os.fspath(dataset_json)
            with open(where, encoding="utf-8") as handle:
                content = json.load(handle)
        if TASKS_KEY not in content:
            raise TaskMapError(f"{where} has no 'tasks' section, so it is not a merged multi-dataset. Create one "
                               f"with 'nnunet-ext merge -d ID ID ... -o NEW_ID'.")
        task_map = cls.from_dict(content[TASKS_KEY])
        declared = content.get("labels")
        if isinstance(declared, Mapping) and any(declared.get(n) != v for n, v in task_map.labels.items()):
            raise TaskMapError(f"{where}: the tasks' labels disagree with its 'labels'; re-create the merged "
                               f"dataset with 'nnunet-ext merge'.")
        return task_map

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable ``tasks`` section; ``TaskMap.from_dict(m.to_dict())`` equals ``m``."""
        return {t.name: t.to_dict() for t in self._tasks}

    def _validate(self) -> None:
        ids = [t.task_id for t in self._tasks]
        if ids != list(range(len(ids))):
            raise TaskMapError(f"task ids must be 0..{len(ids) - 1} without gaps, got {ids}.")
        if len(self._by_name) != len(self._tasks):
            raise TaskMapError("task names must be unique.")
        prefixes = [t.case_prefix for t in self._tasks]
        for i, a in enumerate(prefixes):
            if not a:
                raise TaskMapError("every task needs a non-empty case_prefix.")
            clash = [b for j, b in enumerate(prefixes) if j != i and b.startswith(a)]
            if clash:
                raise TaskMapError(f"case prefix {a!r} is a prefix of {clash[0]!r}; cases could not be assigned "
                                   f"to one task.")
        seen: dict[str, int] = {}
        by_value: dict[int, str] = {}
        for task in self._tasks:
            if task.num_channels < 1:
                raise TaskMapError(f"task {task.name!r}: num_channels must be >= 1.")
            for name, value in task.labels.items():
                if seen.setdefault(name, value) != value or by_value.setdefault(value, name) != name:
                    raise TaskMapError(f"task {task.name!r}: label {name!r} = {value} contradicts another task "
                                       f"(one merged value per name and one name per value).")
            if set(task.to_source) != set(task.labels.values()):
                raise TaskMapError(f"task {task.name!r}: to_source must map exactly its merged label values "
                                   f"{sorted(task.labels.values())}, got {sorted(task.to_source)}.")

    # --- tasks ----------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Task names in task-id order."""
        return tuple(t.name for t in self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskMap) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"TaskMap({list(self.names)})"

    def task(self, key: str | int) -> Task:
        """A task by name or by task id."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if 0 <= key < len(self._tasks):
                return self._tasks[int(key)]
        elif key in self._by_name:
            return self._by_name[key]
        raise KeyError(f"no task {key!r}; tasks are {dict(enumerate(self.names))}")

    __getitem__ = task

    def task_id(self, name: str) -> int:
        return self.task(name).task_id

    # --- cases ----------------------------------------------------------------------------------

    def task_of_case(self, case_identifier: str) -> Task:
        """The task a merged (or preprocessed) case identifier belongs to, by its case prefix."""
        for task in self._tasks:  # prefixes are never prefixes of each other (validated)
            if case_identifier.startswith(task.case_prefix):
                return task
        raise KeyError(f"case {case_identifier!r} has none of the task prefixes "
                       f"{[t.case_prefix for t in self._tasks]}; was it written by 'nnunet-ext merge'?")

    def source_case(self, case_identifier: str) -> tuple[Task, str]:
        """(task, the source dataset's own case id) of a merged case identifier."""
        task = self.task_of_case(case_identifier)
        return task, case_identifier[len(task.case_prefix):]

    # --- labels and channels --------------------------------------------------------------------

    @property
    def labels(self) -> dict[str, int]:
        """The merged label space (union of the tasks' labels), name -> value, by value."""
        return dict(self._labels)

    @property
    def num_classes(self) -> int:
        """Output classes of a network on the merged space (background included, ignore excluded)."""
        return len([n for n in self._labels if n != IGNORE])

    @property
    def ignore_value(self) -> int | None:
        return self._labels.get(IGNORE)

    @property
    def max_channels(self) -> int:
        """The merged dataset's channel count (tasks with fewer channels are zero-padded)."""
        return max(t.num_channels for t in self._tasks)

    def annotated_mask(self, key: str | int) -> tuple[bool, ...]:
        """Per merged class (length ``num_classes``): does this task annotate it? Background is True."""
        task = self.task(key)
        annotated = set(task.annotated_values) | {0}
        return tuple(value in annotated for value in range(self.num_classes))

    def to_source_lut(self, key: str | int) -> np.ndarray:
        """Lookup table merged value -> source value; classes the task does not annotate -> 0."""
        task = self.task(key)
        lut: np.ndarray = np.zeros(max(self._labels.values()) + 1, dtype=np.int64)
        for merged, source in task.to_source.items():
            lut[merged] = source
        return lut

    def to_source(self, key: str | int, segmentation: np.ndarray) -> np.ndarray:
        """A segmentation in merged values exported to the task's source values (for its own evaluation)."""
        segmentation = np.asarray(segmentation)
        lut = self.to_source_lut(key)
        if segmentation.size and (segmentation.min() < 0 or segmentation.max() >= len(lut)):
            raise ValueError(f"segmentation holds values outside the merged label space 0..{len(lut) - 1}.")
        return lut[segmentation]
