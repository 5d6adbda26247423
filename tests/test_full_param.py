"""Full-parameter sequential mode (`method: full`), `forget_suffix` and `retain_ramp_start` (#27 item 1).

A full run changes only the scheduled (and maintained) decoder blocks, bit for bit; the original model is
the stashed weights of the trained blocks; the forget suffix runs as the original or the current model;
the retain ramp starts where `retain_ramp_start` says; a resumed run equals the uninterrupted one exactly;
two processes give the one-process result; bad settings are one line each.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sequnlearn.cli import main
from sequnlearn.config import load_config
from sequnlearn.data.corpora import collate
from sequnlearn.distributed import Process
from sequnlearn.model.layers import hidden_after
from sequnlearn.model.tiny import byte_tokenizer, tiny_model
from sequnlearn.runs import RunDir, prepare_out_dir, read_jsonl
from sequnlearn.unlearn.engine import Unlearner, load_batches, unlearn
from sequnlearn.unlearn.schedule import coefficients

TIMING = ("time_s", "tokens_per_s")
FULL = ["method=full", "layers=[3,1]", "maintained_layers=[2]", "retain_ramp_start=0.25", "checkpoint_every=1"]
"""The end-to-end run: blocks 3 and 1 scheduled, 2 maintained, 0 never trained."""


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMING} for line in read_jsonl(path / "metrics.jsonl")]


def _block(name: str) -> int | None:
    """The decoder block a parameter name belongs to (None: embeddings, final norm, head)."""
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The tiny preset in full-parameter mode, through the CLI."""
    out = tmp_path_factory.mktemp("full") / "run"
    main(["unlearn", "--preset", "tiny", *_sets(FULL), "--out", str(out)])
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The saved model's state dict, by the names the loaded model has."""
    from sequnlearn.model.load import load_model

    return load_model(str(run / "model"), dtype="fp32", device="cpu")[0].state_dict()


def test_only_the_scheduled_and_maintained_blocks_change(full_run):
    trained, base = _weights(full_run), tiny_model("gpt_neox").state_dict()
    assert trained.keys() == base.keys()
    changed = {k for k in trained if not torch.equal(trained[k], base[k])}
    unchanged = {k for k in trained if k not in changed}
    assert {_block(k) for k in changed} == {1, 2, 3}
    assert all(_block(k) in (None, 0) for k in unchanged)  # embeddings, block 0, final norm, head: bit-identical
    for i in (1, 2, 3):  # every weight matrix of a trained block moved
        assert all(k in changed for k in trained if _block(k) == i and k.endswith("weight") and trained[k].ndim == 2)


def test_a_full_run_writes_the_model_and_no_adapter(full_run):
    assert not (full_run / "adapter").exists()
    card = (full_run / "model" / "README.md").read_text()
    assert "full-parameter" in card and "LoRA adapter" not in card and "maintained blocks [2]" in card
    state = torch.load(full_run / "checkpoints" / "state.pt", weights_only=False)
    assert "adapter" not in state and sorted(state["blocks"]) == [1, 2, 3]  # the trained blocks only
    base = tiny_model("gpt_neox").state_dict()
    assert sum(t.numel() for w in state["blocks"].values() for t in w.values()) < sum(t.numel() for t in base.values())


def test_retain_ramp_starts_at_its_share_of_retain_coef(full_run):
    assert coefficients(0.0, 50.0, 5.0, 0.25) == (50.0, 1.25)
    assert coefficients(0.5, 50.0, 5.0, 0.25) == (43.75, 3.125)  # 5·(0.25 + 0.75·0.5)
    assert coefficients(1.0, 50.0, 5.0, 0.25) == (37.5, 5.0)
    assert coefficients(0.5, 50.0, 5.0) == (43.75, 2.5)  # the reference: from 0
    lines = _metrics(full_run)  # two steps per phase: p = 0, then 1
    assert [x["retain_coef"] for x in lines] == [1.25, 5.0, 1.25, 5.0]
    assert [x["layer"] for x in lines] == [3, 3, 1, 1]


# ---------------------------------------------------------------------- the objective in memory


