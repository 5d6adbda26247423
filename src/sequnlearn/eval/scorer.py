"""The ``fast`` MCQ backend: lm-eval's loglikelihoods with one forward pass per question.

Tokenization follows lm-eval's ``HFLM`` exactly: ``context_enc = encode(context)``,
``continuation_enc = encode(context + continuation)[len(context_enc):]`` and the model reads
``(context_enc + continuation_enc)[-(max_length + 1):][:-1]``. As in lm-eval's "logits cache",
the choices of a question whose inputs ``context_enc + continuation_enc[:-1]`` coincide share one
row: for letters (" A".." D" after "Answer:") that is all four, whether " A" is one token or, with
a byte-level tokenizer, a shared " " then "A". So ``letter`` style is one forward per question
and gives the same numbers as scoring each continuation separately. ``cloze`` style (choice texts
as continuations) needs one row per choice. Speed comes from projecting only the needed
positions onto the vocabulary (``logits_to_keep``), length-sorted batches padded to their own
longest row, and no KV cache.

The same module turns loglikelihoods into per-question predictions and lm-eval's metrics, so the
``lm-eval`` backend reports through the very same code.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sequnlearn.data.mcq import (MCQRecord, MCQTask, build_prompt, choice_labels, continuations,
                                 fewshot_examples)
from sequnlearn.errors import NonFiniteModel, UserError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives one
_TOKENIZER_INFINITY = 1000000000000000019884624838656
_SEQLEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass
class Question:
    """One question ready to score.

    Attributes:
        task: task name; subtask: subtask name; doc_id: index within the subtask (as lm-eval).
        record: the question; context: the full prompt; continuations: the scored strings.
    """

    task: str
    subtask: str
    doc_id: int
    record: MCQRecord
    context: str
    continuations: list[str]


@dataclass
class _Row:
    """One model input and the continuations read from it.

    Attributes:
        tokens: input ids, already truncated on the left to the model's max length.
        targets: (flat choice index, continuation token ids) for each choice this row scores.
    """

    tokens: list[int]
    targets: list[tuple[int, list[int]]]


# ---------------------------------------------------------------- questions


def plan_questions(task: MCQTask, *, style: str, limit: int | None, num_fewshot: int) -> list[Question]:
    """Prompts for every question of ``task`` (first ``limit`` of each subtask, as lm-eval's limit).

    Raises:
        UserError: not enough few-shot examples.
    """
    out = []
    for sub in task.subtasks:
        for i, rec in enumerate(sub.records[:limit] if limit else sub.records):
            ctx = build_prompt(rec, style, fewshot_examples(sub, rec, num_fewshot))
            out.append(Question(task.name, sub.name, i, rec, ctx, continuations(rec, style)))
    return out


# ---------------------------------------------------------------- tokenization (lm-eval's HFLM)


def max_length(model: Any, tokenizer: Any) -> int:
    """The context length lm-eval's ``HFLM`` uses: config ``n_positions``/``max_position_embeddings``/
    ``n_ctx``, else the tokenizer's ``model_max_length``, else 2048."""
    config = getattr(model, "config", None)
    cfg = getattr(config, "text_config", None) or config
    for attr in _SEQLEN_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    tml = getattr(tokenizer, "model_max_length", None)
    if tml is not None and tml != _TOKENIZER_INFINITY:
        return int(tml)
    return DEFAULT_MAX_LENGTH


def _encode_many(tokenizer: Any, strings: list[str]) -> list[list[int]]:
    """``HFLM.tok_encode`` for many strings: default special tokens, none if a string starts with BOS.

    ``HFLM.prefix_token_id`` is BOS, else EOS; a string already starting with its text is encoded
    with ``add_special_tokens=False``.
    """
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = tokenizer.decode(prefix_id) if prefix_id is not None else None
    flags = [bool(prefix) and s.startswith(prefix) for s in strings]
    out: list[list[int] | None] = [None] * len(strings)
    for flag in (False, True):
        idx = [i for i, f in enumerate(flags) if f == flag]
        if not idx:
            continue
        kwargs = {"add_special_tokens": False} if flag else {}
        ids = tokenizer([strings[i] for i in idx], **kwargs)["input_ids"]
        for i, row in zip(idx, ids):
            out[i] = list(row)
    return out  # type: ignore[return-value]


def encode_pairs(tokenizer: Any, questions: Sequence[Question]) -> list[tuple[list[int], list[list[int]]]]:
    """lm-eval's ``_encode_pair`` for each question: (context ids, continuation ids per choice).

    Trailing whitespace of the context moves to the continuation; the continuation ids are the
    tail of the encoded whole after ``len(encode(context))`` tokens.

    Raises:
        UserError: a continuation encodes to no token.
    """
    ctxs, wholes = [], []
    for q in questions:
        n_sp = len(q.context) - len(q.context.rstrip())
        ctx = q.context[:-n_sp] if n_sp else q.context
        ctxs.append(ctx)  # the stripped whitespace moves into each continuation: whole = context + cont
        wholes.extend(q.context + c for c in q.continuations)
    ctx_ids, whole_ids = _encode_many(tokenizer, ctxs), _encode_many(tokenizer, wholes)
    out, k = [], 0
    for q, c_ids in zip(questions, ctx_ids):
        conts = [w[len(c_ids):] for w in whole_ids[k:k + len(q.continuations)]]
        k += len(q.continuations)
        if any(len(c) == 0 for c in conts):
            raise UserError(f"{q.task}/{q.subtask} question {q.doc_id}: a choice encodes to no token after "
                            f"the prompt; make every choice non-empty")
        out.append((c_ids, conts))
    return out


def build_rows(pairs: Sequence[tuple[list[int], list[list[int]]]], max_len: int) -> list[_Row]:
    """Group each question's choices by ``context + continuation[:-1]`` into model rows.

    Args:
        pairs: (context ids, continuation ids per choice) per question.
        max_len: model context length; inputs keep their last ``max_len`` tokens, as lm-eval.

    Returns:
        Rows whose targets index choices in question order, flattened (question 0's choices first).

    Raises:
        UserError: a continuation alone is longer than the model's context.
    """
    rows, flat = [], 0
    for ctx, conts in pairs:
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for cont in conts:
            if len(cont) > max_len:
                raise UserError(f"a choice is {len(cont)} tokens, longer than the model's {max_len}; shorten it")
            groups.setdefault(tuple(ctx + cont[:-1]), []).append((flat, cont))
            flat += 1
        rows.extend(_Row(list(key[-max_len:]), targets) for key, targets in groups.items())
    return rows


# ---------------------------------------------------------------- scoring


def _hf_model(model: Any) -> Any:
    """The ``transformers`` model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(_hf_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def pad_rows(rows: Sequence[_Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' input ids right-padded to the longest, ``(B, T)`` on the CPU, and the ``(B, T)``
    attention mask (1 on real tokens, 0 on padding). Rows: anything with ``tokens`` and ``targets``
    (the knowledge audit's rows too)."""
    width = max(len(r.tokens) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        ids[b, :n], mask[b, :n] = torch.tensor(r.tokens), 1
    return ids, mask


def target_positions(rows: Sequence[_Row]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Where each continuation token of the rows' targets is read, one entry per token:
    ``(row, position, token id, flat choice index)``; the position is the one whose logits predict the
    token in the right-padded batch of :func:`pad_rows`."""
    which, pos, tok, dest = [], [], [], []
    for b, r in enumerate(rows):
        n = len(r.tokens)
        for flat, cont in r.targets:
            for j, t in enumerate(cont):
                which.append(b)
                pos.append(n - len(cont) + j)  # the position whose logits predict cont[j]
                tok.append(t)
                dest.append(flat)
    return which, pos, tok, dest


def _batch_logprobs(model: Any, rows: list[_Row], pad_id: int, device: torch.device,
                    use_keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at the positions the rows' continuations are read from.

    Returns:
        ``(logprobs, flat_pos)``: logprobs ``(N, V)`` fp32 over the N needed positions, and
        ``flat_pos`` ``(B, T)`` mapping (row, position) to its index in ``logprobs``.
    """
    ids, _ = pad_rows(rows, pad_id)  # (B, T)
    need = torch.zeros(ids.shape, dtype=torch.bool)  # (B, T)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        longest = max(len(c) for _, c in r.targets)
        need[b, n - longest:n] = True
    ids, need = ids.to(device), need.to(device)
    if use_keep:  # right padding and no mask: real positions see exactly what lm-eval's input gives
        logits = model(input_ids=ids, logits_to_keep=need, use_cache=False).logits  # (N, V)
    else:
        logits = model(input_ids=ids, use_cache=False).logits[need]  # (N, V)
    flat_pos = torch.cumsum(need.flatten(), 0).view_as(need) - 1  # (B, T)
    return torch.log_softmax(logits.float(), dim=-1), flat_pos


def _gather(rows: list[_Row], logprobs: torch.Tensor, flat_pos: torch.Tensor, out: torch.Tensor) -> None:
    """Add each target's summed continuation log-probability into ``out`` (CPU fp64, by flat choice index)."""
    which, pos, tok, dest = target_positions(rows)
    dev = logprobs.device
    idx = flat_pos[torch.tensor(which, device=dev), torch.tensor(pos, device=dev)]  # (M,)
    lp = logprobs[idx, torch.tensor(tok, device=dev)]  # (M,)
    out.index_add_(0, torch.tensor(dest), lp.cpu().double())  # sums on the CPU in fp64


def score_questions(model: Any, tokenizer: Any, questions: Sequence[Question], *, batch_size: int = 16,
                    progress: bool = True, autocast_dtype: torch.dtype | None = None) -> list[list[float]]:
    """Loglikelihood of every continuation of every question, as lm-eval's ``loglikelihood``.

    Args:
        model: a causal LM (``transformers`` or peft-wrapped), on its device; left in its mode.
        tokenizer: its tokenizer.
        questions: prompts and continuations (see :func:`plan_questions`).
        batch_size: rows per forward pass.
        progress: show a tqdm bar.
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (bf16 for an fp32
            model on a GPU); ``None``: the model's own dtype.

    Returns:
        Per question, the summed log-probability of each continuation.
    """
    from tqdm.auto import tqdm

    rows = build_rows(encode_pairs(tokenizer, questions), max_length(model, tokenizer))
    rows.sort(key=lambda r: (-len(r.tokens), tuple(r.tokens)))
    device = next(model.parameters()).device
    out = torch.zeros(sum(len(q.continuations) for q in questions), dtype=torch.float64)  # (choices,)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    use_keep = _accepts_logits_to_keep(model)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    try:
        # An FSDP-sharded model gathers its weights into buffers it reuses outside the evaluation:
        # those must not become inference tensors, so it gets no_grad instead.
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        with torch.no_grad() if sharded else torch.inference_mode(), amp, tqdm(total=len(rows), desc="fast MCQ", unit="row", disable=not progress) as bar:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                logprobs, flat_pos = _batch_logprobs(model, chunk, pad_id, device, use_keep)
                _gather(chunk, logprobs, flat_pos, out)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    flat = out.tolist()
    res, k = [], 0
    for q in questions:
        res.append(flat[k:k + len(q.continuations)])
        k += len(q.continuations)
    return res


# ---------------------------------------------------------------- predictions and metrics


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's tie rule, which lm-eval relies on)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def question_prediction(q: Question, lls: Sequence[float], style: str) -> dict[str, Any]:
    """One question's prediction record.

    Returns:
        ``{"subtask", "doc_id", "category", "answer", "pred", "correct_prob", "loglikelihoods"}``
        plus ``"pred_norm"`` (argmax of loglikelihood / choice length in characters) for cloze.
        ``correct_prob`` is the softmax of the loglikelihoods at the answer: the probability mass on
        the correct letter among the choices.

    Raises:
        NonFiniteModel: a loglikelihood is NaN or infinite (the model's logits are not finite).
    """
    if not all(math.isfinite(v) for v in lls):
        raise NonFiniteModel(f"the model's logits are not finite (NaN or inf) on {q.task}/{q.subtask} question "
                             f"{q.doc_id} (loglikelihoods {list(lls)}): it is broken, so it is not scored; if its "
                             "weights are fp16, load it in bf16 or fp32 (--dtype), else unlearn it again with a "
                             "lower lr")
    top = max(lls)
    weights = [math.exp(v - top) for v in lls]
    pred = {"subtask": q.subtask, "doc_id": q.doc_id, "category": q.record.category or q.subtask,
            "answer": q.record.answer, "pred": _argmax(lls),
            "correct_prob": weights[q.record.answer] / sum(weights), "loglikelihoods": list(lls)}
    if style == "cloze":
        lengths = [float(len(c)) for c in choice_labels(q.record, style)]
        pred["pred_norm"] = _argmax([v / n if n else float("-inf") for v, n in zip(lls, lengths)])
    return pred


def _mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and lm-eval's ``mean_stderr`` (sample std / sqrt(n); ``None`` for n < 2)."""
    n = len(values)
    mu = sum(values) / n
    if n < 2:
        return mu, None
    var = sum((x - mu) ** 2 for x in values) / (n - 1)
    return mu, math.sqrt(var) / math.sqrt(n)


def _pooled(parts: Sequence[dict[str, Any]], metric: str) -> tuple[float, float | None]:
    """Size-weighted mean and lm-eval's ``pooled_sample_stderr`` over subtask summaries."""
    sizes = [p["n"] for p in parts]
    mean = sum(p[metric] * n for p, n in zip(parts, sizes)) / sum(sizes)
    if len(parts) == 1:
        return mean, parts[0][f"{metric}_stderr"]
    dof = sum(sizes) - len(sizes)
    if dof <= 0:
        return mean, None
    var = sum((n - 1) * (p[f"{metric}_stderr"] or 0.0) ** 2 * n for p, n in zip(parts, sizes)) / dof
    return mean, math.sqrt(var / sum(sizes))


def _summary(preds: Sequence[dict[str, Any]], style: str) -> dict[str, Any]:
    """acc, acc_stderr, n, correct_prob (and acc_norm, acc_norm_stderr for cloze) of predictions."""
    acc, acc_se = _mean_stderr([float(p["pred"] == p["answer"]) for p in preds])
    out = {"acc": acc, "acc_stderr": acc_se, "n": len(preds),
           "correct_prob": sum(p["correct_prob"] for p in preds) / len(preds)}
    if style == "cloze":
        out["acc_norm"], out["acc_norm_stderr"] = _mean_stderr([float(p["pred_norm"] == p["answer"]) for p in preds])
    return out


def _combine(parts: Sequence[dict[str, Any]], style: str) -> dict[str, Any]:
    """Pool subtask summaries weighted by size (lm-eval's group aggregation)."""
    n = sum(p["n"] for p in parts)
    out: dict[str, Any] = {"n": n}
    out["acc"], out["acc_stderr"] = _pooled(parts, "acc")
    out["correct_prob"] = sum(p["correct_prob"] * p["n"] for p in parts) / n
    if style == "cloze":
        out["acc_norm"], out["acc_norm_stderr"] = _pooled(parts, "acc_norm")
    return {k: out[k] for k in _summary_keys(style)}


def _summary_keys(style: str) -> list[str]:
    return ["acc", "acc_stderr", "n", "correct_prob"] + (["acc_norm", "acc_norm_stderr"] if style == "cloze" else [])


def summarize_task(task: MCQTask, preds: Sequence[dict[str, Any]], style: str) -> dict[str, Any]:
    """Task result from its per-question predictions (subtasks pooled weighted by size).

    Returns:
        ``{"acc", "acc_stderr", "n", "correct_prob", ["acc_norm", "acc_norm_stderr"],
        "source", "subtasks": {name: summary}, "categories": {name: summary},
        ["groups": {name: summary}], "predictions": [...]}``.
    """
    by_sub = {s.name: [p for p in preds if p["subtask"] == s.name] for s in task.subtasks}
    subs = {name: _summary(ps, style) for name, ps in by_sub.items() if ps}
    if not subs:
        raise UserError(f"task {task.name} has no questions to evaluate; check the data and --limit")
    categories: dict[str, list[dict[str, Any]]] = {}
    for p in preds:
        categories.setdefault(p["category"], []).append(p)
    out = _combine(list(subs.values()), style)
    out.update(source=task.source, subtasks=subs, categories={c: _summary(ps, style) for c, ps in categories.items()})
    if task.groups:
        names = sorted(set(task.groups.values()))
        out["groups"] = {g: _combine([s for n, s in subs.items() if task.groups.get(n) == g], style)
                         for g in names if any(task.groups.get(n) == g for n in subs)}
    out["predictions"] = list(preds)
    return out


def evaluate_fast(model: Any, tokenizer: Any, tasks: Sequence[MCQTask], *, style: str = "letter",
                  limit: int | None = None, batch_size: int = 16, num_fewshot: int = 0, progress: bool = True,
                  autocast_dtype: torch.dtype | None = None) -> dict[str, dict[str, Any]]:
    """Score every task with the fast backend; all tasks' rows share the length-sorted batches.

    Returns:
        ``{task name: summarize_task(...)}``.
    """
    plans = {t.name: plan_questions(t, style=style, limit=limit, num_fewshot=num_fewshot) for t in tasks}
    questions = [q for qs in plans.values() for q in qs]
    lls = score_questions(model, tokenizer, questions, batch_size=batch_size, progress=progress,
                          autocast_dtype=autocast_dtype)
    out, k = {}, 0
    for t in tasks:
        qs = plans[t.name]
        preds = [question_prediction(q, ll, style) for q, ll in zip(qs, lls[k:k + len(qs)])]
        k += len(qs)
        out[t.name] = summarize_task(t, preds, style)
    return out
