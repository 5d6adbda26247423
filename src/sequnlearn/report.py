"""Tables and plots from result files: a pure function of what is on disk.

Plots are PNGs readable at paper size (matplotlib, Agg backend); tables are markdown in the
reference's style.
"""

from __future__ import annotations

from pathlib import Path

from sequnlearn.runs import atomic_path, atomic_write_text

CHANCE_4WAY = 0.25
"""Chance accuracy of a four-way multiple-choice task, for results that do not carry their own."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 150})
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_tamper(result: dict, path: Path) -> None:
    """Forget accuracy vs attack step, one line per (model, lr, seed), with baseline and chance lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in result["runs"]:
        steps = [p["step"] for p in run["curve"]]
        ax.plot(steps, [p["forget_acc"] for p in run["curve"]], marker="o", ms=3,
                label=f"{run['model']} lr={run['lr']:g} seed={run['seed']}")
    if result.get("baseline") is not None:
        ax.axhline(result["baseline"], color="k", ls="--", lw=1, label="before unlearning")
    ax.axhline(result["chance"], color="gray", ls=":", lw=1, label="random chance")
    ax.set_xlabel("attack step")
    ax.set_ylabel("forget accuracy")
    ax.set_title("Tampering attack: recovery of forget accuracy")
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def _at_step(curve: list[dict], step: int) -> float | None:
    for point in curve:
        if point["step"] == step:
            return point["forget_acc"]
    return None


def tamper_table(result: dict) -> str:
    """Markdown: one row per attack with Step 0 / first evaluation / last step and the maximum."""
    cfg = result["config"]
    last = max(p["step"] for run in result["runs"] for p in run["curve"])
    cols = sorted(cfg.get("table_steps") or {0, cfg["eval_every"], last})
    head = "| Model | lr | seed | " + " | ".join(f"Step {s}" for s in cols) + " | Max (step) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in result["runs"]:
        vals = [_at_step(run["curve"], s) for s in cols]
        top = max(run["curve"], key=lambda p: p["forget_acc"])
        cells = " | ".join("-" if v is None else f"{v:.4f}" for v in vals)
        lines.append(f"| {run['model']} | {run['lr']:g} | {run['seed']} | {cells} | "
                     f"{top['forget_acc']:.4f} ({top['step']}) |")
    w = result["worst_case"]
    lines += ["", f"Worst case: forget accuracy {w['forget_acc']:.4f} at step {w['step']} "
                  f"({w['model']}, lr={w['lr']:g}, seed={w['seed']}); random chance {result['chance']:.2f}"
                  + (f", before unlearning {result['baseline']:.4f}." if result.get("baseline") is not None else ".")]
    return "\n".join(lines) + "\n"


def plot_losses(metrics: list[dict], path: Path, title: str = "Unlearning losses per step") -> None:
    """Forget and retain loss (and their coefficients) per optimizer step, phases shaded by layer."""
    plt = _pyplot()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True, height_ratios=[2, 1])
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["forget_loss"] for m in metrics], label="forget loss (CE / log V)")
    ax.plot(steps, [m["retain_loss"] for m in metrics], label="retain loss")
    axc.plot(steps, [m["forget_coef"] for m in metrics], label="forget coef")
    axc.plot(steps, [m["retain_coef"] for m in metrics], label="retain coef")
    for a in (ax, axc):
        _shade_phases(a, metrics)
    ax.set_ylabel("loss")
    ax.set_title(title, pad=16)
    ax.legend(fontsize=8)
    axc.set_xlabel("optimizer step")
    axc.set_ylabel("coefficient")
    axc.legend(fontsize=8)
    _save(fig, path)


