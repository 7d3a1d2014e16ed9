"""Training iteration time and peak memory of whole nnU-Net trainers on the same plans, one run.

Unlike the network benchmarks (``step_timing.py``: a bare network with a stand-in loss), this runs
each trainer exactly as ``nnUNetv2_train`` builds it: ``on_train_start()`` (network, loss, optimiser,
data loaders from the plans), then ``train_step(batch)`` on batches from the trainer's own loader.
So what is timed is the method's real iteration: UniSeg's prompt and partial-label loss, DoDNet's
dynamic heads and sigmoid coding, LeFeD's three optimiser steps per batch, MC-Net+'s labelled +
unlabelled patches. Data loading and augmentation are not timed (``nnUNet_n_proc_DA=0``: batches
are made in the measuring process, between the timed steps); nnU-Net hides them behind background
workers in real training.

Times: all trainers of a suite live in one spawned process and take turns, one step each per
round, so a change of machine load during the run touches them alike (the first round is
warm-up); the median per trainer is reported. Memory: each trainer alone in a fresh spawned
process for a few steps: on a CPU that process's peak resident memory growth over its state after
``on_train_start`` (``ru_maxrss``), on a GPU ``torch.cuda.max_memory_allocated``.

Suites (each makes its synthetic dataset and plans in a temporary folder with the stock commands):

* ``universal`` (issue: DoDNet/TransDoDNet): the merged partially labelled family (1/2/4 channels),
  nnUNetTrainer vs UniSegTrainer vs DoDNetTrainer vs TransDoDNetTrainer on its nnUNetPlans.
* ``semi`` (issue: MC-Net+/LeFeD): the synthetic dataset with ``imagesUnlabeled``, nnUNetTrainer vs
  MCNetPlusTrainer vs LeFeDTrainer on its nnUNetPlans (their batches carry labelled + unlabelled
  patches, 2 + 2 by default, so the report gives seconds per patch too).

Usage: ``python benchmarks/trainer_steps.py --suite universal [--steps 8] [--device cpu]
[--patch 32 64 64]``.
Prints one JSON line; ratios are against the first trainer of the suite (stock nnUNetTrainer).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

SUITES = {
    "universal": ["nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer",
                  "nnunet_ext.trainers.uniseg:UniSegTrainer",
                  "nnunet_ext.trainers.dodnet:DoDNetTrainer",
                  "nnunet_ext.trainers.transdodnet:TransDoDNetTrainer"],
    "semi": ["nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer",
             "nnunet_ext.trainers.mcnet:MCNetPlusTrainer",
             "nnunet_ext.trainers.lefed:LeFeDTrainer"],
}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # kB on Linux


def _import(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _batch_patches(batch: dict) -> int:
    return int(batch["data"].shape[0])


def _start_trainer(trainer_path: str, dataset_folder: str, configuration: str, device: str,
                   patch_size: list[int] | None):
    """A trainer as ``nnUNetv2_train`` makes it, after ``on_train_start`` and the first epoch's start."""
    import torch

    from nnunet_ext import compat

    preprocessed = Path(dataset_folder)
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    if patch_size:  # same override for every trainer, so the comparison stays on one set of plans
        plans["configurations"][configuration]["patch_size"] = list(patch_size)
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = compat.instantiate_trainer(_import(trainer_path), plans, configuration, 0, dataset_json,
                                         torch.device(device))
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return trainer


def _timed_step(trainer) -> tuple[float, int]:
    """Seconds of one ``train_step`` (the batch is made before the clock starts) and its patch count."""
    import torch

    batch = next(trainer.dataloader_train)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    start = time.perf_counter()
    trainer.train_step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return time.perf_counter() - start, _batch_patches(batch)


def _child_setup(env: dict) -> None:
    os.environ.update(env)
    sys.stdout = open(os.devnull, "w")  # the trainers' logs go to their files; keep the JSON line alone
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "2")))


def _memory_of_trainer(trainer_path: str, env: dict, dataset_folder: str, configuration: str, device: str,
                       steps: int, patch_size: list[int] | None) -> dict:
    """Peak memory of a few steps of one trainer, alone in its process; plus its network's size."""
    _child_setup(env)
    import torch

    trainer = _start_trainer(trainer_path, dataset_folder, configuration, device, patch_size)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    rss_before = _peak_rss_gb()
    for _ in range(steps):
        _timed_step(trainer)
    result = {"patch_size": list(trainer.configuration_manager.patch_size), "network": type(trainer.network).__name__,
              "parameters": sum(p.numel() for p in trainer.network.parameters())}
    if trainer.device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(trainer.device) / 1024 ** 3, 3)
    else:
        result["peak_rss_growth_gb"] = round(_peak_rss_gb() - rss_before, 3)
    return result


