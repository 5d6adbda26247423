"""Evidence behind the findings: a decision rule fixed in advance, and where each number of a text comes from.

Two pure tools for the findings docs and their tests:

- :func:`compare` and :func:`against_threshold` call a reference finding from per-seed values by a
  rule fixed before the data is seen (:data:`SD_MULTIPLIER` seed sds) and return the numbers behind
  the call, so a doc table can show them;
- :func:`orphans` lists the numbers of a markdown text that no data file gives or recomputes
  (:func:`cited_numbers` says which numbers are checked and which are ignored).
"""

from __future__ import annotations

import math
import re
import statistics
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sequnlearn.errors import UserError

SD_MULTIPLIER = 2.0
"""A difference, or a distance from a threshold, is decided when it exceeds this many seed sds."""

REPRODUCES = "reproduces"
DIRECTION_ONLY = "direction only"
NOT_REPRODUCED = "not reproduced"
UNDECIDED = "undecided"

# ---------------------------------------------------------------------- the decision rule


@dataclass(frozen=True)
class Comparison:
    """The call on a comparison of two groups of seeds, and the numbers behind it (a minus b)."""

    verdict: str
    """:data:`REPRODUCES`, :data:`DIRECTION_ONLY` or :data:`NOT_REPRODUCED`."""
    direction: int
    """The sign the reference gives mean(a) − mean(b): +1 or −1."""
    mean_a: float
    sd_a: float | None
    """Sample sd (ddof=1) of a; None for a single run."""
    n_a: int
    mean_b: float
    sd_b: float | None
    n_b: int
    difference: float
    """mean(a) − mean(b)."""
    pooled_sd: float | None
    """:func:`pooled_sd` of the two groups; None when both are a single run."""
    t: float | None
    """difference / pooled sd; ±inf when the pooled sd is 0 and the difference is not; None without a pooled sd."""


@dataclass(frozen=True)
class ThresholdCall:
    """The call on a threshold claim ("the retain drop is below 0.03") and the numbers behind it."""

    verdict: str
    """:data:`REPRODUCES`, :data:`NOT_REPRODUCED` or :data:`UNDECIDED`."""
    side: str
    """Where the reference puts the mean: ``below`` or ``above`` the threshold."""
    threshold: float
    mean: float
    sd: float | None
    n: int
    low: float | None
    """mean − k·sd; None for a single run."""
    high: float | None
    """mean + k·sd; None for a single run."""


def _spread(values: Sequence[float], what: str) -> tuple[float, float | None, int]:
    """Mean, sample sd (None for one value) and count of ``values``.

    Raises:
        UserError: no values, or a non-finite one.
    """
    values = [float(v) for v in values]
    if not values:
        raise UserError(f"{what} has no values; give one value per seed")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{what} holds a non-finite value ({values}); give the per-seed accuracies")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def pooled_sd(sd_a: float | None, n_a: int, sd_b: float | None, n_b: int) -> float | None:
    """The standard pooled sd, sqrt(((n_a − 1)·sd_a² + (n_b − 1)·sd_b²) / (n_a + n_b − 2)).

    With equal n it is the square root of the mean of the two sample variances. A single run (sd None)
    adds no degrees of freedom, so the other group's sd stands for both; two single runs have none (None).
    """
    dof = n_a + n_b - 2
    if dof <= 0:
        return None
    return math.sqrt(((n_a - 1) * (sd_a or 0.0) ** 2 + (n_b - 1) * (sd_b or 0.0) ** 2) / dof)


def compare(direction: int, a: Sequence[float], b: Sequence[float], *, k: float = SD_MULTIPLIER) -> Comparison:
    """Call a reference comparison from the per-seed values of its two groups, by a rule fixed in advance.

    ``direction`` is the sign the reference gives mean(a) − mean(b) (+1: a is higher; "L2 forgets
    more than KL" on forget accuracy is a = L2, b = KL, direction −1). With d = mean(a) − mean(b) and
    s the pooled seed sd (:func:`pooled_sd`):

    - ``reproduces``: d has the reference's sign and |d| > k·s;
    - ``direction only``: d has the reference's sign and |d| ≤ k·s;
    - ``not reproduced``: d is 0 or has the other sign, whatever its size.

    Two single runs have no s: the call is then ``direction only`` or ``not reproduced``, never
    ``reproduces``. An s of 0 (every seed equal) with a non-zero d of the reference's sign reproduces.

    Raises:
        UserError: ``direction`` is not ±1, a group is empty or holds a non-finite value.
    """
    if direction not in (1, -1):
        raise UserError(f"direction {direction!r} is not +1 or -1; give the sign the reference states for a - b")
    mean_a, sd_a, n_a = _spread(a, "group a")
    mean_b, sd_b, n_b = _spread(b, "group b")
    d = mean_a - mean_b
    s = pooled_sd(sd_a, n_a, sd_b, n_b)
    t = None if s is None else (d / s if s > 0 else (math.copysign(math.inf, d) if d else 0.0))
    if d * direction <= 0:
        verdict = NOT_REPRODUCED
    else:
        verdict = REPRODUCES if s is not None and abs(d) > k * s else DIRECTION_ONLY
    return Comparison(verdict, direction, mean_a, sd_a, n_a, mean_b, sd_b, n_b, d, s, t)


