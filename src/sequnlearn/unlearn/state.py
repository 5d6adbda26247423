"""The state of a run on disk: resumable checkpoints, the saved adapter and the merged model.

A checkpoint (``checkpoints/state.pt``) holds the adapter (``method: full``: the weights of the blocks
trained so far, not the whole model), the optimizer state, the position and how many metrics lines
had been written, so a resumed run continues exactly where the checkpoint was taken (a full-parameter
run reloads the base model and these blocks). Under FSDP every process takes part in gathering the full state; only the main process
writes. Every file is written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sequnlearn import io
from sequnlearn.distributed import Process, full_state, load_full_state
from sequnlearn.errors import UserError
from sequnlearn.model import adapter as lora
from sequnlearn.model.load import save_tokenizer
from sequnlearn.runs import RunDir, atomic_dir, atomic_path, atomic_write_text
from sequnlearn.unlearn.blocks import Blocks


@dataclass
class Position:
    """Where the run stands: phase index, optimizer steps done in it, and in total."""

    phase: int = 0
    phase_step: int = 0
    step: int = 0
    nan_skipped: int = 0
    phase_applied: int = 0
    """Optimizer steps of the current phase applied (not skipped as non-finite under ``on_nan: skip``)."""


class RunState:
    """Checkpoints and outputs of one run directory, written by the main process.

    Args:
        run: the run directory.
        proc: this process (:class:`~sequnlearn.distributed.Process`).
        sharded: the model is FSDP-sharded (state is gathered by every process).
        blocks: ``method: full``: the trained blocks (their weights are the checkpoint's), else None.
    """

    def __init__(self, run: RunDir, proc: Process, *, sharded: bool, blocks: Blocks | None = None):
        self.run, self.proc, self.fsdp, self.blocks = run, proc, sharded, blocks

    def save_checkpoint(self, model, opt: torch.optim.Optimizer, pos: Position) -> None:
        """Adapter (or trained blocks') weights, optimizer state and position, written atomically (main process)."""
        self.proc.barrier()
        if self.fsdp:  # gathered by every process, written by the main one
            model_sd, opt_sd = full_state(model, opt)
            weights = {"adapter": {k: v for k, v in model_sd.items() if "lora_" in k}}
        if not self.proc.is_main:
            return
        if self.blocks is not None:
            weights, opt_sd = {"blocks": self.blocks.state_dict()}, opt.state_dict()
        elif not self.fsdp:
            from peft import get_peft_model_state_dict

            weights, opt_sd = {"adapter": get_peft_model_state_dict(model)}, opt.state_dict()
        state = {**weights, "optimizer": opt_sd, "fsdp": self.fsdp,
                 "position": vars(pos).copy(), "metrics_lines": _count_lines(self.run.metrics)}
        with atomic_path(self.run.checkpoints / "state.pt") as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, model, opt: torch.optim.Optimizer) -> Position | None:
        """Load ``checkpoints/state.pt`` into ``model`` and ``opt``; metrics lines written after it are
        dropped. Returns its position, or None when no checkpoint was written yet.

        Raises:
            UserError: the checkpoint was written with another sharding.
        """
        from peft import set_peft_model_state_dict

        path = self.run.checkpoints / "state.pt"
        if not path.is_file():  # killed before the first checkpoint: start from the beginning
            if self.proc.is_main:
                _truncate_lines(self.run.metrics, 0)
            return None
        # Load on the CPU: under several CPU processes the saved tensors are tagged "cpu:0", which
        # torch.load cannot map; the adapter copy and the optimizer move them to the parameters' device.
        weights = "adapter" if self.blocks is None else "blocks"
        state = io.load_torch(path, "checkpoint", keys=(weights, "optimizer", "position", "metrics_lines"))
        if state.get("fsdp", False) != self.fsdp:
            raise UserError(f"--resume: the checkpoint in {path.parent} was written with"
                            f"{'' if state.get('fsdp') else 'out'} FSDP sharding; resume with the same sharding")
        if self.blocks is not None:  # the model holds the base weights: originals are stashed from them first
            self.blocks.load_state_dict(state["blocks"])
            opt.load_state_dict(state["optimizer"])
        elif self.fsdp:
            load_full_state(model, state["adapter"], opt, state["optimizer"])
        else:
            set_peft_model_state_dict(model, state["adapter"])
            opt.load_state_dict(state["optimizer"])
        if self.proc.is_main:
            _truncate_lines(self.run.metrics, state["metrics_lines"])
        saved = state["position"]  # a checkpoint from before phase_applied counted its phase's steps as applied
        return Position(**{"phase_applied": saved.get("phase_step", 0), **saved})

    def save_outputs(self, model, tokenizer, unsharded_copy: Callable[[dict], object]) -> None:
        """Adapter (peft format), then the merged model + tokenizer (HF format, safetensors); with
        ``blocks`` (``method: full``) the model itself + tokenizer, and no adapter.

        Args:
            unsharded_copy: rebuilds the adapted model on the CPU from a full state dict (FSDP only).
        """
        self.proc.barrier()
        if self.fsdp:  # gather the full weights into an unsharded copy on the CPU of the main process
            model_sd, _ = full_state(model)
        if not self.proc.is_main:
            return
        if self.fsdp:
            model = unsharded_copy(model_sd)
        _refuse_nonfinite(model, self.run)  # before anything is written
        if self.blocks is None:
            with atomic_dir(self.run.adapter) as tmp:  # base model by absolute path or hub id, and our README
                lora.save_adapter(model, tmp, self.run.stored_config(raw=True), self.run.name)
            model = lora.merge_adapter(model)
            _refuse_nonfinite(model, self.run)  # a merge that overflows (fp16) takes the adapter back
        with atomic_dir(self.run.model) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            save_tokenizer(tokenizer, tmp)  # without the truncation at max_length that training left on it


def _refuse_nonfinite(model, run: RunDir) -> None:
    """Refuse to save a model whose weights are not all finite; an ``adapter/`` already saved is removed.

    Raises:
        NonFiniteModel: a weight is NaN or infinite (the run diverged; no model/ is written).
    """
    import shutil

    from sequnlearn.eval import NonFiniteModel, nonfinite_tensors

    bad, total = nonfinite_tensors(model)
    if not bad:
        return
    if run.adapter.exists():
        shutil.rmtree(run.adapter)
    raise NonFiniteModel(f"the unlearned model has non-finite weights (NaN or inf) in {len(bad)} of {total} tensors "
                         f"(first: {bad[0]}): training diverged; lower lr or the coefficients (remove_coef, "
                         "retain_coef) and start over with --overwrite (--resume would repeat it); no model/ or "
                         "adapter/ was written")


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` lines of ``metrics.jsonl`` (those the checkpoint counted); a line cut by a
    kill after them is dropped with the rest.

    Raises:
        UserError: one of the ``n`` lines is missing, cut or not JSON (the file was damaged).
    """
    import json

    if not path.exists():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    kept = lines[:n]
    for i, line in enumerate(kept, 1):
        try:
            whole = line.endswith("\n") and isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            whole = False
        if not whole:
            raise UserError(f"--resume: {path} line {i} is cut or damaged, but the checkpoint counts {n} whole lines; "
                            "restore the file, or start the run over with --overwrite")
    if len(kept) < n:
        raise UserError(f"--resume: {path} has {len(kept)} lines but the checkpoint counts {n}; restore the file, or "
                        "start the run over with --overwrite")
    if len(lines) != n or (lines and not lines[-1].endswith("\n")):
        atomic_write_text(path, "".join(kept))
