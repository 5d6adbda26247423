"""`sequnlearn unlearn` end to end on the tiny preset: run directory, resume, refusals."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sequnlearn.cli import main
from sequnlearn.config import load_config
from sequnlearn.runs import RunDir, prepare_out_dir, read_jsonl
from sequnlearn.unlearn.engine import unlearn

TIMING = ("time_s", "tokens_per_s")


def _adapter(run: RunDir) -> dict:
    return load_file(str(run.adapter / "adapter_model.safetensors"))


def _metrics(run: RunDir) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMING} for line in read_jsonl(run.metrics)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "sequnlearn", "unlearn", "--preset", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return RunDir(out)


def test_cli_writes_the_run_directory(finished_run):
    run = finished_run
    for path in (run.config, run.provenance, run.metrics, run.adapter / "adapter_config.json", run.model / "config.json",
                 run.model / "tokenizer.json", run.checkpoints / "state.pt"):
        assert path.exists(), path
    lines = read_jsonl(run.metrics)
    assert [line["layer"] for line in lines] == [3, 3, 2, 2, 1, 1]
    for key in ("layer", "step", "forget_loss", "retain_loss", "forget_coef", "retain_coef", "lr"):
        assert key in lines[0]
    assert [line["forget_coef"] for line in lines[:2]] == [50.0, 37.5]
    assert [line["retain_coef"] for line in lines[:2]] == [0.0, 5.0]
    prov = json.loads(run.provenance.read_text())
    assert prov["end_time"] and prov["packages"]["torch"]


def test_merged_model_is_the_adapted_model(finished_run):
    from transformers import AutoModelForCausalLM

    from sequnlearn.model.tiny import tiny_model

    merged = AutoModelForCausalLM.from_pretrained(str(finished_run.model))
    base = tiny_model("gpt_neox")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)


def test_interrupted_after_a_phase_and_resumed_ends_identically(tmp_path, finished_run):
    cfg = load_config(preset="tiny")
    run = RunDir(prepare_out_dir(tmp_path / "r"))

    def stop_after_first_phase(pos):
        if pos.phase == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unlearn(cfg, run, on_checkpoint=stop_after_first_phase)
    assert len(read_jsonl(run.metrics)) == 2 and not run.is_finished()
    unlearn(cfg, RunDir(prepare_out_dir(run.root, resume=True)), resume=True)
    assert _metrics(run) == _metrics(finished_run)
    a, b = _adapter(run), _adapter(finished_run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_metrics_written_after_the_checkpoint_are_dropped_on_resume(tmp_path, finished_run):
    cfg = load_config(preset="tiny")
    run = RunDir(prepare_out_dir(tmp_path / "r"))

    def stop(pos):
        if pos.phase == 1:
            with open(run.metrics, "a") as f:  # a line from a step that was lost with the kill
                f.write('{"step": 99}\n')
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unlearn(cfg, run, on_checkpoint=stop)
    unlearn(cfg, run, resume=True)
    assert _metrics(run) == _metrics(finished_run)


def test_non_empty_out_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--preset", "tiny", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"


def test_resume_with_a_different_config_is_refused(tmp_path, finished_run, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run.root, out)
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--preset", "tiny", "--set", "remove_coef=20", "--out", str(out), "--resume"])
    assert e.value.code == 2
    assert "different config (remove_coef)" in capsys.readouterr().err


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--preset", "tiny", "--out", str(tmp_path / "nothing"), "--resume"])
    assert "holds no run" in capsys.readouterr().err
