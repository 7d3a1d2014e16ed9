"""Default vs official conventions (issue 17's benchmark): training-mode forward + backward time and
peak memory of every network that has an official convention, as ratios measured in one run.

The networks whose registry entry sets ``official_kwargs`` (UniSeg and BA-Net: ``conventions``, the
nnU-Net v1 decoder kernels and bias-free heads; CoTr and TransDoDNet: ``axis_order``, the deformable
sampling order); the others are one network in both conventions. Each on the small variant of
``nnunet_ext.testing.networks`` (default) or, with ``--paper``, the paper network on its paper patch,
batch 2 (for a GPU).

* time: both conventions in alternation, best of ``--repeats`` rounds of ``--steps`` steps
  (``benchmarks/compile_cost.py``'s timing, eager);
* peak memory: CUDA ``max_memory_allocated`` over one step after a warm-up; on a CPU, which has no such
  counter, the peak resident memory growth of a process that builds the network and runs the steps
  (``benchmarks/step_timing.py``: one spawned process per network and convention; a training step
  there includes an SGD update, the same in both conventions).

Usage: ``python benchmarks/conventions_cost.py [--device cpu|cuda] [--paper] [--repeats 3] [--steps 3]
[--json out.json]``. Prints a markdown table (official / default ratios) and one JSON line.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from nnunet_ext.registry import paper_networks

sys.path.insert(0, str(Path(__file__).parent))
from compile_cost import (alternating_best, build, common_arguments, parse_and_measure, report,  # noqa: E402
                          step_function, tensors)
from step_timing import measure_training_step  # noqa: E402

CONVENTIONS = ("default", "official")


def built_network(name: str, conventions: str, paper: bool) -> torch.nn.Module:
    """For step_timing's processes (picklable through functools.partial): the network only."""
    return build(name, conventions, paper, torch.device("cpu"))[0]


def outputs_mean(outputs, x) -> torch.Tensor:
    return sum(o.float().mean() for o in tensors(outputs))


def make_outputs_mean():
    return outputs_mean


def peak_memory_gb(name: str, conventions: str, args: argparse.Namespace, device: torch.device) -> float:
    if device.type == "cuda":
        network, x = build(name, conventions, args.paper, device)
        step = step_function(network, network, x)
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 1024 ** 3
    _, x = build(name, conventions, args.paper, device)
    result = measure_training_step(functools.partial(built_network, name, conventions, args.paper), tuple(x.shape),
                                   "cpu", args.steps, make_outputs_mean)
    return result["peak_rss_growth_gb"]


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    steps, networks = {}, {}
    for conventions in CONVENTIONS:
        network, x = build(name, conventions, args.paper, device)
        networks[conventions] = network
        steps[conventions] = step_function(network, network, x)
        steps[conventions]()  # warm-up
    best = alternating_best(steps, device, args.repeats, args.steps)
    del networks, steps
    memory = {c: peak_memory_gb(name, c, args, device) for c in CONVENTIONS}
    return {"network": name, "official_kwargs": dict(paper_networks()[name].official_kwargs),
            "default_s": best["default"], "official_s": best["official"],
            "time_ratio": round(best["official"] / best["default"], 3),
            "default_peak_gb": round(memory["default"], 4), "official_peak_gb": round(memory["official"], 4),
            "memory_ratio": round(memory["official"] / memory["default"], 3) if memory["default"] > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, [name for name, entry in paper_networks().items() if entry.official_kwargs])
    args, device, rows = parse_and_measure(parser, measure)
    lines = [f"| {r['network']} | {', '.join(f'{k}={v}' for k, v in r['official_kwargs'].items())} | "
             f"{r['default_s']:.4f} | {r['official_s']:.4f} | {r['time_ratio']} | {r['default_peak_gb']} | "
             f"{r['official_peak_gb']} | {r['memory_ratio']} |" for r in rows]
    report(args, device, "| network | switch | default (s/step) | official (s/step) | time official/default | "
           "peak default (GB) | peak official (GB) | memory official/default |", lines, rows)


if __name__ == "__main__":
    main()
