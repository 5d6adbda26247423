"""``eval.json``: how ``sequnlearn eval`` adds its results to one, and the forget / retain accuracy
every kind of it gives.

Three commands write an ``eval.json``:

- ``sequnlearn eval``: the :func:`sequnlearn.eval.evaluate` result, each task entry carrying its own
  settings (:data:`TASK_SETTINGS`, ``role``, ``chance``, ``evaluated_at``); the top-level ``backend``,
  ``style``, ``num_fewshot`` and ``limit`` are the value all its tasks share, else ``"mixed"``; its other
  top-level keys (``batch_size``, ``seconds``, ``questions_per_second``, ...) are the last evaluation's.
- a sweep point and the demo: a headline ``forget_acc`` / ``retain_acc`` (with ``*_task`` and
  ``*_chance``), ``style``, ``tasks`` (summaries), ``point`` or ``metric``, maybe ``styles``; a sweep's
  baseline adds ``baseline: true`` and ``model``.

``eval`` merges by task into any of them (:func:`merge`): tasks already there are kept, one evaluated
again is replaced only with ``--overwrite`` (:func:`check_new_tasks`). A sweep's or the demo's
top-level keys stay as they are, except that replacing the task a headline accuracy came from drops that
headline (the report then reads the new task entry).

A task's role (:func:`task_role`), for the report's forget / retain columns: the one recorded in its
entry; else ``forget`` for WMDP tasks and MCQ files, ``retain`` for ``mmlu``. ``sequnlearn eval``
records ``forget`` for ``--data`` and ``retain`` for ``--retain-data``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from sequnlearn.errors import UserError

ROLES = ("forget", "retain")
TASK_SETTINGS = ("style", "backend", "limit", "num_fewshot")
"""Settings every task entry ``sequnlearn eval`` writes carries (besides ``n``)."""
MIXED = "mixed"
"""A top-level setting whose tasks were evaluated with different values."""


def task_role(name: str, entry: dict) -> str:
    """The role of a task in ``eval.json``: the recorded one, else ``retain`` for mmlu, ``forget`` for
    the rest (WMDP tasks and MCQ files)."""
    return entry.get("role") or ("retain" if name == "mmlu" else "forget")


def is_headline_file(ev: dict) -> bool:
    """True for a sweep point's, a sweep baseline's or the demo's ``eval.json`` (a headline accuracy)."""
    return any(k in ev for k in ("forget_acc", "point", "baseline", "metric"))


def is_results_file(ev: Any) -> bool:
    """True for any ``eval.json`` of ours: a mapping with a ``tasks`` mapping or a headline accuracy."""
    return isinstance(ev, dict) and (isinstance(ev.get("tasks"), dict) or is_headline_file(ev))


def describe(entry: dict) -> str:
    """How a task entry was scored: ``letter, all questions`` / ``cloze, --limit 4`` (``letter, 60 questions``
    when its limit is unknown)."""
    style = entry.get("style") or "style unknown"
    if "limit" in entry:
        return f"{style}, {'all questions' if entry['limit'] is None else '--limit ' + str(entry['limit'])}"
    return f"{style}, {entry.get('n', '?')} questions"


def with_settings(ev: dict) -> dict:
    """``ev`` with each task entry's missing :data:`TASK_SETTINGS` taken from the file's top level (files
    written before tasks carried their own)."""
    top = {k: ev[k] for k in TASK_SETTINGS if k in ev and ev[k] != MIXED}
    given = ev.get("tasks") if isinstance(ev.get("tasks"), dict) else {}
    return {**ev, "tasks": {name: {**top, **entry} if isinstance(entry, dict) else entry
                            for name, entry in given.items()}}


def check_new_tasks(ev: dict, names: list[str], path: Path, overwrite: bool) -> None:
    """Refuse to replace tasks ``ev`` already holds unless ``overwrite``.

    Raises:
        UserError: one of ``names`` is in ``ev``'s tasks and ``overwrite`` is off.
    """
    tasks = with_settings(ev)["tasks"]
    held = [f"{n} ({describe(tasks[n])})" for n in names if isinstance(tasks.get(n), dict)]
    if held and not overwrite:
        raise UserError(f"{path} already has {' and '.join(held)}; pass --overwrite to replace "
                        f"{'it' if len(held) == 1 else 'them'}, or --out FILE")


