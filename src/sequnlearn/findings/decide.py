"""Reading a report's per-seed files and deciding the findings from them.

:func:`read_report` reads the per-seed files ``sequnlearn report`` writes (``report_styles.csv``: every run
and seed in every scoring style; ``tamper_curves.csv``: every evaluated attack step), :func:`decide` calls
every comparison of :data:`~sequnlearn.findings.claims.FINDINGS` by the rule of :mod:`sequnlearn.evidence`
per scoring style (the attack per tamper directory and style). A missing group or file makes a comparison
"not run", never an error that hides the others.
"""

from __future__ import annotations

import csv
import io as stringio
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sequnlearn.errors import UserError
from sequnlearn.evidence import NOT_REPRODUCED, REPRODUCES, UNDECIDED, against_threshold, compare
from sequnlearn.findings.claims import (BELOW_CHANCE, CHANCE, FINDINGS, GREATER, NOT_RUN, REFERENCE_CHANCE, WITHIN,
                                        Claim, Finding, Sel, Setting)
from sequnlearn.runs import model_label


# ---------------------------------------------------------------------- the report's files


@dataclass
class ReportFiles:
    """What :func:`read_report` found: the rows of the per-seed files, or why a file is unusable."""

    sweep: list[dict] | None = None
    """``report_styles.csv``: ``{group, setting, style, forget, retain, path}`` per run and style."""
    sweep_problem: str = ""
    tamper: list[dict] | None = None
    """``tamper_curves.csv``: ``{model, role, lr, seed, step, forget, style, source}`` per attack step."""
    tamper_problem: str = ""
    names: dict[str, set] = field(default_factory=dict)
    """A run directory's name (a tamper model label) → the settings of the runs of that name."""
    chance: list[float] = field(default_factory=list)
    """The forget task's chance level, one per eval.json / tamper.json that records it."""


SWEEP_COLUMNS = ("Run", "Group", "retain loss", "remove_coef", "retain_coef", "style", "forget acc", "retain acc",
                 "path")
TAMPER_COLUMNS = ("model", "role", "lr", "seed", "step", "forget_acc", "style", "source")


