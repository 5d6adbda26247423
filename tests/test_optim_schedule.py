"""Muon beside AdamW (``optimizer: muon``) and layer schedules (``steps_per_layer``, the reference authors'
``forget_layer_scale`` and ``deep_layer_step_scale``, ``layer_start: null``): the split, hand values,
tiny runs, resume across unequal phases, and the one-line refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sequnlearn.cli import main
from sequnlearn.config import load_config
from sequnlearn.errors import UserError
from sequnlearn.model.tiny import byte_tokenizer, tiny_model
from sequnlearn.runs import RunDir, prepare_out_dir, read_jsonl
from sequnlearn.unlearn.engine import Unlearner, load_batches, unlearn
from sequnlearn.unlearn.optim import MuonWithAdamW, build_optimizer
from sequnlearn.unlearn.schedule import depth_scale, phase_steps

TIMING = ("time_s", "tokens_per_s")


def _engine(tmp_path: Path, *sets: str) -> Unlearner:
    cfg = load_config(preset="tiny", overrides=list(sets))
    tok = byte_tokenizer()
    torch.manual_seed(0)
    return Unlearner(cfg, tiny_model("gpt_neox"), tok, load_batches(cfg, tok), RunDir(tmp_path))


def _finish(root: Path, sets: list[str], stop: tuple[int, int] | None = None) -> RunDir:
    """A tiny run with ``sets``; with ``stop``, killed at the checkpoint of (phase, phase_step), then resumed."""
    cfg = load_config(preset="tiny", overrides=sets + ["checkpoint_every=1"])
    run = RunDir(prepare_out_dir(root))

    def hook(pos):
        if (pos.phase, pos.phase_step) == stop:
            raise KeyboardInterrupt

    if stop is None:
        return unlearn(cfg, run)
    with pytest.raises(KeyboardInterrupt):
        unlearn(cfg, run, on_checkpoint=hook)
    return unlearn(cfg, RunDir(prepare_out_dir(run.root, resume=True)), resume=True)


def _metrics(run: RunDir) -> list[dict]:
    return [{k: v for k, v in x.items() if k not in TIMING} for x in read_jsonl(run.metrics)]


def _assert_same_run(a: RunDir, b: RunDir) -> None:
    assert _metrics(a) == _metrics(b)
    wa, wb = (load_file(str(r.adapter / "adapter_model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


# ---------------------------------------------------------------------- Muon


@pytest.mark.parametrize("family, hidden, other", [
    ("gpt_neox", ["gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.layers.3.mlp.dense_4h_to_h.weight"],
     ["gpt_neox.embed_in.weight", "lm_head.weight", "gpt_neox.layers.0.attention.query_key_value.bias",
      "gpt_neox.layers.0.input_layernorm.weight", "gpt_neox.final_layer_norm.weight"]),
    ("gpt2", ["transformer.h.1.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight"],
     ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
      "transformer.h.0.attn.c_attn.bias"]),
    ("llama", ["model.layers.2.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"],
     ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"]),
])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(family, hidden, other):
    cfg = load_config(preset="tiny", overrides=["optimizer=muon", "muon_momentum=0.9", "weight_decay=0.02", "lr=2e-4"])
    model = tiny_model(family)
    named = dict(model.named_parameters())
    opt = build_optimizer(cfg, named.items())
    muon, adamw = opt.parts
    assert isinstance(opt, MuonWithAdamW)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    # by place, not by upstream's "fewer than 50000 rows": the tiny vocabulary's embeddings stay with AdamW
    assert all(id(named[n]) in in_muon for n in hidden) and not any(id(named[n]) in in_muon for n in other)
    assert in_muon | in_adamw == {id(p) for p in named.values()} and not in_muon & in_adamw
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    m, a = muon.param_groups[0], adamw.param_groups[0]  # the reference's MuonAdamW settings
    assert (m["momentum"], m["nesterov"], m["adjust_lr_fn"]) == (0.9, True, "match_rms_adamw")
    assert (m["weight_decay"], m["lr"]) == (0.02, 2e-4)
    assert (a["betas"], a["eps"], a["weight_decay"], a["lr"], a["fused"]) == ((0.9, 0.95), 1e-8, 0.02, 2e-4, True)


def test_lora_factors_all_go_to_muon_and_adamw_stays_todays_by_default(tmp_path):
    engine = _engine(tmp_path / "m", "optimizer=muon")
    assert [type(p) for p in engine.opt.parts] == [torch.optim.Muon]  # every LoRA factor is a block matrix
    assert sum(len(g["params"]) for g in engine.opt.param_groups) == len(engine.params)
    plain = _engine(tmp_path / "a").opt
    assert type(plain) is torch.optim.AdamW and plain.defaults["fused"] and plain.defaults["betas"] == (0.9, 0.999)


def test_the_lr_set_on_the_wrapper_reaches_both_parts_and_its_state_dict_round_trips():
    cfg = load_config(preset="tiny", overrides=["optimizer=muon"])
    model = tiny_model("gpt_neox")
    opt = build_optimizer(cfg, model.named_parameters())
    for group in opt.param_groups:
        group["lr"] = 0.5
    assert [g["lr"] for part in opt.parts for g in part.param_groups] == [0.5, 0.5]
    model(input_ids=torch.arange(8).unsqueeze(0)).logits.square().mean().backward()
    opt.step()
    saved = opt.state_dict()
    assert len(saved["state"]) == sum(p.requires_grad for p in model.parameters())
    fresh = build_optimizer(cfg, model.named_parameters())
    fresh.load_state_dict(saved)
    assert fresh.parts[0].state is fresh.state and fresh.parts[1].param_groups[0] is fresh.param_groups[1]
    for p, state in opt.state.items():
        for k, v in state.items():
            torch.testing.assert_close(fresh.state[p][k], v, rtol=0, atol=0)


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory):
    return _finish(tmp_path_factory.mktemp("muon") / "whole", ["optimizer=muon", "lr_schedule=linear"])


def test_a_tiny_muon_run_trains_and_differs_from_adamw(muon_run, tmp_path):
    lines = _metrics(muon_run)
    assert [x["layer"] for x in lines] == [3, 3, 2, 2, 1, 1]
    assert all(torch.isfinite(torch.tensor([x["forget_loss"], x["retain_loss"]])).all() for x in lines)
    assert lines[-1]["retain_loss"] > 0  # the adapter moved
    assert "Muon for the block matrices with AdamW for the rest, lr" in (muon_run.model / "README.md").read_text()
    adamw = _finish(tmp_path / "adamw", ["lr_schedule=linear"])
    assert [x["forget_loss"] for x in _metrics(adamw)] != [x["forget_loss"] for x in lines]


@pytest.mark.parametrize("stop", [(0, 1), (1, 0)])  # mid-phase, and just after a phase ended
def test_a_resumed_muon_run_ends_where_an_uninterrupted_one_does(muon_run, tmp_path, stop):
    _assert_same_run(_finish(tmp_path / "r", ["optimizer=muon", "lr_schedule=linear"], stop), muon_run)


def test_muon_without_torch_muon_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, snapshot):
    monkeypatch.delattr(torch.optim, "Muon")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--preset", "tiny", "--set", "optimizer=muon", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "torch.optim.Muon" in err and "torch >= 2.9" in err and "optimizer adamw" in err
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- layer schedules


def test_steps_and_forget_scale_by_depth_by_hand():
    # 1 + (s − 1)·(L0 − L) / max(L0, 1): the reference authors' sequential_unlearn_sft.py
    assert depth_scale(3.0, 31, 31) == 1.0 and depth_scale(3.0, 31, 0) == 3.0
    assert depth_scale(2.0, 28, 16) == pytest.approx(1 + 12 / 28)
    assert depth_scale(2.0, 0, 0) == 1.0  # max(L0, 1): a lone layer 0 is not divided by zero
    assert phase_steps(10, [28, 24, 20, 16], 2.0) == [10, 11, 12, 14]  # int() of 10, 11.43, 12.86, 14.29
    assert phase_steps(128, list(range(31, -1, -1))) == [128] * 32
    assert phase_steps(1, [3, 2], 1.2) == [1, 1]  # at least 1


def test_todays_default_schedule_is_unchanged(tmp_path):
    engine = _engine(tmp_path)
    assert engine.phase_steps == [2, 2, 2]  # 16 examples // global batch 8, one epoch, per layer
    coefs = [engine.coefficients_at(p, s, 0) for p in range(3) for s in range(2)]
    assert coefs == [(50.0, 0.0), (37.5, 5.0)] * 3


def test_forget_scale_multiplies_each_phases_forget_coefficient(tmp_path):
    engine = _engine(tmp_path, "forget_layer_scale=3", "schedule_scope=run")
    # layers [3, 2, 1]: scales 1, 1 + 2·1/3, 1 + 2·2/3; the ramp runs once over the run's 6 steps
    assert engine.coefficients_at(0, 0, 0) == (50.0, 0.0)
    assert engine.coefficients_at(1, 0, 0)[0] == pytest.approx(50 * (5 / 3) * (1 - 0.25 * 2 / 5))
    assert engine.coefficients_at(2, 1, 0) == pytest.approx((50 * (7 / 3) * 0.75, 5.0))


SCHEDULE = ["layers=[2, 1, 0]", "steps_per_layer=2", "deep_layer_step_scale=2", "forget_layer_scale=2",
            "lr_schedule=linear"]


@pytest.fixture(scope="module")
def schedule_run(tmp_path_factory):
    return _finish(tmp_path_factory.mktemp("sched") / "whole", SCHEDULE)


def test_a_tiny_run_takes_the_scheduled_steps_per_layer(schedule_run):
    lines = _metrics(schedule_run)
    assert [x["layer"] for x in lines] == [2] * 2 + [1] * 3 + [0] * 4  # 2 × (1, 1.5, 2)
    assert [x["step"] for x in lines] == list(range(9))
    firsts = [x["forget_coef"] for x in lines if x["phase_step"] == 0]
    assert firsts == [50.0, 75.0, 100.0]
    assert [x["lr"] for x in lines] == pytest.approx([1e-3 * (9 - k) / 9 for k in range(9)])  # one schedule over 9
    assert json.loads(schedule_run.provenance.read_text())["phase_steps"] == [2, 3, 4]
    card = (schedule_run.model / "README.md").read_text()
    assert "optimizer steps per layer [2, 3, 4]" in card and "examples per layer" not in card


@pytest.mark.parametrize("stop", [(1, 0), (2, 1)])  # at the boundary into the longer phase, and inside the longest
def test_resume_across_unequal_phases_ends_where_an_uninterrupted_run_does(schedule_run, tmp_path, stop):
    _assert_same_run(_finish(tmp_path / "r", SCHEDULE, stop), schedule_run)


def test_layer_start_null_is_the_models_last_layer(tmp_path):
    run = _finish(tmp_path / "all", ["layers=null", "layer_start=null", "layer_end=0", "layer_step=1",
                                     "steps_per_layer=1"])
    assert [x["layer"] for x in _metrics(run)] == [3, 2, 1, 0]
    assert "[3, 2, 1, 0]" in (run.model / "README.md").read_text()
    assert "[3, 2, 1, 0]" in (run.adapter / "README.md").read_text()


@pytest.mark.parametrize("sets, message", [
    (["layers=null", "layer_start=null", "layer_end=5"], "layer_end 5 is beyond this model's last layer 3"),
    (["layers=null", "layer_start=7", "layer_end=5", "layer_step=1"], "outside this model's depth"),
])
def test_a_schedule_outside_the_model_is_one_line_and_writes_nothing(tmp_path, capsys, snapshot, sets, message):
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--preset", "tiny", *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, message", [
    (["optimizer=sgd"], "optimizer 'sgd' is not valid"),
    (["muon_momentum=1"], "muon_momentum must be in [0, 1)"),
    (["steps_per_layer=0"], "steps_per_layer must be >= 1"),
    (["steps_per_layer=4", "epochs_per_layer=2"], "keep one of them"),
    (["forget_layer_scale=0.5"], "forget_layer_scale must be >= 1.0"),
    (["deep_layer_step_scale=2", "layers=[1, 3]", "layer_order=any"], "must be deepest first"),
])
def test_bad_schedule_and_optimizer_settings_are_user_errors(sets, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(preset="tiny", overrides=sets)
