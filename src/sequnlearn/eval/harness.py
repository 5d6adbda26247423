"""The ``lm-eval`` backend: our task YAMLs run through ``lm_eval.simple_evaluate`` on a model in memory.

Each subtask (an MMLU subject, a WMDP-robust category, a local file) becomes one lm-eval task built
from ``eval/tasks/mcq_{style}.yaml`` with its questions written to a temporary JSON-lines file
(``dataset_path: json``). The model is wrapped in ``HFLM(pretrained=model, tokenizer=tok,
batch_size=...)``. lm-eval's per-sample loglikelihoods go through the same prediction and
aggregation code as the fast backend, so both return the same structure, and lm-eval's own
per-subtask accuracy is checked against ours.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from sequnlearn.config import check_style
from sequnlearn.data.mcq import MCQTask
from sequnlearn.errors import UserError
from sequnlearn.eval.scorer import Question, plan_questions, question_prediction, summarize_task

TASKS_DIR = Path(__file__).parent / "tasks"


def task_template(style: str) -> dict[str, Any]:
    """The shipped lm-eval task config for ``style`` (``eval/tasks/mcq_{style}.yaml``)."""
    check_style(style)
    with open(TASKS_DIR / f"mcq_{style}.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def _write_jsonl(path: Path, records: Sequence[Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")


def task_configs(tasks: Sequence[MCQTask], style: str, workdir: Path) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """lm-eval task configs, one per subtask, with their data written under ``workdir``.

    Returns:
        ``(configs, index)``: the config dicts for ``simple_evaluate`` and, per lm-eval task name,
        ``(task name, subtask name)``.
    """
    template = task_template(style)
    configs, index = [], {}
    for i, task in enumerate(tasks):
        for j, sub in enumerate(task.subtasks):
            name = f"sequnlearn_{i}_{j}_" + re.sub(r"[^A-Za-z0-9_]+", "_", sub.name)[:60]
            folder = workdir / f"{i}_{j}"
            folder.mkdir(parents=True)
            _write_jsonl(folder / "test.jsonl", sub.records)
            files = {"test": str(folder / "test.jsonl")}
            cfg = {**template, "task": name}
            if sub.fewshot:  # a dev split: first_n takes its first k, as lm-eval's mmlu
                _write_jsonl(folder / "dev.jsonl", sub.fewshot)
                files["dev"] = str(folder / "dev.jsonl")
                cfg["fewshot_split"] = "dev"
            cfg["dataset_kwargs"] = {"data_files": files, "cache_dir": str(workdir / "hf_datasets_cache")}
            configs.append(cfg)
            index[name] = (task.name, sub.name)
    return configs, index


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's INFO/WARNING chatter for the duration of a call."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def run_lm_eval(model: Any, tokenizer: Any, configs: list[dict], *, limit: int | None, batch_size: int,
                num_fewshot: int, autocast_dtype: torch.dtype | None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on an in-memory model; leaves global RNG seeds untouched.

    Returns:
        lm-eval's results dict (with ``samples``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    try:
        with _quiet_lm_eval():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      softmax_dtype=torch.float32, mixed_precision_dtype=autocast_dtype)
            return lm_eval.simple_evaluate(
                model=lm, tasks=configs, num_fewshot=num_fewshot, limit=limit, log_samples=True,
                bootstrap_iters=0, task_manager=TaskManager(include_defaults=False),
                random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    finally:
        model.train(was_training)


def _predictions(task: MCQTask, lm_name_of: dict[str, str], samples: dict[str, list[dict]],
                 questions: list[Question], style: str) -> list[dict[str, Any]]:
    """Per-question predictions of one task from lm-eval's logged samples."""
    by_key = {(q.subtask, q.doc_id): q for q in questions}
    preds = []
    for sub in task.subtasks:
        for s in sorted(samples.get(lm_name_of[sub.name], []), key=lambda s: s["doc_id"]):
            lls = [float(r[0]) for r in s["filtered_resps"]]
            preds.append(question_prediction(by_key[(sub.name, s["doc_id"])], lls, style))
    return preds


def _check_acc(task_result: dict[str, Any], lm_results: dict[str, Any], lm_name_of: dict[str, str]) -> None:
    """lm-eval's own per-subtask acc must equal ours (same loglikelihoods, same argmax)."""
    for sub, summary in task_result["subtasks"].items():
        theirs = lm_results[lm_name_of[sub]]["acc,none"]
        if abs(theirs - summary["acc"]) > 1e-9:
            raise RuntimeError(f"lm-eval reports acc {theirs} for {sub}, predictions give {summary['acc']}")


def evaluate_harness(model: Any, tokenizer: Any, tasks: Sequence[MCQTask], *, style: str = "letter",
                     limit: int | None = None, batch_size: int = 16, num_fewshot: int = 0,
                     autocast_dtype: torch.dtype | None = None) -> dict[str, dict[str, Any]]:
    """Score every task through lm-eval.

    Args:
        model: a causal LM in memory (``transformers`` or peft-wrapped).
        tokenizer: its tokenizer.
        tasks: loaded tasks.
        style: ``letter`` or ``cloze``.
        limit: first ``limit`` questions of each subtask (lm-eval's ``--limit``).
        batch_size: passed to ``HFLM``.
        num_fewshot: k-shot examples (dev split ``first_n``, else the test split minus the question).
        autocast_dtype: ``HFLM(mixed_precision_dtype=...)``; ``None``: the model's dtype.

    Returns:
        ``{task name: summarize_task(...)}``, the structure the fast backend returns.

    Raises:
        UserError: not enough few-shot examples.
    """
    plans = {t.name: plan_questions(t, style=style, limit=limit, num_fewshot=num_fewshot) for t in tasks}
    with tempfile.TemporaryDirectory(prefix="sequnlearn-lm-eval-") as tmp:
        configs, index = task_configs(tasks, style, Path(tmp))
        raw = run_lm_eval(model, tokenizer, configs, limit=limit, batch_size=batch_size,
                          num_fewshot=num_fewshot, autocast_dtype=autocast_dtype)
    out = {}
    for t in tasks:
        lm_name_of = {sub: lm for lm, (tn, sub) in index.items() if tn == t.name}
        preds = _predictions(t, lm_name_of, raw["samples"], plans[t.name], style)
        out[t.name] = summarize_task(t, preds, style)
        _check_acc(out[t.name], raw["results"], lm_name_of)
    return out
