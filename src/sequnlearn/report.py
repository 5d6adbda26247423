"""Tables and plots from result files: a pure function of what is on disk.

Plots are PNGs readable at paper size (matplotlib, Agg backend); tables are markdown in the
reference's style. Runs that differ only in their seed are one setting: its numbers are the mean ±
sample sd over the seeds (tables) and error bars or bands (plots), a single run's number stands alone.
"""

from __future__ import annotations

from pathlib import Path

from sequnlearn.collect import collect, found
from sequnlearn.plots import markdown, pm, place_labels, pyplot, save, shade_phases, spread
from sequnlearn.runs import atomic_write_text
from sequnlearn.tamper.result import (interrupted_note, plot_tamper, seed_curve,  # noqa: F401  (seed_curve: re-exported)
                                      tamper_curve_rows, tamper_table)

CHANCE_4WAY = 0.25
"""Chance accuracy of a four-way multiple-choice task, for results that do not carry their own."""


# ---------------------------------------------------------------------- sweep reports

RETAIN_COLLAPSE_MARGIN = 0.05
"""A retain accuracy within this of random chance counts as collapsed."""


def _layers(cfg: dict) -> str:
    layers = cfg.get("layers")
    if layers:
        return "→".join(str(x) for x in layers)
    start = "last" if cfg.get("layer_start") is None else cfg["layer_start"]  # null: the model's last layer
    return f"{start}→{cfg['layer_end']} (step {cfg['layer_step']})"


def annotate(runs: list[dict], chance: float = CHANCE_4WAY) -> list[str]:
    """Notes per run: below random, retain collapsed, best per retain loss (lowest forget, retain intact),
    and the ``--limit`` a forget accuracy was scored with."""
    notes = _notes([{"loss": r["config"]["retain_loss"], "forget": r["eval"]["forget_acc"],
                     "retain": r["eval"].get("retain_acc"), "sd": None} for r in runs], chance, "run")
    return ["; ".join(filter(None, [note, _limit_note(r["eval"])])) for note, r in zip(notes, runs)]


def _limit_note(ev: dict) -> str:
    """``Forget acc on --limit 4`` when the forget accuracy came from the first questions only."""
    limit = ev.get("forget_limit")
    return f"Forget acc on --limit {limit}" if isinstance(limit, int) else ""


def _notes(points: list[dict], chance: float, label: str) -> list[str]:
    """Notes per point (``{loss, forget, retain, sd}``, accuracies or their means, ``sd`` the forget sd).

    Below random, retain collapsed, and per retain loss the best (lowest forget of those whose retain
    is intact), said to be within the spread of the runner-up (``label`` k) when it is.
    """
    notes = [[] for _ in points]
    for i, p in enumerate(points):
        if p["forget"] < chance:
            notes[i].append(f"Below random ({chance:.2f})")
        if p["retain"] is not None and p["retain"] <= chance + RETAIN_COLLAPSE_MARGIN:
            notes[i].append("Retain collapsed")
    for loss in sorted({p["loss"] for p in points}):
        ok = sorted((i for i, p in enumerate(points) if p["loss"] == loss and "Retain collapsed" not in notes[i]),
                    key=lambda i: points[i]["forget"])
        if ok:
            notes[ok[0]].append(f"Best {loss.upper()}" + _within_spread(points, ok, label))
    return ["; ".join(n) for n in notes]


def _within_spread(points: list[dict], ranked: list[int], label: str) -> str:
    """`` (within spread of LABEL k)`` when the runner-up's forget is within one sd (the larger of the
    two known) of the best's, else ``""`` (also when neither has a spread)."""
    if len(ranked) < 2:
        return ""
    best, second = points[ranked[0]], points[ranked[1]]
    sds = [sd for sd in (best["sd"], second["sd"]) if sd is not None]
    if sds and second["forget"] - best["forget"] <= max(sds):
        return f" (within spread of {label} {ranked[1] + 1})"
    return ""


