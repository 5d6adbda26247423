"""The shared plotting and table helpers at the bottom of the house: pyplot (Agg), atomic PNG saves,
mean ± sd, the ``mean ± sd`` cell, markdown tables, point labels that do not overlap, and the plots of
one unlearning run (losses per step with its phases shaded, accuracy per phase). Every pipeline that renders its own result (tamper,
audit, demo, report) draws with these."""

from __future__ import annotations

from pathlib import Path

from sequnlearn.runs import atomic_path


def pyplot():
    """matplotlib's pyplot on the Agg backend, with the house style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 150})
    return plt


def save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` as a PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) of ``values``; the sd is None for a single value.

    Raises:
        ValueError: ``values`` is empty.
    """
    import statistics

    if not values:
        raise ValueError("spread() needs at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pm(mean: float | None, sd: float | None = None) -> str:
    """``mean ± sd`` to four decimals; the mean alone when there is no spread, ``-`` when no mean."""
    if mean is None:
        return "-"
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"


def md_head(cols: str) -> list[str]:
    """Header and rule lines of a markdown table from ``"A | B | C"``."""
    return [f"| {cols} |", "|" + "---|" * (cols.count("|") + 1)]


def cell(v) -> str:
    """A markdown table cell: ``-`` for None, floats below 1 (or not whole) to four decimals."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 1 or not v.is_integer() else f"{v:g}"
    return str(v)


def markdown(cols: list[str], rows: list[dict]) -> str:
    """A markdown table of ``rows`` in the columns ``cols``."""
    lines = md_head(" | ".join(cols)) + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def shade_phases(ax, metrics: list[dict]) -> None:
    """Alternate background bands per unlearning phase (``metrics.jsonl`` rows), labelled with the target layer."""
    bounds: dict[int, list[int]] = {}
    for m in metrics:
        bounds.setdefault(m["phase"], [m["step"], m["step"], m["layer"]])[1] = m["step"]
    for phase, (lo, hi, layer) in bounds.items():
        if phase % 2 == 0:
            ax.axvspan(lo - 0.5, hi + 0.5, color="0.92", zorder=0)
        ax.text((lo + hi) / 2, 1.0, f"L{layer}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8)


def plot_losses(metrics: list[dict], path: Path, title: str = "Unlearning losses per step") -> None:
    """Forget and retain loss (and their coefficients) per optimizer step, phases shaded by layer."""
    plt = pyplot()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True, height_ratios=[2, 1])
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["forget_loss"] for m in metrics], label="forget loss (CE / log V)")
    ax.plot(steps, [m["retain_loss"] for m in metrics], label="retain loss")
    axc.plot(steps, [m["forget_coef"] for m in metrics], label="forget coef")
    axc.plot(steps, [m["retain_coef"] for m in metrics], label="retain coef")
    for a in (ax, axc):
        shade_phases(a, metrics)
    ax.set_ylabel("loss")
    ax.set_title(title, pad=16)
    ax.legend(fontsize=8)
    axc.set_xlabel("optimizer step")
    axc.set_ylabel("coefficient")
    axc.legend(fontsize=8)
    save(fig, path)


def plot_phase_accuracy(points: list[dict], path: Path, *, chance: float) -> None:
    """Forget and retain accuracy after each phase (``points``: ``{label, forget_acc, retain_acc}``),
    with random ``chance`` as a dotted line."""
    plt = pyplot()
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
    save(fig, path)


LABEL_OFFSETS = [(4, 4), (4, -11), (-4, 4), (-4, -11), (4, 14), (-4, 14), (4, -21), (-4, -21), (4, 24), (-4, 24),
                  (4, -31), (-4, -31), (4, 34), (-4, 34), (4, -41), (-4, -41)]
"""Candidate label positions around a point, in points (x, y); a negative x puts the label left of it."""


def place_labels(ax, labels: list[tuple[str, tuple[float, float]]], fontsize: float = 7) -> None:
    """Annotate points so that no two labels overlap: each takes the first spot of :data:`LABEL_OFFSETS`
    where its rendered box meets no label placed before it (the last spot when none is free).

    Call it after the last artist is added: the axes limits must be final.
    """
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    boxes = []
    for text, xy in sorted(labels, key=lambda lab: (-lab[1][1], lab[1][0])):  # top to bottom
        for dx, dy in LABEL_OFFSETS:
            far = (dx, dy) not in LABEL_OFFSETS[:4]
            note = ax.annotate(text, xy, fontsize=fontsize, xytext=(dx, dy), textcoords="offset points",
                               ha="left" if dx >= 0 else "right", va="bottom",
                               arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if far else None)
            box = Text.get_window_extent(note, renderer).padded(2)  # the text alone (not its leader line), 2 px apart
            if not any(box.overlaps(b) for b in boxes) or (dx, dy) == LABEL_OFFSETS[-1]:
                boxes.append(box)
                break
            note.remove()
