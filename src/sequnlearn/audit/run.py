"""Running an audit over models: each model loaded in turn, read out layer by layer and probed on each
task (the ``sequnlearn audit`` pipeline and the demo's audit); ``audit.json`` and its rendering written
into a directory."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sequnlearn.audit.probes import probe_accuracy
from sequnlearn.audit.readout import lens_accuracy, read_layers
from sequnlearn.audit.result import audit_markdown, plot_audit
from sequnlearn.config import stored_target_layers
from sequnlearn.errors import UserError
from sequnlearn.eval import chance_level
from sequnlearn.eval.scorer import plan_questions
from sequnlearn.model.layers import architecture
from sequnlearn.runs import RunDir, atomic_write_text, write_json

Loader = Callable[[], tuple]  # () -> (model, tokenizer)


@dataclass
class AuditOptions:
    """How the audit reads and probes the models."""

    style: str = "letter"
    """Prompt style: letter (" A".." D" after lettered choices, as WMDP/MMLU) or cloze (each choice's text)."""
    folds: int = 5
    """Cross-validation folds over questions (each question is scored once, held out)."""
    seed: int = 0
    """Seed of the fold assignment."""
    l2: float = 1e-2
    """L2 penalty of the probe on standardized features (``l2/2·|w|²`` added to the mean cross-entropy)."""
    prior: str = "lens"
    """What the probe's penalty pulls its weights towards: lens (the logit lens's read-out of the same
    product, so with few questions the probe starts from what the head reads) or zero."""
    max_iter: int = 30
    """Newton iterations per probe fit (it converges in about 10)."""
    batch_size: int = 32
    """Rows per forward pass (the evaluator's rows: one per question in letter style, per choice in cloze)."""
    limit: int | None = None
    """At most this many questions per subtask (as the evaluator's limit)."""
    features_dir: str | None = None
    """Keep the hidden-state features in float16 memory maps in this directory instead of in memory."""

    def __post_init__(self) -> None:
        if self.style not in ("letter", "cloze"):
            raise UserError(f"style {self.style!r} is unknown; use letter or cloze")
        if self.prior not in ("lens", "zero"):
            raise UserError(f"prior {self.prior!r} is unknown; use lens or zero")
        if self.folds < 2:
            raise UserError(f"folds={self.folds}: cross-validation needs at least 2 folds")
        if self.l2 < 0 or self.max_iter < 1 or self.batch_size < 1:
            raise UserError("l2 must be >= 0, max_iter and batch_size >= 1")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit={self.limit}: give a positive number of questions or leave it unset")



@dataclass
class AuditModel:
    """One model to audit.

    Attributes:
        label: its name in tables and plots.
        load: returns ``(model, tokenizer)`` (called once).
        source: where it came from (a path or a description), recorded in ``audit.json``.
        target_layers: the unlearning phases' target layers, when it is an unlearning run.
    """

    label: str
    load: Loader
    source: str = ""
    target_layers: list[int] | None = None


def layer_names(num_layers: int) -> list[str]:
    """``["0", "1", ..., "N-1"]``: the readout's layer axis (decoder layer outputs)."""
    return [str(i) for i in range(num_layers)]


def audit_one(model, tokenizer, tasks: dict, opts: AuditOptions, *, label: str = "model",
              progress: bool = False) -> dict[str, Any]:
    """Probe and logit-lens accuracy per layer of one model on each task.

    Args:
        tasks: key (``forget``, ``retain``) → :class:`~sequnlearn.data.mcq.MCQTask`.

    Returns:
        ``{key: {"n", "probe": [{"acc", "acc_stderr", "folds"}, ...], "lens": [acc, ...]}}``, one
        entry per decoder layer.
    """
    out = {}
    for key, task in tasks.items():
        questions = plan_questions(task, style=opts.style, limit=opts.limit, num_fewshot=0)
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{label}-{key}")
        readout = read_layers(model, tokenizer, questions, batch_size=opts.batch_size,
                              features_dir=opts.features_dir, name=name, progress=progress)
        device = next(model.parameters()).device
        vectors = readout.vectors[readout.keys]  # (S, D)
        probes = [probe_accuracy(readout.states[layer], vectors, readout.slots, readout.answers,
                                 folds=opts.folds, seed=opts.seed, l2=opts.l2, max_iter=opts.max_iter,
                                 prior=opts.prior, device=device)
                  for layer in range(readout.states.shape[0])]
        out[key] = {"n": len(questions), "probe": probes, "lens": lens_accuracy(readout)}
    return out



def run_audit(models: Sequence[AuditModel], tasks: dict, opts: AuditOptions, *, progress: bool = True) -> dict:
    """Audit each model (loaded one at a time) on each task; returns the ``audit.json`` content.

    The first model is the base the others are compared with.

    Raises:
        UserError: no model, duplicate labels, or models with different depths.
    """
    if not models:
        raise UserError("give at least one model to audit")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"model labels must differ (got {labels}); give --labels")
    t0, results, depth = time.time(), [], None
    for m in models:
        model, tokenizer = m.load()
        n = architecture(model).num_layers
        if depth is not None and n != depth:
            raise UserError(f"{m.label} has {n} layers, {models[0].label} {depth}; audit models of one architecture")
        depth = n
        if progress:
            print(f"[audit] {m.label}", flush=True)
        results.append({"label": m.label, "source": m.source, "target_layers": m.target_layers,
                        **audit_one(model, tokenizer, tasks, opts, label=m.label, progress=progress)})
        del model
    return {"options": asdict(opts), "layers": layer_names(depth), "base": labels[0],
            "tasks": {key: {"source": task.source, "chance": chance_level(task)} for key, task in tasks.items()},
            "models": results, "wall_s": round(time.time() - t0, 1)}


def write_audit(result: dict, out: Path) -> list[str]:
    """Write ``audit.json``, ``audit.md`` and ``audit.png`` into ``out``; returns their names."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "audit.json", result)
    atomic_write_text(out / "audit.md", "# Knowledge audit\n\n" + audit_markdown(result))
    plot_audit(result, out / "audit.png")
    return ["audit.json", "audit.md", "audit.png"]



def run_target_layers(path: str | Path) -> list[int] | None:
    """Target layers of the unlearning run in ``path`` (from its ``config.yaml``), else ``None``."""
    cfg_path = Path(path) / "config.yaml"
    if not cfg_path.is_file():
        return None
    return stored_target_layers(RunDir(Path(path)).stored_config(raw=True))  # None for layer_start: null (the model's last layer)
