"""``num_processes=0`` of compat's planning, preprocessing and evaluation: nnU-Net's pools run in this process.

That the results equal the stock command's, byte for byte, is checked by test_end_to_end.py (the
shared test roots are planned this way); here: what is swapped, and that everything is put back.
"""
from __future__ import annotations

import importlib
import os

import pytest

from nnunet_ext import compat

POOL_USERS = ["nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor",
              "nnunetv2.experiment_planning.verify_dataset_integrity",
              "nnunetv2.preprocessing.preprocessors.default_preprocessor",
              "nnunetv2.evaluation.evaluate_predictions"]


def _pool_attributes() -> dict:
    attributes = {name: importlib.import_module(name).multiprocessing for name in POOL_USERS}
    attributes["nnunetv2.utilities.utils"] = importlib.import_module("nnunetv2.utilities.utils").Pool
    return attributes


def _pid_times(factor: int) -> tuple[int, int]:
    return os.getpid(), factor * 2


def test_inside_the_block_nnunets_pools_run_here_and_afterwards_they_are_nnunets_again():
    before = _pool_attributes()
    with compat.pools_in_this_process():
        for name in POOL_USERS:
            module = importlib.import_module(name)
            with module.multiprocessing.get_context("spawn").Pool(4) as pool:
                assert pool.starmap(_pid_times, [(1,), (2,)]) == [(os.getpid(), 2), (os.getpid(), 4)]
                pending = pool.starmap_async(_pid_times, [(3,)])
                assert pending.ready() and pending.get() == [(os.getpid(), 6)]
                assert [worker.is_alive() for worker in pool._pool] == []  # nnU-Net's liveness check passes
        utils = importlib.import_module("nnunetv2.utilities.utils")
        with utils.Pool(processes=12) as pool:
            assert pool.starmap(_pid_times, [(5,)]) == [(os.getpid(), 10)]
    assert _pool_attributes() == before


def test_an_error_inside_the_block_puts_nnunets_pools_back():
    before = _pool_attributes()
    with pytest.raises(RuntimeError, match="case failed"), compat.pools_in_this_process():
        raise RuntimeError("case failed")
    assert _pool_attributes() == before


def test_a_negative_process_count_is_refused_before_nnunet_runs():
    with pytest.raises(ValueError, match="must be 0 .* or more, not -1"):
        compat.extract_fingerprint(1, -1)
    with pytest.raises(ValueError, match="not -2"):
        compat.preprocess(1, "nnUNetPlans", ["3d_fullres"], -2)
