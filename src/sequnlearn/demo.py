"""The whole pipeline on the toy world: build → evaluate → unlearn → evaluate → tamper → audit → report.

What ``make demo`` runs (``sequnlearn demo --out runs/demo``). Each step shows progress and
writes its results as it goes; the world is built once and reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sequnlearn.errors import UserError
from sequnlearn.runs import RunDir, atomic_write_text, read_jsonl, write_json

METRIC = "cloze_acc"
LETTER_USEFUL = 0.4
"""Base forget accuracy in letter format below which the report says the format shows nothing."""


@dataclass
class DemoOptions:
    """What the demo runs on; the defaults are ``make demo``'s."""

    out: Path
    """Demo directory: report.md, summary.json, plots, and the unlearn / tamper runs under it."""
    world_dir: Path = Path("runs/toyworld")
    """Where the toy world is built (or reused)."""
    world_config: object = None
    """A ``ToyWorldConfig`` (None = the full world)."""
    unlearn_preset: str = "toy-l2"
    """Unlearning preset; its model and corpus paths are pointed at ``world_dir``."""
    unlearn_overrides: list[str] = field(default_factory=list)
    """Extra ``key=value`` overrides of the unlearning config."""
    tamper_preset: str | None = "toy-tamper"
    """Tamper preset, or None to skip the attack."""
    tamper_overrides: list[str] = field(default_factory=list)
    """Extra ``key=value`` overrides of the tamper config."""
    progress: bool = True
    """Progress bars and stage lines."""


def _say(opts: DemoOptions, msg: str) -> None:
    if opts.progress:
        print(f"[demo] {msg}", flush=True)


def _accuracy(model, tokenizer, tasks: dict, style: str = "cloze") -> dict:
    """Accuracy on the forget and retain MCQ sets in ``style``: ``{forget_acc, retain_acc}``."""
    from sequnlearn.eval import EvalSpec, forget_retain_accuracy

    res = forget_retain_accuracy(model, tokenizer, EvalSpec(tasks["forget"], tasks.get("retain"), style))
    return {f"{key}_acc": res[f"{key}_acc"] for key in tasks}


def _both_styles(model, tokenizer, tasks: dict) -> tuple[dict, dict]:
    """Cloze accuracy (the demo's metric) and letter-format (A-D) accuracy of one model."""
    return _accuracy(model, tokenizer, tasks), _accuracy(model, tokenizer, tasks, style="letter")


def _fresh(path: Path, kind: str) -> Path:
    """The demo's own ``unlearn/`` or ``tamper/`` directory, emptied of an earlier demo's result (a
    directory that is not one is refused, and left as it is).

    Raises:
        UserError: ``path`` holds something else than a result of ``kind``.
    """
    from sequnlearn.runs import prepare_out_dir

    try:
        return prepare_out_dir(path, overwrite=True, kind=kind)
    except UserError as e:
        raise UserError(f"demo --out {path.parent}: {path.name}/ is not an earlier demo's (left as it is: {e}); "
                        "choose another --out") from None


def _unlearn(opts: DemoOptions, paths, tasks: dict) -> tuple[RunDir, list[dict], list[dict]]:
    """Unlearn with the preset, evaluating (and auditing, forget set) the model in memory after every phase."""
    from sequnlearn.config import load_config
    from sequnlearn.unlearn.engine import unlearn

    world = [f"model={paths.model}", f"forget_data={paths.forget_corpus}", f"retain_data={paths.retain_corpus}"]
    cfg = load_config(preset=opts.unlearn_preset, overrides=world + list(opts.unlearn_overrides))
    run = RunDir(_fresh(opts.out / "unlearn", "unlearn"))
    phases: list[dict] = []
    audits: list[dict] = []

    def after_phase(engine, phase: int, layer: int) -> None:
        from sequnlearn.audit import audit_one

        # the engine switches the LoRA dropouts back on after this (an evaluator leaves the model in eval mode)
        acc = _accuracy(engine.model, engine.tokenizer, tasks)
        audit = audit_one(engine.model, engine.tokenizer, {"forget": tasks["forget"]}, _audit_options())
        phases.append({"label": f"L{layer}", "phase": phase, "layer": layer, **acc})
        _say(opts, f"after layer {layer}: forget {acc['forget_acc']:.3f}  retain {acc['retain_acc']:.3f}")
        audits.append({"label": f"after L{layer}", "phase": phase, "layer": layer, **audit})

    unlearn(cfg, run, on_phase_end=after_phase)
    return run, phases, audits


