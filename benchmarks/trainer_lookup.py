"""What nnU-Net's trainer lookup costs for one of our trainers vs for its own ``nnUNetTrainer``.

``nnUNetv2_train -tr NAME`` starts by ``recursive_find_trainer_class_by_name(NAME)``: nnU-Net walks
its own trainer tree first and, for a name it does not ship, then the folders in
``nnUNet_extTrainer`` (our discovery folder, which imports ``nnunet_ext.trainers``: every method's
module and what they import). This script runs that lookup in a fresh interpreter per run (the
whole process: start-up, imports, lookup), alternating between the two names so that a change of
machine load touches both alike, and reports the median wall time of each and their ratio, plus
which heavy optional modules the lookup of our trainer imported.

Usage: ``python benchmarks/trainer_lookup.py [--trainer CoTrTrainer] [--runs 15]``. Prints one JSON
line. Goal: ratio at most 1.02.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LOOKUP = ("import contextlib, io, sys\n"
          "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
          "with contextlib.redirect_stdout(io.StringIO()):\n"
          "    cls = find({name!r})\n"
          "assert cls is not None\n"
          "print(' '.join(m for m in ('segment_anything', 'nnunet_ext.trainers', 'nnunet_ext.architectures.cotr') "
          "if m in sys.modules))\n")


def run_once(name: str, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LOOKUP.format(name=name)], env=env, capture_output=True,
                            text=True, check=True)
    return time.perf_counter() - start, result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="CoTrTrainer", help="our trainer to look up (default CoTrTrainer)")
    parser.add_argument("--runs", type=int, default=15, help="runs per trainer, after one warm-up each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ)
        for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env.setdefault(variable, os.path.join(folder, variable))
            os.makedirs(env[variable], exist_ok=True)
        times: dict[str, list[float]] = {"nnUNetTrainer": [], args.trainer: []}
        imported = ""
        for name in times:  # warm-up: file system caches, .pyc files
            run_once(name, env)
        for _ in range(args.runs):
            for name in times:
                seconds, modules = run_once(name, env)
                times[name].append(seconds)
                if name == args.trainer:
                    imported = modules
    baseline = statistics.median(times["nnUNetTrainer"])
    ours = statistics.median(times[args.trainer])
    print(json.dumps({
        "benchmark": "trainer_lookup",
        "trainer": args.trainer,
        "runs": args.runs,
        "nnUNetTrainer_s_median": round(baseline, 4),
        "ours_s_median": round(ours, 4),
        "ratio": round(ours / baseline, 3),
        "extra_s": round(ours - baseline, 4),
        "imported_by_our_lookup": imported.split(),
    }))


if __name__ == "__main__":
    main()