def _num(cell) -> float | None:
    """A CSV cell as a finite number, else None."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _csv_rows(folder: Path, name: str, columns: tuple[str, ...],
              written: set[str] | None) -> tuple[list[dict] | None, str]:
    """The rows of ``folder/name`` and ``""``, or None and why the file cannot be used."""
    from sequnlearn import io

    path = folder / name
    if written is not None and name not in written:
        return None, f"this report wrote no {name}"
    if not path.is_file():
        return None, f"no {name} in {folder}"
    try:
        rows = list(csv.DictReader(stringio.StringIO(io.read_text(path, name))))
    except (UserError, csv.Error) as e:
        return None, f"{name} cannot be read ({e})"
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        return None, f"{name} has no column {missing[0]!r}"
    return (rows, "") if rows else (None, f"{name} has no rows")


def _setting(row: dict) -> Setting | None:
    """The setting of a ``report.csv`` / ``report_styles.csv`` row; None for a baseline or a bad cell."""
    rm, ret = _num(row["remove_coef"]), _num(row["retain_coef"])
    return None if rm is None or ret is None else Setting(str(row["retain loss"]).upper(), rm, ret)


def _sweep_row(row: dict) -> dict:
    """A ``report_styles.csv`` row as :attr:`ReportFiles.sweep` holds it."""
    base = row["Run"] == "baseline"
    return {"group": ("base", row["path"]) if base else ("group", row["Group"]),
            "setting": None if base else _setting(row), "base": base, "style": row["style"],
            "forget": _num(row["forget acc"]), "retain": _num(row["retain acc"]), "path": row["path"]}


def _tamper_row(row: dict) -> dict:
    """A ``tamper_curves.csv`` row as :attr:`ReportFiles.tamper` holds it."""
    return {"model": row["model"], "role": row["role"], "lr": row["lr"], "seed": row["seed"],
            "step": _num(row["step"]), "forget": _num(row["forget_acc"]), "style": row["style"],
            "source": row["source"]}


def read_report(folder: Path, written: Iterable[str] | None = None) -> ReportFiles:
    """The per-seed files of a report in ``folder`` (``written``: only the files this report wrote).

    Also reads, where they still exist, the ``eval.json`` of every run the report names and the
    ``tamper.json`` of every attack directory, for the forget task's chance level. Never raises: an
    unusable file is recorded as the reason its findings are not run.
    """
    folder, written = Path(folder), None if written is None else set(written)
    files = ReportFiles()
    styled, files.sweep_problem = _csv_rows(folder, "report_styles.csv", SWEEP_COLUMNS, written)
    files.sweep = None if styled is None else [_sweep_row(r) for r in styled]
    rows, files.tamper_problem = _csv_rows(folder, "tamper_curves.csv", TAMPER_COLUMNS, written)
    files.tamper = None if rows is None else [_tamper_row(r) for r in rows]
    runs, _ = _csv_rows(folder, "report.csv", ("retain loss", "remove_coef", "retain_coef", "path"), written)
    for r in [*(runs or []), *(r for r in styled or [] if r["Run"] != "baseline")]:
        setting = _setting(r)
        if setting is not None:
            files.names.setdefault(model_label(r["path"]), set()).add(setting)
    files.chance = _chances({r["path"] for r in files.sweep or []}, {r["source"] for r in files.tamper or []})
    return files


def _chances(runs: set[str], sources: set[str]) -> list[float]:
    """The forget chance level each run's ``eval.json`` and each source's ``tamper.json`` records."""
    from sequnlearn import io
    from sequnlearn.results import with_headline

    found = []
    for path, key in [*((Path(r) / "eval.json", "forget_chance") for r in sorted(runs)),
                      *((Path(s) / "tamper.json", "chance") for s in sorted(sources))]:
        try:
            data = io.read_json(path, "result file", dict) if path.is_file() else {}
            value = _num((with_headline(data) if key == "forget_chance" else data).get(key))
        except (UserError, OSError, TypeError, KeyError, AttributeError):
            value = None
        if value is not None:
            found.append(value)
    return found


# ---------------------------------------------------------------------- deciding


@dataclass(frozen=True)
class Side:
    """One side of a comparison: its per-seed values and their mean, sample sd and count."""

    label: str
    values: tuple[float, ...]
    mean: float
    sd: float | None
    n: int
    spread: str
    """What the values are: ``seeds``, ``unlearning seeds``, ``attack seeds of one model``, ``threshold``."""


@dataclass(frozen=True)
class Row:
    """The call on one claim in one style (and tamper directory), with the numbers behind it."""

    finding: int
    context: str
    claim: Claim
    verdict: str
    a: Side | None = None
    b: Side | None = None
    difference: float | None = None
    """mean(a) − mean(b), or mean(a) − the threshold."""
    pooled_sd: float | None = None
    """The pooled seed sd; for a threshold, a's sd."""
    t: float | None = None
    note: str = ""


@dataclass(frozen=True)
class FindingResult:
    """A finding's rows and, per context, its verdict in words."""

    finding: Finding
    rows: list[Row]
    summaries: list[tuple[str, str]]


@dataclass(frozen=True)
class _Context:
    """Where a finding's claims are read: a style (sweep), a tamper directory and style, or the tasks."""

    label: str
    style: str = ""
    source: str = ""
    lr: str = ""
    problem: str = ""


def _side(values: list[float], label: str, spread: str) -> Side:
    """``values`` with their mean and sample sd (None for one value)."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Side(label, tuple(values), mean, sd, len(values), spread)


def _sweep_side(files: ReportFiles, sel: Sel, ctx: _Context) -> Side | str:
    """The per-seed values of ``sel`` in ``ctx``'s style, or why there are none."""
    rows = [r for r in files.sweep if r["style"] == ctx.style
            and (r["base"] if sel.setting is None else r["setting"] == sel.setting)]
    groups = sorted({r["group"][1] for r in rows})
    if len(groups) > 1:
        return f"{sel.label()} is in {len(groups)} report groups ({', '.join(groups)}); report one of them"
    values = [r[sel.metric] for r in rows if r[sel.metric] is not None]
    if not values:
        return f"no {sel.label()} in style {ctx.style or '-'}"
    return _side(values, sel.label(), "seeds" if len(values) > 1 else "run")


