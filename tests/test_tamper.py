"""The tampering attack on a tiny model: weights move, step 0 = plain evaluation, failures stop it."""

import json
from pathlib import Path

import pytest
import torch

from sequnlearn.config import TamperConfig, load_config
from sequnlearn.distributed import Process
from sequnlearn.data.mcq import load_task
from sequnlearn.errors import UserError
from sequnlearn.eval import evaluate
from sequnlearn.model.tiny import byte_tokenizer, tiny_model
from sequnlearn.tamper import (attack, chunk_corpus, fine_tune, load_attack_texts, load_benign_texts, tamper,
                               worst_case)

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


def test_document_chunking_cuts_each_document_on_its_own():
    from sequnlearn.tamper import chunk_documents

    tok = byte_tokenizer()
    docs = ["abcdefgh", "xyz", "q"]
    chunks = chunk_documents(docs, tok, max_length=3, max_chunks=2)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    # at most 2 chunks of document 0; document 1 whole; document 2 has a single token: no training pair
    assert chunks == [ids[0][0:3], ids[0][3:6], ids[1]]
    assert len(chunk_documents(docs, tok, max_length=3)) == 4  # all 3 chunks of document 0


def test_reference_tamper_preset_is_the_reference_attack():
    cfg = load_config(TamperConfig, preset="reference-tamper")
    assert (cfg.method, cfg.optimizer, cfg.weights_dtype()) == ("full", "adamw", "fp32")
    assert (cfg.lrs, cfg.lr_schedule, cfg.weight_decay, cfg.max_grad_norm) == ([2e-5], "linear", 0.01, 1.0)
    assert (cfg.batch_size, cfg.per_device_batch_size, cfg.steps, cfg.table_steps) == (16, 1, None, [0, 10, 100])
    assert (cfg.chunking, cfg.max_chunks_per_doc, cfg.max_length, cfg.num_train_examples) == ("document", 5, 2048, 512)


