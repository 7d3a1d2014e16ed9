"""The measurements of the benchmark suite (``benchmarks/suite.py``), run in a fresh process each.

Every function here builds its trainers or predictors with nnU-Net's own entry points (a trainer as
``nnUNetv2_train`` creates it, then ``on_train_start``; nnU-Net's predictor initialised from a model
folder, as ``nnUNetv2_predict`` does) and returns a plain dict (JSON-ready). A failure of one trainer
(including a failing ``torch.compile``) is recorded in its entry as ``error``; the others go on.

:func:`run` executes a function in a child process started by a forkserver that has imported torch,
nnU-Net and the trainers once (so a child costs no imports), or inline for the tests.
"""
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compile_cost import timed as timed_steps  # noqa: E402
from trainer_steps import _child, _child_setup, _peak_rss_gb  # noqa: E402

from nnunet_ext import compat  # noqa: E402
from nnunet_ext.registry import import_object  # noqa: E402

CHECKPOINT = "checkpoint_final.pth"


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


# --- processes ---------------------------------------------------------------------------------

def _child_main(queue, env: dict, function: Callable, arguments: tuple) -> None:
    _child_setup(env)  # environment, stdout to /dev/null (trainer logs go to their files), threads
    _child(queue, function, *arguments)


@contextlib.contextmanager
def _environment(env: dict):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(function: Callable, arguments: tuple, env: dict, inline: bool = False, preload: tuple[str, ...] = ()) -> Any:
    """``function(*arguments)`` with ``env`` set: in a fresh forkserver child (default), or in this process.

    A child that dies (segfault, out of memory) gives ``{"error": ...}`` instead of hanging the suite.
    """
    if inline:
        with _environment(env):
            return function(*arguments)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([Path(__file__).stem, *preload])
    queue = context.Queue()
    process = context.Process(target=_child_main, args=(queue, env, function, arguments))
    process.start()
    while True:
        try:
            result = queue.get(timeout=2)
            break
        except queue_module.Empty:
            if not process.is_alive():
                try:
                    result = queue.get(timeout=2)
                except queue_module.Empty:
                    result = {"error": f"the measuring process died (exit code {process.exitcode})"}
                break
    process.join()
    return result


# --- trainers ----------------------------------------------------------------------------------

def _late(deadline: float | None) -> bool:
    """Past ``deadline`` (``time.time()``)? A trainer that has compiled and warmed up before it still gets
    its first measured round."""
    return deadline is not None and time.time() > deadline


def timed(function: Callable[[], Any], device: torch.device, clock: str) -> float:
    """Seconds of one ``function()`` call on ``clock``: ``compile_cost``'s clocks and timing (``wall``
    elapsed time, after synchronising CUDA; ``cpu`` the CPU time of the measuring process, all its
    threads, which other jobs on a shared machine change little when the process runs one thread)."""
    return timed_steps(function, device, 1, clock)


def timed_step(trainer, clock: str) -> tuple[float, int]:
    """Seconds of one ``train_step`` (its batch is made before the clock starts) and its patch count."""
    batch = next(trainer.dataloader_train)
    return timed(lambda: trainer.train_step(batch), trainer.device, clock), int(batch["data"].shape[0])


def _compile_switch(trainer) -> str:
    """Turn nnU-Net's compile switch on for ``trainer`` (``nnUNet_compile=t`` is in the environment);
    returns how: ``nnU-Net`` (its own rule compiles, e.g. on CUDA), ``forced on CPU`` (only nnU-Net's rule
    "no compile on a CPU" said no: the trainer's ``_do_i_compile`` is nnU-Net's, so the benchmark says yes
    for it) or ``disabled by the trainer`` (the method trainer overrides ``_do_i_compile`` and says no)."""
    if trainer._do_i_compile():
        return "nnU-Net"
    if trainer.device.type == "cpu" and type(trainer)._do_i_compile is compat.base_trainer_class()._do_i_compile:
        trainer._do_i_compile = lambda: True
        return "forced on CPU"
    return "disabled by the trainer"


def start_trainer(trainer_path: str, dataset_folder: str, configuration: str, device: str, compiled: bool):
    """(trainer after ``on_train_start`` and the first epoch's start, how compile was switched or None)."""
    folder = Path(dataset_folder)
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = compat.instantiate_trainer(import_object(trainer_path), plans, configuration, 0, dataset_json,
                                         torch.device(device))
    how = _compile_switch(trainer) if compiled else None
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return trainer, how


def _is_compiled(trainer) -> bool:
    return compat.unwrapped_network(trainer) is not (trainer.network.module if trainer.is_ddp else trainer.network)


