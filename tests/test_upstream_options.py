"""The reference authors' later options (#27): NPO, NLL retain, L2 at the target layer, same-sign gradient
filtering and L2-SP, each against a computation by hand from the model's own outputs, and each end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from sequnlearn.config import load_config
from sequnlearn.distributed import Process
from sequnlearn.errors import UserError
from sequnlearn.runs import RunDir, read_jsonl
from sequnlearn.unlearn import losses
from sequnlearn.unlearn.engine import unlearn

from test_engine import batch_of, make_engine


def _next_token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T-1)`` log-probabilities of each next token under ``model``'s plain HF forward, and the
    ``(B, T-1)`` mask of the positions whose next token is real."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return logp, batch["attention_mask"][:, 1:].float()


def _short_and_long(engine, kind: str) -> list[list[int]]:
    """Rows of different lengths (so that row groups and per-row counts matter)."""
    seqs = sorted(getattr(engine.data, kind), key=len)
    return [seqs[0], seqs[-1], seqs[1], [seqs[2][0]]]  # the last one a single token: nothing to predict


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_npo_equals_the_hand_computation_from_both_models_logits(tmp_path, reduction):
    beta = 0.5
    engine = make_engine(tmp_path, lora_dropout=0.0, forget_loss="npo", npo_beta=beta, npo_reduction=reduction)
    batch = batch_of(engine, "forget", n=3)
    batch["input_ids"][1, 40:], batch["attention_mask"][1, 40:] = engine.data.pad_id, 0  # a shorter row
    last = engine.arch.num_layers - 1  # the forget path is then the current model itself
    got = engine.objective.forget_loss(batch, last)
    with torch.no_grad():
        cur, mask = _next_token_logprobs(engine.model, batch)
        with engine.model.disable_adapter():
            orig, _ = _next_token_logprobs(engine.model, batch)
    r = (cur - orig) * mask  # (B, T-1)
    if reduction == "sequence":
        want = -(2 / beta) * F.logsigmoid(-beta * r.sum(dim=1)).mean()
    else:
        want = -(2 / beta) * (F.logsigmoid(-beta * r) * mask).sum() / mask.sum()
    assert abs(r).sum() > 0.1  # the adapter moves the model: the log-ratio is not zero
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_nll_retain_equals_the_models_cross_entropy(tmp_path):
    engine = make_engine(tmp_path, lora_dropout=0.0, retain_loss="nll")
    batch = batch_of(engine, "retain", n=3)
    batch["input_ids"][0, 30:], batch["attention_mask"][0, 30:] = engine.data.pad_id, 0
    with torch.no_grad():
        logp, mask = _next_token_logprobs(engine.model, batch)
    want = -(logp * mask).sum() / mask.sum()
    assert engine.objective.retain_loss(batch).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("overrides", [{"forget_loss": "npo"}, {"forget_loss": "npo", "npo_reduction": "token"},
                                       {"retain_loss": "nll"}], ids=["npo-sequence", "npo-token", "nll"])
def test_next_token_losses_are_the_same_in_row_groups(tmp_path, overrides):
    """Each row group is weighted by what the loss averages over (next tokens, or rows with one)."""
    results = []
    for tokens in (100_000, 0):  # one group; one group per row
        engine = make_engine(tmp_path, lora_dropout=0.0, row_group_tokens=tokens, **overrides)
        kind = "retain" if "retain_loss" in overrides else "forget"
        hb = engine._host_batch(_short_and_long(engine, kind))
        if kind == "forget":
            fn = lambda part: engine.objective.forget_loss(part, 2)  # noqa: E731
            counted = engine.objective.forget_counts(hb.lengths)
        else:
            fn, counted = engine.objective.retain_loss, engine.objective.retain_counts(hb.lengths)
        loss = engine._backward_in_parts(hb, fn, 1.0, counted=counted)
        results.append((loss, {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}))
    (one, g_one), (split, g_split) = results
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-7)
    assert g_one.keys() == g_split.keys()
    for name in g_one:
        torch.testing.assert_close(g_split[name], g_one[name], rtol=1e-4, atol=1e-7)


def test_target_retain_layers_compare_the_phases_target_layer_only(tmp_path):
    target = make_engine(tmp_path, lora_dropout=0.0, retain_layers="target")
    fixed = make_engine(tmp_path, lora_dropout=0.0, retain_layers="[2]")
    batch = batch_of(target, "retain")
    torch.testing.assert_close(target.objective.retain_loss(batch, 2), fixed.objective.retain_loss(batch))
    assert target.objective.retain_loss(batch, 1).item() != pytest.approx(target.objective.retain_loss(batch, 2).item())
    with pytest.raises(ValueError, match="target layer"):
        target.objective.retain_loss(batch)


def _micro_grads(engine, coef: tuple[float, float], agree=None) -> dict:
    """The gradients one micro-batch of the first phase leaves (``coef``: forget, retain)."""
    engine.model.zero_grad(set_to_none=True)
    m, fb, rb = next(engine._micro_batches(0, 0))
    engine._micro_step(0, engine.layers[0], m, fb, rb, coef, agree)
    return {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["same_sign", "same_sign_asymmetric"])
def test_grad_filter_combines_the_forget_and_retain_gradients_of_a_micro_batch(tmp_path, mode):
    plain = make_engine(tmp_path, lora_dropout=0.0, retain_loss="nll")
    g_f, g_r = _micro_grads(plain, (5.0, 0.0)), _micro_grads(plain, (0.0, 2.0))
    engine = make_engine(tmp_path, lora_dropout=0.0, retain_loss="nll", grad_filter=mode)
    agree = torch.zeros(2, dtype=torch.float64)
    got = _micro_grads(engine, (5.0, 2.0), agree)
    assert got.keys() == g_f.keys() == g_r.keys()
    agreeing = 0
    for name in got:
        want, n = losses.filter_gradients(g_r[name], g_f[name], mode)
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-8)
        agreeing += n.item()
    assert agree.tolist() == [agreeing, sum(g.numel() for g in got.values())]
    assert 0 < agreeing < agree[1]


def test_l2sp_gradient_is_twice_the_lora_delta_pulled_back(tmp_path):
    c = 3.0
    engine = make_engine(tmp_path, lora_dropout=0.0, lora_alpha=32, l2sp_coef=c)  # LoRA scale 32/16 = 2
    L = engine.layers[0]
    grads = _micro_grads(engine, (0.0, 0.0))  # only L2-SP moves the adapter
    modules = {n: m for n, m in engine.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    total = 0.0
    for name, m in modules.items():
        A, B, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        assert s == 2.0
        g_A, g_B = grads[f"{name}.lora_A.default.weight"], grads[f"{name}.lora_B.default.weight"]
        if f".layers.{L}." not in name:
            assert g_A.abs().max() == 0 and g_B.abs().max() == 0
            continue
        delta = s * B @ A
        total += delta.pow(2).sum().item()
        k = 2 * c / engine.accum * s  # d(c/accum · ‖s B A‖²) = 2 c/accum · s · (s B A) pulled back
        torch.testing.assert_close(g_A, k * B.T @ delta, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_B, k * delta @ A.T, rtol=1e-5, atol=1e-7)
    assert total > 0
    assert engine.objective.l2sp(L).item() == pytest.approx(total, rel=1e-5)


def test_l2sp_in_full_parameter_mode_is_the_distance_to_the_stashed_block(tmp_path):
    engine = make_engine(tmp_path, method="full", l2sp_coef=1.0)
    L = engine.layers[0]
    block = dict(engine.arch.layers[L].named_parameters())
    assert engine.objective.l2sp(L).item() == 0.0
    with torch.no_grad():
        block["attention.dense.weight"].add_(0.5)
    n = block["attention.dense.weight"].numel()
    assert engine.objective.l2sp(L).item() == pytest.approx(0.25 * n, rel=1e-6)


@pytest.mark.parametrize("overrides", [
    ["forget_loss=npo"], ["forget_loss=npo", "npo_reduction=token", "npo_beta=0.5"], ["retain_loss=nll"],
    ["retain_layers=target"], ["grad_filter=same_sign", "retain_loss=nll"],
    ["grad_filter=same_sign_asymmetric", "retain_loss=nll"], ["l2sp_coef=10.0"]],
    ids=["npo", "npo-token", "nll", "target", "same-sign", "asymmetric", "l2sp"])
def test_each_option_runs_end_to_end(tmp_path, overrides):
    run = unlearn(load_config(preset="tiny", overrides=overrides), RunDir(tmp_path / "r"))
    lines = read_jsonl(run.metrics)
    assert run.is_finished() and lines
    assert all(math.isfinite(x["forget_loss"]) and math.isfinite(x["retain_loss"]) for x in lines)
    filtered = any(o.startswith("grad_filter") for o in overrides)
    assert all(("same_sign_share" in x) == filtered for x in lines)
    if filtered:
        assert all(0 <= x["same_sign_share"] <= 1 for x in lines) and any(x["same_sign_share"] > 0 for x in lines)
    if "forget_loss=npo" in overrides:  # the current model starts as the original: (2/β)·log 2
        beta = 0.5 if "npo_beta=0.5" in overrides else 0.1
        assert lines[0]["forget_loss"] == pytest.approx(2 / beta * math.log(2), rel=1e-5)
        assert lines[-1]["forget_loss"] < lines[0]["forget_loss"]


@pytest.mark.parametrize("bad, message", [
    ("retain_layers=last", "retain_layers 'last' is not valid; give a list of layers, null"),
    ("grad_filter=sign", "grad_filter 'sign' is not valid"), ("npo_beta=0", "npo_beta must be > 0"),
    ("npo_reduction=row", "npo_reduction 'row' is not valid"), ("l2sp_coef=-1", "l2sp_coef must be >= 0")])
def test_bad_values_are_one_line_errors(bad, message):
    with pytest.raises(UserError, match=message):
        load_config(preset="tiny", overrides=[bad])


def test_filter_and_l2sp_are_refused_under_fsdp(tmp_path, monkeypatch):
    monkeypatch.setattr(Process, "use_fsdp", lambda self, sharding: True)
    for key in ("grad_filter=same_sign", "l2sp_coef=1.0"):
        k, v = key.split("=")
        with pytest.raises(UserError, match="do not run FSDP-sharded; set sharding: ddp"):
            make_engine(tmp_path, **{k: v})
