"""Results across seeds: sweeps over ``seed``, groups of runs that differ only in it, mean ± sd tables,
notes as strong as the spread, error bars and bands in the plots (numbers computed by hand)."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from sequnlearn.cli import main
from sequnlearn.config import UnlearnConfig, build, dump_yaml, preset_dict
from sequnlearn.errors import UserError
from sequnlearn.report import (group_rows, other_styles, plot_tamper, seed_curve, seed_groups, seeds_table, spread,
                               tamper_table, write_report)
from sequnlearn.sweep import load_sweep
from sequnlearn.tamper import worst_case

MCQ = str(Path(__file__).parent / "fixtures" / "mcq_60.jsonl")


def fake_run(root: Path, name: str, forget: float, retain: float | None, **keys) -> Path:
    """A finished-looking run directory (config.yaml as the engine writes it, eval.json, metrics.jsonl)."""
    cfg = build(UnlearnConfig, {**preset_dict("tiny"), "layers": [3, 2], **keys})
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    ev = {"forget_acc": forget, "forget_chance": 0.25, **({} if retain is None else {"retain_acc": retain})}
    (run / "eval.json").write_text(json.dumps(ev))
    metrics = [{"step": s, "phase": s // 2, "layer": 3 - s // 2, "forget_loss": 1.0 - 0.1 * s, "retain_loss": 0.0}
               for s in range(4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def _run(forget, retain=0.44, seed=1, loss="l2", rm=10.0, **cfg):
    """A collected run (as :func:`collect` returns it) without files."""
    return {"path": f"{loss}{rm}s{seed}", "eval": {"forget_acc": forget, "retain_acc": retain},
            "config": {"retain_loss": loss, "remove_coef": rm, "retain_coef": 5.0, "layers": [7, 6], "seed": seed,
                       **cfg}}


def _seeds(forgets, **kw):
    return [_run(f, seed=s, **kw) for s, f in enumerate(forgets, start=1)]


def test_spread_is_the_mean_and_the_sample_sd():
    mean, sd = spread([0.30, 0.32, 0.37])
    # mean 0.33; deviations -0.03, -0.01, 0.04; squares sum 0.0026; / (3 - 1) = 0.0013; sqrt = 0.0360555
    assert mean == pytest.approx(0.33) and sd == pytest.approx(0.0360555128)
    assert spread([0.4]) == (0.4, None)
    with pytest.raises(ValueError):
        spread([])


def test_groups_ignore_seed_and_output_keys_but_separate_settings():
    runs = [_run(0.3, seed=1), _run(0.3, seed=2, checkpoint_every=5), _run(0.3, seed=3, report_to="tensorboard"),
            _run(0.3, seed=1, rm=50.0), _run(0.3, seed=1, lr=5e-4)]
    assert [[r["path"] for r in g] for g in seed_groups(runs)] == [
        ["l210.0s1", "l210.0s2", "l210.0s3"], ["l250.0s1"], ["l210.0s1"]]
    assert [g[0]["config"].get("lr") for g in seed_groups(runs)] == [None, None, 5e-4]


def test_group_rows_hold_mean_sd_n_and_seeds():
    runs = [_run(0.30, 0.44, seed=1), _run(0.32, 0.45, seed=2), _run(0.37, 0.46, seed=3),
            _run(0.28, 0.43, seed=7, rm=50.0)]
    three, one = group_rows(runs)
    assert (three["forget mean"], three["forget sd"]) == (pytest.approx(0.33), pytest.approx(0.0360555128))
    assert (three["retain mean"], three["retain sd"]) == (pytest.approx(0.45), pytest.approx(0.01))
    assert (three["n"], three["seeds"], three["remove_coef"]) == (3, "1, 2, 3", 10.0)
    assert (one["forget mean"], one["forget sd"], one["retain sd"], one["n"]) == (0.28, None, None, 1)
    assert one["Notes"] == "Best L2" and three["Notes"] == ""


def test_other_scoring_styles_get_their_own_mean_and_sd():
    runs = [_run(0.30, 0.44, seed=s) for s in (1, 2, 3)]
    for r, (f, t) in zip(runs, [(0.25, 0.60), (0.27, 0.62), (0.32, 0.64)]):
        r["eval"].update(style="cloze", styles={"cloze": {"forget_acc": 0.30, "retain_acc": 0.44},
                                                "letter": {"forget_acc": f, "retain_acc": t}})
    assert other_styles(runs) == ["letter"] and other_styles(runs + [_run(0.3, seed=4)]) == []
    (row,) = group_rows(runs)
    # forget 0.25, 0.27, 0.32: mean 0.28, deviations -0.03 -0.01 0.04, sd sqrt(0.0026 / 2) = 0.0360555
    assert (row["forget letter mean"], row["forget letter sd"]) == (pytest.approx(0.28), pytest.approx(0.0360555128))
    assert (row["retain letter mean"], row["retain letter sd"]) == (pytest.approx(0.62), pytest.approx(0.02))
    table = seeds_table([row], ["letter"])
    assert "| forget acc (letter) | retain acc (letter) |" in table and "| 0.2800 ± 0.0361 | 0.6200 ± 0.0200 |" in table


def test_notes_use_the_means():
    below = _seeds([0.22, 0.24, 0.27])  # mean 0.2433 < 0.25 though one seed is above chance
    collapsed = [_run(0.2, 0.26, seed=1, rm=50.0), _run(0.2, 0.32, seed=2, rm=50.0)]  # retain mean 0.29 <= 0.25 + 0.05
    first, second = group_rows(below + collapsed)
    assert first["Notes"] == "Below random (0.25); Best L2"
    assert second["Notes"] == "Below random (0.25); Retain collapsed"


@pytest.mark.parametrize("best, runner_up, note", [
    ([0.30, 0.32, 0.34], [0.33, 0.35, 0.37], "Best L2"),  # means 0.32 / 0.35, sds 0.02: 0.03 apart
    ([0.30, 0.32, 0.34], [0.31, 0.33, 0.35], "Best L2 (within spread of group 2)"),  # 0.01 apart
    ([0.300, 0.301, 0.302], [0.28, 0.33, 0.38], "Best L2 (within spread of group 2)"),  # 0.029 < the larger sd 0.05
    ([0.30], [0.31], "Best L2"),  # no spread known: no claim either way
])
def test_best_says_when_it_is_within_the_spread_of_the_runner_up(best, runner_up, note):
    rows = group_rows(_seeds(best) + _seeds(runner_up, rm=50.0) + _seeds([0.9, 0.9], rm=90.0))
    assert rows[0]["Notes"] == note and rows[1]["Notes"] == rows[2]["Notes"] == ""


def test_report_shows_mean_sd_across_seeds_and_keeps_runs(tmp_path):
    for seed, forget, retain in ((1, 0.30, 0.44), (2, 0.32, 0.45), (3, 0.37, 0.46)):
        fake_run(tmp_path / "sweep", f"remove_coef=10_seed={seed}", forget, retain, remove_coef=10, seed=seed)
    fake_run(tmp_path / "sweep", "remove_coef=50_seed=7", 0.28, 0.43, remove_coef=50, seed=7)
    result = write_report([tmp_path / "sweep"], tmp_path / "rep")
    assert (result["runs"], result["groups"]) == (4, 2) and "report_seeds.csv" in result["files"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Across seeds" in md
    assert "| 1 | 3→2 | 10 | 5 | L2 | 0.3300 ± 0.0361 | 0.4500 ± 0.0100 | 3 | 1, 2, 3 |  |" in md
    assert "| 2 | 3→2 | 50 | 5 | L2 | 0.2800 | 0.4300 | 1 | 7 | Best L2 |" in md
    with open(tmp_path / "rep" / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 4  # per-run rows stay
    with open(tmp_path / "rep" / "report_seeds.csv") as f:
        three, one = csv.DictReader(f)
    assert float(three["forget mean"]) == pytest.approx(0.33) and float(three["forget sd"]) == pytest.approx(0.0360555)
    assert (three["n"], one["n"], one["forget sd"], one["retain sd"]) == ("3", "1", "", "")
    for png in ("tradeoff.png", "forget_vs_remove_coef.png", "losses.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 10_000


def test_single_seed_runs_get_no_across_seeds_table(tmp_path):
    fake_run(tmp_path / "sweep", "remove_coef=10", 0.30, None, remove_coef=10)
    fake_run(tmp_path / "sweep", "remove_coef=50", 0.28, None, remove_coef=50)
    result = write_report([tmp_path / "sweep"], tmp_path / "rep")
    assert "Across seeds" not in (tmp_path / "rep" / "report.md").read_text() and "±" not in result["table"]
    with open(tmp_path / "rep" / "report_seeds.csv") as f:
        assert [(r["n"], r["forget sd"], r["retain mean"]) for r in csv.DictReader(f)] == [("1", "", "")] * 2
    assert (tmp_path / "rep" / "forget_vs_remove_coef.png").stat().st_size > 10_000


def _attack(lr, seed, accs, steps=(0, 2, 4)):
    """One attack's entry in ``tamper.json`` (model ``l2``)."""
    return {"model": "l2", "lr": lr, "seed": seed, "curve": [{"step": s, "forget_acc": a} for s, a in zip(steps, accs)]}


