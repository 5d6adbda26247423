"""The step's device-dependent choices: attention kernels, row groups, padding and head chunks.

Each is a config key whose ``auto`` (the default) is resolved here for the device: on the CPU a step is
bound by arithmetic, so padding is avoided (small row groups, no rounding, small head chunks); on a GPU
it is bound by kernel launches and by attention plans, so padding is cheap and launches are not (one
row group unless padding would more than double the work, widths rounded to a multiple of 64 so that
shapes repeat, large head chunks, and flash / memory-efficient attention, which needs no per-length
plan). The choices change how the work is cut, never the math: the same losses and gradients up to
kernel rounding (``tests/test_kernels.py``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

CPU_DEFAULTS = {"sdpa_backend": "default", "row_group_tokens": 256, "pad_multiple": 1, "head_chunk_rows": 256}
"""What ``auto`` means on the CPU (the settings every CPU test and pinned number has used)."""
GPU_DEFAULTS = {"sdpa_backend": "flash", "row_group_tokens": 8192, "pad_multiple": 64, "head_chunk_rows": 2048}
"""What ``auto`` means on a GPU."""


@dataclass(frozen=True)
class StepSettings:
    """The resolved device-dependent settings of a step (see the config keys of the same names)."""

    sdpa_backend: str
    row_group_tokens: int
    pad_multiple: int
    head_chunk_rows: int


def step_settings(cfg, device: torch.device) -> StepSettings:
    """``cfg``'s ``sdpa_backend``, ``row_group_tokens``, ``pad_multiple`` and ``head_chunk_rows`` with
    each ``auto`` / ``None`` resolved for ``device``."""
    defaults = GPU_DEFAULTS if torch.device(device).type == "cuda" else CPU_DEFAULTS
    given = {k: getattr(cfg, k) for k in CPU_DEFAULTS}
    return StepSettings(**{k: defaults[k] if v in (None, "auto") else v for k, v in given.items()})


def attention_kernels(backend: str):
    """The context that restricts scaled-dot-product attention to ``backend``'s kernels (``flash``: flash
    and memory-efficient; ``math``; ``default``: no restriction). Forward and backward (and a
    checkpointed recomputation) must run inside the same one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "flash":  # math only where neither kernel takes the inputs (it has the lowest priority)
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    if backend == "math":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def row_groups(lengths: list[int], pass_tokens: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Contiguous row groups ``[(start, stop), ...]`` of least padded tokens + ``pass_tokens`` per group,
    each group's width being its longest row rounded up to ``multiple``.

    Rows of equal length stay together; a long row among short ones runs on its own when that saves
    more padding than a pass costs.
    """
    n = len(lengths)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)  # best[i]: cost of rows 0..i-1; cut[i]: its last group's start
    for stop in range(1, n + 1):
        widest = 0
        for start in range(stop - 1, -1, -1):
            widest = max(widest, lengths[start])
            cost = best[start] + (stop - start) * round_up(widest, multiple) + pass_tokens
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    groups, stop = [], n
    while stop > 0:
        groups.append((cut[stop], stop))
        stop = cut[stop]
    return groups[::-1]