def _tamper(opts: DemoOptions, paths, baseline: float) -> tuple[dict | None, tuple | None]:
    """The attack on the unlearned model and its controls (the preset's); returns the result and the
    attacked ``(model, tokenizer)`` (the first attack's, trained in place)."""
    from sequnlearn.config import TamperConfig, load_config
    from sequnlearn.model.load import load_model
    from sequnlearn.tamper import tamper

    if opts.tamper_preset is None:
        _say(opts, "tamper attack skipped")
        return None, None
    world = [f"data={paths.forget_corpus}", f"forget_task={paths.forget_mcq}", f"retain_task={paths.retain_mcq}",
             f"benign_data={paths.retain_corpus}"]
    cfg = load_config(TamperConfig, preset=opts.tamper_preset, overrides=world + list(opts.tamper_overrides))
    out = _fresh(opts.out / "tamper", "tamper")
    unlearned = opts.out / "unlearn" / "model"
    attacked: list[tuple] = []

    def load():
        attacked.append(load_model(str(unlearned), dtype="fp32"))
        return attacked[-1]

    def base():
        return load_model(str(paths.model), dtype="fp32")

    result = tamper({opts.unlearn_preset: load}, cfg, out, baseline=baseline, base=base, progress=opts.progress)
    return result, attacked[0]


def _audit_options():
    """The demo's audit: cloze prompts (the demo's metric), 5 folds, seed 0."""
    from sequnlearn.audit import AuditOptions

    return AuditOptions(style="cloze")


def _audit(opts: DemoOptions, paths, run: RunDir, attack: dict | None, attacked: tuple | None,
           phases: list[dict]) -> dict:
    """Knowledge audit of the base, unlearned and attacked models into ``run``: audit.json/md/png."""
    from sequnlearn.audit import AuditModel, run_audit, run_target_layers, write_audit
    from sequnlearn.data.mcq import load_task
    from sequnlearn.model.load import load_model

    tasks = {"forget": load_task(str(paths.forget_mcq)), "retain": load_task(str(paths.retain_mcq))}
    models = [AuditModel("base", lambda: load_model(str(paths.model), dtype="fp32"), str(paths.model)),
              AuditModel(opts.unlearn_preset, lambda: load_model(str(run.model), dtype="fp32"), str(run.model),
                         run_target_layers(run.root))]
    if attacked is not None:
        run_cfg = attack["config"]
        models.append(AuditModel("attacked", lambda: attacked, f"{run.model} after {run_cfg['steps']} steps of the "
                                 f"tampering attack (lr {attack['runs'][0]['lr']:g}, {opts.out / 'tamper'})"))
    result = run_audit(models, tasks, _audit_options(), progress=False)
    result["phases"] = phases
    write_audit(result, run.root)
    return result


