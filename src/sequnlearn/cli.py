"""Command line: parse → config → call. Nothing else lives here.

Every subcommand has an ``_add_<name>(sub)`` that declares its arguments and a
``cmd_<name>(args)`` that wires config, loading and the call. A :class:`UserError`
anywhere becomes one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sequnlearn.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The ``sequnlearn`` parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="sequnlearn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_unlearn, _add_tamper, _add_sweep, _add_report, _add_eval, _add_audit, _add_toyworld, _add_demo,
                _add_tasks_path):
        add(sub)
    return parser


DESCRIPTION = """\
Remove hazardous knowledge (e.g. WMDP-Bio) from an open-weight causal language model with
sequential back-to-front unlearning, measure what it still knows, and attack the removal
with fine-tuning to see whether it holds."""

EPILOG = """\
examples:
  sequnlearn demo --reduced                                 the whole pipeline on a toy world (a minute, CPU)
  sequnlearn unlearn --preset deep-ignorance-l2 --out runs/l2
  sequnlearn eval runs/l2 --tasks wmdp_bio_robust,mmlu
  sequnlearn tamper runs/l2 --lr 2e-5 --out runs/l2-tamper
  lm_eval --include_path "$(sequnlearn tasks-path)" --tasks wmdp_bio_robust_sequnlearn ...

Every command answers bad input with one line and exit code 2 and writes nothing.
`sequnlearn COMMAND --help` lists a command's options."""


