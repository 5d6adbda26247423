"""Pretrain the toy world's GPT-NeoX base model on the CPU (AdamW, warmup + cosine, seeded)."""

from __future__ import annotations

import json
import math
import os
import time

import torch

from sequnlearn.errors import UserError

IGNORE = -100


def neox_config(config, vocab_size: int, eos_id: int):
    """The HF ``GPTNeoXConfig`` of the base model (Pythia-like: rotary on 25%, parallel residual, no dropout).

    Args:
        config: a :class:`~sequnlearn.toyworld.config.ToyWorldConfig`.
        vocab_size: tokenizer vocabulary size.
        eos_id: id of ``<|endoftext|>`` (eos, bos and pad).

    Returns:
        The ``GPTNeoXConfig``.
    """
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=config.hidden_size,
                         num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                         intermediate_size=4 * config.hidden_size, max_position_embeddings=2048,
                         rotary_pct=0.25, use_parallel_residual=True, hidden_dropout=0.0,
                         attention_dropout=0.0, tie_word_embeddings=False, eos_token_id=eos_id,
                         bos_token_id=eos_id, pad_token_id=eos_id)


def pack_rows(docs: list[list[int]], seq_len: int, eos_id: int, generator: torch.Generator,
              weights: list[list[float]] | None = None):
    """Shuffle tokenized documents and pack them whole (each followed by EOS) into rows.

    A document never straddles two rows, so every row starts at the start of a document, as an
    evaluation prompt does. Each row is filled up with ``IGNORE``-marked padding.

    Args:
        docs: token ids of each document (without EOS); each at most ``seq_len - 1`` long.
        seq_len: row length.
        eos_id: id appended after each document.
        generator: seeded source of the shuffle.
        weights: optional loss weight of each document token (same lengths as ``docs``); the
            appended EOS gets weight 1, padding 0.

    Returns:
        ``(R, seq_len)`` int64 tensor; padding positions hold ``IGNORE``. With ``weights``, a pair:
        that tensor and the ``(R, seq_len)`` float weights packed the same way.
    """
    rows: list[list[int]] = []
    wrows: list[list[float]] = []
    current: list[int] = []
    wcurrent: list[float] = []
    for i in torch.randperm(len(docs), generator=generator).tolist():
        piece = docs[i] + [eos_id]
        if len(current) + len(piece) > seq_len:
            rows.append(current)
            wrows.append(wcurrent)
            current, wcurrent = [], []
        current.extend(piece)
        wcurrent.extend((weights[i] if weights is not None else [1.0] * len(docs[i])) + [1.0])
    rows.append(current)
    wrows.append(wcurrent)
    out = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)  # (R, T)
    wout = torch.zeros((len(rows), seq_len))  # (R, T)
    for r, (row, wrow) in enumerate(zip(rows, wrows)):
        out[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        wout[r, : len(wrow)] = torch.tensor(wrow)
    return out if weights is None else (out, wout)


def batches(docs: list[list[int]], config, eos_id: int, generator: torch.Generator,
            weights: list[list[float]] | None = None):
    """Yield ``(input_ids, labels, weights)`` batches forever, repacking the documents each epoch.

    Args:
        docs: token ids of each document (without EOS).
        config: a :class:`~sequnlearn.toyworld.config.ToyWorldConfig` (``seq_len``, ``batch_size``).
        eos_id: id appended after each document and used as padding input.
        generator: seeded source of the shuffles.
        weights: optional per-token loss weights of ``docs`` (default: all 1).

    Yields:
        ``input_ids`` ``(B, T)`` with padding replaced by EOS, ``labels`` ``(B, T)`` with
        ``IGNORE`` at padding, and the float loss ``weights`` ``(B, T)`` of each label (0 at padding).
    """
    weights = weights if weights is not None else [[1.0] * len(d) for d in docs]

    def pack():
        return pack_rows(docs, config.seq_len, eos_id, generator, weights)

    while True:
        rows, wrows = pack()  # (R, T), (R, T)
        while len(rows) < config.batch_size:  # a corpus smaller than one batch: several epochs per batch
            more, wmore = pack()
            rows, wrows = torch.cat([rows, more]), torch.cat([wrows, wmore])
        order = torch.randperm(len(rows), generator=generator)
        rows, wrows = rows[order], wrows[order]
        for start in range(0, len(rows) - config.batch_size + 1, config.batch_size):
            labels = rows[start:start + config.batch_size]  # (B, T)
            yield labels.masked_fill(labels == IGNORE, eos_id), labels, wrows[start:start + config.batch_size]


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each target weighted: ``sum(w * ce) / sum(w)``.

    Args:
        logits: ``(B, T, V)`` model outputs.
        labels: ``(B, T)`` token ids, ``IGNORE`` at padding.
        weights: ``(B, T)`` weight of predicting each label (0 at padding and untrained tokens).

    Returns:
        The scalar loss; with all weights 1 it is the usual mean next-token loss.
    """
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets,
                                           ignore_index=IGNORE, reduction="none")
    w = weights[:, 1:].reshape(-1) * (targets != IGNORE)
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def lr_factor(step: int, config) -> float:
    """Learning-rate multiplier of ``config.lr`` at ``step``: linear warmup, then cosine to ``min_lr_ratio``.

    With a first stage (``match_steps``), its steps warm up to ``match_lr`` (``lr`` when 0) and stay
    there; the later steps warm up again and decay over what is left, as a run of their own.
    """
    if config.match_steps:
        if step < config.match_steps:
            return (config.match_lr or config.lr) / config.lr * min(1.0, (step + 1) / config.warmup_steps)
        step, total = step - config.match_steps, config.steps - config.match_steps
    else:
        total = config.steps
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def auto_threads() -> int:
    """Torch's thread count, cut down to the cores idle right now (at least 1).

    On a shared machine, more threads than idle cores make each step several times slower (the
    threads wait for each other), so a busy machine gets one thread. "Right now" is the CPU idle
    time over a quarter second (``/proc/stat``), not the 1-minute load average, which still counts
    the ``pip install`` that ran just before ``make demo`` builds the world.

    Returns:
        The number of threads to train with.
    """
    idle = _idle_cores()
    if idle is None:
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), int(idle + 0.5)))


def _idle_cores(interval: float = 0.25) -> float | None:
    """Cores idle over ``interval`` seconds (``/proc/stat``), else from the load average, else None."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total jiffies

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
        if total1 > total0:
            return (os.cpu_count() or 1) * (idle1 - idle0) / (total1 - total0)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return (os.cpu_count() or 1) - os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return None


def pretrain(docs: list[list[int]], config, vocab_size: int, eos_id: int, *, progress: bool = True,
             threads: int | None = None, weights: list[list[float]] | None = None, eval_every: int = 0,
             on_eval=None, first: list[int] | None = None):
    """Train a fresh GPT-NeoX model on packed documents with a next-token loss.

    Args:
        docs: token ids of the pretraining documents (without EOS).
        config: a :class:`~sequnlearn.toyworld.config.ToyWorldConfig` (model size, schedule, seed).
        vocab_size: tokenizer vocabulary size.
        eos_id: id of ``<|endoftext|>``.
        progress: show a tqdm bar with the running loss.
        threads: torch CPU threads while training (restored afterwards); ``None``: see
            :func:`auto_threads`.
        weights: per-token loss weights of ``docs`` (default all 1; see :func:`weighted_lm_loss`).
        first: indices of the documents the first ``config.match_steps`` steps train on alone (the
            curriculum's first stage; its rows are packed from these documents only); the later
            steps train on the other documents.
        eval_every: call ``on_eval`` after every this many steps and after the last (0: never).
        on_eval: ``on_eval(model) -> dict`` (the model in eval mode, under ``no_grad``); the dict is
            added to that step's log line. It must not draw from torch's global random state: the
            weights are the same with and without it.

    Returns:
        ``(model, log)``: the trained ``GPTNeoXForCausalLM`` in eval mode, and one dict per step
        with ``step``, ``loss``, ``lr`` and ``elapsed_s``.

    Raises:
        UserError: a document does not fit in one row (``seq_len``).
    """
    longest = max(len(d) for d in docs)
    if longest + 1 > config.seq_len:
        raise UserError(f"a pretraining document has {longest} tokens and does not fit in seq_len={config.seq_len}; "
                        f"raise seq_len to at least {longest + 1} or lower sentences_per_doc")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or auto_threads())
    try:
        return _train(docs, config, vocab_size, eos_id, progress, weights, eval_every if on_eval else 0, on_eval,
                      first)
    finally:
        torch.set_num_threads(previous)


