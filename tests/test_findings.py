"""The seven Key Findings computed from a report's per-seed files (synthetic CSVs whose answers are known)."""

import json
import math
import statistics
from pathlib import Path

import pytest

from sequnlearn.cli import main
from sequnlearn.config import UnlearnConfig, build, dump_yaml, preset_dict
from sequnlearn.evidence import (DIRECTION_ONLY, NOT_REPRODUCED, REPRODUCES, UNDECIDED, Source, numbers_in,
                                 orphans)
from sequnlearn.findings import (FINDINGS, NOT_RUN, RETAIN_DROP_LIMIT, decide, read_report, render,
                                 write_findings)
from sequnlearn.report import GROUP_COLUMNS, csv_text

OFFS = [-0.02, -0.01, 0.0, 0.01, 0.02]  # 5 seeds around a mean: sample sd 0.0158114
SD5 = statistics.stdev(OFFS)
ATTACK_OFFS = [-0.01, 0.0, 0.01]  # 3 unlearning seeds: sd 0.01

# (loss, rm, ret) -> (forget mean, retain mean) in cloze; letter is the same minus 0.05 forget.
SWEEP = {("L2", 10, 5): (0.54, 0.95), ("L2", 20, 5): (0.44, 0.95),  # 0.10 apart: a clear fall
         ("L2", 30, 5): (0.43, 0.95),  # 0.01 below rm20: within noise
         ("L2", 40, 5): (0.45, 0.95),  # above rm30: reversed
         ("L2", 50, 5): (0.20, 0.955),  # below chance by more than 2 sd
         ("KL", 50, 5): (0.25, 0.60), ("KL", 5, 50): (0.35, 0.898), ("KL", 5, 100): (0.40, 0.90)}
BASE = (1.0, 0.96)
# tamper: (name, role) -> forget at steps 0, 10, 50 (the models' unlearning-seed offsets added)
L2_NAME, KL_NAME = "remove_coef=50_seed={}", "remove_coef=5_retain_coef=100_seed={}"
CURVES = {(L2_NAME, "attack"): (0.24, 0.60, 0.97), (KL_NAME, "attack"): (0.47, 0.79, 0.93),
          (L2_NAME, "benign"): (0.24, 0.25, 0.26)}


def _dir_name(loss: str, rm: float, ret: float) -> str:
    """A sweep point's directory name, without the seed (toy-l2 varies remove_coef only)."""
    return f"remove_coef={rm}_seed=" if loss == "L2" and ret == 5 else f"remove_coef={rm}_retain_coef={ret}_seed="


def _styles_rows(root: Path, sweep: dict = SWEEP, seeds: int = 5) -> list[dict]:
    """report_styles.csv rows as ``report.style_rows`` writes them, each run's eval.json beside it."""
    rows = [{"Run": "baseline", "Group": "", "Layers": "-", "remove_coef": "-", "retain_coef": "-",
             "retain loss": "-", "seed": "", "style": style, "forget acc": BASE[0] - drop, "retain acc": BASE[1],
             "path": str(root / "base")} for style, drop in (("cloze", 0.0), ("letter", 0.05))]
    run = 0
    for group, ((loss, rm, ret), (forget, retain)) in enumerate(sweep.items(), start=1):
        for seed, off in zip(range(1, seeds + 1), OFFS if seeds == 5 else ATTACK_OFFS):
            run += 1
            path = root / ("sweep-" + loss) / f"{_dir_name(loss, rm, ret)}{seed}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "eval.json").write_text(json.dumps({"forget_acc": forget, "forget_chance": 0.25}))
            rows += [{"Run": run, "Group": group, "Layers": "3→2 (step 1)", "remove_coef": float(rm),
                      "retain_coef": float(ret), "retain loss": loss, "seed": seed, "style": style,
                      "forget acc": round(forget + off - drop, 6), "retain acc": round(retain + off / 10, 6),
                      "path": str(path)} for style, drop in (("cloze", 0.0), ("letter", 0.05))]
    return rows


