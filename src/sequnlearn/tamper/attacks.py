"""Tampering attack: fine-tune an unlearned model on forget text and chart how fast the
forget accuracy comes back (evaluated in-process every k steps, step 0 included).

A removal that ten steps of fine-tuning undo is not a removal: this is the reference's
last experiment as a command. Its ``controls`` say what the recovery is measured against: the same
attack on the model before unlearning (the relearning baseline), on that model after as much
fine-tuning on benign text, and benign text as the attack corpus (does any fine-tune undo it?).
Every evaluation that fails stops the attack with an error; no value is ever filled in.

Under ``accelerate launch`` / ``torchrun`` every process trains on its slice of each global batch
(``batch_size`` stays the global batch; accumulation = batch / (per-device batch × processes)) and
the gradients are averaged (:mod:`sequnlearn.distributed`), so the attack is the same as on one
process. Evaluations run on the main process while the others wait: they are a small share of an
attack, and one process gives the numbers a single-process evaluation gives. With ``sharding: fsdp``
the model is sharded with FSDP2 (decoder layers and the rest) and every process takes part in each
evaluation in step, the main process's numbers being kept. Only the main process writes files.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from sequnlearn.config import TamperConfig
from sequnlearn.data.corpora import Corpus, CorpusSpec, collate, losses_line, read_corpus, read_corpus_as_reference
from sequnlearn.distributed import Process
from sequnlearn.errors import UserError
from sequnlearn.eval import NonFiniteModel
from sequnlearn.runs import write_json
from sequnlearn.tamper.result import attack_key, planned_keys, planned_roles, plot_tamper, tamper_table, worst_case
from sequnlearn.training import finish_step, lr_factor, reduce_and_clip, set_lr

Loader = Callable[[], tuple]  # () -> (model, tokenizer), fresh weights each call


def chunk_corpus(texts: list[str], tokenizer, max_length: int) -> torch.Tensor:
    """Join documents with EOS and cut the token stream into ``max_length`` chunks.

    Returns:
        ``(N, T)`` token ids, ``T = min(max_length, total tokens)``; a short tail is dropped.

    Raises:
        UserError: the corpus holds fewer than 2 tokens.
    """
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [eos])
    if len(stream) < 2:
        raise UserError("the attack corpus is empty after tokenization; give a corpus with text")
    T = min(max_length, len(stream))
    n = len(stream) // T
    return torch.tensor(stream[: n * T], dtype=torch.long).view(n, T)  # (N, T)


def chunk_documents(texts: list[str], tokenizer, max_length: int, max_chunks: int | None = None) -> list[list[int]]:
    """Cut each document on its own into consecutive chunks of at most ``max_length`` tokens.

    Returns:
        The chunks, document after document, at most ``max_chunks`` per document (None = all); a
        document's last chunk may be shorter (it is padded in its batch and left out of the loss).

    Raises:
        UserError: no document has 2 tokens or more.
    """
    chunks = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        parts = [ids[i: i + max_length] for i in range(0, len(ids), max_length)]
        chunks.extend(p for p in parts[:max_chunks] if len(p) >= 2)
    if not chunks:
        raise UserError("the attack corpus is empty after tokenization; give a corpus with text")
    return chunks


def make_chunks(texts: list[str], tokenizer, cfg: TamperConfig) -> list[list[int]]:
    """The attack's training chunks as ``cfg.chunking`` says (an EOS-joined stream, or per document)."""
    if cfg.chunking == "document":
        return chunk_documents(texts, tokenizer, cfg.max_length, cfg.max_chunks_per_doc)
    return chunk_corpus(texts, tokenizer, cfg.max_length).tolist()