def _version() -> str:
    from sequnlearn import __version__

    return __version__


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sequnlearn`` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the command that resumes an interrupted one
    try:
        args.func(args)
    except UserError as e:
        print(f"sequnlearn {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # commands with something to resume say so themselves
        again = " (run the same command again: finished points are kept, an interrupted one resumes)" \
            if args.command == "sweep" else ""
        print(f"\nsequnlearn {args.command}: interrupted{again}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `sequnlearn report ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        sys.exit(0)
    _end_process_group()


def _end_process_group() -> None:
    """Under ``accelerate launch``/``torchrun``: leave the process group once the command is done."""
    from sequnlearn.distributed import Process

    Process.current().end()


# ---------------------------------------------------------------- unlearn


def _add_unlearn(sub) -> None:
    p = sub.add_parser("unlearn", help="sequential back-to-front unlearning of a causal LM")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a shipped preset: tiny, deep-ignorance-l2, deep-ignorance-kl, ...")
    src.add_argument("--config", help="a YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set remove_coef=20")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--report-to", choices=["tensorboard", "wandb"], help="also log through accelerate's trackers")
    p.add_argument("--on-nan", choices=["stop", "skip"], help="on a non-finite loss or gradient: stop (default) or skip that batch "
                   "or step (counted and reported; a model with non-finite weights is never written)")
    p.set_defaults(func=cmd_unlearn)


def cmd_unlearn(args) -> None:
    from pathlib import Path

    from sequnlearn.config import UnlearnConfig, check_preset_needs, load_config
    from sequnlearn.runs import RunDir, read_json

    overrides = list(args.set)
    if args.report_to:
        overrides.append(f"report_to={args.report_to}")
    if args.on_nan:
        overrides.append(f"on_nan={args.on_nan}")
    cfg = load_config(UnlearnConfig, preset=args.preset, config_file=args.config, overrides=overrides)
    if args.preset:
        check_preset_needs(args.preset, cfg)  # a value the preset cannot ship (a keyword list): before any file
    out = Path(args.out)
    if args.resume and RunDir(out).is_finished():
        from sequnlearn.unlearn.engine import check_resume

        check_resume(cfg, RunDir(out))  # another config is an error, not "nothing to do"
        print(f"{out} is a finished run (its model/ is written); nothing to resume, nothing changed")
        return
    proc = _processes()
    inputs = (cfg.model, cfg.forget_data, cfg.retain_data)
    _check_out_on_main(proc, args.out, resume=args.resume, overwrite=args.overwrite, inputs=inputs)
    from sequnlearn.runs import is_replacement, replacing
    from sequnlearn.unlearn.engine import unlearn

    replace = args.overwrite and not args.resume and is_replacement(out)
    try:
        if replace:  # built beside the old run, which stays as it is until the new one is done
            with replacing(out, main=proc.is_main) as stage:
                unlearn(cfg, RunDir(stage, final=out), proc=proc)
        else:
            unlearn(cfg, RunDir(out), resume=args.resume, proc=proc)
    except KeyboardInterrupt:
        what = (f"the previous run in {out} is as it was" if replace else
                f"continue with: sequnlearn unlearn {_source_args(args)} --out {args.out} --resume"
                if RunDir(out).is_run() else "the run had not started; nothing was written")
        print(f"\ninterrupted; {what}", file=sys.stderr)
        sys.exit(130)
    if proc.is_main:
        skipped = read_json(RunDir(out).provenance).get("nan_skipped") or 0
        print(f"unlearned model: {RunDir(out).model}"
              + (f" ({skipped} micro-batches skipped as non-finite, on_nan: skip: see the warning above)" if skipped else ""))


def _source_args(args) -> str:
    parts = [f"--preset {args.preset}" if args.preset else f"--config {args.config}"]
    parts += [f"--set {s}" for s in args.set]
    return " ".join(parts)


# ---------------------------------------------------------------- eval


def _add_eval(sub) -> None:
    from sequnlearn.config import STYLES

    p = sub.add_parser("eval", help="multiple-choice evaluation: WMDP-Bio-Robust, WMDP-Bio, MMLU, local MCQ files")
    p.add_argument("model", metavar="MODEL_OR_RUN_DIR", help="hub id, HF model directory, or a run directory (its model/)")
    p.add_argument("--tasks", help="comma-separated: wmdp_bio_robust, wmdp_bio, mmlu, or MCQ file paths")
    p.add_argument("--backend", choices=["fast", "lm-eval"], default="fast",
                   help="fast: one forward per question (default); lm-eval: lm_eval.simple_evaluate")
    p.add_argument("--style", choices=STYLES, default="letter",
                   help='letter: score " A".." D" (default); cloze: score each choice text (adds acc_norm)')
    p.add_argument("--limit", type=int, help="first N questions of each subtask (as lm-eval --limit)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--num-fewshot", type=int, default=0, help="k-shot examples (MMLU: dev split, first k)")
    p.add_argument("--data", metavar="FILE", help="a local MCQ file of forget questions (.jsonl/.json/.parquet: "
                   "question, choices, answer)")
    p.add_argument("--retain-data", metavar="FILE", help="a local MCQ file of retain questions (the report's retain "
                   "accuracy)")
    p.add_argument("--data-dir", metavar="DIR", help="offline copies of the hub tasks (default $SEQUNLEARN_DATA_DIR)")
    p.add_argument("--out", metavar="FILE", help="results JSON (default RUN_DIR/eval.json; required for a model that "
                   "is not a run); results of other tasks already in it are kept")
    p.add_argument("--overwrite", action="store_true", help="replace the results of tasks --out already has (the "
                   "others are kept), or an --out that holds no results of this model")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> None:
    """Evaluate a model or run directory on MCQ tasks; print the table and merge the results into eval.json.

    Everything is checked before the model is loaded: where to write, and that no task already in it is
    replaced without ``--overwrite``. Ctrl-C writes nothing.
    """
    from sequnlearn.eval import check_options, format_table, load_tasks, parse_tasks
    from sequnlearn.model.load import resolve_device
    from sequnlearn.results import check_new_tasks, destination, existing, run_stamp, write_results

    check_options(args.backend, args.style, args.limit, args.batch_size, args.num_fewshot)
    if args.data and args.data == args.retain_data:
        raise UserError(f"{args.data} is given as both --data (forget) and --retain-data (retain); give it once")
    names = parse_tasks([t for t in (args.tasks or "").split(",")] + [f for f in (args.data, args.retain_data) if f])
    resolve_device(args.device)
    out, home = destination(args.model, args.out)
    try:
        tasks = load_tasks(names, data_dir=args.data_dir, num_fewshot=args.num_fewshot)
        check_new_tasks(existing(out, args.model, home, args.overwrite), [t.name for t in tasks], out, args.overwrite)
        before = run_stamp(home)
        results = _evaluate(args, tasks)
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    print(format_table(results))
    roles = {t.name: "retain" if n == args.retain_data else "forget" if n == args.data else None
             for n, t in zip(names, tasks)}
    write_results(out, args.model, home, tasks, roles, results, overwrite=args.overwrite, stamp=before)
    print(f"wrote {out}")
    _update_card(args.model, out)


def _update_card(model: str, eval_out: Path) -> None:
    """Rebuild the model card of a finished run whose ``eval.json`` was just written."""
    from sequnlearn.modelcard import write_model_card
    from sequnlearn.runs import run_of_model

    run = run_of_model(model)
    if run is not None and eval_out.resolve() == run.eval.resolve():
        write_model_card(run)


def _evaluate(args, tasks: list) -> dict:
    """Load ``args.model`` and evaluate it on ``tasks`` with the command's options."""
    from sequnlearn.eval import evaluate
    from sequnlearn.model.load import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    return evaluate(model, tokenizer, tasks, backend=args.backend, style=args.style, limit=args.limit,
                    batch_size=args.batch_size, num_fewshot=args.num_fewshot)


# ---------------------------------------------------------------- tamper


def _add_tamper(sub) -> None:
    from sequnlearn.config import STYLES

    p = sub.add_parser("tamper", help="fine-tuning attack: how fast does forget accuracy come back?")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_RUN_DIR", help="one or more models (overlaid in the plot)")
    p.add_argument("--preset", help="a tamper preset (e.g. toy-tamper)")
    p.add_argument("--config", help="a YAML tamper config file")
    p.add_argument("--data", help="attack corpus: hub id or local file (default: the forget corpus)")
    p.add_argument("--tasks", help="forget evaluation task (default wmdp_bio_robust)")
    p.add_argument("--eval-data", help="forget evaluation MCQ file (instead of --tasks)")
    p.add_argument("--retain-task", help="also evaluate this retain task or MCQ file")
    p.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    p.add_argument("--eval-every", type=int, help="evaluate every k steps (default 10)")
    p.add_argument("--lr", help="learning rate(s), comma-separated (default 2e-5)")
    p.add_argument("--seeds", help="seed(s), comma-separated (default 42)")
    p.add_argument("--style", choices=STYLES, help="evaluation scoring style")
    p.add_argument("--baseline", type=float, help="forget accuracy before unlearning (plotted)")
    p.add_argument("--controls", help="comparison attacks, comma-separated: base (the relearning baseline: the "
                   "model before unlearning), retain-tuned (it after the same fine-tune on benign text), benign "
                   "(each model fine-tuned on benign text instead), no-answer (each model fine-tuned on --no-answer-data: "
                   "text about the same subjects without the scored answers)")
    p.add_argument("--base-model", help="the model before unlearning, for the base / retain-tuned controls "
                   "(default: the attacked run's model)")
    p.add_argument("--benign-data", help="benign corpus of the controls (default: the attacked run's retain corpus)")
    p.add_argument("--no-answer-data", help="corpus of the no-answer control (the toy world's "
                   "corpus/forget_no_answers.jsonl)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any tamper config key")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="directory for tamper.json, tamper.png, tamper.md")
    p.add_argument("--overwrite", action="store_true", help="replace the tamper result in --out (kept until the "
                   "new one is done)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted attack in --out: its finished "
                   "attacks are kept, the rest run")
    p.set_defaults(func=cmd_tamper)


def cmd_tamper(args) -> None:
    from sequnlearn.config import TamperConfig, load_config
    from sequnlearn.model.load import inspect_model, load_model, model_source, resolve_device
    from sequnlearn.runs import model_label
    from sequnlearn.tamper import previous_result, tamper

    run_cfg = _first_run_config(args.models)
    flags = {"data": args.data, "forget_task": args.eval_data or args.tasks, "retain_task": args.retain_task,
             "steps": args.steps, "eval_every": args.eval_every, "eval_style": args.style,
             "lrs": _csv(args.lr), "seeds": _csv(args.seeds), "controls": _csv(args.controls),
             "benign_data": args.benign_data, "no_answer_data": args.no_answer_data}
    if args.controls and not args.benign_data and run_cfg.get("retain_data"):  # the run's retain corpus
        flags.update(benign_data=run_cfg["retain_data"], benign_subset=run_cfg.get("retain_subset"),
                     benign_fields=_csv(",".join(run_cfg.get("retain_fields") or ["text"])))
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.set)
    cfg = load_config(TamperConfig, preset=args.preset, config_file=args.config, overrides=overrides)
    sources = {model_label(m): model_source(m) for m in args.models}
    base_src = args.base_model or run_cfg.get("model")
    needs_base = base_src is not None and {"base", "retain-tuned"} & set(cfg.controls)
    for src in [*sources.values(), *([base_src] if needs_base else [])]:
        inspect_model(src, max_length=cfg.max_length)
    resolve_device(args.device)
    out = Path(args.out)
    inputs = [*sources.values(), base_src, cfg.data, cfg.forget_task, cfg.retain_task, cfg.benign_data,
              cfg.no_answer_data]
    proc = _processes()  # under `accelerate launch`: one slice of each batch per process
    _check_out_on_main(proc, args.out, resume=args.resume, overwrite=args.overwrite, kind="tamper", inputs=inputs)
    previous = previous_result(out, list(sources), cfg) if args.resume else None
    if args.resume and previous is None:
        print(f"{out} holds a finished tamper result; nothing to resume, nothing changed")
        return
    device = str(proc.device) if args.device == "auto" and proc.world > 1 else args.device
    loaders = {label: (lambda s=src: load_model(s, dtype=cfg.weights_dtype(), device=device))
               for label, src in sources.items()}
    base = (lambda: load_model(base_src, dtype=cfg.weights_dtype(), device=device)) if needs_base else None
    result = _run_tamper(args, out, proc, lambda where: tamper(loaders, cfg, where, baseline=args.baseline, base=base,
                                                               proc=proc, previous=previous))
    if not proc.is_main:
        return
    _record_tamper(args.models, result, out)
    print((out / "tamper.md").read_text(), end="")
    print(f"wrote {out}/tamper.json, tamper.png, tamper.md (worst case {result['worst_case']['forget_acc']:.4f})")