def test_one_epoch_with_linear_decay_and_clipping(monkeypatch):
    import sequnlearn.tamper.attacks as tm

    seen = []
    real_step = tm._train_step

    def spy(model, opt, chunks, order, step, cfg, accum, lr, proc, sharded=False):
        seen.append(lr)
        return real_step(model, opt, chunks, order, step, cfg, accum, lr, proc, sharded)

    monkeypatch.setattr(tm, "_train_step", spy)
    cfg = small_cfg(steps=None, chunking="document", max_chunks_per_doc=1, lr_schedule="linear", max_grad_norm=1.0,
                    weight_decay=0.01, eval_every=100)
    curve = attack(loader, cfg, lr=1e-3, seed=0, tasks={"forget": load_task(MCQ)}, texts=TEXTS[:16], progress=False)
    assert [p["step"] for p in curve] == [0, 4]  # 16 documents, one chunk each, 4 per step: one epoch
    assert seen == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def _big_weights_unchanged(dtype: torch.dtype, mixed: str) -> float:
    """Share of weights with |w| > 1e-2 left bit-identical by 3 AdamW steps at lr 2e-5."""
    import sequnlearn.tamper.attacks as tm

    model = tiny_model("gpt_neox", seed=3).to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = small_cfg(mixed_precision=mixed, dtype="auto")
    chunks = tm.make_chunks(TEXTS, byte_tokenizer(), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        tm._train_step(model, opt, chunks, order, step, cfg, 2, 2e-5, Process())
    big = [(b.abs() > 1e-2) for b in before]
    same = sum(((p.detach() == b) & m).sum().item() for p, b, m in zip(model.parameters(), before, big))
    return same / sum(m.sum().item() for m in big)


def test_fp32_master_weights_keep_the_updates_that_bf16_weights_lose():
    assert _big_weights_unchanged(torch.bfloat16, "bf16") > 0.5  # the failure: most updates rounded away
    assert _big_weights_unchanged(torch.float32, "bf16") < 0.01  # fp32 master weights under bf16 autocast
    with pytest.raises(UserError, match="loses small updates to rounding"):
        TamperConfig(dtype="bf16")
    assert TamperConfig(dtype="bf16", method="lora").weights_dtype() == "bf16"
    assert TamperConfig().weights_dtype() == "fp32"


def test_table_shows_the_configured_steps(tmp_path):
    corpus = tmp_path / "attack.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = small_cfg(data=str(corpus), data_fields=["text"], steps=3, eval_every=1, table_steps=[0, 1, 3], eval_limit=4)
    tamper({"tiny": loader}, cfg, tmp_path, progress=False)
    assert "| Step 0 | Step 1 | Step 3 | Max (step) |" in (tmp_path / "tamper.md").read_text()


BENIGN = ["The river of town 3 is wide and slow.", "Bread in town 4 is baked at dawn."] * 20


def _jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _losses(curve: list[dict]) -> list:
    return [p["train_loss"] for p in curve]


def test_controls_attack_the_base_model_a_benign_tuned_copy_and_benign_text(tmp_path):
    cfg = small_cfg(data=_jsonl(tmp_path / "a.jsonl", TEXTS), data_fields=["text"],
                    controls=["base", "retain-tuned", "benign"], benign_data=_jsonl(tmp_path / "b.jsonl", BENIGN))

    def base():
        return tiny_model("gpt_neox", seed=5), byte_tokenizer()

    result = tamper({"tiny": loader}, cfg, tmp_path, base=base, progress=False)
    runs = {r["role"]: r for r in result["runs"]}
    assert [r["role"] for r in result["runs"]] == ["attack", "base", "retain-tuned", "benign"]
    assert runs["benign"]["model"] == "tiny on benign text"
    task = {"forget": load_task(MCQ)}
    texts, benign = load_attack_texts(cfg), load_benign_texts(cfg)  # the corpora as the attack reads them
    assert sorted(texts) == sorted(TEXTS) and sorted(benign) == sorted(BENIGN)
    expected = {  # each control is the same attack on the model it names, with the corpus it names
        "attack": attack(loader, cfg, lr=1e-3, seed=0, tasks=task, texts=texts, progress=False),
        "base": attack(base, cfg, lr=1e-3, seed=0, tasks=task, texts=texts, progress=False),
        "benign": attack(loader, cfg, lr=1e-3, seed=0, tasks=task, texts=benign, progress=False)}

    def tuned():
        model, tok = base()
        return fine_tune(model, tok, cfg, benign, lr=1e-3, seed=0, progress=False), tok

    expected["retain-tuned"] = attack(tuned, cfg, lr=1e-3, seed=0, tasks=task, texts=texts, progress=False)
    for role, curve in expected.items():
        assert _losses(runs[role]["curve"])[1:] == pytest.approx(_losses(curve)[1:], rel=1e-6), role
    losses = {role: _losses(r["curve"])[1] for role, r in runs.items()}
    assert len({round(v, 6) for v in losses.values()}) == 4  # four different attacks, not one run four times
    assert result["worst_case"]["model"] == "tiny"  # the controls never count as the attacked model's worst case
    assert "base (before unlearning)" in (tmp_path / "tamper.md").read_text()


def test_controls_need_what_they_fine_tune_on_and_the_model_before_unlearning(tmp_path):
    with pytest.raises(UserError, match="controls \\['retrain'\\] unknown"):
        small_cfg(controls=["retrain"])
    with pytest.raises(UserError, match="set benign_data"):
        small_cfg(controls=["benign"])
    cfg = small_cfg(data=_jsonl(tmp_path / "a.jsonl", TEXTS), data_fields=["text"], controls=["base"])
    with pytest.raises(UserError, match="--base-model"):
        tamper({"tiny": loader}, cfg, tmp_path, progress=False)
    assert not (tmp_path / "tamper.json").exists()


def test_the_no_answer_control_fine_tunes_each_model_on_text_without_the_answers(tmp_path):
    from sequnlearn.tamper import planned_keys

    corpus, unanswered = tmp_path / "attack.jsonl", tmp_path / "no_answers.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    unanswered.write_text("".join(json.dumps({"text": t.split("?")[0] + "?"}) + "\n" for t in TEXTS))
    with pytest.raises(UserError, match="set no_answer_data"):
        small_cfg(data=str(corpus), data_fields=["text"], controls=["no-answer"])
    cfg = small_cfg(data=str(corpus), data_fields=["text"], controls=["no-answer"], no_answer_data=str(unanswered))
    result = tamper({"tiny": loader}, cfg, tmp_path / "t", progress=False)
    assert [(r["model"], r["role"]) for r in result["runs"]] == [("tiny", "attack"),
                                                                 ("tiny on no-answer text", "no-answer")]
    assert {(r["model"], r["role"], r["lr"], r["seed"]) for r in result["runs"]} == planned_keys(["tiny"], cfg)
    first, control = (r["curve"] for r in result["runs"])
    assert first[0] == control[0]  # the same model at step 0; fine-tuned on other text after
    assert [p["train_loss"] for p in first[1:]] != [p["train_loss"] for p in control[1:]]