def attack_steps(cfg: TamperConfig, n_chunks: int) -> int:
    """Optimizer steps of an attack: ``cfg.steps``, or one epoch over ``n_chunks`` when that is None."""
    return cfg.steps if cfg.steps is not None else max(1, n_chunks // cfg.batch_size)


def _optimizer(cfg: TamperConfig, params, lr: float):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"optimizer {cfg.optimizer} needs bitsandbytes; pip install bitsandbytes or use adamw") from None
    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def _trainable(model, cfg: TamperConfig):
    """The model to train: itself (full fine-tune) or wrapped in a fresh LoRA adapter."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from sequnlearn.model.adapter import add_lora

    return add_lora(model, r=cfg.lora_r, alpha=cfg.lora_r, dropout=0.0, target_modules=cfg.lora_targets)


def _evaluate(model, tokenizer, cfg: TamperConfig, tasks: dict, proc: Process, sharded: bool = False) -> dict:
    """Forget (and retain) accuracy of the model in memory, computed on the main process (on every
    process in step when the model is sharded) and handed to all; an evaluation error stops the
    attack on every process."""
    return proc.on_main(lambda: _evaluate_here(model, tokenizer, cfg, tasks), everywhere=sharded)


def _evaluate_here(model, tokenizer, cfg: TamperConfig, tasks: dict) -> dict:
    from sequnlearn.eval import EvalSpec, forget_retain_accuracy

    spec = EvalSpec(tasks["forget"], tasks.get("retain"), cfg.eval_style, cfg.eval_limit, cfg.eval_batch_size)
    res = forget_retain_accuracy(model, tokenizer, spec)
    return {f"{key}_acc": res[f"{key}_acc"] for key in tasks}


def attack(load: Loader, cfg: TamperConfig, *, lr: float, seed: int, tasks: dict, texts: list[str],
           progress: bool = True, proc: Process | None = None, curve: list[dict] | None = None) -> list[dict]:
    """One attack: fine-tune fresh weights for ``cfg.steps`` steps, evaluating every ``eval_every``.

    Args:
        curve: the list the evaluations are appended to as they are made (what an interrupted attack
            had evaluated stays there); default a new one.

    Returns:
        The curve: ``[{step, forget_acc, retain_acc?, train_loss}]``, step 0 first.
    """
    torch.manual_seed(seed)
    model, tokenizer = load()
    curve = [] if curve is None else curve

    def evaluate(step: int, loss: float | None, sharded: bool, proc: Process) -> None:
        curve.append({"step": step, **_evaluate(model, tokenizer, cfg, tasks, proc, sharded), "train_loss": loss})

    fine_tune(model, tokenizer, cfg, texts, lr=lr, seed=seed, proc=proc, on_eval=evaluate,
              desc=f"tamper lr={lr:g} seed={seed}", progress=progress)
    return curve


def fine_tune(model, tokenizer, cfg: TamperConfig, texts: list[str], *, lr: float, seed: int,
              proc: Process | None = None, on_eval: Callable | None = None, desc: str = "fine-tune",
              progress: bool = True):
    """Fine-tune ``model`` in place on ``texts`` as the attack does (its steps, batch, optimizer, lr
    schedule, precision and data order for ``seed``).

    Args:
        on_eval: called as ``on_eval(step, train_loss, sharded, proc)`` at step 0 (loss None), every
            ``eval_every`` steps and at the last step; None evaluates nothing.

    Returns:
        The trained model (the same object, or the LoRA-wrapped one when ``cfg.method`` is lora).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    chunks = make_chunks(texts, tokenizer, cfg)
    steps = attack_steps(cfg, len(chunks))
    model = _trainable(model, cfg)
    proc = replace(proc or Process.current(), device=device)  # on the model's device
    sharded = proc.use_fsdp(cfg.sharding)
    if sharded:
        from sequnlearn.model.layers import architecture

        proc.shard_model(model, architecture(model).layers)
    if cfg.gradient_checkpointing or (cfg.gradient_checkpointing is None and device.type == "cuda"):
        model.gradient_checkpointing_enable()
    opt = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad], lr)
    # The HF Trainer's seeded sampler gives this same order for its first epoch.
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))
    accum = proc.micro_batches(cfg.batch_size, cfg.per_device_batch_size, "batch_size")
    on_eval = on_eval or (lambda *args: None)
    on_eval(0, None, sharded, proc)
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not (progress and proc.is_main), dynamic_ncols=True)
    for step in bar:
        step_lr = lr * lr_factor(cfg.lr_schedule, step - 1, steps, cfg.warmup_steps)
        loss = _train_step(model, opt, chunks, order, step - 1, cfg, accum, step_lr, proc, sharded)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % cfg.eval_every == 0 or step == steps:
            on_eval(step, loss, sharded, proc)
    return model


def _train_step(model, opt, chunks, order, step: int, cfg: TamperConfig, accum: int, lr: float, proc: Process,
                sharded: bool = False) -> float:
    """One optimizer step of causal-LM loss over ``cfg.batch_size`` chunks (this process's
    ``accum`` micro-batches of them); returns the mean loss over the global batch.

    The weights stay in their own dtype (fp32 master weights for a full AdamW attack) and the forward
    runs under ``mixed_precision`` autocast; gradients are clipped to ``max_grad_norm`` when set."""
    set_lr(opt, lr)
    model.train()
    total = 0.0
    rank, world, device = proc.rank, proc.world, proc.device
    for m in range(accum):
        start = step * cfg.batch_size + (m * world + rank) * cfg.per_device_batch_size
        idx = order[(torch.arange(cfg.per_device_batch_size) + start) % len(order)].tolist()  # (b,)
        batch = {k: v.to(device) for k, v in collate([chunks[i] for i in idx], pad_id=0).items()}  # (b, T)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # pads left out of the loss
        with proc.autocast(cfg.mixed_precision):
            loss = model(**batch, labels=labels).loss
        total += loss.item() / accum
        if math.isfinite(total):
            (loss / accum).backward()
    (total,) = proc.mean([total])  # a non-finite loss on any process reaches all
    if not math.isfinite(total):
        raise UserError(f"the attack's training loss is {total} at step {step + 1}; lower the learning rate")
    reduce_and_clip([p for group in opt.param_groups for p in group["params"]], proc, sharded=sharded,
                    max_norm=cfg.max_grad_norm)
    finish_step(opt)
    model.eval()
    return total


