"""Results are never replaced silently: ``eval`` merges by task (``--overwrite`` to replace one), needs
``--out`` for a plain model, checks ``--out`` and writes nothing on Ctrl-C; ``report`` reads what
``eval``, ``tamper`` and ``sweep`` write. Plus the README's unlearn → eval → report flow, end to end."""

import json
import shutil
from pathlib import Path

import pytest

from sequnlearn.cli import main
from sequnlearn.config import dump_yaml, load_config
from sequnlearn.data.mcq import MMLU_SUBJECTS, WMDP_ROBUST_CATEGORIES
from sequnlearn.model.tiny import byte_tokenizer, tiny_model
from sequnlearn.results import headline

FIXTURE = Path(__file__).parent / "fixtures" / "mcq_60.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plain") / "model"
    tiny_model("gpt_neox", seed=0).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def run(model_dir, tmp_path) -> Path:
    """A finished-looking run directory: the tiny preset's config.yaml and a model/."""
    root = tmp_path / "run"
    shutil.copytree(model_dir, root / "model")
    (root / "config.yaml").write_text(dump_yaml(load_config(preset="tiny")))
    return root


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Two small MCQ files: ``forget`` (12 questions) and ``retain`` (8)."""
    lines = FIXTURE.read_text().splitlines(keepends=True)
    (tmp_path / "forget.jsonl").write_text("".join(lines[:12]))
    (tmp_path / "retain.jsonl").write_text("".join(lines[12:20]))
    return {"forget": str(tmp_path / "forget.jsonl"), "retain": str(tmp_path / "retain.jsonl")}


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the command must stop before it."""
    import sequnlearn.model.load

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sequnlearn.model.load, "load_model", refuse)


def _eval(*argv: str) -> None:
    main(["eval", *argv, "--batch-size", "4", "--device", "cpu"])


def _error(argv: list[str], capsys, code: int = 2) -> str:
    """Run a command that must fail; its stderr (one line) without what earlier commands printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _card_row(card: str, task: str) -> str:
    """The model card's evaluation-table line of ``task``."""
    rows = [line for line in card.splitlines() if line.startswith(f"| {task} |")]
    assert len(rows) == 1, card
    return rows[0]


def _tasks(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())["tasks"]


# ---------------------------------------------------------------- eval: merge, --overwrite


def test_a_quick_limit_eval_never_replaces_a_full_one(run, files, capsys, snapshot, request):
    _eval(str(run), "--data", files["forget"])
    before = snapshot(run)
    request.getfixturevalue("no_loading")
    err = _error(["eval", str(run), "--data", files["forget"], "--limit", "4"], capsys)
    assert f"already has {files['forget']} (letter, all questions); pass --overwrite to replace it, or --out FILE" \
        in err
    assert snapshot(run) == before


def test_eval_merges_by_task_and_overwrite_replaces_only_the_tasks_evaluated(run, files, capsys):
    _eval(str(run), "--data", files["forget"], "--limit", "4")
    first = _tasks(run)[files["forget"]]
    _eval(str(run), "--retain-data", files["retain"], "--style", "cloze")
    tasks = _tasks(run)
    assert tasks[files["forget"]] == first  # kept as it was
    assert (first["role"], first["style"], first["limit"], first["n"], first["backend"]) == ("forget", "letter", 4, 4,
                                                                                            "fast")
    retain = tasks[files["retain"]]
    assert (retain["role"], retain["style"], retain["limit"], retain["n"], retain["num_fewshot"]) == (
        "retain", "cloze", None, 8, 0)
    assert first["evaluated_at"] and retain["chance"] == pytest.approx(0.25)
    ev = json.loads((run / "eval.json").read_text())
    assert (ev["model"], ev["style"], ev["limit"], ev["backend"]) == (str(run), "mixed", "mixed", "fast")
    _eval(str(run), "--data", files["forget"], "--overwrite")
    tasks = _tasks(run)
    assert tasks[files["forget"]]["limit"] is None and tasks[files["forget"]]["n"] == 12
    assert tasks[files["retain"]] == retain
    card = (run / "model" / "README.md").read_text()
    assert "| 12 |" in _card_row(card, files["forget"]) and "| 8 |" in _card_row(card, files["retain"])
    capsys.readouterr()


