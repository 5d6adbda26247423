"""Settings against a baseline setting from a report's per-seed files (`report --against`, #27 item 9).

Small hand-made report_styles.csv / tamper_curves.csv whose calls are computed by hand: one setting clearly
lower than the baseline (every seed 0.15 below, seed sd 0.01), one within its spread, one without attacks.
"""

import json
from pathlib import Path

import pytest

from sequnlearn.cli import main
from sequnlearn.comparison import compare_settings, setting_label, write_comparison
from sequnlearn.config import UnlearnConfig, build, dump_yaml, preset_dict
from sequnlearn.errors import UserError
from sequnlearn.evidence import orphans
from sequnlearn.report import csv_text

BASE, LOW, WITHIN = "forget_loss=random_ce", "forget_loss=max_entropy", "forget_loss=topk_entropy"
FORGET = {BASE: (0.25, 0.26, 0.27), LOW: (0.10, 0.11, 0.12), WITHIN: (0.25, 0.28, 0.24)}
RETAIN = {BASE: (0.96, 0.97, 0.98), LOW: (0.955, 0.975, 0.985), WITHIN: (0.96, 0.97, 0.98)}
ATTACKED = {BASE: ((0.88, 0.92), (0.92,), (0.94,)), LOW: ((0.50,), (0.52,), (0.54,))}
"""Forget accuracy at step 50 of each unlearning seed's attacks (seed 1 of BASE: two attack seeds, mean 0.90);
WITHIN was never attacked."""


def _style_rows() -> list[dict]:
    rows = [{"Run": "baseline", "Group": "", "seed": "", "style": "cloze", "forget acc": 1.0, "retain acc": 0.97,
             "path": "runs/x/baseline"}]
    for g, setting in enumerate((BASE, LOW, WITHIN), start=1):
        for i, seed in enumerate((1, 2, 3)):
            rows.append({"Run": len(rows), "Group": g, "seed": seed, "style": "cloze", "forget acc": FORGET[setting][i],
                         "retain acc": RETAIN[setting][i], "path": f"runs/x/{setting}_seed={seed}"})
    return rows


def _tamper_rows() -> list[dict]:
    rows = []
    for setting, per_seed in ATTACKED.items():
        for seed, values in zip((1, 2, 3), per_seed):
            for attack_seed, value in enumerate(values):
                for step, acc in ((10, 0.99), (50, value)):  # step 10 is not compared
                    rows.append({"model": f"{setting}_seed={seed}", "role": "attack", "lr": 2e-4, "seed": attack_seed,
                                 "step": step, "forget_acc": acc, "style": "cloze", "source": "runs/t"})
            rows.append({"model": f"{setting}_seed={seed} on benign text", "role": "benign", "lr": 2e-4, "seed": 0,
                         "step": 50, "forget_acc": 0.0, "style": "cloze", "source": "runs/t"})
    return rows


@pytest.fixture
def report(tmp_path) -> Path:
    (tmp_path / "report_styles.csv").write_text(csv_text(_style_rows()))
    (tmp_path / "tamper_curves.csv").write_text(csv_text(_tamper_rows()))
    return tmp_path


def _calls(report: Path) -> dict[tuple[str, str], object]:
    return {(v.setting, v.metric): v for v in compare_settings(report, BASE)}


def test_a_setting_is_its_directory_name_without_its_seed():
    assert setting_label("runs/s/forget_loss=max_entropy_seed=2", 2) == "forget_loss=max_entropy"
    assert setting_label("runs/s/seed=12_method=full_lr=0.0002", 12) == "method=full_lr=0.0002"
    assert setting_label("runs/s/seed=1_x=2_seed=12", 1) == "x=2_seed=12"  # only its own seed
    assert setting_label("runs/l2-rm50", 42) == "l2-rm50"


