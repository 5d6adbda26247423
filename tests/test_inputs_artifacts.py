"""Inputs are taken honestly (special files refused, non-string text an error, dropped, truncated and
missing rows counted, sweep points that collide or leave --out refused) and saved artifacts are usable
elsewhere (modes under the umask, a tokenizer without the run's truncation, an adapter that loads
from any directory with a README of our own). Issue #29, items 7, 9 and 10."""

import contextlib
import io as stdio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sequnlearn import io
from sequnlearn.cli import main
from sequnlearn.data.corpora import CorpusSpec, load_texts, load_texts_as_reference, read_corpus
from sequnlearn.data.mcq import load_mcq_file, load_task
from sequnlearn.errors import UserError

MCQ = str(Path(__file__).parent / "fixtures" / "mcq_60.jsonl")
LONG = "virus " * 120 + "x"  # 721 bytes: 721 tokens of the byte tokenizer


@contextlib.contextmanager
def _deadline(seconds: int = 20):
    """Fail instead of hanging when something opens a FIFO or reads a device that never ends."""
    def _expired(*_):
        raise TimeoutError("blocked on a special file")

    old = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def special_files(tmp_path):
    """A FIFO (named .jsonl), a character device and a socket (named .jsonl)."""
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.jsonl"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    yield {"fifo": (str(fifo), "a FIFO (named pipe)"), "device": ("/dev/zero", "a character device"),
           "socket": (str(sock_path), "a socket")}
    sock.close()


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_special_files_are_refused_before_they_are_opened(special_files, kind):
    path, said = special_files[kind]
    readers = {"forget corpus": lambda: load_texts(CorpusSpec(path, fields=("text",)), what="forget corpus"),
               "reference corpus": lambda: load_texts_as_reference(CorpusSpec(path), limit=2, seed=0, shuffles=0),
               "MCQ file": lambda: load_mcq_file(path), "MCQ task": lambda: load_task(path),
               "config": lambda: io.read_yaml(path), "weights": lambda: io.check_safetensors(path)}
    for reader, read in readers.items():
        with _deadline(), pytest.raises(UserError) as e:
            read()
        msg = str(e.value)
        assert f"is {said}, not a regular file" in msg and path in msg and "\n" not in msg, (reader, msg)


def test_a_pipe_as_forget_data_is_one_line_and_nothing_written(tmp_path):
    """``forget_data=/dev/stdin`` with stdin a pipe: exit 2, one line, --out not created."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sequnlearn", "unlearn", "--preset", "tiny", "--set",
                           "forget_data=/dev/stdin", "--out", str(out)], input=b'{"text": "a virus"}\n' * 40,
                          capture_output=True, timeout=300, cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "is a FIFO (named pipe), not a regular file" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" if r is not None else "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("value, name", [(7, "int"), (2.5, "float"), (["a", "b"], "list"), ({"a": 1}, "dict"),
                                         (True, "bool")])
def test_a_text_that_is_not_a_string_is_an_error_naming_file_line_and_field(tmp_path, value, name):
    # a blank line 2: the error names the file's line 7, not the 6th record
    rows = [{"text": "a virus"}, None, {"text": "b"}, {"text": None}, {"text": ""}, {"text": "c"}, {"text": value}]
    path = _jsonl(tmp_path / "f.jsonl", rows)
    for read in (lambda: read_corpus(CorpusSpec(path, fields=("text",)), what="forget corpus"),
                 lambda: load_texts_as_reference(CorpusSpec(path, fields=("text",)), limit=6, seed=0, shuffles=1,
                                                 what="forget corpus")):
        with pytest.raises(UserError, match=rf"^forget corpus {path} line 7: field 'text' is {name}, not a string;"):
            read()
    js = tmp_path / "f.json"
    js.write_text(json.dumps([{"text": "a"}, {"title": value, "text": "b"}]))
    with pytest.raises(UserError, match=rf"corpus {js} item 2: field 'title' is {name}, not a string"):
        load_texts(CorpusSpec(str(js), fields=("title", "text")))


def test_empty_and_null_rows_are_counted(tmp_path):
    rows = [{"text": "a virus"}, {"text": None}, {"text": "  "}, {"title": "t", "text": ""}, {"text": "b"}]
    corpus = read_corpus(CorpusSpec(_jsonl(tmp_path / "f.jsonl", rows), fields=("title", "text")))
    assert (sorted(corpus.texts), corpus.rows, corpus.skipped) == (["a virus", "b", "t"], 5, 2)
    corpus = read_corpus(CorpusSpec(_jsonl(tmp_path / "f.jsonl", rows), fields=("text",)))
    assert (sorted(corpus.texts), corpus.rows, corpus.skipped) == (["a virus", "b"], 5, 3)


def _tiny_base(path: Path) -> Path:
    from sequnlearn.model.tiny import byte_tokenizer, tiny_model

    tiny_model("gpt_neox").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run under umask 022 from a local model given by a relative path, on a forget corpus of
    12 usable documents (num_train_examples 16), 3 rows empty or null, and texts longer than max_length."""
    work = tmp_path_factory.mktemp("work")
    _tiny_base(work / "base")
    rows = [{"text": LONG if i % 3 == 0 else f"virus strain {i}"} for i in range(12)]
    rows += [{"text": None}, {"text": ""}, {"text": " \n "}]
    _jsonl(work / "forget.jsonl", rows)
    out, err = stdio.StringIO(), stdio.StringIO()
    cwd, umask = os.getcwd(), os.umask(0o022)
    try:
        os.chdir(work)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["unlearn", "--preset", "tiny", "--set", "model=base", "--set", "forget_data=forget.jsonl",
                  "--set", "forget_fields=[text]", "--out", "run"])
    finally:
        os.chdir(cwd)
        os.umask(umask)
    return {"root": work / "run", "base": work / "base", "stdout": out.getvalue(), "stderr": err.getvalue()}


