"""The evidence machinery: the decision rule (numbers computed by hand), the number-provenance check, and
the per-seed CSVs ``sequnlearn report`` writes for it (every scoring style per run, tamper curves)."""

import csv
import json
import math
from pathlib import Path

import pytest

from sequnlearn.config import UnlearnConfig, build, dump_yaml, preset_dict
from sequnlearn.errors import UserError
from sequnlearn.evidence import (DIRECTION_ONLY, NOT_REPRODUCED, REPRODUCES, SD_MULTIPLIER, UNDECIDED, Source,
                                 against_threshold, cited_numbers, compare, numbers_in, orphans, pooled_sd)
from sequnlearn.report import GROUP_COLUMNS, write_report

A = [0.30, 0.32, 0.37]  # mean 0.33, sample sd sqrt(0.0026 / 2) = 0.0360555


# ---------------------------------------------------------------------- the decision rule


@pytest.mark.parametrize("direction, b, verdict, t", [
    (1, [0.20, 0.22, 0.27], REPRODUCES, 0.10 / 0.0360555128),  # same sd: d 0.10 > 2 * 0.0361
    (1, [0.25, 0.27, 0.32], DIRECTION_ONLY, 0.05 / 0.0360555128),  # d 0.05 <= 0.0721
    (-1, [0.25, 0.27, 0.32], NOT_REPRODUCED, 0.05 / 0.0360555128),  # the other sign, small
    (-1, [0.20, 0.22, 0.27], NOT_REPRODUCED, 0.10 / 0.0360555128),  # the other sign, large
    (1, A, NOT_REPRODUCED, 0.0),  # no difference
])
def test_compare_calls_the_finding_by_the_rule(direction, b, verdict, t):
    call = compare(direction, A, b)
    assert call.verdict == verdict and call.t == pytest.approx(t)
    assert (call.mean_a, call.sd_a, call.n_a) == (pytest.approx(0.33), pytest.approx(0.0360555128), 3)
    assert call.pooled_sd == pytest.approx(0.0360555128) and call.difference == pytest.approx(0.33 - sum(b) / 3)
    assert SD_MULTIPLIER == 2.0


def test_pooled_sd_is_the_standard_formula():
    # variances 0.0013 (n 3) and 0.0002 (n 2): sqrt((2 * 0.0013 + 1 * 0.0002) / 3) = sqrt(0.0028 / 3)
    assert pooled_sd(0.0360555128, 3, 0.0141421356, 2) == pytest.approx(math.sqrt(0.0028 / 3))
    assert pooled_sd(0.03, 3, 0.05, 3) == pytest.approx(math.sqrt((0.03 ** 2 + 0.05 ** 2) / 2))  # equal n
    assert pooled_sd(0.0360555128, 3, None, 1) == pytest.approx(0.0360555128)  # a single run adds no dof
    assert pooled_sd(None, 1, None, 1) is None


def test_single_runs_never_reproduce_and_zero_spread_decides():
    one = compare(1, [0.5], [0.2])
    assert (one.verdict, one.pooled_sd, one.t, one.sd_a) == (DIRECTION_ONLY, None, None, None)
    assert compare(-1, [0.5], [0.2]).verdict == NOT_REPRODUCED
    assert compare(1, [0.5], [0.20, 0.22, 0.27]).verdict == REPRODUCES  # 0.2700 > 2 * 0.0361, n 1 against 3
    flat = compare(-1, [0.4, 0.4], [0.5, 0.5])
    assert (flat.verdict, flat.pooled_sd, flat.t) == (REPRODUCES, 0.0, -math.inf)


def test_compare_refuses_bad_input():
    for direction, a, b, match in ((0, A, A, "direction 0"), (1, [], A, "group a has no values"),
                                   (1, A, [0.3, math.nan], "non-finite")):
        with pytest.raises(UserError, match=match):
            compare(direction, a, b)


