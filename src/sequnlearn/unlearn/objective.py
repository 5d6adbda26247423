"""The objective: forget and retain losses of one batch for a model with a LoRA adapter.

Forget: the current model (adapter on) up to the boundary at target layer L, then the original
model's remaining layers (adapter off), final norm and head, cross-entropy to random targets / log V
(or another forget loss; NPO compares the next-token log-probabilities with the original model's own).
Retain: L2 between current and original hidden states, KL(original ‖ current) on the logits, or NLL.
The original model is the same weights with the adapter switched off, per layer call (``method:
full``: a trained block's stashed original weights). ``forget_suffix: current`` runs the forget path's
remaining layers as the current model instead.
"""

from __future__ import annotations

from typing import Callable

import torch

from sequnlearn.config import UnlearnConfig
from sequnlearn.errors import UserError
from sequnlearn.model.layers import Architecture, check_layers, hidden_after, run_layers
from sequnlearn.unlearn import losses


def _real(batch: dict) -> torch.Tensor:
    """The real tokens of a right-padded batch: its ``index`` (flat, from the host) or its attention mask.

    No padding mask reaches the layers: with right padding and a causal mask a real token attends only
    to real tokens, so the real tokens' states are those of the padded forward (the reference code
    passes ``attention_mask=None`` as well); pad positions are never read.
    """
    return batch["index"] if "index" in batch else batch["attention_mask"]


