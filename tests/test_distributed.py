"""Two CPU processes (gloo) end with the same adapter and metrics as one process, same global batch."""

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

from sequnlearn.runs import read_jsonl


TINY = ["--preset", "tiny", "--set", "num_train_examples=40", "--set", "checkpoint_every=1"]  # 5 steps per phase


def _run(out: Path, nproc: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
              "--master_port", str(29600 + nproc)] if nproc > 1 else [sys.executable]
    proc = subprocess.run(prefix + ["-m", "sequnlearn", "unlearn", *TINY, *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The tiny preset on one process: the reference for the multi-process runs."""
    out = tmp_path_factory.mktemp("one") / "run"
    _run(out, 1)
    return out


def _same_adapter(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_process(tmp_path, one):
    two = tmp_path / "two"
    _run(two, 2)
    assert json.loads((two / "provenance.json").read_text())["num_processes"] == 2
    _same_adapter(one, two)

    def lines(p):
        return [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "tokens_per_s")}
                for x in (p / "metrics.jsonl").read_text().splitlines()]

    la, lb = lines(one), lines(two)
    assert [x["tokens"] for x in la] == [x["tokens"] for x in lb]
    for x, y in zip(la, lb):
        assert abs(x["forget_loss"] - y["forget_loss"]) < 1e-5 and abs(x["retain_loss"] - y["retain_loss"]) < 1e-5
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_fsdp_on_two_processes_matches_one_process(tmp_path, one):
    fsdp = tmp_path / "fsdp"
    _run(fsdp, 2, "--set", "sharding=fsdp")
    _same_adapter(one, fsdp)
    assert (fsdp / "model" / "model.safetensors").exists()
    from sequnlearn.model.load import load_model

    merged, _ = load_model(str(fsdp / "model"), dtype="fp32", device="cpu")  # the gathered, merged weights
    reference, _ = load_model(str(one / "model"), dtype="fp32", device="cpu")
    for (name, a), b in zip(reference.state_dict().items(), merged.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_process_run_killed_mid_run_resumes_to_the_one_process_result(tmp_path, one, sharding):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
           "-m", "sequnlearn", "unlearn", *TINY, "--set", f"sharding={sharding}", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    start = time.time()
    while len(read_jsonl(out / "metrics.jsonl")) < 7:  # phase 2 of 3
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - start < 300
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
    proc.wait()
    assert not (out / "model").exists()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=400, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_adapter(one, out)
    strip = [{k: v for k, v in x.items() if k not in ("time_s", "tokens_per_s")} for x in read_jsonl(out / "metrics.jsonl")]
    ref = [{k: v for k, v in x.items() if k not in ("time_s", "tokens_per_s")} for x in read_jsonl(one / "metrics.jsonl")]
    assert [x["step"] for x in strip] == [x["step"] for x in ref]
    for x, y in zip(strip, ref):
        assert abs(x["forget_loss"] - y["forget_loss"]) < 1e-5 and abs(x["retain_loss"] - y["retain_loss"]) < 1e-5


MCQ = str(Path(__file__).parent / "fixtures" / "mcq_60.jsonl")


def _launch(nproc: int, port: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
              "--master_port", str(port)] if nproc > 1 else [sys.executable]
    proc = subprocess.run(prefix + ["-m", "sequnlearn", *args], capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_tamper_on_two_processes_is_the_one_process_attack(tmp_path, sharding):
    args = ["tamper", "tiny:gpt_neox", "--data", "tiny:forget", "--eval-data", MCQ, "--style", "cloze",
            "--steps", "4", "--eval-every", "2", "--lr", "1e-3", "--set", "batch_size=4",
            "--set", "per_device_batch_size=2", "--set", "max_length=32", "--set", "eval_limit=20",
            "--set", "num_train_examples=16"]
    _launch(1, 0, args + ["--out", str(tmp_path / "one")])
    two = _launch(2, 29611, args + ["--set", f"sharding={sharding}", "--out", str(tmp_path / "two")])
    assert two.stdout.count("wrote ") == 1  # only the main process reports
    a = json.loads((tmp_path / "one" / "tamper.json").read_text())["runs"][0]["curve"]
    b = json.loads((tmp_path / "two" / "tamper.json").read_text())["runs"][0]["curve"]
    assert [p["step"] for p in a] == [p["step"] for p in b] == [0, 2, 4]
    assert [p["forget_acc"] for p in a] == [p["forget_acc"] for p in b]
    assert a[1]["train_loss"] != a[2]["train_loss"]  # the weights moved
    for x, y in zip(a[1:], b[1:]):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["tamper.json", "tamper.md", "tamper.png"]


def test_sweep_on_two_processes_evaluates_once_on_the_main_process(tmp_path):
    from sequnlearn.sweep import evaluate_model

    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: s\nbase: tiny\ngrid:\n  remove_coef: [50]\neval:\n  forget_task: {MCQ}\n"
                     "  style: cloze\n  limit: 20\n")
    proc = _launch(2, 29612, ["sweep", str(sweep), "--out", str(tmp_path)])
    assert proc.stdout.count("[sweep] 1/1") == 1 and proc.stdout.count("sweep s done") == 1
    point = tmp_path / "s" / "point"
    saved = json.loads((point / "eval.json").read_text())
    assert json.loads((point / "provenance.json").read_text())["num_processes"] == 2
    again = evaluate_model(str(point / "model"), {"forget_task": MCQ, "style": "cloze", "limit": 20})
    assert saved["forget_acc"] == again["forget_acc"]
    assert (tmp_path / "s" / "baseline" / "eval.json").exists()


def test_sharding_auto_follows_accelerates_fsdp_config(monkeypatch):
    from sequnlearn import distributed

    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for distributed_type: FSDP
    assert distributed.use_fsdp("auto") and not distributed.use_fsdp("ddp")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not distributed.use_fsdp("auto") and distributed.use_fsdp("fsdp")
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 1))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not distributed.use_fsdp("auto")  # nothing to shard across