def _interleaved_times(trainer_paths: list[str], env: dict, dataset_folder: str, configuration: str, device: str,
                       steps: int, patch_size: list[int] | None) -> dict:
    """Median step time of every trainer, measured round-robin (one step of each per round) in one
    process, so a change of machine load during the run touches all trainers alike."""
    _child_setup(env)
    trainers = {path: _start_trainer(path, dataset_folder, configuration, device, patch_size) for path in trainer_paths}
    times = {path: [] for path in trainer_paths}
    patches = {path: 0 for path in trainer_paths}
    for round_index in range(steps + 1):  # round 0 is warm-up
        for path, trainer in trainers.items():
            seconds, count = _timed_step(trainer)
            if round_index:
                times[path].append(seconds)
                patches[path] = max(patches[path], count)
    result = {}
    for path in trainer_paths:
        seconds = sorted(times[path])[len(times[path]) // 2]
        result[path] = {"seconds_per_iteration": round(seconds, 4), "patches_per_iteration": patches[path],
                        "seconds_per_patch": round(seconds / patches[path], 4)}
    return result


def _child(queue, function, *arguments) -> None:
    try:
        queue.put(function(*arguments))
    except Exception as error:  # reported by the parent
        import traceback

        queue.put({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]})


def _in_spawned_process(function, *arguments):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, *arguments))
    process.start()
    result = queue.get()
    process.join()
    if isinstance(result, dict) and "error" in result:
        raise RuntimeError(f"{function.__name__}{arguments[:1]}: {result['error']}\n{result['traceback']}")
    return result


def measure_trainers(trainer_paths: list[str], env: dict, dataset_folder: Path, configuration: str = "3d_fullres",
                     device: str = "cpu", steps: int = 8, patch_size: list[int] | None = None,
                     memory_steps: int = 3) -> dict:
    """Per trainer: median seconds per ``train_step`` (round-robin, one process) and peak memory (one
    fresh process per trainer, ``memory_steps`` steps), keyed by class name."""
    times = _in_spawned_process(_interleaved_times, trainer_paths, env, str(dataset_folder), configuration, device,
                                steps, patch_size)
    results = {}
    for path in trainer_paths:
        memory = _in_spawned_process(_memory_of_trainer, path, env, str(dataset_folder), configuration, device,
                                     memory_steps, patch_size)
        results[path.split(":")[1]] = {**times[path], **memory}
    return results


def _universal_root(folder: str):
    from nnunet_ext.testing.harness import make_universal_root, plan_and_preprocess

    root = make_universal_root(folder)
    plan_and_preprocess(root)
    return root


def _semi_root(folder: str):
    from nnunet_ext.datasets.unlabeled import write_unlabeled_images
    from nnunet_ext.testing.harness import HARNESS_SPEC, make_nnunet_root, plan_and_preprocess, run_stock

    root = make_nnunet_root(folder, 995, "TrainerStepsSemi")
    write_unlabeled_images(root.raw, root.dataset_id, "TrainerStepsSemi", HARNESS_SPEC, 4)
    plan_and_preprocess(root)
    run_stock(["nnunet-ext", "preprocess-unlabeled", "-d", root.dataset_id, "-c", "3d_fullres", "-np", 1],
              root.env())
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--steps", type=int, default=8, help="timed iterations per trainer (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--patch", type=int, nargs="+", default=None,
                        help="patch size for every trainer instead of the plans' (e.g. 32 64 64); it must suit "
                             "the plans' strides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = _universal_root(folder) if args.suite == "universal" else _semi_root(folder)
        env = {key: value for key, value in root.env(epochs=1000, iterations=250).items()
               if key.startswith(("nnUNet", "NNUNET_EXT", "OMP"))}
        env["nnUNet_n_proc_DA"] = "0"  # batches made in the measuring process, outside the timed step
        results = measure_trainers(SUITES[args.suite], env, root.preprocessed / root.dataset_name,
                                   device=args.device, steps=args.steps, patch_size=args.patch)
    baseline_name = SUITES[args.suite][0].split(":")[1]
    baseline = results[baseline_name]
    memory_key = "peak_memory_gb" if args.device.startswith("cuda") else "peak_rss_growth_gb"
    for result in results.values():
        result["time_ratio_vs_nnUNetTrainer"] = round(result["seconds_per_iteration"] /
                                                      baseline["seconds_per_iteration"], 3)
        result["time_per_patch_ratio_vs_nnUNetTrainer"] = round(result["seconds_per_patch"] /
                                                                baseline["seconds_per_patch"], 3)
        if baseline.get(memory_key):
            result["memory_ratio_vs_nnUNetTrainer"] = round(result[memory_key] / baseline[memory_key], 3)
    print(json.dumps({"benchmark": f"trainer_steps_{args.suite}", "device": args.device, "steps": args.steps,
                      "patch_override": args.patch,
                      "baseline": baseline_name, "results": results}))


if __name__ == "__main__":
    main()
