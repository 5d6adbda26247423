"""The linear probes: the answer position's read-out with learned weights, cross-validated over questions.

**Probe features.** Let ``n_q`` be the layer's hidden state at the *answer position* of question ``q``
(:mod:`sequnlearn.audit.readout`: the position whose output predicts the first token that tells the
choices apart), through the final norm, and ``u_c`` the model's output
embedding (head row) of choice ``c``'s first distinguishing token. The logit lens scores ``c`` by
``n_q·u_c`` (for that token). The probe scores it by ``w·((n_q − n̄) ⊙ u_c)`` — a learned
reweighting of every dimension of that dot product, one weight vector ``w`` (``d`` numbers) shared by
all choices, ``P(c | q) = softmax_c(score)`` (a conditional logit model). ``n̄`` is the mean state
over the training questions: without it the probe can learn a fixed preference per choice text,
which on data where the same answers recur (the toy world) scores *below* chance on held-out
questions, since a held-out question's answer is by construction rarer among the training answers.

Why not a probe on each choice's own last-token state, or a ``k``-way classifier of the answer index
at the prompt's last token: both were tried on the toy world first. The per-choice state did not
separate right from wrong choices (probe 0.2–0.35 where the model answers 1.0: a small model does
not represent "that was the expected answer" after reading it), and the toy model does not answer
the letter format, so its ``"Answer:"`` state has no reason to hold the answer's index. The answer
position's prediction of the answer is where the knowledge shows; the probe reads it with the
model's own choice vectors, so it has ``d`` parameters, works for both prompt styles, for answers
that recur and for answers seen once (WMDP), and for any number of choices.

Limit: the probe sees only the first distinguishing token (choices that start alike, "two days" /
"two weeks", tie in it); the lens scores whole continuations.

**Fitting.** Features standardized per dimension with the training fold's statistics; ``w``
minimizes the mean cross-entropy plus ``l2/2·|w − w0|²``, where ``w0`` is the logit lens's own
weighting of the same product (``prior="lens"``, the default: with few training questions the probe
starts from what the head reads and moves as far as the data carry it) or zero (``prior="zero"``).
Newton's method from ``w0``, float32, all folds at once on the model's device: deterministic.
``folds``-fold cross-validation over questions with a seeded permutation; every question is scored
once, by the probe that did not see it. Reported: accuracy over all held-out questions, its binomial
standard error, and each fold's accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sequnlearn.errors import UserError


def probe_features(states: torch.Tensor, vectors: torch.Tensor, slots: torch.Tensor,
                   train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's features, once per fold: ``((n_q − mean) ⊙ u_c)`` standardized per dimension.

    Args:
        states: ``(Q, D)`` answer-position states (through the final norm) of one layer.
        vectors: ``(S, D)`` choice vectors; slots: ``(Q, C)`` (-1: no choice).
        train: ``(P, Q)`` the questions each of ``P`` fits trains on; the mean state and the
            standardization come from them alone.

    Returns:
        ``(P, Q, C, D)`` features (zero where there is no choice), the ``(Q, C)`` valid mask and the
        ``(P, D)`` standard deviations (``w = std`` scores like the logit lens on centred states).
    """
    valid = slots >= 0
    u = vectors[slots.clamp_min(0)] * valid.unsqueeze(-1)  # (Q, C, D)
    w = train.to(states.dtype)  # (P, Q)
    center = (w @ states) / w.sum(-1, keepdim=True)  # (P, D)
    x = (states.unsqueeze(0) - center.unsqueeze(1)).unsqueeze(2) * u  # (P, Q, C, D)
    m = (train.unsqueeze(-1) & valid).to(states.dtype)  # (P, Q, C)
    n = m.sum((1, 2)).clamp_min(2)[:, None]  # (P, 1)
    mean = torch.einsum("pqc,pqcd->pd", m, x) / n  # (P, D)
    var = torch.einsum("pqc,pqcd->pd", m, x * x) / n - mean * mean
    std = var.clamp_min(0).mul(n / (n - 1)).sqrt().clamp_min(1e-6)  # (P, D)
    return (x - mean[:, None, None]) / std[:, None, None] * valid.unsqueeze(-1), valid, std


def _objective(z, valid, y, a, w, w0, l2):
    """Per-fit loss ``(P,)`` and softmax over choices ``(P, Q, C)`` of weights ``w`` ``(P, D)``."""
    scores = torch.einsum("pqcd,pd->pqc", z, w).masked_fill(~valid, float("-inf"))  # (P, Q, C)
    logp = torch.log_softmax(scores, dim=-1)
    nll = -logp.gather(-1, y.expand(w.shape[0], -1).unsqueeze(-1)).squeeze(-1)  # (P, Q)
    return (a * nll).sum(-1) + 0.5 * l2 * ((w - w0) ** 2).sum(-1), logp.exp()


