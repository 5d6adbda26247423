"""Knowledge audit: is the forget knowledge gone from the weights, or only from the output?

For every layer of each model given (base, unlearned, attacked, ...) and for the forget and the
retain MCQ set, two numbers:

- **probe accuracy**: a linear probe reads the layer's hidden states and picks the correct choice;
  trained on part of the questions, scored on held-out ones (k-fold cross-validation, fixed seed).
  High where the representation still separates right from wrong answers, whatever the output says.
- **logit-lens accuracy**: the layer's output pushed through the final norm and output head and
  scored as the evaluator scores the model's output. At the last layer this *is* the evaluator's
  accuracy; at earlier layers it says how much of the answer the output head could already read.

A layer where the probe stays high while the lens (and the model's answer) fell is a layer where the
knowledge was hidden from the output, not removed from the representation.

**Features.** Each question ``q`` and choice ``c`` is one sequence: the evaluator's prompt (same
template and tokenization as :mod:`sequnlearn.eval.mcq`, ``letter`` or ``cloze`` style) followed by
that choice's continuation (``" B"`` in letter style, the choice text in cloze style). The feature of
``(q, c)`` at layer ``l`` is the hidden state at the sequence's last token: the position where the
whole choice has been read, which attends to the question and, in letter style, to all the lettered
choices. Layer ``emb`` is the embedding output (a control: it sees only the choice's last token, so a
probe above chance there reads the answers' surface form, not knowledge); layer ``i`` is decoder
layer ``i``'s output, as the engine's :func:`~sequnlearn.model.layers.run_layers` computes it.

Why per choice and not "the prompt's last token → answer index": the per-choice probe is one weight
vector ``w`` shared by the choices, ``P(c) = softmax_c(w·h(q, c))`` (a conditional logit model), so
it has ``d`` parameters instead of ``k·d``, does not depend on where the answer sits (A..D), works
the same for both prompt styles and for questions with different numbers of choices, and matches
the logit lens, which also scores each choice's continuation.

**Probe.** Features are standardized with the training fold's mean and standard deviation; ``w``
minimizes the mean cross-entropy over the choices plus ``l2/2·|w|²`` (L-BFGS, float32, from zero:
deterministic). ``folds``-fold cross-validation over questions with a seeded permutation: every
question is scored once, by the probe that did not see it. Reported: accuracy over all held-out
questions, its binomial standard error, and each fold's accuracy.

**Memory.** One forward pass per batch of sequences, layer by layer
(:func:`~sequnlearn.model.layers.run_layers` one layer at a time); of each layer only the last-token
states (``questions × choices × d``) and the continuation log-probabilities are kept. The features
of all layers, ``(layers + 1) × questions × choices × d``, are held in memory (float32) or, with
``features_dir``, in a float16 ``.npy`` memory map on disk (6.9B, 33 × 1,300 × 4 × 4096: 1.4 GB).
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
    max_iter: int = 100
    """L-BFGS iterations per probe fit."""
    batch_size: int = 32
    """Sequences (question × choice) per forward pass."""
    limit: int | None = None
    """At most this many questions per subtask (as the evaluator's limit)."""
    features_dir: str | None = None
    """Keep the hidden-state features in float16 memory maps in this directory instead of in memory."""

    def __post_init__(self) -> None:
        if self.style not in ("letter", "cloze"):
            raise UserError(f"style {self.style!r} is unknown; use letter or cloze")
        if self.folds < 2:
            raise UserError(f"folds={self.folds}: cross-validation needs at least 2 folds")
        if self.l2 < 0 or self.max_iter < 1 or self.batch_size < 1:
            raise UserError("l2 must be >= 0, max_iter and batch_size >= 1")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit={self.limit}: give a positive number of questions or leave it unset")


# ---------------------------------------------------------------- features and logit lens


@dataclass
class LayerReadout:
    """What one model gives on one question set, for every layer (index 0 = embeddings).

    Attributes:
        features: ``(L+1, S, D)`` last-token hidden state of each (question, choice) sequence
            (``S`` = all choices, question 0's first), float32 array or float16 memory map.
        lens: ``(L+1, S)`` float64 log-probability of each choice's continuation read through the
            final norm and head from that layer.
        slots: ``(Q, C)`` index into ``S`` of question ``q``'s choice ``c``; -1 where a question has
            fewer than ``C`` choices.
        answers: ``(Q,)`` index of the correct choice.
    """

    features: np.ndarray
    lens: np.ndarray
    slots: np.ndarray
    answers: np.ndarray


def _sequences(tokenizer, questions, max_len: int) -> list[tuple[list[int], int]]:
    """(tokens, continuation length) per (question, choice), in flat choice order.

    The tokens are the evaluator's context and continuation (lm-eval's ``_encode_pair``), cut on the
    left to the model's ``max_len``.

    Raises:
        UserError: a continuation does not fit in the model's context with one token before it.
    """
    from sequnlearn.eval.mcq import encode_pairs

    out = []
    for ctx, conts in encode_pairs(tokenizer, questions):
        for cont in conts:
            if len(cont) >= max_len:
                raise UserError(f"a choice is {len(cont)} tokens, too long for the model's {max_len}; shorten it")
            out.append(((ctx + cont)[-max_len:], len(cont)))
    return out


def _storage(shape: tuple[int, ...], features_dir: str | None, name: str) -> np.ndarray:
    if features_dir is None:
        return np.zeros(shape, dtype=np.float32)
    path = Path(features_dir)
    path.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape)