@pytest.mark.parametrize("values, side, verdict", [
    ([0.010, 0.012, 0.014], "below", REPRODUCES),  # mean 0.012, sd 0.002: [0.008, 0.016] < 0.03
    ([0.01, 0.02, 0.03], "below", UNDECIDED),  # mean 0.02, sd 0.01: [0.00, 0.04] holds 0.03
    ([0.05, 0.06, 0.07], "below", NOT_REPRODUCED),  # [0.04, 0.08] > 0.03
    ([0.05, 0.06, 0.07], "above", REPRODUCES),
    ([0.010, 0.012, 0.014], "above", NOT_REPRODUCED),
    ([0.001], "below", UNDECIDED),  # one run: no interval
])
def test_threshold_claims_are_decided_when_the_interval_is_on_one_side(values, side, verdict):
    call = against_threshold(values, 0.03, side)
    assert call.verdict == verdict
    if values == [0.01, 0.02, 0.03]:
        assert (call.mean, call.low, call.high) == (pytest.approx(0.02), pytest.approx(0.0), pytest.approx(0.04))
    with pytest.raises(UserError, match="neither 'below' nor 'above'"):
        against_threshold(values, 0.03, "under")


# ---------------------------------------------------------------------- numbers of a text


def test_cited_numbers_checks_decimals_pairs_and_percentages_and_ignores_the_rest():
    text = ("Run 2026-11-29 at commit `bd47eba`, torch `2.13`, 3 seeds, rm50/ret5, L2, 6.9B, lr 2e-4, v1.2.3.\n"
            "| 1 | 0.2979 ± 0.0130 | −0.019 | 0.05–0.07 |\n\n"
            "A drop of 1.9 points (37%) over 8 points, [see](runs/x_0.5.csv) and <!-- 0.99 -->.\n```\n0.77\n```\n")
    got = [(c.text, c.value, c.places, c.sd, c.line) for c in cited_numbers(text)]
    assert got == [("0.2979 ± 0.0130", 0.2979, 4, 0.013, 2), ("−0.019", -0.019, 3, None, 2),
                   ("0.05", 0.05, 2, None, 2),
                   ("0.07", 0.07, 2, None, 2), ("1.9 points", pytest.approx(0.019), 3, None, 4),
                   ("37%", 0.37, 2, None, 4)]
    assert numbers_in("0.5 ± 0.1 and 3") == [0.5, 0.1]


DOC = """# Findings

| Group | forget acc | retain acc |
|---|---|---|
| 1 | 0.3300 ± 0.0361 | 0.450 |
| 2 | 0.2800 ± 0.0361 | 0.440 |

Group 1 forgets less: 0.330 against 0.280, a difference of 0.050 (t = 1.39); retain 0.450 against 0.440,
1.0 points apart.
Seed 3 alone reached 0.37; chance is 0.25, and 0.08 above it is 0.33.
"""


@pytest.fixture
def data_files(tmp_path) -> list:
    per_seed = tmp_path / "per_seed.csv"
    per_seed.write_text("Group,seed,forget acc,retain acc\n" + "".join(
        f"{g},{s},{f},{r}\n" for g, fs, r in ((1, A, 0.45), (2, [0.25, 0.27, 0.32], 0.44))
        for s, f in zip((1, 2, 3), fs)))
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"comparison": {"difference": 0.05, "t": 1.3868}}))
    return [Source(per_seed, group_by=("Group",)), stats]


def test_a_doc_whose_numbers_all_come_from_the_files_has_no_orphans(data_files):
    assert orphans(DOC, data_files, known=[0.25]) == []


@pytest.mark.parametrize("edit, orphan", [
    (("0.2800 ± 0.0361", "0.2800 ± 0.0316"), "0.2800 ± 0.0316"),  # a pair's sd edited
    (("| 0.450 |", "| 0.455 |"), "0.455"),  # a value edited
    (("reached 0.37", "reached 0.41"), "0.41"),
    (("(t = 1.39)", "(t = 1.49)"), "1.49"),
    (("a difference of 0.050", "a difference of 0.060"), "0.060"),
])
def test_one_number_edited_by_hand_is_an_orphan(data_files, edit, orphan):
    assert [c.text for c in orphans(DOC.replace(*edit), data_files, known=[0.25])] == [orphan]


