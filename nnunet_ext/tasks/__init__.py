"""Training on many partially labelled datasets: merge them into one raw dataset, read its tasks.

* :mod:`nnunet_ext.tasks.merge` (``nnunet-ext merge``): several raw datasets -> one merged raw
  dataset with a ``tasks`` section in its dataset.json.
* :mod:`nnunet_ext.tasks.label_space`: the merged label space and its collision rules.
* :mod:`nnunet_ext.tasks.task_map`: :class:`TaskMap`, the reader everything downstream uses
  (task-aware sampling, partial-label losses, UniSeg/DoDNet, task-aware prediction export).

Importing this package is cheap (numpy only); SimpleITK is imported when files are written.
"""
from __future__ import annotations

from nnunet_ext.tasks.task_map import Task, TaskMap, TaskMapError

__all__ = ["Task", "TaskMap", "TaskMapError"]