def _setting(cfg: dict) -> dict:
    """The columns that name a run's setting in the reference's tables."""
    return {"Layers": _layers(cfg), "remove_coef": cfg["remove_coef"], "retain_coef": cfg["retain_coef"],
            "retain loss": cfg["retain_loss"].upper()}


def table_rows(runs: list[dict], chance: float = CHANCE_4WAY) -> list[dict]:
    """One row per run in the reference's columns."""
    notes = annotate(runs, chance)
    return [{"Run": i, **_setting(r["config"]), "forget acc": r["eval"]["forget_acc"],
             "retain acc": r["eval"].get("retain_acc"), "Notes": note, "path": r["path"]}
            for i, (r, note) in enumerate(zip(runs, notes), start=1)]


# ---------------------------------------------------------------------- across seeds

OUTPUT_ONLY_KEYS = ("checkpoint_every", "report_to")
"""Config keys that say only what is written where; runs that differ in them (and in ``seed``) are one setting."""


SEEDS_NOTE = ("Runs whose configs differ only in `seed` (or where outputs go) form a group: forget and retain "
              "accuracy as mean ± sample sd (ddof=1) over its n seeds, the value alone for n = 1. Notes use the "
              "means; a best within one sd (the larger of the two) of the runner-up says so.")
"""What the "Across seeds" table of ``report.md`` shows, written above it."""


def seed_groups(runs: list[dict]) -> list[list[dict]]:
    """Runs whose configs are equal except for ``seed`` and :data:`OUTPUT_ONLY_KEYS`, in order of first
    appearance; a key a stored config lacks (written before the key existed) counts as its default."""
    import json

    from sequnlearn.config import with_defaults

    groups: dict[str, list[dict]] = {}
    for r in runs:
        setting = {k: v for k, v in with_defaults(r["config"]).items() if k != "seed" and k not in OUTPUT_ONLY_KEYS}
        groups.setdefault(json.dumps(setting, sort_keys=True, default=str), []).append(r)
    return list(groups.values())


def _group_stats(group: list[dict]) -> dict:
    """Forget and retain accuracy of a seed group: means and sample sds (retain None if a run has none)."""
    forget, forget_sd = spread([r["eval"]["forget_acc"] for r in group])
    retains = [r["eval"].get("retain_acc") for r in group]
    retain, retain_sd = (None, None) if None in retains else spread(retains)
    return {"loss": group[0]["config"]["retain_loss"], "forget": forget, "sd": forget_sd, "retain": retain,
            "retain_sd": retain_sd}


def other_styles(runs: list[dict]) -> list[str]:
    """Scoring styles every run was also evaluated in (``eval.json`` ``styles``), besides its headline one."""
    common = None
    for r in runs:
        styles = set(r["eval"].get("styles") or {}) - {r["eval"].get("style")}
        common = styles if common is None else common & styles
    return sorted(common or ())


def _style_stats(group: list[dict], style: str) -> dict:
    """Mean and sample sd of a seed group's forget and retain accuracy in another scoring ``style``."""
    out = {}
    for key in ("forget", "retain"):
        values = [r["eval"]["styles"][style].get(f"{key}_acc") for r in group]
        mean, sd = (None, None) if None in values else spread(values)
        out.update({f"{key} {style} mean": mean, f"{key} {style} sd": sd})
    return out


def group_rows(runs: list[dict], chance: float = CHANCE_4WAY) -> list[dict]:
    """One row per seed group (:func:`seed_groups`): accuracies as mean, sample sd (None for one run)
    and n (also in each of :func:`other_styles`), the seeds, notes from the means, and the run directories."""
    groups = seed_groups(runs)
    stats = [_group_stats(g) for g in groups]
    notes = _notes(stats, chance, "group")
    styles = other_styles(runs)
    return [{"Group": i, **_setting(g[0]["config"]), "forget mean": s["forget"], "forget sd": s["sd"],
             "retain mean": s["retain"], "retain sd": s["retain_sd"],
             **{k: v for style in styles for k, v in _style_stats(g, style).items()}, "n": len(g),
             "seeds": ", ".join(str(r["config"].get("seed")) for r in g), "Notes": note,
             "paths": "; ".join(r["path"] for r in g)}
            for i, (g, s, note) in enumerate(zip(groups, stats, notes), start=1)]


