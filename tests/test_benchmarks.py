"""Smoke tests of the benchmark tooling (benchmarks/, issue #26), on the CPU at tiny shapes: gpu_step.py's
``--profile``, ``--set`` and ``--device cpu``, its refusals, the profile's arithmetic on GPU-shaped events,
op_count.py's counts, and a dry run of gpu_check.sh."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_step  # noqa: E402
import op_count  # noqa: E402
from unlearn_step import Setup, unlearn_config, with_overrides  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["--device", "cpu", "--shape", "tiny", "--max-length", "64", "--max-batch", "1", "--steps", "1",
        "--warmup", "0"]


def run_gpu_step(*args: str) -> subprocess.CompletedProcess:
    """``benchmarks/gpu_step.py ARGS`` in a subprocess (one thread)."""
    return subprocess.run([sys.executable, str(BENCH / "gpu_step.py"), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_step") / "gpu_step.json"
    res = run_gpu_step(*TINY, "--retain", "l2", "--profile", "--set", "head_chunk_rows=16", "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text()), res.stdout


def test_gpu_step_profiles_each_variant_on_the_cpu(profiled):
    data, stdout = profiled
    run = data["runs"][0]
    assert (data["device"], data["profile_steps"], data["setup"]["overrides"]) == ("cpu", 1, {"head_chunk_rows": 16})
    assert run["loss_match"] is True and [b["batch_size"] for b in run["by_batch"]] == [1]
    for variant in ("naive", "sequnlearn"):
        prof = run[variant]["sizes"][0]["profile"]
        assert prof["kernel_launches_per_step"] == prof["kernel_seconds_per_step"] == prof["gpu_busy_share"] == 0
        assert prof["top_ops_by_gpu_time"] == [] and prof["profiler_aten_ops_per_step"] > 100
        assert prof["host_syncs_counted"] == "aten ops that sync a GPU" and prof["host_syncs_per_step"] >= 1
        names = [op["name"] for op in prof["top_ops_by_cpu_time"]]
        assert len(names) == gpu_step.TOP_OPS and any(n.startswith("aten::") for n in names)
    assert stdout.count("launches, GPU busy") == 2


def test_profile_summary_counts_each_kernel_once_and_only_the_steps_syncs():
    def ev(key, count, device=DeviceType.CPU, gpu=0.0, cpu=1.0):
        return SimpleNamespace(key=key, count=count, device_type=device, self_device_time_total=gpu,
                               self_cpu_time_total=cpu)

    events = [ev("aten::mm", 4, gpu=400.0, cpu=40.0), ev("cudaLaunchKernel", 4), ev("cuLaunchKernelEx", 2),
              ev("sm90_gemm", 4, DeviceType.CUDA, gpu=400.0, cpu=0.0),  # the aten::mm kernels, listed again
              ev("flash_fwd", 2, DeviceType.CUDA, gpu=200.0, cpu=0.0), ev("cudaStreamSynchronize", 2),
              ev("cudaDeviceSynchronize", 1), ev("aten::_local_scalar_dense", 2)]
    got = gpu_step.profile_summary(events, 2, torch.device("cuda"))
    assert got["kernel_seconds_per_step"] == pytest.approx(300e-6)  # (400 + 200) µs over 2 steps, not twice that
    assert (got["kernel_launches_per_step"], got["host_syncs_per_step"]) == (3, 1)
    assert got["sync_ops_per_step"] == {"aten::_local_scalar_dense": 1}
    assert [op["name"] for op in got["top_ops_by_gpu_time"]] == ["aten::mm"]
    assert got["top_ops_by_cpu_time"][0] == {"name": "aten::mm", "calls_per_step": 2, "self_gpu_ms_per_step": 0.2,
                                             "self_cpu_ms_per_step": 0.02}


@pytest.mark.parametrize("args, message", [(["--set", "nosuch=1"], "unknown config key 'nosuch'"),
                                           (["--set", "pad_multiple"], "is not key=value"),
                                           (["--set", "pad_multiple=0"], "pad_multiple must be >= 1"),
                                           (["--min-batch", "4"], "--min-batch 4 must be")])
def test_gpu_step_refuses_bad_options_before_writing(tmp_path, snapshot, capsys, args, message):
    (tmp_path / "out.json").write_text("{}")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        gpu_step.main([*TINY, *args, "--json", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_step_without_a_gpu_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_step.main(["--json", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs a CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "out.json").exists()


def test_set_options_reach_the_engine_config():
    base = Setup("sequnlearn", "tiny", "realistic", "l2", 1, 2, 64, 8, 1.0, 1, 0, 0, "cpu", 1)
    s = with_overrides(base, ["row_group_tokens=8192", "sdpa_backend=math", "head_chunk_rows=null"])
    cfg = unlearn_config(s)
    assert (cfg.row_group_tokens, cfg.sdpa_backend, cfg.head_chunk_rows, cfg.retain_loss) == (8192, "math", None, "l2")
    with pytest.raises(SystemExit) as e:
        with_overrides(base, ["sdpa_backend=cudnn"])
    assert e.value.code == 2


@pytest.fixture(scope="module")
def counts() -> dict:
    """op_count's rows of every variant at two widths of one depth: batch 8, realistic lengths up to 512."""
    rows = {}
    for shape in ("tiny", "tiny-w64"):
        for name, (variant, overrides) in op_count.variants().items():
            s = Setup(variant, shape, "realistic", "l2", 1, 8, 512, 64, 1.0, 2, 2, 0, "cpu", 1, False, overrides)
            rows[shape, name] = op_count.count(s, [2, 3])
    return rows


def test_op_counts_depend_on_the_depth_and_passes_not_on_the_width(counts):
    for name in op_count.variants():
        narrow, wide = counts["tiny", name], counts["tiny-w64", name]
        assert {k: narrow[k] for k in ("ops", "kernel_ops", "attention_calls", "row_groups")} == \
               {k: wide[k] for k in ("ops", "kernel_ops", "attention_calls", "row_groups")}
        assert 0 < narrow["kernel_ops"] < narrow["ops"]


def test_op_count_sees_the_gpu_settings_fewer_passes_and_repeating_widths(counts):
    naive, cpu, gpu = (counts["tiny", v] for v in ("naive", "engine-cpu", "engine-gpu"))
    assert naive["attention_lengths"] == [512] and naive["padded_tokens"] == 2 * 8 * 512
    assert all(n % 64 == 0 for n in gpu["attention_lengths"]) and any(n % 64 for n in cpu["attention_lengths"])
    assert gpu["row_groups"] == 2 < cpu["row_groups"]  # one group per micro-batch
    assert gpu["kernel_ops"] < cpu["kernel_ops"] and gpu["attention_calls"] < cpu["attention_calls"]
    assert cpu["real_tokens"] == gpu["real_tokens"] <= cpu["padded_tokens"] < gpu["padded_tokens"]


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                         env={**ENV, "DRY": "1", "STAGES": "6.9b", "PY": sys.executable}, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (out / "gpu_check.log").read_text()
    assert "gpu_step_6.9b rc=0" in log and "--checkpointing --lengths reference" in log
    run = json.loads((out / "gpu_step_6.9b.json").read_text())["runs"][0]
    assert run["lengths"] == "reference" and run["sequnlearn"]["sizes"][0]["profile"]["steps"] == 1
