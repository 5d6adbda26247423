"""Broken models never pass as results: the NaN policy covers gradients, a run with non-finite merged
weights writes no model, ``eval`` refuses non-finite weights and logits, and the card shows chance."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sequnlearn.cli import main
from sequnlearn.config import dump_yaml, load_config
from sequnlearn.distributed import Process
from sequnlearn.eval import EvalSpec, NonFiniteModel, evaluate, forget_retain_accuracy, load_tasks
from sequnlearn.model.tiny import byte_tokenizer, tiny_model
from sequnlearn.modelcard import model_card, write_model_card
from sequnlearn.runs import RunDir, prepare_out_dir, read_jsonl
from sequnlearn.unlearn import engine as engine_mod
from sequnlearn.unlearn.engine import NonFiniteLoss, Unlearner, load_batches, unlearn
from sequnlearn.unlearn.objective import Objective

FIXTURE = Path(__file__).parent / "fixtures" / "mcq_60.jsonl"
SMALL = dict(hidden=32, layers=2, heads=2)


def _cli_error(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 2 with one line on stderr; return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# ---------------------------------------------------------------- unlearning


def test_a_diverging_run_exits_2_and_writes_no_model(tmp_path, capsys):
    """lr 1e4 (a typo for 1e-4) used to give a merged model with NaN in 16 of 52 tensors and exit 0."""
    for mode in ("stop", "skip"):
        out = tmp_path / mode
        err = _cli_error(["unlearn", "--preset", "tiny", "--set", "lr=1e4", "--on-nan", mode, "--out", str(out)],
                         capsys)
        assert "non-finite" in err and "lower lr" in err, err
        assert not (out / "model").exists() and not (out / "adapter").exists(), mode


class _InfGrad(torch.autograd.Function):
    """Zero in forward, an infinite gradient in backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


def _poison_gradient(monkeypatch, at_step: int | None) -> None:
    """Give the forget loss an infinite gradient (its value unchanged) at step ``at_step`` (None: every step)."""
    real, real_step, now = Objective.forget_loss, Unlearner.optimizer_step, {}

    def step(self, phase, layer):
        now["step"] = self.pos.step
        return real_step(self, phase, layer)

    def poisoned(self, batch, layer, gen=None, targets=None):
        loss = real(self, batch, layer, gen, targets)
        return loss + _InfGrad.apply(loss) if at_step is None or now["step"] == at_step else loss

    monkeypatch.setattr(Unlearner, "optimizer_step", step)
    monkeypatch.setattr(Objective, "forget_loss", poisoned)


def _engine(tmp_path, overrides: list[str]) -> Unlearner:
    cfg = load_config(preset="tiny", overrides=overrides)
    tok = byte_tokenizer()
    torch.manual_seed(0)
    return Unlearner(cfg, tiny_model("gpt_neox"), tok, load_batches(cfg, tok), RunDir(tmp_path), Process())


def test_a_finite_loss_with_a_non_finite_gradient_stops_the_run(tmp_path, monkeypatch):
    _poison_gradient(monkeypatch, None)
    engine = _engine(tmp_path, [])
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient at step 0 \(layer 3, phase step 0\): "
                                            r"grad_norm=(nan|inf) with finite losses .*lower lr"):
        engine.optimizer_step(0, 3)


def test_skip_mode_does_not_apply_a_step_with_a_non_finite_gradient(tmp_path, monkeypatch):
    _poison_gradient(monkeypatch, None)
    engine = _engine(tmp_path, ["on_nan=skip"])
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    line = engine.optimizer_step(0, 3)
    assert math.isfinite(line["forget_loss"]) and not math.isfinite(line["grad_norm"])
    assert line["nan_skipped"] == engine.accum == 2  # both micro-batches of the step
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, before[n]), n  # the step was not applied (not even AdamW's weight decay)


def test_skip_mode_reports_its_skips(tmp_path, monkeypatch, capsys):
    _poison_gradient(monkeypatch, 2)  # the first step of phase 2 (layer 2); its second step is applied
    out = tmp_path / "skip"
    main(["unlearn", "--preset", "tiny", "--on-nan", "skip", "--out", str(out)])
    stdout = capsys.readouterr().out
    run = RunDir(out)
    lines = read_jsonl(run.metrics)
    assert [line["nan_skipped"] for line in lines] == [0, 0, 2, 2, 2, 2]
    assert json.loads(run.provenance.read_text())["nan_skipped"] == 2
    assert "2 micro-batches skipped as non-finite (on_nan: skip)" in stdout
    assert stdout.strip().splitlines()[-1].startswith(f"unlearned model: {run.model} (2 micro-batches skipped")
    card = (run.model / "README.md").read_text()
    assert "Warning: 2 training micro-batches gave a non-finite loss or gradient" in card
    weights = load_file(str(next(run.model.glob("*.safetensors"))))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_phase_whose_every_step_was_skipped_fails(tmp_path, monkeypatch):
    _poison_gradient(monkeypatch, None)
    run = RunDir(prepare_out_dir(tmp_path / "run"))
    with pytest.raises(NonFiniteLoss, match=r"every step of phase 1 \(layer 3\) was skipped as non-finite"):
        unlearn(load_config(preset="tiny", overrides=["on_nan=skip"]), run)
    assert not run.model.exists() and not run.adapter.exists()


