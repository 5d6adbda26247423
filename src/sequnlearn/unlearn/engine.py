"""The phase loop: for each target layer L, back to front, train the LoRA adapter on
forget loss (current model to layer L → original layers L+1..N) plus retain loss.

The losses of a batch live in :mod:`~sequnlearn.unlearn.objective`, checkpoints and saved outputs
in :mod:`~sequnlearn.unlearn.state`; this module runs the steps and the phases.

One adapter runs through all phases; the optimizer (AdamW, or Muon with AdamW:
:mod:`~sequnlearn.unlearn.optim`) either does too or starts afresh at each phase (``optimizer_scope``),
with its lr schedule. Phases may differ in length (``steps_per_layer``, ``deep_layer_step_scale``:
``Unlearner.phase_steps``). The original model is the same weights with the adapter switched off.

``method: full`` trains no adapter but the weights: in phase L only decoder block L (and the
``maintained_layers``) has gradients, and the original of a trained block is a copy of its weights
taken before its first update (:mod:`~sequnlearn.unlearn.blocks`). Its optimizer holds every block
that trains in some phase but has moments only for those with gradients: a fresh one per phase
(``optimizer_scope: phase``), or one through the run with one lr schedule (``run``), dropping the
moments of a block once it trains in no later phase. It does not run FSDP-sharded.

Every optimizer step is a pure function of (seed, phase, step), so an interrupted run resumed from a
checkpoint ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

import torch

from sequnlearn.config import UnlearnConfig, changed_keys, dump_yaml
from sequnlearn.data.corpora import (Corpus, CorpusSpec, collate, count_truncated, losses_line, read_corpus,
                                     read_corpus_as_reference, tokenize)
from sequnlearn.distributed import Process
from sequnlearn.errors import UserError
from sequnlearn.model import adapter as lora
from sequnlearn.model.layers import Architecture, architecture, check_layers
from sequnlearn.runs import RunDir, atomic_write_text, provenance, read_json, remove_stale_temp_files, write_json
from sequnlearn.trackers import check_tracker, open_tracker
from sequnlearn.training import finish_step, lr_factor, reduce_and_clip, set_lr
from sequnlearn.unlearn.blocks import Blocks, drop_moments
from sequnlearn.unlearn.kernels import attention_kernels, round_up, row_groups, step_settings
from sequnlearn.unlearn import losses
from sequnlearn.unlearn.objective import Objective, to_device
from sequnlearn.unlearn.optim import build_optimizer, check_optimizer
from sequnlearn.unlearn.schedule import coefficients, depth_scale, micro_batch_progress, phase_steps, progress
from sequnlearn.unlearn.state import Position, RunState


class NonFiniteLoss(UserError):
    """A NaN/inf loss or gradient norm stopped the run, or every step of a phase was skipped as
    non-finite (no model is written from a broken adapter)."""


class Stream(IntEnum):
    """The named random streams of a run; each draw is seeded from (seed, stream, phase, index)."""

    FORGET_ORDER = 0
    RETAIN_ORDER = 1
    TARGETS = 7
    DROPOUT = 8


@dataclass
class HostBatch:
    """A collated micro-batch: its tensors (on the device) and its rows' real lengths (on the host)."""

    tensors: dict[str, torch.Tensor]
    lengths: list[int]
    keep: list[list[int]] | None = None
    """Per row, the token positions the loss counts (``forget_keywords``); None = every real token."""

    @property
    def counted(self) -> list[int]:
        """Tokens per row that the loss counts."""
        return self.lengths if self.keep is None else [len(k) for k in self.keep]


@dataclass
class Batches:
    """Tokenized forget and retain examples."""

    forget: list[list[int]]
    retain: list[list[int]]
    pad_id: int
    counts: dict = field(default_factory=dict)
    """Per corpus, what loading dropped or cut (:func:`load_batches`; ``corpora`` in provenance.json)."""
    forget_keep: list[list[int]] | None = None
    """Per forget example, the token positions the forget loss counts (``forget_keywords``); None = all."""


