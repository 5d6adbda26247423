"""docs/reproducing-the-reference.md is complete: its commands parse, load their presets and sweeps without
running anything, and every table of the reference log (`../shared/reference/sequential-unlearning-experiments.md`)
has a documented producer: the baseline row, the L2 table, the L2-vs-KL ablation, the KL sweep and the
tampering table (whose input runs are made by documented commands with the reference's settings)."""

import re
import shlex
from pathlib import Path

import pytest

from sequnlearn.cli import build_parser
from sequnlearn.config import TamperConfig, load_config
from sequnlearn.sweep import load_sweep, slurm_script

DOC = Path(__file__).parents[1] / "docs" / "reproducing-the-reference.md"

# The reference log's tables (remove_coef, retain_coef) in its order, and its models.
L2_TABLE = [(10, 5), (20, 5), (30, 5), (40, 5), (50, 5)]  # "Experiments", runs 1-5, retain loss L2
KL_TABLE = [(50, 5), (20, 10), (30, 10), (20, 20), (10, 20), (10, 50), (5, 50), (5, 100)]  # "KL hyperparameter sweep"
ABLATION = {"l2": (50, 5), "kl": (50, 5)}  # "L2 vs KL with same hyperparameters (rm50, ret5)"
TAMPERED = {"l2": (50, 5), "kl": (5, 100)}  # "Tampering Attack Results": L2 (rm50/ret5), KL (rm5/ret100)
BASE_MODEL = "EleutherAI/deep-ignorance-unfiltered"
LAYERS = [28, 24, 20, 16]


def commands(text: str) -> list[list[str]]:
    """The ``sequnlearn`` command lines of the doc's bash blocks, as argv after ``sequnlearn`` (comments,
    ``sbatch`` and other programs left out; ``accelerate launch ... -m sequnlearn`` counted)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "sequnlearn" in words:
                found.append(words[words.index("sequnlearn") + 1:])
    return found


def _coefs(cfg) -> tuple:
    return int(cfg.remove_coef), int(cfg.retain_coef)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """What the documented commands would make, worked out without running them."""
    parser = build_parser()
    made = {"runs": {}, "sweeps": {}, "baselines": set(), "reports": [], "tampers": [], "evals": []}
    for argv in commands(DOC.read_text(encoding="utf-8")):
        args = parser.parse_args(argv)  # every documented command line parses
        if args.command == "unlearn":
            made["runs"][args.out] = load_config(preset=args.preset, overrides=args.set)
        elif args.command == "sweep":
            sweep = load_sweep(args.sweep)
            out = str(Path(args.out) / sweep.name)
            made["sweeps"][out] = sweep
            script = slurm_script(sweep, Path(out)) if args.launcher == "slurm" else ""
            if (args.launcher == "slurm" and "--baseline" in script) or (args.launcher == "local" and args.only is None):
                made["baselines"].add(out)
        elif args.command == "report":
            made["reports"].append(args.dirs)
        elif args.command == "tamper":
            made["tampers"].append((args.models, load_config(TamperConfig, preset=args.preset, overrides=args.set)))
        elif args.command == "eval":
            made["evals"].append(args)
    return made


def _sweep(plan, name: str):
    found = [(out, s) for out, s in plan["sweeps"].items() if s.name == name]
    assert found, f"no documented command runs the sweep {name}"
    return found[0]


def _points(sweep) -> list:
    return [sweep.config(p) for p in sweep.points()]


def test_the_doc_has_commands_and_each_parses(plan):
    assert plan["runs"] and plan["sweeps"] and plan["tampers"] and plan["reports"]


@pytest.mark.parametrize("name, retain_loss, table", [("reference-l2", "l2", L2_TABLE), ("reference-kl", "kl", KL_TABLE)])
def test_each_sweep_table_is_made_with_its_baseline_row_and_reported(plan, name, retain_loss, table):
    out, sweep = _sweep(plan, name)
    configs = _points(sweep)
    assert [_coefs(c) for c in configs] == table
    assert {c.retain_loss for c in configs} == {retain_loss} and {c.model for c in configs} == {BASE_MODEL}
    assert all(c.target_layers() == LAYERS for c in configs)
    assert {sweep.eval["forget_task"], sweep.eval["retain_task"]} == {"wmdp_bio_robust", "mmlu"}
    assert out in plan["baselines"], f"no documented command evaluates the baseline row of {name}"
    assert any(out in dirs for dirs in plan["reports"]), f"no documented report over {out}"


def test_the_ablation_rows_are_points_of_the_two_sweeps(plan):
    for name, loss in (("reference-l2", "l2"), ("reference-kl", "kl")):
        _, sweep = _sweep(plan, name)
        assert ABLATION[loss] in [_coefs(c) for c in _points(sweep) if c.retain_loss == loss]


def test_the_tampering_table_attacks_documented_runs_with_the_reference_settings(plan):
    tampers = [(models, cfg) for models, cfg in plan["tampers"] if cfg.table_steps == [0, 10, 100]]
    assert tampers, "no documented tamper command with the reference-tamper settings"
    models, cfg = tampers[0]
    assert cfg.lrs == [2e-5] and cfg.lr_schedule == "linear" and cfg.chunking == "document"
    inputs = {m: plan["runs"].get(m) for m in models}
    missing = [m for m, c in inputs.items() if c is None]
    assert not missing, f"the tamper command attacks {missing}, which no documented command creates"
    made = {c.retain_loss: _coefs(c) for c in inputs.values()}
    assert made == TAMPERED
    assert all(c.model == BASE_MODEL and c.target_layers() == LAYERS for c in inputs.values())