def _describe(trainer, how: str | None) -> dict:
    network = compat.unwrapped_network(trainer)
    return {"network": type(network).__name__, "parameters": sum(p.numel() for p in network.parameters()),
            "patch_size": [int(edge) for edge in trainer.configuration_manager.patch_size],
            "batch_size": int(trainer.batch_size), "compile": how, "compiled": _is_compiled(trainer)}


def train_epochs(trainer_paths: list[str], dataset_folder: str, configuration: str, device: str, iterations: int,
                 rounds: int, compiled: bool, deadline: float | None, save_models: bool, clock: str = "wall") -> dict:
    """Seconds per training epoch of ``iterations`` ``train_step`` calls for every trainer, in one process.

    First a warm-up epoch of every trainer (under compile it includes compiling: reported as
    ``first_epoch_s``). Then ``rounds`` x ``iterations`` measured steps in which the trainers take
    turns step by step, so that a change of machine load touches them alike; ``epoch_s`` is the
    median step times ``iterations`` (a median over many steps is robust to a burst of other load,
    which a single epoch per trainer is not). Times on ``clock`` (``compile_cost.CLOCKS``). Batches come from
    each trainer's own loader and are made before the clock starts (``nnUNet_n_proc_DA=0``; nnU-Net
    hides data loading behind background workers in real training). After ``deadline``
    (``time.time()``) no trainer starts its warm-up, and no step starts once every trainer has one
    epoch's worth of measured steps. With ``save_models`` every trainer then writes
    ``checkpoint_final.pth`` into its own fold folder (nnU-Net's ``save_checkpoint``), making a model
    folder for the inference measurements.
    """
    results: dict[str, dict] = {path: {} for path in trainer_paths}
    trainers = {}
    for path in trainer_paths:
        try:
            trainer, how = start_trainer(path, dataset_folder, configuration, device, compiled)
        except Exception as error:  # noqa: BLE001 - reported in the table
            results[path] = {"error": one_line(error)}
            continue
        results[path] = _describe(trainer, how)
        if compiled and not results[path]["compiled"]:
            results[path]["skipped"] = f"compile {how}"
            continue
        trainers[path] = trainer

    def step(path: str) -> float | None:
        """One step of ``path``'s trainer; None (and the trainer dropped) if it fails."""
        try:
            seconds, patches = timed_step(trainers[path], clock)
        except Exception as error:  # noqa: BLE001 - e.g. a compile failure at the first step
            results[path] = {**results[path], "error": one_line(error)}
            del trainers[path]
            return None
        results[path]["patches_per_iteration"] = patches
        return seconds

    for path in list(trainers):  # warm-up epoch
        if _late(deadline):
            results[path]["skipped"] = "training: time limit reached"
            del trainers[path]
            continue
        seconds = [step(path) for _ in range(iterations) if path in trainers]
        if path in trainers:
            results[path]["first_epoch_s"] = round(sum(seconds), 4)
    steps: dict[str, list[float]] = {path: [] for path in trainers}
    for _ in range(rounds * iterations):
        if _late(deadline) and all(len(steps[path]) >= iterations for path in trainers):
            break
        for path in list(trainers):
            seconds = step(path)
            if seconds is not None:
                steps[path].append(seconds)
    for path, trainer in trainers.items():
        if steps[path]:
            median = statistics.median(steps[path])
            results[path].update(epoch_s=round(median * iterations, 4), iteration_s=round(median, 4),
                                 measured_steps=len(steps[path]))
        if save_models:
            try:
                trainer.save_checkpoint(os.path.join(trainer.output_folder, CHECKPOINT))
                results[path]["model_folder"] = str(trainer.output_folder_base)
            except Exception as error:  # noqa: BLE001
                results[path]["error"] = f"saving the model: {one_line(error)}"
    return results


def peak_memory(trainer_path: str, dataset_folder: str, configuration: str, device: str, steps: int,
                compiled: bool) -> dict:
    """Peak memory of ``steps`` training iterations of one trainer, alone in its process: on CUDA
    ``torch.cuda.max_memory_allocated`` (parameters, optimiser state and activations); on a CPU the
    growth of the process's peak resident memory (``ru_maxrss``) over its state after ``on_train_start``."""
    try:
        trainer, how = start_trainer(trainer_path, dataset_folder, configuration, device, compiled)
    except Exception as error:  # noqa: BLE001
        return {"error": one_line(error)}
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    rss_before = _peak_rss_gb()
    try:
        for _ in range(steps):
            timed_step(trainer, "wall")
    except Exception as error:  # noqa: BLE001
        return {"error": one_line(error)}
    if trainer.device.type == "cuda":
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(trainer.device) / 1024 ** 3, 4),
                "memory_measure": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_gb": round(_peak_rss_gb() - rss_before, 4),
            "memory_measure": "peak RSS growth (ru_maxrss) over the state after on_train_start"}


