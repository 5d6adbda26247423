"""Every setting of a report against one baseline setting: a call per scoring style and metric, no stronger
than the seeds allow.

``sequnlearn report DIRS --against LABEL`` reads the per-seed files the report wrote (``report_styles.csv``:
each run's forget and retain accuracy in each scoring style; ``tamper_curves.csv``: every evaluated step of
every attack) and compares each setting with the setting ``LABEL`` on forget accuracy, retain accuracy and
forget accuracy after :data:`TAMPER_STEP` attack steps, by the rule of :func:`sequnlearn.evidence.compare`:
with d = mean(setting) − mean(LABEL) and s their pooled seed sd, the setting is "lower" or "higher than LABEL
(beyond 2 pooled sd)" when |d| > 2·s, else "not distinguishable at n seeds". A setting is a run directory's
name without its ``seed=N`` (a sweep point's varied values: ``forget_loss=max_entropy``). The attacked value
of a run is the mean over its attack seeds; a metric a report lacks is "not run", never an error that hides
the others. :func:`write_comparison` writes ``comparison.md`` and ``comparison.json`` (every value behind
every call).
"""

from __future__ import annotations

import csv
import io as stringio
import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sequnlearn.errors import UserError
from sequnlearn.evidence import REPRODUCES, SD_MULTIPLIER, compare

TAMPER_STEP = 50
"""The attack step whose forget accuracy is compared: the toy attack's last (``toy-tamper``: 50 steps)."""
METRICS = ("forget", "retain", f"forget after {TAMPER_STEP} attack steps")
STYLE_COLUMNS = ("Run", "Group", "seed", "style", "forget acc", "retain acc", "path")
TAMPER_COLUMNS = ("model", "role", "lr", "step", "forget_acc", "style")


@dataclass(frozen=True)
class Values:
    """One side of a comparison: per-seed values and their mean, sample sd (None for one value) and count."""

    values: tuple[float, ...]
    mean: float
    sd: float | None
    n: int


@dataclass(frozen=True)
class Verdict:
    """The call on one setting against the baseline setting, in one style, on one metric."""

    setting: str
    style: str
    metric: str
    verdict: str
    a: Values | None = None
    """The setting's values."""
    b: Values | None = None
    """The baseline setting's values."""
    difference: float | None = None
    pooled_sd: float | None = None
    note: str = ""


def setting_label(path: str, seed) -> str:
    """A run's setting: its directory's name without ``seed=SEED`` (``forget_loss=max_entropy_seed=2`` →
    ``forget_loss=max_entropy``); the name itself when it holds no seed."""
    name = Path(path).name
    label = re.sub(rf"(^|_)seed={re.escape(str(seed))}(?=_|$)", "", name).strip("_")
    return label or name


def check_against(dirs: list[Path], against: str) -> None:
    """Refuse ``--against LABEL`` before a report is written: the runs under ``dirs`` must be scored in several
    styles (``report_styles.csv``) and ``LABEL`` must be one of their settings.

    Raises:
        UserError: no run scored in several styles, or no setting called ``against`` (the message lists them).
    """
    from sequnlearn.collect import collect

    if not all(Path(d).exists() for d in dirs):
        return  # the report names the missing directory
    runs, _ = collect(dirs)
    if not any(r["eval"].get("styles") for r in runs):
        raise UserError("--against compares the per-seed accuracies of report_styles.csv, which a report writes for "
                        "runs scored in several styles; evaluate them with style: [cloze, letter], or drop --against")
    labels = sorted({setting_label(r["path"], r["config"].get("seed")) for r in runs})
    if against not in labels:
        raise UserError(f"--against {against!r} is no setting of these runs; give one of: {', '.join(labels)}")


def _rows(folder: Path, name: str, columns: tuple[str, ...], written: set[str] | None) -> tuple[list[dict], str]:
    """The rows of ``folder/name``, or no rows and why the file cannot be used."""
    from sequnlearn import io

    path = folder / name
    if (written is not None and name not in written) or not path.is_file():
        return [], f"this report has no {name}"
    try:
        rows = list(csv.DictReader(stringio.StringIO(io.read_text(path, name))))
    except (UserError, csv.Error) as e:
        return [], f"{name} cannot be read ({e})"
    missing = [c for c in columns if rows and c not in rows[0]]
    return ([], f"{name} has no column {missing[0]!r}") if missing else (rows, "")


def _num(cell) -> float | None:
    """A CSV cell as a finite number, else None."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _attacked(tamper: list[dict]) -> dict[tuple[str, str], list[float]]:
    """``{(attacked model label, style): [forget accuracy at TAMPER_STEP of each attack seed]}``."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in tamper:
        value = _num(r["forget_acc"])
        if r["role"] == "attack" and _num(r["step"]) == TAMPER_STEP and value is not None:
            out.setdefault((r["model"], r["style"]), []).append(value)
    return out


