"""Pure loss functions of tensors (unit-tested against hand-computed values)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def random_target_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against random targets, divided by log(vocab).

    Args:
        logits: ``(N, V)`` logits at the N real (non-pad) tokens.
        targets: ``(N,)`` token ids drawn uniformly from ``0..V-1``.

    Returns:
        Scalar: mean over tokens of ``-log p(target)`` / ``log V`` (≈1 for a uniform read-out).
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits.float(), targets, reduction="mean") / math.log(V)


def max_entropy(logits: torch.Tensor) -> torch.Tensor:
    """KL(uniform ‖ p) / log(vocab), 0 exactly when the read-out is uniform.

    Args:
        logits: ``(N, V)`` logits at the real tokens.

    Returns:
        Scalar: mean over tokens of ``(-log V - mean_v log p_v) / log V``.
    """
    V = logits.shape[-1]
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    kl = -math.log(V) - logp.mean(dim=-1)  # (N,)
    return kl.mean() / math.log(V)


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`max_entropy` over the ``k`` largest logits at each token: KL(uniform_k ‖ q) / log k with q the
    softmax of those ``k`` logits; 0 exactly when they are all equal. The other logits get no gradient.

    Args:
        logits: ``(N, V)`` logits at the real tokens; ``2 <= k <= V``.

    Returns:
        Scalar: mean over tokens of ``(-log k - mean_j log q_j) / log k``.
    """
    logq = F.log_softmax(logits.float().topk(k, dim=-1).values, dim=-1)  # (N, k)
    return (-math.log(k) - logq.mean(dim=-1)).mean() / math.log(k)


