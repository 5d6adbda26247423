"""Knowledge audit: the probe finds a linearly encoded answer where (and only where) it is, the
logit lens at the last layer is the evaluator, states are each layer's output, and the CLI writes
audit.json/md/png that ``sequnlearn report`` shows."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sequnlearn.audit import (AuditOptions, audit_one, fold_ids, lens_accuracy, probe_accuracy, read_layers)
from sequnlearn.cli import main
from sequnlearn.data.mcq import MCQSubtask, MCQTask, load_mcq_file
from sequnlearn.eval.scorer import evaluate_fast, plan_questions
from sequnlearn.model.layers import architecture, hidden_after
from sequnlearn.model.tiny import byte_tokenizer, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "mcq_60.jsonl"


def _task(n: int) -> MCQTask:
    return MCQTask("fixture", [MCQSubtask("f", load_mcq_file(FIXTURE)[:n])], str(FIXTURE))


def _synthetic(layers=4, q=160, c=4, d=16, signal_layer=2, strength=2.5, seed=0):
    """Random choice vectors and Gaussian states; at ``signal_layer`` each question's state is shifted
    towards its correct choice's vector (the answer is linearly decodable there and nowhere else)."""
    rng = np.random.default_rng(seed)
    answers = rng.integers(0, c, q)
    slots = np.arange(q * c).reshape(q, c)
    vectors = rng.normal(size=(q * c, d)).astype(np.float32)
    states = rng.normal(size=(layers, q, d)).astype(np.float32)
    target = vectors[slots[np.arange(q), answers]]  # (q, d)
    states[signal_layer] += strength * target / np.linalg.norm(target, axis=1, keepdims=True)
    return states, vectors, slots, answers


def test_probe_finds_the_answer_at_the_one_layer_that_encodes_it():
    states, vectors, slots, answers = _synthetic()
    accs = [probe_accuracy(states[layer], vectors, slots, answers, folds=5, seed=0)["acc"] for layer in range(4)]
    assert accs[2] >= 0.85, accs
    se = (0.25 * 0.75 / len(answers)) ** 0.5
    for layer in (0, 1, 3):  # pure noise: chance (0.25) within 4 standard errors
        assert abs(accs[layer] - 0.25) <= 4 * se, accs


def test_probe_is_scored_on_held_out_questions_only():
    # With more dimensions than training questions a probe can fit any labels; held out it must not
    # beat chance on noise, which it would if test questions leaked into the fit.
    states, vectors, slots, answers = _synthetic(q=80, d=256, strength=0.0)
    res = probe_accuracy(states[0], vectors, slots, answers, folds=4, seed=1, l2=1e-4)
    assert res["acc"] <= 0.25 + 4 * (0.1875 / 80) ** 0.5
    assert len(res["folds"]) == 4
    assert res == probe_accuracy(states[0], vectors, slots, answers, folds=4, seed=1, l2=1e-4)  # deterministic


def test_probe_ignores_a_fixed_preference_for_recurring_answers():
    # Four answer texts recur over all questions; the states hold nothing. A probe free to learn a
    # preference per text would score below chance held out (each held-out answer is rarer among
    # the training answers); centring the states removes that route.
    rng = np.random.default_rng(0)
    q, d = 120, 8
    vectors = rng.normal(size=(4, d)).astype(np.float32)
    perm = np.stack([rng.permutation(4) for _ in range(q)])  # (q, 4) which text in which slot
    answers = rng.integers(0, 4, q)
    states = np.tile(rng.normal(size=(1, d)), (q, 1)).astype(np.float32)
    states += 0.01 * rng.normal(size=(q, d)).astype(np.float32)
    res = probe_accuracy(states, vectors[perm.reshape(-1)], np.arange(q * 4).reshape(q, 4), answers, folds=5)
    assert abs(res["acc"] - 0.25) <= 4 * (0.1875 / q) ** 0.5


def test_lens_prior_starts_a_small_sample_probe_from_what_the_head_reads():
    # 20 questions, 64 dimensions, the answer readable by the plain dot product (the logit lens):
    # pulled towards the lens the probe keeps most of it; pulled towards zero it must learn it from 16.
    states, vectors, slots, answers = _synthetic(q=20, d=64, strength=2.5, signal_layer=0)
    lens = np.mean(np.einsum("qd,qcd->qc", states[0], vectors[slots]).argmax(1) == answers)
    acc = {p: probe_accuracy(states[0], vectors, slots, answers, l2=0.1, prior=p)["acc"] for p in ("lens", "zero")}
    assert acc["lens"] >= lens - 0.15 and acc["lens"] >= acc["zero"] + 0.15, (lens, acc)


def test_folds_are_a_seeded_balanced_partition():
    f = fold_ids(23, 5, seed=3)
    assert sorted(np.bincount(f)) == [4, 4, 5, 5, 5]
    assert (f == fold_ids(23, 5, seed=3)).all() and not (f == fold_ids(23, 5, seed=4)).all()


def test_probe_handles_questions_with_fewer_choices():
    states, vectors, slots, answers = _synthetic(q=120, signal_layer=0)
    slots = slots.copy()
    three = (np.arange(120) % 3 == 0) & (answers != 3)  # these questions lose their 4th choice
    slots[three, 3] = -1
    acc = probe_accuracy(states[0], vectors, slots, answers, folds=4)["acc"]
    assert acc >= 0.85


@pytest.mark.parametrize("family,style", [("gpt_neox", "letter"), ("llama", "cloze"), ("gpt2", "letter"),
                                          ("qwen2", "cloze"), ("mistral", "letter")])
