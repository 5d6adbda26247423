"""Knowledge audit: is the forget knowledge gone from the weights, or only from the output?

For every decoder layer of each model given (base, unlearned, attacked, ...) and for the forget and
the retain MCQ set, two accuracies:

- **logit lens**: the layer's output pushed through the final norm and output head and scored as
  the evaluator scores the model's output (same prompts, tokenization and continuations as
  :mod:`sequnlearn.eval.scorer`; ``letter`` or ``cloze`` style). At the last layer it *is* the
  evaluator's accuracy; at earlier layers it says how much of the answer the fixed head already reads.
- **linear probe**: the same read-out with learned weights, trained on part of the questions and
  scored on held-out ones (k-fold cross-validation, fixed seed). It can read the answer from
  directions the head ignores or that unlearning turned away from the head.

A layer where the probe stays well above the lens (and the model's answer) is a layer where the
knowledge is still in the representation but hidden from the output; where both fell to chance, it
is not linearly there any more.

**Probe features.** The *answer position* of a question is the last prompt token (``"Answer:"``),
plus any tokens all its continuations share (the ``" "`` before the letter with a byte-level
tokenizer): the position whose output predicts the first token that tells the choices apart. Let
``n_q`` be the layer's hidden state there, through the final norm, and ``u_c`` the model's output
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

**Memory.** The evaluator's rows (one per question in letter style, one per choice in cloze: the
lens needs each continuation's positions), run layer by layer
(:func:`~sequnlearn.model.layers.run_layers` one layer at a time); of each layer only the
answer-position state per question and the continuations' log-probabilities are kept:
``layers × questions × d`` floats, in memory (float32) or, with ``features_dir``, in a float16
``.npy`` memory map on disk (6.9B on WMDP-Bio-Robust + MMLU: 32 × 15,400 × 4096 × 2 B ≈ 4 GB), plus
``distinct first tokens × d`` for the choice vectors. The probes are fitted one layer at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sequnlearn.errors import UserError

Loader = Callable[[], tuple]  # () -> (model, tokenizer)


@dataclass
class AuditOptions:
    """How the audit reads and probes the models."""

    style: str = "letter"
    """Prompt style: letter (" A".." D" after lettered choices, as WMDP/MMLU) or cloze (each choice's text)."""
    folds: int = 5
    """Cross-validation folds over questions (each question is scored once, held out)."""
    seed: int = 0
    """Seed of the fold assignment."""
    l2: float = 1e-2
    """L2 penalty of the probe on standardized features (``l2/2·|w|²`` added to the mean cross-entropy)."""
    prior: str = "lens"
    """What the probe's penalty pulls its weights towards: lens (the logit lens's read-out of the same
    product, so with few questions the probe starts from what the head reads) or zero."""
    max_iter: int = 30
    """Newton iterations per probe fit (it converges in about 10)."""
    batch_size: int = 32
    """Rows per forward pass (the evaluator's rows: one per question in letter style, per choice in cloze)."""
    limit: int | None = None
    """At most this many questions per subtask (as the evaluator's limit)."""
    features_dir: str | None = None
    """Keep the hidden-state features in float16 memory maps in this directory instead of in memory."""

    def __post_init__(self) -> None:
        if self.style not in ("letter", "cloze"):
            raise UserError(f"style {self.style!r} is unknown; use letter or cloze")
        if self.prior not in ("lens", "zero"):
            raise UserError(f"prior {self.prior!r} is unknown; use lens or zero")
        if self.folds < 2:
            raise UserError(f"folds={self.folds}: cross-validation needs at least 2 folds")
        if self.l2 < 0 or self.max_iter < 1 or self.batch_size < 1:
            raise UserError("l2 must be >= 0, max_iter and batch_size >= 1")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit={self.limit}: give a positive number of questions or leave it unset")


# ---------------------------------------------------------------- features and logit lens


@dataclass
class LayerReadout:
    """What one model gives on one question set, for every decoder layer.

    Attributes:
        states: ``(L, Q, D)`` answer-position hidden state of each question through the final norm,
            float32 array or float16 memory map.
        keys: ``(S,)`` index into ``vectors`` of each choice (``S`` = all choices, question 0's first).
        vectors: ``(K, D)`` output embeddings (head rows) of the distinct first distinguishing tokens.
        lens: ``(L, S)`` float64 log-probability of each choice's continuation read through the
            final norm and head from that layer.
        slots: ``(Q, C)`` index into ``S`` of question ``q``'s choice ``c``; -1 where a question has
            fewer than ``C`` choices.
        answers: ``(Q,)`` index of the correct choice.
    """

    states: np.ndarray
    keys: np.ndarray
    vectors: np.ndarray
    lens: np.ndarray
    slots: np.ndarray
    answers: np.ndarray


@dataclass
class _Row:
    """One model input: the evaluator's row (context + continuation minus its last token, shared by
    the choices it reads), the choices it scores, and for a question's first row the answer position."""

    tokens: list[int]
    targets: list[tuple[int, list[int]]]  # (flat choice index, continuation ids)
    answer_pos: int  # -1 on a question's other rows
    question: int


def _rows(tokenizer, questions, max_len: int) -> tuple[list[_Row], list[int]]:
    """The evaluator's rows (:func:`sequnlearn.eval.scorer.build_rows`: lm-eval's encoding, grouping and
    left truncation) with each question's answer position, and each choice's first distinguishing token.

    The answer position is the last token of the context plus the tokens all the question's
    continuations share (``" "`` before the letter with a byte-level tokenizer): the position whose
    output predicts the first token that tells the choices apart. Letter style is one row per
    question, cloze one per choice.

    Returns:
        ``(rows, keys)``: ``keys[s]`` is the first distinguishing token of flat choice ``s``.
    """
    from sequnlearn.eval.scorer import build_rows, encode_pairs

    rows, keys, flat = [], [], 0
    for qi, (ctx, conts) in enumerate(encode_pairs(tokenizer, questions)):
        k = 0
        while k < min(len(c) for c in conts) - 1 and len({c[k] for c in conts}) == 1:
            k += 1
        for i, r in enumerate(build_rows([(ctx, conts)], max_len)):
            cut = len(ctx) + len(r.targets[0][1]) - 1 - len(r.tokens)  # tokens dropped on the left
            targets = [(flat + j, cont) for j, cont in r.targets]
            if i == 0 and len(ctx) + k - 1 - cut < 0:
                raise UserError(f"question {qi}: the prompt is cut so short that its answer position is lost; "
                                "shorten the choices")
            rows.append(_Row(r.tokens, targets, len(ctx) + k - 1 - cut if i == 0 else -1, qi))
        keys += [c[k] for c in conts]
        flat += len(conts)
    return rows, keys


def _storage(shape: tuple[int, ...], features_dir: str | None, name: str) -> np.ndarray:
    if features_dir is None:
        return np.zeros(shape, dtype=np.float32)
    path = Path(features_dir)
    path.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape)