def _tamper(runs, baseline=0.52):
    return {"config": {"eval_every": 2, "table_steps": None}, "baseline": baseline, "chance": 0.25, "runs": runs,
            "worst_case": worst_case(runs)}


def test_tamper_table_of_one_seed_is_as_before():
    runs = [_attack(1e-5, 42, [0.26, 0.31, 0.29], (0, 10, 20)), _attack(8e-5, 42, [0.26, 0.4, 0.45], (0, 10, 20))]
    result = {**_tamper(runs), "config": {"eval_every": 10, "table_steps": None}}
    assert tamper_table(result) == (
        "| Model | lr | seed | Step 0 | Step 10 | Step 20 | Max (step) |\n|---|---|---|---|---|---|---|\n"
        "| l2 | 1e-05 | 42 | 0.2600 | 0.3100 | 0.2900 | 0.3100 (10) |\n"
        "| l2 | 8e-05 | 42 | 0.2600 | 0.4000 | 0.4500 | 0.4500 (20) |\n\n"
        "Worst case: forget accuracy 0.4500 at step 20 (l2, lr=8e-05, seed=42); random chance 0.25, "
        "before unlearning 0.5200.\n")


def test_tamper_table_and_plot_give_mean_sd_per_model_and_lr(tmp_path):
    runs = [_attack(1e-3, 0, [0.3, 0.4, 0.5]), _attack(1e-3, 1, [0.3, 0.5, 0.6]), _attack(1e-3, 2, [0.3, 0.6, 0.7]),
            _attack(1e-4, 0, [0.3, 0.35, 0.33])]
    # step 2: 0.4, 0.5, 0.6 -> mean 0.5, sd sqrt((0.01 + 0 + 0.01) / 2) = 0.1; step 4: 0.6 +- 0.1
    assert [(c["step"], c["n"]) for c in seed_curve(runs[:3])] == [(0, 3), (2, 3), (4, 3)]
    assert seed_curve(runs[:3])[1]["mean"] == pytest.approx(0.5) and seed_curve(runs[:3])[1]["sd"] == pytest.approx(0.1)
    table = tamper_table(_tamper(runs))
    assert "| l2 | 0.001 | 0 | 0.3000 | 0.4000 | 0.5000 | 0.5000 (4) |" in table  # the per-attack rows stay
    assert "| Model | lr | n | seeds | Step 0 | Step 2 | Step 4 | Max mean (step) |" in table
    assert ("| l2 | 0.001 | 3 | 0, 1, 2 | 0.3000 ± 0.0000 | 0.5000 ± 0.1000 | 0.6000 ± 0.1000 | "
            "0.6000 ± 0.1000 (4) |") in table
    assert "| l2 | 0.0001 | 1 | 0 | 0.3000 | 0.3500 | 0.3300 | 0.3500 (2) |" in table
    assert table.endswith("before unlearning 0.5200.\n") and "Worst case: forget accuracy 0.7000 at step 4" in table
    short = seed_curve([_attack(1e-3, 0, [0.3, 0.4, 0.5]), _attack(1e-3, 1, [0.3, 0.6], (0, 2))])
    assert [(c["step"], c["n"], c["sd"]) for c in short][2] == (4, 1, None)  # only the attacks evaluated there
    plot_tamper(_tamper(runs), tmp_path / "tamper.png")
    assert (tmp_path / "tamper.png").stat().st_size > 10_000


