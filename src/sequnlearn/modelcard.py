"""``model/README.md``: a Hugging Face model card for a finished run.

It says what was unlearned (corpora and their fingerprints), how (method and resolved config),
from which base model, what the model scored (``eval.json``) and what the tampering attack found
(``tamper_summary.json``, written by ``sequnlearn tamper``), with a warning that unlearning is not
proven to survive fine-tuning. It is rebuilt from the run's files whenever one of them changes
(end of ``unlearn``, ``eval``, ``tamper``, a sweep point's evaluation).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from sequnlearn.runs import RunDir, atomic_write_text, read_json

CHANCE_MARGIN = 0.02
"""An accuracy this close to chance (or within two standard errors) is shown as at chance."""
TAGS = ["sequnlearn", "unlearning", "machine-unlearning", "lora"]
WARNING = ("**Unlearning is not proven safe.** Accuracy at chance on a benchmark does not show that the "
           "knowledge is gone: a short fine-tuning on related text can bring it back (see the tampering "
           "attack below, or run `sequnlearn tamper`). Do not treat this model as safe to release because "
           "it was unlearned.")


def tamper_summary_path(run: RunDir) -> Path:
    """Where ``sequnlearn tamper`` records its result for a run's model."""
    return run.root / "tamper_summary.json"


