"""The reference's seven Key Findings, each encoded once as data and decided from a report's files.

:mod:`~sequnlearn.findings.claims` holds :data:`FINDINGS`: for each Key Finding of
``sequential-unlearning-experiments.md``, which seed groups are compared (a setting: retain loss, remove_coef,
retain_coef; the base model; for the attack, a tamper role at an attack step), on which metric (forget or
retain accuracy; forget accuracy along the attack), and the reference's direction or threshold.
:mod:`~sequnlearn.findings.decide`: :func:`read_report` reads the per-seed files ``sequnlearn report`` writes
(``report_styles.csv``: every run and seed in every scoring style; ``tamper_curves.csv``: every evaluated
attack step), :func:`decide` calls every comparison by the rule of :mod:`sequnlearn.evidence` per scoring
style (the attack per tamper directory and style). :mod:`~sequnlearn.findings.render`: :func:`render` gives
the markdown and :func:`write_findings` writes ``findings.md`` and ``findings.json``. A missing group or file
makes a comparison "not run", never an error that hides the others.
"""

from sequnlearn.findings.claims import (BELOW_CHANCE, CHANCE, EQUAL, FINDINGS, GREATER, NOT_RUN, REFERENCE_CHANCE,
                                        RETAIN_DROP_LIMIT, TAMPER_STEPS, WITHIN, Claim, Finding, Sel, Setting)
from sequnlearn.findings.decide import FindingResult, ReportFiles, Row, Side, decide, read_report, summary
from sequnlearn.findings.render import RULE, as_json, render, write_findings

__all__ = ["BELOW_CHANCE", "CHANCE", "EQUAL", "FINDINGS", "GREATER", "NOT_RUN", "REFERENCE_CHANCE", "RETAIN_DROP_LIMIT",
           "RULE", "TAMPER_STEPS", "WITHIN", "Claim", "Finding", "FindingResult", "ReportFiles", "Row", "Sel",
           "Setting", "Side", "as_json", "decide", "read_report", "render", "summary", "write_findings"]