def test_eval_of_a_sweep_point_keeps_its_headline_until_its_task_is_replaced(run, files, capsys):
    sweep_ev = {"point": {"remove_coef": 50}, "style": "letter", "forget_acc": 0.3, "forget_task": files["forget"],
                "forget_chance": 0.25, "tasks": {files["forget"]: {"acc": 0.3, "acc_stderr": 0.1, "n": 12}}}
    (run / "eval.json").write_text(json.dumps(sweep_ev))
    _eval(str(run), "--retain-data", files["retain"])
    ev = json.loads((run / "eval.json").read_text())
    assert {k: ev[k] for k in sweep_ev if k != "tasks"} == {k: v for k, v in sweep_ev.items() if k != "tasks"}
    assert set(ev["tasks"]) == {files["forget"], files["retain"]}
    assert headline(ev)["retain_acc"] == ev["tasks"][files["retain"]]["acc"] and headline(ev)["forget_acc"] == 0.3
    err = _error(["eval", str(run), "--data", files["forget"]], capsys)
    assert "(letter, 12 questions); pass --overwrite" in err
    _eval(str(run), "--data", files["forget"], "--limit", "5", "--overwrite")
    ev = json.loads((run / "eval.json").read_text())
    assert "forget_acc" not in ev and ev["point"] == {"remove_coef": 50}  # the sweep's number is no longer its task's
    assert headline(ev)["forget_acc"] == ev["tasks"][files["forget"]]["acc"] and headline(ev)["forget_limit"] == 5
    capsys.readouterr()


def test_an_eval_that_wrote_meanwhile_keeps_its_tasks(run, files, monkeypatch, capsys):
    import sequnlearn.eval

    real = sequnlearn.eval.evaluate

    def evaluate_while_another_eval_writes(*a, **kw):
        monkeypatch.setattr(sequnlearn.eval, "evaluate", real)
        result = real(*a, **kw)
        main(["eval", str(run), "--retain-data", files["retain"], "--device", "cpu"])  # finishes first
        return result

    monkeypatch.setattr(sequnlearn.eval, "evaluate", evaluate_while_another_eval_writes)
    _eval(str(run), "--data", files["forget"], "--limit", "2")
    assert set(_tasks(run)) == {files["forget"], files["retain"]}
    capsys.readouterr()


# ---------------------------------------------------------------- eval: where it writes


def test_eval_of_a_plain_model_needs_out(model_dir, files, tmp_path, monkeypatch, capsys, no_loading):
    monkeypatch.chdir(tmp_path)
    err = _error(["eval", str(model_dir), "--data", files["forget"]], capsys)
    assert "is not a run directory; say where to write with --out FILE" in err
    assert not (tmp_path / "eval.json").exists()


def _out_cases(tmp: Path, run: Path, model_dir: Path) -> dict[str, tuple[str, str]]:
    """name → (--out, expected message); each an output eval must refuse before it evaluates."""
    (tmp / "adir").mkdir(parents=True)
    (tmp / "afile").write_text("mine")
    (tmp / "notes.json").write_text('{"notes": "mine"}')
    other = tmp / "other-run"
    shutil.copytree(run, other)
    (tmp / "b.json").write_text(json.dumps({"model": str(other), "tasks": {}}))
    return {"dir": (str(tmp / "adir"), "is a directory; give a file path"),
            "below a file": (str(tmp / "afile" / "eval.json"), "afile is a file, not a directory"),
            "not results": (str(tmp / "notes.json"), "holds no evaluation results; pass --overwrite"),
            "other run's": (str(other / "eval.json"), "is the results file of the run"),
            "other model's": (str(tmp / "b.json"), f"holds results of {other}, not {run}: pass --overwrite")}


def test_eval_out_is_checked_before_evaluating_and_nothing_changes(run, model_dir, files, tmp_path, capsys, snapshot,
                                                                   no_loading):
    cases = _out_cases(tmp_path / "outs", run, model_dir)
    for name, (out, message) in cases.items():
        before = snapshot(tmp_path / "outs", run)
        err = _error(["eval", str(run), "--data", files["forget"], "--out", out], capsys)
        assert message in err, (name, err)
        assert snapshot(tmp_path / "outs", run) == before, name


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root may write anywhere")
def test_eval_out_in_an_unwritable_place(run, files, tmp_path, capsys, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = _error(["eval", str(run), "--data", files["forget"], "--out", str(locked / "e.json")], capsys)
    finally:
        locked.chmod(0o700)
    assert "is not writable" in err and list(locked.iterdir()) == []


def test_ctrl_c_during_eval_writes_nothing(run, files, capsys, snapshot, monkeypatch):
    import sequnlearn.eval
    import sequnlearn.model.load

    _eval(str(run), "--data", files["forget"], "--limit", "2")
    before = snapshot(run)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sequnlearn.model.load, "load_model", lambda *a, **kw: (None, None))
    monkeypatch.setattr(sequnlearn.eval, "evaluate", interrupted)
    err = _error(["eval", str(run), "--retain-data", files["retain"]], capsys, code=130)
    assert err == "interrupted; nothing was written"
    assert snapshot(run) == before


# ---------------------------------------------------------------- report


def test_headline_maps_tasks_to_forget_and_retain():
    ev = {"model": "m", "tasks": {"mmlu": {"acc": 0.5, "limit": None},
                                  "wmdp_bio_robust": {"acc": 0.3, "limit": 10, "chance": 0.25},
                                  "q.jsonl": {"acc": 0.9, "role": "retain"}}}
    h = headline(ev)
    assert (h["forget_acc"], h["forget_task"], h["forget_limit"], h["forget_chance"]) == (0.3, "wmdp_bio_robust", 10,
                                                                                         0.25)
    assert (h["retain_acc"], h["retain_task"]) == (0.5, "mmlu")
    assert headline({"tasks": {"mmlu": {"acc": 0.5}}})["forget_acc"] is None
    assert headline({"forget_acc": 0.2, "forget_task": "x", "tasks": {}})["forget_acc"] == 0.2