def _engine(tmp_path: Path, *sets: str) -> Unlearner:
    cfg = load_config(preset="tiny", overrides=["forget_loss=max_entropy", "lora_dropout=0.0", *sets])
    tok = byte_tokenizer()
    torch.manual_seed(0)
    return Unlearner(cfg, tiny_model("gpt_neox"), tok, load_batches(cfg, tok), RunDir(tmp_path), Process())


def _perturb(engine: Unlearner, blocks: list[int]) -> None:
    """Move ``blocks`` away from the base model, as training would (a LoRA adapter: its B factors)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            if _block(name) in blocks and (engine.blocks is not None or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _max_entropy_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """KL(uniform ‖ softmax) / log V, averaged over the tokens of ``(N, V)`` logits."""
    v = logits.shape[-1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return (-math.log(v) - logp.mean(-1)).mean() / math.log(v)


def _same_length_batch(engine: Unlearner) -> dict:
    n = min(len(s) for s in engine.data.forget[:2])
    return collate([s[:n] for s in engine.data.forget[:2]], engine.data.pad_id)  # no padding: every token real


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("suffix", ["original", "current"])
def test_forget_suffix_runs_the_original_or_the_current_model(tmp_path, method, suffix):
    engine = _engine(tmp_path, f"method={method}", f"forget_suffix={suffix}")
    if engine.blocks is not None:
        engine._enter_phase(1)  # blocks 3 and 2 have started training: their originals are stashed
    _perturb(engine, [2, 3])  # the suffix of target layer 1 now differs from the original
    base = tiny_model("gpt_neox")
    with torch.no_grad():
        for model in (engine.arch.head, base.get_output_embeddings()):
            model.weight.mul_(30)  # a peaked read-out (the head never trains): losses far from 0
    batch = _same_length_batch(engine)
    got = engine.objective.forget_loss(batch, 1)
    with torch.no_grad():
        current = engine.model(input_ids=batch["input_ids"]).logits  # the current model end to end
        original = base(input_ids=batch["input_ids"]).logits  # blocks 0, 1 are unchanged
    want = _max_entropy_by_hand((current if suffix == "current" else original).flatten(0, 1))
    other = _max_entropy_by_hand((original if suffix == "current" else current).flatten(0, 1))
    assert abs(want - other) > 0.01  # the two suffixes give different losses here
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", ["original", "current"])
def test_lora_suffix_adapters_get_forget_gradients_only_from_the_current_suffix(tmp_path, suffix):
    engine = _engine(tmp_path, f"forget_suffix={suffix}")
    _perturb(engine, [0, 1, 2, 3])
    engine.objective.forget_loss(_same_length_batch(engine), 1).backward()
    graded = {_block(n) for n, p in engine.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded == ({0, 1, 2, 3} if suffix == "current" else {0, 1})


def test_the_original_model_is_the_stashed_blocks_bit_for_bit(tmp_path):
    engine = _engine(tmp_path, "method=full")
    engine._enter_phase(1)
    engine._enter_phase(2)
    _perturb(engine, [1, 2, 3])
    ids = _same_length_batch(engine)["input_ids"]
    with torch.no_grad():
        h, _ = hidden_after(engine.arch, ids, None, 3, adapter=False)
        base = tiny_model("gpt_neox")(input_ids=ids).logits
        assert torch.equal(engine.arch.logits(h), base)
        h, _ = hidden_after(engine.arch, ids, None, 3, adapter=True)
        assert not torch.allclose(engine.arch.logits(h), base)


def test_full_gradients_reach_only_the_phase_blocks_and_match_with_checkpointing(tmp_path):
    engine = _engine(tmp_path, "method=full", "maintained_layers=[0]")
    engine._enter_phase(1)  # target 2, maintained 0; block 3 (trained in phase 0) is now frozen
    _perturb(engine, [3, 2])
    batch = _same_length_batch(engine)
    grads = []
    for checkpoint in (False, True):
        engine.objective.checkpointing = checkpoint
        engine.model.zero_grad(set_to_none=True)
        (engine.objective.forget_loss(batch, 2) + engine.objective.retain_loss(batch)).backward()
        grads.append({n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None})
    assert {_block(n) for n in grads[0]} == {0, 2} and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scope", ["run", "phase"])
def test_optimizer_state_exists_only_for_trainable_blocks(tmp_path, scope):
    engine = _engine(tmp_path, "method=full", "maintained_layers=[0]", f"optimizer_scope={scope}")
    engine.optimizer_step(0, 3)
    blocks = {i: set(map(id, engine.arch.layers[i].parameters())) for i in range(4)}

    def with_state() -> set[int]:
        return {i for i, ids in blocks.items() if any(id(p) in ids for p in engine.opt.state)}

    assert with_state() == {0, 3}
    engine._enter_phase(1)
    if scope == "phase":
        engine.opt = engine._new_optimizer()
    assert with_state() == ({0} if scope == "run" else set())  # block 3 trains no more: its moments are gone
    engine.optimizer_step(1, 2)
    assert with_state() == {0, 2}


def test_nonfinite_weights_are_refused_before_anything_is_written(tmp_path):
    from sequnlearn.eval import NonFiniteModel

    engine = _engine(tmp_path / "run", "method=full")
    engine.run.root.mkdir()
    with torch.no_grad():
        next(engine.arch.layers[3].parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteModel):
        engine.save()
    assert sorted(p.name for p in engine.run.root.iterdir()) == []


# ---------------------------------------------------------------------- resume, processes


RESUME = ["method=full", "maintained_layers=[0]", "checkpoint_every=1", "lr_schedule=linear", "weight_decay=0.1"]


@pytest.mark.parametrize("scope", ["run", "phase"])
def test_resume_mid_phase_equals_the_uninterrupted_run(tmp_path, scope):
    cfg = load_config(preset="tiny", overrides=[*RESUME, f"optimizer_scope={scope}"])
    whole = unlearn(cfg, RunDir(prepare_out_dir(tmp_path / "whole")))
    run = RunDir(prepare_out_dir(tmp_path / "cut"))

    def stop(pos):
        if pos.step == 3:  # phase 2 of 3, one step into it: mid-phase optimizer state
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unlearn(cfg, run, on_checkpoint=stop)
    assert not run.is_finished()
    unlearn(cfg, RunDir(prepare_out_dir(run.root, resume=True)), resume=True)
    assert _metrics(run.root) == _metrics(whole.root)
    a, b = load_file(str(run.model / "model.safetensors")), load_file(str(whole.model / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_give_the_one_process_result(tmp_path, full_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
           "-m", "sequnlearn", "unlearn", "--preset", "tiny", *_sets(FULL), "--set", "sharding=ddp",
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "provenance.json").read_text())["num_processes"] == 2
    one, two = _weights(full_run), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")  # all-reduce order
    for x, y in zip(_metrics(full_run), _metrics(tmp_path / "two"), strict=True):
        assert x["tokens"] == y["tokens"] and abs(x["forget_loss"] - y["forget_loss"]) < 1e-5


# ---------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("sets, message", [
    (["method=full", "maintained_layers=[7]"], "maintained_layers [7] are outside this model's depth"),
    (["maintained_layers=[1]"], "maintained_layers train whole decoder blocks; set method: full"),
    (["method=full", "maintained_layers=[1,1]"], "maintained_layers [1, 1] must be distinct"),
    (["method=full", "sharding=fsdp"], "method full does not run FSDP-sharded"),
    (["method=partial"], "method 'partial' is not valid"),
    (["forget_suffix=both"], "forget_suffix 'both' is not valid"),
    (["retain_ramp_start=1.5"], "retain_ramp_start must be in [0, 1]"),
    (["method=full", "dtype=bf16"], "method full with bf16 weights loses small updates"),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, sets, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["unlearn", "--preset", "tiny", *_sets(sets), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_full_mode_loads_fp32_weights_under_auto():
    from sequnlearn.config import UnlearnConfig

    assert UnlearnConfig(method="full").weights_dtype() == "fp32"
    assert UnlearnConfig().weights_dtype() == "auto" and UnlearnConfig(method="full", dtype="fp32").weights_dtype() == "fp32"