def _run_tamper(args, out: Path, proc, run) -> dict:
    """``run(directory)`` into ``out`` under its lock, or, replacing an earlier result (``--overwrite``),
    into a staging directory swapped in at the end; Ctrl-C is one line with the command that resumes."""
    from sequnlearn.runs import hold_lock, is_replacement, replacing
    from sequnlearn.tamper import TamperInterrupted

    replace = args.overwrite and not args.resume and is_replacement(out)
    try:
        if replace:
            with replacing(out, main=proc.is_main, what="result") as stage:
                return run(stage)
        with hold_lock(out, main=proc.is_main and out.is_dir()):  # a new --out appears with tamper.json
            return run(out)
    except TamperInterrupted as e:
        if replace:
            print(f"\ninterrupted; the previous result in {out} is as it was", file=sys.stderr)
        else:
            argv = shlex.join(a for a in args.argv if a not in ("--overwrite", "--resume"))
            print(f"\ninterrupted after {e.done} of {e.total} attacks (kept in {out}/tamper.json); continue with: "
                  f"sequnlearn {argv} --resume", file=sys.stderr)
        sys.exit(130)


def _first_run_config(models: list[str]) -> dict:
    """The config of the first attacked model that is a finished unlearning run ({} when none is)."""
    from sequnlearn.runs import run_of_model

    for m in models:
        run = run_of_model(m)
        if run is not None and run.config.is_file():
            return run.stored_config()
    return {}