def fit_probes(z: torch.Tensor, valid: torch.Tensor, y: torch.Tensor, a: torch.Tensor, *, l2: float = 1e-2,
               max_iter: int = 30, w0: torch.Tensor | None = None) -> torch.Tensor:
    """Fit ``P`` conditional-logit probes ``P(c | q) = softmax_c(w·z(q, c))`` at once, by Newton's method.

    Each minimizes ``Σ_q a_q · CE(q) + l2/2·|w − w0|²`` (a convex problem; from ``w = w0``, each
    step halved until the loss does not rise), deterministic and exact to float32.

    Args:
        z: ``(P, Q, C, D)`` standardized features; valid: ``(Q, C)`` real choices; y: ``(Q,)`` answers.
        a: ``(P, Q)`` question weights (1/n on a fit's training questions, 0 elsewhere).
        w0: ``(P, D)`` the weights the penalty pulls towards (zero when omitted).

    Returns:
        ``(P, D)`` weights.
    """
    P, D = z.shape[0], z.shape[-1]
    w0 = torch.zeros(P, D, dtype=z.dtype, device=z.device) if w0 is None else w0
    w = w0.clone()
    eye = torch.eye(D, dtype=z.dtype, device=z.device) * max(l2, 1e-6)  # a floor keeps H invertible at l2=0
    onehot = torch.nn.functional.one_hot(y, valid.shape[1]).to(z.dtype)  # (Q, C)
    loss, prob = _objective(z, valid, y, a, w, w0, l2)
    flat = z.reshape(P, -1, D)  # (P, Q*C, D)
    for _ in range(max_iter):
        aw = a.unsqueeze(-1) * prob  # (P, Q, C)
        mean_z = torch.einsum("pqc,pqcd->pqd", prob, z)  # (P, Q, D)
        grad = torch.einsum("pqc,pqcd->pd", a.unsqueeze(-1) * (prob - onehot), z) + l2 * (w - w0)  # (P, D)
        hess = (flat.transpose(1, 2) @ (flat * aw.reshape(P, -1, 1))
                - mean_z.transpose(1, 2) @ (mean_z * a.unsqueeze(-1)) + eye)  # (P, D, D)
        # Cholesky (H is positive definite): batched LU trips an MKL bug on 2 CPU threads
        step = torch.cholesky_solve(grad.unsqueeze(-1), torch.linalg.cholesky(hess)).squeeze(-1)  # (P, D)
        t = torch.ones(P, 1, dtype=z.dtype, device=z.device)
        for _ in range(20):  # halve where the loss would rise
            new_loss, new_prob = _objective(z, valid, y, a, w - t * step, w0, l2)
            worse = ~(new_loss <= loss)
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        w = w - t * step * (~worse)[:, None]
        gain = torch.where(worse, torch.zeros_like(loss), loss - new_loss)
        loss = torch.where(worse, loss, new_loss)
        prob = torch.where(worse[:, None, None], prob, new_prob)
        if gain.max() <= 1e-7 * (1 + loss.abs().max()):
            break
    return w


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """``(n,)`` fold of each question: a seeded permutation cut into ``folds`` near-equal parts.

    Raises:
        UserError: fewer questions than folds.
    """
    if n < folds:
        raise UserError(f"{n} questions cannot be split into {folds} folds; give more questions or fewer --folds")
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.arange(n) % folds
    return out


def probe_accuracy(states: np.ndarray, vectors: np.ndarray, slots: np.ndarray, answers: np.ndarray, *,
                   folds: int = 5, seed: int = 0, l2: float = 1e-2, max_iter: int = 30, prior: str = "lens",
                   device: str | torch.device = "cpu") -> dict[str, Any]:
    """Cross-validated accuracy of the probe on one layer (all folds fitted at once).

    Args:
        states: ``(Q, D)`` answer-position states; vectors: ``(S, D)`` choice vectors.
        slots: ``(Q, C)`` slot of each question's choices (-1: none); answers: ``(Q,)``.
        prior: ``lens``: the penalty pulls the weights towards the logit lens's (all ones on the raw
            product); ``zero``: towards zero (a probe that starts from nothing).
        device: where to fit (the model's GPU for large widths).

    Returns:
        ``{"acc", "acc_stderr", "folds": [acc per fold]}``; ``acc`` is over all held-out questions.
    """
    y = torch.from_numpy(answers).to(device)
    fold = torch.from_numpy(fold_ids(len(answers), folds, seed)).to(device)
    test = fold.unsqueeze(0) == torch.arange(folds, device=device).unsqueeze(1)  # (P, Q)
    z, valid, std = probe_features(torch.from_numpy(np.asarray(states, dtype=np.float32)).to(device),
                              torch.from_numpy(np.asarray(vectors, dtype=np.float32)).to(device),
                              torch.from_numpy(slots).to(device), ~test)
    a = (~test).to(z.dtype)
    w0 = std if prior == "lens" else None
    w = fit_probes(z, valid, y, a / a.sum(-1, keepdim=True), l2=l2, max_iter=max_iter, w0=w0)
    scores = torch.einsum("pqcd,pd->pqc", z, w).masked_fill(~valid, float("-inf"))
    hit = (scores.argmax(-1) == y).cpu()  # (P, Q): fit p's choice for every question
    test = test.cpu()
    correct = hit[test.float().argmax(0), torch.arange(len(answers))]  # (Q,) by the fit that held it out
    per_fold = [float(hit[k][test[k]].float().mean()) for k in range(folds)]
    acc = float(correct.float().mean())
    return {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / len(answers)), "folds": per_fold}
