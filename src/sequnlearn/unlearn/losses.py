"""Pure loss functions of tensors (unit-tested against hand-computed values)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def l2_retain(current: list[torch.Tensor], original: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean per-token L2 norm of (current − original), pad excluded.

    Args:
        current: per layer ``(B, T, D)`` outputs of the model being trained.
        original: per layer ``(B, T, D)`` outputs of the original model (no grad).
        mask: ``(B, T)`` attention mask, 1 at real tokens.

    Returns:
        Scalar loss.
    """
    real = mask.bool()
    per_layer = [(c[real].float() - o[real].float()).norm(dim=-1).mean() for c, o in zip(current, original)]
    return torch.stack(per_layer).mean()


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