def test_a_clearly_lower_setting_is_called_lower_beyond_two_pooled_sd(report):
    calls = _calls(report)
    forget = calls[(LOW, "forget")]
    assert forget.verdict == f"lower than {BASE} (beyond 2 pooled sd)"
    assert forget.difference == pytest.approx(-0.15) and forget.pooled_sd == pytest.approx(0.01)
    attacked = calls[(LOW, "forget after 50 attack steps")]  # 0.52 against (0.90 + 0.92 + 0.94) / 3
    assert attacked.b.values == pytest.approx((0.90, 0.92, 0.94)) and attacked.difference == pytest.approx(-0.40)
    assert attacked.verdict.startswith("lower than") and attacked.note == ""


def test_a_difference_within_the_spread_is_not_distinguishable(report):
    calls = _calls(report)
    retain = calls[(LOW, "retain")]  # d = 0.0016667, pooled sd = sqrt((0.000233 + 0.0001) / 2) = 0.0129
    assert retain.difference == pytest.approx(0.005 / 3) and retain.pooled_sd == pytest.approx((1 / 6000) ** 0.5)
    assert retain.verdict == "not distinguishable at 3 seeds"
    assert calls[(WITHIN, "forget")].verdict == "not distinguishable at 3 seeds"  # d = -0.0033, s = 0.0187
    assert calls[(WITHIN, "retain")].difference == 0 and calls[(WITHIN, "retain")].verdict.startswith("not disting")


def test_a_setting_without_attacks_is_not_run_and_hides_nothing(report):
    calls = _calls(report)
    assert calls[(WITHIN, "forget after 50 attack steps")].verdict == "not run: no attack reached step 50 in this style"
    assert (BASE, "forget") not in calls and len(calls) == 6  # the baseline is not compared with itself
    (report / "tamper_curves.csv").unlink()
    assert _calls(report)[(LOW, "forget after 50 attack steps")].verdict == "not run: this report has no tamper_curves.csv"
    assert _calls(report)[(LOW, "forget")].verdict.startswith("lower than")


def test_the_files_hold_every_number_of_the_text(report):
    assert write_comparison(report, BASE) == ["comparison.md", "comparison.json"]
    md = (report / "comparison.md").read_text()
    assert f"| {LOW} | forget | 0.1100 ± 0.0100 (n=3) | 0.2600 ± 0.0100 (n=3) | -0.1500 | 0.0100 | lower" in md
    data = json.loads((report / "comparison.json").read_text())
    assert data["against"] == BASE and data["rule"] == {"sd_multiplier": 2.0, "tamper_step": 50}
    assert orphans(md, [report / "comparison.json"], places=4) == []


def test_an_unknown_baseline_is_one_line_naming_the_settings(report):
    with pytest.raises(UserError, match=f"no setting of this report; give one of: {LOW}, {BASE}, {WITHIN}"):
        compare_settings(report, "forget_loss=npo")


# ---------------------------------------------------------------------- the CLI


def _run(root: Path, setting: str, seed: int, forget: float) -> None:
    cfg = build(UnlearnConfig, {**preset_dict("tiny"), "seed": seed, "forget_loss": setting.split("=")[1]})
    run = root / f"{setting}_seed={seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    styles = {"cloze": {"forget_acc": forget, "retain_acc": 0.9}, "letter": {"forget_acc": forget, "retain_acc": 0.8}}
    (run / "eval.json").write_text(json.dumps({**styles["cloze"], "style": "cloze", "styles": styles}))


def test_report_against_writes_the_comparison_and_refuses_an_unknown_label_first(tmp_path, capsys, snapshot):
    for i, seed in enumerate((1, 2, 3)):
        _run(tmp_path / "sweep", BASE, seed, FORGET[BASE][i])
        _run(tmp_path / "sweep", LOW, seed, FORGET[LOW][i])
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "rep"), "--against", "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"give one of: {LOW}, {BASE}" in err and snapshot(tmp_path) == before
    main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "rep"), "--against", BASE])
    assert "comparison.md, comparison.json" in capsys.readouterr().out
    data = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    calls = {(c["style"], c["metric"]): c["verdict"] for c in data["comparisons"]}
    assert calls[("cloze", "forget")] == calls[("letter", "forget")] == f"lower than {BASE} (beyond 2 pooled sd)"
    assert calls[("cloze", "forget after 50 attack steps")].startswith("not run")
