"""The one place that knows model architectures.

It finds the decoder layers, final norm and output head of a causal LM, and runs any
contiguous range of decoder layers from a hidden state with the position embeddings and
attention mask the model itself would use. With it the engine runs the *current* model up
to layer L and the *original* model (adapter off) from L+1 to the logits. In full-parameter mode the
original of a trained block is its stashed weights (:attr:`Architecture.originals`), run in its place.

Supported: GPT-NeoX (Pythia, deep-ignorance), the Llama family (Llama, Mistral, Qwen2,
Qwen3, OLMo, OLMo-2: ``model.layers`` / ``model.norm`` / ``lm_head``) and GPT-2. Anything
else is a :class:`UserError`, never a guess.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from sequnlearn.errors import UserError

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")
SUPPORTED = ("gpt_neox", "gpt2", *LLAMA_FAMILY)


@dataclass
class LayerContext:
    """Per-batch inputs every decoder layer needs besides the hidden state.

    Attributes:
        masks: attention mask per attention type (``full_attention``/``sliding_attention``),
            as built by transformers' mask utilities (may be ``None`` for no padding).
        position_ids: ``(1, T)`` positions 0..T-1 (right padding keeps real tokens first).
        position_embeddings: rotary ``(cos, sin)`` or ``None`` (GPT-2).
    """

    masks: dict
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class Architecture:
    """Handles to the parts of one causal LM (works through a peft wrapper)."""

    family: str
    base: nn.Module  # the transformer body: gpt_neox / model / transformer
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    config: object
    _tuners: dict = field(default_factory=dict, repr=False)
    originals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    """Full-parameter mode: per trained decoder block, its original (frozen) parameters by name within the
    block; a layer run "adapter off" runs with these. A block not here is its own original."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Token (and for GPT-2 absolute position) embeddings: ``(B, T)`` → ``(B, T, D)``."""
        if self.family == "gpt_neox":
            return self.base.emb_dropout(self.base.embed_in(input_ids))
        if self.family == "gpt2":
            h = self.base.wte(input_ids) + self.base.wpe(ctx.position_ids)
            return self.base.drop(h)
        return self.base.embed_tokens(input_ids)

    def context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> LayerContext:
        """Masks, positions and rotary embeddings for a right-padded ``(B, T)`` batch.

        ``attention_mask`` None: the causal mask alone (right padding: no real token attends to a pad).
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        T = input_ids.shape[1]
        position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        dtype = self.head.weight.dtype
        probe = torch.empty(input_ids.shape[0], T, 1, device=input_ids.device, dtype=dtype)  # (B, T, 1)
        # No position ids for the mask: transformers reads them only to detect packed sequences, which
        # costs a host-device synchronisation; positions here are always 0..T-1.
        kw = dict(config=self.config, inputs_embeds=probe, attention_mask=attention_mask,
                  past_key_values=None, position_ids=None)
        masks = {"full_attention": create_causal_mask(**kw)}
        if "sliding_attention" in self._attention_types():
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        rope = None
        if self.family != "gpt2":
            rope = self.base.rotary_emb(probe, position_ids=position_ids)
        return LayerContext(masks, position_ids, rope)

    def _attention_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        sliding = self.family == "mistral" and getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * self.num_layers

    def call_layer(self, i: int, h: torch.Tensor, ctx: LayerContext,
                   weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Run decoder layer ``i``: ``(B, T, D)`` → ``(B, T, D)``; with ``weights`` (parameters by name
        within the layer) in place of its own, through ``torch.func.functional_call``."""
        layer = self.layers[i]
        mask = ctx.masks[self._attention_types()[i]]
        if self.family == "gpt2":
            args, kwargs = (h, None, mask), dict(position_ids=ctx.position_ids, use_cache=False)
        else:
            args, kwargs = (h,), dict(attention_mask=mask, position_ids=ctx.position_ids,
                                      position_embeddings=ctx.position_embeddings, use_cache=False)
        out = layer(*args, **kwargs) if weights is None else torch.func.functional_call(layer, weights, args, kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: ``(B, T, D)`` → ``(B, T, V)``."""
        return self.head(self.norm(h))

    def tuners(self, i: int) -> list[nn.Module]:
        """The peft adapter layers inside decoder layer ``i`` (empty without an adapter)."""
        if i not in self._tuners:
            from peft.tuners.tuners_utils import BaseTunerLayer

            tuners = [m for m in self.layers[i].modules() if isinstance(m, BaseTunerLayer)]
            if any(not hasattr(t, "_disable_adapters") for t in tuners):
                raise RuntimeError("this peft version has no per-layer adapter flag; pin peft as pyproject.toml does")
            self._tuners[i] = tuners
        return self._tuners[i]


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF ``PreTrainedModel`` under a peft wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def architecture(model: nn.Module) -> Architecture:
    """Find the decoder layers, final norm and head of ``model``.

    Raises:
        UserError: the model type is not supported.
    """
    hf = _unwrap(model)
    cfg = hf.config
    mt = getattr(cfg, "model_type", type(hf).__name__)
    if mt == "gpt_neox":
        body = hf.gpt_neox
        return Architecture(mt, body, body.layers, body.final_layer_norm, hf.get_output_embeddings(), cfg)
    if mt == "gpt2":
        body = hf.transformer
        return Architecture(mt, body, body.h, body.ln_f, hf.lm_head, cfg)
    if mt in LLAMA_FAMILY:
        body = hf.model
        return Architecture(mt, body, body.layers, body.norm, hf.lm_head, cfg)
    raise UserError(f"model type {mt!r} is not supported; supported: {', '.join(SUPPORTED)} "
                    "(add it in sequnlearn/model/layers.py)")


@contextmanager
def adapter_state(arch: Architecture, i: int, enabled: bool | None) -> Iterator[None]:
    """Switch the adapter of decoder layer ``i`` on/off for the block; ``None`` leaves it.

    Only the flag that LoRA layers read in ``forward`` is flipped. peft's public
    ``enable_adapters`` also flips ``requires_grad`` of the adapter weights, which would drop
    their gradients when a checkpointed recomputation toggles a layer during backward.
    """
    tuners = arch.tuners(i) if enabled is not None else []
    before = [t._disable_adapters for t in tuners]
    for t in tuners:
        t._disable_adapters = not enabled
    try:
        yield
    finally:
        for t, was in zip(tuners, before):
            t._disable_adapters = was


def run_layers(arch: Architecture, h: torch.Tensor, ctx: LayerContext, start: int, stop: int, *,
               adapter: bool | None = None, checkpoint: bool = False,
               capture: list | None = None) -> torch.Tensor:
    """Run decoder layers ``start..stop-1`` on ``h``.

    The adapter state is part of each (checkpointed) layer call, so a recomputation in the
    backward pass sees the same state as the forward, whatever the model's state then is.

    Args:
        h: ``(B, T, D)`` input of layer ``start``.
        adapter: ``True``/``False`` to run with the LoRA adapter on/off; ``None`` as it is. ``False`` runs
            a block with stashed originals (:attr:`Architecture.originals`) with those weights.
        checkpoint: recompute each layer in the backward pass instead of storing activations.
        capture: if given, each layer's output ``(B, T, D)`` is appended to it.

    Returns:
        ``(B, T, D)`` output of layer ``stop-1``.
    """
    for i in range(start, stop):
        fn = _layer_fn(arch, i, ctx, adapter)
        if checkpoint and torch.is_grad_enabled():
            h = torch_checkpoint(fn, h, use_reentrant=False)
        else:
            h = fn(h)
        if capture is not None:
            capture.append(h)
    return h


def _layer_fn(arch: Architecture, i: int, ctx: LayerContext, adapter: bool | None) -> Callable:
    weights = arch.originals.get(i) if adapter is False else None  # the original model of a trained block

    def fn(h: torch.Tensor) -> torch.Tensor:
        with adapter_state(arch, i, adapter):
            return arch.call_layer(i, h, ctx, weights)

    return fn


def hidden_after(arch: Architecture, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                 **kw) -> tuple[torch.Tensor, LayerContext]:
    """Embed and run layers ``0..layer``; returns the output of ``layer`` ``(B, T, D)`` and the context."""
    ctx = arch.context(input_ids, attention_mask)
    h = run_layers(arch, arch.embed(input_ids, ctx), ctx, 0, layer + 1, **kw)
    return h, ctx


def suffix_logits(arch: Architecture, h: torch.Tensor, ctx: LayerContext, layer: int, **kw) -> torch.Tensor:
    """From the output of ``layer`` ``(B, T, D)`` run layers ``layer+1..N-1``, norm and head → ``(B, T, V)``."""
    h = run_layers(arch, h, ctx, layer + 1, arch.num_layers, **kw)
    return arch.logits(h)


def check_layers(arch: Architecture, layers: list[int]) -> None:
    """Validate target layers against the model's depth.

    Raises:
        UserError: a layer is outside ``0..N-1`` or the list is empty.
    """
    n = arch.num_layers
    if not layers:
        raise UserError("the layer list is empty; give layers as start/end/step or an explicit list")
    bad = [L for L in layers if not 0 <= L < n]
    if bad:
        raise UserError(f"layers {bad} are outside this model's depth (it has {n} layers: 0..{n - 1}); "
                        "choose layers within it")
