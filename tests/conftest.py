"""Shared fixtures: temporary nnU-Net roots with the synthetic datasets, planned once per test run
(planned_roots.py) and copied for each pytest-xdist worker; threads per worker."""
from __future__ import annotations

import os
import sys

import pytest

from planned_roots import planned_harness_root, planned_universal_root

from nnunet_ext.testing.harness import NnUNetRoot


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown when it is not installed
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (the default here) with heavy files first on all workers but one (xdist_schedule.py)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist_schedule import HeavyFilesFirst

    return HeavyFilesFirst(config, log)


def pytest_configure(config) -> None:
    """Under pytest-xdist, the workers share the cores: each worker and the commands it starts get
    cores / workers threads (unless OMP_NUM_THREADS is set), instead of every process using every core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch at import, here and in subprocesses
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory) -> NnUNetRoot:
    """Raw dataset written, planned and preprocessed (3d_fullres) once; tests train into it."""
    return planned_harness_root(tmp_path_factory)


@pytest.fixture(scope="session")
def universal_root(tmp_path_factory) -> NnUNetRoot:
    """Three partially labelled datasets (1, 2, 4 channels) merged, planned and preprocessed (stock CLI)."""
    return planned_universal_root(tmp_path_factory)
