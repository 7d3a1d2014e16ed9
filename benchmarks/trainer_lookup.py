"""What nnU-Net's trainer lookup costs for one of our trainers vs for its own ``nnUNetTrainer``.

``nnUNetv2_train -tr NAME`` starts by ``recursive_find_trainer_class_by_name(NAME)``: nnU-Net walks
its own trainer tree first and, for a name it does not ship, then the folders in
``nnUNet_extTrainer`` (our discovery folder, whose module imports the asked trainer's method module
only, through the registry). This script runs that lookup in a fresh interpreter per run (the
whole process: start-up, imports, lookup), alternating between the two names so that a change of
machine load touches both alike, and reports the median wall time of each and their ratio, plus
which of our trainer modules (and whether ``segment_anything``) the lookup of our trainer imported.

A third name separates what nnunet-ext adds from what nnU-Net's lookup costs for ANY trainer it
does not ship: for such a name nnU-Net imports every module of its own trainer tree (its variants,
and with them timm, torchvision, ...) before it reads ``nnUNet_extTrainer``, whereas
``nnUNetTrainer`` is found in the first module. ``MinimalExternalTrainer`` is a user's one-class
trainer in a folder of its own named in ``nnUNet_extTrainer``: the same walk, nothing of ours.
``ratio`` (ours / nnUNetTrainer) is the issue's measure; ``ratio_vs_minimal_external`` (ours / that
trainer) is nnunet-ext's own share.

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
          "print(' '.join(sorted(m for m in sys.modules if m == 'segment_anything' "
          "or m.startswith('nnunet_ext.trainers.'))))\n")


MINIMAL_EXTERNAL = "MinimalExternalTrainer"
MINIMAL_MODULE = ("from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n\n\n"
                  f"class {MINIMAL_EXTERNAL}(nnUNetTrainer):\n    pass\n")


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
        user_folder = os.path.join(folder, "user_trainers")
        os.makedirs(user_folder)
        with open(os.path.join(user_folder, "minimal_external_trainer.py"), "w") as file:
            file.write(MINIMAL_MODULE)
        envs = {"nnUNetTrainer": env, args.trainer: env,
                MINIMAL_EXTERNAL: {**env, "nnUNet_extTrainer": user_folder}}
        times: dict[str, list[float]] = {name: [] for name in envs}
        imported = ""
        for name in times:  # warm-up: file system caches, .pyc files
            run_once(name, envs[name])
        for _ in range(args.runs):
            for name in times:
                seconds, modules = run_once(name, envs[name])
                times[name].append(seconds)
                if name == args.trainer:
                    imported = modules
    baseline = statistics.median(times["nnUNetTrainer"])
    ours = statistics.median(times[args.trainer])
    minimal = statistics.median(times[MINIMAL_EXTERNAL])
    print(json.dumps({
        "benchmark": "trainer_lookup",
        "trainer": args.trainer,
        "runs": args.runs,
        "nnUNetTrainer_s_median": round(baseline, 4),
        "minimal_external_s_median": round(minimal, 4),
        "ours_s_median": round(ours, 4),
        "ratio": round(ours / baseline, 3),
        "extra_s": round(ours - baseline, 4),
        "ratio_vs_minimal_external": round(ours / minimal, 3),
        "extra_vs_minimal_external_s": round(ours - minimal, 4),
        "imported_by_our_lookup": imported.split(),
    }))


if __name__ == "__main__":
    main()
