"""Tables and plots from result files: a pure function of what is on disk.

Plots are PNGs readable at paper size (matplotlib, Agg backend); tables are markdown in the
reference's style.
"""

from __future__ import annotations

from pathlib import Path

from sequnlearn.runs import atomic_path


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
    cols = sorted({0, cfg["eval_every"], cfg["steps"]})
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


def plot_phase_accuracy(points: list[dict], path: Path, *, chance: float = 0.25) -> None:
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