def test_tamper_plot_names_what_its_lines_share_once_in_the_title(monkeypatch, tmp_path):
    import sequnlearn.tamper.result as result

    drawn = []
    monkeypatch.setattr(result, "save", lambda fig, path: drawn.append(fig))

    def plotted(runs):
        plot_tamper(_tamper(runs), tmp_path / "t.png")
        ax = drawn.pop().axes[0]
        return ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()]

    other = {**_attack(1e-3, 1, [0.3, 0.5, 0.6]), "model": "kl"}
    title, labels = plotted([_attack(1e-3, 1, [0.3, 0.4, 0.5]), other])  # one attack each, one lr, one seed
    assert "lr 0.001, seed 1" in title and labels[:2] == ["l2", "kl"]
    title, labels = plotted([_attack(1e-3, 1, [0.3, 0.4, 0.5]), {**other, "seed": 2}])  # seeds differ
    assert "seed" not in title and labels[:2] == ["l2 seed=1", "kl seed=2"]
    three = [_attack(1e-3, s, [0.3, 0.4, 0.5]) for s in (1, 2, 3)]
    title, labels = plotted(three + [{**r, "model": "kl"} for r in three])
    assert "mean ± sd over 3 seeds" in title and labels[:2] == ["l2", "kl"]
    title, labels = plotted(three + [_attack(1e-4, 1, [0.3, 0.3, 0.3])])  # two lrs, 3 seeds and 1
    assert "(" not in title and labels[:2] == ["l2 lr=0.001 (mean ± sd, 3 seeds)", "l2 lr=0.0001 seed=1"]


