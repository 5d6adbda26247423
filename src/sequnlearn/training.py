"""Training mechanics shared by the unlearning engine and the tampering attack: the learning-rate
schedules, setting an optimizer's lr, averaging gradients over processes and clipping them, and the
optimizer step."""

from __future__ import annotations

import math

import torch

from sequnlearn.distributed import Process


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    The formulas of transformers' ``get_{constant,linear,cosine}_schedule_with_warmup`` (what an
    HF ``Trainer`` runs): ``step / warmup`` during warmup, then constant 1, linear ``(total − step) /
    (total − warmup)`` or cosine ``0.5 (1 + cos(π (step − warmup) / (total − warmup)))``.

    Raises:
        ValueError: an unknown schedule.
    """
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - done)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * done)))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``opt`` the learning rate ``lr``."""
    for group in opt.param_groups:
        group["lr"] = lr


def reduce_and_clip(params: list, proc: Process, *, sharded: bool, max_norm: float | None) -> torch.Tensor | None:
    """Average the gradients of ``params`` over processes (unless ``sharded``: FSDP has reduce-scattered and
    averaged them in backward), then clip their total norm to ``max_norm`` when one is given.

    Returns:
        The total gradient norm before clipping (a DTensor under FSDP), or None when nothing was clipped.
    """
    if not sharded:
        proc.average_gradients(params)
    return torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm else None


def finish_step(opt: torch.optim.Optimizer, apply: bool = True) -> None:
    """End an optimizer step: apply the gradients (unless ``apply`` is false) and drop them."""
    if apply:
        opt.step()
    opt.zero_grad(set_to_none=True)