def read_layers(model, tokenizer, questions, *, batch_size: int = 32, features_dir: str | None = None,
                name: str = "features", progress: bool = False) -> LayerReadout:
    """Answer-position states and logit-lens log-likelihoods of every layer (see the module doc).

    Args:
        model: a supported causal LM (or peft-wrapped), on its device; left in its training mode.
        tokenizer: its tokenizer.
        questions: :class:`sequnlearn.eval.scorer.Question` s (prompts and continuations).
        batch_size: rows per forward pass.
        features_dir: keep the states in a float16 ``.npy`` memory map there, named ``name``.

    Returns:
        The :class:`LayerReadout`.
    """
    from tqdm.auto import tqdm

    from sequnlearn.eval.scorer import max_length
    from sequnlearn.model.layers import architecture, run_layers

    arch = architecture(model)
    rows, keys = _rows(tokenizer, questions, max_length(model, tokenizer))
    n_layers, dim = arch.num_layers, arch.head.weight.shape[-1]
    states = _storage((n_layers, len(questions), dim), features_dir, name)
    lens = np.zeros((n_layers, len(keys)), dtype=np.float64)
    rows.sort(key=lambda r: -len(r.tokens))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, key_index = np.unique(keys, return_inverse=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(questions), desc="audit", unit="question", disable=not progress) as bar:
            vectors = arch.head.weight[torch.from_numpy(tokens).to(device)].float().cpu().numpy()  # (K, D)
            for start in range(0, len(rows), batch_size):
                batch = _Batch(rows[start:start + batch_size], pad, device)
                ctx = arch.context(batch.ids, batch.mask)
                h = arch.embed(batch.ids, ctx)  # (B, T, D)
                for i in range(n_layers):  # one layer at a time: only its reductions are kept
                    h = run_layers(arch, h, ctx, i, i + 1)
                    batch.reduce(arch, h, states[i], lens[i])
                bar.update(len(batch.questions))
    finally:
        model.train(was_training)
    if isinstance(states, np.memmap):
        states.flush()
    return LayerReadout(states, key_index.reshape(-1), vectors, lens, *_slots(questions))