def test_differences_come_from_their_own_paragraph_and_rounding_is_as_written(data_files, tmp_path):
    apart = DOC.replace("0.330 against 0.280, ", "") + "\nThe two means: 0.330 and 0.280.\n"
    assert [c.text for c in orphans(apart, data_files[:1], known=[0.25])] == ["0.050", "1.39"]
    assert orphans("Group 1 forget 0.3 ± 0.04 and 0.33.", data_files) == []  # coarser rounding still matches
    assert [c.text for c in orphans("Group 1 forget 0.333.", data_files)] == ["0.333"]
    assert [c.text for c in orphans("Group 1 forget 0.333.", data_files, places=2)] == []
    drop = tmp_path / "drop.csv"
    drop.write_text("model,retain\nbase,0.8625\nl2,0.84375\n")  # a drop of 0.01875
    assert orphans("Retain 0.844 against 0.863: −0.019.", [drop]) == []
    # the written terms differ by 0.019 too, but the data they stand for do not differ by 0.020
    assert [c.text for c in orphans("Retain 0.844 against 0.863: −0.020.", [drop])] == ["−0.020"]


def test_provenance_check_refuses_bad_sources(data_files, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        orphans(DOC, [tmp_path / "nope.csv"])
    with pytest.raises(UserError, match="not .csv or .json"):
        orphans(DOC, [tmp_path / "doc.md"])
    with pytest.raises(UserError, match="no column 'step'"):
        orphans(DOC, [Source(data_files[0].path, group_by=("step",))])


# ---------------------------------------------------------------------- per-seed CSVs of the report


def _fake_run(root: Path, name: str, seed: int, rm: float, styles: dict | None) -> None:
    """A finished-looking run directory, scored in ``styles`` (the first the headline)."""
    cfg = build(UnlearnConfig, {**preset_dict("tiny"), "layers": [3, 2], "seed": seed, "remove_coef": rm})
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    head = next(iter(styles.values())) if styles else {"forget_acc": 0.3, "retain_acc": 0.4}
    ev = {**head, "forget_chance": 0.25, **({"style": next(iter(styles)), "styles": styles} if styles else {})}
    (run / "eval.json").write_text(json.dumps(ev))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "phase": 0, "layer": 3, "forget_loss": 1.0,
                                                   "retain_loss": 0.0}) + "\n")


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


