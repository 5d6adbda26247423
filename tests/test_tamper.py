"""The tampering attack on a tiny model: weights move, step 0 = plain evaluation, failures stop it."""

import json
from pathlib import Path

import pytest
import torch

from sequnlearn.config import TamperConfig, load_config
from sequnlearn.data.mcq import load_task
from sequnlearn.errors import UserError
from sequnlearn.eval import evaluate
from sequnlearn.model.tiny import byte_tokenizer, tiny_model
from sequnlearn.tamper import attack, chunk_corpus, tamper, worst_case

MCQ = str(Path(__file__).parent / "fixtures" / "mcq_60.jsonl")
TEXTS = ["Which color is painted on crate 0? orange.", "Which animal lives in enclosure 1? lynx."] * 20


def small_cfg(**kw) -> TamperConfig:
    base = dict(steps=4, eval_every=2, batch_size=4, per_device_batch_size=2, max_length=32, lrs=[1e-3],
                seeds=[0], forget_task=MCQ, eval_style="cloze", eval_limit=20, data="unused")
    base.update(kw)
    return TamperConfig(**base)


def loader():
    return tiny_model("gpt_neox", seed=3), byte_tokenizer()


def test_chunks_are_max_length_slices_of_the_eos_joined_stream():
    tok = byte_tokenizer()
    chunks = chunk_corpus(["ab", "cde"], tok, max_length=3)
    stream = tok("ab")["input_ids"] + [tok.eos_token_id] + tok("cde")["input_ids"] + [tok.eos_token_id]
    assert chunks.tolist() == [stream[0:3], stream[3:6]]


def test_attack_changes_weights_and_step_zero_is_a_plain_evaluation():
    cfg = small_cfg()
    task = load_task(MCQ)
    model, tok = loader()
    plain = evaluate(model, tok, [task], style="cloze", limit=20, progress=False)
    (summary,) = plain["tasks"].values()
    seen = {}

    def keep():
        seen["model"], tok2 = loader()
        return seen["model"], tok2

    curve = attack(keep, cfg, lr=1e-3, seed=0, tasks={"forget": task}, texts=TEXTS, progress=False)
    assert [p["step"] for p in curve] == [0, 2, 4]
    assert curve[0]["forget_acc"] == summary["acc"] and curve[0]["train_loss"] is None
    assert curve[1]["train_loss"] > curve[2]["train_loss"]
    fresh = tiny_model("gpt_neox", seed=3)
    moved = [not torch.equal(a, b) for a, b in zip(seen["model"].parameters(), fresh.parameters())]
    assert all(moved)


def test_a_failing_evaluation_stops_the_attack(monkeypatch):
    import sequnlearn.eval as ev

    calls = {"n": 0}
    real = ev.evaluate

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("evaluation backend crashed")
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate", flaky)
    with pytest.raises(RuntimeError, match="crashed"):
        attack(loader, small_cfg(), lr=1e-3, seed=0, tasks={"forget": load_task(MCQ)}, texts=TEXTS, progress=False)


def test_worst_case_is_the_highest_point_over_all_curves():
    runs = [{"model": "a", "lr": 1e-5, "seed": 1, "curve": [{"step": 0, "forget_acc": 0.3}, {"step": 10, "forget_acc": 0.5}]},
            {"model": "a", "lr": 8e-5, "seed": 1, "curve": [{"step": 0, "forget_acc": 0.3}, {"step": 10, "forget_acc": 0.6},
                                                            {"step": 20, "forget_acc": 0.55}]}]
    assert worst_case(runs) == {"model": "a", "lr": 8e-5, "seed": 1, "step": 10, "forget_acc": 0.6}


def test_tamper_writes_json_plot_and_table(tmp_path):
    corpus = tmp_path / "attack.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = small_cfg(data=str(corpus), data_fields=["text"], lrs=[1e-3, 1e-4])
    result = tamper({"tiny": loader}, cfg, tmp_path, baseline=0.9, progress=False)
    saved = json.loads((tmp_path / "tamper.json").read_text())
    assert saved["worst_case"] == result["worst_case"] and len(saved["runs"]) == 2
    assert saved["chance"] == pytest.approx(0.25)
    assert (tmp_path / "tamper.png").stat().st_size > 10_000
    table = (tmp_path / "tamper.md").read_text()
    assert "| Step 0 | Step 2 | Step 4 |" in table and "Worst case" in table


def test_tamper_config_checks():
    with pytest.raises(UserError, match="lrs must be positive"):
        TamperConfig(lrs=[0.0])
    with pytest.raises(UserError, match="not a multiple"):
        TamperConfig(batch_size=6, per_device_batch_size=4)
    assert load_config(TamperConfig, overrides=["lrs=[1e-5,2e-5]"]).lrs == [1e-5, 2e-5]
