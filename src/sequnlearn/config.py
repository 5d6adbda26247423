"""Typed configs: one dataclass per command, a docstring per field, checks in ``__post_init__``.

A config is built from a preset (``presets/NAME.yaml``) or a YAML file, then ``key=value``
overrides. Unknown keys, wrong types and out-of-range values are :class:`UserError` s that
say what to change.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sequnlearn.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
LR_SCHEDULES = ("constant", "linear", "cosine")
SDPA_BACKENDS = ("auto", "default", "flash", "math")
"""Values of :attr:`UnlearnConfig.sdpa_backend`."""
CONTROLS = ("base", "retain-tuned", "benign", "no-answer")
"""The comparison attacks a tamper config can add (see :attr:`TamperConfig.controls`)."""
STYLES = ("letter", "cloze")
"""How a multiple-choice question is asked and scored: ``letter`` (lettered choices, the answer's letter)
or ``cloze`` (the answer's text)."""


@dataclass
class UnlearnConfig:
    """Everything that defines one sequential unlearning run (defaults: the reference table)."""

    model: str = "EleutherAI/deep-ignorance-unfiltered"
    """Hub id, local HF directory, or ``tiny:FAMILY`` for a random tiny model built from a config."""
    revision: str | None = None
    """Hub revision of the model (branch, tag or commit)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on GPU, fp32 on CPU; fp32 with ``method: full``, whose optimizer updates the
    weights themselves), fp32, bf16, fp16."""
    mixed_precision: str = "auto"
    """Autocast: auto (bf16 on GPU, none on CPU), no, bf16, fp16."""
    gradient_checkpointing: bool | None = None
    """Recompute layer activations in backward; None = on with a GPU, off on the CPU."""
    sharding: str = "auto"
    """Several processes: ``ddp`` (every process holds the model; adapter gradients all-reduced),
    ``fsdp`` (FSDP2 full shard: every decoder layer and the rest of the model sharded across the
    processes, gathered per layer), or ``auto`` (fsdp under ``accelerate launch`` with an FSDP config,
    else ddp)."""

    forget_data: str = "Unlearning/WMDP-Bio-Remove-Dataset"
    """Forget corpus: hub dataset id, local .jsonl/.json/.parquet/.txt, or ``tiny:forget``."""
    forget_subset: str | None = None
    """Hub dataset configuration name of the forget corpus."""
    forget_split: str = "train"
    """Split of the forget corpus."""
    forget_fields: list[str] = field(default_factory=lambda: ["title", "abstract", "text"])
    """Text fields of a forget record, joined by a blank line (empty ones skipped)."""
    retain_data: str = "EleutherAI/wikitext_document_level"
    """Retain corpus: hub dataset id, local file, or ``tiny:retain``."""
    retain_subset: str | None = "wikitext-103-raw-v1"
    """Hub dataset configuration name of the retain corpus."""
    retain_split: str = "train"
    """Split of the retain corpus."""
    retain_fields: list[str] = field(default_factory=lambda: ["page"])
    """Text fields of a retain record."""
    num_train_examples: int = 1024
    """Forget (and retain) examples per phase."""
    max_length: int = 2048
    """Tokens per example (longer texts are truncated; batches pad to their longest)."""

    layers: list[int] | None = None
    """Explicit target layers, back to front; None = layer_start..layer_end by layer_step."""
    layer_start: int | None = 28
    """First (deepest) target layer when ``layers`` is None; null = the model's last layer (with
    ``layer_end: 0, layer_step: 1``: every layer, back to front)."""
    layer_end: int = 16
    """Last (shallowest) target layer, inclusive."""
    layer_step: int = 4
    """Stride between target layers."""
    layer_order: str = "deepest_first"
    """The order ``layers`` must have: ``deepest_first`` (strictly descending: the back-to-front order
    the method is defined for) or ``any`` (any order, for experiments). A repeated layer is always refused."""

    forget_loss: str = "random_ce"
    """random_ce (cross-entropy to uniformly random targets / log V), max_entropy (KL to uniform / log V) or
    topk_entropy (KL to uniform over the ``forget_top_k`` largest logits at each token / log K: the
    reference authors' later top-K entropy) or npo (negative preference optimisation against the original
    model: ``npo_beta``, ``npo_reduction``)."""
    forget_top_k: int = 100
    """K of ``forget_loss: topk_entropy`` (2 to the vocabulary size)."""
    npo_beta: float = 0.1
    """β of ``forget_loss: npo`` (> 0): the loss is −(2/β)·mean log σ(−β·r), with r the log-ratio
    log π_cur − log π_orig of the actual next tokens, π_cur the forget path (current model to the
    boundary, then the suffix) and π_orig the original model (adapter off, no gradient)."""
    npo_reduction: str = "sequence"
    """Where ``forget_loss: npo`` sums its log-ratio r: ``sequence`` (r summed over each row's next
    tokens, mean over rows) or ``token`` (r of each next token on its own, mean over tokens)."""
    forget_keywords: str | None = None
    """A keyword list (``.txt``: one a line; ``.csv``: its ``keyword`` or ``term`` column, else its first)
    whose matches in the forget text (case-insensitive, longest first) choose the tokens the forget loss
    counts: those whose characters overlap a match (:mod:`sequnlearn.data.keywords`). A forget example
    without a match adds nothing and is counted (provenance.json, model card); a list that matches nothing
    is an error. None = every real token (the reference's method). Needs a fast tokenizer."""
    retain_loss: str = "l2"
    """l2 (hidden states of the retain layers), kl (KL(original ‖ current) on logits) or nll
    (cross-entropy of the current model on the retain text's next tokens, real tokens only)."""
    retain_layers: list[int] | str | None = None
    """Layers whose outputs enter the L2 retain loss; None = all; ``target`` = the output of each phase's
    target layer only (the reference authors' later L2, their ``hidden_states[L+1]``)."""
    remove_coef: float = 50.0
    """Forget coefficient; ramps remove_coef → 0.75·remove_coef."""
    forget_layer_scale: float = 1.0
    """Forget coefficient by depth (the reference authors' ``forget_layer_scale``): phase L's forget
    coefficient is multiplied by ``1 + (s − 1)·(L0 − L) / max(L0, 1)``, L0 the first target layer, so the
    first layer gets 1× and layer 0 gets s×. 1 = off (today's runs); needs the layers deepest first."""
    retain_coef: float = 5.0
    """Retain coefficient; ramps 0 → retain_coef (from ``retain_ramp_start``·retain_coef when that is set)."""
    retain_ramp_start: float = 0.0
    """Where the retain ramp starts, s in [0, 1]: the retain coefficient is retain_coef·(s + (1 − s)·p) at
    ramp progress p (:func:`~sequnlearn.unlearn.schedule.coefficients`). 0 = the reference's ramp from 0;
    the reference authors' full-parameter code uses 0.25 (its ``ramp_retain_from_zero: false``)."""
    schedule_scope: str = "phase"
    """Ramp over each layer's phase (phase) or once over the whole run (run)."""
    ramp_unit: str = "step"
    """What the coefficient ramps count: ``step`` (p = optimizer step / (steps − 1), the same for every
    micro-batch of a step) or ``micro_batch`` (the reference code: p = min(1, k / K) with k this
    process's micro-batch index in the phase and K = num_train_examples / (per_device_batch_size ×
    processes), so the coefficients change inside an optimizer step and p never quite reaches 1)."""
    forget_boundary: str = "output"
    """Where the forget path hands over to the original model at target layer L: ``output`` (the
    current model runs layers 0..L, the original L+1..N-1: what the reference's prose says) or
    ``input`` (the current model's ``hidden_states[L]``, i.e. the input of layer L, through the
    original's layers L..N-1: what the reference code did)."""
    forget_suffix: str = "original"
    """How the forget path runs the layers after the boundary: ``original`` (as the original model, adapter
    off / stashed weights: the reference) or ``current`` (as the current model, so the forget logits are the
    current model's own, as the reference authors' later full-parameter code takes them; with LoRA the
    suffix's adapter weights then get forget gradients too)."""
    l2_reduction: str = "real_tokens"
    """How the L2 retain loss averages: ``real_tokens`` (mean over the retain layers' outputs of the
    per-token norm, real tokens only) or ``padded_states`` (the reference code: the N+1 stacked
    ``output_hidden_states`` — embeddings, outputs of layers 0..N-2, final-norm output — with pads
    counted as zeros at ``max_length`` positions per row; needs ``retain_layers: null``)."""
    data_order: str = "shuffle"
    """Which examples and in which order: ``shuffle`` (each corpus shuffled with ``seed``, first
    ``num_train_examples`` kept; forget and retain drawn in independent orders every phase) or
    ``reference`` (the reference code: the first forget records in file order, all text fields joined
    by a blank line; retain records shuffled as ``datasets``' ``shuffle(seed)`` does, the first kept and
    shuffled again; pairs (forget i, retain i) visited in ``randperm(n)`` order seeded with
    ``seed + epoch``, the same order in every phase, as the HF Trainer's sampler did)."""

    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    target_modules: str | list[str] = "all-linear"
    """all-linear (all but the output head), peft-default, or a list of module names."""
    method: str = "lora"
    """What trains: ``lora`` (one LoRA adapter over the model, merged into ``model/`` at the end, saved in
    ``adapter/``: the reference) or ``full`` (the weights themselves: in phase L only decoder block L, plus
    the ``maintained_layers``, trains; every other tensor stays bit-identical to the base model; embeddings,
    final norm and head never train; the original model is a frozen copy of the blocks that train, taken
    before their first update; ``model/`` is the trained model, no ``adapter/``). The LoRA keys are ignored
    under ``full``. ``full`` does not run FSDP-sharded (use ``sharding: ddp``)."""
    maintained_layers: list[int] | None = None
    """With ``method: full``, decoder blocks that train in every phase besides the phase's target block
    (e.g. the layers already unlearned, as the reference authors' ``maintain_unlearned`` keeps training
    them); None = none."""

    lr: float = 1e-3
    """Peak learning rate (of AdamW, and with ``optimizer: muon`` of Muon too)."""
    lr_schedule: str = "constant"
    """Learning-rate schedule: constant, linear (decay to 0: the HF Trainer's default, which the
    reference code used) or cosine (to 0), each after ``warmup_steps`` of linear warmup. It spans
    one phase when ``optimizer_scope`` is phase (restarting at each phase), else the whole run."""
    warmup_steps: int = 0
    """Linear warmup steps at the start of the schedule."""
    optimizer_scope: str = "run"
    """``run``: one AdamW through all phases; ``phase``: a fresh AdamW (empty moments) and a restarted
    lr schedule at each phase start, as the reference code's new HF Trainer per layer did."""
    weight_decay: float = 0.01
    """AdamW weight decay (decoupled; Muon's too with ``optimizer: muon``)."""
    optimizer: str = "adamw"
    """``adamw`` (torch's fused AdamW over every trained parameter) or ``muon`` (the reference authors'
    ``MuonAdamW``: ``torch.optim.Muon`` with Nesterov momentum ``muon_momentum`` and the
    ``match_rms_adamw`` lr adjustment (lr × 0.2·√max(rows, cols), so ``lr`` means what it means for AdamW)
    for the 2-D matrices inside the decoder blocks, LoRA factors included; AdamW with betas (0.9, 0.95)
    for the rest: embeddings, head, norms, biases). Needs torch ≥ 2.9."""
    muon_momentum: float = 0.95
    """Momentum of Muon (``optimizer: muon``)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 disables."""
    per_device_batch_size: int = 4
    """Examples per micro-batch per process."""
    global_batch_size: int = 32
    """Examples per optimizer step over all processes (accumulation is derived)."""
    epochs_per_layer: int = 1
    """Passes over the examples in each layer's phase."""
    steps_per_layer: int | None = None
    """Optimizer steps of each layer's phase; None = ``epochs_per_layer`` × (examples // global_batch_size).
    A phase longer than one pass keeps drawing batches from the next pass's order."""
    deep_layer_step_scale: float = 1.0
    """Steps by depth (the reference authors' ``deep_layer_step_scale``): phase L runs
    ``max(1, int(steps·(1 + (s − 1)·(L0 − L) / max(L0, 1))))`` optimizer steps, L0 the first target layer
    and steps as ``steps_per_layer`` says. 1 = every phase the same length; needs the layers deepest first."""
    seed: int = 42
    """Seed of data order, random targets, LoRA init and dropout."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every k optimizer steps (and at each phase end); 0 = phase ends only."""
    on_nan: str = "stop"
    """A non-finite loss or gradient norm: stop (raise with the step, layer and values) or skip (drop that
    micro-batch, or the whole optimizer step for a non-finite gradient, and count the micro-batches in
    ``nan_skipped``: metrics, provenance, model card, the end of the output). Either way a run whose
    merged weights are not all finite, or a phase none of whose steps was applied, fails."""
    grad_filter: str = "none"
    """How each micro-batch's forget gradient g_f and retain gradient g_r (per process) combine, elementwise:
    ``none`` (g_f + g_r), ``same_sign`` ((g_f + g_r) where g_f·g_r > 0, else 0) or ``same_sign_asymmetric``
    (g_f where g_f·g_r > 0, else 0, plus g_r): the reference authors' later same-sign filtering. The share
    of elements that agree is logged as ``same_sign_share``. Not FSDP-sharded."""
    l2sp_coef: float = 0.0
    """L2-SP: adds ``l2sp_coef``·Σ‖θ − θ₀‖² over the trained weights of each phase's target block to the
    retain side of the objective (with LoRA, θ − θ₀ of a wrapped weight is its delta scale·B·A); 0 = off.
    Not FSDP-sharded."""
    report_to: str | None = None
    """Also log to tensorboard or wandb through accelerate's trackers."""

    sdpa_backend: str = "auto"
    """Attention kernels of the step's forward and backward: ``flash`` (PyTorch's flash and memory-efficient
    SDPA kernels only: one kernel for any sequence length, where cuDNN attention builds a new plan for every
    new length), ``math``, ``default`` (PyTorch's choice) or ``auto`` (flash on a GPU, default on the CPU).
    The same numbers up to kernel rounding (tested)."""
    row_group_tokens: int | None = None
    """What one more forward and backward pass costs, in padded tokens: a micro-batch is split into row
    groups only where that saves more padding than this per extra group. None = auto: 256 on the CPU
    (compute-bound), 8192 on a GPU (a pass costs thousands of kernel launches; padding is cheap)."""
    pad_multiple: int | None = None
    """Each row group is padded to a multiple of this many tokens, so that sequence lengths (and the
    kernels' shapes) repeat from step to step. None = auto: 1 on the CPU, 64 on a GPU."""
    head_chunk_rows: int | None = None
    """Tokens whose logits the fused head losses form at once (memory against kernel launches). None =
    auto: 256 on the CPU, 2048 on a GPU."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        _choice("dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        _choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        _choice("forget_loss", self.forget_loss, ("random_ce", "max_entropy", "topk_entropy", "npo"))
        _at_least("forget_top_k", self.forget_top_k, 2)
        if self.forget_keywords is not None and Path(self.forget_keywords).suffix.lower() not in (".txt", ".csv"):
            raise UserError(f"forget_keywords {self.forget_keywords!r} is not a .txt or .csv keyword list; give "
                            "one keyword a line (.txt) or a CSV with a keyword column, or null")
        _choice("retain_loss", self.retain_loss, ("l2", "kl", "nll"))
        self._check_upstream_losses()
        _choice("schedule_scope", self.schedule_scope, ("phase", "run"))
        _choice("ramp_unit", self.ramp_unit, ("step", "micro_batch"))
        _choice("forget_boundary", self.forget_boundary, ("output", "input"))
        _choice("l2_reduction", self.l2_reduction, ("real_tokens", "padded_states"))
        _choice("data_order", self.data_order, ("shuffle", "reference"))
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("optimizer_scope", self.optimizer_scope, ("run", "phase"))
        self._check_method()
        _choice("optimizer", self.optimizer, ("adamw", "muon"))
        if not 0 <= self.muon_momentum < 1:
            raise UserError(f"muon_momentum must be in [0, 1) (got {self.muon_momentum})")
        if self.l2_reduction == "padded_states" and self.retain_layers is not None:
            raise UserError("l2_reduction padded_states averages all hidden states; drop retain_layers "
                            "or use l2_reduction real_tokens")
        _choice("on_nan", self.on_nan, ("stop", "skip"))
        _choice("report_to", self.report_to, (None, "tensorboard", "wandb"))
        _choice("sharding", self.sharding, ("auto", "ddp", "fsdp"))
        _choice("sdpa_backend", self.sdpa_backend, SDPA_BACKENDS)
        for name in ("row_group_tokens",):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 0)
        for name in ("pad_multiple", "head_chunk_rows"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        for name in ("remove_coef", "retain_coef", "weight_decay", "max_grad_norm", "checkpoint_every",
                     "warmup_steps"):
            _at_least(name, getattr(self, name), 0)
        for name in ("lora_r", "lora_alpha", "num_train_examples", "max_length", "per_device_batch_size",
                     "global_batch_size", "epochs_per_layer"):
            _at_least(name, getattr(self, name), 1)
        if self.lr <= 0:
            raise UserError(f"lr must be > 0 (got {self.lr})")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        _choice("layer_order", self.layer_order, ("deepest_first", "any"))
        if self.layers is not None:
            check_layer_list(self.layers, self.layer_order)
        self._check_layer_schedule()
        if self.global_batch_size % self.per_device_batch_size:
            raise UserError(f"global_batch_size {self.global_batch_size} is not a multiple of per_device_batch_size "
                            f"{self.per_device_batch_size}; change one of them")
        if self.num_train_examples < self.global_batch_size:
            raise UserError(f"num_train_examples {self.num_train_examples} is fewer than one global batch "
                            f"({self.global_batch_size}); raise it or lower global_batch_size")

    def _check_upstream_losses(self) -> None:
        """NPO, ``retain_layers: target``, the gradient filter and L2-SP (``__post_init__``)."""
        if self.npo_beta <= 0:
            raise UserError(f"npo_beta must be > 0 (got {self.npo_beta})")
        _choice("npo_reduction", self.npo_reduction, ("sequence", "token"))
        if isinstance(self.retain_layers, str) and self.retain_layers != "target":
            raise UserError(f"retain_layers {self.retain_layers!r} is not valid; give a list of layers, null (all) "
                            "or target (each phase's target layer)")
        _choice("grad_filter", self.grad_filter, ("none", "same_sign", "same_sign_asymmetric"))
        _at_least("l2sp_coef", self.l2sp_coef, 0)

    def _check_method(self) -> None:
        """``method``, ``maintained_layers``, ``forget_suffix`` and ``retain_ramp_start`` (``__post_init__``)."""
        _choice("method", self.method, ("lora", "full"))
        _choice("forget_suffix", self.forget_suffix, ("original", "current"))
        if not 0 <= self.retain_ramp_start <= 1:
            raise UserError(f"retain_ramp_start must be in [0, 1] (got {self.retain_ramp_start})")
        if self.maintained_layers is not None:
            if self.method != "full":
                raise UserError("maintained_layers train whole decoder blocks; set method: full or drop maintained_layers")
            bad = [x for x in self.maintained_layers if x < 0]
            if bad or len(set(self.maintained_layers)) != len(self.maintained_layers):
                raise UserError(f"maintained_layers {self.maintained_layers} must be distinct layer indices >= 0; "
                                "give each layer once")
        if self.method == "full" and self.sharding == "fsdp":
            raise UserError("method full does not run FSDP-sharded (its frozen original blocks are kept whole on "
                            "every process); use sharding: ddp")
        if self.method == "full" and self.dtype in ("bf16", "fp16"):
            raise UserError(f"method full with {self.dtype} weights loses small updates to rounding (lr 1e-4 leaves "
                            "most weights unchanged); use dtype auto or fp32 (fp32 weights, bf16 autocast on a GPU)")

    def weights_dtype(self) -> str:
        """The dtype to load the model in (see ``dtype``): fp32 for ``method: full`` under ``auto``."""
        return "fp32" if self.method == "full" and self.dtype == "auto" else self.dtype

    def _check_layer_schedule(self) -> None:
        """Steps per layer and the depth scales (``__post_init__``)."""
        if self.steps_per_layer is not None:
            _at_least("steps_per_layer", self.steps_per_layer, 1)
            if self.epochs_per_layer != 1:
                raise UserError(f"steps_per_layer {self.steps_per_layer} and epochs_per_layer {self.epochs_per_layer} "
                                "both set the length of a phase; keep one of them")
        for name in ("forget_layer_scale", "deep_layer_step_scale"):
            _at_least(name, getattr(self, name), 1.0)
        scaled = [n for n in ("forget_layer_scale", "deep_layer_step_scale") if getattr(self, n) != 1.0]
        if scaled and self.layers is not None and self.layers != sorted(self.layers, reverse=True):
            raise UserError(f"{' and '.join(scaled)} scale by depth below the first target layer, so the layers must "
                            f"be deepest first; give {sorted(self.layers, reverse=True)} or drop {scaled[0]}")

    def target_layers(self, num_layers: int | None = None) -> list[int]:
        """The target layers, back to front; ``layer_start: null`` is the last of the model's ``num_layers``.

        Raises:
            UserError: ``layer_start`` is null and ``num_layers`` not given, or ``layer_end`` lies beyond the model.
        """
        if self.layers is None and self.layer_start is None:
            if num_layers is None:
                raise UserError("layer_start null means the model's last layer, which is known only once the model "
                                "is loaded; give layer_start as a number here")
            if self.layer_end > num_layers - 1:
                raise UserError(f"layer_end {self.layer_end} is beyond this model's last layer {num_layers - 1} "
                                f"(layer_start null); choose layer_end within 0..{num_layers - 1}")
        return stored_target_layers(self.to_dict(), num_layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TamperConfig:
    """A fine-tuning attack on an unlearned model (defaults: the reference protocol)."""

    data: str = "Unlearning/WMDP-Bio-Remove-Dataset"
    """Attack corpus: hub id or local .jsonl/.json/.parquet/.txt (forget text; benign text for a control)."""
    data_subset: str | None = None
    """Hub dataset configuration name of the attack corpus."""
    data_split: str = "train"
    """Split of the attack corpus."""
    data_fields: list[str] = field(default_factory=lambda: ["title", "abstract", "text"])
    """Text fields of a record, joined by a blank line."""
    num_train_examples: int | None = None
    """Documents taken from the corpus (None = all)."""
    data_order: str = "shuffle"
    """Which documents: ``shuffle`` (shuffled with seed 0, the first ``num_train_examples``) or
    ``reference`` (``datasets``' ``shuffle(data_seed).select(range(num_train_examples))``)."""
    data_seed: int = 42
    """Seed of the ``reference`` document selection."""
    max_length: int = 2048
    """Tokens per training chunk."""
    chunking: str = "stream"
    """``stream``: documents joined with EOS and cut into ``max_length`` chunks; ``document``: each
    document cut on its own into chunks of at most ``max_length`` (the last one shorter, padded in its
    batch and left out of the loss), at most ``max_chunks_per_doc`` of them (the reference attack)."""
    max_chunks_per_doc: int | None = None
    """With ``chunking: document``, the first this many chunks of each document (None = all)."""
    steps: int | None = 100
    """Optimizer steps of the attack; None = one epoch over the chunks (chunks // batch_size)."""
    eval_every: int = 10
    """Evaluate every k steps (step 0 included)."""
    table_steps: list[int] | None = None
    """Steps shown as columns of ``tamper.md`` (e.g. the reference's [0, 10, 100]); None = step 0,
    the first evaluation and the last step."""
    lrs: list[float] = field(default_factory=lambda: [2e-5])
    """Learning rates, one attack per learning rate and seed."""
    seeds: list[int] = field(default_factory=lambda: [42])
    """Seeds (data order), one attack per learning rate and seed."""
    batch_size: int = 16
    """Effective batch in chunks per optimizer step."""
    per_device_batch_size: int = 4
    """Chunks per forward pass (gradient accumulation makes up the rest)."""
    lr_schedule: str = "constant"
    """constant, linear (decay to 0 at the last step, the HF Trainer's default) or cosine, each after
    ``warmup_steps`` of linear warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 0.0
    """Gradient-norm clip; 0 disables."""
    optimizer: str = "adamw"
    """adamw, adamw_8bit or paged_adamw_8bit (the last two need bitsandbytes and a GPU)."""
    method: str = "full"
    """full (every parameter) or lora."""
    sharding: str = "auto"
    """Several processes: ddp (each holds the model, gradients all-reduced), fsdp (FSDP2: every
    decoder layer and the rest of the model sharded; every process then takes part in each
    evaluation), or auto (fsdp under ``accelerate launch`` with an FSDP config, else ddp)."""
    lora_r: int = 16
    """LoRA rank when method is lora."""
    lora_targets: str | list[str] = "all-linear"
    """LoRA target modules when method is lora."""
    forget_task: str = "wmdp_bio_robust"
    """Forget evaluation: a task name or an MCQ file."""
    retain_task: str | None = None
    """Optional retain evaluation: a task name or an MCQ file."""
    eval_style: str = "letter"
    """letter or cloze scoring."""
    eval_limit: int | None = None
    """At most this many questions per subtask."""
    eval_batch_size: int = 16
    """Sequences per evaluation forward pass."""
    dtype: str = "auto"
    """Weights dtype. auto: fp32 for a full fine-tune with AdamW (fp32 master weights and optimizer
    state, so an update of lr 2e-5 is not lost to bf16 rounding), else bf16 on a GPU and fp32 on the
    CPU. bf16/fp16 weights with a full AdamW fine-tune are refused (use adamw_8bit or lora)."""
    mixed_precision: str = "auto"
    """Autocast of the attack's forward: auto (bf16 on a GPU, none on the CPU), no, bf16."""
    gradient_checkpointing: bool | None = None
    """None = on with a GPU."""
    controls: list[str] = field(default_factory=list)
    """Attacks to compare the attacked models with (each with the same settings, lrs and seeds):
    ``base`` (the relearning baseline: the model before unlearning, which knows the forget answers),
    ``retain-tuned`` (the model before unlearning after as many steps of the same fine-tune on
    ``benign_data``: as much training, no unlearning), ``benign`` (each attacked model fine-tuned
    on ``benign_data`` instead of the attack corpus: does unrelated text bring the answers back?) and
    ``no-answer`` (each attacked model fine-tuned on ``no_answer_data``: text about the same subjects
    that does not state the scored answers — does the attack teach the answers, or bring back what the
    model still holds?)."""
    no_answer_data: str | None = None
    """Corpus of the ``no-answer`` control (hub id or local file, read with ``data_fields``): the attack
    corpus's subjects without the scored answers (the toy world's ``corpus/forget_no_answers.jsonl``)."""
    benign_data: str | None = None
    """Benign corpus of the ``retain-tuned`` and ``benign`` controls (hub id or local file), read
    with ``benign_fields``; the retain corpus of the unlearning run is the natural choice."""
    benign_subset: str | None = None
    """Hub dataset configuration name of the benign corpus."""
    benign_fields: list[str] = field(default_factory=lambda: ["text"])
    """Text fields of a benign record, joined by a blank line."""

    def weights_dtype(self) -> str:
        """The dtype to load the attacked weights in (see ``dtype``)."""
        if self.dtype == "auto" and self.method == "full" and self.optimizer == "adamw":
            return "fp32"
        return self.dtype

    def __post_init__(self) -> None:
        coerce_fields(self)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("data_order", self.data_order, ("shuffle", "reference"))
        _choice("chunking", self.chunking, ("stream", "document"))
        _choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        _choice("optimizer", self.optimizer, ("adamw", "adamw_8bit", "paged_adamw_8bit"))
        _choice("method", self.method, ("full", "lora"))
        _choice("sharding", self.sharding, ("auto", "ddp", "fsdp"))
        _choice("eval_style", self.eval_style, STYLES)
        _choice("dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        for name in ("eval_every", "batch_size", "per_device_batch_size", "max_length", "lora_r",
                     "eval_batch_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("steps", "max_chunks_per_doc"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        _at_least("warmup_steps", self.warmup_steps, 0)
        _at_least("max_grad_norm", self.max_grad_norm, 0)
        _at_least("weight_decay", self.weight_decay, 0)
        if self.method == "full" and self.optimizer == "adamw" and self.dtype in ("bf16", "fp16"):
            raise UserError(f"a full fine-tune with AdamW on {self.dtype} weights loses small updates to rounding "
                            "(lr 2e-5 leaves most weights unchanged), which understates the attack; use dtype "
                            "auto or fp32 (fp32 master weights, bf16 autocast), optimizer adamw_8bit, or method lora")
        if self.max_chunks_per_doc is not None and self.chunking != "document":
            raise UserError("max_chunks_per_doc needs chunking: document")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise UserError(f"lrs must be positive learning rates (got {self.lrs})")
        if not self.seeds:
            raise UserError("seeds is empty; give at least one seed")
        unknown = sorted(set(self.controls) - set(CONTROLS))
        if unknown:
            raise UserError(f"controls {unknown} unknown; choose from {', '.join(CONTROLS)}")
        if "no-answer" in self.controls and not self.no_answer_data:
            raise UserError("control no-answer fine-tunes on text without the scored answers; set no_answer_data "
                            "(the toy world's corpus/forget_no_answers.jsonl)")
        if {"retain-tuned", "benign"} & set(self.controls) and not self.benign_data:
            raise UserError("controls retain-tuned and benign fine-tune on benign text; set benign_data "
                            "(e.g. the unlearning run's retain corpus)")
        if self.batch_size % self.per_device_batch_size:
            raise UserError(f"batch_size {self.batch_size} is not a multiple of per_device_batch_size "
                            f"{self.per_device_batch_size}; change one of them")


def layer_order(start: int, end: int, step: int) -> list[int]:
    """Target layers from ``start`` down to ``end`` inclusive (28, 16, 4 → [28, 24, 20, 16]).

    Raises:
        UserError: ``step`` is not positive or ``start < end`` (not back-to-front).
    """
    if step <= 0:
        raise UserError(f"layer_step must be positive (got {step}); layers run from layer_start down to layer_end")
    if start < end:
        raise UserError(f"layer_start {start} < layer_end {end}: unlearning runs back to front; swap them")
    return list(range(start, end - 1, -step))


def stored_target_layers(cfg: dict, num_layers: int | None = None) -> list[int] | None:
    """The target layers of a stored config (``config.yaml``): ``layers``, else ``layer_start..layer_end``
    by ``layer_step``; None where ``layer_start`` is null (the model's last layer) and ``num_layers`` unknown."""
    if cfg.get("layers"):
        return [int(x) for x in cfg["layers"]]
    if cfg.get("layer_start") is None and num_layers is None:
        return None
    start = num_layers - 1 if cfg.get("layer_start") is None else int(cfg["layer_start"])
    return layer_order(start, int(cfg.get("layer_end", 16)), int(cfg.get("layer_step", 4)))


def check_layer_list(layers: list[int], order: str = "deepest_first") -> None:
    """Check an explicit ``layers`` list: not empty, no layer twice, and (``order`` deepest_first) strictly
    descending.

    Raises:
        UserError: the list is empty, repeats a layer, or is not deepest first.
    """
    if not layers:
        raise UserError("layers is an empty list; give target layers back to front or drop the key")
    repeated = sorted({x for x in layers if layers.count(x) > 1})
    if repeated:
        raise UserError(f"layers {layers} repeat layer {', '.join(map(str, repeated))}; give each target layer once")
    if order == "deepest_first" and layers != sorted(layers, reverse=True):
        raise UserError(f"layers {layers} are not deepest first (unlearning runs back to front); give "
                        f"{sorted(layers, reverse=True)}, or set layer_order: any to run them in this order")


def defaults(cls) -> dict[str, Any]:
    """The default value of every field of config class ``cls``."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(cls)}


def with_defaults(stored: dict, cls=None) -> dict[str, Any]:
    """A stored config (``config.yaml``) with the keys it lacks, added to ``cls`` (default
    :class:`UnlearnConfig`) after it was written, at their defaults: what that run ran with."""
    return {**defaults(cls or UnlearnConfig), **stored}


def changed_keys(stored: dict, cfg) -> list[str]:
    """The keys whose value in a stored config (``config.yaml``, ``tamper.json``'s ``config``) differs from
    ``cfg``'s, sorted; a key the stored config lacks (added after it was written) counts as its default."""
    stored, now = with_defaults(stored, type(cfg)), asdict(cfg)
    return sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))


def check_style(style, name: str = "style") -> None:
    """Check a question style.

    Raises:
        UserError: ``style`` is not one of :data:`STYLES`.
    """
    if style not in STYLES:
        raise UserError(f"{name} {style!r} is unknown; use one of {', '.join(STYLES)}")


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise UserError(f"{name} {value!r} is not valid; use one of {shown}")


def _at_least(name: str, value, low) -> None:
    if value < low:
        raise UserError(f"{name} must be >= {low} (got {value})")


def coerce_fields(obj) -> None:
    """Check (and where lossless, convert) each field's value to its declared type."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        object.__setattr__(obj, f.name, _coerce(f.name, value, hints[f.name]))  # frozen dataclasses too


def _coerce(name: str, value, tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(name, value, arm)
            except UserError as e:
                errors.append(e)
        raise errors[-1]
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"{name} must be null")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list (got {value!r})")
        (item,) = typing.get_args(tp)
        return [_coerce(name, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{name} must be an integer (got {value!r})")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"{name} must be a number (got {value!r})")
        if not math.isfinite(number):  # nan, inf, .nan, .inf: a typo, never a setting
            raise UserError(f"{name} must be a finite number, not {value!r}; fix its value")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes (mixed_precision=no) as a boolean
            return "yes" if value else "no"
        raise UserError(f"{name} must be a string (got {value!r})")
    return value


def presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping (through :func:`sequnlearn.io.read_yaml`).

    Raises:
        UserError: missing or unreadable file, not UTF-8, syntax error, or not a mapping.
    """
    from sequnlearn import io

    return io.read_yaml(path, "config file")


PRESET_NEEDS = "needs"
"""A preset's list of config keys it cannot ship a value for (a user's keyword list): loading the preset
gives the key's default, and :func:`check_preset_needs` refuses to run it until the user sets each one."""


def _preset_file(name: str) -> dict:
    """The mapping in ``presets/NAME.yaml``, :data:`PRESET_NEEDS` included.

    Raises:
        UserError: no such preset (the message lists them).
    """
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, presets(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown preset {name!r}; {hint}available: {', '.join(presets())}")
    return read_yaml(path)


def preset_dict(name: str) -> dict:
    """The config mapping of preset ``name`` (without :data:`PRESET_NEEDS`).

    Raises:
        UserError: no such preset (the message lists them).
    """
    data = _preset_file(name)
    data.pop(PRESET_NEEDS, None)
    return data


def preset_needs(name: str) -> list[str]:
    """The keys preset ``name`` needs the user to set (its :data:`PRESET_NEEDS` list; empty for most).

    Raises:
        UserError: no such preset, or a ``needs`` that is not a list of key names.
    """
    needs = _preset_file(name).get(PRESET_NEEDS) or []
    if not isinstance(needs, list) or not all(isinstance(k, str) for k in needs):
        raise UserError(f"preset {name!r}: {PRESET_NEEDS} must be a list of config keys (got {needs!r})")
    return needs


def check_preset_needs(name: str, cfg) -> None:
    """Refuse to run preset ``name`` while a key it needs (:func:`preset_needs`) is still unset (None) in ``cfg``.

    Raises:
        UserError: one line naming the key and how to set it.
    """
    missing = [k for k in preset_needs(name) if getattr(cfg, k, None) is None]
    if missing:
        raise UserError(f"preset {name} needs {missing[0]}, which it cannot ship (see the comment in "
                        f"{PRESET_DIR / (name + '.yaml')}); give it: --set {missing[0]}=... or in --config")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``lr=1e-4``, ``layers=[3,2]``)."""
    if "=" not in text:
        raise UserError(f"--set {text!r} is not key=value; write e.g. --set remove_coef=20")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build(cls, data: dict):
    """Make a ``cls`` config from a mapping, rejecting unknown keys with a suggestion.

    Raises:
        UserError: unknown key, wrong type, or a value out of range.
    """
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise UserError(f"unknown config key {key!r}; {hint}")
    return cls(**data)


def load_config(cls=UnlearnConfig, *, preset: str | None = None, config_file: str | None = None,
                overrides: list[str] = ()):
    """Preset or YAML file, then ``key=value`` overrides → a validated ``cls``."""
    data: dict = {}
    if preset:
        data.update(preset_dict(preset))
    if config_file:
        data.update(read_yaml(Path(config_file)))
    for item in overrides:
        key, value = parse_override(item)
        data[key] = value
    return build(cls, data)


def dump_yaml(cfg) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
