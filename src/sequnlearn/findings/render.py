"""Writing the decided findings: :func:`render` gives ``findings.md``, :func:`as_json` ``findings.json``,
:func:`write_findings` reads a report's files, decides and writes both."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from sequnlearn.evidence import SD_MULTIPLIER
from sequnlearn.findings.claims import NOT_RUN, REFERENCE_CHANCE, RETAIN_DROP_LIMIT, TAMPER_STEPS
from sequnlearn.findings.decide import FindingResult, Side, decide, read_report


RULE = (f"**Rule** (fixed in advance, `sequnlearn.evidence`, k = {SD_MULTIPLIER:g}): a comparison of two groups "
        "of seeds *reproduces* when mean(a) − mean(b) has the reference's sign and exceeds k pooled seed sds "
        "(t = difference / pooled sd); it is *direction only* when the sign matches within that, and *not "
        "reproduced* otherwise. A threshold claim reproduces when mean ± k sd lies wholly on the claimed side, "
        "is not reproduced when it lies wholly on the other, and is *undecided* otherwise and for a single run. "
        "An equality (\"equally vulnerable\") is not reproduced when the two means differ by more than k pooled "
        "sds either way, and undecided otherwise: the rule can show a difference, never an equality. A chain "
        "(rm10 above rm20 above ...) is decided pair by pair. *Not run*: the report lacks a group or a file.")


def _pm(side: Side | None) -> str:
    """A table cell: ``mean ± sd (n spread)``, the value alone for one run or a threshold."""
    if side is None:
        return "-"
    if side.spread == "threshold":
        return f"{side.mean:.4f} (threshold)"
    if side.spread == "the reference":
        return f"{side.mean:.4f}"
    cell = f"{side.mean:.4f}" if side.sd is None else f"{side.mean:.4f} ± {side.sd:.4f}"
    return f"{cell} ({side.n} {side.spread})" if side.n > 1 else f"{cell} (1 run)"


def _num_cell(value: float | None, places: int = 4) -> str:
    """A number to ``places`` decimals, ``∞`` / ``−∞``, or ``-`` for none."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{places}f}"


def render(results: list[FindingResult]) -> str:
    """``findings.md``: the rule, a summary per finding and context, a row per comparison that was run
    (groups, mean ± sd (n), difference, pooled sd, t, verdict) and the comparisons not run, with why."""
    lines = ["# The reference's Key Findings, decided from this report", "",
             "Every number below is computed from this report's per-seed files (`report_styles.csv`, "
             "`tamper_curves.csv`) by `sequnlearn.findings`; `findings.json` holds the same with every value.",
             "", RULE, "", "## Verdicts", "", "| # | Reference finding | Style | Verdict |", "|---|---|---|---|"]
    lines += [f"| {r.finding.number} | {r.finding.reference} | {ctx} | {text} |"
              for r in results for ctx, text in r.summaries]
    lines += ["", "## Comparisons", "", "| # | Style | Claim | a | mean ± sd (n) | b | mean ± sd (n) | "
              "a − b | pooled sd | t | Verdict |", "|" + "---|" * 11]
    done = [row for r in results for row in r.rows if row.verdict != NOT_RUN]
    lines += [f"| {row.finding} | {row.context} | {row.claim.text} | {row.a.label} | {_pm(row.a)} | {row.b.label} | "
              f"{_pm(row.b)} | {_num_cell(row.difference)} | {_num_cell(row.pooled_sd)} | {_num_cell(row.t, 2)} | "
              f"{row.verdict}" + (f" ({row.note})" if row.note else "") + " |" for row in done]
    skipped = [row for r in results for row in r.rows if row.verdict == NOT_RUN]
    if skipped:
        lines += ["", "## Not run", ""]
        lines += [f"- {row.finding}, {row.context}: {row.claim.text} — {row.note}" for row in skipped]
    lines += ["", "## How each finding is encoded", ""]
    lines += [f"- {r.finding.number}: {r.finding.encoding}." for r in results]
    return "\n".join(lines) + "\n"


def _side_json(side: Side | None) -> dict | None:
    """A side of a comparison in ``findings.json``, with its per-seed values."""
    if side is None:
        return None
    return {"label": side.label, "mean": side.mean, "sd": side.sd, "n": side.n, "spread": side.spread,
            "values": list(side.values)}


def _finite(value: float | None):
    """JSON has no infinity: ``"inf"`` / ``"-inf"`` for an infinite t."""
    return value if value is None or math.isfinite(value) else ("inf" if value > 0 else "-inf")


def as_json(results: list[FindingResult]) -> dict:
    """``findings.json``: the rule, and per finding its summaries and every comparison with its values."""
    return {"rule": {"sd_multiplier": SD_MULTIPLIER, "retain_drop_limit": RETAIN_DROP_LIMIT,
                     "reference_chance": REFERENCE_CHANCE, "tamper_steps": list(TAMPER_STEPS)},
            "findings": [{"number": r.finding.number, "reference": r.finding.reference, "encoding": r.finding.encoding,
                          "summaries": [{"context": c, "verdict": s} for c, s in r.summaries],
                          "comparisons": [{"context": row.context, "claim": row.claim.text, "kind": row.claim.kind,
                                           "direction": row.claim.direction, "verdict": row.verdict,
                                           "a": _side_json(row.a), "b": _side_json(row.b),
                                           "difference": row.difference, "pooled_sd": row.pooled_sd,
                                           "t": _finite(row.t), "note": row.note} for row in r.rows]}
                         for r in results]}


def write_findings(folder: Path, written: Iterable[str] | None = None) -> list[str]:
    """``findings.md`` and ``findings.json`` in ``folder``, from the report files there (``written``: only
    those this report wrote); both computed before either is written. Returns the names written."""
    from sequnlearn.runs import atomic_write_text, write_json

    results = decide(read_report(Path(folder), written))
    md, data = render(results), as_json(results)
    atomic_write_text(Path(folder) / "findings.md", md)
    write_json(Path(folder) / "findings.json", data)
    return ["findings.md", "findings.json"]
