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


@dataclass(frozen=True)
class Corpus:
    """The texts a corpus gives, and what loading it dropped."""

    texts: list[str]
    """The texts kept (shuffled, at most ``limit``)."""
    rows: int
    """Records read from the source."""
    skipped: int = 0
    """Records dropped because their text was empty, blank, null or missing."""


def losses_line(name: str, corpus: Corpus, truncated: int = 0, max_length: int | None = None) -> str | None:
    """One line saying what loading ``corpus`` dropped (empty or null rows) and cut (documents truncated at
    ``max_length`` tokens); ``None`` when nothing was lost."""
    parts = [f"{corpus.skipped} of {corpus.rows} rows skipped (empty or null text)"] if corpus.skipped else []
    if truncated:
        parts.append(f"{truncated} of {len(corpus.texts)} documents truncated to max_length {max_length} tokens")
    return f"{name}: {'; '.join(parts)}" if parts else None


def read_corpus(spec: CorpusSpec, *, limit: int | None = None, seed: int = 0, what: str = "corpus") -> Corpus:
    """Load, join fields, drop (and count) empty texts, shuffle with ``seed`` and keep ``limit``.

    Args:
        what: how messages name the corpus (``forget corpus``).

    Raises:
        UserError: file missing or not a regular file, dataset unreachable, text field absent or not a
            string (the row named), nothing left.
    """
    if spec.source.startswith("tiny:"):
        texts = tiny_corpus(spec.source.split(":", 1)[1], n=limit or 64, seed=seed)
    else:
        texts = [_join(r, spec, f"{what} {spec.source} {where}") for where, r in _records(spec, what)]
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise UserError(f"{what} {spec.source} is empty after dropping empty texts; check its fields "
                        f"{list(spec.fields)}")
    random.Random(seed).shuffle(kept)
    return Corpus(kept[:limit] if limit else kept, len(texts), len(texts) - len(kept))


def load_texts(spec: CorpusSpec, *, limit: int | None = None, seed: int = 0, what: str = "corpus") -> list[str]:
    """The texts of :func:`read_corpus`."""
    return read_corpus(spec, limit=limit, seed=seed, what=what).texts


def read_corpus_as_reference(spec: CorpusSpec, *, limit: int | None, seed: int, shuffles: int,
                             what: str = "corpus") -> Corpus:
    """Select texts as the reference code did: no empty text dropped, fields joined verbatim.

    Args:
        limit: records kept (None = all).
        shuffles: 0 → the first ``limit`` records in source order (the reference's forget corpus,
            ``select(range(n))``); 1 → ``datasets``' ``shuffle(seed).select(range(limit))`` (its attack
            corpus); 2 → that, shuffled once more with ``seed`` (its retain corpus). ``datasets``
            shuffles with ``numpy.random.default_rng(seed).permutation(len)``, which is what runs here.

    Raises:
        UserError: as :func:`read_corpus`, or fewer than ``limit`` records.
    """
    import numpy as np

    if spec.source.startswith("tiny:"):
        generated = tiny_corpus(spec.source.split(":", 1)[1], n=limit or 64, seed=seed)
        records = [(f"row {i}", {spec.fields[0]: t}) for i, t in enumerate(generated, 1)]
        spec = CorpusSpec(spec.source, fields=spec.fields[:1])
    else:
        records = _records(spec, what)
    limit = len(records) if limit is None else limit
    if len(records) < limit:
        raise UserError(f"{what} {spec.source} has {len(records)} records, fewer than the {limit} asked for "
                        "(num_train_examples); add data or lower num_train_examples")
    index = list(range(limit))
    if shuffles >= 1:
        index = [int(i) for i in np.random.default_rng(seed).permutation(len(records))[:limit]]
    if shuffles >= 2:
        index = [index[j] for j in np.random.default_rng(seed).permutation(limit)]
    texts = [_join_verbatim(records[i][1], spec, f"{what} {spec.source} {records[i][0]}") for i in index]
    return Corpus(texts, len(records))


def load_texts_as_reference(spec: CorpusSpec, *, limit: int | None, seed: int, shuffles: int,
                            what: str = "corpus") -> list[str]:
    """The texts of :func:`read_corpus_as_reference`."""
    return read_corpus_as_reference(spec, limit=limit, seed=seed, shuffles=shuffles, what=what).texts


