"""Task-aware patch sampling: every batch comes from one task, tasks drawn with configurable weights.

UniSeg and DoDNet condition the network on the task of the batch (prompt selection, dynamic
heads), and the partial-label loss uses that task's label subset, so a batch must not mix tasks.
:class:`TaskAwareDataLoader` is nnU-Net's own ``nnUNetDataLoader`` (patch cropping, foreground
oversampling, per-sample augmentation inside the loader) with one change: ``get_indices`` first
draws a task, then the batch's cases from that task only; the batch dict gains ``task_id``.

Task weights (``task_probabilities``): ``"cases"`` (default; proportional to each task's number
of training cases, i.e. what uniform case sampling would give on average), ``"uniform"`` (every
task equally often, as UniSeg's per-task iteration budget), or an explicit ``{task name: weight}``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from nnunet_ext import compat
from nnunet_ext.tasks.task_map import TaskMap, TaskMapError

TASK_WEIGHTING = ("cases", "uniform")
# nnU-Net's class, through compat; annotated so that mypy (which does not read nnU-Net) accepts it as a base
nnUNetDataLoader: type[Any] = compat.nnunet_data_loader_class()


def task_probabilities(task_map: TaskMap, cases_per_task: Mapping[int, int],
                       weighting: str | Mapping[str, float] = "cases") -> dict[int, float]:
    """Task id -> sampling probability over the tasks that have cases."""
    present = {t: n for t, n in cases_per_task.items() if n > 0}
    if not present:
        raise TaskMapError("None of the tasks has training cases; check the split (splits_final.json) and the "
                           "case prefixes of the merged dataset.")
    if isinstance(weighting, str):
        if weighting not in TASK_WEIGHTING:
            raise ValueError(f"task weighting {weighting!r} is not one of {TASK_WEIGHTING} or a "
                             f"{{task name: weight}} mapping")
        raw = {t: float(n) if weighting == "cases" else 1.0 for t, n in present.items()}
    else:
        unknown = sorted(set(weighting) - set(task_map.names))
        if unknown:
            raise TaskMapError(f"task weights name unknown tasks {unknown}; the tasks are {list(task_map.names)}")
        raw = {t: float(weighting.get(task_map.task(t).name, 0.0)) for t in present}
        if any(w < 0 for w in raw.values()) or sum(raw.values()) <= 0:
            raise ValueError(f"task weights must be >= 0 with a positive sum over tasks that have cases; got {raw}")
    total = sum(raw.values())
    return {t: w / total for t, w in raw.items()}


def cases_by_task(task_map: TaskMap, identifiers: Sequence[str]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {task.task_id: [] for task in task_map}
    for identifier in identifiers:
        grouped[task_map.task_of_case(identifier).task_id].append(identifier)
    return grouped


class TaskAwareDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader drawing each batch from a single task; adds ``task_id`` to the batch."""

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager, task_map: TaskMap,
                 weighting: str | Mapping[str, float] = "cases", **kwargs):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, **kwargs)
        self.task_map = task_map
        self.cases_of_task = cases_by_task(task_map, list(data.identifiers))
        self.task_of_case = {case: t for t, cases in self.cases_of_task.items() for case in cases}
        probabilities = task_probabilities(task_map, {t: len(c) for t, c in self.cases_of_task.items()}, weighting)
        self.sampled_tasks = np.array(sorted(probabilities))
        self.task_weights = np.array([probabilities[t] for t in self.sampled_tasks])

    def get_indices(self):
        task = int(np.random.choice(self.sampled_tasks, p=self.task_weights))
        return list(np.random.choice(self.cases_of_task[task], self.batch_size, replace=True))

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        tasks = {self.task_of_case[key] for key in batch["keys"]}
        if len(tasks) != 1:  # get_indices guarantees it; this guards subclasses that change sampling
            raise RuntimeError(f"a task-aware batch mixes tasks {sorted(tasks)}")
        batch["task_id"] = tasks.pop()
        return batch