class Unlearner:
    """Runs the phases of one config on one model; see the module docstring."""

    def __init__(self, cfg: UnlearnConfig, model, tokenizer, batches: Batches, run: RunDir, proc: Process | None = None):
        proc = proc or Process()
        self.cfg, self.tokenizer, self.data, self.run, self.proc = cfg, tokenizer, batches, run, proc
        self.tracker = None  # an experiment tracker (``report_to``), opened once the run directory is written
        self.model = self._with_adapter(model) if cfg.method == "lora" else model
        lora.lora_dropout_train_mode(self.model)
        self.arch: Architecture = architecture(self.model)
        self.layers = cfg.target_layers(self.arch.num_layers)
        check_layers(self.arch, self.layers)
        self.fsdp = proc.use_fsdp(cfg.sharding)
        if self.fsdp and cfg.method == "full":  # sharding: fsdp is refused by the config; this is auto under FSDP
            raise UserError("method full does not run FSDP-sharded (accelerate's config asks for FSDP); launch "
                            "without an FSDP config or set sharding: ddp")
        if self.fsdp and (cfg.grad_filter != "none" or cfg.l2sp_coef):  # each process's own gradients are needed
            raise UserError("grad_filter and l2sp_coef do not run FSDP-sharded; set sharding: ddp, or turn them off")
        self.blocks = Blocks(self.model, self.arch, self.layers, cfg.maintained_layers) if cfg.method == "full" else None
        """Full-parameter mode: the blocks that train and their originals (:mod:`~sequnlearn.unlearn.blocks`)."""
        checkpointing = (cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None
                         else proc.device.type == "cuda")
        self.settings = step_settings(cfg, proc.device)  # attention kernels, row groups, padding, head chunks
        self.objective = Objective(cfg, self.arch, checkpointing=checkpointing, sharded=self.fsdp,
                                   chunk_rows=self.settings.head_chunk_rows)
        self.state = RunState(run, proc, sharded=self.fsdp, blocks=self.blocks)
        if self.fsdp:
            proc.shard_layers(self.arch.layers)
        self.params = self.blocks.enter(0) if self.blocks else [p for p in self.model.parameters() if p.requires_grad]
        """The parameters trained now: the adapter, or (``full``) the blocks of the current phase."""
        self.opt = self._new_optimizer()
        self.accum = proc.micro_batches(cfg.global_batch_size, cfg.per_device_batch_size, "global_batch_size")
        base = cfg.steps_per_layer or cfg.epochs_per_layer * (len(batches.forget) // cfg.global_batch_size)
        self.phase_steps = phase_steps(base, self.layers, cfg.deep_layer_step_scale)
        """Optimizer steps of each phase (:func:`~sequnlearn.unlearn.schedule.phase_steps`)."""
        self.pos = Position()
        self._order_cache: dict = {}

    # ------------------------------------------------------------------ steps

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer over ``self.params`` (:func:`~sequnlearn.unlearn.optim.build_optimizer`: fused
        AdamW with weight decay on every trained weight, as the HF Trainer applies it, or Muon with AdamW).

        ``method: full``: over every block that trains in some phase, whichever scope: a parameter gets
        moments (and weight decay) only once it has a gradient, so only the trainable blocks have state,
        and the optimizer's parameter list (hence its checkpointed state) is the same in every phase."""
        if self.blocks is not None:
            return build_optimizer(self.cfg, self.blocks.named_parameters())
        names = {id(p): n for n, p in self.model.named_parameters()}
        return build_optimizer(self.cfg, [(names[id(p)], p) for p in self.params])

    def _enter_phase(self, phase: int) -> None:
        """``method: full``: the blocks of ``phase`` become ``self.params`` (their originals stashed before
        their first update); under ``optimizer_scope: run`` (one optimizer and one lr schedule through all
        phases) the moments of blocks that train in no later phase are dropped. Nothing under ``lora``."""
        if self.blocks is None:
            return
        self.params = self.blocks.enter(phase)
        if self.cfg.optimizer_scope == "run":
            drop_moments(self.opt, self.blocks.retired(phase))

    def _run_step(self, phase: int, phase_step: int) -> tuple[int, int]:
        """``(step, total)``: step ``phase_step`` of ``phase`` counted over the whole run, and the run's steps."""
        return sum(self.phase_steps[:phase]) + phase_step, sum(self.phase_steps)

    def lr_at(self, phase: int, phase_step: int) -> float:
        """Learning rate of optimizer step ``phase_step`` of ``phase`` (a pure function of both)."""
        cfg = self.cfg
        if cfg.optimizer_scope == "phase":
            step, total = phase_step, self.phase_steps[phase]
        else:
            step, total = self._run_step(phase, phase_step)
        return cfg.lr * lr_factor(cfg.lr_schedule, step, total, cfg.warmup_steps)

    def coefficients_at(self, phase: int, phase_step: int, micro: int) -> tuple[float, float]:
        """``(forget_coef, retain_coef)`` of this process's micro-batch ``micro`` of optimizer step ``phase_step``."""
        cfg = self.cfg
        if cfg.ramp_unit == "micro_batch":  # the reference code: a counter of this process's micro-batches
            per_epoch = len(self.data.forget) / (cfg.per_device_batch_size * self.proc.world)
            p = micro_batch_progress(phase_step * self.accum + micro, per_epoch)
        elif cfg.schedule_scope == "run":
            p = progress(*self._run_step(phase, phase_step))
        else:
            p = progress(phase_step, self.phase_steps[phase])
        scale = depth_scale(cfg.forget_layer_scale, self.layers[0], self.layers[phase])  # 1 by default
        return coefficients(p, cfg.remove_coef * scale, cfg.retain_coef, cfg.retain_ramp_start)

    def _micro_batches(self, phase: int, step: int):
        """This process's micro-batches of optimizer step ``step`` of ``phase``: ``(m, forget, retain)``,
        each a :class:`HostBatch` whose tensors are already on the device."""
        cfg, world, rank = self.cfg, self.proc.world, self.proc.rank
        per_epoch = len(self.data.forget) // cfg.global_batch_size
        order_f, order_r = self._orders(phase, step // per_epoch)
        base = (step % per_epoch) * cfg.global_batch_size
        for m in range(self.accum):
            start = base + (m * world + rank) * cfg.per_device_batch_size
            idx = range(start, start + cfg.per_device_batch_size)
            forget = [self.data.forget[order_f[i]] for i in idx]
            retain = [self.data.retain[order_r[i % len(order_r)]] for i in idx]
            keep = self.data.forget_keep
            keep = None if keep is None else [keep[order_f[i]] for i in idx]
            yield m, self._host_batch(forget, keep), self._host_batch(retain)

    def _orders(self, phase: int, epoch: int) -> tuple[list[int], list[int]]:
        """The forget and retain example orders of an epoch of a phase (computed once, kept)."""
        key = (phase, epoch)
        if key not in self._order_cache:
            cfg, n_f, n_r = self.cfg, len(self.data.forget), len(self.data.retain)
            if cfg.data_order == "reference":  # the HF Trainer's seeded sampler: pairs, same order each phase
                order_f = order_r = torch.randperm(n_f, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            else:
                order_f = torch.randperm(n_f, generator=_order_gen(cfg.seed, Stream.FORGET_ORDER, phase, epoch))
                order_r = torch.randperm(n_r, generator=_order_gen(cfg.seed, Stream.RETAIN_ORDER, phase, epoch))
            self._order_cache = {key: (order_f.tolist(), order_r.tolist())}
        return self._order_cache[key]

    def _host_batch(self, seqs: list[list[int]], keep: list[list[int]] | None = None) -> "HostBatch":
        """Collate on the host, keep the row lengths (and counted positions) there, move the tensors to the device."""
        batch = collate(seqs, self.data.pad_id, multiple=self.settings.pad_multiple, cap=self.cfg.max_length)
        return HostBatch({k: to_device(v, self.proc.device) for k, v in batch.items()}, [len(s) for s in seqs], keep)

    def optimizer_step(self, phase: int, layer: int) -> dict:
        """One optimizer step (``accum`` micro-batches) of ``phase``; returns its metrics line.

        A micro-batch goes backward in parts (:meth:`_backward_in_parts`): forget, then retain,
        a group of rows at a time, so no two graphs coexist. Its gradient is formed apart and added
        to the step's only where both losses are finite (a skipped micro-batch adds nothing). Nothing
        waits for the device until the step's end: one transfer brings the logged sums, the count
        of skipped micro-batches and the gradient norm to the host, before the optimizer steps.
        """
        pos = self.pos
        lr = self.lr_at(phase, pos.phase_step)
        set_lr(self.opt, lr)
        t0, tokens = time.perf_counter(), 0
        sums = torch.zeros(6, dtype=torch.float64, device=self.proc.device)  # f, r, used, skipped, last bad f, r
        agree = sums.new_zeros(2) if self.cfg.grad_filter != "none" else None  # same-sign elements, all elements
        coefs = [self.coefficients_at(phase, pos.phase_step, m) for m in range(self.accum)]
        for m, fb, rb in self._micro_batches(phase, pos.phase_step):
            f, r, ok = self._micro_step(phase, layer, m, fb, rb, coefs[m], agree)
            zero = sums.new_zeros(())
            sums += torch.stack([torch.where(ok, f.double(), zero), torch.where(ok, r.double(), zero), ok.double(),
                                 (~ok).double(), zero, zero])
            sums[4:] = torch.where(ok, sums[4:], torch.stack([f, r]).double())
            tokens += sum(fb.lengths) + sum(rb.lengths)
        values = self._sync_and_step(sums, tokens, layer, agree)
        f_sum, r_sum, used, skipped, bad_f, bad_r, grad_norm, tokens = values[:8]
        dt = time.perf_counter() - t0
        line = {"layer": layer, "phase": phase, "step": pos.step, "phase_step": pos.phase_step,
                "forget_loss": _mean(f_sum, used), "retain_loss": _mean(r_sum, used),
                "forget_coef": sum(c[0] for c in coefs) / len(coefs),
                "retain_coef": sum(c[1] for c in coefs) / len(coefs), "lr": lr,
                "grad_norm": grad_norm, "nan_skipped": pos.nan_skipped,
                "tokens": int(tokens), "tokens_per_s": tokens / dt, "time_s": dt}
        if agree is not None:  # the share of gradient elements whose forget and retain signs agree
            line["same_sign_share"] = _mean(values[8], values[9])
        return line

    def _micro_step(self, phase: int, layer: int, m: int, fb: "HostBatch", rb: "HostBatch",
                    coef: tuple[float, float], agree: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward of one micro-batch's forget and retain losses; its gradient is added to the
        step's where both are finite. Returns the two losses and whether both are finite (device scalars).

        ``l2sp_coef`` adds L2-SP to the retain side. With ``grad_filter`` the forget gradient is set aside
        before the retain backward and the two are combined by the filter (:meth:`_filtered`), the
        agreeing and all elements added to ``agree`` (when given)."""
        cfg, world, fc, rc = self.cfg, self.proc.world, *coef
        # Random targets and LoRA dropout are a function of the global micro-batch index, so
        # the run is the same whatever the number of processes and wherever it resumed.
        micro = (self.pos.phase_step * self.accum + m) * world + self.proc.rank
        gen = _gen(cfg.seed, Stream.TARGETS, phase, micro)
        torch.manual_seed(_seed(cfg.seed, Stream.DROPOUT, phase, micro))
        held = self._take_gradients()
        f = self._backward_in_parts(fb, lambda part: self.objective.forget_loss(part, layer, gen), fc / self.accum,
                                    counted=self.objective.forget_counts(fb.lengths, fb.keep))
        forget = self._take_gradients() if cfg.grad_filter != "none" else None
        r = self._backward_in_parts(rb, lambda part: self.objective.retain_loss(part, layer), rc / self.accum,
                                    by_rows=self.objective.retain_by_rows,
                                    counted=self.objective.retain_counts(rb.lengths))
        if cfg.l2sp_coef:
            penalty = self.objective.l2sp(layer)
            if penalty.requires_grad:  # a block without trained weights has none
                (cfg.l2sp_coef / self.accum * penalty).backward()
        ok = torch.isfinite(f) & torch.isfinite(r)
        grads = [p.grad for p in self.params] if forget is None else self._filtered(forget, ok, agree)
        for p, g, h in zip(self.params, grads, held):
            if g is not None:
                g = torch.where(ok, g, torch.zeros((), dtype=g.dtype, device=g.device))
                g = g if h is None else h.add_(g)
            p.grad = h if g is None else g
        return f, r, ok

    def _take_gradients(self) -> list[torch.Tensor | None]:
        """The gradients of ``self.params``, which are left without one."""
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def _filtered(self, forget: list[torch.Tensor | None], ok: torch.Tensor, agree: torch.Tensor | None) -> list:
        """Each parameter's retain gradient (its ``grad``) and ``forget`` gradient combined by ``grad_filter``
        (:func:`~sequnlearn.unlearn.losses.filter_gradients`; a missing one counts as zeros); adds the
        agreeing elements and all elements of the parameters with a gradient to ``agree`` where ``ok``."""
        out, agreeing, elements = [], [], 0
        for p, g_f in zip(self.params, forget):
            g_r = p.grad
            if g_r is None and g_f is None:
                out.append(None)
                continue
            g_r, g_f = (torch.zeros_like(p) if g is None else g for g in (g_r, g_f))
            g, n = losses.filter_gradients(g_r, g_f, self.cfg.grad_filter)
            out.append(g)
            agreeing.append(n)
            elements += g.numel()
        if agreeing and agree is not None:
            counts = torch.stack([torch.stack(agreeing).sum().double(), agree.new_tensor(float(elements))])
            agree += torch.where(ok, counts, torch.zeros_like(counts))
        return out

    def _backward_in_parts(self, batch: "HostBatch", loss_fn: Callable[[dict], torch.Tensor], coef: float,
                           by_rows: bool = False, counted: list[int] | None = None) -> torch.Tensor:
        """Backward ``coef`` × ``loss_fn(batch)`` one row group (:func:`~sequnlearn.unlearn.kernels.row_groups`)
        at a time; returns the loss.

        A loss that is a mean over real tokens makes the batch's loss (and gradient) the sum of the
        groups' losses weighted by their share of counted tokens (every real token, or with
        ``batch.keep`` the keyword-masked ones); one that is a mean over rows at a fixed padded length
        (``by_rows``) weights them by their share of rows. A group is padded only to its own longest
        row (rounded up to ``pad_multiple``), its counted tokens are given as flat indices made on the
        host, and its graph is freed before the next group runs. Random targets are drawn group after
        group from one generator, in row order: the same draws as for the whole batch. With ``keep``, a
        group without a counted token is skipped and a batch without any adds nothing (loss 0). ``counted``:
        per row, what the loss averages over where that is not those tokens (e.g. the next-token losses:
        :meth:`~sequnlearn.unlearn.objective.Objective.forget_counts`).
        """
        lengths, s = batch.lengths, self.settings  # per row, known on the host
        counted = batch.counted if counted is None else counted
        total, padded = sum(counted), batch.tensors["attention_mask"].shape[1]
        loss = torch.zeros((), device=self.proc.device)
        if batch.keep is not None and not total:
            return loss  # no keyword-masked token in this micro-batch
        for start, stop in row_groups(lengths, s.row_group_tokens, s.pad_multiple):
            n = sum(counted[start:stop])
            if total and not n:
                continue  # rows without tokens add nothing (a batch without any gives NaN, as before)
            width = min(round_up(max(lengths[start:stop]), s.pad_multiple), padded) if total else padded
            part = {k: v[start:stop, :width].contiguous() for k, v in batch.tensors.items()}
            part["index"] = to_device(_flat_index(batch, start, stop, width), self.proc.device)  # (n,)
            share = (stop - start) / len(lengths) if by_rows else (n / total if total else 1.0)
            with attention_kernels(s.sdpa_backend):  # forward and backward (and its recomputation) alike
                with self.proc.autocast(self.cfg.mixed_precision):
                    part_loss = loss_fn(part)
                (coef * share * part_loss).backward()  # a non-finite loss: the micro-batch is dropped
            loss = loss + share * part_loss.detach().float()
        return loss

    def _sync_and_step(self, sums: torch.Tensor, tokens: int, layer: int,
                       extra: torch.Tensor | None = None) -> list[float]:
        """Average LoRA gradients over processes, clip, then the step's only wait for the device: the
        logged sums (over processes), skipped micro-batches and grad norm reach the host. A non-finite
        loss, or finite losses with a non-finite gradient norm, stops here (``on_nan: stop``) before the
        optimizer steps; under ``on_nan: skip`` a step with a non-finite gradient norm, or without a
        finite micro-batch, is not applied and its micro-batches count as skipped. Returns ``[f_sum,
        r_sum, used, skipped, bad_f, bad_r, grad_norm, tokens]``, then the sums (over processes) of ``extra``."""
        norm = reduce_and_clip(self.params, self.proc, sharded=self.fsdp, max_norm=self.cfg.max_grad_norm or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        summed = torch.cat([sums, to_device(torch.tensor([0.0, float(tokens)], dtype=torch.float64), sums.device),
                            *([] if extra is None else [extra])])
        summed = self.proc.sum(summed)
        summed[6] = norm.double()
        values = summed.tolist()  # the one host-device synchronisation of the step
        used, skipped, grad_norm = int(values[2]), int(values[3]), values[6]
        where = f"step {self.pos.step} (layer {layer}, phase step {self.pos.phase_step})"
        fix = "lower lr or the coefficients, or pass --set on_nan=skip; no model was written"
        if skipped and self.cfg.on_nan == "stop":
            raise NonFiniteLoss(f"non-finite loss at {where}: forget_loss={values[4]}, retain_loss={values[5]}; {fix}")
        bad_grad = used > 0 and not math.isfinite(grad_norm)  # finite losses, yet the update would be NaN
        if bad_grad and self.cfg.on_nan == "stop":
            raise NonFiniteLoss(f"non-finite gradient at {where}: grad_norm={grad_norm} with finite losses "
                                f"(forget_loss={_mean(values[0], used)}, retain_loss={_mean(values[1], used)}); {fix}")
        self.pos.nan_skipped += skipped + (used if bad_grad else 0)
        applied = bool(used) and not bad_grad
        finish_step(self.opt, apply=applied)
        self.pos.phase_applied += int(applied)
        return values

    # ------------------------------------------------------------------ loop

    def train(self, on_checkpoint: Callable[[Position], None] | None = None,
              on_phase_end: Callable[["Unlearner", int, int], None] | None = None) -> None:
        """All phases from the current position; checkpoints as configured.

        Args:
            on_checkpoint: called with the position after each checkpoint is written.
            on_phase_end: called as ``(engine, phase, layer)`` after each phase (e.g. to evaluate
                the model in memory, adapter on).
        """
        from tqdm.auto import tqdm

        for phase in range(self.pos.phase, len(self.layers)):
            layer = self.layers[phase]
            self._enter_phase(phase)
            if self.cfg.optimizer_scope == "phase" and self.pos.phase_step == 0:
                self.opt = self._new_optimizer()  # empty AdamW moments, as a new HF Trainer per layer had
            steps = self.phase_steps[phase]
            bar = tqdm(total=steps, initial=self.pos.phase_step, disable=not self.proc.is_main,
                       desc=f"phase {phase + 1}/{len(self.layers)} layer {layer}", dynamic_ncols=True)
            for _ in range(self.pos.phase_step, steps):
                line = self.optimizer_step(phase, layer)
                self._log(line)
                self.pos.phase_step += 1
                self.pos.step += 1
                bar.update(1)
                skips = {"skipped": line["nan_skipped"]} if line["nan_skipped"] else {}
                bar.set_postfix(forget=f"{line['forget_loss']:.3f}", retain=f"{line['retain_loss']:.3f}",
                                fc=f"{line['forget_coef']:.1f}", rc=f"{line['retain_coef']:.2f}", **skips)
                end = self.pos.phase_step == steps
                if end:
                    self._check_phase_applied(phase, layer)
                    self.pos.phase, self.pos.phase_step, self.pos.phase_applied = phase + 1, 0, 0
                if end or (self.cfg.checkpoint_every and self.pos.step % self.cfg.checkpoint_every == 0):
                    self.state.save_checkpoint(self.model, self.opt, self.pos)
                    if on_checkpoint:
                        on_checkpoint(self.pos)
            bar.close()
            if on_phase_end:
                on_phase_end(self, phase, layer)
                lora.lora_dropout_train_mode(self.model)  # an evaluation in between may have switched them off

    def _check_phase_applied(self, phase: int, layer: int) -> None:
        """Refuse a phase none of whose steps was applied (all skipped as non-finite under ``on_nan: skip``).

        Raises:
            NonFiniteLoss: the phase left the model as it found it; the run cannot unlearn with these settings.
        """
        if self.pos.phase_applied == 0:
            raise NonFiniteLoss(f"every step of phase {phase + 1} (layer {layer}) was skipped as non-finite "
                                f"({self.pos.nan_skipped} micro-batches skipped so far): training diverged; lower "
                                "lr or the coefficients and start over with --overwrite (--resume would repeat "
                                "the same steps); no model was written")

    def _log(self, line: dict) -> None:
        if not self.proc.is_main:
            return
        with open(self.run.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in line.items() if isinstance(v, (int, float))}, step=line["step"])

    def load_checkpoint(self) -> None:
        """Continue from the run's checkpoint, if one was written."""
        pos = self.state.load_checkpoint(self.model, self.opt)
        if pos is not None:
            self.pos = pos

    def save(self) -> None:
        """Adapter (peft format), then the merged model + tokenizer (HF format, safetensors); ``method:
        full``: the trained model itself + tokenizer, no adapter."""
        self.state.save_outputs(self.model, self.tokenizer, self._unsharded_copy)

    def _unsharded_copy(self, model_sd: dict):
        """The adapted model rebuilt on the CPU from a full state dict (what FSDP saving needs)."""
        from sequnlearn.model.load import load_model

        base, _ = load_model(self.cfg.model, dtype=self.cfg.weights_dtype(), device="cpu", revision=self.cfg.revision)
        model = self._with_adapter(base)
        model.load_state_dict(model_sd)
        return model

    def _with_adapter(self, model):
        """``model`` wrapped in a fresh LoRA adapter as the config describes."""
        cfg = self.cfg
        return lora.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=cfg.target_modules)


def _seed(*key: int) -> int:
    """A seed derived from a tuple of integers."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return seed


def _gen(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers."""
    return torch.Generator().manual_seed(_seed(*key))


def _order_gen(seed: int, stream: Stream, phase: int, epoch: int) -> torch.Generator:
    """The generator of a data-order stream.

    Its key is ``(seed, phase, epoch, stream)`` for phases below 7 (what runs have always used, so
    their numbers stay the same) and ``(seed, stream, phase, epoch, 0)`` from phase 7 on, where the
    short key would coincide with the key of a target or dropout stream ``(seed, 7 or 8, ...)``.
    """
    if phase < Stream.TARGETS:
        return _gen(seed, phase, epoch, stream)
    return _gen(seed, stream, phase, epoch, 0)


def _flat_index(batch: HostBatch, start: int, stop: int, width: int) -> torch.Tensor:
    """The ``(n,)`` flat indices ``row·width + t`` of the counted tokens of rows ``start:stop`` (every real
    token, or the positions of ``batch.keep``), in row order."""
    rows = batch.keep[start:stop] if batch.keep is not None else [range(n) for n in batch.lengths[start:stop]]
    return torch.tensor([row * width + t for row, positions in enumerate(rows) for t in positions], dtype=torch.long)


def _mean(total: float, n: int) -> float:
    return total / n if n else math.nan


# ---------------------------------------------------------------------- a whole run


def load_batches(cfg: UnlearnConfig, tokenizer) -> Batches:
    """Load and tokenize the forget and retain corpora of ``cfg``, counting what loading dropped or cut.

    Rows skipped for an empty or null text and documents truncated at ``max_length`` are printed
    (once, by the main process) and kept in :attr:`Batches.counts`. A corpus with fewer usable
    documents than ``num_train_examples`` is a warning, not an error: the run trains on what there
    is, and provenance.json and the model card record that number (``data_order: reference`` needs
    them all: an error).

    Raises:
        UserError: a corpus is unreachable, empty, has a non-string text, or is smaller than one global batch.
    """
    out, counts, texts = {}, {}, {}
    for kind in ("forget", "retain"):
        spec = CorpusSpec(getattr(cfg, f"{kind}_data"), getattr(cfg, f"{kind}_subset"),
                          getattr(cfg, f"{kind}_split"), tuple(getattr(cfg, f"{kind}_fields")))
        if cfg.data_order == "reference":
            corpus = read_corpus_as_reference(spec, limit=cfg.num_train_examples, seed=cfg.seed,
                                              shuffles=2 if kind == "retain" else 0, what=f"{kind} corpus")
        else:
            corpus = read_corpus(spec, limit=cfg.num_train_examples, seed=cfg.seed, what=f"{kind} corpus")
        if len(corpus.texts) < cfg.global_batch_size:
            raise UserError(f"the {kind} corpus has {len(corpus.texts)} examples, fewer than one global batch "
                            f"({cfg.global_batch_size}); add data or lower global_batch_size")
        out[kind], texts[kind] = tokenize(corpus.texts, tokenizer, cfg.max_length), corpus.texts
        counts[kind] = _corpus_counts(cfg, corpus, count_truncated(corpus.texts, out[kind], tokenizer, cfg.max_length))
        _say_counts(f"{kind} corpus {spec.source}", corpus, counts[kind])
    keep = None
    if cfg.forget_keywords:
        keep = _keyword_masks(cfg, texts["forget"], out["forget"], tokenizer, counts["forget"])
    return Batches(out["forget"], out["retain"], tokenizer.pad_token_id, counts, keep)


def _keyword_masks(cfg: UnlearnConfig, texts: list[str], seqs: list[list[int]], tokenizer,
                   counts: dict) -> list[list[int]]:
    """The forget tokens ``forget_keywords`` names (:mod:`sequnlearn.data.keywords`); records in ``counts``
    (``corpora.forget`` in provenance.json) and prints (main process) how many count and how many forget
    examples have no match.

    Raises:
        UserError: a bad keyword list, a slow tokenizer, or a list that matches nothing in the forget examples.
    """
    from sequnlearn.data.keywords import keyword_masks, masks_line
    from sequnlearn.distributed import is_main
    from sequnlearn.runs import token_fingerprint

    masks = keyword_masks(cfg.forget_keywords, texts, seqs, tokenizer, cfg.max_length)
    counts.update({"keyword_list": cfg.forget_keywords, "keyword_unmatched": masks.unmatched,
                   "keyword_masked_tokens": masks.masked, "keyword_masked_share": round(masks.share, 6),
                   "keyword_masks_sha256": token_fingerprint(masks.positions)["token_ids_sha256"]})
    if is_main():
        print(masks_line(cfg.forget_keywords, masks), flush=True)
    return masks.positions


def _corpus_counts(cfg: UnlearnConfig, corpus: Corpus, truncated: int) -> dict:
    """What :func:`load_batches` records of one corpus (``corpora`` in provenance.json)."""
    return {"rows": corpus.rows, "skipped_empty": corpus.skipped, "requested": cfg.num_train_examples,
            "used": len(corpus.texts), "truncated": truncated, "max_length": cfg.max_length}


def _say_counts(name: str, corpus: Corpus, c: dict) -> None:
    """Print (main process only) the rows a corpus lost, its truncated documents, and a shortfall."""
    from sequnlearn.distributed import is_main
    from sequnlearn.errors import warn

    if not is_main():
        return
    line = losses_line(name, corpus, c["truncated"], c["max_length"])
    if line:
        print(line, flush=True)
    if c["used"] < c["requested"]:
        warn(f"{name} has {c['used']} usable documents, fewer than num_train_examples {c['requested']}; the run "
             f"trains on {c['used']} per layer (provenance.json and the model card say so); add data, or set "
             f"num_train_examples={c['used']} to silence this")


def check_resume(cfg: UnlearnConfig, run: RunDir) -> None:
    """Refuse to resume a run whose stored config differs from ``cfg`` (a key the stored config lacks,
    written before the key existed, counts as its default)."""
    diff = changed_keys(run.stored_config(raw=True), cfg)
    if diff:
        raise UserError(f"--resume: the run in {run.root} has a different config ({', '.join(diff)}); "
                        "resume with the same config or start a new --out")


def unlearn(cfg: UnlearnConfig, run: RunDir, *, resume: bool = False, proc: Process | None = None,
            on_checkpoint: Callable[[Position], None] | None = None,
            on_phase_end: Callable[[Unlearner, int, int], None] | None = None) -> RunDir:
    """Run all phases of ``cfg`` into the (prepared) run directory ``run``; returns it.

    ``proc``: this process (default: :meth:`Process.start`). ``on_checkpoint`` and ``on_phase_end``
    are passed to :meth:`Unlearner.train`. A finished run given with ``resume`` is returned as it is.
    While the run is written, its directory's lock refuses a second writer.

    Raises:
        UserError: bad input; with ``resume``, a config, corpus or model that differs from the run's.
    """
    from contextlib import ExitStack

    from sequnlearn.model.load import check_positions, load_model, model_fingerprint
    from sequnlearn.runs import hold_lock, run_fingerprints

    proc = proc or Process.start()
    with ExitStack() as held:
        if resume:  # the lock before anything is read that a resume rewrites (metrics, temp files)
            held.enter_context(hold_lock(run.root, main=proc.is_main))
            check_resume(cfg, run)
            if run.is_finished():
                return run
        check_tracker(cfg.report_to)
        check_optimizer(cfg)
        torch.manual_seed(cfg.seed)  # LoRA initialisation
        # Everything that can fail on bad input (model, data, layers, batch sizes) runs before the
        # first file is written into the run directory.
        model, tokenizer = load_model(cfg.model, dtype=cfg.weights_dtype(), device=str(proc.device), revision=cfg.revision)
        check_positions(model.config.to_dict(), cfg.max_length, cfg.model)
        engine = Unlearner(cfg, model, tokenizer, load_batches(cfg, tokenizer), run, proc)
        found = {**run_fingerprints(cfg, engine.data),
                 "model": model_fingerprint(cfg.model, model) if proc.is_main else None}  # written by the main one
        prov = read_json(run.provenance) if resume and run.provenance.exists() else provenance(str(proc.device))
        if resume:
            if proc.is_main:
                check_resume_inputs(prov, found, run)
            engine.load_checkpoint()  # a damaged checkpoint stops here, before anything is written
            prov.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            if proc.is_main:
                remove_stale_temp_files(run.root)  # a kill mid-write (e.g. of a checkpoint) leaves one
        prov.update(found)
        prov["num_processes"] = proc.world
        prov["target_layers"], prov["phase_steps"] = engine.layers, engine.phase_steps
        if proc.is_main:
            run.claim()
        if not resume:  # a new run: locked once created (a replacement's lock is held on run.final)
            held.enter_context(hold_lock(run.root, main=proc.is_main and run.final is None))
        _train_and_save(engine, run, prov, on_checkpoint, on_phase_end)
    return run


def _train_and_save(engine: Unlearner, run: RunDir, prov: dict, on_checkpoint, on_phase_end) -> None:
    """Write the config and provenance, train every phase, save the adapter and merged model, finish
    the provenance and write the model card."""
    from sequnlearn.modelcard import write_model_card

    cfg, proc = engine.cfg, engine.proc
    if proc.is_main:
        atomic_write_text(run.config, dump_yaml(cfg))
        write_json(run.provenance, prov)
    if cfg.report_to and proc.is_main:
        engine.tracker = open_tracker(cfg.report_to, run.name, run.root, {k: str(v) for k, v in cfg.to_dict().items()})
    engine.train(on_checkpoint, on_phase_end)
    engine.save()
    if proc.is_main:
        prov["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        prov["nan_skipped"] = engine.pos.nan_skipped
        write_json(run.provenance, prov)
        write_model_card(run)
        if engine.pos.nan_skipped:
            print(skipped_note(engine.pos.nan_skipped))
    if engine.tracker is not None:
        engine.tracker.finish()


def skipped_note(n: int) -> str:
    """The line that reports ``n`` micro-batches skipped as non-finite (``on_nan: skip``)."""
    return (f"warning: {n} micro-batch{'es' if n != 1 else ''} skipped as non-finite (on_nan: skip); the model "
            "was trained without them: check metrics.jsonl, and lower lr or the coefficients")


def check_resume_inputs(stored: dict, found: dict, run: RunDir) -> None:
    """Refuse to resume a run whose corpora or model changed since it started.

    ``stored``: the run's ``provenance.json``; ``found``: the fingerprints of what this command loaded
    (``data`` per corpus, ``model``). Fingerprints the stored provenance lacks (older runs) are not checked.

    Raises:
        UserError: a corpus's token ids or the model's weights differ from the run's.
    """
    changed = [f"the {kind} corpus" for kind, fp in (found.get("data") or {}).items()
               if kind in (stored.get("data") or {}) and stored["data"][kind] != fp]
    masks = [((p.get("corpora") or {}).get("forget") or {}).get("keyword_masks_sha256") for p in (stored, found)]
    if masks[0] is not None and masks[0] != masks[1]:
        changed.append("the forget keyword masks (forget_keywords)")  # the list's content changed
    old, new = stored.get("model") or {}, found.get("model") or {}
    if any(old.get(k) is not None and old[k] != new.get(k) for k in ("weights_sha256", "commit")):
        changed.append("the model's weights")  # also a hash the run had and this model cannot give
    if changed:
        raise UserError(f"--resume: {' and '.join(changed)} differ from what the run in {run.root} started with "
                        "(provenance.json); resume with the same inputs, or start a new --out")