def _join_verbatim(record: dict, spec: CorpusSpec, where: str) -> str:
    """All ``spec.fields`` joined by a blank line as they are (the reference's ``title\n\nabstract\n\ntext``)."""
    missing = [f for f in spec.fields if f not in record]
    if missing:
        raise UserError(f"{where} has no field {missing} (its fields: {sorted(record)}); "
                        "set the *_fields key to the fields holding the text")
    return "\n\n".join(_text(record, f, where) for f in spec.fields)


def _text(record: dict, name: str, where: str) -> str:
    """Field ``name`` of ``record`` as text: a string as it is, null as "".

    Raises:
        UserError: the value is a number, a list, an object ... (``where`` names the row).
    """
    value = record[name]
    if value is None or isinstance(value, str):
        return value or ""
    raise UserError(f"{where}: field {name!r} is {type(value).__name__}, not a string; write the text as a JSON "
                    "string (or null to skip the row), or set the *_fields key to the fields holding the text")


def _is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_SUFFIXES or Path(source).exists()


def _records(spec: CorpusSpec, what: str = "corpus") -> list[tuple[str, dict]]:
    """``(where, record)`` of every record of a local file or hub dataset; ``where`` names the record
    (``line 7`` of a .jsonl file, ``block 3`` of a .txt file, ``item 2`` of a .json list, ``row 5``)."""
    from sequnlearn import io

    if not _is_local(spec.source):
        return [(f"row {i}", r) for i, r in enumerate(_hub_records(spec), 1)]
    unit = {".txt": "block", ".json": "item", ".parquet": "row"}.get(Path(spec.source).suffix)
    if unit is None:  # .jsonl, and any other existing file
        return [(f"line {i}", r) for i, r in io.read_jsonl_numbered(spec.source, f"{what} file")]
    return [(f"{unit} {i}", r) for i, r in enumerate(_local_records(spec, f"{what} file"), 1)]


def _local_records(spec: CorpusSpec, what: str = "corpus file") -> list[dict]:
    """Records of a local .txt, .parquet or .json corpus file, read through :mod:`sequnlearn.io` (every bad
    file is a UserError; .jsonl files are read by :func:`_records`)."""
    from sequnlearn import io

    path = Path(spec.source)
    if path.suffix == ".txt":
        return [{spec.fields[0]: block} for block in io.read_text(path, what).split("\n\n")]
    if path.suffix == ".parquet":
        return io.read_parquet(path, what)
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


def _join(record: dict, spec: CorpusSpec, where: str) -> str:
    """The text fields of ``record`` that are present and not empty, stripped, joined by a blank line.

    Raises:
        UserError: none of ``spec.fields`` is in the record, or one holds a non-string (``where`` names it).
    """
    present = [f for f in spec.fields if f in record]
    if not present:
        raise UserError(f"{where} has no field {list(spec.fields)} (its fields: {sorted(record)}); "
                        "set the *_fields key to the field holding the text")
    parts = (_text(record, f, where).strip() for f in present)
    return "\n\n".join(p for p in parts if p)


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


def count_truncated(texts: list[str], seqs: list[list[int]], tokenizer, max_length: int) -> int:
    """How many of ``texts`` :func:`tokenize` cut at ``max_length`` (``seqs``: its result). Only the texts
    that came out ``max_length`` tokens long are tokenized again, one token longer, to tell."""
    full = [t for t, s in zip(texts, seqs) if len(s) >= max_length]
    return sum(len(s) > max_length for s in tokenize(full, tokenizer, max_length + 1)) if full else 0


def collate(seqs: list[list[int]], pad_id: int, *, multiple: int = 1, cap: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of this batch, rounded up to a multiple of ``multiple`` but not
    past ``cap`` (the tokens a row may have: a model's positions end there).

    Returns:
        ``input_ids`` and ``attention_mask``, both ``(B, T)``.
    """
    longest = max(len(s) for s in seqs)
    T = max(longest, min(-(-longest // multiple) * multiple, cap if cap is not None else longest * multiple))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
