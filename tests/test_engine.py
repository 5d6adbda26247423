"""The unlearning engine: adapter toggling, gradients, checkpointing, determinism."""

from pathlib import Path

import pytest
import torch
from sequnlearn.distributed import Process

from sequnlearn.config import load_config
from sequnlearn.data.corpora import collate
from sequnlearn.model import adapter as lora
from sequnlearn.model.layers import architecture
from sequnlearn.model.tiny import byte_tokenizer, tiny_model
from sequnlearn.runs import RunDir
from sequnlearn.unlearn.engine import Unlearner, load_batches


def make_engine(tmp_path: Path, family="gpt_neox", **overrides) -> Unlearner:
    sets = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(preset="tiny", overrides=sets)
    tok = byte_tokenizer()
    torch.manual_seed(0)
    engine = Unlearner(cfg, tiny_model(family), tok, load_batches(cfg, tok), RunDir(tmp_path), Process())
    for name, p in engine.model.named_parameters():  # a non-trivial adapter (LoRA B starts at zero)
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    return engine


def batch_of(engine: Unlearner, kind="forget", n=3) -> dict:
    return collate(getattr(engine.data, kind)[:n], engine.data.pad_id)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_disabled_adapter_reproduces_base_model_exactly(family, padded_batch):
    ids, mask = padded_batch
    base = tiny_model(family, seed=5)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits.clone()
    model = lora.add_lora(base, r=4, alpha=4, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    with torch.no_grad():
        on = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            off = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(on, expected)
    assert torch.equal(off, expected)


def test_all_linear_targets_everything_but_the_head():
    model = lora.add_lora(tiny_model("gpt_neox"), r=2, alpha=2, dropout=0.0, target_modules="all-linear")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    default = lora.add_lora(tiny_model("gpt_neox"), r=2, alpha=2, dropout=0.0, target_modules="peft-default")
    assert {n.rsplit(".", 1)[-1] for n, m in default.named_modules() if hasattr(m, "lora_A")} == {"query_key_value"}


def _forget_grads(engine: Unlearner, layer: int, checkpoint: bool) -> dict:
    engine.objective.checkpointing = checkpoint
    engine.model.zero_grad(set_to_none=True)
    loss = engine.objective.forget_loss(batch_of(engine), layer, torch.Generator().manual_seed(0))
    loss.backward()
    return {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_forget_gradients_identical_with_and_without_checkpointing(tmp_path, family):
    engine = make_engine(tmp_path, family, lora_dropout=0.0)
    plain = _forget_grads(engine, 1, checkpoint=False)
    ckpt = _forget_grads(engine, 1, checkpoint=True)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


def test_checkpoint_recompute_runs_with_the_adapter_state_of_its_forward(tmp_path):
    engine = make_engine(tmp_path, lora_dropout=0.0)
    engine.objective.checkpointing = True
    loss = engine.objective.forget_loss(batch_of(engine), 1, torch.Generator().manual_seed(0))
    tuners = [t for i in range(engine.arch.num_layers) for t in engine.arch.tuners(i)]
    for t in tuners:  # every adapter off at backward time (flag only: peft's switch also drops requires_grad)
        t._disable_adapters = True
    loss.backward()
    for t in tuners:
        t._disable_adapters = False
    with_off = {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}
    reference = _forget_grads(engine, 1, checkpoint=False)
    for name in reference:
        torch.testing.assert_close(with_off[name], reference[name], rtol=1e-5, atol=1e-7)


def test_layers_after_target_get_no_forget_gradient(tmp_path):
    engine = make_engine(tmp_path, lora_dropout=0.0)
    grads = _forget_grads(engine, 1, checkpoint=False)
    layer_of = {n: int(n.split(".layers.")[1].split(".")[0]) for n in grads}
    assert {layer_of[n] for n in grads} == {0, 1}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def test_retain_losses_are_zero_while_adapter_is_identity(tmp_path):
    for kind in ("l2", "kl"):
        engine = make_engine(tmp_path, retain_loss=kind)
        for name, p in engine.model.named_parameters():
            if "lora_B" in name:
                p.data.zero_()
        assert engine.objective.retain_loss(batch_of(engine, "retain")).item() == pytest.approx(0.0, abs=1e-6)


def test_retain_l2_counts_only_configured_layers(tmp_path):
    full = make_engine(tmp_path).objective.retain_loss(batch_of(make_engine(tmp_path), "retain"))
    engine = make_engine(tmp_path, retain_layers="[0]")
    first = engine.objective.retain_loss(batch_of(engine, "retain"))
    assert first.item() != pytest.approx(full.item())
    assert first.item() > 0


def test_training_moves_forget_loss_and_keeps_base_weights(tmp_path):
    engine = make_engine(tmp_path, lora_dropout=0.0, forget_loss="max_entropy", lr=1e-2)
    with torch.no_grad():
        engine.arch.head.weight.mul_(30)  # a peaked read-out, far from uniform
    frozen = {n: p.clone() for n, p in engine.model.named_parameters() if not p.requires_grad}
    before = engine.objective.forget_loss(batch_of(engine), 3, torch.Generator().manual_seed(0)).item()
    for _ in range(4):
        engine.optimizer_step(0, 3)
    after = engine.objective.forget_loss(batch_of(engine), 3, torch.Generator().manual_seed(0)).item()
    assert after < 0.9 * before
    assert all(torch.equal(p, frozen[n]) for n, p in engine.model.named_parameters() if not p.requires_grad)


def test_optimizer_steps_are_deterministic(tmp_path):
    lines = []
    for _ in range(2):
        engine = make_engine(tmp_path)
        lines.append([{k: v for k, v in engine.optimizer_step(0, 3).items() if k not in ("time_s", "tokens_per_s")}
                      for _ in range(2)])
    assert lines[0] == lines[1]


def test_architecture_sees_through_peft_wrapper(tmp_path):
    engine = make_engine(tmp_path)
    assert architecture(engine.model).num_layers == 4
    assert engine.arch.tuners(0)