def _resolve(files: ReportFiles, model: str) -> Setting | str | None:
    """The setting of an attacked model label (a run's name, or it + `` on benign text`` etc.);
    ``"ambiguous"`` when runs of several settings have that name; None when no run has it."""
    names = [n for n in files.names if model == n or model.startswith(n + " ")]
    if not names:
        return None
    settings = files.names[max(names, key=len)]
    return next(iter(settings)) if len(settings) == 1 else "ambiguous"


def _tamper_side(files: ReportFiles, sel: Sel, ctx: _Context) -> Side | str:
    """Forget accuracy of ``sel`` at its step in ``ctx``: one value per attacked model (the mean over its
    attack seeds) across unlearning seeds, or the attack seeds of the one model there is."""
    rows = [r for r in files.tamper if (r["source"], r["style"], r["lr"], r["role"]) ==
            (ctx.source, ctx.style, ctx.lr, sel.role) and r["step"] == sel.step and r["forget"] is not None]
    resolved = {r["model"]: _resolve(files, r["model"]) for r in rows} if sel.role != "base" else {}
    ambiguous = sorted(m for m, s in resolved.items() if s == "ambiguous")
    if sel.role != "base":
        rows = [r for r in rows if resolved[r["model"]] == sel.setting]
    if not rows:
        why = f"no {sel.label()} in this directory"
        return why + (f" ({', '.join(ambiguous)}: runs of several settings have this name)" if ambiguous else "")
    by_model: dict[str, list[float]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r["forget"])
    if len(by_model) > 1:
        return _side([statistics.fmean(v) for v in by_model.values()], sel.label(), "unlearning seeds")
    return _side(next(iter(by_model.values())), sel.label(), "attack seeds of one model")


def _read_side(files: ReportFiles, sel: Sel, ctx: _Context) -> Side | str:
    """The values ``sel`` reads in ``ctx`` (the attack's or the sweep's), or why there are none."""
    return (_tamper_side if sel.role is not None else _sweep_side)(files, sel, ctx)


def _t(difference: float, sd: float | None) -> float | None:
    """difference / sd as :func:`evidence.compare` gives it: ±inf for an sd of 0, None without an sd."""
    if sd is None:
        return None
    return difference / sd if sd > 0 else (math.copysign(math.inf, difference) if difference else 0.0)


def _threshold_row(finding: int, ctx: _Context, claim: Claim, a: Side, threshold: float, side: str,
                   label: str, note: str = "") -> Row:
    """A claim that ``a``'s mean lies ``side`` of ``threshold`` (:func:`evidence.against_threshold`)."""
    call = against_threshold(a.values, threshold, side)
    d = a.mean - threshold
    return Row(finding, ctx.label, claim, call.verdict, a, Side(label, (threshold,), threshold, None, 1, "threshold"),
               d, a.sd, _t(d, a.sd), note)


def _equality(a: Side, b: Side) -> str:
    """An equality is not reproduced when the means differ by more than k pooled sds either way, and
    undecided otherwise: the rule can show a difference, never that two means are equal."""
    differ = REPRODUCES in (compare(1, a.values, b.values).verdict, compare(-1, a.values, b.values).verdict)
    return NOT_REPRODUCED if differ else UNDECIDED


def _chance_row(finding: int, ctx: _Context, claim: Claim, files: ReportFiles) -> Row:
    """Finding 4: the chance level the result files record, against the reference's."""
    if not files.chance:
        return Row(finding, ctx.label, claim, NOT_RUN, note="no eval.json or tamper.json records the forget "
                                                                "task's chance level")
    a = _side(files.chance, "forget task chance level", "result files")
    b = Side("the reference", (REFERENCE_CHANCE,), REFERENCE_CHANCE, None, 1, "the reference")
    same = all(abs(c - REFERENCE_CHANCE) < 1e-9 for c in files.chance)
    return Row(finding, ctx.label, claim, REPRODUCES if same else NOT_REPRODUCED, a, b, a.mean - REFERENCE_CHANCE)


def _chance_level(files: ReportFiles) -> tuple[float, str]:
    """The tasks' chance level when the files agree on one, else the reference's (said in the note)."""
    levels = {round(c, 9) for c in files.chance}
    if len(levels) == 1:
        return levels.pop(), ""
    return REFERENCE_CHANCE, "no single chance level in the result files: the reference's"