def against_threshold(values: Sequence[float], threshold: float, side: str = "below", *,
                      k: float = SD_MULTIPLIER) -> ThresholdCall:
    """Call a threshold claim from per-seed values: is their mean ``side`` of ``threshold``?

    ``reproduces`` when the whole interval mean ± k·sd lies strictly on the claimed side, ``not
    reproduced`` when it lies wholly on the other side (the threshold itself included), ``undecided``
    when it holds the threshold, and for a single run (no sd, no interval).

    Raises:
        UserError: ``side`` is not ``below`` or ``above``; no values, or a non-finite one.
    """
    if side not in ("below", "above"):
        raise UserError(f"side {side!r} is neither 'below' nor 'above'; say where the reference puts the mean")
    mean, sd, n = _spread(values, "the values")
    if sd is None:
        return ThresholdCall(UNDECIDED, side, threshold, mean, None, n, None, None)
    low, high = mean - k * sd, mean + k * sd
    holds, fails = (high < threshold, low >= threshold) if side == "below" else (low > threshold, high <= threshold)
    verdict = REPRODUCES if holds else NOT_REPRODUCED if fails else UNDECIDED
    return ThresholdCall(verdict, side, threshold, mean, sd, n, low, high)


# ---------------------------------------------------------------------- numbers of a text


@dataclass(frozen=True)
class Cited:
    """A number of a text as the checker reads it."""

    text: str
    """As written: ``0.238``, ``0.2979 ± 0.0130``, ``−1.9 points``, ``37%``."""
    line: int
    """1-based line of the text."""
    block: int
    """The paragraph, list item or table row it stands in (differences are recomputed within one)."""
    value: float
    """The value as a fraction: a percentage (``%``, ``pp``, ``percentage points``, decimal ``points``) / 100."""
    places: int
    """Decimals of ``value`` as written (a percentage's plus 2)."""
    sd: float | None = None
    """The sd of a ``mean ± sd`` pair."""
    sd_places: int = 0


_MASKS = [
    re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1", re.M | re.S),  # fenced code blocks
    re.compile(r"<!--.*?-->", re.S),  # HTML comments
    re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?\1", re.S),  # code spans (within a paragraph)
    re.compile(r"\]\([^)]*\)"),  # link and image targets
    re.compile(r"https?://\S+"),  # bare URLs
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),  # ISO dates
]

_NUMBER = re.compile(r"(?<![\w.])([−-]?)(\d+)(?:\.(\d+))?(?:\s?(%|percentage points\b|points\b|pp\b))?(?!\w|\.\d)")
"""A number standing alone: not glued to letters or other numbers (``rm50``, ``L2``, ``6.9B``, ``2e-4``,
``1.2.3``, hex hashes), with an optional minus (``-`` or ``−``) and percentage unit."""

_PAIR_GAP = re.compile(r"\s*±\s*")


def _masked(text: str) -> str:
    """``text`` with code, comments, link targets, URLs and dates blanked (newlines kept)."""
    for pattern in _MASKS:
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return text


def _blocks(text: str) -> list[int]:
    """The block number of each line: a table row is a block, a list item or a paragraph another."""
    blocks, block, prev_table = [], 0, False
    for line in text.split("\n"):
        table = line.lstrip().startswith("|")
        if table or prev_table or not line.strip() or re.match(r"\s*([-*+]|\d+[.)])\s", line):
            block += 1
        blocks.append(block)
        prev_table = table
    return blocks


def _parse(m: re.Match) -> tuple[float, int, bool]:
    """(value as a fraction, decimals written, checked?) of a :data:`_NUMBER` match."""
    sign, whole, decimals, unit = m.groups()
    value = float(f"{whole}.{decimals or 0}") * (-1 if sign else 1)
    places = len(decimals or "")
    if unit == "points" and decimals is None:  # "8 points" of a sweep: a count
        return value, places, False
    if unit:
        return value / 100, places + 2, True
    return value, places, decimals is not None