def _tamper_rows(root: Path, curves: dict = CURVES, base_attack: bool = True) -> list[dict]:
    """tamper_curves.csv rows of one cloze tamper directory: 3 unlearning seeds, attack seed 1."""
    src = root / "tamper"
    src.mkdir(exist_ok=True)
    (src / "tamper.json").write_text(json.dumps({"chance": 0.25, "runs": []}))
    rows = []
    for (name, role), accs in curves.items():
        for seed, off in zip((1, 2, 3), ATTACK_OFFS):
            label = name.format(seed) + (" on benign text" if role == "benign" else "")
            rows += [{"model": label, "role": role, "lr": 0.0002, "seed": 1, "step": step,
                      "forget_acc": round(acc + off, 6), "retain_acc": 0.9, "style": "cloze", "source": str(src)}
                     for step, acc in zip((0, 10, 50), accs)]
    if base_attack:
        rows += [{"model": "base (before unlearning)", "role": "base", "lr": 0.0002, "seed": 1, "step": step,
                  "forget_acc": 1.0, "retain_acc": 0.96, "style": "cloze", "source": str(src)} for step in (0, 10, 50)]
    return rows


def _write(folder: Path, styles: list[dict] | None = None, tamper: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if styles is not None:
        (folder / "report_styles.csv").write_text(csv_text(styles))
    if tamper is not None:
        (folder / "tamper_curves.csv").write_text(csv_text(tamper))
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("findings")
    return _write(root / "rep", _styles_rows(root), _tamper_rows(root))


def _rows(results, number: int, context: str = "cloze") -> dict:
    return {r.claim.text: r for r in results[number - 1].rows if r.context.startswith(context)}


def test_a_clear_difference_reproduces_a_reversed_one_does_not_and_noise_is_direction_only(report):
    results = decide(read_report(report))
    one = _rows(results, 1)
    assert one["rm10 above rm20"].verdict == REPRODUCES  # 0.10 apart, pooled sd 0.0158
    assert one["rm20 above rm30"].verdict == DIRECTION_ONLY  # 0.01 apart
    assert one["rm30 above rm40"].verdict == NOT_REPRODUCED  # reversed
    row = one["rm10 above rm20"]
    assert (row.a.mean, row.a.sd, row.a.n, row.b.mean) == (pytest.approx(0.54), pytest.approx(SD5), 5,
                                                            pytest.approx(0.44))
    assert (row.difference, row.pooled_sd, row.t) == (pytest.approx(0.10), pytest.approx(SD5),
                                                      pytest.approx(0.10 / SD5))
    below = one["rm50 below chance"]  # mean 0.20, sd 0.0158: 0.20 + 2 sd < 0.25
    assert (below.verdict, below.b.mean, below.difference) == (REPRODUCES, 0.25, pytest.approx(-0.05))
    summary = dict(results[0].summaries)["cloze"]
    assert "the fall reproduces from rm10 to rm20 and stops there" in summary
    assert "rm20 above rm30: direction only" in summary
    three = _rows(results, 3)  # rm50 below each other L2 point
    assert {k: r.verdict for k, r in three.items()} == {f"rm50 below rm{x}": REPRODUCES for x in (10, 20, 30, 40)}


def test_thresholds_chance_and_the_styles(report):
    results = decide(read_report(report))
    two = _rows(results, 2)["L2 rm50/ret5 retain within the limit of the base model's"]
    assert two.verdict == REPRODUCES and two.b.mean == pytest.approx(BASE[1] - RETAIN_DROP_LIMIT)
    assert two.difference == pytest.approx(0.955 - (BASE[1] - RETAIN_DROP_LIMIT))
    four = results[3].rows[0]
    assert (four.verdict, four.a.mean, four.a.n) == (REPRODUCES, 0.25, 8 * 5 + 1)  # each eval.json, the tamper.json
    letter = _rows(results, 1, "letter")["rm10 above rm20"]
    assert letter.verdict == REPRODUCES and letter.a.mean == pytest.approx(0.49)
    six = _rows(results, 6)
    assert six["rm5/ret100 retain above rm50/ret5"].verdict == REPRODUCES
    assert six["rm5/ret100 retain above rm5/ret50"].verdict == DIRECTION_ONLY  # 0.002 apart, retain sd 0.0016


def test_a_missing_group_is_not_run_and_hides_nothing(report):
    results = decide(read_report(report))
    five = _rows(results, 5)
    assert five["at rm50/ret5 KL keeps less retain than L2"].verdict == REPRODUCES
    missing = five["L2 forgets less at rm5/ret100 than at rm50/ret5"]
    assert missing.verdict == NOT_RUN and "no L2 rm5/ret100 forget in style cloze" in missing.note
    six = _rows(results, 6)
    assert six["rm5/ret100 retain above rm20/ret10"].verdict == NOT_RUN
    seven = _rows(results, 7)
    assert seven["L2 recovers without the scored answers: step 10 above step 0"].verdict == NOT_RUN
    assert "no L2 rm50/ret5 on no-answer text, step 10" in seven[
        "L2 recovers without the scored answers: step 10 above step 0"].note


def test_a_chain_with_a_missing_point_says_where_it_was_not_run(tmp_path):
    sweep = {k: v for k, v in SWEEP.items() if k != ("L2", 30, 5)}
    results = decide(read_report(_write(tmp_path / "rep", _styles_rows(tmp_path, sweep))))
    text = dict(results[0].summaries)["cloze"]
    assert "the fall reproduces from rm10 to rm20; rm20 to rm30 was not run" in text and "2 not run" in text


def test_the_attack_across_unlearning_seeds_and_its_controls(report):
    seven = _rows(decide(read_report(report)), 7)
    start = seven["step 0: L2 below KL"]
    assert (start.verdict, start.a.n, start.a.spread, start.a.sd) == (REPRODUCES, 3, "unlearning seeds",
                                                                      pytest.approx(0.01))
    assert seven["step 10: L2 equal to KL"].verdict == NOT_REPRODUCED  # 0.19 apart: they differ
    assert seven["L2 recovers: step 10 above step 0"].verdict == REPRODUCES
    assert seven["KL recovers: step 50 above step 0"].verdict == REPRODUCES
    base = seven["L2 below the base model under the attack, step 50"]  # 0.97 ± 0.01 vs 1.0 (one attack)
    assert (base.verdict, base.b.n, base.difference) == (REPRODUCES, 1, pytest.approx(-0.03))
    assert seven["L2: forget text above benign text, step 50"].verdict == REPRODUCES
    assert seven["KL: forget text above benign text, step 10"].verdict == NOT_RUN  # no KL benign control


def test_equal_within_noise_is_undecided(tmp_path):
    curves = {(L2_NAME, "attack"): (0.24, 0.60, 0.97), (KL_NAME, "attack"): (0.47, 0.605, 0.97)}
    folder = _write(tmp_path / "rep", _styles_rows(tmp_path), _tamper_rows(tmp_path, curves, base_attack=False))
    seven = _rows(decide(read_report(folder)), 7)
    assert seven["step 10: L2 equal to KL"].verdict == UNDECIDED
    assert seven["step 50: L2 equal to KL"].verdict == UNDECIDED
    assert seven["L2 below the base model under the attack, step 10"].verdict == NOT_RUN


def test_missing_files_make_findings_not_run(tmp_path):
    empty = decide(read_report(_write(tmp_path / "rep")))
    assert all(r.verdict == NOT_RUN for f in empty for r in f.rows)
    assert "no report_styles.csv" in empty[0].rows[0].note and "no tamper_curves.csv" in empty[6].rows[0].note
    assert "no eval.json or tamper.json" in empty[3].rows[0].note
    assert dict(empty[0].summaries) == {"-": NOT_RUN}
    (tmp_path / "rep" / "report_styles.csv").write_text("Run,Group\n1,1\n")  # a damaged file: not run, no error
    assert "has no column 'retain loss'" in decide(read_report(tmp_path / "rep"))[0].rows[0].note
    tamper_only = decide(read_report(_write(tmp_path / "t", tamper=_tamper_rows(tmp_path))))
    assert "no L2 rm50/ret5 attacked, step 0" in tamper_only[6].rows[0].note  # no runs to name the models


def test_a_model_name_shared_by_two_settings_is_not_guessed(tmp_path):
    sweep = {**SWEEP, ("L2", 5, 100): (0.6, 0.97)}  # toy-l2-vs-kl names its runs as toy-kl does
    folder = _write(tmp_path / "rep", _styles_rows(tmp_path, sweep), _tamper_rows(tmp_path))
    results = decide(read_report(folder))
    seven = _rows(results, 7)
    assert seven["step 0: L2 below KL"].verdict == NOT_RUN
    assert "runs of several settings have this name" in seven["step 0: L2 below KL"].note
    assert seven["L2 recovers: step 10 above step 0"].verdict == REPRODUCES
    assert _rows(results, 5)["L2 forgets less at rm5/ret100 than at rm50/ret5"].verdict == REPRODUCES


def _sources(folder: Path) -> list:
    return [*(Source(folder / name, group_by=cols) for name, cols in GROUP_COLUMNS.items()), folder / "findings.json"]


REFERENCE = [v for f in FINDINGS for v in numbers_in(f.reference)]


def test_every_number_of_findings_md_comes_from_the_files(report):
    assert write_findings(report) == ["findings.md", "findings.json"]
    md = (report / "findings.md").read_text()
    assert "0.5400 ± 0.0158 (5 seeds)" in md and "| reproduces |" in md and "## Not run" in md
    assert "k = 2" in md and "pooled" in md.split("## Verdicts")[0]  # the rule, in words, above the tables
    assert orphans(md, _sources(report), known=REFERENCE) == []
    edited = md.replace("0.5400 ± 0.0158", "0.5400 ± 0.0168", 1)
    assert [c.text for c in orphans(edited, _sources(report), known=REFERENCE)] == ["0.5400 ± 0.0168"]
    # the sweep's means ± sd and differences come from report_styles.csv alone; t, pooled sd, the
    # attack's means across models and the thresholds are in findings.json
    data = json.loads((report / "findings.json").read_text())
    assert data["rule"]["sd_multiplier"] == 2.0
    csv_only = {c.text for c in orphans(md, _sources(report)[:2], known=REFERENCE + [0.25, RETAIN_DROP_LIMIT])}
    assert "0.5400 ± 0.0158" not in csv_only and "0.4400 ± 0.0158" not in csv_only


def test_t_is_written_as_json_even_when_infinite(tmp_path):
    flat = {("L2", 10, 5): (0.5, 0.9), ("L2", 20, 5): (0.3, 0.9)}
    rows = [r for r in _styles_rows(tmp_path, flat) if r["style"] == "cloze"]
    for r in rows:
        if r["Run"] != "baseline":
            r["forget acc"] = 0.5 if r["remove_coef"] == 10 else 0.3
    folder = _write(tmp_path / "rep", rows)
    write_findings(folder)
    data = json.loads((folder / "findings.json").read_text())
    first = data["findings"][0]["comparisons"][0]
    assert (first["verdict"], first["t"], first["pooled_sd"]) == (REPRODUCES, "inf", 0.0)
    assert "| ∞ |" in render(decide(read_report(folder)))


# ---------------------------------------------------------------------- the CLI


def _run(root: Path, name: str, seed: int, rm: float, ret: float, forget: float) -> None:
    cfg = build(UnlearnConfig, {**preset_dict("tiny"), "seed": seed, "remove_coef": rm, "retain_coef": ret})
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    styles = {"cloze": {"forget_acc": forget, "retain_acc": 0.9}, "letter": {"forget_acc": forget, "retain_acc": 0.8}}
    (run / "eval.json").write_text(json.dumps({**styles["cloze"], "forget_chance": 0.25, "style": "cloze",
                                               "styles": styles}))


def test_report_findings_writes_them_from_the_files_it_just_wrote(tmp_path, capsys):
    for seed, off in zip((1, 2, 3), ATTACK_OFFS):
        _run(tmp_path / "sweep", f"remove_coef=10_seed={seed}", seed, 10, 5, 0.5 + off)
        _run(tmp_path / "sweep", f"remove_coef=20_seed={seed}", seed, 20, 5, 0.3 + off)
    out = tmp_path / "rep"
    out.mkdir()
    (out / "tamper_curves.csv").write_text(csv_text(_tamper_rows(tmp_path)))  # stale: not this report's
    main(["report", str(tmp_path / "sweep"), "--out", str(out), "--findings"])
    assert "findings.md, findings.json" in capsys.readouterr().out
    data = json.loads((out / "findings.json").read_text())
    first = data["findings"][0]["comparisons"][0]
    assert (first["claim"], first["verdict"], first["a"]["values"]) == ("rm10 above rm20", REPRODUCES,
                                                                        [0.49, 0.5, 0.51])
    assert data["findings"][3]["comparisons"][0]["verdict"] == REPRODUCES  # chance 0.25 from the eval.json
    tamper = data["findings"][6]["comparisons"][0]
    assert (tamper["verdict"], tamper["note"]) == (NOT_RUN, "this report wrote no tamper_curves.csv")
    assert not math.isnan(first["t"]) and (out / "findings.md").read_text().startswith("# The reference's")