def test_non_finite_merged_weights_are_never_saved(tmp_path, monkeypatch):
    """Finite losses and gradients all the way, yet a merged weight overflows: no model/, no adapter/."""
    real = engine_mod.lora.merge_adapter

    def overflowing(model):
        merged = real(model)
        with torch.no_grad():
            next(merged.parameters()).view(-1)[0] = math.inf
        return merged

    monkeypatch.setattr(engine_mod.lora, "merge_adapter", overflowing)
    run = RunDir(prepare_out_dir(tmp_path / "run"))
    with pytest.raises(NonFiniteModel, match=r"non-finite weights \(NaN or inf\) in 1 of \d+ tensors.*lower lr"):
        unlearn(load_config(preset="tiny"), run)
    assert not run.model.exists() and not run.adapter.exists()


# ---------------------------------------------------------------- eval


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> RunDir:
    """A finished run directory (config, provenance, card) whose model has a NaN weight."""
    root = tmp_path_factory.mktemp("nan_run")
    model = tiny_model("gpt_neox", seed=0, **SMALL)
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight[0, 0] = math.nan
    _save(model, root / "model")
    (root / "config.yaml").write_text(dump_yaml(load_config(preset="tiny")))
    (root / "provenance.json").write_text("{}")
    run = RunDir(root)
    write_model_card(run)
    return run


def test_eval_refuses_a_model_with_a_nan_weight(nan_run, tmp_path, capsys, snapshot):
    before = snapshot(nan_run.root, tmp_path)
    err = _cli_error(["eval", str(nan_run.root), "--data", str(FIXTURE), "--device", "cpu"], capsys)
    assert "non-finite weights (NaN or inf) in 1 of" in err and "not scored" in err, err
    err = _cli_error(["eval", str(nan_run.model), "--data", str(FIXTURE), "--device", "cpu",
                      "--out", str(tmp_path / "e.json")], capsys)
    assert "non-finite weights" in err, err
    assert snapshot(nan_run.root, tmp_path) == before  # no eval.json anywhere, the card untouched


def test_forget_retain_accuracy_raises_for_a_nan_model(nan_run):
    """It used to score 0.375 on the fixture: near chance, read as a success."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(nan_run.model))
    with pytest.raises(NonFiniteModel, match="non-finite weights"):
        forget_retain_accuracy(model, byte_tokenizer(), EvalSpec(str(FIXTURE), limit=8))


def _lm_eval_backends() -> list[str]:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return ["fast"]
    return ["fast", "lm-eval"]


@pytest.mark.parametrize("backend", _lm_eval_backends())
def test_non_finite_logits_are_refused(backend):
    """Finite weights, infinite logits (as an fp16 overflow gives): refused, not scored."""
    model = tiny_model("gpt_neox", seed=0, **SMALL)
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: output + math.inf)
    task = load_tasks([str(FIXTURE)])
    with pytest.raises(NonFiniteModel, match=r"logits are not finite \(NaN or inf\)"):
        evaluate(model, byte_tokenizer(), task, backend=backend, limit=4, progress=False)


# ---------------------------------------------------------------- model card


def test_the_card_shows_chance_and_never_presents_a_broken_model_as_unlearned(nan_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(nan_run.root, root)
    run = RunDir(root)
    (root / "provenance.json").write_text(json.dumps({"nan_skipped": 3}))
    entry = {"n": 60, "acc_stderr": 0.05, "style": "letter", "backend": "fast", "limit": None, "num_fewshot": 0}
    (root / "eval.json").write_text(json.dumps({
        "model": str(root), "style": "letter", "forget_task": "sweep_task", "forget_chance": 0.25, "tasks": {
            "wmdp_bio_robust": {**entry, "acc": 0.27, "chance": 0.25, "role": "forget"},
            "mmlu": {**entry, "acc": 0.55, "chance": 0.25, "role": "retain"},
            "sweep_task": {"acc": 0.10, "acc_stderr": 0.01, "n": 200}}}))
    card = model_card(run)
    assert "| task | n | acc | ± stderr | chance | vs chance | scoring |" in card
    assert "| wmdp_bio_robust | 60 | 0.2700 | 0.0500 | 0.2500 | at chance | letter, all questions |" in card
    assert "| mmlu | 60 | 0.5500 | 0.0500 | 0.2500 | above chance | letter, all questions |" in card
    assert "| sweep_task | 200 | 0.1000 | 0.0100 | 0.2500 | below chance | letter, 200 questions |" in card
    assert "Warning: 3 training micro-batches gave a non-finite loss or gradient and were skipped" in card
