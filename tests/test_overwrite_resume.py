"""Nothing existing is lost: `--overwrite` replaces only a run of the same command and keeps the old one
until the new one is done; a lock refuses a second writer; `--resume` refuses changed inputs, repairs a cut
metrics line and leaves a finished run alone; tamper keeps its finished attacks and resumes; device and
`--out` mistakes are one line. Every failing command is checked by hashing all files of its input and output
directories before and after."""

import json
import shlex
import shutil
from pathlib import Path

import pytest

from sequnlearn.cli import main
from sequnlearn.model.tiny import byte_tokenizer, tiny_model
from sequnlearn.runs import LOCK_NAME, RunDir, hold_lock, read_jsonl

MCQ = str(Path(__file__).parent / "fixtures" / "mcq_60.jsonl")
TEXTS = ["Which color is painted on crate 0? orange.", "Which animal lives in enclosure 1? lynx."] * 20


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``sequnlearn ARGV``: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _refused(argv, capsys, message: str, code: int = 2) -> str:
    got, _, err = _run(argv, capsys)
    assert got == code, err[-2000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]  # no progress bars
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model directory, local corpora, and one finished run trained on them."""
    tmp = tmp_path_factory.mktemp("world")
    model = tmp / "base"
    tiny_model("gpt_neox").save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    corpora = {}
    for kind in ("forget", "retain"):
        corpora[kind] = tmp / f"{kind}.jsonl"
        corpora[kind].write_text("".join(json.dumps({"text": f"{kind} text number {i} " * 3}) + "\n" for i in range(16)))
    sets = ["--set", f"model={model}", "--set", f"forget_data={corpora['forget']}", "--set",
            f"retain_data={corpora['retain']}", "--set", "forget_fields=[text]", "--set", "retain_fields=[text]",
            "--set", "retain_subset=null"]
    run = tmp / "runs" / "first"
    main(["unlearn", "--preset", "tiny", *sets, "--out", str(run)])
    return {"tmp": tmp, "model": model, "sets": sets, "run": run, **corpora}


def _copy(world, name: str, *, unfinished: bool = False) -> Path:
    dst = world["tmp"] / "copies" / name / "run"
    shutil.copytree(world["run"], dst)
    if unfinished:  # as if killed after its last checkpoint
        shutil.rmtree(dst / "model")
    return dst


def test_overwrite_refuses_the_model_directory_and_any_directory_that_is_not_a_run(world, tmp_path, capsys, snapshot):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "paper.tex").write_text("months of work")
    before = snapshot(world["model"], other, world["forget"])
    for out, message in ((world["model"], "holds this command's input"),
                         (other, "is no run (no config.yaml of an unlearning run), so it was left as it is")):
        _refused(["unlearn", "--preset", "tiny", *world["sets"], "--out", out, "--overwrite"], capsys, message)
    _refused(["unlearn", "--preset", "tiny", "--out", world["model"], "--overwrite"], capsys,
             "is no run (no config.yaml of an unlearning run)")  # the model is not this run's input here
    assert snapshot(world["model"], other, world["forget"]) == before


def test_overwrite_refuses_a_run_that_holds_the_input_model(world, capsys, snapshot):
    run = _copy(world, "holds-input")
    before = snapshot(run)
    _refused(["unlearn", "--preset", "tiny", "--set", f"model={run / 'model'}", "--out", run, "--overwrite"], capsys,
             "holds this command's input")
    assert snapshot(run) == before


@pytest.mark.parametrize("failure", [KeyboardInterrupt, "nonfinite"])
def test_a_failed_overwrite_leaves_the_previous_run_as_it_was(world, monkeypatch, capsys, snapshot, failure):
    from sequnlearn.unlearn import engine

    run = _copy(world, f"failing-{failure if isinstance(failure, str) else 'ctrl-c'}")
    before = snapshot(run, world["model"])

    def fail(self, *a, **kw):
        assert self.run.root != run and self.run.final == run  # built beside the old run
        if failure == "nonfinite":
            raise engine.NonFiniteLoss("non-finite loss at step 0; lower lr")
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Unlearner, "train", fail)
    code, _, err = _run(["unlearn", "--preset", "tiny", *world["sets"], "--set", "lr=0.002", "--out", run,
                         "--overwrite"], capsys)
    assert code == (130 if failure is KeyboardInterrupt else 2)
    assert f"the previous run in {run} is as it was" in err and "Traceback" not in err
    assert snapshot(run, world["model"]) == before
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]  # no staging directory left


def test_overwrite_replaces_a_run_once_the_new_one_is_done(world, capsys):
    run = _copy(world, "replaced")
    (run / "eval.json").write_text("{}")
    code, out, err = _run(["unlearn", "--preset", "tiny", *world["sets"], "--set", "lr=0.002", "--out", run,
                           "--overwrite"], capsys)
    assert code == 0, err
    assert "lr: 0.002" in (run / "config.yaml").read_text() and not (run / "eval.json").exists()
    assert (run / "model" / "README.md").read_text().split("\n# ", 1)[1].startswith("run\n")  # not the staging name
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name] and not (run / LOCK_NAME).exists()


def test_a_second_writer_is_refused_while_the_lock_is_held(world, capsys, snapshot):
    run = _copy(world, "locked", unfinished=True)
    with hold_lock(run):
        before = snapshot(run)
        _refused(["unlearn", "--preset", "tiny", *world["sets"], "--out", run, "--resume"], capsys,
                 "is being written by another sequnlearn command")
        assert snapshot(run) == before
    assert not (run / LOCK_NAME).exists()


def test_resume_refuses_a_changed_corpus_or_model(world, tmp_path, capsys, snapshot):
    run = _copy(world, "changed-inputs", unfinished=True)
    forget = tmp_path / "forget.jsonl"
    forget.write_text(world["forget"].read_text().replace("number 3", "number 33"))
    model = tmp_path / "other-base"
    tiny_model("gpt_neox", seed=5).save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    before = snapshot(run)
    for key, value, what in (("forget_data", forget, "the forget corpus differ"),
                             ("model", model, "the model's weights differ")):
        # the stored config must match for the inputs to be compared: edit the stored path as a user would
        cfg = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(cfg.replace(str(world[key if key == "model" else "forget"]), str(value)))
        before = snapshot(run)
        sets = [s.replace(str(world[key if key == "model" else "forget"]), str(value)) for s in world["sets"]]
        _refused(["unlearn", "--preset", "tiny", *sets, "--out", run, "--resume"], capsys, what)
        assert snapshot(run) == before
        (run / "config.yaml").write_text(cfg)


def test_resume_drops_a_metrics_line_cut_by_a_kill_and_refuses_a_damaged_one(world, capsys, snapshot):
    run = _copy(world, "cut-metrics", unfinished=True)
    whole = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(whole + '{"layer": 1, "step": 6, "forget_lo')
    code, _, err = _run(["unlearn", "--preset", "tiny", *world["sets"], "--out", run, "--resume"], capsys)
    assert code == 0, err
    lines = read_jsonl(run / "metrics.jsonl")
    assert [x["step"] for x in lines] == list(range(len(whole.splitlines())))

    damaged = _copy(world, "damaged-metrics", unfinished=True)
    (damaged / "metrics.jsonl").write_text(whole.replace('"step": 2,', '"step": 2', 1))
    before = snapshot(damaged)
    _refused(["unlearn", "--preset", "tiny", *world["sets"], "--out", damaged, "--resume"], capsys,
             "line 3 is cut or damaged")
    assert snapshot(damaged) == before


def test_resume_of_a_finished_run_says_so_and_changes_nothing(world, capsys, snapshot):
    before = snapshot(world["run"])
    code, out, err = _run(["unlearn", "--preset", "tiny", *world["sets"], "--out", world["run"], "--resume"], capsys)
    assert code == 0 and "finished run" in out and "nothing changed" in out, err
    assert snapshot(world["run"]) == before


def test_out_below_a_file_or_in_an_unwritable_place_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    _refused(["unlearn", "--preset", "tiny", "--out", tmp_path / "file" / "run"], capsys, "is a file, not a directory")
    _refused(["tamper", "tiny:gpt_neox", "--eval-data", MCQ, "--out", tmp_path / "file" / "t"], capsys,
             "is a file, not a directory")
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a non-root user in a read-only place
    _refused(["unlearn", "--preset", "tiny", "--out", tmp_path / "ro" / "run"], capsys, "is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("device, message", [("cuda", "use --device cpu"), ("gpu0", "is not a device"),
                                             ("meta", "is not supported")])
def test_a_device_that_cannot_be_used_is_one_line(tmp_path, capsys, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _refused(["eval", "tiny:gpt_neox", "--data", MCQ, "--device", device, "--out", tmp_path / "e.json"], capsys,
             message)
    _refused(["tamper", "tiny:gpt_neox", "--eval-data", MCQ, "--device", device, "--out", tmp_path / "t"], capsys,
             message)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ tamper


@pytest.fixture
def attack_args(tmp_path):
    corpus = tmp_path / "attack.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return ["tamper", "tiny:gpt_neox", "--eval-data", MCQ, "--data", corpus, "--set", "data_fields=[text]",
            "--steps", "2", "--eval-every", "1", "--lr", "1e-3,2e-3", "--set", "eval_limit=8", "--set",
            "max_length=32", "--set", "batch_size=2", "--set", "per_device_batch_size=2", "--style", "cloze"]


def test_an_interrupted_tamper_keeps_its_finished_attacks_and_resumes(tmp_path, attack_args, monkeypatch, capsys):
    from sequnlearn.tamper import attacks as tamper_mod

    out = tmp_path / "t"
    real, calls = tamper_mod.attack, []

    def attack(*a, curve=None, **kw):
        calls.append(kw["lr"])
        if len(calls) == 2 and interrupt:  # the second attack: one evaluation made, then Ctrl-C
            curve.append({"step": 0, "forget_acc": 0.5, "train_loss": None})
            raise KeyboardInterrupt
        return real(*a, curve=curve, **kw)

    monkeypatch.setattr(tamper_mod, "attack", attack)
    interrupt = True
    code, _, err = _run([*attack_args, "--out", out], capsys)
    assert code == 130 and "after 1 of 2 attacks" in err and "--resume" in err and "Traceback" not in err
    saved = json.loads((out / "tamper.json").read_text())
    assert [r["lr"] for r in saved["runs"]] == [1e-3] and saved["interrupted"]["lr"] == 2e-3
    assert len(saved["interrupted"]["curve"]) == 1
    resume = shlex.split(err.split("continue with: sequnlearn ", 1)[1])
    interrupt = False
    code, _, err = _run(resume, capsys)
    assert code == 0, err
    assert calls == [1e-3, 2e-3, 2e-3]  # the finished attack is not run again
    saved = json.loads((out / "tamper.json").read_text())
    assert [r["lr"] for r in saved["runs"]] == [1e-3, 2e-3] and "interrupted" not in saved
    assert (out / "tamper.md").is_file()
    code, stdout, _ = _run(resume, capsys)
    assert code == 0 and "nothing to resume" in stdout and calls == [1e-3, 2e-3, 2e-3]


def test_tamper_overwrite_replaces_only_a_tamper_result_and_keeps_it_on_failure(tmp_path, attack_args, world,
                                                                               monkeypatch, capsys, snapshot):
    from sequnlearn.tamper import attacks as tamper_mod

    before = snapshot(world["run"])
    _refused([*attack_args, "--out", world["run"], "--overwrite"], capsys, "is no tamper result")
    assert snapshot(world["run"]) == before
    out = tmp_path / "t"
    assert _run([*attack_args, "--out", out], capsys)[0] == 0
    before = snapshot(out)
    _refused([*attack_args, "--set", "seeds=[1]", "--out", out, "--resume"], capsys, "made with another config (seeds)")

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tamper_mod, "attack", boom)
    code, _, err = _run([*attack_args, "--out", out, "--overwrite"], capsys)
    assert code == 130 and f"the previous result in {out} is as it was" in err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["attack.jsonl", "t"]


def test_a_diverging_attack_is_an_error_not_a_score(tmp_path, attack_args, monkeypatch, capsys):
    from sequnlearn.tamper import attacks as tamper_mod
    from sequnlearn.eval import NonFiniteModel

    real, calls = tamper_mod.attack, []

    def attack(*a, curve=None, **kw):
        calls.append(kw["lr"])
        if len(calls) == 2:
            curve.append({"step": 0, "forget_acc": 0.5, "train_loss": None})
            raise NonFiniteModel("the model's logits are not finite")
        return real(*a, curve=curve, **kw)

    monkeypatch.setattr(tamper_mod, "attack", attack)
    out = tmp_path / "t"
    _refused([*attack_args, "--out", out], capsys, "(lr 0.002, seed 42) diverged after step 0")
    saved = json.loads((out / "tamper.json").read_text())
    assert len(saved["runs"]) == 1 and saved["diverged"]["lr"] == 2e-3 and not (out / "tamper.md").exists()


def test_tamper_resume_with_other_models_is_refused(tmp_path, attack_args, capsys, snapshot):
    out = tmp_path / "t"
    assert _run([*attack_args, "--out", out], capsys)[0] == 0
    before = snapshot(out)
    other = [a if a != "tiny:gpt_neox" else "tiny:llama" for a in attack_args]
    _refused([*other, "--out", out, "--resume"], capsys, "was made with other models (tiny:gpt_neox)")
    assert snapshot(out) == before


def test_ctrl_c_in_a_sweep_is_one_line_that_says_how_to_continue(tmp_path, monkeypatch, capsys):
    from sequnlearn import sweep

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_point", interrupted)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\nbase: tiny\ngrid:\n  lr: [0.001]\neval:\n  forget_task: {MCQ}\n")
    code, _, err = _run(["sweep", spec, "--out", tmp_path / "out"], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == "sequnlearn sweep: interrupted (run the same command again: finished points are kept, " \
                          "an interrupted one resumes)"


def test_a_run_being_built_or_replaced_is_no_result_of_the_report(world, tmp_path, capsys):
    from sequnlearn.report import collect

    runs = tmp_path / "runs"
    shutil.copytree(world["run"], runs / "a")
    shutil.copytree(world["run"], runs / ".a.new.tmp")
    for d in (runs / "a", runs / ".a.new.tmp"):
        (d / "eval.json").write_text(json.dumps({"forget_acc": 0.3, "retain_acc": 0.8}))
    found, _ = collect([runs])
    assert [Path(r["path"]).name for r in found] == ["a"]


def test_a_swap_killed_between_its_renames_is_refused_until_the_run_is_back(world, tmp_path, capsys, snapshot):
    aside = tmp_path / ".run.old.tmp"
    shutil.copytree(world["run"], aside)
    before = snapshot(tmp_path)
    _refused(["unlearn", "--preset", "tiny", "--out", tmp_path / "run", "--overwrite"], capsys,
             f"the previous one is in {aside}; rename it back")
    assert snapshot(tmp_path) == before


def test_an_eval_of_a_run_replaced_meanwhile_writes_nothing(world, tmp_path, monkeypatch, capsys, snapshot):
    from sequnlearn import cli

    run = _copy(world, "replaced-during-eval")
    real = cli._evaluate

    def evaluate_while_replaced(args, tasks):
        result = real(args, tasks)
        prov = run / "provenance.json"
        prov.write_text(prov.read_text().replace('"end_time"', '"end_time_"'))  # as unlearn --overwrite would
        return result

    monkeypatch.setattr(cli, "_evaluate", evaluate_while_replaced)
    _refused(["eval", run, "--data", MCQ, "--limit", "4"], capsys, "was replaced while its model was evaluated")
    assert not (run / "eval.json").exists()
