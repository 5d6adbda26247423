"""Sweeps (grid → run directories, skip finished points) and reports (pure function of run dirs)."""

import json
from pathlib import Path

import pytest
import yaml

from sequnlearn.cli import main
from sequnlearn.errors import UserError
from sequnlearn.report import annotate, collect, pareto_front, table_rows, write_report
from sequnlearn.sweep import load_sweep, slurm_script, sweeps

MCQ = str(Path(__file__).parent / "fixtures" / "mcq_60.jsonl")


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweepfile") / "mini.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mini", "base": "tiny", "set": {"layers": [3, 2]},
        "grid": {"remove_coef": [10, 50], "retain_coef": [5]},
        "eval": {"forget_task": MCQ, "retain_task": MCQ, "style": ["cloze", "letter"], "limit": 8}}))
    return path


@pytest.fixture(scope="module")
def swept(sweep_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweeps")
    main(["sweep", str(sweep_file), "--out", str(out)])
    return out / "mini"


def test_every_shipped_sweep_loads_and_names_its_points():
    assert {"reference-l2", "reference-kl", "toy-l2", "toy-kl", "toy-l2-vs-kl"} <= set(sweeps())
    for name in sweeps():
        sweep = load_sweep(name)
        names = [sweep.point_name(p) for p in sweep.points()]
        assert len(set(names)) == len(names), name
    assert [p["remove_coef"] for p in load_sweep("reference-l2").points()] == [10, 20, 30, 40, 50]


def test_dry_run_lists_points_and_writes_nothing(sweep_file, tmp_path, capsys):
    main(["sweep", str(sweep_file), "--dry-run", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "0  remove_coef=10" in out and "1  remove_coef=50" in out and "2 points" in out
    assert list(tmp_path.iterdir()) == []


def test_each_point_is_a_run_directory_and_finished_points_are_skipped(swept, sweep_file, capsys):
    for name in ("remove_coef=10", "remove_coef=50"):
        run = swept / name
        for f in ("config.yaml", "provenance.json", "metrics.jsonl", "eval.json", "model/config.json"):
            assert (run / f).exists(), f
        ev = json.loads((run / "eval.json").read_text())
        assert 0 <= ev["forget_acc"] <= 1 and ev["point"]["remove_coef"] in (10, 50)
        assert ev["forget_chance"] == pytest.approx(0.25)  # results carry their chance level
    assert json.loads((swept / "baseline" / "eval.json").read_text())["baseline"] is True
    before = (swept / "remove_coef=10" / "eval.json").stat().st_mtime_ns
    main(["sweep", str(sweep_file), "--out", str(swept.parent), "--only", "0"])
    assert "done, skipped" in capsys.readouterr().out
    assert (swept / "remove_coef=10" / "eval.json").stat().st_mtime_ns == before


def test_report_is_a_pure_function_of_run_directories(swept, tmp_path):
    snapshot = {p: p.stat().st_mtime_ns for p in swept.rglob("*") if p.is_file()}
    first = write_report([swept], tmp_path / "a")
    second = write_report([swept], tmp_path / "b")
    assert first["table"] == second["table"] and first["runs"] == 2
    assert {p: p.stat().st_mtime_ns for p in swept.rglob("*") if p.is_file()} == snapshot
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| Run | Layers | remove_coef | retain_coef | retain loss | forget acc | retain acc | Notes |" in md
    assert "| baseline |" in md and "3→2" in md
    assert (tmp_path / "a" / "report.csv").read_text().startswith("Run,Layers,remove_coef")
    for png in ("tradeoff.png", "forget_vs_remove_coef.png", "losses.png"):
        assert (tmp_path / "a" / png).stat().st_size > 10_000


def _run(loss, rm, ret, forget, retain):
    return {"path": f"{loss}{rm}", "config": {"retain_loss": loss, "remove_coef": rm, "retain_coef": ret,
                                               "layers": [7, 6]}, "eval": {"forget_acc": forget, "retain_acc": retain}}


def test_notes_follow_the_facts():
    runs = [_run("l2", 10, 5, 0.31, 0.44), _run("l2", 50, 5, 0.24, 0.44), _run("kl", 50, 5, 0.2, 0.26),
            _run("kl", 5, 100, 0.28, 0.42)]
    assert annotate(runs) == ["", "Below random (0.25); Best L2", "Below random (0.25); Retain collapsed", "Best KL"]
    assert [r["retain loss"] for r in table_rows(runs)] == ["L2", "L2", "KL", "KL"]


def test_pareto_front():
    pts = [(0.3, 0.44), (0.25, 0.44), (0.2, 0.2), (0.28, 0.43), (0.4, 0.45)]
    assert pareto_front(pts) == [2, 1, 4]


def test_slurm_script_is_a_job_array_of_only_calls_and_a_baseline_task(sweep_file, tmp_path):
    script = slurm_script(load_sweep(str(sweep_file)), tmp_path / "mini", accelerate_args="--num_processes 4")
    assert "#SBATCH --array=0-2" in script  # two points, then the baseline
    assert "accelerate launch --num_processes 4 -m sequnlearn sweep" in script and "--only $SLURM_ARRAY_TASK_ID" in script
    assert '-eq 2 ]; then' in script and "--baseline" in script


def test_every_task_of_the_slurm_array_together_make_the_whole_report(sweep_file, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "mini"
    script = tmp_path / "sweep.sbatch"
    script.write_text(slurm_script(load_sweep(str(sweep_file)), out))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for task in range(3):  # as slurm runs them
        done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    result = write_report([out], tmp_path / "report")
    assert result["runs"] == 2 and result["baselines"] == 1


def test_each_point_is_evaluated_in_every_style_the_first_the_headline(swept):
    from sequnlearn.eval import EvalSpec, forget_retain_accuracy
    from sequnlearn.model.load import load_model

    ev = json.loads((swept / "remove_coef=10" / "eval.json").read_text())
    model, tok = load_model(str(swept / "remove_coef=10" / "model"))
    for style in ("cloze", "letter"):
        alone = forget_retain_accuracy(model, tok, EvalSpec(MCQ, MCQ, style, 8))
        assert ev["styles"][style] == {"forget_acc": alone["forget_acc"], "retain_acc": alone["retain_acc"]}
    assert ev["style"] == "cloze" and ev["forget_acc"] == ev["styles"]["cloze"]["forget_acc"]


def test_bad_sweeps_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown sweep"):
        load_sweep("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "tiny", "grid": {"remove_cof": [1]}, "eval": {"forget_task": MCQ}}))
    with pytest.raises(UserError, match="did you mean 'remove_coef'"):
        load_sweep(str(bad))
    bad.write_text(yaml.safe_dump({"base": "tiny", "grid": {"remove_coef": [1]},
                                   "eval": {"forget_task": MCQ, "style": ["cloze", "mc2"]}}))
    with pytest.raises(UserError, match=r"eval style \['mc2'\] unknown"):
        load_sweep(str(bad))
    bad.write_text(yaml.safe_dump({"base": "tiny", "points": [{"forget_data": "data/a.jsonl"},
                                                                {"forget_data": "data-a.jsonl"}],
                                    "eval": {"forget_task": MCQ}}))
    with pytest.raises(UserError, match="would share the directory forget_data=data-a.jsonl"):
        load_sweep(str(bad))
    assert collect([tmp_path]) == ([], [])


def test_explicit_points_may_set_different_keys(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", "points": [{"lr": 1e-3}, {"lr": 3e-3},
                                                               {"lr": 3e-3, "epochs_per_layer": 2}],
                                    "eval": {"forget_task": MCQ}}))
    sweep = load_sweep(str(path))
    assert [sweep.point_name(p) for p in sweep.points()] == ["lr=0.001", "lr=0.003", "lr=0.003_epochs_per_layer=2"]
    assert sweep.config(sweep.points()[2]).epochs_per_layer == 2


def test_runs_are_listed_with_numbers_in_value_order():
    from sequnlearn.collect import natural as _natural

    names = ["remove_coef=50", "remove_coef=5_retain_coef=100", "remove_coef=10", "remove_coef=5_retain_coef=20"]
    assert [p.name for p in sorted(map(Path, names), key=_natural)] == [
        "remove_coef=5_retain_coef=20", "remove_coef=5_retain_coef=100", "remove_coef=10", "remove_coef=50"]