def read_layers(model, tokenizer, questions, *, batch_size: int = 32, features_dir: str | None = None,
                name: str = "features", progress: bool = False) -> LayerReadout:
    """Features and logit-lens log-likelihoods of every layer for ``questions`` (see the module doc).

    Args:
        model: a supported causal LM (or peft-wrapped), on its device; left in its training mode.
        tokenizer: its tokenizer.
        questions: :class:`sequnlearn.eval.mcq.Question` s (prompts and continuations).
        batch_size: sequences per forward pass.
        features_dir: keep the features in a float16 ``.npy`` memory map there, named ``name``.

    Returns:
        The :class:`LayerReadout`.
    """
    from tqdm.auto import tqdm

    from sequnlearn.eval.mcq import max_length
    from sequnlearn.model.layers import architecture, run_layers

    arch = architecture(model)
    seqs = _sequences(tokenizer, questions, max_length(model, tokenizer))
    n_layers, dim = arch.num_layers, arch.head.weight.shape[-1]
    features = _storage((n_layers + 1, len(seqs), dim), features_dir, name)
    lens = np.zeros((n_layers + 1, len(seqs)), dtype=np.float64)
    order = sorted(range(len(seqs)), key=lambda s: -len(seqs[s][0]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(seqs), desc="audit", unit="seq", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = _Batch([seqs[s] for s in chunk], pad, device)
                ctx = arch.context(batch.ids, batch.mask)
                h = arch.embed(batch.ids, ctx)  # (B, T, D)
                batch.reduce(arch, h, chunk, features[0], lens[0])
                for i in range(n_layers):
                    h = run_layers(arch, h, ctx, i, i + 1)
                    batch.reduce(arch, h, chunk, features[i + 1], lens[i + 1])
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    if isinstance(features, np.memmap):
        features.flush()
    return LayerReadout(features, lens, *_slots(questions))


class _Batch:
    """A right-padded batch of sequences and the positions the readout needs from it."""

    def __init__(self, seqs: list[tuple[list[int], int]], pad: int, device: torch.device) -> None:
        width = max(len(t) for t, _ in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
        rows, pos, tok, dest = [], [], [], []
        for b, (tokens, n_cont) in enumerate(seqs):
            n = len(tokens)
            ids[b, :n], mask[b, :n] = torch.tensor(tokens), 1
            for j in range(n_cont):  # the position whose output predicts continuation token j
                rows.append(b)
                pos.append(n - n_cont - 1 + j)
                tok.append(tokens[n - n_cont + j])
                dest.append(b)
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.last = torch.tensor([len(t) - 1 for t, _ in seqs], device=device)  # (B,)
        self.rows, self.pos = torch.tensor(rows, device=device), torch.tensor(pos, device=device)  # (M,)
        self.tok, self.dest = torch.tensor(tok, device=device), torch.tensor(dest)  # (M,)

    def reduce(self, arch, h: torch.Tensor, chunk: list[int], features: np.ndarray, lens: np.ndarray) -> None:
        """Store the last-token states of ``h`` ``(B, T, D)`` and add the continuations' log-probabilities."""
        idx = np.asarray(chunk)
        last = h[torch.arange(h.shape[0], device=h.device), self.last]  # (B, D)
        features[idx] = last.float().cpu().numpy().astype(features.dtype, copy=False)
        logits = arch.logits(h[self.rows, self.pos].unsqueeze(0))[0]  # (M, V)
        lp = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(self.tok), device=h.device), self.tok]  # (M,)
        per_seq = torch.zeros(h.shape[0], dtype=torch.float64).index_add_(0, self.dest, lp.cpu().double())  # (B,)
        lens[idx] = per_seq.numpy()


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


def _choice_features(features: np.ndarray, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, D)`` features of one layer → ``(Q, C, D)`` float32 and the ``(Q, C)`` valid mask."""
    valid = torch.from_numpy(slots >= 0)
    x = torch.from_numpy(np.asarray(features[np.maximum(slots, 0)], dtype=np.float32))  # (Q, C, D)
    return x * valid.unsqueeze(-1), valid


def fit_probe(x: torch.Tensor, valid: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2,
              max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the conditional-logit probe ``P(c | q) = softmax_c(w·z(q, c))`` on standardized features.

    Args:
        x: ``(Q, C, D)`` features; valid: ``(Q, C)`` real choices; y: ``(Q,)`` correct choice.

    Returns:
        ``(w, mean, std)``: the ``(D,)`` weights and the ``(D,)`` standardization they apply to.
    """
    real = x[valid]  # (N, D)
    mean, std = real.mean(0), real.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # (Q, C, D)
    w = torch.zeros(x.shape[-1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        scores = (z @ w).masked_fill(~valid, float("-inf"))  # (Q, C)
        loss = torch.nn.functional.cross_entropy(scores, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), mean, std


def predict_probe(x: torch.Tensor, valid: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                  std: torch.Tensor) -> torch.Tensor:
    """``(Q,)`` chosen choice of each question under a fitted probe."""
    scores = (((x - mean) / std) @ w).masked_fill(~valid, float("-inf"))  # (Q, C)
    return scores.argmax(-1)


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


def probe_accuracy(features: np.ndarray, slots: np.ndarray, answers: np.ndarray, *, folds: int = 5,
                   seed: int = 0, l2: float = 1e-2, max_iter: int = 100) -> dict[str, Any]:
    """Cross-validated accuracy of the probe on one layer's features.

    Args:
        features: ``(S, D)`` one feature per (question, choice) slot.
        slots: ``(Q, C)`` slot of each question's choices (-1: none); answers: ``(Q,)``.

    Returns:
        ``{"acc", "acc_stderr", "folds": [acc per fold]}``; ``acc`` is over all held-out questions.
    """
    x, valid = _choice_features(features, slots)
    y = torch.from_numpy(answers)
    fold = torch.from_numpy(fold_ids(len(answers), folds, seed))
    correct = torch.zeros(len(answers), dtype=torch.bool)
    per_fold = []
    for k in range(folds):
        test, train = fold == k, fold != k
        w, mean, std = fit_probe(x[train], valid[train], y[train], l2=l2, max_iter=max_iter)
        hit = predict_probe(x[test], valid[test], w, mean, std) == y[test]
        correct[test] = hit
        per_fold.append(float(hit.float().mean()))
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
    """``["emb", "0", "1", ..., "N-1"]``: the readout's layer axis."""
    return ["emb"] + [str(i) for i in range(num_layers)]


def audit_one(model, tokenizer, tasks: dict, opts: AuditOptions, *, label: str = "model",
              progress: bool = False) -> dict[str, Any]:
    """Probe and logit-lens accuracy per layer of one model on each task.

    Args:
        tasks: key (``forget``, ``retain``) → :class:`~sequnlearn.data.mcq.MCQTask`.

    Returns:
        ``{key: {"n", "probe": [{"acc", "acc_stderr", "folds"}, ...], "lens": [acc, ...]}}``, one
        entry per layer (embeddings first).
    """
    from sequnlearn.eval.mcq import plan_questions

    out = {}
    for key, task in tasks.items():
        questions = plan_questions(task, style=opts.style, limit=opts.limit, num_fewshot=0)
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{label}-{key}")
        readout = read_layers(model, tokenizer, questions, batch_size=opts.batch_size,
                              features_dir=opts.features_dir, name=name, progress=progress)
        probes = [probe_accuracy(readout.features[layer], readout.slots, readout.answers, folds=opts.folds,
                                 seed=opts.seed, l2=opts.l2, max_iter=opts.max_iter)
                  for layer in range(readout.features.shape[0])]
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
             f"{opts['folds']}-fold cross-validated over questions, seed {opts['seed']}, l2 {opts['l2']:g}; "
             "lens: the layer's output through the final norm and head, scored like the evaluator — at the "
             f"last layer it is the model's own accuracy). Prompt style: {opts['style']}. "
             + "; ".join(f"{key}: {result['models'][0][key]['n']} questions, chance {result['tasks'][key]['chance']:.2f}"
                         for key in keys)
             + ". `emb` is the embedding output (a control: it sees only each choice's last token)."
             + (f" Target layers of unlearning, back to front: {', '.join(map(str, targets))} (marked *)."
                if targets else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(result["layers"]):
        mark = "*" if name != "emb" and int(name) in targets else ""
        cells = [f"{m[key]['probe'][i]['acc']:.3f} / {m[key]['lens'][i]:.3f}" for key in keys for m in models]
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    lines += ["", _summary_table(result), ""]
    n = min(result["models"][0][key]["n"] for key in keys)
    lines.append(f"One standard error of an accuracy near 0.5 is {math.sqrt(0.25 / n):.3f} here ({n} questions); "
                 "per-fold probe accuracies are in audit.json.")
    return "\n".join(lines) + "\n"


def _summary_table(result: dict) -> str:
    """Per model and task: the answer (last-layer lens), the best probe layer, the last layer's probe."""
    keys = list(result["tasks"])
    head = ["Model"] + [f"{key}: {col}" for key in keys for col in ("answer acc", "best probe (layer)", "last-layer probe")]
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
                ax.plot(x, ys, marker="o", ms=3, label=m["label"] + (" (base)" if j == 0 else ""), **style)
            for t in targets:
                ax.axvspan(t + 1 - 0.4, t + 1 + 0.4, color="tab:red", alpha=0.08, zorder=0)
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


def report_section(root: Path, out: Path) -> list[str]:
    """Markdown lines for ``sequnlearn report``: every ``audit.json`` under ``root``, its table and a
    fresh plot written into ``out`` (``audit.png``, ``audit-2.png``, ...)."""
    from sequnlearn.runs import read_json

    lines: list[str] = []
    for i, p in enumerate(sorted(Path(root).rglob("audit.json"))):
        name = "audit.png" if i == 0 else f"audit-{i + 1}.png"
        result = read_json(p)
        plot_audit(result, out / name)
        lines += [f"## Knowledge audit ({p.parent})", "", audit_markdown(result), f"![knowledge audit]({name})", ""]
    return lines
