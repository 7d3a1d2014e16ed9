"""Eager vs ``torch.compile`` (issue 20's measure): one training-mode forward + backward of every
registered network, as a ratio measured in one run on one device.

Per network (``nnunet_ext.architectures.NETWORKS``): the small variant of
``tests/small_networks.py`` on its small input (default; a CPU measures it in seconds), or with
``--paper`` the paper network on its paper patch, batch 2 (for a GPU). The compiled arm is
``torch.compile(network)`` with nnU-Net's choice of backend (inductor, the default) or ``--backend``;
its first call (compilation, with an empty inductor cache: a fresh ``TORCHINDUCTOR_CACHE_DIR`` unless
``--warm-cache``) is timed separately and not counted in the steps. Both arms run in alternation,
best of ``--repeats`` rounds of ``--steps`` steps each, so that other load on a shared machine hits
them alike. Times: on a CPU the CPU time of this process (``--clock cpu``, the default there; with
``--threads 1`` other jobs on a shared machine change it little), elapsed time on CUDA (``--clock
wall``). The 1-minute load average before and after is in the JSON. Graph breaks are counted with
``torch._dynamo.explain``.

Usage: ``python benchmarks/compile_cost.py [--device cpu|cuda] [--paper] [--networks CoTr ...]
[--repeats 3] [--steps 3] [--threads 1] [--clock cpu|wall] [--backend inductor] [--warm-cache]
[--json out.json]``. Prints a markdown table and
one JSON line. Runs unchanged on CUDA (default device there), with autocast as nnU-Net trains.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from nnunet_ext.architectures import NETWORKS, paper_network

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the small variants are test code, not in the wheel
from small_networks import PAPER_INPUT_SHAPES, PAPER_TASKS, small_network  # noqa: E402


def tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in tensors(item)]


def build(name: str, conventions: str, paper: bool, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The network in training mode on ``device``, its task set, and an input for it."""
    if paper:
        network = paper_network(name, conventions)
        if name in PAPER_TASKS:
            network.set_task(PAPER_TASKS[name])
        x = torch.randn(PAPER_INPUT_SHAPES[name])
    else:
        network, x = small_network(name, conventions)
    return network.to(device).train(), x.to(device)


def step_function(network: torch.nn.Module, run: Callable, x: torch.Tensor) -> Callable[[], None]:
    """One forward (``run``: the network or its compiled form) and backward of the outputs' mean."""
    autocast = torch.autocast(x.device.type, enabled=x.device.type == "cuda")  # as nnU-Net trains

    def step() -> None:
        with autocast:
            loss = sum(o.float().mean() for o in tensors(run(x)))
        network.zero_grad(set_to_none=True)
        loss.backward()

    return step


#: ``wall``: elapsed time; ``cpu``: CPU time of this process, all threads (CPU devices only)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(step: Callable[[], None], device: torch.device, steps: int, clock: str = "wall") -> float:
    """Seconds per step over ``steps`` steps on ``clock``."""
    now = CLOCKS[clock]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = now()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (now() - start) / steps


def alternating_best(arms: dict[str, Callable[[], None]], device: torch.device, repeats: int,
                     steps: int, clock: str = "wall") -> dict[str, float]:
    """Best seconds per step of each arm, the arms measured in turn in every round."""
    best = {name: float("inf") for name in arms}
    for _ in range(repeats):
        for name, step in arms.items():
            best[name] = min(best[name], timed(step, device, steps, clock))
    return best


def graph_breaks(network: torch.nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(network)(x).graph_break_count


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One network's row; a network that fails to compile is a row with the error, not a crash."""
    try:
        return _measure(name, args, device)
    except Exception as error:  # noqa: BLE001 - e.g. BackendCompilerFailed: reported in the table
        message = str(error).strip().splitlines()
        return {"network": name, "error": f"{type(error).__name__}: {message[0][:200] if message else ''}"}


def _measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    eager, x = build(name, "default", args.paper, device)
    breaks = graph_breaks(copy.deepcopy(eager), x)
    torch._dynamo.reset()
    compiled_network = copy.deepcopy(eager)
    compiled = step_function(compiled_network, torch.compile(compiled_network, backend=args.backend), x)
    start = time.perf_counter()
    compiled()  # compiles forward and backward
    compile_seconds = time.perf_counter() - start
    step_eager = step_function(eager, eager, x)
    step_eager()  # warm-up
    best = alternating_best({"eager": step_eager, "compiled": compiled}, device, args.repeats, args.steps,
                            args.clock)
    return {"network": name, "input": list(x.shape), "graph_breaks": breaks, "compile_s": round(compile_seconds, 2),
            "eager_s": best["eager"], "compiled_s": best["compiled"],
            "speed-up": round(best["eager"] / best["compiled"], 3)}


def common_arguments(parser: argparse.ArgumentParser, networks: list[str]) -> None:
    """The options of this benchmark and of ``conventions_cost.py``."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paper", action="store_true", help="paper networks on their paper patch (GPU)")
    parser.add_argument("--networks", nargs="+", default=networks, choices=networks)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--clock", default=None, choices=list(CLOCKS),
                        help="cpu: CPU time of this process (default on a CPU); wall: elapsed time (CUDA)")
    parser.add_argument("--json", type=Path, default=None)


def parse_and_measure(parser: argparse.ArgumentParser, measure: Callable,
                      prepare: Callable[[argparse.Namespace], None] | None = None,
                      ) -> tuple[argparse.Namespace, torch.device, list[dict]]:
    """Parse the options, ``prepare(args)`` if given, and run ``measure(name, args, device)`` for every
    network asked for."""
    args = parser.parse_args()
    if prepare is not None:
        prepare(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock is None:
        args.clock = "cpu" if device.type == "cpu" else "wall"
    elif args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU time, not GPU time: use --clock wall on CUDA")
    args.load_average_start = _load_average()
    return args, device, [measure(name, args, device) for name in args.networks]


def _load_average() -> float | None:
    """The machine's 1-minute load average (other jobs share a CPU: reported next to the times)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def report(args: argparse.Namespace, device: torch.device, header: str, lines: list[str], rows: list[dict],
           **extra) -> None:
    """Print the markdown table and the JSON line; write the JSON to ``--json``."""
    columns = header.count("|") - 1
    print("\n".join([header, "|" + "---|" * columns, *lines]))
    result = {"device": str(device), "paper": args.paper, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "clock": args.clock,
              "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "load_average": {"start": getattr(args, "load_average_start", None), "end": _load_average()},
              **extra, "networks": rows}
    print(json.dumps(result))
    if args.json:
        from nnunet_ext.atomic_io import write_json

        write_json(args.json, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, list(NETWORKS))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep inductor's cache (default: a fresh one, so that compile (s) is a cold compile)")
    with tempfile.TemporaryDirectory(prefix="compile-cost-inductor-") as cache:
        def fresh_cache(args: argparse.Namespace) -> None:
            if not args.warm_cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles

        args, device, rows = parse_and_measure(parser, measure, fresh_cache)
    lines = [f"| {r['network']} | {'x'.join(map(str, r['input']))} | {r['graph_breaks']} | {r['compile_s']} | "
             f"{r['eager_s']:.4f} | {r['compiled_s']:.4f} | {r['speed-up']} |" if "error" not in r else
             f"| {r['network']} | - | - | - | - | - | {r['error'].replace('|', '/')} |" for r in rows]
    report(args, device, "| network | input | graph breaks | compile (s) | eager (s/step) | compiled (s/step) | "
           "speed-up |", lines, rows, backend=args.backend)


if __name__ == "__main__":
    main()