@pytest.fixture
def seed_sweep(tmp_path) -> Path:
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump({
        "name": "seeds", "base": "tiny", "set": {"layers": [3, 2]},
        "grid": {"remove_coef": [10, 50], "seed": [1, 2, 3]},
        "eval": {"forget_task": MCQ, "style": "cloze", "limit": 8}}, sort_keys=False))
    return path


def test_a_seed_grid_gives_distinct_readable_points_that_group_by_setting(seed_sweep, tmp_path, capsys):
    sweep = load_sweep(str(seed_sweep))
    names = [sweep.point_name(p) for p in sweep.points()]
    assert names == [f"remove_coef={rm}_seed={s}" for rm in (10, 50) for s in (1, 2, 3)]
    assert [sweep.config(p).seed for p in sweep.points()] == [1, 2, 3, 1, 2, 3]
    main(["sweep", str(seed_sweep), "--dry-run", "--out", str(tmp_path / "dry")])
    assert "5  remove_coef=50  seed=3" in capsys.readouterr().out
    for point, name, forget in zip(sweep.points(), names, (0.30, 0.32, 0.37, 0.28, 0.29, 0.30)):
        cfg = sweep.config(point)
        run = tmp_path / "out" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(dump_yaml(cfg))  # as the engine writes it
        (run / "eval.json").write_text(json.dumps({"point": point, "forget_acc": forget}))
        (run / "metrics.jsonl").write_text("")
    from sequnlearn.report import collect

    rows = group_rows(collect([tmp_path / "out"])[0])
    assert [(r["remove_coef"], r["n"], r["seeds"]) for r in rows] == [(10, 3, "1, 2, 3"), (50, 3, "1, 2, 3")]
    assert rows[1]["forget mean"] == pytest.approx(0.29) and rows[1]["forget sd"] == pytest.approx(0.01)


def test_a_seeds_list_repeats_every_point_and_equals_the_seed_grid(seed_sweep, tmp_path):
    grid = load_sweep(str(seed_sweep))
    listed = tmp_path / "listed.yaml"
    data = yaml.safe_load(seed_sweep.read_text())
    data["grid"].pop("seed")
    listed.write_text(yaml.safe_dump({**data, "seeds": [1, 2, 3]}))
    sweep = load_sweep(str(listed))
    assert sweep.points() == grid.points() and list(map(sweep.point_name, sweep.points())) == list(
        map(grid.point_name, grid.points()))
    points = tmp_path / "points.yaml"
    points.write_text(yaml.safe_dump({**{k: v for k, v in data.items() if k != "grid"},
                                      "points": [{"remove_coef": 50, "retain_coef": 5}, {"remove_coef": 5}],
                                      "seeds": [7, 8]}))
    assert [load_sweep(str(points)).point_name(p) for p in load_sweep(str(points)).points()] == [
        "remove_coef=50_retain_coef=5_seed=7", "remove_coef=50_retain_coef=5_seed=8", "remove_coef=5_seed=7",
        "remove_coef=5_seed=8"]
    for bad in ([], [1, 1], ["a"], 3):
        listed.write_text(yaml.safe_dump({**data, "seeds": bad}))
        with pytest.raises(UserError, match="seeds must be a non-empty list of distinct integers"):
            load_sweep(str(listed))


def test_point_labels_of_a_crowded_plot_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sequnlearn.plots import place_labels as _place_labels

    fig, ax = plt.subplots(figsize=(6, 4.6))
    pts = [(0.473, 0.965), (0.458, 0.950), (0.510, 0.975), (0.563, 0.979), (0.575, 0.979), (0.604, 0.985),
           (0.383, 0.865)]
    ax.scatter(*zip(*pts))
    ax.set_xlim(0.2, 1.05)
    ax.set_ylim(0.2, 1.05)
    _place_labels(ax, [(f"KL rm{10 * i}/ret{5 * i}", p) for i, p in enumerate(pts)])
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the labels' text, not their leader lines
    assert len(boxes) == len(pts)
    assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    plt.close(fig)