def load_attack_texts(cfg: TamperConfig) -> list[str]:
    """The attack corpus of ``cfg`` (same loaders as the engine); rows dropped as empty are said once."""
    spec = CorpusSpec(cfg.data, cfg.data_subset, cfg.data_split, tuple(cfg.data_fields))
    if cfg.data_order == "reference":
        corpus = read_corpus_as_reference(spec, limit=cfg.num_train_examples, seed=cfg.data_seed, shuffles=1,
                                          what="attack corpus")
    else:
        corpus = read_corpus(spec, limit=cfg.num_train_examples, seed=0, what="attack corpus")
    _say_losses(f"attack corpus {spec.source}", corpus)
    return corpus.texts


def load_benign_texts(cfg: TamperConfig) -> list[str]:
    """The benign corpus of the controls: as many documents as the attack corpus takes, shuffled."""
    spec = CorpusSpec(cfg.benign_data, cfg.benign_subset, "train", tuple(cfg.benign_fields))
    corpus = read_corpus(spec, limit=cfg.num_train_examples, seed=0, what="benign corpus")
    _say_losses(f"benign corpus {spec.source}", corpus)
    return corpus.texts


def load_no_answer_texts(cfg: TamperConfig) -> list[str]:
    """The corpus of the ``no-answer`` control: as many documents as the attack corpus takes, shuffled."""
    spec = CorpusSpec(cfg.no_answer_data, None, "train", tuple(cfg.data_fields))
    corpus = read_corpus(spec, limit=cfg.num_train_examples, seed=0, what="no-answer corpus")
    _say_losses(f"no-answer corpus {spec.source}", corpus)
    return corpus.texts


def _say_losses(name: str, corpus: Corpus) -> None:
    from sequnlearn.distributed import is_main

    line = losses_line(name, corpus)
    if line and is_main():
        print(line, flush=True)


def _plan(models: dict[str, Loader], cfg: TamperConfig, base: Loader | None, texts: list[str],
          benign: list[str] | None, progress: bool, proc: Process) -> list[tuple]:
    """The attacks to run: ``(label, role, loader_for(lr, seed), corpus)`` in :func:`planned_roles`' order."""
    if {"base", "retain-tuned"} & set(cfg.controls) and base is None:
        raise UserError("controls base and retain-tuned attack the model before unlearning; give it "
                        "(sequnlearn tamper --base-model PATH, or attack a run directory)")

    def tuned(lr: float, seed: int) -> Loader:
        def load():
            torch.manual_seed(seed)
            model, tokenizer = base()
            model = fine_tune(model, tokenizer, cfg, benign, lr=lr, seed=seed, proc=proc,
                              desc=f"benign fine-tune lr={lr:g} seed={seed}", progress=progress)
            if cfg.method == "lora":  # the attack adds its own fresh adapter
                model = model.merge_and_unload()
            return model, tokenizer
        return load

    corpora = {"attack": texts, "base": texts, "retain-tuned": texts, "benign": benign,
               "no-answer": load_no_answer_texts(cfg) if "no-answer" in cfg.controls else None}
    controls = {"base": lambda lr, seed: base, "retain-tuned": tuned}
    return [(label, role, controls[role] if attacked is None else (lambda lr, seed, load=models[attacked]: load),
             corpora[role]) for label, role, attacked in planned_roles(list(models), cfg)]


class TamperInterrupted(KeyboardInterrupt):
    """Ctrl-C during an attack; ``tamper.json`` keeps the finished attacks and the interrupted one's
    evaluations (under ``interrupted``)."""

    def __init__(self, done: int, total: int):
        super().__init__(f"{done} of {total} attacks finished")
        self.done, self.total = done, total


