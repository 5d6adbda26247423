"""What several processes (``accelerate launch`` / ``torchrun``, DDP-style) share.

Every process holds the whole model and a slice of each global batch; after the backward passes
the gradients of the trained parameters are averaged here (one flat all-reduce), so every process
takes the same optimizer step. Work that must happen once (evaluation, writing files) runs on the
main process through :func:`on_main`, which hands its outcome, or its failure, to every process.
With one process each helper is the identity.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

from sequnlearn.errors import UserError

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, number of processes)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def micro_batches_per_process(global_batch: int, per_device: int, world: int, what: str) -> int:
    """Gradient accumulation steps so that ``per_device × world × accumulation = global_batch``.

    Raises:
        UserError: the global batch cannot be split that way.
    """
    if global_batch % (per_device * world):
        raise UserError(f"{what} {global_batch} is not a multiple of per-device batch {per_device} × {world} "
                        f"processes; change the batch sizes or the number of processes")
    return global_batch // (per_device * world)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over processes (a missing gradient counts as 0)."""
    params = list(params)
    _, world = rank_and_world()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (total,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    for p, g in zip(params, torch.split(flat, [g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def mean_over_processes(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Mean of each value over processes (float64)."""
    _, world = rank_and_world()
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world).tolist()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only; every process returns its result or raises its error.

    A :class:`UserError` reaches the other processes as the same message; any other exception as a
    ``RuntimeError`` naming it, so no process is left waiting for a collective that never comes.
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # handed to the others, then re-raised here
            error = exc
            box[0] = ("user" if isinstance(exc, UserError) else "error", f"{type(exc).__name__}: {exc}"
                      if not isinstance(exc, UserError) else str(exc))
    dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if error is not None:
        raise error
    if kind == "user":
        raise UserError(payload)
    if kind == "error":
        raise RuntimeError(f"the main process failed: {payload}")
    return payload


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