def cited_numbers(markdown: str) -> list[Cited]:
    """The numbers of a markdown text that :func:`orphans` checks, in order.

    Checked: numbers with decimals (``0.238``, ``−0.019``, each end of ``0.05–0.07``), ``mean ± sd``
    pairs, and percentages (``37%``, ``2 pp``, ``2 percentage points``, ``1.9 points``). Ignored: integers
    without a unit or with ``points`` (counts, steps, seeds, coefficients, years, table indices, a sweep's
    "8 points"); numbers glued to letters or to other
    numbers (``rm50``, ``L2``, ``6.9B``, ``fp32``, ``2e-4``, versions like ``1.2.3``, hashes); anything in
    code blocks or code spans (commands, paths, hashes, versions: put non-data decimals there), HTML
    comments, link targets, URLs and ISO dates.
    """
    text = _masked(markdown)
    blocks = _blocks(text)
    matches = list(_NUMBER.finditer(text))
    out, i = [], 0
    while i < len(matches):
        m = matches[i]
        value, places, checked = _parse(m)
        line = text.count("\n", 0, m.start())
        nxt = matches[i + 1] if i + 1 < len(matches) else None
        if nxt is not None and _PAIR_GAP.fullmatch(text, m.end(), nxt.start()):
            sd, sd_places, sd_checked = _parse(nxt)
            if checked or sd_checked:
                out.append(Cited(markdown[m.start():nxt.end()], line + 1, blocks[line], value, places, sd, sd_places))
            i += 2
            continue
        if checked:
            out.append(Cited(markdown[m.start():m.end()], line + 1, blocks[line], value, places))
        i += 1
    return out


def numbers_in(markdown: str) -> list[float]:
    """The values :func:`cited_numbers` reads in a text (pairs give their mean and sd): pass a
    reference's numbers to :func:`orphans` as ``known``."""
    return [v for c in cited_numbers(markdown) for v in (c.value, c.sd) if v is not None]


# ---------------------------------------------------------------------- the data behind them


@dataclass(frozen=True)
class Source:
    """A data file the numbers of a text may come from (CSV or JSON)."""

    path: Path
    group_by: tuple[str, ...] = ()
    """CSV: the columns that name a group of seeds (``sequnlearn.report.GROUP_COLUMNS``). Each decimal
    column outside them gets its mean and sample sd over each group's rows as data too."""


@dataclass
class _Data:
    """Every value and every (mean, sd) pair the sources give, sorted for look-ups."""

    values: list[float] = field(default_factory=list)
    pairs: list[tuple[float, float]] = field(default_factory=list)


def _number(cell) -> float | None:
    """A CSV cell or JSON leaf as a finite number, else None (booleans are not numbers)."""
    if isinstance(cell, bool) or cell is None:
        return None
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _add_spread(data: _Data, values: list[float]) -> None:
    """The mean and sample sd of ``values`` (two or more) as data and as a pair."""
    if len(values) > 1:
        mean, sd = statistics.fmean(values), statistics.stdev(values)
        data.values += [mean, sd]
        data.pairs.append((mean, sd))


def _read_csv(src: Source, data: _Data) -> None:
    """Every numeric cell; ``X mean`` / ``X sd`` columns of a row as pairs; group means and sds."""
    import csv
    import io as stringio

    from sequnlearn import io

    rows = list(csv.DictReader(stringio.StringIO(io.read_text(src.path, "data file"))))
    cols = list(rows[0]) if rows else []
    missing = [c for c in src.group_by if c not in cols]
    if rows and missing:
        raise UserError(f"data file {src.path} has no column {missing[0]!r}; give group_by columns it has ({cols})")
    for row in rows:
        data.values += [v for v in map(_number, row.values()) if v is not None]
        for col in cols:
            stem = col[:-len("mean")] if col.endswith(("_mean", " mean")) else None
            if stem is not None and (stem + "sd") in row:
                mean, sd = _number(row[col]), _number(row[stem + "sd"])
                if mean is not None and sd is not None:
                    data.pairs.append((mean, sd))
    if src.group_by:
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            groups.setdefault(tuple(row[c] for c in src.group_by), []).append(row)
        decimal = [c for c in cols if c not in src.group_by and any("." in (r[c] or "") for r in rows)
                   and all(_number(r[c]) is not None for r in rows if r[c])]
        for group in groups.values():
            for col in decimal:
                _add_spread(data, [v for v in (_number(r[col]) for r in group) if v is not None])