def next_tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At each of a right-padded batch's real tokens (:func:`_real`, row order): the next token's id,
    1.0 where that is a real token (0 at a row's last token, which predicts nothing), and the row.

    Returns:
        ``(labels, weight, rows)``, each ``(N,)``; formed on the device (no host-device synchronisation).
    """
    ids, mask, real = batch["input_ids"], batch["attention_mask"], _real(batch)  # (B, T), (B, T), (N,)
    B, T = ids.shape
    following = torch.nn.functional.pad(ids[:, 1:], (0, 1))  # (B, T): the token after each position
    has_next = torch.nn.functional.pad(mask[:, 1:], (0, 1))  # (B, T): 1 where that token is real
    rows = torch.arange(B, device=ids.device)[:, None].expand(B, T).contiguous()  # (B, T)
    return (losses.real_tokens(following, real), losses.real_tokens(has_next, real).float(),
            losses.real_tokens(rows, real))


def next_token_counts(lengths: list[int], keep: list[list[int]] | None = None, by_row: bool = False) -> list[int]:
    """Per row (host side, from the rows' real lengths): its counted positions (every real token, or those
    of ``keep``) that have a next real token; with ``by_row`` 1 for a row with any, else 0."""
    rows = keep if keep is not None else [range(n) for n in lengths]
    counts = [sum(1 for t in positions if t + 1 < n) for positions, n in zip(rows, lengths)]
    return [int(c > 0) for c in counts] if by_row else counts


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without waiting for the device (pinned, non-blocking on a GPU)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Objective:
    """The losses of ``cfg`` on batches of the model behind ``arch``.

    Attributes:
        checkpointing: recompute layer activations in backward (gradient checkpointing).
        chunk_rows: tokens whose logits the fused head losses form at once.
        sharded: the decoder layers are FSDP-sharded (the original model then runs under ``no_grad``,
            since gathered weights must not become inference tensors).
    """

    def __init__(self, cfg: UnlearnConfig, arch: Architecture, *, checkpointing: bool, sharded: bool,
                 chunk_rows: int = losses.CHUNK_ROWS):
        self.cfg, self.arch, self.checkpointing, self.fsdp = cfg, arch, checkpointing, sharded
        self.chunk_rows = chunk_rows  # tokens whose logits the fused head losses form at once
        vocab = arch.head.weight.shape[0]
        if cfg.forget_loss == "topk_entropy" and cfg.forget_top_k > vocab:
            raise UserError(f"forget_top_k {cfg.forget_top_k} is above the model's vocabulary ({vocab}); lower it")
        self.retain_layers = cfg.retain_layers if cfg.retain_layers is not None else list(range(arch.num_layers))
        """The retain layers of the L2, or ``target`` (each phase's target layer: :meth:`l2_layers`)."""
        if self.retain_layers != "target":
            check_layers(arch, self.retain_layers)

    @property
    def retain_by_rows(self) -> bool:
        """Whether the retain loss is a mean over rows at a fixed padded length (the reference's L2),
        rather than over real tokens: how a batch's row groups are weighted."""
        return self.cfg.retain_loss == "l2" and self.cfg.l2_reduction == "padded_states"

    def forget_counts(self, lengths: list[int], keep: list[list[int]] | None = None) -> list[int] | None:
        """Per row, what the forget loss averages over where that is not its counted tokens (NPO: those
        with a next token, or with ``npo_reduction: sequence`` the row itself); None otherwise."""
        if self.cfg.forget_loss != "npo":
            return None
        return next_token_counts(lengths, keep, by_row=self.cfg.npo_reduction == "sequence")

    def retain_counts(self, lengths: list[int]) -> list[int] | None:
        """Per row, what the retain loss averages over where that is not its real tokens (NLL: those
        with a next token); None otherwise."""
        return next_token_counts(lengths) if self.cfg.retain_loss == "nll" else None

    def l2_layers(self, layer: int | None) -> list[int]:
        """The layers whose outputs the L2 retain loss compares in the phase of target ``layer``."""
        if self.retain_layers != "target":
            return self.retain_layers
        if layer is None:
            raise ValueError("retain_layers target needs the phase's target layer")
        return [layer]

    def forget_loss(self, batch: dict, layer: int, gen: torch.Generator | None = None,
                    targets: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Current model (adapter on) up to the boundary → original model's remaining layers, norm, head → loss.

        The boundary (``forget_boundary``) is the output of ``layer`` (original runs ``layer+1..N-1``)
        or its input (original runs ``layer..N-1``, the reference code); ``forget_suffix: current`` runs
        those remaining layers as the current model (adapter on, trained weights). Only real tokens reach the
        head. With a plain frozen head the loss forms the logits a chunk of tokens at a time
        (``losses.*_from_hidden``), never the whole ``(N, V)`` at once.

        Args:
            batch: ``input_ids`` and ``attention_mask`` ``(B, T)``, right-padded, and optionally
                ``index``: the ``(N,)`` flat indices of the real tokens (:func:`losses.real_tokens`).
            gen: draws the random targets uniformly, one per real token in row order.
            targets: instead of ``gen``, gives the ``(N,)`` targets of the batch's N real tokens
                (e.g. the reference code's own draw, taken at the real tokens).
        """
        ids, real = batch["input_ids"], _real(batch)  # (B, T), (N,)
        cut = layer if self.cfg.forget_boundary == "output" else layer - 1  # last layer the current model runs
        h, ctx = hidden_after(self.arch, ids, None, cut, adapter=True, checkpoint=self.checkpointing)
        h = run_layers(self.arch, h, ctx, cut + 1, self.arch.num_layers, adapter=self.cfg.forget_suffix == "current",
                       checkpoint=self.checkpointing)
        h = losses.real_tokens(h, real)  # (N, D): only real tokens reach the head
        if self.cfg.forget_loss == "npo":
            return self._npo(batch, h)
        head = losses.linear_head(self.arch.head)
        vocab = self.arch.head.weight.shape[0]
        if self.cfg.forget_loss == "random_ce":
            drawn = targets(h.shape[0]) if targets else torch.randint(vocab, (h.shape[0],), generator=gen)
            targets = to_device(drawn, h.device)  # (N,)
        k = self.cfg.forget_top_k
        if head is None:  # e.g. an adapter on the head itself: the plain logits
            logits = self.arch.logits(h)  # (N, V)
            if self.cfg.forget_loss == "max_entropy":
                return losses.max_entropy(logits)
            if self.cfg.forget_loss == "topk_entropy":
                return losses.topk_entropy(logits, k)
            return losses.random_target_ce(logits, targets)
        h = self.arch.norm(h)  # (N, D)
        if self.cfg.forget_loss == "max_entropy":
            return losses.max_entropy_from_hidden(h, *head, chunk_rows=self.chunk_rows)
        if self.cfg.forget_loss == "topk_entropy":
            return losses.topk_entropy_from_hidden(h, *head, k, chunk_rows=self.chunk_rows)
        return losses.random_target_ce_from_hidden(h, *head, targets, chunk_rows=self.chunk_rows)

    def _npo(self, batch: dict, h: torch.Tensor) -> torch.Tensor:
        """NPO (:func:`losses.npo`) of the forget path's next-token log-probabilities against those of the
        original model's own forward (adapter off, no gradient); ``h``: ``(N, D)`` the forget path's last
        hidden states at the batch's real tokens."""
        labels, weight, rows = next_tokens(batch)  # (N,) each
        with self._original():
            h_orig, _ = hidden_after(self.arch, batch["input_ids"], None, self.arch.num_layers - 1, adapter=False)
            logp_orig = self._token_logprob(losses.real_tokens(h_orig, _real(batch)), labels)
        by_row = self.cfg.npo_reduction == "sequence"
        return losses.npo(self._token_logprob(h, labels), logp_orig, self.cfg.npo_beta, weight,
                          rows if by_row else None, batch["input_ids"].shape[0])

    def _token_logprob(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(N,)`` log-probabilities of ``labels`` after the final norm and head of ``h`` ``(N, D)`` (a
        chunk of tokens' logits at a time with a plain frozen head, else the plain logits)."""
        head = losses.linear_head(self.arch.head)
        if head is None:
            return losses.token_logprob(self.arch.logits(h), labels)
        return losses.token_logprob_from_hidden(self.arch.norm(h), *head, labels, chunk_rows=self.chunk_rows)

    def _original(self):
        """The context the original model runs in: ``inference_mode``, or ``no_grad`` when FSDP-sharded
        (gathered weights must not become inference tensors)."""
        return torch.no_grad() if self.fsdp else torch.inference_mode()

    def l2sp(self, layer: int) -> torch.Tensor:
        """L2-SP of block ``layer`` (:func:`losses.l2sp`): its LoRA deltas scale·B·A, or in full-parameter
        mode its trained weights minus their stashed originals (:attr:`Architecture.originals`)."""
        originals = self.arch.originals.get(layer)
        if originals is not None:
            params = dict(self.arch.layers[layer].named_parameters())
            deltas = [params[n] - o for n, o in originals.items() if params[n].requires_grad]
        else:
            deltas = [t.get_delta_weight(a) for t in self.arch.tuners(layer) for a in t.active_adapters
                      if a in getattr(t, "lora_A", {})]
        if not deltas:  # e.g. a block with no adapter, or one whose originals are not stashed yet
            return torch.zeros((), device=self.arch.head.weight.device)
        return losses.l2sp(deltas)

    def retain_loss(self, batch: dict, layer: int | None = None) -> torch.Tensor:
        """L2 between current and original layer outputs, KL(original ‖ current) on logits, or NLL.

        The original model runs under ``torch.inference_mode`` (``no_grad`` when FSDP-sharded, whose
        gathered weights must not become inference tensors); for L2 both models run only up to
        the deepest retain layer; for KL with a plain frozen head the logits are formed a chunk of
        tokens at a time inside the loss (never both models' full ``(N, V)`` logits). ``layer``: the
        phase's target layer (needed by ``retain_layers: target``).
        """
        ids, real = batch["input_ids"], _real(batch)  # (B, T), (N,)
        if self.cfg.retain_loss == "l2" and self.cfg.l2_reduction == "padded_states":
            return self._l2_padded_states(ids, real)
        if self.cfg.retain_loss == "nll":
            return self._nll(batch)
        kl = self.cfg.retain_loss == "kl"
        keep = None if kl else self.l2_layers(layer)
        last = self.arch.num_layers - 1 if kl else max(keep)
        head = losses.linear_head(self.arch.head) if kl else None
        original: list[torch.Tensor] | None = None if kl else []
        with torch.no_grad() if self.fsdp else torch.inference_mode():
            h_orig, _ = hidden_after(self.arch, ids, None, last, adapter=False, capture=original)
            if kl:  # (N, D) final-norm outputs for the fused loss, else (N, V) logits
                h_orig = losses.real_tokens(h_orig, real)
                h_orig = self.arch.norm(h_orig) if head else self.arch.logits(h_orig)
        current: list[torch.Tensor] | None = None if kl else []
        h_cur, _ = hidden_after(self.arch, ids, None, last, adapter=True, checkpoint=self.checkpointing,
                                capture=current)
        if kl and head:
            return losses.kl_retain_from_hidden(self.arch.norm(losses.real_tokens(h_cur, real)), h_orig, *head,
                                                chunk_rows=self.chunk_rows)
        if kl:
            return losses.kl_retain(self.arch.logits(losses.real_tokens(h_cur, real)), h_orig)
        return losses.l2_retain([current[i] for i in keep], [original[i] for i in keep], real)

    def _nll(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of the current model (adapter on) on the batch's next real tokens."""
        labels, weight, _ = next_tokens(batch)  # (N,) each
        h, _ = hidden_after(self.arch, batch["input_ids"], None, self.arch.num_layers - 1, adapter=True,
                            checkpoint=self.checkpointing)
        return losses.next_token_nll(self._token_logprob(losses.real_tokens(h, _real(batch)), labels), weight)

    def _l2_padded_states(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The reference code's L2 over the N+1 ``output_hidden_states`` (see :func:`losses.l2_retain_padded`)."""
        with torch.no_grad() if self.fsdp else torch.inference_mode():
            original = self._hidden_states(ids, adapter=False)
        current = self._hidden_states(ids, adapter=True)
        return losses.l2_retain_padded(current, original, real, self.cfg.max_length)

    def _hidden_states(self, ids: torch.Tensor, *, adapter: bool) -> list[torch.Tensor]:
        """What HF's ``output_hidden_states`` holds: embeddings, outputs of layers 0..N-2, final-norm output."""
        ctx = self.arch.context(ids, None)
        emb = self.arch.embed(ids, ctx)  # (B, T, D)
        outs: list[torch.Tensor] = []
        last = run_layers(self.arch, emb, ctx, 0, self.arch.num_layers, adapter=adapter,
                          checkpoint=self.checkpointing, capture=outs)
        return [emb, *outs[:-1], self.arch.norm(last)]