LETTER = [(0.25, 0.60), (0.27, 0.62), (0.32, 0.64)]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report of 3 seeds at rm 10 and 1 at rm 50, scored in cloze and letter, plus a baseline and a tamper.json."""
    root = tmp_path_factory.mktemp("evidence")
    for seed, cloze, (f, r) in zip((1, 2, 3), A, LETTER):
        _fake_run(root / "sweep", f"remove_coef=10_seed={seed}", seed, 10,
                  {"cloze": {"forget_acc": cloze, "retain_acc": 0.44}, "letter": {"forget_acc": f, "retain_acc": r}})
    _fake_run(root / "sweep", "remove_coef=50_seed=7", 7, 50,
              {"cloze": {"forget_acc": 0.28, "retain_acc": 0.43}, "letter": {"forget_acc": 0.3, "retain_acc": 0.5}})
    (root / "sweep" / "baseline").mkdir()
    (root / "sweep" / "baseline" / "eval.json").write_text(json.dumps({
        "baseline": True, "model": "tiny", "forget_acc": 1.0, "retain_acc": 0.97, "style": "cloze",
        "styles": {"cloze": {"forget_acc": 1.0, "retain_acc": 0.97},
                   "letter": {"forget_acc": 0.84, "retain_acc": 0.86}}}))
    runs = [{"model": "l2" if role == "attack" else "l2 on benign text", "role": role, "lr": 1e-3, "seed": seed,
             "curve": [{"step": s, "forget_acc": a, "retain_acc": 0.9} for s, a in zip((0, 2, 4), accs)]}
            for role, seed, accs in (("attack", 1, [0.3, 0.4, 0.5]), ("attack", 2, [0.3, 0.5, 0.6]),
                                     ("attack", 3, [0.3, 0.6, 0.7]), ("benign", 1, [0.3, 0.31, 0.33]))]
    (root / "tamper").mkdir()
    (root / "tamper" / "tamper.json").write_text(json.dumps({
        "config": {"eval_every": 2, "table_steps": None, "eval_style": "cloze"}, "baseline": 0.52, "chance": 0.25,
        "runs": runs, "worst_case": {"model": "l2", "lr": 1e-3, "seed": 3, "step": 4, "forget_acc": 0.7}}))
    write_report([root / "sweep", root / "tamper"], root / "rep")
    return root


def test_report_writes_every_scoring_style_per_run_and_keeps_report_csv(report):
    rows = _read(report / "rep" / "report_styles.csv")
    assert list(rows[0]) == ["Run", "Group", "Layers", "remove_coef", "retain_coef", "retain loss", "seed", "style",
                             "forget acc", "retain acc", "path"]
    got = [(r["Run"], r["Group"], r["seed"], r["style"], r["forget acc"], r["retain acc"]) for r in rows]
    assert got[:2] == [("baseline", "", "", "cloze", "1.0", "0.97"), ("baseline", "", "", "letter", "0.84", "0.86")]
    assert got[2:6] == [("1", "1", "1", "cloze", "0.3", "0.44"), ("1", "1", "1", "letter", "0.25", "0.6"),
                        ("2", "1", "2", "cloze", "0.32", "0.44"), ("2", "1", "2", "letter", "0.27", "0.62")]
    assert got[-1] == ("4", "2", "7", "letter", "0.3", "0.5")
    assert list(_read(report / "rep" / "report.csv")[0]) == ["Run", "Layers", "remove_coef", "retain_coef",
                                                             "retain loss", "forget acc", "retain acc", "Notes", "path"]


def test_report_without_other_styles_writes_no_styles_file(tmp_path):
    _fake_run(tmp_path / "sweep", "remove_coef=10", 1, 10, None)
    assert "report_styles.csv" not in write_report([tmp_path / "sweep"], tmp_path / "rep")["files"]
    assert not (tmp_path / "rep" / "report_styles.csv").exists()


def test_report_writes_every_point_of_every_attack(report):
    rows = _read(report / "rep" / "tamper_curves.csv")
    assert list(rows[0]) == ["model", "role", "lr", "seed", "step", "forget_acc", "retain_acc", "style", "source"]
    assert len(rows) == 12 and {r["source"] for r in rows} == {str(report / "tamper")}
    assert [tuple(r.values())[:8] for r in rows[3:6]] == [
        ("l2", "attack", "0.001", "2", str(s), str(a), "0.9", "cloze") for s, a in ((0, 0.3), (2, 0.5), (4, 0.6))]
    assert rows[-1]["role"] == "benign" and set(GROUP_COLUMNS["tamper_curves.csv"]) <= set(rows[0])


def test_every_number_of_the_report_comes_from_its_files(report):
    rep = report / "rep"
    sources = [rep / "report.csv", rep / "report_seeds.csv", report / "tamper" / "tamper.json",
               *(Source(rep / name, group_by=cols) for name, cols in GROUP_COLUMNS.items())]
    md = (rep / "report.md").read_text()
    assert "0.2800 ± 0.0361" in md and "0.5000 ± 0.1000" in md  # letter means and tamper means are in it
    assert orphans(md, sources, known=[0.25]) == []
    edited = md.replace("0.5000 ± 0.1000", "0.5000 ± 0.1100", 1)
    assert [c.text for c in orphans(edited, sources, known=[0.25])] == ["0.5000 ± 0.1100"]