def _optional(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _metadata(cfg: dict) -> dict:
    tags = [t if t != "lora" or cfg.get("method", "lora") == "lora" else "full-parameter" for t in TAGS]
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if _is_hub_id(str(cfg.get("model", ""))):
        meta["base_model"] = cfg["model"]
    if _is_hub_id(str(cfg.get("forget_data", ""))):
        meta["datasets"] = [cfg["forget_data"]]
    return meta


def _corpus_line(kind: str, cfg: dict, prov: dict) -> str:
    fp = (prov.get("data") or {}).get(kind)
    where = f"`{cfg.get(f'{kind}_data')}`"
    if cfg.get(f"{kind}_subset"):
        where += f" (config `{cfg[f'{kind}_subset']}`)"
    line = f"- {kind} corpus: {where}, split `{cfg.get(f'{kind}_split')}`, fields {cfg.get(f'{kind}_fields')}"
    if fp:
        line += (f"; {fp['documents']} documents, {fp['tokens']} tokens (token ids SHA-256 "
                 f"`{fp['token_ids_sha256'][:16]}…`)")
    return line


def _keywords_line(prov: dict) -> list[str]:
    """The line saying which forget tokens a keyword list chose (``forget_keywords``); none without one."""
    c = ((prov.get("corpora") or {}).get("forget") or {})
    if c.get("keyword_list") is None:
        return []
    return [f"- forget loss on keyword tokens only: `{c['keyword_list']}` chose {c.get('keyword_masked_tokens')} "
            f"tokens ({100 * (c.get('keyword_masked_share') or 0):.1f}% of the forget tokens); "
            f"{c.get('keyword_unmatched')} of {c.get('used')} forget examples had no match and added nothing"]


def _method(cfg: dict, prov: dict | None = None) -> list[str]:
    from sequnlearn.config import stored_target_layers

    layers = (prov or {}).get("target_layers") or stored_target_layers(cfg)  # the engine records them
    full = cfg.get("method", "lora") == "full"
    kept = f" and the maintained blocks {cfg['maintained_layers']}" if cfg.get("maintained_layers") else ""
    trained = (f"decoder block L{kept} is trained (full-parameter: every other weight is the base model's)" if full
               else "the model up to L (LoRA on) is trained")
    opt = ("Muon for the block matrices with AdamW for the rest," if cfg.get("optimizer") == "muon" else "AdamW")
    how = (f"{opt} lr {cfg.get('lr')}" if full else f"One LoRA adapter (r={cfg.get('lora_r')}, alpha="
           f"{cfg.get('lora_alpha')}, targets `{cfg.get('target_modules')}`), {opt} lr {cfg.get('lr')}")
    return [
        f"Sequential back-to-front unlearning with sequnlearn over layers {layers} "
        f"(deepest first): for each layer L {trained} so that the "
        f"{'current' if cfg.get('forget_suffix') == 'current' else 'original'} "
        "model's layers after L read out noise on the forget text "
        f"(`{cfg.get('forget_loss')}`, coefficient {cfg.get('remove_coef')}), while a `{cfg.get('retain_loss')}` "
        f"retain loss (coefficient {cfg.get('retain_coef')}) keeps it close to the original on the retain text. "
        f"{how}, {_per_layer(cfg, prov)}, global batch {cfg.get('global_batch_size')}, max length {cfg.get('max_length')}; "
        + ("these are the trained weights themselves." if full else "the adapter is merged into these weights."),
    ]


def _per_layer(cfg: dict, prov: dict | None) -> str:
    """What each phase trained on: its examples, or its optimizer steps where a schedule sets them
    (``steps_per_layer``, ``deep_layer_step_scale``: the steps the engine recorded in provenance.json)."""
    steps = (prov or {}).get("phase_steps")
    scaled = cfg.get("steps_per_layer") is not None or (cfg.get("deep_layer_step_scale") or 1) != 1
    if scaled and steps:
        return f"optimizer steps per layer {steps}"
    return f"{_examples(cfg, prov)} examples per layer"


def _examples(cfg: dict, prov: dict | None) -> str:
    """The forget examples a phase trained on (provenance.json; what was asked for when fewer were there)."""
    used = (((prov or {}).get("data") or {}).get("forget") or {}).get("documents", cfg.get("num_train_examples"))
    asked = cfg.get("num_train_examples")
    if used == asked or asked is None:
        return str(used)
    return f"{used} (of num_train_examples {asked}: the corpus had no more)"


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


def _chance(name: str, entry: dict, ev: dict) -> float | None:
    """A task's chance level: its entry's (``sequnlearn eval``), else the headline's for that task (sweep, demo)."""
    if entry.get("chance") is not None:
        return entry["chance"]
    role = next((r for r in ("forget", "retain") if ev.get(f"{r}_task") == name or r == name), None)
    return ev.get(f"{role}_chance") if role else None


def versus_chance(acc: Any, chance: float | None, stderr: float | None) -> str:
    """How an accuracy compares with chance: ``at chance`` within two standard errors (at least
    :data:`CHANCE_MARGIN`), else ``above chance`` / ``below chance``; ``not finite`` for a broken score."""
    if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not math.isfinite(acc):
        return "not finite: a broken model" if acc is not None else "-"
    if chance is None:
        return "-"
    if abs(acc - chance) <= max(2 * (stderr or 0.0), CHANCE_MARGIN):
        return "at chance"
    return "above chance" if acc > chance else "below chance"


def _eval_table(ev: dict) -> list[str]:
    """The evaluation section: one row per task of ``eval.json`` with its scoring, chance level and
    how its accuracy compares with chance."""
    from sequnlearn.results import describe, with_settings

    tasks = {n: t for n, t in (with_settings(ev).get("tasks") or {}).items() if isinstance(t, dict)}
    rows = [(name, describe(t), t.get("n"), t.get("acc"), t.get("acc_stderr"), _chance(name, t, ev))
            for name, t in tasks.items()]
    if not rows:  # a file with headline accuracies only
        style = ev.get("style") or ev.get("metric") or "letter"
        rows = [(k[:-4], style, None, v, None, _chance(k[:-4], {}, ev)) for k, v in ev.items() if k.endswith("_acc")]
    lines = ["Multiple-choice accuracy (`eval.json`); chance is the accuracy of guessing at random, and an "
             "accuracy within two standard errors of it counts as at chance:", "",
             "| task | n | acc | ± stderr | chance | vs chance | scoring |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(n)} | {_fmt(acc)} | {_fmt(se)} | {_fmt(chance)} | {versus_chance(acc, chance, se)} "
              f"| {how} |" for name, how, n, acc, se, chance in rows]
    return lines


def _skipped_warning(prov: dict) -> list[str]:
    """A warning paragraph when the run skipped micro-batches as non-finite (``on_nan: skip``)."""
    n = prov.get("nan_skipped") or 0
    if not n:
        return []
    batches = f"{n} training micro-batch gave a non-finite loss or gradient and was" if n == 1 else \
        f"{n} training micro-batches gave a non-finite loss or gradient and were"
    return [f"> **Warning: {batches} skipped** (`on_nan: skip`). The run partly diverged: scores near chance "
            "may show a damaged model rather than unlearning. Check `metrics.jsonl`, and consider a lower lr or "
            "lower coefficients.", ""]


def _tamper(t: dict) -> list[str]:
    w = t.get("worst_case") or {}
    lines = [f"`sequnlearn tamper` fine-tuned this model on `{t.get('data')}` for {t.get('steps')} steps "
             f"(learning rates {t.get('lrs')}, seeds {t.get('seeds')}); the forget accuracy "
             f"(`{t.get('forget_task')}`, chance {_fmt(t.get('chance'))}) went from {_fmt(t.get('start_acc'))} to "
             f"at most **{_fmt(w.get('forget_acc'))}** (lr {w.get('lr')}, step {w.get('step')})."]
    if t.get("baseline") is not None:
        lines.append(f"Before unlearning the model scored {_fmt(t['baseline'])}.")
    return lines + [f"Full result: `{t.get('out')}`."]


def model_card(run: RunDir) -> str:
    """The card of a finished run, built from its config, provenance, ``eval.json`` and tamper summary."""
    cfg = run.stored_config()
    prov = _optional(run.provenance) or {}
    ev, tamper = _optional(run.eval), _optional(tamper_summary_path(run))
    src = prov.get("sequnlearn") or {}
    body = [f"# {run.name}", "",
            f"`{cfg.get('model')}` with knowledge of its forget corpus removed by sequnlearn "
            f"{src.get('version', '')} (sequential back-to-front unlearning).", "", "> " + WARNING, "",
            *_skipped_warning(prov),
            "## What was unlearned", "", _corpus_line("forget", cfg, prov), *_keywords_line(prov),
            _corpus_line("retain", cfg, prov), "",
            "## Method", "", *_method(cfg, prov), "", "## Evaluation", "",
            *(_eval_table(ev) if ev else ["Not evaluated yet: run `sequnlearn eval` on the run directory."]), "",
            "## Tampering attack", "",
            *(_tamper(tamper) if tamper else ["Not attacked yet: run `sequnlearn tamper` on the run directory."]), "",
            "## Provenance", "",
            f"- sequnlearn {src.get('version')} ({src.get('source')}"
            + (f", commit `{src['git_commit']}`{' (dirty)' if src.get('git_dirty') else ''}" if src.get("git_commit") else "")
            + ")",
            f"- config SHA-256 `{prov.get('config_sha256')}`; run {prov.get('start_time')} → {prov.get('end_time')}",
            "", "<details><summary>Resolved config</summary>", "", "```yaml",
            yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    meta = yaml.safe_dump(_metadata(cfg), sort_keys=False)
    return f"---\n{meta}---\n\n" + "\n".join(body)


def write_model_card(run: RunDir) -> Path | None:
    """Write ``model/README.md`` of a finished run (atomically); ``None`` when the run is not finished."""
    if not run.is_finished():
        return None
    path = run.model / "README.md"
    atomic_write_text(path, model_card(run))
    return path


def record_tamper(run: RunDir, label: str, result: dict, out: Path) -> None:
    """Keep what ``sequnlearn tamper`` found for ``run``'s model (``label`` in ``result``) and rebuild its card."""
    from sequnlearn.runs import write_json
    from sequnlearn.tamper.result import worst_case

    cfg, mine = result["config"], [r for r in result["runs"] if r["model"] == label]
    if not mine:
        return
    write_json(tamper_summary_path(run), {
        "out": str(out), "data": cfg["data"], "steps": cfg["steps"], "lrs": cfg["lrs"], "seeds": cfg["seeds"],
        "forget_task": cfg["forget_task"], "chance": result["chance"], "baseline": result["baseline"],
        "start_acc": mine[0]["curve"][0]["forget_acc"], "worst_case": worst_case(mine)})
    write_model_card(run)