def test_logit_lens_at_the_last_layer_is_the_evaluator(family, style):
    model, tok = tiny_model(family), byte_tokenizer()
    questions = plan_questions(_task(8), style=style, limit=None, num_fewshot=0)
    readout = read_layers(model, tok, questions, batch_size=5)
    assert readout.states.shape == (model.config.num_hidden_layers, 8, 64) and readout.lens.shape[1] == 32
    res = evaluate_fast(model, tok, [_task(8)], style=style, progress=False)["fixture"]
    expected = torch.tensor([p["loglikelihoods"] for p in res["predictions"]]).flatten()
    assert torch.allclose(torch.from_numpy(readout.lens[-1]), expected.double(), atol=1e-4)
    assert lens_accuracy(readout)[-1] == res["acc"]
    assert not np.allclose(readout.lens[0], readout.lens[-1])  # earlier layers read something else


@pytest.mark.parametrize("style", ["letter", "cloze"])
def test_states_are_each_layers_output_at_the_answer_position(style):
    model, tok = tiny_model("llama"), byte_tokenizer()
    questions = plan_questions(_task(3), style=style, limit=None, num_fewshot=0)
    readout = read_layers(model, tok, questions, batch_size=4)  # mixed lengths: padding in every batch
    arch = architecture(model)
    q = questions[1]
    ctx_ids = tok(q.context.rstrip())["input_ids"]
    conts = [tok(q.context + c)["input_ids"][len(ctx_ids):] for c in q.continuations]
    k = 0  # tokens every continuation shares (the " " of " A".." D" with byte tokens)
    while all(c[k] == conts[0][k] for c in conts):
        k += 1
    assert k >= 1
    ids = torch.tensor([ctx_ids + conts[0][:k]])  # (1, T): the prompt up to the answer position
    for layer in range(arch.num_layers):
        h, _ = hidden_after(arch, ids, torch.ones_like(ids), layer)
        assert torch.allclose(torch.from_numpy(readout.states[layer][1]), arch.norm(h[0, -1]), atol=1e-5)
    got = readout.vectors[readout.keys[readout.slots[1]]]
    assert torch.allclose(torch.from_numpy(got), arch.head.weight[[c[k] for c in conts]].detach())


def test_features_on_disk_give_the_same_audit(tmp_path):
    model, tok = tiny_model("gpt_neox"), byte_tokenizer()
    tasks = {"forget": _task(20)}
    mem = audit_one(model, tok, tasks, AuditOptions(style="cloze", folds=4))
    disk = audit_one(model, tok, tasks, AuditOptions(style="cloze", folds=4, features_dir=str(tmp_path)))
    assert (tmp_path / "model-forget.npy").stat().st_size >= 20 * 4 * 64 * 2
    assert disk["forget"]["lens"] == mem["forget"]["lens"]
    for a, b in zip(disk["forget"]["probe"], mem["forget"]["probe"]):
        assert abs(a["acc"] - b["acc"]) <= 0.1  # float16 features: the same probe up to rounding


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny base model directory and an 'unlearning run' directory (config + a perturbed model)."""
    from sequnlearn.config import UnlearnConfig, dump_yaml

    root = tmp_path_factory.mktemp("audit")
    tok = byte_tokenizer()
    base = tiny_model("gpt_neox", seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    run = root / "run"
    tiny_model("gpt_neox", seed=1).save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    (run / "config.yaml").write_text(dump_yaml(UnlearnConfig(model=str(root / "base"), layers=[3, 2])))
    (run / "eval.json").write_text(json.dumps({"forget_acc": 0.3, "retain_acc": 0.5}))
    return root / "base", run


def test_cli_audit_writes_into_the_run_and_report_shows_it(model_dirs, tmp_path, capsys):
    base, run = model_dirs
    main(["audit", str(base), str(run), "--data", str(FIXTURE), "--retain-data", str(FIXTURE), "--limit", "16",
          "--style", "cloze", "--folds", "4", "--device", "cpu"])
    result = json.loads((run / "audit.json").read_text())
    assert result["layers"] == ["0", "1", "2", "3"] and result["base"] == "base"
    assert [m["label"] for m in result["models"]] == ["base", "run"]
    assert result["models"][0]["target_layers"] is None and result["models"][1]["target_layers"] == [3, 2]
    for m in result["models"]:
        for key in ("forget", "retain"):
            assert m[key]["n"] == 16 and len(m[key]["probe"]) == len(m[key]["lens"]) == 4
    md = (run / "audit.md").read_text()
    assert "| 3* |" in md and "| 2* |" in md and "| 1 |" in md and "| 0 |" in md
    assert (run / "audit.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
    main(["report", str(run), "--out", str(tmp_path / "rep")])
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Knowledge audit" in report and "| 3* |" in report
    assert (tmp_path / "rep" / "audit.png").stat().st_size > 10_000
    staged = run / ".run.new.tmp"  # a result being written or replaced is no audit to show
    staged.mkdir()
    (staged / "audit.json").write_text((run / "audit.json").read_text())
    main(["report", str(run), "--out", str(tmp_path / "rep2")])
    assert (tmp_path / "rep2" / "report.md").read_text().count("## Knowledge audit") == 1
    assert not (tmp_path / "rep2" / "audit-2.png").exists()


def test_cli_audit_needs_out_without_a_run_dir(model_dirs, capsys):
    base, _ = model_dirs
    with pytest.raises(SystemExit) as e:
        main(["audit", str(base), "--data", str(FIXTURE)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