def run_demo(opts: DemoOptions) -> dict:
    """Run the pipeline; returns (and writes) ``summary.json``."""
    from sequnlearn.data.mcq import load_task
    from sequnlearn.model.load import load_model
    from sequnlearn.toyworld import build_world

    t0 = time.time()
    opts.out.mkdir(parents=True, exist_ok=True)
    _say(opts, f"1/7 toy world in {opts.world_dir}")
    paths = build_world(opts.world_dir, opts.world_config, progress=opts.progress)
    tasks = {"forget": load_task(str(paths.forget_mcq)), "retain": load_task(str(paths.retain_mcq))}
    _say(opts, "2/7 evaluating the base model")
    baseline, letter_base = _both_styles(*load_model(str(paths.model), dtype="fp32"), tasks)
    _say(opts, f"base model: forget {baseline['forget_acc']:.3f}  retain {baseline['retain_acc']:.3f}")
    _say(opts, f"3/7 unlearning with preset {opts.unlearn_preset}")
    run, phases, phase_audits = _unlearn(opts, paths, tasks)
    _say(opts, "4/7 evaluating the unlearned model")
    unlearned, letter_after = _both_styles(*load_model(str(run.model), dtype="fp32"), tasks)
    write_json(run.eval, {"metric": METRIC, **unlearned, "letter": letter_after})
    _say(opts, "5/7 tampering attack")
    attack, attacked = _tamper(opts, paths, baseline["forget_acc"])
    _say(opts, "6/7 knowledge audit: probes and logit lens per layer")
    audit = _audit(opts, paths, run, attack, attacked, phase_audits)
    summary = {"baseline": baseline, "unlearned": unlearned, "metric": METRIC, "phases": phases,
               "letter": {"baseline": letter_base, "unlearned": letter_after},
               "tamper": _curve(attack["runs"][0]) if attack else None,
               "tamper_controls": _controls(attack) if attack else None,
               "audit": str(run.root / "audit.json"), "audit_wall_s": audit["wall_s"],
               "world": str(paths.root), "world_model": _world_model(paths), "unlearn_run": str(run.root),
               "wall_s": None}
    _say(opts, "7/7 report")
    write_demo_report(opts.out, summary, read_jsonl(run.metrics))
    summary["wall_s"] = round(time.time() - t0, 1)
    write_json(opts.out / "summary.json", summary)
    _say(opts, f"done in {summary['wall_s']:.0f}s: {opts.out / 'report.md'}")
    return summary


def _curve(run: dict) -> list[dict]:
    """An attack's curve as the summary keeps it: step, forget and retain accuracy."""
    return [{k: p[k] for k in ("step", "forget_acc", "retain_acc") if k in p} for p in run["curve"]]


def _controls(attack: dict) -> dict:
    """The first curve of each control the attack ran, by role (``base``, ``retain-tuned``, ``benign``)."""
    out: dict[str, list[dict]] = {}
    for run in attack["runs"]:
        if run["role"] != "attack":
            out.setdefault(run["role"], _curve(run))
    return out


def _world_model(paths) -> dict:
    """Where the world's base model came from: shipped copy or pretrained here, seed, threads, weights hash."""
    from sequnlearn.toyworld import load_world_info

    info = load_world_info(paths.root)
    return {"source": info.get("model_source"), "seed": info["seed"], "pretrain_threads": info.get("pretrain_threads"),
            "weights_sha256": (info.get("model_sha256") or {}).get("model.safetensors")}