def _train(docs: list[list[int]], config, vocab_size: int, eos_id: int, progress: bool,
           weights: list[list[float]] | None, eval_every: int = 0, on_eval=None, first: list[int] | None = None):
    """The training loop of :func:`pretrain` (seeded init, AdamW, warmup + cosine, clip 1.0)."""
    from tqdm.auto import tqdm
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(config.seed)
    model = GPTNeoXForCausalLM(neox_config(config, vocab_size, eos_id)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
    if config.match_steps:
        if not first:
            raise UserError("match_steps needs first-stage documents (match_stage_examples > 0)")
        weights = weights if weights is not None else [[1.0] * len(d) for d in docs]
        staged = set(first)
        stage = batches([docs[i] for i in first], config, eos_id, torch.Generator().manual_seed(config.seed + 1),
                        [weights[i] for i in first])
        rest = [i for i in range(len(docs)) if i not in staged]
        docs, weights = [docs[i] for i in rest], [weights[i] for i in rest]
    data = batches(docs, config, eos_id, torch.Generator().manual_seed(config.seed), weights)
    log, start = [], time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for step in bar:
        input_ids, labels, weights_bt = next(stage if step < config.match_steps else data)  # (B, T) each
        loss = weighted_lm_loss(model(input_ids=input_ids).logits, labels, weights_bt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        log.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                    "elapsed_s": round(time.perf_counter() - start, 3)})
        opt.step()
        sched.step()
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == config.steps):
            model.eval()
            with torch.no_grad():
                scores = on_eval(model)
            log[-1].update(scores)
            model.train()
            if progress:
                bar.write(f"step {step + 1}: {json.dumps(scores)}")
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
    return model.eval(), log
