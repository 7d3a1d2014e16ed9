"""Throughput of ``nnunet-ext merge`` and ``nnunet-ext preprocess-unlabeled`` with -np 1 vs -np 4, in one run.

Same data for both settings: the synthetic partially labelled family (three sources with 1, 2 and 4
channels) for merge, each setting merging it into a fresh output (hard links, so the work is the
full decode of every source file, the zero channels and the label remaps); a planned and
preprocessed synthetic dataset with ``imagesUnlabeled`` for preprocess-unlabeled, each setting
redoing every case (``overwrite``). Worker start-up (spawned processes) is part of the time, as a
user sees it. The settings alternate (-np 1, -np 4, -np 1, ...) for ``--repeats`` rounds and the best
time of each counts, so that other jobs on a shared machine hit both alike. The ratio depends on the
machine's free cores: the usable cores and the 1-minute load average before and after are printed
with the result; compare the two settings only within one run.

Usage: ``python benchmarks/merge_throughput.py [--repeats 2]``; prints one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

from nnunet_ext import compat
from nnunet_ext.datasets.multi_dataset import DEFAULT_DATASET_IDS, write_multi_dataset
from nnunet_ext.datasets.synthetic import SyntheticSpec, write_synthetic_dataset
from nnunet_ext.datasets.unlabeled import write_unlabeled_images
from nnunet_ext.tasks.merge import merge_datasets
from nnunet_ext.unlabeled.preprocess import preprocess_unlabeled

SETTINGS = (1, 4)
MERGE_SPEC = SyntheticSpec(num_training=12, num_test=0, shape=(48, 128, 128), spacing=(2.5, 1.0, 1.0))
UNLABELED_SPEC = SyntheticSpec(num_training=4, num_test=0, shape=(48, 128, 128), spacing=(2.5, 1.0, 1.0))
NUM_UNLABELED = 16
UNLABELED_ID = 921


def _merge_rates(raw: Path, repeats: int) -> dict[int, float]:
    """Cases per second of each setting: best of ``repeats`` alternating merges, each into a new output."""
    cases = MERGE_SPEC.num_training * len(DEFAULT_DATASET_IDS)
    best = {processes: float("inf") for processes in SETTINGS}
    for repeat in range(repeats):
        for index, processes in enumerate(SETTINGS):
            output_id = 930 + repeat * len(SETTINGS) + index
            start = time.perf_counter()
            result = merge_datasets(raw, list(DEFAULT_DATASET_IDS), output_id, f"Bench{processes}r{repeat}",
                                    num_processes=processes)
            best[processes] = min(best[processes], time.perf_counter() - start)
            assert result.status == "created" and result.labels == cases, result
    return {processes: cases / seconds for processes, seconds in best.items()}


def _unlabeled_rates(root: Path, repeats: int) -> dict[int, float]:
    folders = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    write_synthetic_dataset(folders["nnUNet_raw"], UNLABELED_ID, "BenchUnlabeled", UNLABELED_SPEC)
    write_unlabeled_images(folders["nnUNet_raw"], UNLABELED_ID, "BenchUnlabeled", UNLABELED_SPEC, NUM_UNLABELED)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        compat.extract_fingerprint(UNLABELED_ID, 2, check_integrity=False)
        plans = compat.plan_dataset(UNLABELED_ID, compat.nnunet_planner_class("ExperimentPlanner"))
        compat.preprocess(UNLABELED_ID, plans, ["3d_fullres"], 2)
    best = {processes: float("inf") for processes in SETTINGS}
    for _ in range(repeats):
        for processes in SETTINGS:
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                (result,) = preprocess_unlabeled(UNLABELED_ID, ["3d_fullres"], plans, num_processes=processes,
                                                 overwrite=True)
            best[processes] = min(best[processes], time.perf_counter() - start)
            assert len(result.processed) == NUM_UNLABELED, result
    return {processes: NUM_UNLABELED / seconds for processes, seconds in best.items()}


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best time counts")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    load_start = _load_average()
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "merge_raw"
        write_multi_dataset(raw, DEFAULT_DATASET_IDS, MERGE_SPEC)
        merge = _merge_rates(raw, args.repeats)
        unlabeled = _unlabeled_rates(Path(folder) / "unlabeled", args.repeats)
    low, high = SETTINGS
    print(json.dumps({
        "benchmark": "merge_throughput", "cpu_count": os.cpu_count(), "repeats": args.repeats,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1min": {"start": load_start, "end": _load_average()},
        "merge": {"cases": MERGE_SPEC.num_training * len(DEFAULT_DATASET_IDS), "shape": MERGE_SPEC.shape,
                  f"cases_per_s_np{low}": round(merge[low], 3), f"cases_per_s_np{high}": round(merge[high], 3),
                  f"speedup_np{high}": round(merge[high] / merge[low], 2)},
        "preprocess_unlabeled": {"cases": NUM_UNLABELED, "shape": UNLABELED_SPEC.shape,
                                 f"cases_per_s_np{low}": round(unlabeled[low], 3),
                                 f"cases_per_s_np{high}": round(unlabeled[high], 3),
                                 f"speedup_np{high}": round(unlabeled[high] / unlabeled[low], 2)},
    }))


if __name__ == "__main__":
    main()