def _decide(finding: int, claim: Claim, ctx: _Context, files: ReportFiles) -> Row:
    """The call on ``claim`` in ``ctx``; ``not run`` (with the reason) when a group or file is missing."""
    if ctx.problem:
        return Row(finding, ctx.label, claim, NOT_RUN, note=ctx.problem)
    if claim.kind == CHANCE:
        return _chance_row(finding, ctx, claim, files)
    sides = [_read_side(files, sel, ctx) for sel in (claim.a, claim.b) if sel is not None]
    missing = [s for s in sides if isinstance(s, str)]
    if missing:
        return Row(finding, ctx.label, claim, NOT_RUN, note="; ".join(missing))
    a, b = sides[0], (sides[1] if len(sides) > 1 else None)
    if claim.kind == BELOW_CHANCE:
        level, note = _chance_level(files)
        return _threshold_row(finding, ctx, claim, a, level, "below", "chance", note)
    if claim.kind == WITHIN:
        return _threshold_row(finding, ctx, claim, a, b.mean - claim.limit, "above",
                              f"{b.label} − {claim.limit:.4f}", f"{b.label} {b.mean:.4f}")
    call = compare(claim.direction, a.values, b.values)
    verdict = call.verdict if claim.kind == GREATER else _equality(a, b)
    return Row(finding, ctx.label, claim, verdict, a, b, call.difference, call.pooled_sd, call.t)


def _contexts(finding: Finding, files: ReportFiles) -> list[_Context]:
    """Where ``finding`` is read: each style of report_styles.csv, each (tamper directory, style, lr) of
    tamper_curves.csv, or the tasks; one context with the problem when the file is unusable."""
    if finding.reads == "tasks":
        return [_Context("all styles")]
    if finding.reads == "sweep":
        if files.sweep is None:
            return [_Context("-", problem=files.sweep_problem)]
        return [_Context(s or "-", style=s) for s in dict.fromkeys(r["style"] for r in files.sweep)]
    if files.tamper is None:
        return [_Context("-", problem=files.tamper_problem)]
    keys = list(dict.fromkeys((r["source"], r["style"], r["lr"]) for r in files.tamper))
    lrs = {src: {lr for s, _, lr in keys if s == src} for src, _, _ in keys}
    return [_Context(f"{style or '-'}, `{src}`" + (f", lr {lr}" if len(lrs[src]) > 1 else ""), style, src, lr)
            for src, style, lr in keys]


def decide(files: ReportFiles) -> list[FindingResult]:
    """Every claim of :data:`FINDINGS` in every context the files give, and each finding's verdict in words."""
    results = []
    for finding in FINDINGS:
        rows, summaries = [], []
        for ctx in _contexts(finding, files):
            mine = [_decide(finding.number, claim, ctx, files) for claim in finding.claims]
            rows += mine
            summaries.append((ctx.label, summary(mine)))
        results.append(FindingResult(finding, rows, summaries))
    return results


def summary(rows: list[Row]) -> str:
    """The verdict of a finding in one context, in words: every claim's verdict, and where a chain stops."""
    skipped = sum(r.verdict == NOT_RUN for r in rows)
    if skipped == len(rows):
        return NOT_RUN
    parts = [f"{r.claim.text}: {r.verdict}" for r in rows if r.verdict != NOT_RUN]
    chain = [r for r in rows if r.claim.chain]
    if chain:
        parts.append(_chain_stop(chain))
    return "; ".join(parts + ([f"{skipped} not run"] if skipped else []))


def _chain_stop(chain: list[Row]) -> str:
    """Where a chain of pairs (``rm10`` above ``rm20`` above ...) stops reproducing."""
    first, stop = chain[0].claim.chain[0], next((i for i, r in enumerate(chain) if r.verdict != REPRODUCES), None)
    if stop is None:
        return f"the fall reproduces pair by pair from {first} to {chain[-1].claim.chain[1]}"
    at, to = chain[stop].claim.chain
    if chain[stop].verdict == NOT_RUN:
        return f"the fall reproduces from {first} to {at}; {at} to {to} was not run" if stop else \
            f"the fall's first pair ({at} to {to}) was not run"
    if stop == 0:
        return f"the fall does not reproduce from its first pair ({at} to {to})"
    return f"the fall reproduces from {first} to {at} and stops there"
