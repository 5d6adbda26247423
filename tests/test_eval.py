"""The fast and lm-eval MCQ backends, their metrics, and ``sequnlearn eval`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sequnlearn.data.mcq import MCQRecord, MCQSubtask, MCQTask, load_mcq_file
from sequnlearn.errors import UserError
from sequnlearn.eval import evaluate, format_table, load_tasks
from sequnlearn.eval.scorer import Question, plan_questions, question_prediction, score_questions, summarize_task
from sequnlearn.model.tiny import byte_tokenizer, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "mcq_60.jsonl"
SMALL = dict(hidden=32, layers=2, heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they spin."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neox", seed=0, **SMALL)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def letter_tokenizer():
    """Byte-level BPE whose merges make " A".." D" single tokens (ids 256..259; EOS 260)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for letter in "ABCD":
        vocab["Ġ" + letter] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", letter) for letter in "ABCD"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def brute_force_loglikelihoods(model, tok, q: Question, max_len: int) -> list[float]:
    """lm-eval's loglikelihood, one forward pass per continuation, written out plainly."""
    out = []
    for cont in q.continuations:
        ctx_ids = tok(q.context)["input_ids"]
        cont_ids = tok(q.context + cont)["input_ids"][len(ctx_ids):]
        inp = (ctx_ids + cont_ids)[-(max_len + 1):][:-1]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)  # (T, V)
        first = len(inp) - len(cont_ids)
        out.append(sum(logprobs[first + j, t].item() for j, t in enumerate(cont_ids)))
    return out


# ---------------------------------------------------------------- fast scoring vs brute force


@pytest.mark.parametrize("tokenizer_kind", ["bytes", "letters"])
@pytest.mark.parametrize("style", ["letter", "cloze"])
def test_fast_scores_equal_brute_force(tokenizer_kind, style):
    tok = byte_tokenizer() if tokenizer_kind == "bytes" else letter_tokenizer()
    model = tiny_model("llama", seed=1, vocab_size=len(tok), **SMALL)
    if tokenizer_kind == "letters":  # " A" is one token, so the letters are read at "Answer:"
        assert len(tok(" A")["input_ids"]) == 1
    task = MCQTask("fixture", [MCQSubtask("f", load_mcq_file(FIXTURE)[:5])], str(FIXTURE))
    questions = plan_questions(task, style=style, limit=None, num_fewshot=1)
    fast = score_questions(model, tok, questions, batch_size=3, progress=False)
    for q, got in zip(questions, fast):
        assert got == pytest.approx(brute_force_loglikelihoods(model, tok, q, 512), abs=1e-4)


def test_left_truncation_as_lm_eval(tok):
    model = tiny_model("gpt_neox", seed=2, max_len=64, **SMALL)  # prompts are ~100-300 bytes
    task = MCQTask("fixture", [MCQSubtask("f", load_mcq_file(FIXTURE)[:4])], str(FIXTURE))
    for style in ("letter", "cloze"):
        questions = plan_questions(task, style=style, limit=None, num_fewshot=0)
        fast = score_questions(model, tok, questions, batch_size=4, progress=False)
        for q, got in zip(questions, fast):
            assert got == pytest.approx(brute_force_loglikelihoods(model, tok, q, 64), abs=1e-4)


def test_letter_style_is_one_forward_per_question(model, tok):
    calls = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        task = MCQTask("fixture", [MCQSubtask("f", load_mcq_file(FIXTURE)[:10])], str(FIXTURE))
        evaluate(model, tok, [task], batch_size=4, progress=False)
    finally:
        handle.remove()
    assert sum(calls) == 10 and len(calls) == 3


# ---------------------------------------------------------------- metrics


def _question(choices: list[str], answer: int) -> Question:
    rec = MCQRecord("q", choices, answer, "cat")
    return Question("t", "s", 0, rec, "ctx", [" " + c for c in choices])


def test_acc_norm_divides_by_choice_length_in_characters():
    q = _question(["a", "bbbb", "cc"], answer=1)
    pred = question_prediction(q, [-2.0, -4.0, -3.0], "cloze")
    assert pred["pred"] == 0  # -2 is the largest loglikelihood
    assert pred["pred_norm"] == 1  # -2/1, -4/4 = -1, -3/2 = -1.5
    expected = math.exp(-4.0) / (math.exp(-2.0) + math.exp(-4.0) + math.exp(-3.0))
    assert pred["correct_prob"] == pytest.approx(expected)
    assert question_prediction(q, [-1.0, -1.0, -5.0], "letter")["pred"] == 0  # ties: first, as numpy