def write_demo_report(out: Path, summary: dict, metrics: list[dict]) -> None:
    """``report.md`` with the reference-style table, and the PNG plots it shows."""
    from sequnlearn.plots import plot_losses, plot_phase_accuracy

    b, u = summary["baseline"], summary["unlearned"]
    points = [{"label": "base", **b}] + summary["phases"]
    plot_phase_accuracy(points, out / "accuracy_per_phase.png", chance=0.25)  # 4-way MCQs, as the table says
    plot_losses(metrics, out / "losses.png")
    lines = ["# Toy-world demo: sequential back-to-front unlearning", "",
             "Cloze accuracy on the toy world's MCQ sets (forget = invented pathogens, the WMDP-Bio stand-in; "
             "retain = invented cities, the MMLU stand-in). Random chance: 0.25.", "",
             "| Model | Forget acc | Retain acc | Notes |", "|---|---|---|---|",
             f"| Base | {b['forget_acc']:.4f} | {b['retain_acc']:.4f} | |",
             f"| Unlearned ({summary['unlearn_run']}) | {u['forget_acc']:.4f} | {u['retain_acc']:.4f} | "
             f"{_note(b, u)} |", "| Random chance | 0.2500 | 0.2500 | |", ""]
    if summary.get("letter"):
        lb, lu = summary["letter"]["baseline"], summary["letter"]["unlearned"]
        lines += ["Letter format (lm-eval's WMDP/MMLU template: the lettered choices, then `Answer:` scored on "
                  "\" A\"..\" D\"):", "", "| Model | Forget acc | Retain acc | Notes |", "|---|---|---|---|",
                  f"| Base | {lb['forget_acc']:.4f} | {lb['retain_acc']:.4f} | |",
                  f"| Unlearned | {lu['forget_acc']:.4f} | {lu['retain_acc']:.4f} | {_note(lb, lu)} |", ""]
        if lb["forget_acc"] < LETTER_USEFUL:
            lines += ["The base model answers this format near chance, so only cloze accuracy can show the removal.", ""]
    lines += ["## After each phase", "", "| Phase | Layer | Forget acc | Retain acc |", "|---|---|---|---|"]
    lines += [f"| {p['phase'] + 1} | {p['layer']} | {p['forget_acc']:.4f} | {p['retain_acc']:.4f} |"
              for p in summary["phases"]]
    lines += ["", "![accuracy per phase](accuracy_per_phase.png)", "", "![losses](losses.png)", ""]
    if summary["tamper"]:
        note = controls_note(summary["tamper_controls"] or {})
        lines += ["## Tampering attack", "", note, "", (out / "tamper" / "tamper.md").read_text(), "",
                  "![tamper](tamper/tamper.png)", ""]
    if summary.get("audit"):
        from sequnlearn.audit import audit_markdown
        from sequnlearn.runs import read_json

        audit_dir = Path(summary["audit"]).parent
        lines += ["## Knowledge audit: where the forget answers survive", "",
                  audit_markdown(read_json(Path(summary["audit"]))),
                  f"![knowledge audit]({audit_dir.relative_to(out)}/audit.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


CONTROL_NOTES = {
    "base": "*base (before unlearning)* is the relearning baseline (a model that knows the answers)",
    "retain-tuned": ("*base + benign fine-tune* is the model before unlearning after as many steps on the retain "
                     "corpus, then attacked"),
    "benign": ("*on benign text* fine-tunes the unlearned model on the retain corpus instead (does any fine-tune "
               "bring the answers back?)"),
}
"""What each tamper control is, for the report (in this order)."""


def controls_note(controls) -> str:
    """The report's sentence on the attack and the controls it ran."""
    run = [CONTROL_NOTES[c] for c in CONTROL_NOTES if c in controls]
    return "The attack fine-tunes on the forget corpus." + (" Its controls, same settings: " + "; ".join(run) + "."
                                                            if run else "")


def _note(base: dict, after: dict) -> str:
    notes = []
    if after["forget_acc"] < 0.25:
        notes.append("below random (0.25)")
    drop = base["retain_acc"] - after["retain_acc"]
    notes.append(f"retain {'-' if drop >= 0 else '+'}{abs(drop):.3f}")
    return "; ".join(notes)


def full_overrides() -> tuple[list[str], list[str]]:
    """Unlearning and tamper overrides of the full demo: the attack without the ``retain-tuned``
    control, whose 100 extra steps would take ``make demo`` past 6 minutes on 2 cores (``make
    findings`` runs it)."""
    return [], ["controls=[base, benign]"]


def reduced_overrides() -> tuple[list[str], list[str]]:
    """Unlearning and tamper overrides that fit :meth:`ToyWorldConfig.reduced` (4 layers, 48 documents)."""
    unlearn = ["num_train_examples=48", "epochs_per_layer=2", "layers=[3, 2]", "per_device_batch_size=8", "global_batch_size=8"]
    tamper = ["steps=10", "eval_every=5"]
    return unlearn, tamper