def previous_result(out: Path, labels: list[str], cfg: TamperConfig) -> dict | None:
    """The interrupted ``tamper.json`` in ``out`` that ``--resume`` continues; ``None`` when every attack
    planned for ``labels`` and ``cfg`` is already in it (and its table written): nothing to resume.

    Raises:
        UserError: no readable tamper result, or one made with another config or other models.
    """
    from sequnlearn import io
    from sequnlearn.config import changed_keys

    previous = io.read_json(out / "tamper.json", "tamper result", kind=dict)
    diff = changed_keys(previous.get("config") or {}, cfg)
    stored = previous.get("models")  # a tamper.json from before models were recorded: its config decides
    if diff or (stored is not None and sorted(stored) != sorted(labels)):
        what = f"another config ({', '.join(diff)})" if diff else f"other models ({', '.join(stored)})"
        raise UserError(f"--resume: the tamper result in {out} was made with {what}; resume with the same settings "
                        "and models, or choose another --out")
    done = {attack_key(r) for r in previous.get("runs", [])}
    if "interrupted" not in previous and (out / "tamper.md").is_file() and planned_keys(labels, cfg) <= done:
        return None
    return previous


def tamper(models: dict[str, Loader], cfg: TamperConfig, out: Path, *, baseline: float | None = None,
           base: Loader | None = None, progress: bool = True, proc: Process | None = None,
           previous: dict | None = None) -> dict:
    """Attack each model with every (lr, seed), and run ``cfg.controls``; write ``tamper.json``,
    ``tamper.png``, ``tamper.md``.

    Args:
        models: label → loader returning fresh ``(model, tokenizer)``.
        baseline: forget accuracy of the model before unlearning (a line on the plot).
        base: loader of the model before unlearning (needed by the ``base`` and ``retain-tuned`` controls).
        previous: the ``tamper.json`` of an interrupted run with the same config and models (``--resume``,
            see :func:`previous_result`): its finished attacks are kept, not run again.

    Returns:
        The ``tamper.json`` content; each run has ``role``: ``attack`` or the control's name.

    Raises:
        UserError: a control needs ``base`` and none was given; an attack diverged.
        TamperInterrupted: Ctrl-C; what was finished is in ``tamper.json``.
    """
    from sequnlearn.data.mcq import load_task
    from sequnlearn.eval import chance_level

    tasks = {"forget": load_task(cfg.forget_task)}
    if cfg.retain_task:
        tasks["retain"] = load_task(cfg.retain_task)
    texts = load_attack_texts(cfg)
    benign = load_benign_texts(cfg) if cfg.benign_data else None
    proc = proc or Process.current()
    plan = _plan(models, cfg, base, texts, benign, progress, proc)
    main = proc.is_main
    done = {attack_key(r): r for r in (previous or {}).get("runs", [])}
    t0, runs = time.time() - (previous or {}).get("wall_s", 0.0), []
    result = {"config": asdict(cfg), "models": list(models), "baseline": baseline,
              "chance": chance_level(tasks["forget"]), "runs": runs}
    total = len(plan) * len(cfg.lrs) * len(cfg.seeds)
    for label, role, loader_for, corpus in plan:
        for lr in cfg.lrs:
            for seed in cfg.seeds:
                entry = {"model": label, "role": role, "lr": lr, "seed": seed}
                if attack_key(entry) in done:
                    runs.append(done[attack_key(entry)])
                    continue
                curve: list[dict] = []
                try:
                    attack(loader_for(lr, seed), cfg, lr=lr, seed=seed, tasks=tasks, texts=corpus,
                           progress=progress, proc=proc, curve=curve)
                except KeyboardInterrupt:
                    if main:
                        write_json(out / "tamper.json", {**result, "interrupted": {**entry, "curve": curve}})
                    raise TamperInterrupted(len(runs), total) from None
                except NonFiniteModel:
                    if main:
                        write_json(out / "tamper.json", {**result, "diverged": {**entry, "curve": curve}})
                    raise UserError(f"the attack on {label} (lr {lr:g}, seed {seed}) diverged after step "
                                    f"{curve[-1]['step'] if curve else 0}: its weights or logits became non-finite, "
                                    f"so it is not scored; start again with a lower lr (and --overwrite); "
                                    f"{len(runs)} attacks had finished") from None
                runs.append({**entry, "curve": curve})
                result.update(worst_case=worst_case(runs), wall_s=time.time() - t0)
                if main:
                    write_json(out / "tamper.json", result)  # after every attack: a kill loses at most one
    if main:
        from sequnlearn.runs import atomic_write_text

        result.update(worst_case=worst_case(runs), wall_s=time.time() - t0)
        write_json(out / "tamper.json", result)
        plot_tamper(result, out / "tamper.png")
        atomic_write_text(out / "tamper.md", tamper_table(result))
    return result