def test_summary_pools_like_lm_eval():
    from lm_eval.api.metrics import mean_stderr, pooled_sample_stderr

    hits = {"a": [1, 0, 1, 1], "b": [0, 0, 1, 0, 1, 1, 1]}
    task = MCQTask("t", [MCQSubtask("a", []), MCQSubtask("b", [])], "here")
    preds = [{"subtask": s, "doc_id": i, "category": s, "answer": 0, "pred": 0 if h else 1, "correct_prob": 0.5,
              "pred_norm": 0 if h else 1, "loglikelihoods": [0.0, 0.0]} for s, hs in hits.items() for i, h in enumerate(hs)]
    res = summarize_task(task, preds, "cloze")
    se = [mean_stderr(h) for h in hits.values()]
    assert res["subtasks"]["a"]["acc"] == 0.75 and res["subtasks"]["a"]["acc_stderr"] == pytest.approx(se[0])
    assert res["acc"] == pytest.approx(7 / 11) and res["n"] == 11
    assert res["acc_stderr"] == pytest.approx(pooled_sample_stderr(se, [4, 7]))
    assert res["acc_norm"] == res["acc"] and res["categories"]["b"]["n"] == 7


# ---------------------------------------------------------------- fast vs lm-eval


@pytest.mark.parametrize("style, shots", [("letter", 0), ("cloze", 0)])
def test_backends_agree(model, tok, style, shots):
    tasks = load_tasks([str(FIXTURE)])
    fast = evaluate(model, tok, tasks, backend="fast", style=style, num_fewshot=shots, batch_size=8, progress=False)
    harness = evaluate(model, tok, tasks, backend="lm-eval", style=style, num_fewshot=shots, batch_size=8)
    a, b = fast["tasks"][str(FIXTURE)], harness["tasks"][str(FIXTURE)]
    assert a["n"] == b["n"] == 60
    assert [p["pred"] for p in a["predictions"]] == [p["pred"] for p in b["predictions"]]
    for pa, pb in zip(a["predictions"], b["predictions"]):
        assert pa["loglikelihoods"] == pytest.approx(pb["loglikelihoods"], abs=1e-4)
    assert a["acc"] == b["acc"] and a["acc_stderr"] == pytest.approx(b["acc_stderr"])
    assert a["correct_prob"] == pytest.approx(b["correct_prob"], abs=1e-5)
    assert {c: s["acc"] for c, s in a["categories"].items()} == {c: s["acc"] for c, s in b["categories"].items()}
    if style == "cloze":
        assert [p["pred_norm"] for p in a["predictions"]] == [p["pred_norm"] for p in b["predictions"]]
        assert a["acc_norm"] == b["acc_norm"]
    assert set(a) == set(b)


def test_limit_and_subtasks_through_both_backends(model, tok):
    recs = load_mcq_file(FIXTURE)
    task = MCQTask("two", [MCQSubtask("x", recs[:20], fewshot=recs[40:43]), MCQSubtask("y", recs[20:40])], "mem",
                   groups={"x": "g1", "y": "g1"})
    fast = evaluate(model, tok, [task], limit=7, num_fewshot=3, progress=False)["tasks"]["two"]
    harness = evaluate(model, tok, [task], limit=7, num_fewshot=3, backend="lm-eval")["tasks"]["two"]
    assert fast["n"] == harness["n"] == 14 and set(fast["subtasks"]) == {"x", "y"}
    assert [p["pred"] for p in fast["predictions"]] == [p["pred"] for p in harness["predictions"]]
    assert fast["groups"]["g1"]["acc"] == fast["acc"]


# ---------------------------------------------------------------- models in memory


def test_peft_model_and_training_mode_are_respected(tok):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("gpt_neox", seed=3, **SMALL)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                           init_lora_weights=False))
    peft.train()
    res = evaluate(peft, tok, str(FIXTURE), limit=12, progress=False)
    assert peft.training
    merged = peft.merge_and_unload().eval()
    ref = evaluate(merged, tok, str(FIXTURE), limit=12, progress=False)
    lls = [v for p in res["tasks"][str(FIXTURE)]["predictions"] for v in p["loglikelihoods"]]
    ref_lls = [v for p in ref["tasks"][str(FIXTURE)]["predictions"] for v in p["loglikelihoods"]]
    assert lls == pytest.approx(ref_lls, abs=1e-4)


