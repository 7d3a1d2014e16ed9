"""Forward+backward+SGD-step timing and peak memory of a network, shared by the network benchmarks.

GPU peak memory comes from ``torch.cuda.max_memory_allocated``. A CPU has no such counter, so on
a CPU each measurement runs in its own spawned process and reports that process's peak resident
memory growth over its state right after building the network (``ru_maxrss``): one process per
network, so one network's peak does not hide the next one's.
"""
from __future__ import annotations

import multiprocessing
import resource
import time
from typing import Callable

import torch


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # kB on Linux


def _mean_of_outputs(outputs, x) -> torch.Tensor:
    return sum(o.float().mean() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs]))


def _measure_here(build: Callable[[], torch.nn.Module], input_shape, device: str, steps: int,
                  make_loss: Callable | None = None) -> dict:
    device = torch.device(device)
    network = build().to(device).train()
    optimiser = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(*input_shape, device=device)
    loss_fn = make_loss() if make_loss is not None else _mean_of_outputs
    autocast = torch.autocast(device.type, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_rss_gb()
    times = []
    for step in range(steps + 1):  # the first step is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            outputs = network(x)
            loss = loss_fn(outputs, x)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    result = {"seconds_per_step": sorted(times)[len(times) // 2],
              "parameters": sum(p.numel() for p in network.parameters())}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
    else:
        result["peak_rss_growth_gb"] = _peak_rss_gb() - rss_before
    return result


def _child(queue, build, input_shape, device, steps, make_loss):
    queue.put(_measure_here(build, input_shape, device, steps, make_loss))


def measure_training_step(build: Callable[[], torch.nn.Module], input_shape, device: str = "cpu",
                          steps: int = 5, make_loss: Callable | None = None) -> dict:
    """Median seconds per training step, parameter count and peak memory of ``build()``.

    ``make_loss()`` returns ``loss(outputs, x)`` (default: the mean of all outputs). ``build`` and
    ``make_loss`` must be picklable (module-level functions or ``functools.partial``) for CPU runs.
    """
    if torch.device(device).type == "cuda":
        return _measure_here(build, input_shape, device, steps, make_loss)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, build, tuple(input_shape), device, steps, make_loss))
    process.start()
    result = queue.get()
    process.join()
    return result


def memory_ratio(a: dict, b: dict) -> float | None:
    key = "peak_memory_gb" if "peak_memory_gb" in a else "peak_rss_growth_gb"
    return a[key] / b[key] if b.get(key) else None
