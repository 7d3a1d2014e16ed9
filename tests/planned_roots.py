"""Planned and preprocessed nnU-Net roots, built once per test run and copied for each user.

Planning and preprocessing even a tiny dataset with nnU-Net costs about 30 s on 2 CPU cores, nearly
all of it in processes that import torch and nnU-Net (the command, then its fingerprint, integrity
check and preprocessing pools). Under pytest-xdist every worker would pay it again for the same
dataset. Here the first worker that asks builds the root under a file lock in the run's shared
temporary folder; every caller (that worker included) gets a private copy, so tests keep writing
into their root (splits, trained folds, unlabelled data) without seeing each other's files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock

from nnunet_ext import atomic_io
from nnunet_ext.testing.harness import NnUNetRoot, make_nnunet_root, make_universal_root, plan_and_preprocess

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


def _planned(make: Callable[[Path], NnUNetRoot]) -> Callable[[Path], NnUNetRoot]:
    def build(folder: Path) -> NnUNetRoot:
        root = make(folder)
        plan_and_preprocess(root)
        return root
    return build


def planned_harness_root(tmp_path_factory) -> NnUNetRoot:
    """A private copy of the harness dataset, planned and preprocessed (3d_fullres) by the stock CLI."""
    return shared_root(tmp_path_factory, "nnunet_root", _planned(make_nnunet_root))


def planned_universal_root(tmp_path_factory) -> NnUNetRoot:
    """A private copy of the partially labelled family (1, 2, 4 channels) merged, planned and preprocessed."""
    return shared_root(tmp_path_factory, "universal_root", _planned(make_universal_root))
