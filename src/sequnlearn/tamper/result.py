"""What a tampering attack found, read and rendered: pure functions of ``tamper.json`` rows.

The worst case over the attacked models, which attacks a config plans (:func:`planned_roles`, for
``--resume``), the seed means per (model, lr), the markdown table (``tamper.md``), the plot
(``tamper.png``) and the per-point CSV rows ``sequnlearn report`` writes. Nothing here trains or loads a
model: :mod:`sequnlearn.modelcard` and the report read results through this module, not the attack.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sequnlearn.plots import md_head, pm, pyplot, save, spread

if TYPE_CHECKING:
    from sequnlearn.config import TamperConfig


def worst_case(runs: list[dict]) -> dict:
    """The highest forget accuracy an attack on an attacked model reached (controls left out):
    ``{model, lr, seed, step, forget_acc}``."""
    best = None
    for run in runs:
        if run.get("role", "attack") != "attack":
            continue
        for point in run["curve"]:
            if best is None or point["forget_acc"] > best["forget_acc"]:
                best = {"model": run["model"], "lr": run["lr"], "seed": run["seed"], "step": point["step"],
                        "forget_acc": point["forget_acc"]}
    return best


CONTROL_LABELS = {"base": "base (before unlearning)", "retain-tuned": "base + benign fine-tune"}
"""Labels of the control attacks on the model before unlearning."""


def benign_label(label: str) -> str:
    """The label of the ``benign`` control of attacked model ``label``."""
    return f"{label} on benign text"


def no_answer_label(label: str) -> str:
    """The label of the ``no-answer`` control of attacked model ``label``."""
    return f"{label} on no-answer text"


def planned_roles(labels: list[str], cfg: TamperConfig) -> list[tuple[str, str, str | None]]:
    """Every attack a tamper of the models ``labels`` with ``cfg`` runs (for each lr and seed), in order:
    ``(label, role, attacked model's label, or None for the controls on the model before unlearning)``."""
    roles = [(label, "attack", label) for label in labels]
    roles += [(CONTROL_LABELS[c], c, None) for c in ("base", "retain-tuned") if c in cfg.controls]
    roles += [(benign_label(label), "benign", label) for label in labels] if "benign" in cfg.controls else []
    roles += [(no_answer_label(label), "no-answer", label) for label in labels] if "no-answer" in cfg.controls else []
    return roles


def planned_keys(labels: list[str], cfg: TamperConfig) -> set[tuple]:
    """The :func:`attack_key` of every attack a tamper of the models ``labels`` with ``cfg`` runs."""
    return {(m, r, float(lr), int(seed)) for m, r, _ in planned_roles(labels, cfg) for lr in cfg.lrs
            for seed in cfg.seeds}


def attack_key(run: dict) -> tuple:
    """What identifies one attack of a tamper result: ``(model, role, lr, seed)``."""
    return run["model"], run["role"], float(run["lr"]), int(run["seed"])


def plot_tamper(result: dict, path: Path) -> None:
    """Forget accuracy vs attack step with baseline and chance lines: one line per (model, lr), the
    mean over its seeds with a ±sd band when it has several, else the one attack (labelled by seed).

    What every line shares (one lr, one seed count) goes into the title, not each label, and the
    legend sits below the axes, so a plot with the controls' six lines still shows every curve.
    """
    plt = pyplot()
    groups = by_model_lr(result["runs"])
    lrs = {lr for _, lr in groups}
    counts = {len(runs) for runs in groups.values()}
    seeds = {runs[0]["seed"] for runs in groups.values()} if counts == {1} else set()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (model, lr), runs in groups.items():
        label = model if len(lrs) == 1 else f"{model} lr={lr:g}"
        if len(runs) == 1:
            steps = [p["step"] for p in runs[0]["curve"]]
            ax.plot(steps, [p["forget_acc"] for p in runs[0]["curve"]], marker="o", ms=3,
                    label=label if len(seeds) == 1 else f"{label} seed={runs[0]['seed']}")
        else:
            curve = seed_curve(runs)
            steps, mean = [c["step"] for c in curve], [c["mean"] for c in curve]
            sd = [c["sd"] or 0.0 for c in curve]
            (line,) = ax.plot(steps, mean, marker="o", ms=3,
                              label=label if len(counts) == 1 else f"{label} (mean ± sd, {len(runs)} seeds)")
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=line.get_color(), alpha=0.2, lw=0)
    if result.get("baseline") is not None:
        ax.axhline(result["baseline"], color="k", ls="--", lw=1, label="before unlearning")
    ax.axhline(result["chance"], color="gray", ls=":", lw=1, label="random chance")
    ax.set_xlabel("attack step")
    ax.set_ylabel("forget accuracy")
    shared = [f"lr {next(iter(lrs)):g}"] if len(lrs) == 1 else []
    if len(counts) == 1 and (n := next(iter(counts))) > 1:
        shared.append(f"mean ± sd over {n} seeds")
    elif len(seeds) == 1:
        shared.append(f"seed {next(iter(seeds))}")
    ax.set_title("Tampering attack: recovery of forget accuracy" + (f"\n({', '.join(shared)})" if shared else ""),
                 fontsize=11)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    save(fig, path)