def test_report_of_a_run_scored_with_a_limit_says_so(run, files, tmp_path, capsys):
    _eval(str(run), "--data", files["forget"], "--limit", "3")
    main(["report", str(run), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| 1 | 3→2→1 | 50 | 5 | L2 |" in md and "Forget acc on --limit 3" in md
    capsys.readouterr()


def _tamper_json(path: Path) -> None:
    path.mkdir(parents=True)
    runs = [{"model": "l2", "role": "attack", "lr": 2e-5, "seed": 42,
             "curve": [{"step": s, "forget_acc": a} for s, a in ((0, 0.26), (2, 0.31), (4, 0.4))]}]
    (path / "tamper.json").write_text(json.dumps({
        "config": {"eval_every": 2, "steps": 4}, "baseline": 0.45, "chance": 0.25, "runs": runs,
        "worst_case": {"model": "l2", "lr": 2e-5, "seed": 42, "step": 4, "forget_acc": 0.4}}))


def test_report_of_a_tamper_only_directory_is_a_report_of_the_attack(tmp_path, capsys):
    _tamper_json(tmp_path / "attack")
    main(["report", str(tmp_path / "attack")])
    out = capsys.readouterr().out
    assert "| l2 | 2e-05 | 42 | 0.2600 | 0.3100 | 0.4000 | 0.4000 (4) |" in out and "1 tamper results" in out
    md = (tmp_path / "attack" / "report.md").read_text()
    assert "## Tampering attack" in md and "Worst case: forget accuracy 0.4000" in md
    assert (tmp_path / "attack" / "tamper.png").stat().st_size > 10_000


def test_report_errors_are_one_line_and_change_nothing(tmp_path, capsys, snapshot):
    _tamper_json(tmp_path / "attack")
    (tmp_path / "report.md").write_text("my notes")
    before = snapshot(tmp_path)
    err = _error(["report", str(tmp_path / "attack"), "--out", str(tmp_path / "report.md")], capsys)
    assert "--out" in err and "is a file; give a directory" in err
    (tmp_path / "empty").mkdir()
    err = _error(["report", str(tmp_path / "empty")], capsys)
    assert "nothing to report" in err and "sequnlearn eval RUN" in err
    assert "does not exist" in _error(["report", str(tmp_path / "missing")], capsys)
    assert snapshot(tmp_path) == {**before, str(tmp_path / "empty"): "dir"}


# ---------------------------------------------------------------- the README's flow


def _data_dir(path: Path) -> str:
    """Offline copies of wmdp_bio_robust (2 questions per category) and mmlu (1 per subject)."""
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    path.mkdir()
    robust = [{**rows[i], "category": c} for i, c in enumerate(c for c in WMDP_ROBUST_CATEGORIES for _ in range(2))]
    mmlu = [{**rows[i % len(rows)], "subject": s} for i, s in enumerate(MMLU_SUBJECTS)]
    for name, records in (("wmdp_bio_robust", robust), ("mmlu_test", mmlu)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_the_readme_flow_unlearn_eval_report(tmp_path, monkeypatch, capsys):
    """README "Commands": unlearn --preset tiny → eval RUN --tasks wmdp_bio_robust,mmlu (offline copies
    for the hub) → eval RUN --data FILE → report RUN: one run with forget (WMDP) and retain (MMLU) accuracy."""
    monkeypatch.chdir(tmp_path)
    data_dir = _data_dir(tmp_path / "data")
    main(["unlearn", "--preset", "tiny", "--out", "runs/tiny"])
    main(["eval", "runs/tiny", "--tasks", "wmdp_bio_robust,mmlu", "--data-dir", data_dir])
    main(["eval", "runs/tiny", "--data", str(FIXTURE)])
    capsys.readouterr()
    main(["report", "runs/tiny"])
    out = capsys.readouterr().out
    tasks = _tasks(tmp_path / "runs" / "tiny")
    assert list(tasks) == ["wmdp_bio_robust", "mmlu", str(FIXTURE)]
    forget, retain = tasks["wmdp_bio_robust"]["acc"], tasks["mmlu"]["acc"]
    assert f"| 1 | 3→2→1 | 50 | 5 | L2 | {forget:.4f} | {retain:.4f} |" in out and "1 runs; wrote" in out
    for name in ("report.md", "report.csv", "tradeoff.png", "losses.png"):
        assert (tmp_path / "runs" / "tiny" / name).exists()
    card = (tmp_path / "runs" / "tiny" / "model" / "README.md").read_text()
    assert f"| 12 | {forget:.4f} |" in _card_row(card, "wmdp_bio_robust")
    assert f"| 57 | {retain:.4f} |" in _card_row(card, "mmlu")
