"""What several processes (``accelerate launch`` / ``torchrun``) share.

Each process takes a slice of each global batch. DDP-style, every process holds the whole model and
after the backward passes the gradients of the trained parameters are averaged here (one flat
all-reduce), so every process takes the same optimizer step; with FSDP (:func:`shard_layers`,
:func:`shard_model`) the decoder layers are sharded, FSDP2 averages their gradients, and the full
state for checkpoints and saving is gathered with :func:`full_state`. Work that must happen once
(evaluation, writing files) runs on the main process through :func:`on_main`, which hands its
outcome, or its failure, to every process. With one process each helper is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

from sequnlearn.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Process:
    """This process of a command: rank, number of processes, device, and what they share.

    Built once where a command starts (:meth:`start`) and passed down: the engine, the attack, the
    sweep and the evaluation ask it, never ``torch.distributed`` or accelerate themselves. With one
    process every collective is the identity.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def start(cls, device: str = "auto") -> "Process":
        """Join the process group of ``accelerate launch`` / ``torchrun`` (made on first use; gloo on
        CPUs, NCCL on GPUs), or a single process. ``device``: auto (this process's GPU, else the CPU)."""
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        dev = state.device if device == "auto" else torch.device(device)
        return cls(state.process_index, state.num_processes, dev)

    @classmethod
    def current(cls, device: torch.device | str = "cpu") -> "Process":
        """The process as the existing process group (if any) says, on ``device``."""
        rank, world = rank_and_world()
        return cls(rank, world, torch.device(device))

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (the one that writes files)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process."""
        barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over processes (in place)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, values: list[float]) -> list[float]:
        """Each value's mean over processes (float64)."""
        return mean_over_processes(values, self.device)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Each gradient replaced by its mean over processes (see :func:`average_gradients`)."""
        average_gradients(params)

    def on_main(self, fn: Callable[[], T], *, everywhere: bool = False) -> T:
        """``fn`` on the main process, its outcome on all (see :func:`on_main`)."""
        return on_main(fn, everywhere=everywhere)

    def micro_batches(self, global_batch: int, per_device: int, what: str) -> int:
        """Accumulation steps of this process (see :func:`micro_batches_per_process`)."""
        return micro_batches_per_process(global_batch, per_device, self.world, what)

    def use_fsdp(self, sharding: str) -> bool:
        """Whether to shard with FSDP2 (see :func:`use_fsdp`)."""
        return self.world > 1 and use_fsdp(sharding)

    def shard_layers(self, layers: Iterable[torch.nn.Module]):
        """FSDP2-shard the decoder layers (see :func:`shard_layers`)."""
        return shard_layers(layers, self.device)

    def shard_model(self, model: torch.nn.Module, layers: Iterable[torch.nn.Module]) -> None:
        """FSDP2-shard a model for plain ``model(...)`` calls (see :func:`shard_model`)."""
        shard_model(model, layers, self.device)

    def autocast(self, mixed_precision: str):
        """The autocast context of ``mixed_precision`` on this device: auto (bf16 on a GPU, off on the
        CPU), no, bf16 or fp16."""
        if mixed_precision == "auto":
            mixed_precision = "bf16" if self.device.type == "cuda" else "no"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def end(self) -> None:
        """Leave the process group (at the end of a command)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """``(rank, number of processes)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this is the main process (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


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


def on_main(fn: Callable[[], T], *, everywhere: bool = False) -> T:
    """Run ``fn`` on the main process only; every process returns its result or raises its error.

    ``everywhere``: run ``fn`` on every process instead (a sharded model's forward needs them all)
    and hand on the main process's outcome all the same.

    A :class:`UserError` reaches the other processes as the same message; any other exception as a
    ``RuntimeError`` naming it, so no process is left waiting for a collective that never comes.
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0 or everywhere:
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


def use_fsdp(sharding: str) -> bool:
    """Whether to shard with FSDP2: with several processes, for ``fsdp``, or for ``auto`` under
    ``accelerate launch`` with an FSDP config; never with one process (nothing to shard across)."""
    import os

    if rank_and_world()[1] == 1:
        return False
    if sharding == "auto":
        return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return sharding == "fsdp"


def shard_layers(layers: Iterable[torch.nn.Module], device: torch.device):
    """FSDP2 full shard of the decoder layers, each one unit, gathered by its own forward hooks, so
    the engine's prefix / suffix / checkpointed layer calls work unchanged; their gradients are
    reduce-scattered and averaged in backward. The rest (embeddings, final norm, head: frozen, a few
    percent of a 7B model) stays whole on every process: the engine calls those modules directly
    and reads the head's weight, which no FSDP hook would gather. Returns the device mesh."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    return mesh


def shard_model(model: torch.nn.Module, layers: Iterable[torch.nn.Module], device: torch.device) -> None:
    """FSDP2 full shard for plain ``model(...)`` calls (the tampering attack): one unit per decoder
    layer (:func:`shard_layers`), the rest of the model the root unit."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=shard_layers(layers, device))


def _mesh(device: torch.device):
    """A 1-D device mesh over all processes."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (rank_and_world()[1],))


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Full (unsharded) model and optimizer state dicts on the CPU, on every process (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    opt_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_sd, opt_sd


def load_full_state(model: torch.nn.Module, model_sd: dict, optimizer: torch.optim.Optimizer, opt_sd: dict) -> None:
    """Load full state dicts (as :func:`full_state` gives) into a sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, opt_sd, options=opts)