def _record_tamper(models: list[str], result: dict, out: Path) -> None:
    """Each attacked model that is a finished run gets the result in its model card."""
    from sequnlearn.modelcard import record_tamper
    from sequnlearn.runs import model_label, run_of_model

    for m in models:
        run = run_of_model(m)
        if run is not None:
            record_tamper(run, model_label(m), result, out)


def _csv(text: str | None) -> str | None:
    """``1e-5,2e-5`` → ``[1e-5, 2e-5]`` as YAML for a list override."""
    return None if text is None else "[" + text + "]"


# ---------------------------------------------------------------- audit


def _add_audit(sub) -> None:
    from sequnlearn.config import STYLES

    p = sub.add_parser("audit", help="per-layer knowledge audit: linear probes and logit lens on MCQ sets")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_RUN",
                   help="models to compare, the base first (hub id, model directory or run directory)")
    p.add_argument("--data", required=True, metavar="MCQ_FILE",
                   help="forget MCQs: a file or a task name (wmdp_bio_robust, ...)")
    p.add_argument("--retain-data", metavar="MCQ_FILE", help="retain MCQs: a file or a task name (mmlu, ...)")
    p.add_argument("--data-dir", metavar="DIR", help="offline copies of the hub tasks (default $SEQUNLEARN_DATA_DIR)")
    p.add_argument("--style", choices=STYLES, default="letter", help="prompt style (default letter)")
    p.add_argument("--labels", help="comma-separated names of the models (default: their directory names)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the probes (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--l2", type=float, default=1e-2, help="L2 penalty of the probes (default 0.01)")
    p.add_argument("--prior", choices=["lens", "zero"], default="lens",
                   help="the probe's penalty pulls towards the logit lens's weights (default) or zero")
    p.add_argument("--limit", type=int, help="first N questions of each subtask")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    p.add_argument("--features-dir", metavar="DIR", help="keep hidden-state features in float16 memory maps "
                   "there instead of in memory (large models)")
    p.add_argument("--out", help="directory for audit.json/md/png (default: the first run directory given)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args) -> None:
    """Audit the models layer by layer; write audit.json, audit.md, audit.png and print the table."""
    from sequnlearn.audit import AuditModel, AuditOptions, audit_markdown, run_audit, run_target_layers, write_audit
    from sequnlearn.eval import load_tasks
    from sequnlearn.model.load import load_model, model_source
    from sequnlearn.runs import RunDir, model_label

    opts = AuditOptions(style=args.style, folds=args.folds, seed=args.seed, l2=args.l2, prior=args.prior,
                        limit=args.limit, batch_size=args.batch_size, features_dir=args.features_dir)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [model_label(m) for m in args.models]
    if len(labels) != len(args.models):
        raise UserError(f"--labels names {len(labels)} models but {len(args.models)} are given; name each once")
    runs = [m for m in args.models if RunDir(Path(m)).is_run()]
    if args.out is None and not runs:
        raise UserError("none of the models is a run directory; say where to write with --out DIR")
    out = Path(args.out) if args.out else Path(runs[0])
    names = {"forget": args.data, **({"retain": args.retain_data} if args.retain_data else {})}
    tasks = dict(zip(names, load_tasks(list(names.values()), data_dir=args.data_dir)))
    models = [AuditModel(label, (lambda s=model_source(m): load_model(s, dtype=args.dtype, device=args.device)),
                         model_source(m), run_target_layers(m))
              for label, m in zip(labels, args.models)]
    result = run_audit(models, tasks, opts)
    write_audit(result, out)
    print(audit_markdown(result), end="")
    print(f"wrote {out}/audit.json, audit.md, audit.png ({result['wall_s']:.0f}s)")


# ---------------------------------------------------------------- toyworld


def _add_toyworld(sub) -> None:
    p = sub.add_parser("toyworld", help="the synthetic toy world: facts, corpora, MCQs, tokenizer, base model")
    actions = p.add_subparsers(dest="toyworld_action", required=True, metavar="ACTION")
    b = actions.add_parser("build", help="build a toy world into --out (reused when built there with the same config)")
    b.add_argument("--out", required=True, help="directory to build into, e.g. runs/toyworld")
    b.add_argument("--reduced", action="store_true", help="the small test world (seconds) instead of the full one (minutes)")
    b.add_argument("--seed", type=int, help="master seed of facts, corpora, MCQs and model init (default 0)")
    b.add_argument("--steps", type=int, help="pretraining steps (default: the full or reduced config's)")
    b.add_argument("--eval-every", type=int, default=0, metavar="K", help="score the forget and retain MCQs (cloze "
                   "and letter) every K pretraining steps into pretrain_log.jsonl; the weights are the same")
    b.add_argument("--overwrite", action="store_true", help="rebuild when --out holds a world built with another config")
    b.add_argument("--threads", type=int, help="torch CPU threads for pretraining (default: torch's, lowered to "
                   "the idle cores on a busy machine)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a world field (repeatable), e.g. --set paraphrases=2 --set num_layers=6")
    b.add_argument("--pretrain", action="store_true", help="pretrain the model even where the package ships it "
                   "(with the shipped thread count: the bit-exact rebuild; prints whether the bytes match)")
    b.add_argument("--ship", action="store_true", help="maintainers: make the model built here the shipped one")
    b.add_argument("--quiet", action="store_true", help="no stage lines or progress bar on stderr")
    b.set_defaults(func=cmd_toyworld)


def cmd_toyworld(args) -> None:
    """Build (or reuse) a toy world and print where its model, corpora and MCQ sets are."""
    from sequnlearn.toyworld import ToyWorldConfig, build_world, load_world_info

    from sequnlearn.config import parse_override

    overrides = dict(parse_override(item) for item in args.set)
    overrides.update({k: v for k, v in (("seed", args.seed), ("steps", args.steps)) if v is not None})
    config = ToyWorldConfig.reduced(**overrides) if args.reduced else ToyWorldConfig.from_dict(overrides)
    paths = build_world(args.out, config, progress=not args.quiet, overwrite=args.overwrite, threads=args.threads,
                        pretrain=args.pretrain, eval_every=args.eval_every)
    info = load_world_info(paths.root)
    size = "reduced" if args.reduced else "full"
    print(f"toy world ({size}, seed {config.seed}) in {paths.root}: {info['model_parameters']:,}-parameter "
          f"GPT-NeoX, {config.steps} pretraining steps on {info['pretrain_threads']} thread(s), final loss "
          f"{info['final_pretrain_loss']:.3f}, {info.get('model_source', 'pretrained')} model, "
          f"built in {info['build_seconds']:.0f}s")
    _toyworld_shipped_check(paths, info, args.ship)
    for label, path in (("model + tokenizer", paths.model), ("forget corpus", paths.forget_corpus),
                        ("retain corpus", paths.retain_corpus), ("forget MCQs", paths.forget_mcq),
                        ("retain MCQs", paths.retain_mcq), ("facts", paths.facts),
                        ("forget keywords", paths.forget_keywords)):
        print(f"  {label + ':':18} {path}")


def _toyworld_shipped_check(paths, info: dict, ship: bool) -> None:
    """Say whether a pretrained world's model equals the shipped one byte for byte; ship it if asked."""
    from sequnlearn.toyworld.build import WORLD_FORMAT
    from sequnlearn.toyworld.config import ToyWorldConfig
    from sequnlearn.toyworld.shipped import shipped_info, ship as ship_model

    shipped = shipped_info()
    if info.get("model_source") == "pretrained" and shipped and not ToyWorldConfig.from_dict(info["config"]).differences(
            shipped.get("config")):
        same = shipped.get("sha256") == info.get("model_sha256") and shipped.get("format") == WORLD_FORMAT
        print(f"  shipped model:     {'identical (bit for bit)' if same else 'DIFFERENT bytes from'} the shipped one "
              f"(shipped: {shipped.get('pretrain_threads')} thread(s), torch {shipped.get('torch_version')})")
    if ship:
        if info.get("model_source") != "pretrained" or ToyWorldConfig().differences(info["config"]):
            raise UserError("--ship needs the default (full) world pretrained here: add --pretrain, drop --set/--reduced")
        ship_model(paths.model, info)
        print("  shipped:           the package's toyworld/pretrained/ now holds this model")


# ---------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the toy world (what `make demo` runs)")
    p.add_argument("--out", default="runs/demo", help="demo directory (report.md, summary.json, plots, runs)")
    p.add_argument("--world", default="runs/toyworld", help="toy world directory (built once, then reused)")
    p.add_argument("--reduced", action="store_true", help="a small world and model: a quick look in about a minute")
    p.add_argument("--preset", default="toy-l2", help="unlearning preset (toy-l2 or toy-kl)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an unlearning config key")
    p.add_argument("--no-tamper", action="store_true", help="skip the tampering attack")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    from pathlib import Path

    from sequnlearn.toyworld import ToyWorldConfig
    from sequnlearn.demo import DemoOptions, full_overrides, reduced_overrides, run_demo

    from sequnlearn.config import TamperConfig, load_config

    world_cfg = ToyWorldConfig.reduced() if args.reduced else ToyWorldConfig()
    unlearn_sets, tamper_sets = reduced_overrides() if args.reduced else full_overrides()
    load_config(preset=args.preset, overrides=unlearn_sets + list(args.set))  # bad input: before any file
    if not args.no_tamper:
        load_config(TamperConfig, preset="toy-tamper", overrides=tamper_sets)
    opts = DemoOptions(out=Path(args.out), world_dir=Path(args.world), world_config=world_cfg,
                       unlearn_preset=args.preset, unlearn_overrides=unlearn_sets + list(args.set),
                       tamper_preset=None if args.no_tamper else "toy-tamper", tamper_overrides=tamper_sets)
    summary = run_demo(opts)
    b, u = summary["baseline"], summary["unlearned"]
    print(f"forget acc {b['forget_acc']:.3f} -> {u['forget_acc']:.3f}   retain acc {b['retain_acc']:.3f} -> "
          f"{u['retain_acc']:.3f}   ({summary['metric']}, {summary['wall_s']:.0f}s)  see {args.out}/report.md")


# ---------------------------------------------------------------- sweep / report


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of unlearning configs, one run directory per point")
    p.add_argument("sweep", metavar="NAME_OR_FILE", help="a shipped sweep (reference-l2, toy-l2, ...) or a YAML file")
    p.add_argument("--dry-run", action="store_true", help="list the points (varied key=value) and change nothing")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--only", type=int, metavar="N", help="run only point N (0-based; for job arrays)")
    only.add_argument("--baseline", action="store_true", help="only evaluate the base model into OUT/NAME/baseline "
                      "(the tables' baseline row; a job array's last task)")
    p.add_argument("--out", default="runs/sweeps", help="parent directory; the sweep writes OUT/NAME/")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: run the points one after another; slurm: write an sbatch job-array script")
    p.add_argument("--accelerate-args", help="with --launcher slurm: run each point under `accelerate launch ARGS`")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> None:
    from pathlib import Path

    from sequnlearn.sweep import load_sweep, run_baseline, run_point, write_slurm

    sweep = load_sweep(args.sweep)
    points = sweep.points()
    out = Path(args.out) / sweep.name
    if args.dry_run:
        for i, point in enumerate(points):
            print(f"{i:3d}  " + "  ".join(f"{k}={v}" for k, v in point.items() if k in sweep.varied() or len(points) == 1))
        print(f"{len(points)} points -> {out}/")
        return
    if args.only is not None and not 0 <= args.only < len(points):
        from sequnlearn.errors import UserError

        raise UserError(f"--only {args.only} is out of range; this sweep has points 0..{len(points) - 1}")
    if args.launcher == "slurm":
        path = write_slurm(sweep, out, args.accelerate_args)
        print(f"wrote {path}; submit it with: sbatch {path}")
        return
    from sequnlearn.sweep import check_inputs

    check_inputs(sweep)  # model and evaluation data, before the first point writes anything
    proc = _processes()  # under `accelerate launch`: the process group, before any point
    for i in [] if args.baseline else [args.only] if args.only is not None else range(len(points)):
        run_point(sweep, i, out, proc)
    if args.only is None:
        run_baseline(sweep, out, proc)
        if proc.is_main:
            done = "baseline evaluated" if args.baseline else "done"
            print(f"sweep {sweep.name} {done}; make the tables with: sequnlearn report {out}")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="tables (markdown, CSV) and plots from run directories",
                       description="report.md and report.csv (a row per run), report_seeds.csv (a row per group "
                                   "of runs that differ only in seed: mean, sd, n), tradeoff.png, "
                                   "forget_vs_remove_coef.png, losses.png, and tamper.png / audit.png when "
                                   "tamper.json / audit.json are found. With several seeds per setting report.md "
                                   "adds an 'Across seeds' table (mean ± sd) and the plots show error bars.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories (searched recursively)")
    p.add_argument("--out", help="where to write (default: the first DIR)")
    p.add_argument("--findings", action="store_true",
                   help="also decide the reference's seven Key Findings from the per-seed files this report "
                        "wrote: findings.md and findings.json")
    p.add_argument("--against", metavar="LABEL",
                   help="also compare every setting with setting LABEL (a run directory's name without its seed=N, "
                        "e.g. forget_loss=random_ce) per scoring style on forget, retain and attacked forget accuracy "
                        "(beyond 2 pooled seed sd, or not distinguishable): comparison.md and comparison.json")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> None:
    from pathlib import Path

    from sequnlearn.report import write_report

    dirs = [Path(d) for d in args.dirs]
    out = Path(args.out) if args.out else dirs[0]
    if args.against:
        from sequnlearn.comparison import check_against

        check_against(dirs, args.against)  # before the report writes anything
    result = write_report(dirs, out)
    if args.findings:
        from sequnlearn.findings import write_findings

        result["files"] += write_findings(out, result["files"])
    if args.against:
        from sequnlearn.comparison import write_comparison

        result["files"] += write_comparison(out, args.against, result["files"])
    print(result["table"], end="")
    found = f"{result['runs']} runs" + (f", {result['tampers']} tamper results" if result["tampers"] else "")
    print(f"{found}; wrote {', '.join(result['files'])} in {args.out or dirs[0]}")


