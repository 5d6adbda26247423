"""Keyword token masks for the forget loss: which forget tokens a keyword list names.

A keyword list is a ``.txt`` file, one keyword a line, or a ``.csv`` file whose first row is a header:
its column named ``keyword`` (else ``term``; either case-insensitive), else its first column. Each
keyword is stripped of surrounding whitespace; blank ones are dropped.

Matching runs on the characters of each forget text: case-insensitive, non-overlapping, left to right,
and at each position the longest keyword that matches there wins (Python's ``re`` over the keywords
longest first, so ``Varkovirus`` is matched whole even where ``Varko`` is listed too). A token counts
when its character span (the fast tokenizer's ``offset_mapping``) overlaps a match; special tokens
(empty spans) never do. Positions index the ids :func:`~sequnlearn.data.corpora.tokenize` gives (same
special tokens, same truncation at ``max_length``): a match cut off by truncation counts nothing.

Masks are cached in ``$XDG_CACHE_HOME/sequnlearn/keyword_masks/`` (``~/.cache/...`` by default),
one JSON file per SHA-256 of (keyword list, forget texts, their token ids, tokenizer, ``max_length``):
outside every run directory, so a cache never becomes part of a result, and a hit gives exactly what
a miss computes. A cache that cannot be read is computed again; one that cannot be written is skipped.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io as text_io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sequnlearn import io
from sequnlearn.errors import UserError

KEYWORD_SUFFIXES = (".txt", ".csv")
CSV_COLUMNS = ("keyword", "term")
"""The CSV columns read for keywords, in order of preference (else the first column)."""
CACHE_FORMAT = 1
"""Version of a cache file's layout and of the matching rules; bump it when either changes."""


@dataclass(frozen=True)
class KeywordMasks:
    """The forget tokens a keyword list names."""

    positions: list[list[int]]
    """Per forget example, the token positions the forget loss counts (ascending)."""
    tokens: int
    """Real tokens of the forget examples (all positions that could count)."""

    @property
    def masked(self) -> int:
        """Tokens counted by the forget loss."""
        return sum(len(p) for p in self.positions)

    @property
    def unmatched(self) -> int:
        """Forget examples without a counted token (they add nothing to the forget loss)."""
        return sum(not p for p in self.positions)

    @property
    def share(self) -> float:
        """Fraction of the real forget tokens that count."""
        return self.masked / self.tokens if self.tokens else 0.0


def read_keywords(path: str | os.PathLike) -> list[str]:
    """The keywords of a ``.txt`` or ``.csv`` keyword list (see the module docstring).

    Raises:
        UserError: another suffix, an unreadable or non-UTF-8 file, a CSV without rows, or no keyword.
    """
    p = Path(path)
    what = "forget_keywords list"
    if p.suffix.lower() not in KEYWORD_SUFFIXES:
        raise UserError(f"{what} {p} is not a .txt or .csv file; give one keyword a line (.txt) or a CSV "
                        "with a keyword column")
    text = io.read_text(p, what)
    lines = text.splitlines() if p.suffix.lower() == ".txt" else _csv_column(text, p)
    keywords = [k.strip() for k in lines if k.strip()]
    if not keywords:
        raise UserError(f"{what} {p} holds no keyword; add keywords or drop forget_keywords")
    return keywords


def _csv_column(text: str, path: Path) -> list[str]:
    """The cells of a CSV's keyword column below its header (``keyword``, else ``term``, else the first)."""
    rows = [r for r in csv.reader(text_io.StringIO(text)) if r]
    if len(rows) < 2:
        raise UserError(f"forget_keywords list {path} has no row below its header; a CSV needs a header row "
                        "(e.g. keyword) and one keyword a row")
    header = [h.strip().lower() for h in rows[0]]
    col = next((header.index(c) for c in CSV_COLUMNS if c in header), 0)
    return [r[col] if col < len(r) else "" for r in rows[1:]]


def keyword_pattern(keywords: list[str]) -> re.Pattern:
    """A case-insensitive pattern that tries the longest keyword first at each position."""
    ordered = sorted(set(keywords), key=lambda k: (-len(k), k))
    return re.compile("|".join(re.escape(k) for k in ordered), re.IGNORECASE)


def match_spans(text: str, pattern: re.Pattern) -> list[tuple[int, int]]:
    """The ``(start, end)`` character spans of ``pattern``'s non-overlapping matches in ``text``, in order."""
    return [m.span() for m in pattern.finditer(text) if m.end() > m.start()]


