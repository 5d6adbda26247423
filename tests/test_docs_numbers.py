"""Every number the docs report comes from a shipped data file (issue #25): :func:`sequnlearn.evidence.orphans`
over each results page and the files it cites. Edit a number on a page, or drop a file, and this fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from sequnlearn.evidence import Source, numbers_in, orphans
from sequnlearn.report import GROUP_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _sources(folder: Path) -> list[Source]:
    """Every CSV and JSON file of ``folder``, the report's per-seed CSVs grouped by their seed-free columns."""
    return [Source(p, group_by=GROUP_COLUMNS.get(p.name, ())) for p in sorted(folder.iterdir())
            if p.suffix in (".csv", ".json")]


def _known(folder: Path) -> list[float]:
    """Numbers a page may quote without a data file: those of the code-generated markdown shipped beside
    its data (e.g. ``findings.md``: the reference's numbers in the findings' titles, the rule's limits)."""
    return [v for md in sorted(folder.glob("*.md")) for v in numbers_in(md.read_text(encoding="utf-8"))]


PAGES = {
    "toy-world-findings.md": DOCS / "toy-world-findings",
    "upstream-comparison.md": DOCS / "upstream-comparison",
}


def _toy_world_section() -> str:
    """README's "Toy world" section: the demo's table and the five-seed summary."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Toy world")
    return text[start:text.index("\n## ", start + 1)]


def test_every_number_of_the_readmes_toy_world_section_is_in_a_shipped_file():
    missing = orphans(_toy_world_section(), _readme_sources())
    assert not missing, "numbers without a shipped file: " + "; ".join(f"line {c.line}: {c.text}" for c in missing)
    edited = _toy_world_section().replace("| 0.594 / 0.956 |", "| 0.604 / 0.956 |")
    assert [c.text for c in orphans(edited, _readme_sources())] == ["0.604"]


def _readme_sources() -> list[Source]:
    """The demo's summary and the findings' seed table (not every file of the findings: their thousands of
    values and group means would match almost any three-decimal number)."""
    return [Source(DOCS / "demo" / "summary.json"), Source(DOCS / "toy-world-findings" / "report_seeds.csv")]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_number_of_a_results_page_is_in_its_shipped_files(page):
    folder = PAGES[page]
    text = (DOCS / page).read_text(encoding="utf-8")
    missing = orphans(text, _sources(folder), known=_known(folder))
    assert not missing, "numbers without a shipped file: " + "; ".join(f"line {c.line}: {c.text}" for c in missing)


def test_the_check_catches_an_edited_number():
    folder = PAGES["toy-world-findings.md"]
    text = (DOCS / "toy-world-findings.md").read_text(encoding="utf-8")
    edited = text.replace("0.403 ± 0.070", "0.413 ± 0.070", 1)
    assert edited != text
    assert [c.text for c in orphans(edited, _sources(folder), known=_known(folder))] == ["0.413 ± 0.070"]