def task_entry(summary: dict, settings: dict, role: str, chance: float | None) -> dict:
    """A task entry as ``sequnlearn eval`` writes it: the summary, its settings, role and chance level,
    when it was evaluated, and the predictions last."""
    head = {k: v for k, v in summary.items() if k != "predictions"}
    return {**head, **{k: settings[k] for k in TASK_SETTINGS}, "role": role, "chance": chance,
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"predictions": summary["predictions"]} if "predictions" in summary else {})}


def merge(ev: dict, entries: dict[str, dict], last: dict, model: str) -> dict:
    """``ev`` (an ``eval.json``, ``{}`` for none) with the task ``entries`` added or replacing theirs.

    Args:
        entries: task name → :func:`task_entry`.
        last: the new evaluation's result (:func:`sequnlearn.eval.evaluate`); its top-level keys but
            ``tasks`` and :data:`TASK_SETTINGS` become the file's.
        model: the evaluated model, the top-level ``model`` of a new file.

    Returns:
        The merged content; a headline file keeps its top level but for the headlines of replaced tasks.
    """
    ev = with_settings(ev) if ev else {}
    tasks = {**ev.get("tasks", {}), **entries}
    if is_headline_file(ev):
        return {**_drop_headlines(ev, set(entries)), "tasks": tasks}
    shared = {k: _shared([t.get(k) for t in tasks.values() if isinstance(t, dict)]) for k in TASK_SETTINGS}
    rest = {k: v for k, v in last.items() if k not in ("model", "tasks", *TASK_SETTINGS)}
    return {"model": ev.get("model", model), **shared, **rest, "tasks": tasks}


def _shared(values: list) -> Any:
    """The value all ``values`` share, else :data:`MIXED`."""
    distinct = {repr(v) for v in values}
    return values[0] if len(distinct) == 1 else MIXED


def _drop_headlines(ev: dict, replaced: set[str]) -> dict:
    """``ev`` without the headline accuracies (``forget_*``/``retain_*``, also under ``styles``) that came
    from a task in ``replaced``."""
    out = dict(ev)
    for role in ROLES:
        if out.get(f"{role}_task") in replaced:
            for key in ("acc", "task", "chance"):
                out.pop(f"{role}_{key}", None)
            if isinstance(out.get("styles"), dict):
                out["styles"] = {s: {k: v for k, v in r.items() if k != f"{role}_acc"}
                                 for s, r in out["styles"].items()}
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def headline(ev: dict) -> dict:
    """The forget and retain accuracy of any ``eval.json``: ``{forget_acc, forget_task, forget_chance,
    forget_limit, retain_*}`` (``None`` where it has none).

    A headline accuracy in the file (sweep, demo) wins; else the first task in the file of that role
    (:func:`task_role`) with a finite ``acc``.
    """
    tasks = with_settings(ev)["tasks"]
    out: dict[str, Any] = {}
    for role in ROLES:
        if _finite(ev.get(f"{role}_acc")):
            name = ev.get(f"{role}_task")
            entry = tasks.get(name) if isinstance(tasks.get(name), dict) else {}
            out.update({f"{role}_acc": ev[f"{role}_acc"], f"{role}_task": name,
                        f"{role}_chance": ev.get(f"{role}_chance"), f"{role}_limit": entry.get("limit")})
            continue
        found = [(n, t) for n, t in tasks.items()
                 if isinstance(t, dict) and task_role(n, t) == role and _finite(t.get("acc"))]
        name, entry = found[0] if found else (None, {})
        out.update({f"{role}_acc": entry.get("acc"), f"{role}_task": name, f"{role}_chance": entry.get("chance"),
                    f"{role}_limit": entry.get("limit")})
    return out


def with_headline(ev: dict) -> dict:
    """``ev`` with its :func:`headline` keys filled in where it lacks them (a sweep's own values stay)."""
    return {**ev, **{k: v for k, v in headline(ev).items() if ev.get(k) is None}}


