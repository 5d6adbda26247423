"""Multiple-choice evaluation of a model in memory: WMDP-Bio(-Robust), MMLU and local MCQ files.

Two backends give the same result structure: ``fast`` (one forward pass per question, see
:mod:`sequnlearn.eval.scorer`) and ``lm-eval`` (our task YAMLs through ``lm_eval.simple_evaluate``,
see :mod:`sequnlearn.eval.harness`). Both follow lm-eval's template and metrics, so numbers can be
checked against lm-eval itself. The result of :func:`evaluate`::

    {
      "backend": "fast" | "lm-eval", "style": "letter" | "cloze", "num_fewshot": int,
      "limit": int | None, "batch_size": int, "seconds": float, "questions_per_second": float,
      "tasks": {
        TASK: {
          "acc": float, "acc_stderr": float | None, "n": int, "correct_prob": float,
          "acc_norm": float, "acc_norm_stderr": float | None,          # cloze only
          "source": str,                                               # hub id or file path
          "subtasks":   {NAME: SUMMARY},   # lm-eval tasks pooled into TASK, weighted by size
          "categories": {NAME: SUMMARY},   # by record category (WMDP-robust category, MMLU subject)
          "groups":     {NAME: SUMMARY},   # MMLU only: stem, other, social_sciences, humanities
          "predictions": [{"subtask": str, "doc_id": int, "category": str, "answer": int,
                           "pred": int, "correct_prob": float, "loglikelihoods": [float, ...],
                           "pred_norm": int}, ...]                    # pred_norm: cloze only
        }
      }
    }

where SUMMARY is ``{"acc", "acc_stderr", "n", "correct_prob"}`` (+ ``acc_norm``,
``acc_norm_stderr`` for cloze). ``acc_stderr`` is lm-eval's: sample std / sqrt(n) within a
subtask, pooled (``pooled_sample_stderr``) across subtasks; ``None`` with fewer than 2 questions.
``correct_prob`` is the mean softmax probability, over the choices' loglikelihoods, of the
correct choice (the probability mass on the correct letter among A-D in letter style).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from sequnlearn.config import STYLES, check_style
from sequnlearn.data.mcq import HUB_TASKS, MCQTask, load_task
from sequnlearn.errors import NonFiniteModel, UserError

TASKS = HUB_TASKS
BACKENDS = ("fast", "lm-eval")

__all__ = ["BACKENDS", "STYLES", "TASKS", "MCQTask", "NonFiniteModel", "check_finite_weights", "check_options",
           "evaluate", "format_table", "load_tasks", "nonfinite_tensors", "parse_tasks"]


def nonfinite_tensors(model: Any) -> tuple[list[str], int]:
    """The floating-point parameters and buffers of ``model`` that hold a NaN or an infinity.

    Sharded (DTensor) and meta tensors are not looked at: the logits check of the evaluation covers them.

    Returns:
        ``(names of the non-finite tensors, number of tensors looked at)``.
    """
    named = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers())
             if t.is_floating_point() and t.device.type != "meta" and type(t).__name__ != "DTensor"]
    with torch.no_grad():
        bad = [n for n, t in named if not bool(torch.isfinite(t).all())]
    return bad, len(named)


def check_finite_weights(model: Any) -> None:
    """Refuse to evaluate a model whose weights are not all finite.

    Raises:
        NonFiniteModel: a parameter or buffer holds a NaN or an infinity.
    """
    bad, total = nonfinite_tensors(model)
    if bad:
        raise NonFiniteModel(f"the model has non-finite weights (NaN or inf) in {len(bad)} of {total} tensors "
                             f"(first: {bad[0]}): it is broken, so it is not scored; unlearn it again with a lower "
                             "lr or lower coefficients")


def parse_tasks(tasks: str | Sequence[str] | None, data_file: str | None = None) -> list[str]:
    """Task names from a comma-separated string or a list, plus ``data_file``; duplicates dropped.

    Raises:
        UserError: no task at all.
    """
    if tasks is None:
        names: list[str] = []
    elif isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in tasks if str(t).strip()]
    if data_file:
        names.append(str(data_file))
    names = list(dict.fromkeys(names))
    if not names:
        raise UserError(f"no task given; pass --tasks (one or more of {', '.join(TASKS)}) or --data FILE")
    return names


def load_tasks(names: Sequence[str], *, data_dir: str | None = None, num_fewshot: int = 0) -> list[MCQTask]:
    """Load each named task (see :func:`sequnlearn.data.mcq.load_task`)."""
    return [load_task(n, data_dir=data_dir, num_fewshot=num_fewshot) for n in names]


def check_options(backend: str = "fast", style: str = "letter", limit: int | None = None, batch_size: int = 16,
                  num_fewshot: int = 0) -> None:
    """Check :func:`evaluate`'s options (the CLI calls it before loading a model).

    Raises:
        UserError: an unknown backend or style, or a limit/batch size/num_fewshot out of range.
    """
    if backend not in BACKENDS:
        raise UserError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    check_style(style)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer (questions per subtask), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise UserError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")


def _resolve(tasks: str | Sequence[str | MCQTask] | None, data_file: str | None, data_dir: str | None,
             num_fewshot: int) -> list[MCQTask]:
    """Loaded tasks for names, paths and :class:`MCQTask` objects; one task per name.

    Raises:
        UserError: no task, or two tasks with the same name.
    """
    given = [tasks] if isinstance(tasks, MCQTask) else tasks
    if given is None or isinstance(given, str):
        return load_tasks(parse_tasks(given, data_file), data_dir=data_dir, num_fewshot=num_fewshot)
    objects = [t for t in given if isinstance(t, MCQTask)]
    names = [t for t in given if not isinstance(t, MCQTask)]
    loaded = objects + (load_tasks(parse_tasks(names, data_file), data_dir=data_dir, num_fewshot=num_fewshot)
                        if names or data_file else [])
    seen = [t.name for t in loaded]
    if not loaded:
        raise UserError(f"no task given; pass one or more of {', '.join(TASKS)} or an MCQ file")
    if len(set(seen)) != len(seen):
        raise UserError(f"task names repeat ({', '.join(seen)}); give each task once")
    return loaded


def _autocast_dtype(model: Any) -> torch.dtype | None:
    """bf16 autocast for an fp32 model on a GPU; ``None`` (the model's own dtype) otherwise."""
    param = next(model.parameters())
    return torch.bfloat16 if param.device.type == "cuda" and param.dtype == torch.float32 else None


def evaluate(model: Any, tokenizer: Any, tasks: str | Sequence[str | MCQTask] | None, *, backend: str = "fast",
             style: str = "letter", limit: int | None = None, batch_size: int = 16, num_fewshot: int = 0,
             data_dir: str | None = None, data_file: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a model already in memory on MCQ tasks.

    The model is put in eval mode for the evaluation and given back in the mode it had (the
    tamper attack evaluates mid-training). An fp32 model on a GPU runs under bf16 autocast.

    Args:
        model: a causal LM (``transformers``, possibly peft-wrapped) on its device.
        tokenizer: its tokenizer.
        tasks: ``"wmdp_bio_robust,mmlu"``, or a list of task names, MCQ file paths and already
            loaded :class:`MCQTask` objects (load once with :func:`load_tasks` to evaluate often).
        backend: ``fast`` or ``lm-eval``.
        style: ``letter`` (" A".." D" after the lettered choices) or ``cloze`` (choice texts).
        limit: first ``limit`` questions of each subtask, as lm-eval's ``--limit``.
        batch_size: sequences per forward pass (both backends).
        num_fewshot: k-shot examples (MMLU: dev split, first k; others: first k other test questions).
        data_dir: offline copies of the hub tasks (default ``$SEQUNLEARN_DATA_DIR``).
        data_file: a local MCQ file to evaluate as one more task.
        progress: show a progress bar (fast backend).

    Returns:
        The result dict described in this module's docstring.

    Raises:
        UserError: bad arguments, unknown task, unreadable or unreachable data.
        NonFiniteModel: the model's weights or log-likelihoods are not all finite.
    """
    check_options(backend, style, limit, batch_size, num_fewshot)
    loaded = _resolve(tasks, data_file, data_dir, num_fewshot)
    check_finite_weights(model)
    amp = _autocast_dtype(model)
    start = time.perf_counter()
    if backend == "fast":
        from sequnlearn.eval.scorer import evaluate_fast

        per_task = evaluate_fast(model, tokenizer, loaded, style=style, limit=limit, batch_size=batch_size,
                                 num_fewshot=num_fewshot, progress=progress, autocast_dtype=amp)
    else:
        from sequnlearn.eval.harness import evaluate_harness

        per_task = evaluate_harness(model, tokenizer, loaded, style=style, limit=limit, batch_size=batch_size,
                                    num_fewshot=num_fewshot, autocast_dtype=amp)
    seconds = time.perf_counter() - start
    n = sum(r["n"] for r in per_task.values())
    return {"backend": backend, "style": style, "num_fewshot": num_fewshot, "limit": limit,
            "batch_size": batch_size, "seconds": seconds, "questions_per_second": n / seconds if seconds else None,
            "tasks": per_task}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(results: dict[str, Any], *, categories: bool = True) -> str:
    """A plain-text table of a result dict: one line per task (and per category/group beneath it).

    Args:
        results: the dict returned by :func:`evaluate`.
        categories: also list each task's categories and groups, indented.

    Returns:
        The table, lines joined by newlines (no trailing newline).
    """
    cloze = results.get("style") == "cloze"
    head = f"{'task':<44} {'n':>6} {'acc':>7} {'±stderr':>8} {'p(correct)':>10}" + (f" {'acc_norm':>8}" if cloze else "")
    lines = [head, "-" * len(head)]

    def row(name: str, s: dict[str, Any]) -> str:
        line = f"{name[:44]:<44} {s['n']:>6} {_fmt(s['acc']):>7} {_fmt(s['acc_stderr']):>8} {_fmt(s['correct_prob']):>10}"
        return line + (f" {_fmt(s.get('acc_norm')):>8}" if cloze else "")

    for name, task in results["tasks"].items():
        lines.append(row(name, task))
        if not categories:
            continue
        for g, s in task.get("groups", {}).items():
            lines.append(row(f"  [{g}]", s))
        cats = task.get("categories", {})
        if len(cats) > 1:
            lines.extend(row(f"  {c}", s) for c, s in cats.items())
    lines.append(f"backend {results['backend']}, style {results['style']}, {results['num_fewshot']}-shot, "
                 f"{_fmt(results.get('questions_per_second'))} questions/s")
    return "\n".join(lines)


@dataclass(frozen=True)
class EvalSpec:
    """What a forget/retain evaluation runs: the tasks, the scoring style and its limits.

    ``forget_task`` / ``retain_task``: a task name (``wmdp_bio_robust``, ``mmlu``, ...), an MCQ file,
    or an already loaded :class:`MCQTask` (load once to evaluate often, as the attack does).
    """

    forget_task: Any
    retain_task: Any = None
    style: str = "letter"
    limit: int | None = None
    batch_size: int = 16
    num_fewshot: int = 0


def chance_level(task: MCQTask) -> float:
    """Random-chance accuracy of a task: the mean of 1 / number of choices over its questions."""
    records = [r for sub in task.subtasks for r in sub.records]
    return sum(1 / len(r.choices) for r in records) / len(records)


def with_loaded_tasks(spec: EvalSpec) -> EvalSpec:
    """``spec`` with its forget and retain tasks loaded (names and files read once; loaded tasks kept),
    for a spec evaluated several times: in several styles, or every k steps.

    Raises:
        UserError: a task cannot be loaded.
    """
    def load(task):
        return task if task is None or isinstance(task, MCQTask) else load_tasks([task], num_fewshot=spec.num_fewshot)[0]

    forget = load(spec.forget_task)
    retain = forget if spec.retain_task == spec.forget_task else load(spec.retain_task)
    return replace(spec, forget_task=forget, retain_task=retain)


def forget_retain_accuracy(model: Any, tokenizer: Any, spec: EvalSpec, *, progress: bool = False) -> dict[str, Any]:
    """Forget (and retain) accuracy of a model in memory, each with its task's chance level.

    Returns:
        ``{style, forget_acc, forget_task, forget_chance, [retain_acc, retain_task, retain_chance],
        tasks: {name: summary without predictions, with its ``chance``}}``.

    Raises:
        UserError: a task cannot be loaded, or an evaluation gave no finite accuracy.
        NonFiniteModel: the model's weights or logits are not all finite (never a near-chance accuracy).
    """
    spec = with_loaded_tasks(spec)
    loaded = {k: t for k, t in (("forget", spec.forget_task), ("retain", spec.retain_task)) if t is not None}
    unique = list({t.name: t for t in loaded.values()}.values())  # the same set for both: evaluated once
    res = evaluate(model, tokenizer, unique, style=spec.style, limit=spec.limit,
                   batch_size=spec.batch_size, num_fewshot=spec.num_fewshot, progress=progress)
    out: dict[str, Any] = {"style": res["style"], "tasks": {}}
    for key, task in loaded.items():
        summary = {k: v for k, v in res["tasks"][task.name].items() if k != "predictions"}
        if summary["acc"] is None or not math.isfinite(summary["acc"]):
            raise UserError(f"the {key} evaluation ({task.name}) gave no accuracy ({summary['acc']!r})")
        out.update({f"{key}_acc": summary["acc"], f"{key}_task": task.name, f"{key}_chance": chance_level(task)})
        out["tasks"][task.name] = {**summary, "chance": chance_level(task)}
    return out