def real_tokens(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` ``(B, T, ...)`` at real tokens, in row-major order: ``(N, ...)``.

    Args:
        real: the ``(B, T)`` attention mask (1 at real tokens), or the ``(N,)`` flat indices
            ``b·T + t`` of the real tokens. The indices select without a host-device synchronisation,
            which boolean-mask indexing needs (it must learn N).
    """
    if real.dim() == 2:
        return x[real.bool()]
    return x.reshape(-1, *x.shape[2:]).index_select(0, real)


def l2_retain(current: list[torch.Tensor], original: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean per-token L2 norm of (current − original), pad excluded.

    Args:
        current: per layer ``(B, T, D)`` outputs of the model being trained.
        original: per layer ``(B, T, D)`` outputs of the original model (no grad).
        mask: the real tokens: ``(B, T)`` attention mask or ``(N,)`` flat indices (:func:`real_tokens`).

    Returns:
        Scalar loss.
    """
    per_layer = [(real_tokens(c, mask).float() - real_tokens(o, mask).float()).norm(dim=-1).mean()
                 for c, o in zip(current, original)]
    return torch.stack(per_layer).mean()


def l2_retain_padded(current: list[torch.Tensor], original: list[torch.Tensor], mask: torch.Tensor,
                     padded_length: int) -> torch.Tensor:
    """The reference code's L2: per-token norm of (current − original), mean over states × rows × padded length.

    ``torch.norm((stack(current) − stack(original)) · mask, dim=-1).nanmean()`` on rows padded to
    ``padded_length``: pad positions (and positions past this batch's width) count as zeros.

    Args:
        current: per state ``(B, T, D)`` hidden states of the model being trained (``T ≤ padded_length``).
        original: the same states of the original model (no grad).
        mask: the real tokens: ``(B, T)`` attention mask or ``(N,)`` flat indices (:func:`real_tokens`).
        padded_length: the length every row counts as (the reference padded to ``max_length``).

    Returns:
        Scalar loss.
    """
    total = sum((real_tokens(c, mask).float() - real_tokens(o, mask).float()).norm(dim=-1).sum()
                for c, o in zip(current, original))
    return total / (len(current) * current[0].shape[0] * padded_length)


def kl_retain(current_logits: torch.Tensor, original_logits: torch.Tensor) -> torch.Tensor:
    """KL(original ‖ current) of the next-token distributions, mean over real tokens.

    Args:
        current_logits: ``(N, V)`` logits of the model being trained at real tokens.
        original_logits: ``(N, V)`` logits of the original model at the same tokens.

    Returns:
        Scalar: mean over tokens of ``sum_v p_o (log p_o − log p_c)``.
    """
    logp_c = F.log_softmax(current_logits.float(), dim=-1)  # (N, V)
    logp_o = F.log_softmax(original_logits.float(), dim=-1)  # (N, V)
    return F.kl_div(logp_c, logp_o, reduction="batchmean", log_target=True)


def token_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token's label under its logits.

    Args:
        logits: ``(N, V)`` logits; labels: ``(N,)`` token ids (e.g. the next token at each position).

    Returns:
        ``(N,)`` float32 ``log softmax(logits)[label]``.
    """
    return F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None])[:, 0]


def next_token_nll(logp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the next tokens: ``−Σ w·log p / Σ w``.

    Args:
        logp: ``(N,)`` log-probabilities of the next token at N positions (:func:`token_logprob`).
        weight: ``(N,)`` 1 where the next token is a real token, 0 at a row's last (no next token).

    Returns:
        Scalar: mean over the weighted positions (NaN for none, as a mean over no tokens is).
    """
    return -(logp * weight).sum() / weight.sum()


def npo(logp_current: torch.Tensor, logp_original: torch.Tensor, beta: float, weight: torch.Tensor,
        rows: torch.Tensor | None = None, n_rows: int = 0) -> torch.Tensor:
    """Negative preference optimisation: ``−(2/β)·mean log σ(−β·r)``, r = ``log π_cur − log π_orig``.

    ``(2/β)·log 2`` while the two models agree; minimising it lowers the current model's log-probability
    of the forget text (dL/dr > 0).

    Args:
        logp_current: ``(N,)`` log-probabilities of the next token under the model being trained.
        logp_original: ``(N,)`` the same under the original model (no gradient).
        beta: β > 0.
        weight: ``(N,)`` 1 where the position has a next real token, else 0.
        rows: ``(N,)`` row of each position, in ``0..n_rows-1``: r summed per row, the mean taken over rows
            with a weighted position (``npo_reduction: sequence``); None: r per position, the mean over the
            weighted positions (``token``).

    Returns:
        Scalar loss (NaN without a weighted position).
    """
    r = (logp_current - logp_original) * weight  # (N,)
    if rows is not None:
        r = torch.zeros(n_rows, dtype=r.dtype, device=r.device).index_add(0, rows, r)  # (R,) per-row sums
        weight = (torch.zeros_like(r).index_add(0, rows, weight) > 0).to(r.dtype)  # (R,) rows with a next token
    return -(2.0 / beta) * (F.logsigmoid(-beta * r) * weight).sum() / weight.sum()


def l2sp(deltas: list[torch.Tensor]) -> torch.Tensor:
    """L2-SP: ``Σ ‖θ − θ₀‖²`` (squared Frobenius norms, summed) of the weight differences ``θ − θ₀``."""
    return torch.stack([d.float().pow(2).sum() for d in deltas]).sum()


def filter_gradients(g_retain: torch.Tensor, g_forget: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-sign gradient filtering of one parameter's retain and forget gradients, elementwise.

    Args:
        mode: ``same_sign``: ``(g_r + g_f)·[g_r·g_f > 0]``; ``same_sign_asymmetric``: ``g_f·[g_r·g_f > 0] + g_r``.

    Returns:
        The combined gradient and the number of agreeing elements (a device scalar).

    Raises:
        ValueError: an unknown mode.
    """
    agree = (g_retain * g_forget) > 0
    if mode == "same_sign":
        combined = (g_retain + g_forget) * agree
    elif mode == "same_sign_asymmetric":
        combined = g_forget * agree + g_retain
    else:
        raise ValueError(f"unknown gradient filter {mode!r}")
    return combined, agree.sum()


# --------------------------------------------------------------------------- fused head + loss
#
# The same losses computed from the hidden states before the output head, a chunk of tokens at a
# time: the (N, V) logits, their float32 copy and log-softmax never exist in full, only
# ``chunk_rows`` tokens' worth at once. The gradient with respect to the hidden states is computed
# chunk by chunk in the forward pass (the formula PyTorch's own backward of log-softmax applies)
# and kept as an (N, D) tensor, so the backward pass is one multiplication. Values agree with
# ``loss(F.linear(h, weight, bias))`` up to float summation order.

CHUNK_ROWS = 256
"""Tokens per chunk of the fused losses: enough rows that each pass over the head's weight is
amortised (fewer make the head matmul memory-bound), few enough that a chunk's float32 logits stay
small (256 × 50304 × 4 B = 49 MiB)."""

RowsFn = Callable[[torch.Tensor, "torch.Tensor | None", slice, bool], "tuple[torch.Tensor, torch.Tensor | None]"]


def random_target_ce_from_hidden(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, *, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """:func:`random_target_ce` of ``F.linear(h, weight, bias)`` without the full logits.

    Args:
        h: ``(N, D)`` final-norm outputs at the N real tokens.
        weight: ``(V, D)`` output head (frozen); bias: ``(V,)`` or None.
        targets: ``(N,)`` token ids drawn uniformly from ``0..V-1``.
        chunk_rows: tokens whose logits are computed at once.

    Returns:
        Scalar, as :func:`random_target_ce`.
    """
    if _trainable(weight, bias):
        return random_target_ce(F.linear(h, weight, bias), targets)

    def rows(logits: torch.Tensor, _other, sl: slice, need: bool):
        logp = _log_softmax_(logits)  # (n, V)
        t = targets[sl]  # (n,)
        total = -logp.gather(1, t[:, None]).sum()
        if not need:
            return total, None
        grad = logp.exp_()  # softmax − one-hot: d(−log p_t)/d logits
        grad[torch.arange(len(t), device=grad.device), t] -= 1
        return total, grad

    return _head_loss(h, None, weight, bias, rows, 1.0 / (_count(h) * math.log(weight.shape[0])), chunk_rows)


def max_entropy_from_hidden(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                            chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """:func:`max_entropy` of ``F.linear(h, weight, bias)`` without the full logits.

    Args:
        h: ``(N, D)`` final-norm outputs at the real tokens; weight ``(V, D)``; bias ``(V,)`` or None.

    Returns:
        Scalar, as :func:`max_entropy`.
    """
    if _trainable(weight, bias):
        return max_entropy(F.linear(h, weight, bias))
    V = weight.shape[0]

    def rows(logits: torch.Tensor, _other, sl: slice, need: bool):
        logp = _log_softmax_(logits)  # (n, V)
        total = (-math.log(V) - logp.mean(dim=-1)).sum()
        if not need:
            return total, None
        return total, logp.exp_().sub_(1.0 / V)  # d(−mean log p)/d logits = softmax − 1/V

    return _head_loss(h, None, weight, bias, rows, 1.0 / (_count(h) * math.log(V)), chunk_rows)


def topk_entropy_from_hidden(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, *,
                             chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """:func:`topk_entropy` of ``F.linear(h, weight, bias)`` without the full logits.

    Args:
        h: ``(N, D)`` final-norm outputs at the real tokens; weight ``(V, D)``; bias ``(V,)`` or None.
        k: logits per token the entropy is taken over.

    Returns:
        Scalar, as :func:`topk_entropy`.
    """
    if _trainable(weight, bias):
        return topk_entropy(F.linear(h, weight, bias), k)

    def rows(logits: torch.Tensor, _other, sl: slice, need: bool):
        top, index = logits.topk(k, dim=-1)  # (n, k)
        logq = top.sub_(torch.logsumexp(top, dim=-1, keepdim=True))  # log-softmax over the k, in place
        total = (-math.log(k) - logq.mean(dim=-1)).sum()
        if not need:
            return total, None
        # d(−mean log q)/d top-k logits = softmax_k − 1/k; zero for the other logits
        return total, logits.zero_().scatter_(1, index, logq.exp_().sub_(1.0 / k))

    return _head_loss(h, None, weight, bias, rows, 1.0 / (_count(h) * math.log(k)), chunk_rows)


def kl_retain_from_hidden(h_current: torch.Tensor, h_original: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, *, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """:func:`kl_retain` of the two models' logits ``F.linear(h, weight, bias)`` without the full logits.

    Args:
        h_current: ``(N, D)`` final-norm outputs of the model being trained at the real tokens.
        h_original: ``(N, D)`` the same of the original model (no gradient flows into it).
        weight: ``(V, D)`` output head (frozen); bias: ``(V,)`` or None.

    Returns:
        Scalar, as :func:`kl_retain`.
    """
    if _trainable(weight, bias):
        return kl_retain(F.linear(h_current, weight, bias), F.linear(h_original, weight, bias))

    def rows(logits: torch.Tensor, other: torch.Tensor, _sl: slice, need: bool):
        logp_c, logp_o = _log_softmax_(logits), _log_softmax_(other)  # (n, V) each
        p_o = logp_o.exp()
        total = logp_o.sub_(logp_c).mul_(p_o).sum()  # Σ p_o (log p_o − log p_c), in place
        if not need:
            return total, None
        # log-softmax backward of the gradient −p_o: softmax_c · Σ p_o − p_o
        return total, logp_c.exp_().mul_(p_o.sum(dim=-1, keepdim=True)).sub_(p_o)

    return _head_loss(h_current, h_original, weight, bias, rows, 1.0 / _count(h_current), chunk_rows)


def token_logprob_from_hidden(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              labels: torch.Tensor, *, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """:func:`token_logprob` of ``F.linear(h, weight, bias)`` without the full logits.

    Its output is a vector, whose gradient is known only in the backward pass: that pass forms the
    logits again, a chunk at a time (one more pass over the head, as gradient checkpointing would).

    Args:
        h: ``(N, D)`` final-norm outputs; weight ``(V, D)`` (frozen); bias ``(V,)`` or None; labels ``(N,)``.

    Returns:
        ``(N,)``, as :func:`token_logprob`.
    """
    if _trainable(weight, bias):
        return token_logprob(F.linear(h, weight, bias), labels)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 (got {chunk_rows})")
    return _TokenLogProb.apply(h, weight, bias, labels, chunk_rows)


class _TokenLogProb(torch.autograd.Function):
    """Output head + label log-probabilities over row chunks; the backward pass recomputes each chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk):  # noqa: D102 (torch API)
        w, b = _compute_weights(h, weight, bias)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (N,)
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            logits = F.linear(h[sl].to(w.dtype), w, b).float()  # (n, V)
            out[sl] = logits.gather(1, labels[sl, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(h, labels)
        ctx.head, ctx.dtype, ctx.chunk = (weight, bias), w.dtype, chunk  # not the cast copy: cast again later
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 (torch API)
        h, labels = ctx.saved_tensors
        (weight, bias), chunk = ctx.head, ctx.chunk
        ctx.head = None
        w, b = weight.to(ctx.dtype), (None if bias is None else bias.to(ctx.dtype))
        grad_h = torch.empty_like(h)  # (N, D)
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            g = grad_out[sl].float()  # (n,)
            # d log p_label / d logits = one-hot − softmax, times the incoming gradient
            grad = _log_softmax_(F.linear(h[sl].to(w.dtype), w, b).float()).exp_().mul_(-g[:, None])  # (n, V)
            grad[torch.arange(len(g), device=grad.device), labels[sl]] += g
            grad_h[sl] = grad.to(w.dtype) @ w
        return grad_h, None, None, None, None


def linear_head(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of an output head the fused losses can use: a plain, frozen ``nn.Linear``.

    Returns:
        None for anything else (e.g. a head wrapped by an adapter), which needs the plain logits.
    """
    if type(head) is not torch.nn.Linear or _trainable(head.weight, head.bias):
        return None
    return head.weight, head.bias


def _trainable(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the head itself needs a gradient (then the fused losses fall back to the plain ones)."""
    return weight.requires_grad or (bias is not None and bias.requires_grad)


def _count(h: torch.Tensor) -> float:
    """Number of rows as a float; NaN for none, as a mean over no tokens is."""
    return float(h.shape[0]) if h.shape[0] else math.nan


def _head_loss(h: torch.Tensor, other: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
               rows: RowsFn, scale: float, chunk_rows: int) -> torch.Tensor:
    """``scale`` × the sum of ``rows`` over chunks of the head's logits; see :class:`_HeadLoss`."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 (got {chunk_rows})")
    return _HeadLoss.apply(h, other, weight, bias, rows, scale, chunk_rows)


class _HeadLoss(torch.autograd.Function):
    """Output head + loss over row chunks, with the gradient for ``h`` formed in the forward pass.

    ``rows(logits, other_logits, rows_slice, need_grad)`` returns the loss summed over the chunk's
    rows and, when asked, d(that sum)/d logits ``(n, V)`` in float32; it may overwrite both logits
    tensors (scratch). The logits are computed as ``F.linear`` computes them (in the autocast dtype
    when autocast is on), then made float32, as the plain losses do.
    """

    @staticmethod
    def forward(ctx, h, other, weight, bias, rows, scale, chunk):  # noqa: D102 (torch API)
        need = ctx.needs_input_grad[0]
        w, b = _compute_weights(h, weight, bias)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need else None  # (N, D)
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            other_logits = None if other is None else F.linear(other[sl].to(w.dtype), w, b).float()  # (n, V)
            part, grad = rows(F.linear(h[sl].to(w.dtype), w, b).float(), other_logits, sl, need)  # scratch logits
            total = total + part
            if need:
                grad_h[sl] = grad.mul_(scale).to(w.dtype) @ w  # (n, D)
        ctx.grad_h = grad_h
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 (torch API)
        grad_h = ctx.grad_h * grad_out.to(ctx.grad_h.dtype)
        ctx.grad_h = None
        return grad_h, None, None, None, None, None, None


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dimension, in place (``x`` is a scratch float32 chunk of logits)."""
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _compute_weights(h: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head weight and bias in the dtype ``F.linear(h, weight, bias)`` computes in (cast once, not per chunk)."""
    dtype = weight.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    return weight.to(dtype), (None if bias is None else bias.to(dtype))