def _shade_phases(ax, metrics: list[dict]) -> None:
    """Alternate background bands per phase, labelled with the target layer."""
    bounds: dict[int, list[int]] = {}
    for m in metrics:
        bounds.setdefault(m["phase"], [m["step"], m["step"], m["layer"]])[1] = m["step"]
    for phase, (lo, hi, layer) in bounds.items():
        if phase % 2 == 0:
            ax.axvspan(lo - 0.5, hi + 0.5, color="0.92", zorder=0)
        ax.text((lo + hi) / 2, 1.0, f"L{layer}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8)


def plot_phase_accuracy(points: list[dict], path: Path, *, chance: float = CHANCE_4WAY) -> None:
    """Forget and retain accuracy after each phase (``points``: ``{label, forget_acc, retain_acc}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = range(len(points))
    ax.plot(x, [p["forget_acc"] for p in points], marker="o", label="forget (hazard) accuracy")
    ax.plot(x, [p["retain_acc"] for p in points], marker="s", label="retain accuracy")
    ax.axhline(chance, color="gray", ls=":", lw=1, label="random chance")
    ax.set_xticks(list(x), [p["label"] for p in points])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("after phase (target layer)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy through sequential unlearning")
    ax.legend(fontsize=8)
    _save(fig, path)


# ---------------------------------------------------------------------- sweep reports

RETAIN_COLLAPSE_MARGIN = 0.05
"""A retain accuracy within this of random chance counts as collapsed."""


def collect(dirs: list[Path]) -> tuple[list[dict], list[dict]]:
    """Finished runs and baselines under ``dirs`` (any depth), sorted by path, numbers by value.

    Returns:
        ``(runs, baselines)``; a run row has its path, config, eval and metrics.
    """
    from sequnlearn import io
    from sequnlearn.runs import read_json, read_jsonl

    runs, baselines = [], []
    for root in dirs:
        for ev_path in sorted(Path(root).rglob("eval.json"), key=_natural):
            ev = read_json(ev_path)
            if ev.get("baseline"):
                baselines.append({"path": str(ev_path.parent), "eval": ev})
            elif (ev_path.parent / "config.yaml").is_file() and "forget_acc" in ev:
                cfg = io.read_yaml(ev_path.parent / "config.yaml", "run config")
                runs.append({"path": str(ev_path.parent), "config": cfg, "eval": ev,
                             "metrics": read_jsonl(ev_path.parent / "metrics.jsonl")})
    return runs, baselines


def _natural(path: Path) -> list:
    """Sort key that orders numbers by value: ``remove_coef=5`` before ``remove_coef=10``."""
    import re

    return [(0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
            for t in re.split(r"(\d+(?:\.\d+)?)", str(path)) if t]


def _layers(cfg: dict) -> str:
    layers = cfg.get("layers")
    if layers:
        return "→".join(str(x) for x in layers)
    return f"{cfg['layer_start']}→{cfg['layer_end']} (step {cfg['layer_step']})"


def annotate(runs: list[dict], chance: float = CHANCE_4WAY) -> list[str]:
    """Notes per run: below random, retain collapsed, best per retain loss (lowest forget, retain intact)."""
    notes = [[] for _ in runs]
    for i, r in enumerate(runs):
        if r["eval"]["forget_acc"] < chance:
            notes[i].append(f"Below random ({chance:.2f})")
        retain = r["eval"].get("retain_acc")
        if retain is not None and retain <= chance + RETAIN_COLLAPSE_MARGIN:
            notes[i].append("Retain collapsed")
    for loss in sorted({r["config"]["retain_loss"] for r in runs}):
        ok = [i for i, r in enumerate(runs) if r["config"]["retain_loss"] == loss and "Retain collapsed" not in notes[i]]
        if ok:
            best = min(ok, key=lambda i: runs[i]["eval"]["forget_acc"])
            notes[best].append(f"Best {loss.upper()}")
    return ["; ".join(n) for n in notes]


def table_rows(runs: list[dict], chance: float = CHANCE_4WAY) -> list[dict]:
    """One row per run in the reference's columns."""
    notes = annotate(runs, chance)
    rows = []
    for i, (r, note) in enumerate(zip(runs, notes), start=1):
        c, e = r["config"], r["eval"]
        rows.append({"Run": i, "Layers": _layers(c), "remove_coef": c["remove_coef"], "retain_coef": c["retain_coef"],
                     "retain loss": c["retain_loss"].upper(), "forget acc": e["forget_acc"],
                     "retain acc": e.get("retain_acc"), "Notes": note, "path": r["path"]})
    return rows


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 1 or not v.is_integer() else f"{v:g}"
    return str(v)


def markdown_table(rows: list[dict], baselines: list[dict]) -> str:
    """The table in the reference's format, baselines first."""
    cols = ["Run", "Layers", "remove_coef", "retain_coef", "retain loss", "forget acc", "retain acc", "Notes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for b in baselines:
        e = b["eval"]
        lines.append(f"| baseline | - | - | - | - | {_cell(e['forget_acc'])} | {_cell(e.get('retain_acc'))} | "
                     f"{e.get('model', '')} |")
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


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


def plot_tradeoff(rows: list[dict], baselines: list[dict], path: Path, chance: float = CHANCE_4WAY) -> None:
    """Forget vs retain accuracy scatter with the Pareto front, baseline and chance lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    pts = [(r["forget acc"], r["retain acc"]) for r in rows if r["retain acc"] is not None]
    for loss, marker in (("L2", "o"), ("KL", "s")):
        sel = [r for r in rows if r["retain loss"] == loss and r["retain acc"] is not None]
        ax.scatter([r["forget acc"] for r in sel], [r["retain acc"] for r in sel], marker=marker, label=loss, zorder=3)
    front = pareto_front(pts)
    # Up to 8 points every one is named; beyond that only the Pareto front (the table names the rest).
    named = {pts[i] for i in front} if len(pts) > 8 else set(pts)
    for r in rows:
        if r["retain acc"] is not None and (r["forget acc"], r["retain acc"]) in named:
            ax.annotate(f"{r['retain loss']} rm{r['remove_coef']:g}/ret{r['retain_coef']:g}",
                        (r["forget acc"], r["retain acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k-", lw=1, alpha=0.6, label="Pareto front")
    for i, b in enumerate(baselines):
        ax.scatter([b["eval"]["forget_acc"]], [b["eval"].get("retain_acc", 0)], marker="*", s=160, c="k",
                   label="baseline" if i == 0 else None, zorder=4)
    ax.axvline(chance, color="gray", ls=":", lw=1)
    ax.axhline(chance, color="gray", ls=":", lw=1, label="random chance")
    ax.set_xlabel("forget accuracy (lower is better)")
    ax.set_ylabel("retain accuracy (higher is better)")
    ax.set_title("Forget / retain trade-off")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_forget_vs_remove(rows: list[dict], path: Path, chance: float = CHANCE_4WAY) -> None:
    """Forget accuracy against remove_coef, one line per (retain loss, retain_coef)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["retain loss"], r["retain_coef"]), []).append(r)
    for (loss, ret), sel in sorted(groups.items()):
        sel = sorted(sel, key=lambda r: r["remove_coef"])
        ax.plot([r["remove_coef"] for r in sel], [r["forget acc"] for r in sel], marker="o", label=f"{loss} ret={ret:g}")
    ax.axhline(chance, color="gray", ls=":", lw=1, label="random chance")
    ax.set_xlabel("remove_coef")
    ax.set_ylabel("forget accuracy")
    ax.set_title("Forget accuracy vs remove_coef")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_sweep_losses(runs: list[dict], path: Path) -> None:
    """Forget loss per step across phases for every run, overlaid."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in runs:
        m = r["metrics"]
        ax.plot([x["step"] for x in m], [x["forget_loss"] for x in m], lw=1,
                label=f"{r['config']['retain_loss'].upper()} rm{r['config']['remove_coef']:g}/ret{r['config']['retain_coef']:g}")
    if runs and runs[0]["metrics"]:
        _shade_phases(ax, runs[0]["metrics"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("forget loss (CE / log V)")
    ax.set_title("Forget loss per step across phases", pad=16)
    ax.legend(fontsize=7)
    _save(fig, path)


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
    """Tables (markdown, CSV) and plots from run directories into ``out``; returns what was written."""
    from sequnlearn.errors import UserError
    from sequnlearn.runs import read_json

    runs, baselines = collect(dirs)
    baselines = _distinct_baselines(baselines)
    if not runs:
        raise UserError(f"no finished runs (config.yaml + eval.json) under {', '.join(map(str, dirs))}; run a sweep first")
    tampers = [read_json(p) for d in dirs for p in sorted(Path(d).rglob("tamper.json"))]  # all read before any write
    out.mkdir(parents=True, exist_ok=True)
    chance = chance_of(runs)
    rows = table_rows(runs, chance)
    md = markdown_table(rows, baselines)
    from sequnlearn.audit import report_section

    audit_lines, audit_files = report_section(dirs, out)  # knowledge audits (audit.json) found under dirs
    atomic_write_text(out / "report.md", "# Sweep report\n\n" + md + "\n".join(["", *audit_lines]))
    atomic_write_text(out / "report.csv", csv_text(rows))
    plot_tradeoff(rows, baselines, out / "tradeoff.png", chance)
    plot_forget_vs_remove(rows, out / "forget_vs_remove_coef.png", chance)
    plot_sweep_losses(runs, out / "losses.png")
    written = ["report.md", "report.csv", "tradeoff.png", "forget_vs_remove_coef.png", "losses.png", *audit_files]
    if tampers:
        merged = {**tampers[0], "runs": [r for t in tampers for r in t["runs"]]}
        plot_tamper(merged, out / "tamper.png")
        written.append("tamper.png")
    return {"runs": len(runs), "baselines": len(baselines), "files": written, "table": md}