def test_bad_options(model, tok):
    with pytest.raises(UserError, match="backend 'vllm' is unknown"):
        evaluate(model, tok, str(FIXTURE), backend="vllm")
    with pytest.raises(UserError, match="limit must be a positive integer"):
        evaluate(model, tok, str(FIXTURE), limit=0)
    with pytest.raises(UserError, match="no task given"):
        evaluate(model, tok, "")
    with pytest.raises(UserError, match="only 59 few-shot examples"):
        evaluate(model, tok, str(FIXTURE), num_fewshot=60, limit=1, progress=False)


def test_format_table(model, tok):
    res = evaluate(model, tok, str(FIXTURE), style="cloze", limit=3, progress=False)
    table = format_table(res)
    assert "acc_norm" in table and "  colors" in table and str(FIXTURE)[:44] in table
    assert table.splitlines()[-1].startswith("backend fast, style cloze, 0-shot")


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_model("gpt_neox", seed=0, **SMALL).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_cli_eval_writes_eval_json(model_dir, tmp_path, capsys):
    from sequnlearn.cli import main

    out = tmp_path / "res" / "e.json"
    main(["eval", str(model_dir), "--data", str(FIXTURE), "--limit", "10", "--batch-size", "4",
          "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    task = res["tasks"][str(FIXTURE)]
    assert res["model"] == str(model_dir) and res["backend"] == "fast" and res["style"] == "letter"
    assert task["n"] == 10 and len(task["predictions"]) == 10 and 0 <= task["acc"] <= 1
    assert set(task["categories"]) == {"colors", "animals", "arithmetic"}
    assert "wrote" in capsys.readouterr().out


def test_cli_eval_into_run_dir(model_dir, tmp_path):
    import shutil

    from sequnlearn.cli import main

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    main(["eval", str(run), "--data", str(FIXTURE), "--limit", "2", "--style", "cloze", "--device", "cpu"])
    res = json.loads((run / "eval.json").read_text())
    assert res["style"] == "cloze" and "acc_norm" in res["tasks"][str(FIXTURE)]


def _cli_error(argv: list[str], capsys) -> str:
    from sequnlearn.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sequnlearn eval: error: ")
    return err


def test_cli_bad_mcq_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    err = _cli_error(["eval", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "e.json")], capsys)
    assert "answer index 5 is out of range for 2 choices" in err and "line 1" in err


def test_cli_unreachable_hub_task(model_dir, tmp_path, monkeypatch, capsys):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("SEQUNLEARN_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    err = _cli_error(["eval", str(model_dir), "--tasks", "wmdp_bio", "--out", str(tmp_path / "e.json")], capsys)
    assert "task wmdp_bio is not reachable on the hub" in err and "--data-dir" in err and "wmdp_bio.jsonl" in err


def test_chance_level_follows_the_number_of_choices():
    from sequnlearn.data.mcq import MCQRecord, MCQSubtask, MCQTask
    from sequnlearn.eval import chance_level

    records = [MCQRecord("q", ["a", "b"], 0), MCQRecord("q", ["a", "b", "c", "d"], 1)]
    task = MCQTask("t", [MCQSubtask("t", records)], "t")
    assert chance_level(task) == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_a_spec_with_its_tasks_loaded_reads_each_once_and_scores_the_same(monkeypatch):
    import sequnlearn.eval as ev
    from sequnlearn.model.tiny import byte_tokenizer, tiny_model

    mcq = str(Path(__file__).parent / "fixtures" / "mcq_60.jsonl")
    reads = []
    real = ev.load_task
    monkeypatch.setattr(ev, "load_task", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    spec = ev.with_loaded_tasks(ev.EvalSpec(mcq, mcq, "cloze", limit=8))
    assert reads == [mcq] and spec.forget_task is spec.retain_task and isinstance(spec.forget_task, MCQTask)
    assert ev.with_loaded_tasks(spec) == spec and reads == [mcq]  # loaded tasks are kept
    model, tok = tiny_model("gpt_neox", seed=3), byte_tokenizer()
    assert ev.forget_retain_accuracy(model, tok, spec) == ev.forget_retain_accuracy(
        model, tok, ev.EvalSpec(mcq, mcq, "cloze", limit=8))
