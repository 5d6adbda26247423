"""Pretrain the toy world's GPT-NeoX base model on the CPU (AdamW, warmup + cosine, seeded)."""

from __future__ import annotations

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


def pack_rows(docs: list[list[int]], seq_len: int, eos_id: int, generator: torch.Generator) -> torch.Tensor:
    """Shuffle tokenized documents and pack them whole (each followed by EOS) into rows.

    A document never straddles two rows, so every row starts at the start of a document, as an
    evaluation prompt does. Each row is filled up with ``IGNORE``-marked padding.

    Args:
        docs: token ids of each document (without EOS); each at most ``seq_len - 1`` long.
        seq_len: row length.
        eos_id: id appended after each document.
        generator: seeded source of the shuffle.

    Returns:
        ``(R, seq_len)`` int64 tensor; padding positions hold ``IGNORE``.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    for i in torch.randperm(len(docs), generator=generator).tolist():
        piece = docs[i] + [eos_id]
        if len(current) + len(piece) > seq_len:
            rows.append(current)
            current = []
        current.extend(piece)
    rows.append(current)
    out = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)  # (R, T)
    for r, row in enumerate(rows):
        out[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def batches(docs: list[list[int]], config, eos_id: int, generator: torch.Generator):
    """Yield ``(input_ids, labels)`` batches forever, repacking the documents each epoch.

    Args:
        docs: token ids of each document (without EOS).
        config: a :class:`~sequnlearn.toyworld.config.ToyWorldConfig` (``seq_len``, ``batch_size``).
        eos_id: id appended after each document and used as padding input.
        generator: seeded source of the shuffles.

    Yields:
        ``input_ids`` ``(B, T)`` with padding replaced by EOS, and ``labels`` ``(B, T)`` with
        ``IGNORE`` at padding.
    """
    while True:
        rows = pack_rows(docs, config.seq_len, eos_id, generator)  # (R, T)
        while len(rows) < config.batch_size:  # a corpus smaller than one batch: several epochs per batch
            rows = torch.cat([rows, pack_rows(docs, config.seq_len, eos_id, generator)])
        rows = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(rows) - config.batch_size + 1, config.batch_size):
            labels = rows[start:start + config.batch_size]  # (B, T)
            yield labels.masked_fill(labels == IGNORE, eos_id), labels


def lr_factor(step: int, config) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine to ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
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
             threads: int | None = None):
    """Train a fresh GPT-NeoX model on packed documents with a next-token loss.

    Args:
        docs: token ids of the pretraining documents (without EOS).
        config: a :class:`~sequnlearn.toyworld.config.ToyWorldConfig` (model size, schedule, seed).
        vocab_size: tokenizer vocabulary size.
        eos_id: id of ``<|endoftext|>``.
        progress: show a tqdm bar with the running loss.
        threads: torch CPU threads while training (restored afterwards); ``None``: see
            :func:`auto_threads`.

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
        return _train(docs, config, vocab_size, eos_id, progress)
    finally:
        torch.set_num_threads(previous)


def _train(docs: list[list[int]], config, vocab_size: int, eos_id: int, progress: bool):
    """The training loop of :func:`pretrain` (seeded init, AdamW, warmup + cosine, clip 1.0)."""
    from tqdm.auto import tqdm
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(config.seed)
    model = GPTNeoXForCausalLM(neox_config(config, vocab_size, eos_id)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
    data = batches(docs, config, eos_id, torch.Generator().manual_seed(config.seed))
    log, start = [], time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for step in bar:
        input_ids, labels = next(data)  # (B, T), (B, T)
        loss = model(input_ids=input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        log.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                    "elapsed_s": round(time.perf_counter() - start, 3)})
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
    return model.eval(), log
