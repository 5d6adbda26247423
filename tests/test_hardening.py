"""Bad input is one line and exit 2 with nothing written; kills resume exactly; NaNs stop the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sequnlearn.cli import main
from sequnlearn.config import load_config
from sequnlearn.errors import UserError
from sequnlearn.runs import RunDir, prepare_out_dir, read_jsonl
from sequnlearn.unlearn import engine as engine_mod
from sequnlearn.unlearn.engine import unlearn


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    from transformers import BertConfig, BertLMHeadModel

    bert = tmp / "bert"
    BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, is_decoder=True)).save_pretrained(bert)
    from sequnlearn.model.tiny import byte_tokenizer

    byte_tokenizer().save_pretrained(bert)
    few = _jsonl(tmp / "few.jsonl", [{"text": f"doc {i}"} for i in range(3)])
    nofield = _jsonl(tmp / "nofield.jsonl", [{"body": "x"}] * 20)
    empty = _jsonl(tmp / "empty.jsonl", [{"text": "  "}] * 20)
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("lr: [1\n")
    return [
        (["--preset", "tinyy"], "unknown preset 'tinyy'; did you mean 'tiny'?"),
        (["--config", str(tmp / "missing.yaml")], "does not exist"),
        (["--config", str(bad_yaml)], "YAML syntax error"),
        (["--preset", "tiny", "--set", "retain_cof=5"], "did you mean 'retain_coef'"),
        (["--preset", "tiny", "--set", "remove_coef=-1"], "remove_coef must be >= 0"),
        (["--preset", "tiny", "--set", "lora_r=0"], "lora_r must be >= 1"),
        (["--preset", "tiny", "--set", "lr=0"], "lr must be > 0"),
        (["--preset", "tiny", "--set", "layers=[9, 2]"], "outside this model's depth"),
        (["--preset", "tiny", "--set", "layers=[]"], "layers is an empty list"),
        (["--preset", "tiny", "--set", "layers=null", "--set", "layer_start=1", "--set", "layer_end=3"],
         "back to front"),
        (["--preset", "tiny", "--set", f"model={tmp / 'no-such-model'}"], "does not exist"),
        (["--preset", "tiny", "--set", f"model={tmp}"], "holds no model"),
        (["--preset", "tiny", "--set", f"model={bert}"], "model type 'bert' is not supported"),
        (["--preset", "tiny", "--set", "forget_data=nobody/no-such-dataset"], "is not reachable"),
        (["--preset", "tiny", "--set", f"forget_data={tmp / 'none.jsonl'}"], "does not exist"),
        (["--preset", "tiny", "--set", f"forget_data={nofield}"], "has no field"),
        (["--preset", "tiny", "--set", f"forget_data={empty}"], "empty after dropping empty texts"),
        (["--preset", "tiny", "--set", f"forget_data={few}"], "fewer than one global batch"),
        (["--preset", "tiny", "--set", "global_batch_size=6"], "not a multiple of per_device_batch_size"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    for args, message in bad_inputs(tmp_path):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            main(["unlearn", *args, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, args
        assert message in err, (args, err)
        assert len(err.splitlines()) <= 3 and "Traceback" not in err, err
        assert not out.exists() or not any(out.iterdir()), args


def test_a_nan_loss_stops_the_run_and_writes_no_model(tmp_path, monkeypatch):
    from sequnlearn.unlearn.objective import Objective

    real, real_step, now = Objective.forget_loss, engine_mod.Unlearner.optimizer_step, {}

    def step(self, phase, layer):
        now["step"] = self.pos.step
        return real_step(self, phase, layer)

    def poisoned(self, batch, layer, gen=None, targets=None):
        loss = real(self, batch, layer, gen, targets)
        return loss * float("nan") if now["step"] == 2 else loss

    monkeypatch.setattr(engine_mod.Unlearner, "optimizer_step", step)
    monkeypatch.setattr(Objective, "forget_loss", poisoned)
    run = RunDir(prepare_out_dir(tmp_path / "nan"))
    with pytest.raises(UserError, match=r"non-finite loss at step 2 \(layer 2, phase step 0\): forget_loss=nan"):
        unlearn(load_config(preset="tiny"), run)
    assert not run.model.exists() and not run.adapter.exists()

    skip = RunDir(prepare_out_dir(tmp_path / "skip"))
    unlearn(load_config(preset="tiny", overrides=["on_nan=skip"]), skip)
    assert json.loads(skip.provenance.read_text())["nan_skipped"] == 2  # both micro-batches of step 2
    assert skip.is_finished()


def _cli(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sequnlearn", "unlearn", "--preset", "tiny", "--set", "num_train_examples=40",
           "--set", "checkpoint_every=1", "--out", str(out), *extra]
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: give the child the default disposition, as a terminal would.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.time()
    while len(read_jsonl(path)) < n:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - start < timeout
        time.sleep(0.05)


def _strip(run: Path) -> list[dict]:
    return [{k: v for k, v in x.items() if k not in ("time_s", "tokens_per_s")} for x in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = _cli(out)
    assert proc.wait(timeout=400) == 0, proc.communicate()[1][-2000:]
    return out


def test_sigkill_mid_phase_then_resume_ends_identically(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = _cli(out)
    _wait_for_lines(out / "metrics.jsonl", 7, proc)  # phase 2 of 3 (5 steps per phase)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()
    resumed = _cli(out, "--resume")
    assert resumed.wait(timeout=400) == 0, resumed.communicate()[1][-2000:]
    assert _strip(out) == _strip(uninterrupted)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in out.rglob("*.tmp")] == []


def test_ctrl_c_stops_cleanly_with_the_resume_command(tmp_path):
    out = tmp_path / "interrupted"
    proc = _cli(out)
    _wait_for_lines(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; continue with: sequnlearn unlearn --preset tiny" in err and "--resume" in err
    assert "Traceback" not in err


def test_resume_removes_the_temp_files_a_killed_writer_left(tmp_path):
    from sequnlearn.runs import remove_stale_temp_files

    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".state.pt.k3j9x0aa.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = tmp_path / "checkpoints" / "state.pt"
    keep.write_bytes(b"the last whole checkpoint")
    half_model = tmp_path / ".model.x81ks0q2.tmp"  # a merged-model save killed mid-way (atomic_dir)
    (half_model / "sub").mkdir(parents=True)
    (half_model / "sub" / ".inner.tmp").write_bytes(b"")
    assert remove_stale_temp_files(tmp_path) == sorted([stale, half_model])
    assert not stale.exists() and not half_model.exists() and keep.read_bytes() == b"the last whole checkpoint"


def test_atomic_dir_replaces_only_when_the_block_succeeds(tmp_path):
    from sequnlearn.runs import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w").write_text("2")
            raise RuntimeError("killed mid-save")
    assert (target / "w").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["v"]