def _read_json(src: Source, data: _Data) -> None:
    """Every number of a JSON file; objects with numeric ``mean`` and ``sd`` as pairs."""
    from sequnlearn import io

    stack = [io.read_json(src.path, "data file")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            mean, sd = _number(node.get("mean")), _number(node.get("sd"))
            if mean is not None and sd is not None:
                data.pairs.append((mean, sd))
            stack += node.values()
        elif isinstance(node, list):
            stack += node
        elif (value := _number(node)) is not None and not isinstance(node, str):
            data.values.append(value)


def _load(sources: Iterable[Source | Path | str]) -> _Data:
    """What ``sources`` give, sorted.

    Raises:
        UserError: a file that is missing, unreadable, damaged or neither CSV nor JSON.
    """
    data = _Data()
    for src in sources:
        src = src if isinstance(src, Source) else Source(Path(src))
        suffix = Path(src.path).suffix.lower()
        if suffix not in (".csv", ".json"):
            raise UserError(f"data file {src.path} is not .csv or .json; give the files the text's numbers come from")
        (_read_csv if suffix == ".csv" else _read_json)(src, data)
    data.values.sort()
    data.pairs.sort()
    return data


# ---------------------------------------------------------------------- orphans


def _tol(places: int, cap: int | None) -> float:
    """Half a unit of the last decimal compared (``cap`` decimals at most), plus float slack."""
    return 0.5 * 10.0 ** -(places if cap is None else min(places, cap)) + 1e-9


def _has(values: list[float], x: float, tol: float) -> bool:
    i = bisect_left(values, x - tol)
    return i < len(values) and values[i] <= x + tol


def _has_pair(pairs: list[tuple[float, float]], mean: float, sd: float, tol_mean: float, tol_sd: float) -> bool:
    i = bisect_left(pairs, (mean - tol_mean, -math.inf))
    while i < len(pairs) and pairs[i][0] <= mean + tol_mean:
        if abs(pairs[i][1] - sd) <= tol_sd:
            return True
        i += 1
    return False


def _span(value: float, tol: float, values: list[float]) -> tuple[float, float]:
    """What a written number may stand for: the data values it rounds from (their range), else ± ``tol``."""
    i, j = bisect_left(values, value - tol), bisect_right(values, value + tol)
    return (values[i], values[j - 1]) if i < j else (value - tol, value + tol)


def _is_difference(c: Cited, block: list[Cited], data: _Data, known: list[float], cap: int | None) -> bool:
    """``c`` is a − b (either order) of two numbers of its block, or of one of them and a known value.

    Each term stands for the data values it rounds from (the written value ± its rounding when none),
    so a difference of numbers found in the data is checked to ``c``'s own rounding.
    """
    terms = [_span(n.value, _tol(n.places, cap), data.values) for n in block if n is not c]
    others = terms + [(k, k) for k in known]
    tol, x = _tol(c.places, cap), abs(c.value)
    for i, (alo, ahi) in enumerate(terms):
        for blo, bhi in others[i + 1:]:
            lo, hi = alo - bhi, ahi - blo  # every a - b
            if lo - tol <= x <= hi + tol or lo - tol <= -x <= hi + tol:
                return True
    return False


def orphans(markdown: str, sources: Sequence[Source | Path | str], *, places: int | None = None,
            known: Iterable[float] = ()) -> list[Cited]:
    """The numbers of ``markdown`` (:func:`cited_numbers`) that the data files neither give nor recompute.

    A number is found when it matches, to half a unit of its last written decimal (or of ``places``
    decimals when that is coarser):

    - a value of a source (a CSV cell, a JSON number) or of ``known`` (constants such as chance, or the
      reference's numbers: :func:`numbers_in`);
    - the mean or sample sd of a decimal column over a group of rows (:attr:`Source.group_by`);
    - a ``mean ± sd`` pair: both numbers at once, from one row's ``X mean`` / ``X sd`` columns, a JSON
      object's ``mean`` / ``sd``, or one group's mean and sd;
    - a difference a − b (either order) of two numbers cited in the same paragraph, list item or table
      row, or of one of them and a ``known`` value; a term found in the data stands for the data values
      it rounds from, any other for its written value ± its rounding.

    Ratios, sums, t statistics and other derived numbers are not recomputed: ship them in a file.

    Raises:
        UserError: a source that is missing, damaged or neither CSV nor JSON, or a ``group_by`` column it lacks.
    """
    data, known = _load(sources), sorted(float(k) for k in known)
    data.values = sorted(data.values + known)
    cited = cited_numbers(markdown)
    blocks: dict[int, list[Cited]] = {}
    for c in cited:
        blocks.setdefault(c.block, []).append(c)
    return [c for c in cited if not _found(c, data, blocks[c.block], known, places)]


def _found(c: Cited, data: _Data, block: list[Cited], known: list[float], cap: int | None) -> bool:
    """Whether :func:`orphans` finds ``c`` in ``data`` or recomputes it from its block."""
    tol = _tol(c.places, cap)
    if c.sd is not None:
        return _has_pair(data.pairs, c.value, c.sd, tol, _tol(c.sd_places, cap))
    return _has(data.values, c.value, tol) or _is_difference(c, block, data, known, cap)
