"""Two CPU processes (gloo) end with the same adapter and metrics as one process, same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _run(out: Path, nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
              "--master_port", str(29600 + nproc)] if nproc > 1 else [sys.executable]
    proc = subprocess.run(prefix + ["-m", "sequnlearn", "unlearn", "--preset", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, 1)
    _run(two, 2)
    assert json.loads((two / "provenance.json").read_text())["num_processes"] == 2
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)

    def lines(p):
        return [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "tokens_per_s")}
                for x in (p / "metrics.jsonl").read_text().splitlines()]

    la, lb = lines(one), lines(two)
    assert [x["tokens"] for x in la] == [x["tokens"] for x in lb]
    for x, y in zip(la, lb):
        assert abs(x["forget_loss"] - y["forget_loss"]) < 1e-5 and abs(x["retain_loss"] - y["retain_loss"]) < 1e-5
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
