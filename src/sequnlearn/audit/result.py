"""The audit's result rendered: the markdown tables and the plot of ``audit.json``, and the audits found
under some directories as a section of ``sequnlearn report``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from sequnlearn.collect import found
from sequnlearn.plots import pyplot, save
from sequnlearn.runs import read_json


def _targets(result: dict) -> list[int]:
    """Target layers of the audited unlearning runs, back to front, each once."""
    seen: list[int] = []
    for m in result["models"]:
        for layer in m.get("target_layers") or []:
            if layer not in seen:
                seen.append(layer)
    return seen


def audit_markdown(result: dict) -> str:
    """The audit as markdown: a per-layer table (probe / lens per task and model) and a summary."""
    keys, models = list(result["tasks"]), result["models"]
    targets = _targets(result)
    opts = result["options"]
    head = ["Layer"] + [f"{key}: {m['label']}" for key in keys for m in models]
    lines = ["Accuracy per layer, **probe / logit lens** (probe: linear read-out of the hidden states, "
             f"{opts['folds']}-fold cross-validated over questions, seed {opts['seed']}, l2 {opts['l2']:g} towards "
             f"{'the lens' if opts.get('prior', 'lens') == 'lens' else 'zero'}; "
             "lens: the layer's output through the final norm and head, scored like the evaluator — at the "
             f"last layer it is the model's own accuracy). Prompt style: {opts['style']}. "
             + "; ".join(f"{key}: {result['models'][0][key]['n']} questions, "
                         f"chance {result['tasks'][key]['chance']:.2f}"
                         for key in keys)
             + "."
             + (f" Target layers of unlearning, back to front: {', '.join(map(str, targets))} (marked *)."
                if targets else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(result["layers"]):
        mark = "*" if int(name) in targets else ""
        cells = [f"{m[key]['probe'][i]['acc']:.3f} / {m[key]['lens'][i]:.3f}" for key in keys for m in models]
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    lines += ["", _summary_table(result), ""]
    if result.get("phases"):
        lines += [_phase_table(result), ""]
    n = min(result["models"][0][key]["n"] for key in keys)
    lines.append(f"One standard error of an accuracy near 0.5 is {math.sqrt(0.25 / n):.3f} here ({n} questions); "
                 "per-fold probe accuracies are in audit.json.")
    return "\n".join(lines) + "\n"


def _summary_table(result: dict) -> str:
    """Per model and task: the answer (last-layer lens), the best probe layer, the last layer's probe."""
    keys = list(result["tasks"])
    cols = ("answer acc", "best probe (layer)", "last-layer probe")
    head = ["Model"] + [f"{key}: {col}" for key in keys for col in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result["models"]:
        cells = []
        for key in keys:
            probes = [p["acc"] for p in m[key]["probe"]]
            best = max(range(len(probes)), key=lambda i: probes[i])
            cells += [f"{m[key]['lens'][-1]:.3f}", f"{probes[best]:.3f} ({result['layers'][best]})",
                      f"{probes[-1]:.3f}"]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _phase_table(result: dict) -> str:
    """Forget probe / lens per layer after each unlearning phase (the model in memory, before merging)."""
    phases = result["phases"]
    head = ["Layer"] + [p["label"] for p in phases]
    lines = ["After each unlearning phase, forget set, **probe / logit lens** (the adapter in memory, "
             "before merging; the last phase is the unlearned model):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(result["layers"]):
        cells = [f"{p['forget']['probe'][i]['acc']:.3f} / {p['forget']['lens'][i]:.3f}" for p in phases]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_audit(result: dict, path: Path) -> None:
    """Probe (top) and logit-lens (bottom) accuracy per layer, one panel per task, one line per model.

    The first model (the base) is drawn black and dashed; chance is a dotted line; the unlearning
    runs' target layers are shaded.
    """
    plt = pyplot()
    keys = list(result["tasks"])
    fig, axes = plt.subplots(2, len(keys), figsize=(4.4 * len(keys), 6.6), sharex=True, sharey=True, squeeze=False)
    x = list(range(len(result["layers"])))
    targets = _targets(result)
    for col, key in enumerate(keys):
        for row, measure in enumerate(("probe", "lens")):
            ax = axes[row][col]
            for j, m in enumerate(result["models"]):
                ys = [p["acc"] for p in m[key]["probe"]] if measure == "probe" else m[key]["lens"]
                style = dict(color="k", ls="--", lw=1.5) if j == 0 else dict(lw=1.5)
                name = m["label"] + (" (base)" if j == 0 and m["label"] != "base" else "")
                ax.plot(x, ys, marker="o", ms=3, label=name, **style)
            for t in targets:
                ax.axvspan(t - 0.4, t + 0.4, color="tab:red", alpha=0.08, zorder=0)
            ax.axhline(result["tasks"][key]["chance"], color="gray", ls=":", lw=1, label="chance")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{key}: {'linear probe' if measure == 'probe' else 'logit lens'}", fontsize=10)
            if col == 0:
                ax.set_ylabel("accuracy")
            if row == 1:
                ax.set_xticks(x, result["layers"])
                ax.set_xlabel("layer (shaded: unlearning target layers)" if targets else "layer")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Knowledge audit: where the answers stay decodable", fontsize=11)
    save(fig, path)


def report_section(dirs: Sequence[Path], out: Path) -> tuple[list[str], list[str]]:
    """For ``sequnlearn report``: markdown lines for every ``audit.json`` under ``dirs`` (its table) and
    the plots redrawn from it into ``out`` (``audit.png``, ``audit-2.png``, ...).

    Returns:
        ``(lines, file names written)``; both empty when there is no audit.
    """
    paths = sorted({p for d in dirs for p in found(Path(d), "audit.json")})  # not in hidden, half-built dirs
    lines: list[str] = []
    files: list[str] = []
    for i, p in enumerate(paths):
        name = "audit.png" if i == 0 else f"audit-{i + 1}.png"
        result = read_json(p)
        plot_audit(result, out / name)
        files.append(name)
        lines += [f"## Knowledge audit ({p.parent})", "", audit_markdown(result), f"![knowledge audit]({name})", ""]
    return lines, files