def markdown_table(rows: list[dict], baselines: list[dict]) -> str:
    """The table in the reference's format, baselines first."""
    cols = ["Run", "Layers", "remove_coef", "retain_coef", "retain loss", "forget acc", "retain acc", "Notes"]
    base = [{**dict.fromkeys(cols, "-"), "Run": "baseline", "forget acc": b["eval"]["forget_acc"],
             "retain acc": b["eval"].get("retain_acc"), "Notes": b["eval"].get("model", "")} for b in baselines]
    return markdown(cols, base + rows)


def seeds_table(groups: list[dict], styles: list[str] = ()) -> str:
    """Markdown: one row per seed group, accuracies as ``mean ± sd`` (the value alone when n = 1), in
    the headline style and then in each of ``styles`` (:func:`other_styles`, which the rows carry)."""
    extra = [f"{key} acc ({style})" for style in styles for key in ("forget", "retain")]
    cols = ["Group", "Layers", "remove_coef", "retain_coef", "retain loss", "forget acc", "retain acc", *extra, "n",
            "seeds", "Notes"]
    cells = [{**g, "forget acc": pm(g["forget mean"], g["forget sd"]), "retain acc": pm(g["retain mean"], g["retain sd"]),
              **{f"{key} acc ({style})": pm(g[f"{key} {style} mean"], g[f"{key} {style} sd"])
                 for style in styles for key in ("forget", "retain")}} for g in groups]
    return markdown(cols, cells)


GROUP_COLUMNS = {"report_styles.csv": ("Group", "style"),
                 "tamper_curves.csv": ("source", "style", "model", "role", "lr", "step")}
"""The columns that name a group of seeds in each per-seed CSV :func:`write_report` writes (for
:class:`sequnlearn.evidence.Source` ``group_by``): the rows equal in them differ only in ``seed``."""


def style_rows(runs: list[dict], baselines: list[dict] = ()) -> list[dict]:
    """One row per run (and baseline) and scoring style: its forget and retain accuracy in that style.

    ``Run`` is the run's number in ``report.csv`` (``baseline`` for a baseline), ``Group`` its seed
    group's in ``report_seeds.csv``; a run scored in one style only has one row, in its headline style.
    """
    group_of = {id(r): i for i, g in enumerate(seed_groups(runs), start=1) for r in g}
    entries = [("baseline", "", dict.fromkeys(_setting_columns(), "-"), "", b) for b in baselines]
    entries += [(i, group_of[id(r)], _setting(r["config"]), r["config"].get("seed"), r)
                for i, r in enumerate(runs, start=1)]
    return [{"Run": run, "Group": group, **setting, "seed": seed, "style": style,
             "forget acc": acc.get("forget_acc"), "retain acc": acc.get("retain_acc"), "path": r["path"]}
            for run, group, setting, seed, r in entries for style, acc in _styles_of(r["eval"]).items()]


def _setting_columns() -> list[str]:
    """The names of :func:`_setting`'s columns."""
    return ["Layers", "remove_coef", "retain_coef", "retain loss"]


def _styles_of(ev: dict) -> dict[str, dict]:
    """``{style: {forget_acc, retain_acc}}`` of an ``eval.json``: its ``styles``, else its headline style."""
    return ev.get("styles") or {ev.get("style") or "": {k: ev.get(k) for k in ("forget_acc", "retain_acc")}}


