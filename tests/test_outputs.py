"""What a finished run gives a user: tensorboard events with the per-step losses, true provenance,
and a model card that `eval` and `tamper` update."""

import json
from pathlib import Path

import pytest

from sequnlearn.cli import main
from sequnlearn.runs import RunDir, read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "mcq_60.jsonl"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    out = tmp_path_factory.mktemp("outputs") / "tiny-tb"
    main(["unlearn", "--preset", "tiny", "--report-to", "tensorboard", "--out", str(out)])
    return RunDir(out)


def test_tensorboard_events_hold_the_per_step_losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run.root.glob(f"{run.root.name}/events.out.tfevents.*")  # the hparams have their own folder
    acc = EventAccumulator(str(events))
    acc.Reload()
    lines = read_jsonl(run.metrics)
    for key in ("forget_loss", "retain_loss"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(line["step"], pytest.approx(line[key], rel=1e-6)) for line in lines]


def test_provenance_fingerprints_the_config_and_the_tokens_used(run):
    from sequnlearn.config import load_config
    from sequnlearn.model.load import load_model
    from sequnlearn.runs import config_sha256, token_fingerprint
    from sequnlearn.unlearn.engine import load_batches

    prov = json.loads(run.provenance.read_text())
    cfg = load_config(preset="tiny", overrides=["report_to=tensorboard"])
    batches = load_batches(cfg, load_model(cfg.model)[1])
    assert prov["config_sha256"] == config_sha256(cfg)
    assert prov["data"]["forget"] == token_fingerprint(batches.forget)
    assert prov["data"]["retain"]["documents"] == 16 != prov["data"]["retain"]["tokens"]
    assert prov["data"]["forget"] != prov["data"]["retain"]
    assert prov["hardware"]["cpu_cores"] >= 1 and prov["sequnlearn"]["version"]


def test_model_card_parses_and_follows_eval_and_tamper(run, tmp_path, capsys):
    from huggingface_hub import ModelCard

    card = ModelCard.load(run.model / "README.md")
    assert card.data.library_name == "transformers" and "unlearning" in card.data.tags
    assert "Unlearning is not proven safe" in card.text and "Not evaluated yet" in card.text
    assert "tiny:forget" in card.text and "random_ce" in card.text

    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text("".join(FIXTURE.read_text().splitlines(keepends=True)[:8]))
    main(["eval", str(run.root), "--data", str(mcq)])
    acc = json.loads(run.eval.read_text())["tasks"][str(mcq)]["acc"]
    card = ModelCard.load(run.model / "README.md")
    assert f"| {mcq} | 8 | {acc:.4f} |" in card.text

    corpus = tmp_path / "attack.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"virus host gene {i} " * 8}) + "\n" for i in range(40)))
    main(["tamper", str(run.root), "--data", str(corpus), "--eval-data", str(mcq), "--steps", "2",
          "--eval-every", "1", "--set", "batch_size=4", "--set", "max_length=64", "--out", str(tmp_path / "t")])
    worst = json.loads((tmp_path / "t" / "tamper.json").read_text())["worst_case"]["forget_acc"]
    card = ModelCard.load(run.model / "README.md")
    assert f"at most **{worst:.4f}**" in card.text and "Not attacked yet" not in card.text
    assert f"| {mcq} | 8 | {acc:.4f} |" in card.text  # the evaluation stays
    capsys.readouterr()


def test_tamper_controls_default_to_the_runs_base_model_and_retain_corpus(run, tmp_path, capsys):
    corpus = tmp_path / "attack.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"virus host gene {i} " * 8}) + "\n" for i in range(40)))
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text("".join(FIXTURE.read_text().splitlines(keepends=True)[:8]))
    main(["tamper", str(run.root), "--data", str(corpus), "--eval-data", str(mcq), "--steps", "2",
          "--eval-every", "2", "--controls", "base,retain-tuned,benign", "--set", "batch_size=4",
          "--set", "max_length=64", "--out", str(tmp_path / "t")])
    result = json.loads((tmp_path / "t" / "tamper.json").read_text())
    assert result["config"]["benign_data"] == "tiny:retain" and result["config"]["controls"] == [
        "base", "retain-tuned", "benign"]
    assert [(r["model"], r["role"]) for r in result["runs"]] == [
        (run.root.name, "attack"), ("base (before unlearning)", "base"),
        ("base + benign fine-tune", "retain-tuned"), (f"{run.root.name} on benign text", "benign")]
    assert result["worst_case"]["model"] == run.root.name
    capsys.readouterr()
