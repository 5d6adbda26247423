"""Our task definitions for stock ``lm_eval``: ``lm_eval --include_path DIR --tasks wmdp_bio_robust_sequnlearn``.

:func:`write_task_dir` writes, from the same templates the lm-eval backend uses
(``eval/tasks/mcq_{letter,cloze}.yaml``), one task per WMDP-Bio-Robust category and a group that
pools them weighted by size, as our backends do:

    wmdp_bio_robust_sequnlearn         letter style (" A".." D"), the group
    wmdp_bio_robust_sequnlearn_cloze   cloze style (choice texts; acc and acc_norm)

The data is the hub dataset (``EleutherAI/wmdp_bio_robust_mcqa``, one config per category, split
``robust``) or, with ``data_dir``, the offline copy ``wmdp_bio_robust.jsonl`` that ``--data-dir`` reads,
split by category into ``DIR/data/`` (validated by the same loader).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from sequnlearn.data.mcq import WMDP_ROBUST_CATEGORIES, WMDP_ROBUST_ID, WMDP_ROBUST_SPLIT, description
from sequnlearn.eval.harness import task_template
from sequnlearn.runs import atomic_write_text

GROUP = "wmdp_bio_robust_sequnlearn"
STYLE_SUFFIX = {"letter": "", "cloze": "_cloze"}


def default_dir(data_dir: str | os.PathLike | None) -> Path:
    """``$XDG_CACHE_HOME/sequnlearn/lm_eval_tasks/{hub | local-HASH}`` (one folder per data source)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sequnlearn" / "lm_eval_tasks"
    if data_dir is None:
        return cache / "hub"
    return cache / ("local-" + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:12])


def _split_local(data_dir: Path, out: Path) -> dict[str, Path]:
    """One JSON-lines file per category under ``out/data`` from ``data_dir/wmdp_bio_robust.*``."""
    from sequnlearn.data.mcq import load_task

    task = load_task("wmdp_bio_robust", data_dir=str(data_dir))
    files = {}
    for sub in task.subtasks:
        files[sub.name] = out / "data" / f"{sub.name}.jsonl"
        atomic_write_text(files[sub.name], "".join(json.dumps(r.to_dict()) + "\n" for r in sub.records))
    return files


def _task(style: str, category: str, data_file: Path | None) -> dict:
    cfg = {**task_template(style), "task": f"{GROUP}{STYLE_SUFFIX[style]}_{category}",
           "description": description("biology", style)}
    if data_file is None:
        cfg.update(dataset_path=WMDP_ROBUST_ID, dataset_name=category, test_split=WMDP_ROBUST_SPLIT,
                   fewshot_split=WMDP_ROBUST_SPLIT)
    else:
        cfg.update(dataset_path="json", dataset_kwargs={"data_files": {"test": str(data_file)}})
    return cfg


def _group(style: str) -> dict:
    return {"group": GROUP + STYLE_SUFFIX[style],
            "task": [f"{GROUP}{STYLE_SUFFIX[style]}_{c}" for c in WMDP_ROBUST_CATEGORIES],
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
            "metadata": {"version": 1}}


def write_task_dir(out: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> Path:
    """Write the task YAMLs (and, with ``data_dir``, the per-category data) into ``out``; returns it.

    Raises:
        UserError: ``data_dir`` lacks a valid ``wmdp_bio_robust`` file.
    """
    out = Path(out) if out is not None else default_dir(data_dir)
    files = _split_local(Path(data_dir), out) if data_dir is not None else {}
    for style in STYLE_SUFFIX:
        for cat in WMDP_ROBUST_CATEGORIES:
            cfg = _task(style, cat, files.get(cat))
            atomic_write_text(out / style / f"{cfg['task']}.yaml", yaml.safe_dump(cfg, sort_keys=False))
        group = _group(style)
        atomic_write_text(out / style / f"_{group['group']}.yaml", yaml.safe_dump(group, sort_keys=False))
    return out