def test_skipped_and_truncated_counts_are_printed_and_stored(run):
    prov = json.loads((run["root"] / "provenance.json").read_text())
    forget = prov["corpora"]["forget"]
    assert forget == {"rows": 15, "skipped_empty": 3, "requested": 16, "used": 12, "truncated": 4, "max_length": 64}
    assert prov["corpora"]["retain"]["rows"] == 16 and prov["corpora"]["retain"]["skipped_empty"] == 0
    lines = [x for x in run["stdout"].splitlines() if x.startswith("forget corpus")]
    assert lines == ["forget corpus forget.jsonl: 3 of 15 rows skipped (empty or null text); 4 of 12 documents "
                     "truncated to max_length 64 tokens"]


def test_num_train_examples_above_the_corpus_is_a_warning_and_the_card_says_how_many(run):
    assert ("warning: forget corpus forget.jsonl has 12 usable documents, fewer than num_train_examples 16; the run "
            "trains on 12 per layer") in run["stderr"]
    prov = json.loads((run["root"] / "provenance.json").read_text())
    assert prov["data"]["forget"]["documents"] == 12
    card = (run["root"] / "model" / "README.md").read_text()
    assert "12 (of num_train_examples 16: the corpus had no more) examples per layer" in card
    assert "16 examples per layer" not in card


def test_every_file_of_a_run_is_readable_by_group_and_others_under_umask_022(run):
    paths = [run["root"], *run["root"].rglob("*")]
    unreadable = [f"{oct(p.stat().st_mode & 0o777)} {p}" for p in paths if p.stat().st_mode & 0o044 != 0o044]
    assert not unreadable
    assert (run["root"] / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_the_saved_tokenizer_does_not_truncate_at_max_length(run):
    from tokenizers import Tokenizer

    saved = json.loads((run["root"] / "model" / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    tok = Tokenizer.from_file(str(run["root"] / "model" / "tokenizer.json"))
    base = Tokenizer.from_file(str(run["base"] / "tokenizer.json"))
    assert len(tok.encode(LONG).ids) == len(base.encode(LONG).ids) == 721


def test_the_adapter_loads_from_another_directory_and_has_our_readme(run, tmp_path, monkeypatch):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    adapter = run["root"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run["base"].resolve())
    monkeypatch.chdir(tmp_path)  # the run was made from another directory, with model=base (relative)
    merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).merge_and_unload().eval()
    saved = AutoModelForCausalLM.from_pretrained(str(run["root"] / "model")).eval()
    ids = torch.tensor([[5, 60, 61, 62, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, saved(ids).logits, rtol=1e-4, atol=1e-5)
    readme = (adapter / "README.md").read_text()
    assert "[More Information Needed]" not in readme and "# LoRA adapter of sequnlearn run run" in readme
    for part in (f"base model: `{run['base'].resolve()}`", "target layers [3, 2, 1]", "`random_ce`",
                 "(../model/README.md)"):
        assert part in readme, part


def test_a_tiny_model_is_recorded_by_its_name():
    from sequnlearn.model.load import model_reference

    assert model_reference("tiny:gpt_neox") == "tiny:gpt_neox"
    assert model_reference("EleutherAI/deep-ignorance-unfiltered") == "EleutherAI/deep-ignorance-unfiltered"


def _sweep(tmp: Path, **body) -> str:
    data = {"name": "s", "base": "tiny", "eval": {"forget_task": MCQ}, **body}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


SWEEP_MODES = [["--dry-run"], ["--launcher", "slurm"], []]


@pytest.mark.parametrize("body, said", [
    ({"grid": {"remove_coef": [10, 10.0]}}, "points 0 {'remove_coef': 10} and 1 {'remove_coef': 10.0} are the same "
                                            "point"),
    ({"grid": {"remove_coef": [10, 20, 10]}}, "points 0 {'remove_coef': 10} and 2 {'remove_coef': 10} are the same"),
    ({"points": [{"lr": 0.001}, {"lr": 0.001}]}, "points 0 {'lr': 0.001} and 1 {'lr': 0.001} are the same point"),
    ({"grid": {"remove_coef": [10, 10.0], "retain_coef": [1, 2]}}, "would share the directory remove_coef=10_retain_"),
])
@pytest.mark.parametrize("mode", SWEEP_MODES)
def test_sweep_points_that_would_share_a_directory_are_refused(tmp_path, capsys, snapshot, body, said, mode):
    path, out = _sweep(tmp_path, **body), tmp_path / "out"
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["sweep", path, "--out", str(out), *mode])
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", "a/b", "..", ".", "a\nb", 12, ""])
@pytest.mark.parametrize("mode", SWEEP_MODES)
def test_a_sweep_name_that_would_leave_out_is_refused(tmp_path, capsys, snapshot, name, mode):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    name = str(tmp_path / "escaped") if name == "ABSOLUTE" else name  # an absolute path, outside --out
    path = _sweep(work, name=name, grid={"remove_coef": [10, 20]})
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["sweep", path, "--out", str(work / "out"), *mode])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "sweep name" in err and "is not a single directory name" in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