def by_model_lr(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Attacks grouped by (model, lr), in order of first appearance; each group's runs differ in seed."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["lr"]), []).append(run)
    return groups


def seed_curve(runs: list[dict]) -> list[dict]:
    """Forget accuracy across the seeds of one (model, lr) per attack step.

    Returns:
        ``[{step, mean, sd, n}]`` for every step any attack evaluated, over the attacks evaluated
        there (``sd`` None when only one was).
    """
    curve = []
    for step in sorted({p["step"] for run in runs for p in run["curve"]}):
        values = [v for v in (_at_step(run["curve"], step) for run in runs) if v is not None]
        mean, sd = spread(values)
        curve.append({"step": step, "mean": mean, "sd": sd, "n": len(values)})
    return curve


def _at_step(curve: list[dict], step: int) -> float | None:
    for point in curve:
        if point["step"] == step:
            return point["forget_acc"]
    return None


def tamper_table(result: dict) -> str:
    """Markdown: one row per attack with Step 0 / first evaluation / last step and the maximum; when a
    (model, lr) was attacked with several seeds, a second table of their mean ± sd at the same steps."""
    cfg = result["config"]
    last = max(p["step"] for run in result["runs"] for p in run["curve"])
    cols = sorted(cfg.get("table_steps") or {0, cfg["eval_every"], last})
    steps = " | ".join(f"Step {s}" for s in cols)
    rows = []
    for run in result["runs"]:
        top = max(run["curve"], key=lambda p: p["forget_acc"])
        cells = " | ".join(pm(_at_step(run["curve"], s)) for s in cols)
        rows.append(f"| {run['model']} | {run['lr']:g} | {run['seed']} | {cells} | "
                    f"{top['forget_acc']:.4f} ({top['step']}) |")
    lines = [*md_head(f"Model | lr | seed | {steps} | Max (step)"), *rows]
    groups = by_model_lr(result["runs"])
    if any(len(runs) > 1 for runs in groups.values()):
        lines += ["", "Across seeds: mean ± sd (sample sd) over the attacks evaluated at each step.", "",
                  *md_head(f"Model | lr | n | seeds | {steps} | Max mean (step)"),
                  *(_seed_row(model, lr, runs, cols) for (model, lr), runs in groups.items())]
    w = result.get("worst_case")
    if w is None:  # only controls were run
        return "\n".join(lines) + "\n"
    lines += ["", f"Worst case: forget accuracy {w['forget_acc']:.4f} at step {w['step']} "
                  f"({w['model']}, lr={w['lr']:g}, seed={w['seed']}); random chance {result['chance']:.2f}"
                  + (f", before unlearning {result['baseline']:.4f}." if result.get("baseline") is not None else ".")]
    return "\n".join(lines) + "\n"


def _seed_row(model: str, lr: float, runs: list[dict], cols: list[int]) -> str:
    """A tamper-table row of one (model, lr): forget accuracy mean ± sd over its seeds at ``cols``."""
    curve = {c["step"]: c for c in seed_curve(runs)}
    cells = " | ".join(pm(curve[s]["mean"], curve[s]["sd"]) if s in curve else "-" for s in cols)
    top = max(curve.values(), key=lambda c: c["mean"])
    seeds = ", ".join(str(run["seed"]) for run in runs)
    return f"| {model} | {lr:g} | {len(runs)} | {seeds} | {cells} | {pm(top['mean'], top['sd'])} ({top['step']}) |"


def tamper_curve_rows(tampers: list[tuple[Path, dict]]) -> list[dict]:
    """One row per attack and evaluated step of every ``tamper.json``: the attack's model, role, lr and
    seed, the step, forget and retain accuracy, the scoring style and the directory it came from."""
    return [{"model": run["model"], "role": run.get("role", "attack"), "lr": run["lr"], "seed": run["seed"],
             "step": p["step"], "forget_acc": p["forget_acc"], "retain_acc": p.get("retain_acc"),
             "style": t.get("config", {}).get("eval_style", ""), "source": str(path.parent)}
            for path, t in tampers for run in t["runs"] for p in run["curve"]]


def interrupted_note(result: dict) -> str:
    """A line under the table of an attack that was interrupted (its ``tamper.json`` holds ``interrupted``)."""
    if not result.get("interrupted"):
        return ""
    return ("\nInterrupted: only the attacks that finished are shown; finish them with `sequnlearn tamper ... "
            "--resume`.\n")