def _per_seed(rows: list[dict], attacked: dict[tuple[str, str], list[float]]) -> dict[tuple[str, str], dict]:
    """``{(setting, style): {metric: [value per run], "groups": {report groups}, "unattacked": n}}``."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["Run"] == "baseline":
            continue
        entry = out.setdefault((setting_label(r["path"], r["seed"]), r["style"]),
                               {**{m: [] for m in METRICS}, "groups": set(), "unattacked": 0})
        entry["groups"].add(r["Group"])
        for metric, col in zip(METRICS[:2], ("forget acc", "retain acc")):
            if _num(r[col]) is not None:
                entry[metric].append(_num(r[col]))
        attacks = attacked.get((Path(r["path"]).name, r["style"]))
        if attacks:
            entry[METRICS[2]].append(statistics.fmean(attacks))
        else:
            entry["unattacked"] += 1
    return out


def _values(values: list[float]) -> Values:
    return Values(tuple(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None,
                  len(values))


def decide(setting: str, style: str, metric: str, a: list[float], b: list[float], against: str) -> Verdict:
    """The call on ``a`` (a setting's per-seed values) against ``b`` (the baseline setting's), by
    :func:`sequnlearn.evidence.compare` in the direction the data point to."""
    if not a or not b:
        return Verdict(setting, style, metric, f"not run: no {metric} values for {setting if not a else against}")
    va, vb = _values(a), _values(b)
    d = va.mean - vb.mean
    c = compare(1 if d > 0 else -1, a, b) if d else None
    if c is not None and c.verdict == REPRODUCES:
        verdict = f"{'higher' if d > 0 else 'lower'} than {against} (beyond {SD_MULTIPLIER:g} pooled sd)"
    else:
        n = min(va.n, vb.n)
        verdict = f"not distinguishable at {n} seed{'s' if n > 1 else ''}"
    return Verdict(setting, style, metric, verdict, va, vb, d, None if c is None else c.pooled_sd)


def compare_settings(folder: Path, against: str, written: Iterable[str] | None = None) -> list[Verdict]:
    """Every setting of the report in ``folder`` against ``against``, per style and metric (:data:`METRICS`).

    Raises:
        UserError: the report has no usable ``report_styles.csv``, or no setting ``against``.
    """
    folder, written = Path(folder), None if written is None else set(written)
    rows, problem = _rows(folder, "report_styles.csv", STYLE_COLUMNS, written)
    if not rows:
        raise UserError(f"--against: {problem or 'report_styles.csv has no rows'}; report runs scored in several styles")
    tamper, tamper_problem = _rows(folder, "tamper_curves.csv", TAMPER_COLUMNS, written)
    groups = _per_seed(rows, _attacked(tamper))
    if against not in {s for s, _ in groups}:
        raise UserError(f"--against {against!r} is no setting of this report; give one of: "
                        f"{', '.join(sorted({s for s, _ in groups}))}")
    out = []
    for (setting, style), entry in sorted(groups.items()):
        base = groups.get((against, style))
        for metric in [] if setting == against else METRICS:
            why = _problem(entry, base, metric, against, tamper_problem)
            out.append(Verdict(setting, style, metric, f"not run: {why}") if why else
                       _noted(decide(setting, style, metric, entry[metric], base[metric], against), entry, metric))
    return out


def _problem(entry: dict, base: dict | None, metric: str, against: str, tamper_problem: str) -> str:
    """Why ``metric`` of a setting cannot be compared in its style, or ``""``."""
    if base is None:
        return f"no {against} in this style"
    if len(entry["groups"]) > 1 or len(base["groups"]) > 1:
        return "its runs fall in several report groups (settings that share a directory name); report them apart"
    if metric == METRICS[2] and not (entry[metric] and base[metric]):
        return tamper_problem or f"no attack reached step {TAMPER_STEP} in this style"
    return ""


def _noted(v: Verdict, entry: dict, metric: str) -> Verdict:
    """``v`` with a note when some of the setting's runs were not attacked."""
    if metric != METRICS[2] or not entry["unattacked"]:
        return v
    return replace(v, note=f"{entry['unattacked']} of its runs have no attack at step {TAMPER_STEP}")


def _pm(v: Values | None) -> str:
    if v is None:
        return "-"
    return f"{v.mean:.4f}" + (f" ± {v.sd:.4f}" if v.sd is not None else "") + f" (n={v.n})"


def _cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def render(verdicts: list[Verdict], against: str) -> str:
    """``comparison.md``: the rule, then a table per scoring style."""
    lines = [f"# Settings against {against}", "",
             f"Each setting's per-seed values against {against}'s in the same scoring style, computed by "
             "`sequnlearn.comparison` from this report's `report_styles.csv` and `tamper_curves.csv` (the attacked "
             f"value of a run: forget accuracy at attack step {TAMPER_STEP}, the mean over its attack seeds). With "
             f"d = mean − mean({against}) and s the pooled seed sd, a setting is lower or higher than {against} "
             f"when |d| > {SD_MULTIPLIER:g}·s, else not distinguishable at its number of seeds. "
             "`comparison.json` holds every value."]
    for style in sorted({v.style for v in verdicts}):
        lines += ["", f"## {style or 'headline'}", "",
                  f"| setting | metric | setting mean ± sd | {against} mean ± sd | difference | pooled sd | verdict |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {v.setting} | {v.metric} | {_pm(v.a)} | {_pm(v.b)} | {_cell(v.difference)} | "
                  f"{_cell(v.pooled_sd)} | {v.verdict}{' (' + v.note + ')' if v.note else ''} |"
                  for v in verdicts if v.style == style]
    return "\n".join(lines) + "\n"


def as_json(verdicts: list[Verdict], against: str) -> dict:
    """``comparison.json``: the rule and every comparison with its values."""
    return {"against": against, "rule": {"sd_multiplier": SD_MULTIPLIER, "tamper_step": TAMPER_STEP},
            "comparisons": [asdict(v) for v in verdicts]}


def write_comparison(folder: Path, against: str, written: Iterable[str] | None = None) -> list[str]:
    """``comparison.md`` and ``comparison.json`` in ``folder`` from the report files there (``written``: only
    those this report wrote), both computed before either is written. Returns the names written.

    Raises:
        UserError: see :func:`compare_settings`.
    """
    from sequnlearn.runs import atomic_write_text, write_json

    verdicts = compare_settings(Path(folder), against, written)
    md, data = render(verdicts, against), as_json(verdicts, against)
    atomic_write_text(Path(folder) / "comparison.md", md)
    write_json(Path(folder) / "comparison.json", data)
    return ["comparison.md", "comparison.json"]
