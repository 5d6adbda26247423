"""The layer readout: every decoder layer's answer-position state and logit lens on one question set.

The *answer position* of a question is the last prompt token (``"Answer:"``), plus any tokens all
its continuations share (the ``" "`` before the letter with a byte-level tokenizer): the position
whose output predicts the first token that tells the choices apart. The readout keeps, per layer,
the hidden state there (through the final norm: the probes' input, :mod:`sequnlearn.audit.probes`)
and each continuation's log-probability read through the final norm and head (the logit lens,
scored as :mod:`sequnlearn.eval.scorer` scores the model's output).

**Memory.** The evaluator's rows (one per question in letter style, one per choice in cloze: the
lens needs each continuation's positions), run layer by layer
(:func:`~sequnlearn.model.layers.run_layers` one layer at a time); of each layer only the
answer-position state per question and the continuations' log-probabilities are kept:
``layers × questions × d`` floats, in memory (float32) or, with ``features_dir``, in a float16
``.npy`` memory map on disk (6.9B on WMDP-Bio-Robust + MMLU: 32 × 15,400 × 4096 × 2 B ≈ 4 GB), plus
``distinct first tokens × d`` for the choice vectors. The probes are fitted one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sequnlearn.errors import UserError
from sequnlearn.eval.scorer import build_rows, encode_pairs, max_length, pad_rows, target_positions
from sequnlearn.model.layers import architecture, run_layers


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
    """A right-padded batch of rows (the scorer's padding and read positions) and the answer positions."""

    def __init__(self, rows: list[_Row], pad: int, device: torch.device) -> None:
        ids, mask = pad_rows(rows, pad)  # (B, T): the scorer's padding
        which, pos, tok, dest = target_positions(rows)  # (M,): where each continuation token is read
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
