"""Planned and preprocessed nnU-Net roots, built once per test run and copied for each user.

``nnUNetv2_plan_and_preprocess`` on even a tiny dataset costs about 30 s of CPU, nearly all of it in
processes that import torch and nnU-Net (the command, then its integrity check, fingerprint and
preprocessing pools). The roots here are planned by the same nnU-Net functions in the test process
with no worker processes (``compat``'s ``num_processes=0``); test_end_to_end runs the stock command
on the harness dataset and checks that it writes the same fingerprint, plans and preprocessed cases.
Under pytest-xdist the first worker that asks builds a root under a file lock in the run's shared
temporary folder; every caller (that worker included) gets a private copy, so tests keep writing
into their root (splits, trained folds, unlabelled data) without seeing each other's files.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest
from filelock import FileLock

from nnunet_ext import atomic_io, compat
from nnunet_ext.testing.harness import NnUNetRoot, make_nnunet_root, make_universal_root

_DESCRIPTION = "root.json"


def _run_folder(tmp_path_factory) -> Path:
    """The temporary folder of this test run: shared by its xdist workers (each has a subfolder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_root(tmp_path_factory, name: str, build: Callable[[Path], NnUNetRoot]) -> NnUNetRoot:
    """A private copy of the root ``build(folder)`` makes; ``build`` runs once per test run.

    ``build`` must write everything it needs under ``folder`` and nothing that names ``folder``
    (nnU-Net's raw, preprocessed and results files never do: the folder variables locate them).
    """
    cache = _run_folder(tmp_path_factory) / "planned_roots" / name
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cache}.lock"):
        if not (cache / _DESCRIPTION).is_file():
            with atomic_io.staged_folder(cache) as staging:  # a failed build leaves nothing behind
                root = build(staging / "root")
                (staging / _DESCRIPTION).write_text(json.dumps({"dataset_id": root.dataset_id,
                                                                "dataset_name": root.dataset_name}))
    description = json.loads((cache / _DESCRIPTION).read_text())
    copy = tmp_path_factory.mktemp(name)
    shutil.copytree(cache / "root", copy, dirs_exist_ok=True, symlinks=True)
    return NnUNetRoot(copy, description["dataset_id"], description["dataset_name"])


@contextlib.contextmanager
def nnunet_environment(root: NnUNetRoot, **extra: str) -> Iterator[pytest.MonkeyPatch]:
    """The root's nnU-Net variables for in-process calls (nnU-Net 2.8 reads them when used)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in root.env(**extra).items():
            if name.startswith(("nnUNet", "NNUNET_EXT")):
                patch.setenv(name, value)
        for name in ("NNUNET_EXT_LABEL_BUDGET", "NNUNET_EXT_LABEL_BUDGET_SEED"):
            if name not in extra:
                patch.delenv(name, raising=False)
        yield patch


def plan_in_process(root: NnUNetRoot, check_integrity: bool = True) -> None:
    """What ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres --verify_dataset_integrity`` does, by the
    same nnU-Net functions, in this process."""
    with nnunet_environment(root):
        compat.extract_fingerprint(root.dataset_id, 0, check_integrity=check_integrity)
        plans = compat.plan_dataset(root.dataset_id, compat.nnunet_planner_class("ExperimentPlanner"))
        compat.preprocess(root.dataset_id, plans, ["3d_fullres"], 0)


def _planned(make: Callable[[Path], NnUNetRoot]) -> Callable[[Path], NnUNetRoot]:
    def build(folder: Path) -> NnUNetRoot:
        root = make(folder)
        plan_in_process(root)
        return root
    return build


def planned_harness_root(tmp_path_factory) -> NnUNetRoot:
    """A private copy of the harness dataset, planned and preprocessed (3d_fullres)."""
    return shared_root(tmp_path_factory, "nnunet_root", _planned(make_nnunet_root))


def planned_universal_root(tmp_path_factory) -> NnUNetRoot:
    """A private copy of the partially labelled family (1, 2, 4 channels) merged, planned and preprocessed."""
    return shared_root(tmp_path_factory, "universal_root", _planned(make_universal_root))
