"""Forget / retain text from a hub dataset or local files; tokenization and padded batches."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sequnlearn.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus comes from and which fields hold its text."""

    source: str
    subset: str | None = None
    split: str = "train"
    fields: tuple[str, ...] = ("text",)


def load_texts(spec: CorpusSpec, *, limit: int | None = None, seed: int = 0) -> list[str]:
    """Load, join fields, drop empty texts, shuffle with ``seed`` and keep ``limit``.

    Raises:
        UserError: file missing, dataset unreachable, text field absent, nothing left.
    """
    if spec.source.startswith("tiny:"):
        texts = tiny_corpus(spec.source.split(":", 1)[1], n=limit or 64, seed=seed)
    else:
        records = _local_records(spec) if _is_local(spec.source) else _hub_records(spec)
        texts = [_join(r, spec) for r in records]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"corpus {spec.source} is empty after dropping empty texts; check its fields {list(spec.fields)}")
    random.Random(seed).shuffle(texts)
    return texts[:limit] if limit else texts


def load_texts_as_reference(spec: CorpusSpec, *, limit: int | None, seed: int, shuffles: int) -> list[str]:
    """Select texts as the reference code did: no empty text dropped, fields joined verbatim.

    Args:
        limit: records kept (None = all).
        shuffles: 0 → the first ``limit`` records in source order (the reference's forget corpus,
            ``select(range(n))``); 1 → ``datasets``' ``shuffle(seed).select(range(limit))`` (its attack
            corpus); 2 → that, shuffled once more with ``seed`` (its retain corpus). ``datasets``
            shuffles with ``numpy.random.default_rng(seed).permutation(len)``, which is what runs here.

    Raises:
        UserError: as :func:`load_texts`, or fewer than ``limit`` records.
    """
    import numpy as np

    if spec.source.startswith("tiny:"):
        generated = tiny_corpus(spec.source.split(":", 1)[1], n=limit or 64, seed=seed)
        records, spec = [{spec.fields[0]: t} for t in generated], CorpusSpec(spec.source, fields=spec.fields[:1])
    else:
        records = _local_records(spec) if _is_local(spec.source) else _hub_records(spec)
    limit = len(records) if limit is None else limit
    if len(records) < limit:
        raise UserError(f"corpus {spec.source} has {len(records)} records, fewer than the {limit} asked for "
                        "(num_train_examples); add data or lower num_train_examples")
    index = list(range(limit))
    if shuffles >= 1:
        index = [int(i) for i in np.random.default_rng(seed).permutation(len(records))[:limit]]
    if shuffles >= 2:
        index = [index[j] for j in np.random.default_rng(seed).permutation(limit)]
    return [_join_verbatim(records[i], spec) for i in index]


def _join_verbatim(record: dict, spec: CorpusSpec) -> str:
    """All ``spec.fields`` joined by a blank line as they are (the reference's ``title\n\nabstract\n\ntext``)."""
    missing = [f for f in spec.fields if f not in record]
    if missing:
        raise UserError(f"corpus {spec.source} has no field {missing} (its fields: {sorted(record)}); "
                        "set the *_fields key to the fields holding the text")
    return "\n\n".join("" if record[f] is None else str(record[f]) for f in spec.fields)


def _is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_SUFFIXES or Path(source).exists()


def _local_records(spec: CorpusSpec) -> list[dict]:
    """Records of a local corpus file, read through :mod:`sequnlearn.io` (every bad file is a UserError)."""
    from sequnlearn import io

    path, what = Path(spec.source), "corpus file"
    if path.suffix == ".txt":
        return [{spec.fields[0]: block} for block in io.read_text(path, what).split("\n\n")]
    if path.suffix == ".parquet":
        return io.read_parquet(path, what)
    if path.suffix != ".json":
        return io.read_jsonl(path, what)
    data = io.read_json(path, what)
    if isinstance(data, dict):
        data = data.get(spec.split) or data.get("data") or []
    io.expect(data, list, f"{what} {path}", f"give a list of objects (or {{{spec.split!r}: [...]}})")
    for i, row in enumerate(data, 1):
        io.expect(row, dict, f"{what} {path} item {i}", "every item must be an object with the text fields")
    return data


def _hub_records(spec: CorpusSpec):
    import datasets

    try:
        return datasets.load_dataset(spec.source, spec.subset, split=spec.split)
    except Exception as e:  # datasets raises many types for "not reachable"
        raise UserError(f"dataset {spec.source!r} ({spec.subset or 'default'}, split {spec.split}) is not reachable "
                        f"({type(e).__name__}); download it first or pass a local .jsonl/.parquet/.txt file") from None


def _join(record: dict, spec: CorpusSpec) -> str:
    present = [f for f in spec.fields if f in record]
    if not present:
        raise UserError(f"corpus {spec.source} has no field {list(spec.fields)} (its fields: {sorted(record)}); "
                        "set the *_fields key to the field holding the text")
    return "\n\n".join(str(record[f]).strip() for f in present if record[f] and str(record[f]).strip())


TINY_WORDS = {
    "forget": "virus pathogen toxin spore host gene vector strain culture assay plasmid replication".split(),
    "retain": "river city market bridge garden music festival harbor library mountain school bakery".split(),
}


def tiny_corpus(kind: str, *, n: int, seed: int) -> list[str]:
    """``n`` short generated documents of one theme (``forget`` or ``retain``), for the tiny preset.

    Raises:
        UserError: ``kind`` is neither ``forget`` nor ``retain``.
    """
    if kind not in TINY_WORDS:
        raise UserError(f"tiny corpus {kind!r} is unknown; use tiny:forget or tiny:retain")
    rng = random.Random(f"{kind}-{seed}")
    words = TINY_WORDS[kind]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 24))) + "." for _ in range(n)]


def tokenize(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, no padding."""
    return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]


def collate(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of this batch.

    Returns:
        ``input_ids`` and ``attention_mask``, both ``(B, T_max)``.
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