class _Batch:
    """A right-padded batch of rows and the positions the readout needs from it."""

    def __init__(self, rows: list[_Row], pad: int, device: torch.device) -> None:
        width = max(len(r.tokens) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        which, pos, tok, dest = [], [], [], []
        for b, r in enumerate(rows):
            n = len(r.tokens)
            ids[b, :n], mask[b, :n] = torch.tensor(r.tokens), 1
            for flat, cont in r.targets:
                for j, t in enumerate(cont):  # the position whose output predicts continuation token j
                    which.append(b)
                    pos.append(n - len(cont) + j)
                    tok.append(t)
                    dest.append(flat)
        self.ids, self.mask = ids.to(device), mask.to(device)
        firsts = [b for b, r in enumerate(rows) if r.answer_pos >= 0]
        self.first_rows = torch.tensor(firsts, dtype=torch.long, device=device)  # (B',)
        self.first_pos = torch.tensor([rows[b].answer_pos for b in firsts], dtype=torch.long, device=device)
        self.questions = np.array([rows[b].question for b in firsts], dtype=np.int64)
        self.which, self.pos = torch.tensor(which, device=device), torch.tensor(pos, device=device)  # (M,)
        self.tok, self.dest = torch.tensor(tok, device=device), np.array(dest, dtype=np.int64)  # (M,)

    def reduce(self, arch, h: torch.Tensor, states: np.ndarray, lens: np.ndarray) -> None:
        """Store the answer-position states of ``h`` ``(B, T, D)`` (through the final norm) and add each
        continuation token's log-probability, read through the final norm and head, to its choice."""
        if len(self.questions):
            normed = arch.norm(h[self.first_rows, self.first_pos])  # (B', D)
            states[self.questions] = normed.float().cpu().numpy().astype(states.dtype, copy=False)
        logits = arch.logits(h[self.which, self.pos].unsqueeze(0))[0]  # (M, V)
        lp = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(self.tok), device=h.device), self.tok]  # (M,)
        np.add.at(lens, self.dest, lp.double().cpu().numpy())


def _slots(questions) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, C)`` flat index of each question's choices (-1 padded) and ``(Q,)`` answers."""
    width = max(len(q.continuations) for q in questions)
    slots = np.full((len(questions), width), -1, dtype=np.int64)
    k = 0
    for i, q in enumerate(questions):
        n = len(q.continuations)
        slots[i, :n] = np.arange(k, k + n)
        k += n
    return slots, np.array([q.record.answer for q in questions], dtype=np.int64)


def lens_accuracy(readout: LayerReadout) -> list[float]:
    """Logit-lens accuracy per layer: the first highest-scoring choice is the correct one (lm-eval's rule)."""
    valid = readout.slots >= 0
    out = []
    for layer in range(readout.lens.shape[0]):
        scores = np.where(valid, readout.lens[layer][np.maximum(readout.slots, 0)], -np.inf)  # (Q, C)
        out.append(float(np.mean(np.argmax(scores, axis=1) == readout.answers)))
    return out


# ---------------------------------------------------------------- probes


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


# ---------------------------------------------------------------- the audit


@dataclass
class AuditModel:
    """One model to audit.

    Attributes:
        label: its name in tables and plots.
        load: returns ``(model, tokenizer)`` (called once).
        source: where it came from (a path or a description), recorded in ``audit.json``.
        target_layers: the unlearning phases' target layers, when it is an unlearning run.
    """

    label: str
    load: Loader
    source: str = ""
    target_layers: list[int] | None = None


def layer_names(num_layers: int) -> list[str]:
    """``["0", "1", ..., "N-1"]``: the readout's layer axis (decoder layer outputs)."""
    return [str(i) for i in range(num_layers)]


def audit_one(model, tokenizer, tasks: dict, opts: AuditOptions, *, label: str = "model",
              progress: bool = False) -> dict[str, Any]:
    """Probe and logit-lens accuracy per layer of one model on each task.

    Args:
        tasks: key (``forget``, ``retain``) → :class:`~sequnlearn.data.mcq.MCQTask`.

    Returns:
        ``{key: {"n", "probe": [{"acc", "acc_stderr", "folds"}, ...], "lens": [acc, ...]}}``, one
        entry per decoder layer.
    """
    from sequnlearn.eval.scorer import plan_questions

    out = {}
    for key, task in tasks.items():
        questions = plan_questions(task, style=opts.style, limit=opts.limit, num_fewshot=0)
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{label}-{key}")
        readout = read_layers(model, tokenizer, questions, batch_size=opts.batch_size,
                              features_dir=opts.features_dir, name=name, progress=progress)
        device = next(model.parameters()).device
        vectors = readout.vectors[readout.keys]  # (S, D)
        probes = [probe_accuracy(readout.states[layer], vectors, readout.slots, readout.answers,
                                 folds=opts.folds, seed=opts.seed, l2=opts.l2, max_iter=opts.max_iter,
                                 prior=opts.prior, device=device)
                  for layer in range(readout.states.shape[0])]
        out[key] = {"n": len(questions), "probe": probes, "lens": lens_accuracy(readout)}
    return out


