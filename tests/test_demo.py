"""The whole toy-world demo on the reduced world: unlearning lowers forget accuracy, keeps retain."""

import json

import pytest

from sequnlearn.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    main(["demo", "--reduced", "--out", str(root / "demo"), "--world", str(root / "world")])
    return root / "demo"


def test_demo_writes_summary_report_and_plots(demo):
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["metric"] == "cloze_acc" and summary["wall_s"] > 0
    for key in ("baseline", "unlearned"):
        assert set(summary[key]) == {"forget_acc", "retain_acc"}
        assert set(summary["letter"][key]) == {"forget_acc", "retain_acc"}
        assert 0 <= summary["letter"][key]["forget_acc"] <= 1
    assert [p["step"] for p in summary["tamper"]][:2] == [0, 5]
    report = (demo / "report.md").read_text()
    assert "| Base |" in report and "| Unlearned" in report and "Tampering attack" in report
    assert "Letter format" in report
    for png in ("accuracy_per_phase.png", "losses.png", "tamper/tamper.png"):
        assert (demo / png).stat().st_size > 10_000
    assert (demo / "unlearn" / "eval.json").exists() and (demo / "unlearn" / "model" / "config.json").exists()


def test_demo_audits_base_unlearned_and_attacked_models(demo):
    summary = json.loads((demo / "summary.json").read_text())
    audit = json.loads((demo / "unlearn" / "audit.json").read_text())
    assert summary["audit"] == str(demo / "unlearn" / "audit.json")
    assert [m["label"] for m in audit["models"]] == ["base", "toy-l2", "attacked"]
    assert audit["layers"] == ["0", "1", "2", "3"] and audit["models"][1]["target_layers"] == [3, 2]
    assert [p["label"] for p in audit["phases"]] == ["after L3", "after L2"]
    # the last layer's logit lens is the model's own cloze accuracy
    assert audit["models"][0]["forget"]["lens"][-1] == pytest.approx(summary["baseline"]["forget_acc"])
    assert audit["models"][1]["forget"]["lens"][-1] == pytest.approx(summary["unlearned"]["forget_acc"])
    assert audit["models"][2]["forget"]["lens"][-1] == pytest.approx(summary["tamper"][-1]["forget_acc"])
    report = (demo / "report.md").read_text()
    assert "## Knowledge audit" in report and "| 3* |" in report and "after L3" in report
    assert (demo / "unlearn" / "audit.png").stat().st_size > 10_000


def test_unlearning_lowers_forget_and_keeps_retain(demo):
    summary = json.loads((demo / "summary.json").read_text())
    base, after = summary["baseline"], summary["unlearned"]
    assert base["forget_acc"] >= 0.6, "the reduced world's base model must know its facts"
    assert after["forget_acc"] <= base["forget_acc"] - 0.2
    assert after["retain_acc"] >= base["retain_acc"] - 0.1
    assert summary["tamper"][0]["forget_acc"] == pytest.approx(after["forget_acc"])


def test_demo_attacks_the_controls(demo):
    summary = json.loads((demo / "summary.json").read_text())
    controls = summary["tamper_controls"]
    assert set(controls) == {"base", "retain-tuned", "benign"}
    assert controls["base"][0]["forget_acc"] == pytest.approx(summary["baseline"]["forget_acc"])
    assert controls["benign"][0]["forget_acc"] == pytest.approx(summary["unlearned"]["forget_acc"])
    assert len(controls["retain-tuned"]) == len(summary["tamper"])
    table = (demo / "tamper" / "tamper.md").read_text()
    assert "base (before unlearning)" in table and "on benign text" in table
    assert "relearning baseline" in (demo / "report.md").read_text()


def test_the_full_demo_attacks_with_the_base_and_benign_controls_and_its_report_names_only_those():
    from sequnlearn.config import TamperConfig, load_config
    from sequnlearn.demo import controls_note, full_overrides

    unlearn_sets, tamper_sets = full_overrides()
    assert load_config(TamperConfig, preset="toy-tamper", overrides=tamper_sets).controls == ["base", "benign"]
    assert load_config(TamperConfig, preset="toy-tamper").controls == ["base", "retain-tuned", "benign"]  # findings
    assert unlearn_sets == []
    full, every = controls_note(["base", "benign"]), controls_note(["benign", "retain-tuned", "base"])
    assert "relearning baseline" in full and "on benign text" in full and "base + benign fine-tune" not in full
    assert every.index("relearning") < every.index("base + benign fine-tune") < every.index("on benign text")
    assert controls_note([]) == "The attack fine-tunes on the forget corpus."


def test_the_demo_unlearns_as_sequnlearn_unlearn_does_with_its_config(demo, tmp_path):
    """Evaluating and auditing after each phase leaves the run alone (it once switched the LoRA dropouts
    off for the phases after the first): the plain command on the demo's config gives the same run."""
    run = demo / "unlearn"
    main(["unlearn", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "plain")])
    keys = ("step", "forget_loss", "retain_loss", "grad_norm")
    steps = [[{k: line[k] for k in keys} for line in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
             for d in (run, tmp_path / "plain")]
    assert steps[0] == steps[1] and {s["step"] for s in steps[0]} == set(range(len(steps[0])))
    weights = [(d / "model" / "model.safetensors").read_bytes() for d in (run, tmp_path / "plain")]
    assert weights[0] == weights[1]
