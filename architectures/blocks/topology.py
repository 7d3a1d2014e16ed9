"""Strides and sizes of a network's stages, and the rules that turn nnU-Net's plan strides into ours.

nnU-Net's plans give one stride per encoder stage (``arch_kwargs["strides"]``, the same numbers as
the configuration's ``pool_op_kernel_sizes``), the first normally all ones (the full-resolution
stage), the rest one downsampling step each, chosen for the patch and the spacing. Our networks
have the depth of their paper, so each takes a fixed number of steps from the plans:

* :func:`leading_strides` - the plans' first ``count`` stage strides, the stride-1 first stage
  included (DoDNet: a stem stage and four downsampling stages);
* :func:`downsampling_strides` - the steps after the plans' first stage (TransDoDNet's stem and
  layers, the V-Net's downsamplings of MC-Net+ and LeFeD);
* :func:`strided_stages` - CoTr's rule, which also skips steps that do not downsample.

Every rule keeps the patch divisible: its product is a sub-product of nnU-Net's strides, which
nnU-Net made the patch divisible by. Missing steps (plans shallower than the paper's network)
become stride 1: the stage keeps its resolution (and its parameters).
"""
from __future__ import annotations

from numbers import Integral
from typing import Sequence, Union

import numpy as np

StrideLike = Union[int, Sequence[int]]


def stride_dim(strides: Sequence[StrideLike], dim: int | None = None) -> int:
    """``dim`` if given, else the length of the first per-axis stride, else 3."""
    return dim or next((len(s) for s in strides if not isinstance(s, Integral)), 3)


def as_strides(strides: Sequence[StrideLike], dim: int | None = None) -> list[list[int]]:
    """Each stride as a list of ints per axis; an int ``s`` (nnU-Net's shorthand for an isotropic
    stride) becomes ``[s] * stride_dim(strides, dim)``."""
    dim = stride_dim(strides, dim)
    return [[int(s)] * dim if isinstance(s, Integral) else [int(v) for v in s] for s in strides]


def is_unit(stride: Sequence[int]) -> bool:
    """Whether a stride keeps the resolution on every axis."""
    return all(int(v) == 1 for v in stride)


def fit_strides(strides: Sequence[Sequence[int]], count: int, dim: int) -> list[list[int]]:
    """The first ``count`` strides, then stride-1 stages up to ``count``."""
    strides = [list(s) for s in strides[:count]]
    return strides + [[1] * dim for _ in range(count - len(strides))]


def total_stride(strides: Sequence[StrideLike]) -> tuple[int, ...]:
    """How much the deepest stage is downsampled: the product of the strides, per axis."""
    return tuple(int(v) for v in np.prod(np.asarray(as_strides(strides), dtype=np.int64), axis=0))


def cumulative_strides(strides: Sequence[StrideLike]) -> list[tuple[int, ...]]:
    """The downsampling after each stage: products of the first 1, 2, ... strides, per axis."""
    if len(strides) == 0:
        return []
    return [tuple(int(v) for v in row) for row in np.cumprod(np.asarray(as_strides(strides), dtype=np.int64), axis=0)]


def stage_sizes(size: Sequence[int], strides: Sequence[StrideLike]) -> list[list[int]]:
    """``size`` followed by the size after each stage (floor division by each stride in turn)."""
    sizes = [[int(s) for s in size]]
    for stride in as_strides(strides, len(sizes[0])):
        sizes.append([s // int(f) for s, f in zip(sizes[-1], stride)])
    return sizes


def divisibility_problem(size: Sequence[int], strides: Sequence[StrideLike]) -> str | None:
    """None if every axis of ``size`` is a multiple of the total stride; else the rest of a sentence
    that starts with the size ("... is not divisible ..."), naming the nearest valid sizes."""
    size, total = tuple(int(s) for s in size), total_stride(strides)
    if len(size) != len(total):
        return f"not {len(total)}D like the strides {as_strides(strides)}"
    if not any(s % t for s, t in zip(size, total)):
        return None
    lower = tuple(max(t, s // t * t) for s, t in zip(size, total))
    upper = tuple(-(-s // t) * t for s, t in zip(size, total))
    return (f"not divisible by the cumulative stride {total} of strides {as_strides(strides)}: every "
            f"axis must be a multiple of {total} (minimum {total}; nearest valid sizes {lower} or {upper})")


def bottleneck_size(size: Sequence[int], strides: Sequence[StrideLike], what: str = "patch_size") -> tuple[int, ...]:
    """``size // total_stride(strides)``; refuses a size that is not divisible (``what`` names it)."""
    problem = divisibility_problem(size, strides)
    if problem is not None:
        raise ValueError(f"{what} {list(size)} is {problem}")
    return tuple(int(s) // t for s, t in zip(size, total_stride(strides)))


# --- rules: plans -> a network of fixed depth ----------------------------------------------------------

def leading_strides(plan_strides: Sequence[StrideLike], count: int, dim: int = 3) -> list[list[int]]:
    """The plans' first ``count`` stage strides (their first stage included), padded with stride 1."""
    return fit_strides(as_strides(plan_strides, dim), count, dim)


def require_full_resolution_first(plan_strides: Sequence[StrideLike], network: str, dim: int | None = None) -> None:
    """Refuse plans whose first stage downsamples (or that have no stage): ``network`` keeps its
    first stage at full resolution and takes the steps after it."""
    strides = as_strides(plan_strides, dim)
    if not strides or not is_unit(strides[0]):
        first = strides[0] if strides else None
        raise ValueError(f"{network} keeps its first stage at full resolution: it needs nnU-Net plans strides "
                         f"starting with a stride-1 stage; the plans' first stride is {first} (strides "
                         f"{list(plan_strides)})")


def downsampling_strides(plan_strides: Sequence[StrideLike], count: int, dim: int | None = None,
                         pad: bool = True) -> list[list[int]]:
    """The plans' strides after their first stage, the first ``count`` of them; padded with stride 1
    to ``count`` (``pad``) or not (then at least one step is required)."""
    dim = stride_dim(plan_strides, dim)
    steps = as_strides(plan_strides, dim)[1:count + 1]
    if pad:
        return fit_strides(steps, count, dim)
    if not steps:
        raise ValueError(f"the plans' strides {list(plan_strides)} have no downsampling after the first stage; "
                         f"the network needs at least one")
    return steps


def strided_stages(plan_strides: Sequence[StrideLike], count: int, dim: int = 3) -> list[list[int]]:
    """CoTr's rule: ``count`` stage strides from the plans' downsampling steps (a stride-1 first stage
    and steps that do not downsample left out). With at least ``count`` steps, the first ``count``;
    with fewer, a full-resolution first stage, the steps, and stride-1 stages to fill."""
    steps = [s for s in as_strides(plan_strides, dim) if not is_unit(s)]
    if len(steps) >= count:
        return steps[:count]
    return fit_strides([[1] * dim] + steps, count, dim)