def chance(task) -> float:
    """Random-chance accuracy of a task: mean of 1/len(choices)."""
    records = [r for sub in task.subtasks for r in sub.records]
    return sum(1 / len(r.choices) for r in records) / len(records)


def run_audit(models: Sequence[AuditModel], tasks: dict, opts: AuditOptions, *, progress: bool = True) -> dict:
    """Audit each model (loaded one at a time) on each task; returns the ``audit.json`` content.

    The first model is the base the others are compared with.

    Raises:
        UserError: no model, duplicate labels, or models with different depths.
    """
    import time

    if not models:
        raise UserError("give at least one model to audit")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"model labels must differ (got {labels}); give --labels")
    t0, results, depth = time.time(), [], None
    for m in models:
        model, tokenizer = m.load()
        from sequnlearn.model.layers import architecture

        n = architecture(model).num_layers
        if depth is not None and n != depth:
            raise UserError(f"{m.label} has {n} layers, {models[0].label} {depth}; audit models of one architecture")
        depth = n
        if progress:
            print(f"[audit] {m.label}", flush=True)
        results.append({"label": m.label, "source": m.source, "target_layers": m.target_layers,
                        **audit_one(model, tokenizer, tasks, opts, label=m.label, progress=progress)})
        del model
    return {"options": asdict(opts), "layers": layer_names(depth), "base": labels[0],
            "tasks": {key: {"source": task.source, "chance": chance(task)} for key, task in tasks.items()},
            "models": results, "wall_s": round(time.time() - t0, 1)}


def write_audit(result: dict, out: Path) -> list[str]:
    """Write ``audit.json``, ``audit.md`` and ``audit.png`` into ``out``; returns their names."""
    from sequnlearn.runs import atomic_write_text, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "audit.json", result)
    atomic_write_text(out / "audit.md", "# Knowledge audit\n\n" + audit_markdown(result))
    plot_audit(result, out / "audit.png")
    return ["audit.json", "audit.md", "audit.png"]


# ---------------------------------------------------------------- table and plot


def _targets(result: dict) -> list[int]:
    """Target layers of the audited unlearning runs, back to front, each once."""
    seen: list[int] = []
    for m in result["models"]:
        for layer in m.get("target_layers") or []:
            if layer not in seen:
                seen.append(layer)
    return seen