# --- inference ---------------------------------------------------------------------------------

def _task_setter(predictor, model_folder: str):
    """For a task-conditioned model: a function case id -> set the network's task to the case's own (the
    task its case prefix names), as ``nnunet-ext predict --task`` does; None for other models."""
    from nnunet_ext.tasks.task_map import TaskMap

    network = getattr(predictor.network, "_orig_mod", predictor.network)
    if not hasattr(network, "set_task"):
        return None
    task_map = TaskMap.from_dataset_json(Path(model_folder) / "dataset.json")
    return lambda case: network.set_task(task_map.task_of_case(case).task_id)


def patch_gflop(predictor, set_task, case: str) -> float | None:
    """GFLOP of one sliding-window step of ``predictor``'s network (batch 1, one patch, as the predictor
    runs it: eval mode, no deep supervision; task of ``case``), counted by PyTorch's FlopCounterMode
    (convolutions and matrix products; not e.g. ``grid_sample``). Independent of the machine's load;
    None if it cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    network = getattr(predictor.network, "_orig_mod", predictor.network)
    try:
        if set_task is not None:
            set_task(case)
        patch = [int(edge) for edge in predictor.configuration_manager.patch_size]
        channels = len(predictor.dataset_json["channel_names"])
        parameter = next(network.parameters())
        # with autograd on: FlopCounterMode's module tracker fails without it on modules that take
        # parameters as inputs (TransDoDNet's queries); nothing is run backward
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            network(torch.zeros((1, channels, *patch), device=parameter.device, dtype=parameter.dtype))
        return round(counter.get_total_flops() / 1e9, 4)
    except Exception:  # noqa: BLE001 - a figure we cannot count is left out, not an error
        return None


def predict_cases(models: dict[str, str], cases: dict[str, list[str]], output_folder: str, device: str, rounds: int,
                  mirroring: bool, deadline: float | None, clock: str = "wall") -> dict:
    """Seconds per case of nnU-Net's prediction for every model, in one process.

    Per model (trainer import path -> model folder): nnU-Net's predictor configured as
    ``nnUNetv2_predict`` configures it (step 0.5, Gaussian weighting, mirroring unless switched off,
    fold 0, ``checkpoint_final.pth``; ``nnUNet_compile`` from the environment, read by nnU-Net), then per
    case (case id -> image files) ``predict_from_files_sequential``: nnU-Net's preprocessing, sliding
    window, export and writing, in this process. Task-conditioned models predict each case as its own
    task. Model loading is not timed. Models take turns per round; round 0 is warm-up (and compiles);
    the median of the other rounds is reported; times on ``clock`` (``compile_cost.CLOCKS``); after ``deadline``
    (``time.time()``) no model starts its warm-up or a round after its first measured one.
    """
    results: dict[str, dict] = {}
    predictors = {}
    for path, folder in models.items():
        try:
            predictor = compat.predictor(0.5, mirroring, torch.device(device))
            predictor.allow_tqdm = False
            predictor.initialize_from_trained_model_folder(folder, (0,), checkpoint_name=CHECKPOINT)
            predictors[path] = (predictor, _task_setter(predictor, folder))
            results[path] = {"predict_gflop_per_patch": patch_gflop(predictor, predictors[path][1], next(iter(cases)))}
        except Exception as error:  # noqa: BLE001
            results[path] = {"error": one_line(error)}
    times: dict[str, list[float]] = {path: [] for path in predictors}
    for round_index in range(rounds + 1):
        for index, (path, (predictor, set_task)) in enumerate(list(predictors.items())):
            if _late(deadline) and (round_index == 0 or times[path]):
                if round_index == 0:
                    results[path]["skipped"] = "inference: time limit reached"
                    del predictors[path]
                continue
            target = Path(output_folder) / f"model{index}"
            target.mkdir(parents=True, exist_ok=True)
            try:
                seconds = 0.0
                for case, files in cases.items():
                    if set_task is not None:
                        set_task(case)
                    seconds += timed(functools.partial(predictor.predict_from_files_sequential, [files],
                                                       [str(target / case)], False, True, None),
                                     predictor.device, clock)
            except Exception as error:  # noqa: BLE001
                results[path]["error"] = one_line(error)
                del predictors[path]
                continue
            if round_index == 0:
                results[path]["first_round_s_per_case"] = round(seconds / len(cases), 4)
            else:
                times[path].append(seconds / len(cases))
    for path in predictors:
        if times[path]:
            results[path].update(predict_s_per_case=round(statistics.median(times[path]), 4),
                                 cases=len(cases), task_conditioned=predictors[path][1] is not None)
    return results
