"""Every bad file and damaged state, through every command: exit 2, one to three lines, no traceback,
nothing created or changed in --out. Plus a full disk keeps the previous checkpoint."""

import errno
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sequnlearn.cli import main
from sequnlearn.config import load_config
from sequnlearn.errors import UserError
from sequnlearn.runs import RunDir, prepare_out_dir
from sequnlearn.unlearn.engine import unlearn

UTF16 = "\ufeff" + '{"text": "a virus"}\n' * 20
FIXTURE = Path(__file__).parent / "fixtures" / "mcq_60.jsonl"


def _write(path: Path, data: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def _save(model, path: Path, tokenizer=None, **kw) -> Path:
    from sequnlearn.model.tiny import byte_tokenizer

    model.save_pretrained(path, **kw)
    (tokenizer or byte_tokenizer()).save_pretrained(path)
    return path


def _models(tmp: Path) -> dict[str, str]:
    """A sound tiny model and damaged copies of it."""
    from sequnlearn.model.tiny import tiny_model

    good = _save(tiny_model("gpt_neox"), tmp / "good")
    dirs = {"good": good}
    dirs["truncated"] = Path(shutil.copytree(good, tmp / "truncated"))
    st = dirs["truncated"] / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    dirs["garbled"] = Path(shutil.copytree(good, tmp / "garbled"))
    (dirs["garbled"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    sharded = _save(tiny_model("gpt_neox"), tmp / "sharded", max_shard_size="200KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    dirs["sharded"] = sharded
    dirs["badconfig"] = Path(shutil.copytree(good, tmp / "badconfig"))
    cfg = (dirs["badconfig"] / "config.json").read_text()
    (dirs["badconfig"] / "config.json").write_text(cfg[: len(cfg) // 2])
    dirs["badtok"] = Path(shutil.copytree(good, tmp / "badtok"))
    (dirs["badtok"] / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    dirs["smallvocab"] = _save(tiny_model("gpt_neox", vocab_size=128), tmp / "smallvocab")
    dirs["gpt2short"] = _save(tiny_model("gpt2", max_len=32), tmp / "gpt2short")
    return {k: str(v) for k, v in dirs.items()}


def _files(tmp: Path) -> dict[str, str]:
    """Bad corpora, MCQ files and configs."""
    good_rows = [json.loads(x) for x in FIXTURE.read_text().splitlines()[:8]]
    f = {
        "utf16_jsonl": _write(tmp / "utf16.jsonl", UTF16.encode("utf-16-le")),
        "utf16_txt": _write(tmp / "utf16.txt", b"\xff\xfe\x00" + "text\n\nmore".encode("utf-16-le")),
        "utf16_yaml": _write(tmp / "utf16.yaml", "lr: 0.001\n".encode("utf-16")),
        "cut_jsonl": _write(tmp / "truncated.jsonl", '{"text": "a virus"}\n' * 20 + '{"text": "a vi'),
        "list_lines": _write(tmp / "lists.jsonl", "[1, 2]\n" * 20),
        "scalar_json": _write(tmp / "scalar.json", "42"),
        "int_items": _write(tmp / "items.json", "[1, 2, 3]"),
        "parquet": _write(tmp / "garbage.parquet", b"PAR1 this is not parquet"),
        "list_yaml": _write(tmp / "list.yaml", "- a\n- b\n"),
        "mcq_good": _write(tmp / "mcq.jsonl", "".join(json.dumps(r) + "\n" for r in good_rows)),
        "mcq_truncated": _write(tmp / "mcq_cut.jsonl", "".join(json.dumps(r) + "\n" for r in good_rows)[:-25]),
        "mcq_object": _write(tmp / "mcq_object.json", json.dumps({"question": "q"})),
        "mcq_utf16": _write(tmp / "mcq16.jsonl", FIXTURE.read_text().encode("utf-16")),
    }
    (tmp / "dir.jsonl").mkdir()
    f["dir"] = str(tmp / "dir.jsonl")
    _write(tmp / "datadir" / "wmdp_bio_robust.jsonl", FIXTURE.read_text().encode("utf-16"))
    f["datadir"] = str(tmp / "datadir")
    return f


def _damaged_runs(tmp: Path, run: Path) -> dict[str, str]:
    """Copies of a finished tiny run: checkpoint truncated, checkpoint foreign, config not UTF-8."""
    out = {}
    for name in ("ckpt_cut", "ckpt_foreign", "cfg16"):
        out[name] = Path(shutil.copytree(run, tmp / "runs" / name))
    for name in ("ckpt_cut", "ckpt_foreign"):  # interrupted runs: a finished one has nothing to resume
        shutil.rmtree(out[name] / "model")
    state = out["ckpt_cut"] / "checkpoints" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    torch.save({"weights": 1}, out["ckpt_foreign"] / "checkpoints" / "state.pt")
    (out["cfg16"] / "config.yaml").write_bytes((out["cfg16"] / "config.yaml").read_text().encode("utf-16"))
    out["same"] = Path(shutil.copytree(run, tmp / "runs" / "same"))
    return {k: str(v) for k, v in out.items()}


def _sweep_files(tmp: Path, f: dict, m: dict) -> dict[str, str]:
    def sweep(name, eval_task, extra=""):
        return _write(tmp / f"{name}.yaml", f"name: {name}\nbase: tiny\n{extra}grid:\n  lr: [0.001]\n"
                                           f"eval:\n  forget_task: {eval_task}\n")

    return {"sweep_mcq16": sweep("s1", f["mcq_utf16"]),
            "sweep_model": sweep("s2", f["mcq_good"], f"set:\n  model: {m['truncated']}\n")}


def _report_dirs(tmp: Path, run: Path) -> dict[str, str]:
    cut = Path(shutil.copytree(run, tmp / "report" / "cut" / "point"))
    _write(cut / "eval.json", '{"forget_acc": 0.25, "retain_')
    cfg = Path(shutil.copytree(run, tmp / "report" / "cfg" / "point"))
    _write(cfg / "eval.json", '{"forget_acc": 0.25, "retain_acc": 0.5}')
    (cfg / "config.yaml").write_bytes(b"\xff\xfe\x00model")
    return {"report_cut": str(cut.parent), "report_cfg": str(cfg.parent)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    run = RunDir(prepare_out_dir(tmp / "finished"))
    unlearn(load_config(preset="tiny"), run)
    m, f = _models(tmp / "models"), _files(tmp / "files")
    return {**m, **f, **_damaged_runs(tmp, run.root), **_sweep_files(tmp / "sweeps", f, m),
            **_report_dirs(tmp, run.root), "tmp": str(tmp)}


def cases(x: dict) -> list[tuple[list[str], str, str | None]]:
    """(argv with OUT for the output path, expected message, existing directory used as --out or None)."""
    U = ["unlearn", "--preset", "tiny", "--out", "OUT"]
    E = ["eval", x["good"], "--out", "OUT/eval.json"]
    T = ["tamper", x["good"], "--eval-data", x["mcq_good"], "--steps", "1", "--eval-every", "1", "--out", "OUT"]
    return [
        (U + ["--set", f"forget_data={x['utf16_jsonl']}"], "is not UTF-8 text (it looks like UTF-16): byte 0xff at line 1", None),
        (U + ["--set", f"forget_data={x['utf16_txt']}"], "is not UTF-8 text", None),
        (U + ["--set", f"forget_data={x['cut_jsonl']}"], "line 21 is not valid JSON", None),
        (U + ["--set", f"forget_data={x['list_lines']}"], "line 1 is a list, not an object", None),
        (U + ["--set", f"forget_data={x['scalar_json']}"], "is int, not a list", None),
        (U + ["--set", f"forget_data={x['int_items']}"], "item 1 is int, not an object", None),
        (U + ["--set", f"forget_data={x['parquet']}"], "is not a readable parquet file", None),
        (U + ["--set", f"forget_data={x['dir']}"], "is a directory", None),
        (U + ["--set", f"retain_data={x['utf16_jsonl']}"], "is not UTF-8 text", None),
        (["unlearn", "--config", x["utf16_yaml"], "--out", "OUT"], "is not UTF-8 text", None),
        (["unlearn", "--config", x["list_yaml"], "--out", "OUT"], "must hold a mapping", None),
        (U + ["--set", f"model={x['truncated']}"], "is truncated", None),
        (U + ["--set", f"model={x['garbled']}"], "is corrupted (its header does not parse)", None),
        (U + ["--set", f"model={x['sharded']}"], "is missing weight shard", None),
        (U + ["--set", f"model={x['badconfig']}"], "model config", None),
        (U + ["--set", f"model={x['badtok']}"], "cannot load a tokenizer", None),
        (U + ["--set", f"model={x['smallvocab']}"], "has 257 tokens but the model only 128 embeddings", None),
        (U + ["--set", f"model={x['gpt2short']}"], "max_length 64 is above the 32 positions", None),
        (U + ["--resume"], "has a different config", "same"),  # tiny preset, but the run's lr differs below
        (["unlearn", "--preset", "tiny", "--out", "OUT", "--resume"], "is truncated or corrupted", "ckpt_cut"),
        (["unlearn", "--preset", "tiny", "--out", "OUT", "--resume"], "lacks adapter", "ckpt_foreign"),
        (["unlearn", "--preset", "tiny", "--out", "OUT", "--resume"], "is not UTF-8 text", "cfg16"),
        (U + ["--overwrite", "--set", f"forget_data={x['cut_jsonl']}"], "line 21 is not valid JSON", "same"),
        (E + ["--data", x["mcq_utf16"]], "is not UTF-8 text", None),
        (E + ["--data", x["mcq_truncated"]], "line 8 is not valid JSON", None),
        (E + ["--data", x["mcq_object"]], "is an object, not a list", None),
        (E + ["--data", x["parquet"]], "is not a readable parquet file", None),
        (E + ["--tasks", "wmdp_bio_robust", "--data-dir", x["datadir"]], "is not UTF-8 text", None),
        (["eval", x["sharded"], "--data", x["mcq_good"], "--out", "OUT/eval.json"], "is missing weight shard", None),
        (T + ["--data", str(Path(x["tmp"]) / "missing.jsonl")], "does not exist", None),
        (T + ["--data", x["utf16_jsonl"]], "is not UTF-8 text", None),
        (["tamper", x["good"], "--eval-data", x["mcq_utf16"], "--data", x["mcq_good"], "--out", "OUT"],
         "is not UTF-8 text", None),
        (["tamper", x["truncated"], "--eval-data", x["mcq_good"], "--out", "OUT"], "is truncated", None),
        (["tamper", x["gpt2short"], "--eval-data", x["mcq_good"], "--set", "max_length=64", "--out", "OUT"],
         "above the 32 positions", None),
        (["tamper", x["good"], "--config", x["utf16_yaml"], "--out", "OUT"], "is not UTF-8 text", None),
        (["sweep", x["utf16_yaml"], "--out", "OUT"], "is not UTF-8 text", None),
        (["sweep", x["sweep_mcq16"], "--out", "OUT"], "is not UTF-8 text", None),
        (["sweep", x["sweep_model"], "--out", "OUT"], "is truncated", None),
        (["report", x["report_cut"], "--out", "OUT"], "is not valid JSON", None),
        (["report", x["report_cfg"], "--out", "OUT"], "is not UTF-8 text", None),
        (["toyworld", "build", "--out", "OUT", "--set", "num_layer=4"], "did you mean 'num_layers'", None),
        (["demo", "--out", "OUT", "--world", "OUT/world", "--preset", "toy-l3"], "unknown preset 'toy-l3'", None),
        (["demo", "--out", "OUT", "--world", "OUT/world", "--set", "lr=0"], "lr must be > 0", None),
    ]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_every_bad_input_is_one_line_exit_2_and_leaves_out_untouched(inputs, tmp_path, capsys):
    # The run copied as "same" differs from the tiny preset in lr, so that --resume is refused.
    same = Path(inputs["same"]) / "config.yaml"
    same.write_text(same.read_text().replace("lr: 0.001", "lr: 0.002"))
    all_cases = cases(inputs)
    assert len(all_cases) >= 30
    for i, (argv, message, existing) in enumerate(all_cases):
        out = Path(inputs[existing]) if existing else tmp_path / f"out{i}"
        before = _snapshot(out) if existing else None
        with pytest.raises(SystemExit) as e:
            main([a.replace("OUT", str(out)) for a in argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, (argv, err[-3000:])
        assert message in err, (argv, err)
        assert 1 <= len(err.splitlines()) <= 3 and "Traceback" not in err, (argv, err)
        if existing:
            assert _snapshot(out) == before, argv
        else:
            assert not out.exists(), argv


def test_a_missing_tracker_package_is_named_with_its_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--preset", "tiny", "--report-to", "tensorboard", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "pip install 'sequnlearn[tensorboard]'" in err
    assert not (tmp_path / "out").exists()


def test_rotary_positions_past_training_warn_and_run(capsys):
    from sequnlearn.model.load import check_positions

    check_positions({"model_type": "gpt_neox", "max_position_embeddings": 32}, 64, "m")
    assert "warning: max_length 64 is above the 32 positions" in capsys.readouterr().err
    with pytest.raises(UserError, match="learned position embeddings"):
        check_positions({"model_type": "gpt2", "n_positions": 32}, 64, "m")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = RunDir(prepare_out_dir(tmp_path / "run"))
    saved: list[bytes] = []
    real_save = torch.save

    def save(obj, path, *a, **kw):
        if saved:  # the second checkpoint: half written, then the disk is full
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *a, **kw)
        saved.append(Path(path).read_bytes())

    monkeypatch.setattr(torch, "save", save)
    cfg = load_config(preset="tiny", overrides=["checkpoint_every=1"])
    with pytest.raises(UserError, match=r"No space left on device\); the previous one is intact; free space"):
        unlearn(cfg, run)
    assert (run.checkpoints / "state.pt").read_bytes() == saved[0]
    assert [p.name for p in run.root.rglob("*.tmp")] == [] and not run.model.exists()
