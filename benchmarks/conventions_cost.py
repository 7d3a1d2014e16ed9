"""Default vs official conventions (issue 17's benchmark): training-mode forward + backward time and
peak memory of every network that has an official convention, as ratios measured in one run.

The networks whose registry entry sets ``official_kwargs`` (UniSeg and BA-Net: ``conventions``, the
nnU-Net v1 decoder kernels and bias-free heads; ClassSAM: ``conventions``, SurgicalSAM's preprocessing
with PIL's uint8 resize on the CPU; CoTr and TransDoDNet: ``axis_order``, the deformable sampling
order); the others are one network in both conventions. Each on the small variant of
``tests/small_networks.py`` (default) or, with ``--paper``, the paper network on its paper patch,
batch 2 (for a GPU).

* time: both conventions in alternation, best of ``--repeats`` rounds of ``--steps`` steps
  (``benchmarks/compile_cost.py``'s timing, eager), and the FLOPs of a step (PyTorch's counter), which
  other load on the machine does not change;
* peak memory of one step: CUDA ``max_memory_allocated`` above what was allocated before it; on a
  CPU, which has no such counter, the peak of the tensor memory the step allocates, counted at
  PyTorch's dispatcher (:class:`PeakTensorMemory`). Work outside PyTorch (ClassSAM's PIL resize)
  is in the time only, in neither FLOPs nor memory.

Usage: ``python benchmarks/conventions_cost.py [--device cpu|cuda] [--paper] [--repeats 3] [--steps 3]
[--json out.json]``. Prints a markdown table (official / default ratios) and one JSON line.
"""
from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nnunet_ext.registry import paper_networks

sys.path.insert(0, str(Path(__file__).parent))
from compile_cost import (alternating_best, build, common_arguments, parse_and_measure, report,  # noqa: E402
                          step_function)

CONVENTIONS = ("default", "official")


class PeakTensorMemory(TorchDispatchMode):
    """A CPU stand-in for ``torch.cuda.max_memory_allocated``: the peak bytes of tensor storage that the
    operations run under it allocate and keep alive (activations saved for backward, gradients,
    temporaries), counted at PyTorch's dispatcher. Memory from before (parameters, the input) and
    views or in-place results on it are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak, self._references = 0, 0, {}

    def _release(self, key: int, nbytes: int) -> None:
        self._references[key] -= 1
        if not self._references[key]:
            del self._references[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self._references:
                if key in inputs:
                    continue  # a view of, or in place on, memory from before
                self._references[key] = 0
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._references[key] += 1
            weakref.finalize(tensor, self._release, key, storage.nbytes())
        return out


def peak_memory_mb(step, device: torch.device) -> float:
    """Peak memory of one step (after the warm-up): CUDA's counter, or :class:`PeakTensorMemory`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 1024 ** 2
    with PeakTensorMemory() as counter:
        step()
    return counter.peak / 1024 ** 2


def step_flops(step) -> int:
    """Floating-point operations of one step (PyTorch's counter: convolutions and matrix products;
    the deformable sampling is not counted), independent of other load on the machine."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    steps, flops = {}, {}
    for conventions in CONVENTIONS:
        network, x = build(name, conventions, args.paper, device)
        steps[conventions] = step_function(network, network, x)
        flops[conventions] = step_flops(steps[conventions])  # also the warm-up
    best = alternating_best(steps, device, args.repeats, args.steps, args.clock)
    memory = {c: peak_memory_mb(steps[c], device) for c in CONVENTIONS}
    return {"network": name, "official_kwargs": dict(paper_networks()[name].official_kwargs),
            "default_s": best["default"], "official_s": best["official"],
            "time_ratio": round(best["official"] / best["default"], 3),
            "default_gflops": round(flops["default"] / 1e9, 4), "official_gflops": round(flops["official"] / 1e9, 4),
            "flops_ratio": round(flops["official"] / flops["default"], 3),
            "default_peak_mb": round(memory["default"], 2), "official_peak_mb": round(memory["official"], 2),
            "memory_ratio": round(memory["official"] / memory["default"], 3) if memory["default"] > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, [name for name, entry in paper_networks().items() if entry.official_kwargs])
    args, device, rows = parse_and_measure(parser, measure)
    lines = [f"| {r['network']} | {', '.join(f'{k}={v}' for k, v in r['official_kwargs'].items())} | "
             f"{r['default_s']:.4f} | {r['official_s']:.4f} | {r['time_ratio']} | {r['flops_ratio']} | "
             f"{r['default_peak_mb']} | {r['official_peak_mb']} | {r['memory_ratio']} |" for r in rows]
    report(args, device, "| network | switch | default (s/step) | official (s/step) | time official/default | "
           "FLOPs official/default | peak default (MB) | peak official (MB) | memory official/default |", lines, rows)


if __name__ == "__main__":
    main()