# ---------------------------------------------------------------- tasks-path


def _add_tasks_path(sub) -> None:
    p = sub.add_parser("tasks-path", help="write our lm-eval task YAMLs and print their directory (for stock lm_eval)",
                       description="Write the WMDP-Bio-Robust task definitions (letter: wmdp_bio_robust_sequnlearn, "
                       "cloze: wmdp_bio_robust_sequnlearn_cloze) and print the directory, for "
                       "`lm_eval --include_path DIR --tasks wmdp_bio_robust_sequnlearn ...`.")
    p.add_argument("--data-dir", metavar="DIR", help="use the offline copy DIR/wmdp_bio_robust.jsonl instead of the hub")
    p.add_argument("--out", metavar="DIR", help="where to write (default: a folder in ~/.cache/sequnlearn)")
    p.set_defaults(func=cmd_tasks_path)


def cmd_tasks_path(args) -> None:
    from sequnlearn.eval.stock import write_task_dir

    print(write_task_dir(args.out, args.data_dir))


def _processes():
    """This process (one, or one of an ``accelerate launch``/``torchrun``); joins the group."""
    from sequnlearn.distributed import Process

    return Process.start()


def _check_out_on_main(proc, out: str, *, resume: bool = False, overwrite: bool = False, kind: str = "unlearn",
                       inputs=()) -> None:
    """Only the main process checks ``--out`` (creating nothing: it appears with its first file); the
    others wait for it. See :func:`sequnlearn.runs.check_out_dir`."""
    from sequnlearn.runs import check_out_dir

    if proc.is_main:
        check_out_dir(out, resume=resume, overwrite=overwrite, kind=kind, inputs=inputs)
    proc.barrier()
