"""The step's device-dependent settings (unlearn/kernels.py): what `auto` means on each device, and the
GPU path's settings (flash / memory-efficient attention, one row group, widths rounded to 64, large head
chunks) give the CPU path's losses and gradients on the same micro-batches, for every retain loss."""

import pytest
import torch

from sequnlearn.config import load_config
from sequnlearn.errors import UserError
from sequnlearn.unlearn.kernels import CPU_DEFAULTS, GPU_DEFAULTS, round_up, row_groups, step_settings

from test_engine import make_engine

GPU_PATH = {k: v for k, v in GPU_DEFAULTS.items()}


def test_auto_resolves_per_device_and_explicit_values_win():
    cfg = load_config(preset="tiny")
    assert vars(step_settings(cfg, torch.device("cpu"))) == CPU_DEFAULTS
    assert vars(step_settings(cfg, torch.device("cuda"))) == GPU_DEFAULTS
    cfg = load_config(preset="tiny", overrides=["sdpa_backend=math", "pad_multiple=8"])
    got = step_settings(cfg, torch.device("cuda"))
    assert (got.sdpa_backend, got.pad_multiple, got.row_group_tokens) == ("math", 8, GPU_DEFAULTS["row_group_tokens"])


@pytest.mark.parametrize("bad, message", [("sdpa_backend=cudnn", "sdpa_backend 'cudnn' is not valid"),
                                          ("pad_multiple=0", "pad_multiple must be >= 1"),
                                          ("head_chunk_rows=0", "head_chunk_rows must be >= 1"),
                                          ("row_group_tokens=-1", "row_group_tokens must be >= 0")])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(UserError, match=message):
        load_config(preset="tiny", overrides=[bad])


def test_row_groups_cost_the_rounded_widths():
    lengths = [10, 12, 60, 11]
    assert row_groups(lengths, 256) == [(0, 4)]  # a pass costs more than the padding saved
    assert row_groups(lengths, 0) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert row_groups(lengths, 20) == [(0, 2), (2, 3), (3, 4)]
    assert row_groups(lengths, 8192, 64) == [(0, 4)]
    assert round_up(65, 64) == 128 and round_up(64, 64) == 64 and round_up(0, 64) == 0


def _step_grads(engine) -> tuple[list[float], dict]:
    """Forget and retain losses and the LoRA gradients of one micro-batch of the first phase."""
    engine.model.zero_grad(set_to_none=True)
    losses = []
    for m, fb, rb in engine._micro_batches(0, 0):
        f, r, ok = engine._micro_step(0, engine.layers[0], m, fb, rb, (5.0, 2.0))
        losses += [f.item(), r.item()]
        break
    grads = {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "rounded-groups"])
@pytest.mark.parametrize("retain", [{"retain_loss": "l2"}, {"retain_loss": "kl"},
                                    {"retain_loss": "l2", "l2_reduction": "padded_states"}])
def test_the_gpu_path_settings_give_the_cpu_path_losses_and_gradients(tmp_path, retain, split):
    common = dict(lora_dropout=0.0, num_train_examples=32, **retain)
    # the CPU path with the math attention kernel (torch's CPU default may be flash) and small head chunks
    cpu = make_engine(tmp_path / "cpu", **common, sdpa_backend="math", head_chunk_rows=16, pad_multiple=1,
                      row_group_tokens=0)
    # split: groups of rows padded to a multiple of 16 (tiny rows are shorter than 64) within one micro-batch
    gpu = make_engine(tmp_path / "gpu", **common, **{**GPU_PATH, **({"row_group_tokens": 0, "pad_multiple": 16}
                                                                     if split else {})})
    assert gpu.settings.sdpa_backend == "flash"
    _, fb, _ = next(cpu._micro_batches(0, 0))
    assert len(set(fb.lengths)) > 1 and len(row_groups(fb.lengths, 0)) > 1  # rows of several lengths: the CPU path splits
    if split:
        assert len(row_groups(fb.lengths, 0, 16)) > 1 and any(x % 16 for x in fb.lengths)
    (cpu_losses, cpu_grads), (gpu_losses, gpu_grads) = _step_grads(cpu), _step_grads(gpu)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-5)
    assert cpu_grads.keys() == gpu_grads.keys() and cpu_grads
    for name, g in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], g, rtol=1e-4, atol=1e-6)