def destination(model: str, out: str | None) -> tuple[Path, Path | None]:
    """Where ``eval`` writes (``out``, else ``eval.json`` beside the model's ``model/``) and the directory
    whose results the model's are (a run directory, or one holding ``model/``; else ``None``); creates nothing.

    Raises:
        UserError: no ``out`` for a model that is not in a run directory, or an ``out`` that is a
            directory, lies below a regular file, cannot be written, or is being written by another command.
    """
    from sequnlearn.runs import RunDir, check_unlocked, check_writable, run_of_model

    run, p = run_of_model(model), Path(model)
    home = run.root if run is not None else p if RunDir(p).is_finished() else None
    if out is None and home is None:
        unfinished = RunDir(p).is_run()
        raise UserError(f"{model} is " + ("a run that has not finished (no model/config.json); finish it with "
                                          "`sequnlearn unlearn ... --resume`, or" if unfinished else
                                          "not a run directory;") + " say where to write with --out FILE")
    dest = Path(out) if out else home / "eval.json"
    if dest.is_dir():
        raise UserError(f"--out {dest} is a directory; give a file path, e.g. --out {dest / 'eval.json'}")
    check_writable(dest)
    check_unlocked(dest.parent)
    return dest, home


def existing(out: Path, model: str, home: Path | None, overwrite: bool) -> dict:
    """The results in ``out`` that ``eval`` merges into: ``{}`` when there are none, or when ``overwrite``
    replaces a file that is damaged, not an ``eval.json`` or of another model.

    Args:
        home: the directory the evaluated model belongs to (:func:`destination`); its ``eval.json`` is its own.

    Raises:
        UserError: ``out`` is another run's ``eval.json``; or, without ``overwrite``, ``out`` is damaged,
            not an ``eval.json`` or holds the results of another model.
    """
    from sequnlearn import io
    from sequnlearn.runs import RunDir

    own = home is not None and out.resolve() == (home / "eval.json").resolve()
    if out.name == "eval.json" and RunDir(out.parent).is_run() and not own:
        raise UserError(f"--out {out} is the results file of the run {out.parent}, not of {model}; choose another --out")
    if not out.exists():
        return {}
    try:
        ev = io.read_json(out, "results file")
    except UserError as e:
        if overwrite:
            return {}
        raise UserError(f"{e} (or pass --overwrite to replace it)") from None
    if not is_results_file(ev):
        if overwrite:
            return {}
        raise UserError(f"--out {out} exists and holds no evaluation results; pass --overwrite to replace it, or "
                        "choose another --out")
    if not own and "model" in ev and _model_key(str(ev["model"])) != _model_key(model):
        if overwrite:
            return {}
        raise UserError(f"{out} holds results of {ev['model']}, not {model}: pass --overwrite to replace the file, "
                        "or choose another --out")
    return ev


def _model_key(model: str) -> str:
    """What tells two model arguments apart: a local model's resolved directory (a run's model/), else the id."""
    from sequnlearn.runs import run_of_model

    p = Path(model)
    if not p.exists():
        return model
    run = run_of_model(p)
    return str((run.model if run is not None else p).resolve())


def run_stamp(home: Path | None) -> str | None:
    """What identifies the run a model belongs to (its ``provenance.json``'s bytes, hashed): a run replaced
    (``unlearn --overwrite``) while it was evaluated has another."""
    import hashlib

    path = home / "provenance.json" if home is not None else None
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def write_results(out: Path, model: str, home: Path | None, tasks: list, roles: dict, results: dict, *,
                  overwrite: bool, stamp: str | None) -> None:
    """Merge an evaluation's ``results`` into ``out`` by task, under ``out``'s directory lock (waiting for
    another ``eval`` that writes it) and after reading it again, so that both keep their tasks.

    Args:
        roles: task name → ``forget`` / ``retain`` given on the command line (else :func:`task_role`).
        stamp: :func:`run_stamp` of ``home`` before the model was loaded.

    Raises:
        UserError: the run was replaced while its model was evaluated, or a task would be replaced
            without ``overwrite``.
    """
    from sequnlearn.eval import chance_level
    from sequnlearn.runs import hold_lock, write_json

    settings = {k: results[k] for k in TASK_SETTINGS}
    entries = {t.name: task_entry(results["tasks"][t.name], settings, roles.get(t.name) or task_role(t.name, {}),
                                  chance_level(t)) for t in tasks}
    with hold_lock(out.parent, wait=True):
        if run_stamp(home) != stamp:
            raise UserError(f"the run {home} was replaced while its model was evaluated; nothing was written: "
                            "evaluate the new run")
        current = existing(out, model, home, overwrite)
        check_new_tasks(current, list(entries), out, overwrite)
        write_json(out, merge(current, entries, results, model))
