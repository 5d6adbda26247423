"""Finished results read off disk: the runs and baselines under some directories, and the result files
found at any depth (outside hidden, half-built directories). What ``sequnlearn report`` and
``sequnlearn report --against`` (:mod:`sequnlearn.comparison`) read."""

from __future__ import annotations

import re
from pathlib import Path

from sequnlearn.results import is_results_file, with_headline
from sequnlearn.runs import RunDir, read_json, read_jsonl


def collect(dirs: list[Path]) -> tuple[list[dict], list[dict]]:
    """Finished runs and baselines under ``dirs`` (any depth), sorted by path, numbers by value.

    A run is a directory with ``config.yaml`` and an ``eval.json`` that gives a forget accuracy: a
    sweep's headline, or a task of role forget that ``sequnlearn eval`` scored (see
    :func:`sequnlearn.results.headline`: WMDP tasks and ``--data`` files are forget, ``mmlu`` and
    ``--retain-data`` files retain).

    Returns:
        ``(runs, baselines)``; a run row has its path, config, eval (with the headline keys filled in)
        and metrics.
    """
    runs, baselines = [], []
    for root in dirs:
        for ev_path in sorted(found(root, "eval.json"), key=natural):
            ev = read_json(ev_path)
            if not is_results_file(ev):
                continue
            ev = with_headline(ev)
            if ev.get("baseline"):
                baselines.append({"path": str(ev_path.parent), "eval": ev})
            elif (ev_path.parent / "config.yaml").is_file() and ev.get("forget_acc") is not None:
                cfg = RunDir(ev_path.parent).stored_config(raw=True)  # report adds the defaults itself
                runs.append({"path": str(ev_path.parent), "config": cfg, "eval": ev,
                             "metrics": read_jsonl(ev_path.parent / "metrics.jsonl")})
    return runs, baselines


def found(root: Path, name: str) -> list[Path]:
    """The files called ``name`` under ``root``, at any depth, outside hidden directories (a run being
    built or replaced, ``.NAME.new.tmp``, is not a result)."""
    return [p for p in Path(root).rglob(name) if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def natural(path: Path) -> list:
    """Sort key that orders numbers by value: ``remove_coef=5`` before ``remove_coef=10``."""
    return [(0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
            for t in re.split(r"(\d+(?:\.\d+)?)", str(path)) if t]