def overlapping_tokens(spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[int]:
    """Positions of the tokens whose character span ``offsets[i]`` overlaps one of ``spans`` (sorted,
    disjoint); a token with an empty span (a special token) never counts."""
    ends = [e for _, e in spans]
    out = []
    for i, (a, b) in enumerate(offsets):
        j = bisect.bisect_right(ends, a)  # the first match ending after the token starts
        if b > a and j < len(spans) and spans[j][0] < b:
            out.append(i)
    return out


def compute_masks(texts: list[str], seqs: list[list[int]], tokenizer, max_length: int,
                  keywords: list[str]) -> list[list[int]]:
    """Per text, the positions of its tokens (as :func:`~sequnlearn.data.corpora.tokenize` gives them,
    ``seqs``) that overlap a keyword match.

    Raises:
        UserError: the tokenizer is not a fast one (it has no character offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"forget_keywords needs a fast tokenizer (its offsets map tokens to characters); "
                        f"{type(tokenizer).__name__} is a slow one: use a model with a tokenizer.json, or drop "
                        "forget_keywords")
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True,
                    return_offsets_mapping=True)
    if [list(s) for s in enc["input_ids"]] != [list(s) for s in seqs]:
        raise RuntimeError("the tokenizer gave other ids with offsets than without; the masks would not align")
    pattern = keyword_pattern(keywords)
    return [overlapping_tokens(match_spans(t, pattern), [tuple(o) for o in offsets])
            for t, offsets in zip(texts, enc["offset_mapping"])]


def keyword_masks(path: str | os.PathLike, texts: list[str], seqs: list[list[int]], tokenizer, max_length: int,
                  *, write_cache: bool = True) -> KeywordMasks:
    """The masks of the keyword list at ``path`` over the forget ``texts`` (token ids ``seqs``), from the
    cache when it holds them, else computed (and cached when ``write_cache``).

    Raises:
        UserError: a bad keyword list or tokenizer (:func:`read_keywords`, :func:`compute_masks`), or a
            list that matches no token of the forget examples (before any cache is written).
    """
    keywords = read_keywords(path)
    key = cache_key(keywords, texts, seqs, tokenizer, max_length)
    positions = _read_cache(cache_path(key), seqs)
    if positions is None:
        positions = compute_masks(texts, seqs, tokenizer, max_length, keywords)
        _check_matches(path, positions, keywords)
        if write_cache:
            _write_cache(cache_path(key), key, positions)
    return KeywordMasks(positions, sum(len(s) for s in seqs))


def _check_matches(path, positions: list[list[int]], keywords: list[str]) -> None:
    """Refuse a keyword list that names no token of the forget examples."""
    if not any(positions):
        raise UserError(f"forget_keywords list {path} ({len(keywords)} keywords) matches no token of the "
                        f"{len(positions)} forget examples (case-insensitive, within max_length); check the "
                        "list and forget_data, or drop forget_keywords")


def masks_line(path: str | os.PathLike, masks: KeywordMasks) -> str:
    """One line saying what the keyword masks keep: masked tokens and their share, examples without a match."""
    n = len(masks.positions)
    return (f"forget keywords {path}: the forget loss counts {masks.masked} of {masks.tokens} tokens "
            f"({100 * masks.share:.1f}%); {masks.unmatched} of {n} forget examples have no match and add "
            "nothing to it")


def cache_dir() -> Path:
    """Where keyword masks are cached: ``$XDG_CACHE_HOME/sequnlearn/keyword_masks`` (``~/.cache`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sequnlearn" / "keyword_masks"


def cache_path(key: str) -> Path:
    """The cache file of masks with key ``key`` (:func:`cache_key`)."""
    return cache_dir() / f"{key}.json"


def cache_key(keywords: list[str], texts: list[str], seqs: list[list[int]], tokenizer, max_length: int) -> str:
    """SHA-256 of everything the masks depend on: the keywords, the texts, their token ids, the tokenizer
    (its ``tokenizer.json`` without the truncation and padding a call sets on it) and ``max_length``."""
    from sequnlearn.runs import token_fingerprint

    h = hashlib.sha256(f"sequnlearn keyword masks {CACHE_FORMAT} {max_length}\n".encode())
    for part in (json.dumps(keywords), _tokenizer_json(tokenizer), token_fingerprint(seqs)["token_ids_sha256"],
                 *texts):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _tokenizer_json(tokenizer) -> str:
    """A fast tokenizer's ``tokenizer.json`` text without its (call-dependent) truncation and padding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return type(tokenizer).__name__
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True)


def _read_cache(path: Path, seqs: list[list[int]]) -> list[list[int]] | None:
    """The cached positions at ``path`` when they are there and fit ``seqs``; else ``None``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        positions = data["positions"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fits = (data.get("format") == CACHE_FORMAT and isinstance(positions, list) and len(positions) == len(seqs)
            and all(isinstance(p, list) and all(isinstance(i, int) and 0 <= i < len(s) for i in p)
                    for p, s in zip(positions, seqs)))
    return positions if fits else None


def _write_cache(path: Path, key: str, positions: list[list[int]]) -> None:
    """Write the cache file atomically (the main process only); a cache that cannot be written is skipped."""
    from sequnlearn.distributed import is_main
    from sequnlearn.errors import warn
    from sequnlearn.runs import atomic_write_text

    if not is_main():
        return
    try:
        atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "key": key, "positions": positions}) + "\n")
    except (OSError, UserError) as e:
        warn(f"keyword masks not cached ({e}); they are computed again next time")