def audit_markdown(result: dict) -> str:
    """The audit as markdown: a per-layer table (probe / lens per task and model) and a summary."""
    keys, models = list(result["tasks"]), result["models"]
    targets = _targets(result)
    opts = result["options"]
    head = ["Layer"] + [f"{key}: {m['label']}" for key in keys for m in models]
    lines = ["Accuracy per layer, **probe / logit lens** (probe: linear read-out of the hidden states, "
             f"{opts['folds']}-fold cross-validated over questions, seed {opts['seed']}, l2 {opts['l2']:g} towards "
             f"{'the lens' if opts.get('prior', 'lens') == 'lens' else 'zero'}; "
             "lens: the layer's output through the final norm and head, scored like the evaluator — at the "
             f"last layer it is the model's own accuracy). Prompt style: {opts['style']}. "
             + "; ".join(f"{key}: {result['models'][0][key]['n']} questions, "
                         f"chance {result['tasks'][key]['chance']:.2f}"
                         for key in keys)
             + "."
             + (f" Target layers of unlearning, back to front: {', '.join(map(str, targets))} (marked *)."
                if targets else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(result["layers"]):
        mark = "*" if int(name) in targets else ""
        cells = [f"{m[key]['probe'][i]['acc']:.3f} / {m[key]['lens'][i]:.3f}" for key in keys for m in models]
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    lines += ["", _summary_table(result), ""]
    if result.get("phases"):
        lines += [_phase_table(result), ""]
    n = min(result["models"][0][key]["n"] for key in keys)
    lines.append(f"One standard error of an accuracy near 0.5 is {math.sqrt(0.25 / n):.3f} here ({n} questions); "
                 "per-fold probe accuracies are in audit.json.")
    return "\n".join(lines) + "\n"


def _summary_table(result: dict) -> str:
    """Per model and task: the answer (last-layer lens), the best probe layer, the last layer's probe."""
    keys = list(result["tasks"])
    cols = ("answer acc", "best probe (layer)", "last-layer probe")
    head = ["Model"] + [f"{key}: {col}" for key in keys for col in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result["models"]:
        cells = []
        for key in keys:
            probes = [p["acc"] for p in m[key]["probe"]]
            best = max(range(len(probes)), key=lambda i: probes[i])
            cells += [f"{m[key]['lens'][-1]:.3f}", f"{probes[best]:.3f} ({result['layers'][best]})",
                      f"{probes[-1]:.3f}"]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _phase_table(result: dict) -> str:
    """Forget probe / lens per layer after each unlearning phase (the model in memory, before merging)."""
    phases = result["phases"]
    head = ["Layer"] + [p["label"] for p in phases]
    lines = ["After each unlearning phase, forget set, **probe / logit lens** (the adapter in memory, "
             "before merging; the last phase is the unlearned model):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(result["layers"]):
        cells = [f"{p['forget']['probe'][i]['acc']:.3f} / {p['forget']['lens'][i]:.3f}" for p in phases]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_audit(result: dict, path: Path) -> None:
    """Probe (top) and logit-lens (bottom) accuracy per layer, one panel per task, one line per model.

    The first model (the base) is drawn black and dashed; chance is a dotted line; the unlearning
    runs' target layers are shaded.
    """
    from sequnlearn.report import _pyplot, _save

    plt = _pyplot()
    keys = list(result["tasks"])
    fig, axes = plt.subplots(2, len(keys), figsize=(4.4 * len(keys), 6.6), sharex=True, sharey=True, squeeze=False)
    x = list(range(len(result["layers"])))
    targets = _targets(result)
    for col, key in enumerate(keys):
        for row, measure in enumerate(("probe", "lens")):
            ax = axes[row][col]
            for j, m in enumerate(result["models"]):
                ys = [p["acc"] for p in m[key]["probe"]] if measure == "probe" else m[key]["lens"]
                style = dict(color="k", ls="--", lw=1.5) if j == 0 else dict(lw=1.5)
                name = m["label"] + (" (base)" if j == 0 and m["label"] != "base" else "")
                ax.plot(x, ys, marker="o", ms=3, label=name, **style)
            for t in targets:
                ax.axvspan(t - 0.4, t + 0.4, color="tab:red", alpha=0.08, zorder=0)
            ax.axhline(result["tasks"][key]["chance"], color="gray", ls=":", lw=1, label="chance")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{key}: {'linear probe' if measure == 'probe' else 'logit lens'}", fontsize=10)
            if col == 0:
                ax.set_ylabel("accuracy")
            if row == 1:
                ax.set_xticks(x, result["layers"])
                ax.set_xlabel("layer (shaded: unlearning target layers)" if targets else "layer")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Knowledge audit: where the answers stay decodable", fontsize=11)
    _save(fig, path)


def report_section(dirs: Sequence[Path], out: Path) -> tuple[list[str], list[str]]:
    """For ``sequnlearn report``: markdown lines for every ``audit.json`` under ``dirs`` (its table) and
    the plots redrawn from it into ``out`` (``audit.png``, ``audit-2.png``, ...).

    Returns:
        ``(lines, file names written)``; both empty when there is no audit.
    """
    from sequnlearn.runs import read_json

    paths = sorted({p for d in dirs for p in Path(d).rglob("audit.json")})
    lines: list[str] = []
    files: list[str] = []
    for i, p in enumerate(paths):
        name = "audit.png" if i == 0 else f"audit-{i + 1}.png"
        result = read_json(p)
        plot_audit(result, out / name)
        files.append(name)
        lines += [f"## Knowledge audit ({p.parent})", "", audit_markdown(result), f"![knowledge audit]({name})", ""]
    return lines, files


# ---------------------------------------------------------------- run directories


def run_target_layers(path: str | Path) -> list[int] | None:
    """Target layers of the unlearning run in ``path`` (from its ``config.yaml``), else ``None``."""
    from sequnlearn.config import read_yaml, stored_target_layers

    cfg_path = Path(path) / "config.yaml"
    if not cfg_path.is_file():
        return None
    return stored_target_layers(read_yaml(cfg_path) or {})  # None for layer_start: null (the model's last layer)