def csv_text(rows: list[dict]) -> str:
    """The same rows as CSV (with the run directory path)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["Run"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (low forget, high retain), sorted by forget accuracy."""
    front = [i for i, (f, r) in enumerate(points)
             if not any(f2 <= f and r2 >= r and (f2, r2) != (f, r) for f2, r2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def _errors(groups: list[dict], key: str) -> list[float] | None:
    """Error-bar lengths (``key``, an sd; 0 where None), or None when no group has a spread."""
    errs = [g[key] or 0.0 for g in groups]
    return errs if any(errs) else None


def _repeated(groups: list[dict]) -> bool:
    """True when some seed group holds more than one run (its runs are drawn faintly behind the mean)."""
    return any(g["n"] > 1 for g in groups)


def plot_tradeoff(groups: list[dict], baselines: list[dict], path: Path, chance: float = CHANCE_4WAY,
                  runs: list[dict] = ()) -> None:
    """Forget vs retain accuracy with the Pareto front, baseline and chance lines.

    Args:
        groups: :func:`group_rows`; a point per group at its means, sd error bars when n > 1.
        runs: :func:`table_rows`; drawn faintly when a group has several runs.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    groups = [g for g in groups if g["retain mean"] is not None]
    pts = [(g["forget mean"], g["retain mean"]) for g in groups]
    for loss, marker in (("L2", "o"), ("KL", "s")):
        sel = [g for g in groups if g["retain loss"] == loss]
        if not sel:
            continue
        bars = ax.errorbar([g["forget mean"] for g in sel], [g["retain mean"] for g in sel], fmt=marker,
                           xerr=_errors(sel, "forget sd"), yerr=_errors(sel, "retain sd"), capsize=3, label=loss,
                           zorder=3)
        faint = ([r for r in runs if r["retain loss"] == loss and r["retain acc"] is not None]
                 if _repeated(groups) else [])
        ax.scatter([r["forget acc"] for r in faint], [r["retain acc"] for r in faint], marker=marker, s=14,
                   color=bars[0].get_color(), alpha=0.3, zorder=2)
    front = pareto_front(pts)
    # Up to 8 points every one is named; beyond that only the Pareto front (the table names the rest).
    named = {pts[i] for i in front} if len(pts) > 8 else set(pts)
    labels = [(f"{g['retain loss']} rm{g['remove_coef']:g}/ret{g['retain_coef']:g}", xy)
              for g, xy in zip(groups, pts) if xy in named]
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k-", lw=1, alpha=0.6, label="Pareto front")
    for i, b in enumerate(baselines):
        ax.scatter([b["eval"]["forget_acc"]], [b["eval"].get("retain_acc", 0)], marker="*", s=160, c="k",
                   label="baseline" if i == 0 else None, zorder=4)
    ax.axvline(chance, color="gray", ls=":", lw=1)
    ax.axhline(chance, color="gray", ls=":", lw=1, label="random chance")
    ax.set_xlabel("forget accuracy (lower is better)")
    ax.set_ylabel("retain accuracy (higher is better)")
    ax.set_title("Forget / retain trade-off" + (" (mean ± sd over seeds)" if _repeated(groups) else ""))
    place_labels(ax, labels)  # last: every artist is in, so the axes limits are final
    ax.legend(fontsize=8)
    save(fig, path)


def plot_forget_vs_remove(groups: list[dict], path: Path, chance: float = CHANCE_4WAY, runs: list[dict] = ()) -> None:
    """Forget accuracy against remove_coef, one line per (retain loss, retain_coef) through the group
    means (:func:`group_rows`), sd error bars and the runs (:func:`table_rows`) faintly when n > 1."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    lines: dict[tuple, list[dict]] = {}
    for g in groups:
        lines.setdefault((g["retain loss"], g["retain_coef"]), []).append(g)
    for (loss, ret), sel in sorted(lines.items()):
        sel = sorted(sel, key=lambda g: g["remove_coef"])
        bars = ax.errorbar([g["remove_coef"] for g in sel], [g["forget mean"] for g in sel],
                           yerr=_errors(sel, "forget sd"), marker="o", capsize=3, label=f"{loss} ret={ret:g}")
        faint = [r for r in runs if (r["retain loss"], r["retain_coef"]) == (loss, ret)] if _repeated(groups) else []
        ax.scatter([r["remove_coef"] for r in faint], [r["forget acc"] for r in faint], s=12,
                   color=bars[0].get_color(), alpha=0.3, zorder=2)
    ax.axhline(chance, color="gray", ls=":", lw=1, label="random chance")
    ax.set_xlabel("remove_coef")
    ax.set_ylabel("forget accuracy")
    ax.set_title("Forget accuracy vs remove_coef" + (" (mean ± sd over seeds)" if _repeated(groups) else ""))
    ax.legend(fontsize=8)
    save(fig, path)


def plot_sweep_losses(runs: list[dict], path: Path) -> None:
    """Forget loss per step across phases for every run, overlaid."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in runs:
        m = r["metrics"]
        ax.plot([x["step"] for x in m], [x["forget_loss"] for x in m], lw=1,
                label=f"{r['config']['retain_loss'].upper()} rm{r['config']['remove_coef']:g}/ret{r['config']['retain_coef']:g}")
    if runs and runs[0]["metrics"]:
        shade_phases(ax, runs[0]["metrics"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("forget loss (CE / log V)")
    ax.set_title("Forget loss per step across phases", pad=16)
    ax.legend(fontsize=7)
    save(fig, path)


def _distinct_baselines(baselines: list[dict]) -> list[dict]:
    """One baseline per (model, forget acc, retain acc): sweeps of one model each evaluate it once."""
    seen, out = set(), []
    for b in baselines:
        key = (b["eval"].get("model"), b["eval"].get("forget_acc"), b["eval"].get("retain_acc"))
        if key not in seen:
            seen.add(key)
            out.append(b)
    return out


def chance_of(runs: list[dict]) -> float:
    """The forget task's chance level the runs' ``eval.json`` carry (4-way when none says)."""
    levels = {round(r["eval"]["forget_chance"], 6) for r in runs if r["eval"].get("forget_chance") is not None}
    return levels.pop() if len(levels) == 1 else CHANCE_4WAY


def write_report(dirs: list[Path], out: Path) -> dict:
    """Tables (markdown, CSV) and plots of what ``dirs`` hold into ``out``; returns what was written.

    Runs scored by ``sweep`` or ``sequnlearn eval`` (:func:`collect`) give the run tables and plots;
    every ``tamper.json`` its attack table and ``tamper.png``; every ``audit.json`` its section. A
    directory with only tampering results or audits gives a report of those. Runs that differ only in
    ``seed`` form a group (:func:`seed_groups`): ``report_seeds.csv`` has a row per group (mean, sd, n),
    and when a group has several runs ``report.md`` adds an "Across seeds" table and the plots show group
    means with sd error bars. Per-seed values: ``report_styles.csv`` has each run's accuracies in every
    scoring style it was scored in (:func:`style_rows`), ``tamper_curves.csv`` every point of every attack
    (:func:`tamper_curve_rows`); :data:`GROUP_COLUMNS` names their seed groups. Everything is read and
    ``out`` checked before anything is written.

    Raises:
        UserError: a directory that does not exist, nothing to report, a damaged result file, or an
            ``out`` that is a file or cannot be written.
    """
    from sequnlearn.audit import report_section
    from sequnlearn.errors import UserError
    from sequnlearn.runs import check_writable, read_json

    missing = [str(d) for d in dirs if not Path(d).exists()]
    if missing:
        raise UserError(f"{missing[0]} does not exist; give run, sweep or tamper directories")
    runs, baselines = collect(dirs)
    baselines = _distinct_baselines(baselines)
    tampers = [(p, read_json(p)) for d in dirs for p in sorted(found(d, "tamper.json"))]
    tampers = [(p, t) for p, t in tampers if isinstance(t, dict) and t.get("runs")]
    if not runs and not tampers and not any(p for d in dirs for p in found(d, "audit.json")):
        raise UserError(f"nothing to report under {', '.join(map(str, dirs))}: no finished run (config.yaml + "
                        "eval.json with a forget accuracy), no tamper.json, no audit.json; evaluate a run with "
                        "`sequnlearn eval RUN --tasks wmdp_bio_robust,mmlu` (or --data FILE), or run a sweep first")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for report.md, report.csv and the plots")
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    md, written, groups = _runs_section(runs, baselines, out) if runs else ("", [], [])
    tamper_tables, tamper_files = _tamper_section(tampers, out)
    tamper_md = tamper_tables + ("\n![tampering attack](tamper.png)\n" if tamper_files else "")
    audit_lines, audit_files = report_section(dirs, out)  # knowledge audits (audit.json) found under dirs
    atomic_write_text(out / "report.md", "# Report\n\n" + md + tamper_md + "\n".join(["", *audit_lines]))
    return {"runs": len(runs), "groups": len(groups), "baselines": len(baselines),
            "tampers": len(tampers), "files": ["report.md", *written, *tamper_files, *audit_files],
            "table": md or tamper_tables.lstrip("\n")}


def _runs_section(runs: list[dict], baselines: list[dict], out: Path) -> tuple[str, list[str], list[dict]]:
    """The run tables (markdown), ``report.csv``, ``report_seeds.csv``, ``report_styles.csv`` (when runs
    were scored in several styles: :func:`style_rows`) and the run plots into ``out``.

    Returns:
        ``(markdown, file names written, seed groups)``.
    """
    chance = chance_of(runs)
    rows, groups = table_rows(runs, chance), group_rows(runs, chance)
    md = markdown_table(rows, baselines)
    if _repeated(groups):
        md += "\n## Across seeds\n\n" + SEEDS_NOTE + "\n\n" + seeds_table(groups, other_styles(runs))
    atomic_write_text(out / "report.csv", csv_text(rows))
    atomic_write_text(out / "report_seeds.csv", csv_text(groups))
    styled = any(r["eval"].get("styles") for r in [*runs, *baselines])
    if styled:  # every scoring style per run, not only the headline one
        atomic_write_text(out / "report_styles.csv", csv_text(style_rows(runs, baselines)))
    plot_tradeoff(groups, baselines, out / "tradeoff.png", chance, runs=rows)
    plot_forget_vs_remove(groups, out / "forget_vs_remove_coef.png", chance, runs=rows)
    plot_sweep_losses(runs, out / "losses.png")
    return md, ["report.csv", "report_seeds.csv", *(["report_styles.csv"] if styled else []), "tradeoff.png",
                "forget_vs_remove_coef.png", "losses.png"], groups


def _tamper_section(tampers: list[tuple[Path, dict]], out: Path) -> tuple[str, list[str]]:
    """A table per ``tamper.json`` (:func:`tamper_table`), a plot of their attacks per scoring style
    (``tamper.png``; ``tamper_<style>.png`` each when the attacks were scored in several: an attack scored
    in cloze and in letter format is two curves, never one mean) and ``tamper_curves.csv``, every point
    of every attack (:func:`tamper_curve_rows`).

    Returns:
        ``(markdown tables, file names written)``; both empty without tampering results.
    """
    if not tampers:
        return "", []
    styles: dict[str, list[dict]] = {}
    for _, t in tampers:
        styles.setdefault((t.get("config") or {}).get("eval_style") or "letter", []).append(t)
    plots = []
    for style, results in styles.items():
        name = "tamper.png" if len(styles) == 1 else f"tamper_{style}.png"
        plot_tamper({**results[0], "runs": [r for t in results for r in t["runs"]]}, out / name)
        plots.append(name)
    atomic_write_text(out / "tamper_curves.csv", csv_text(tamper_curve_rows(tampers)))
    return "".join(f"\n## Tampering attack ({p.parent})\n\n{tamper_table(t)}{interrupted_note(t)}"
                   for p, t in tampers), [*plots, "tamper_curves.csv"]
