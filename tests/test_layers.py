"""The architecture module: prefix + suffix runs equal the model's own forward."""

import pytest
import torch

from sequnlearn.errors import UserError
from sequnlearn.model.layers import architecture, check_layers, hidden_after, run_layers, suffix_logits
from sequnlearn.model.tiny import TINY_FAMILIES, tiny_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_suffix_from_every_layer_equals_full_forward(family, padded_batch):
    ids, mask = padded_batch
    model = tiny_model(family, seed=1)
    arch = architecture(model)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        for layer in range(arch.num_layers):
            h, ctx = hidden_after(arch, ids, mask, layer)
            out = suffix_logits(arch, h, ctx, layer)
            torch.testing.assert_close(out[mask.bool()], full[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_captured_layer_outputs_match_hf_hidden_states(family, padded_batch):
    ids, mask = padded_batch
    model = tiny_model(family, seed=2)
    arch = architecture(model)
    captured = []
    with torch.no_grad():
        hidden_after(arch, ids, mask, arch.num_layers - 1, capture=captured)
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(captured) == arch.num_layers
    real = mask.bool()
    for i in range(arch.num_layers - 1):  # HF's last entry is after the final norm for some models
        torch.testing.assert_close(captured[i][real], hs[i + 1][real], rtol=0, atol=1e-5)


def test_padding_does_not_change_real_positions():
    model = tiny_model("gpt_neox", seed=3)
    arch = architecture(model)
    ids = torch.randint(0, 256, (1, 6))
    padded = torch.cat([ids, torch.full((1, 4), 256)], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a, _ = hidden_after(arch, ids, torch.ones_like(ids), 2)
        b, _ = hidden_after(arch, padded, mask, 2)
    torch.testing.assert_close(a[0], b[0, :6], rtol=0, atol=1e-5)


def test_unknown_architecture_is_a_clear_error():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UserError, match="model type 'bert' is not supported"):
        architecture(model)


def test_layers_outside_depth_are_rejected():
    arch = architecture(tiny_model("gpt_neox"))
    with pytest.raises(UserError, match="outside this model's depth"):
        check_layers(arch, [4, 2])
    with pytest.raises(UserError, match="empty"):
        check_layers(arch, [])


def test_run_layers_empty_range_is_identity(padded_batch):
    ids, mask = padded_batch
    arch = architecture(tiny_model("llama"))
    ctx = arch.context(ids, mask)
    h = torch.randn(3, 11, 64)
    assert run_layers(arch, h, ctx, 2, 2) is h
