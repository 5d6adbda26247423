"""Sweeps are data: a grid over config keys → one run directory per point.

A sweep file (YAML) names a base preset, a grid (or an explicit list of points) and the evaluation::

    name: toy-l2
    base: toy-l2                    # unlearning preset (or `base_config: FILE.yaml`)
    set: {}                         # fixed overrides for every point
    grid:
      remove_coef: [10, 20, 30, 40, 50]
      retain_coef: [5]
    eval:
      forget_task: runs/toyworld/mcq/forget.jsonl   # or wmdp_bio_robust
      retain_task: runs/toyworld/mcq/retain.jsonl   # or mmlu
      style: cloze                                   # or letter

Instead of ``grid``, ``points`` lists the points themselves (for tables that are not a product,
like the reference's KL table)::

    points:
      - {remove_coef: 5, retain_coef: 100}
      - {remove_coef: 50, retain_coef: 5}

Seeds are a key like any other: ``seed: [1, 2, 3]`` in ``grid`` runs every setting once per seed
(``remove_coef=10_seed=1`` ...), and ``sequnlearn report`` gives each setting's mean ± sd over them.

Each point is ``OUT/NAME/<varied key=value ...>/`` with the run directory contract of DESIGN.md;
a point whose ``eval.json`` exists is skipped, an interrupted one is resumed. The base model is
evaluated once into ``OUT/NAME/baseline/eval.json``.
"""

from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sequnlearn.config import PRESET_DIR, STYLES, UnlearnConfig, build, preset_dict, preset_needs, read_yaml
from sequnlearn.distributed import Process
from sequnlearn.errors import UserError
from sequnlearn.runs import RunDir, atomic_write_text, write_json

SWEEP_DIR = PRESET_DIR / "sweeps"
EVAL_KEYS = ("forget_task", "retain_task", "style", "limit", "batch_size", "num_fewshot")


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    base: dict[str, Any]
    grid: dict[str, list]
    eval: dict[str, Any]
    source: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    explicit: list[dict[str, Any]] | None = None
    seeds: list[int] | None = None
    """Run every point once per seed (``seed`` varies fastest); None: the points as they are."""
    needs: list[str] = field(default_factory=list)
    """Keys the base preset cannot ship (its ``needs:``, e.g. a keyword list): every point must set them."""

    def points(self) -> list[dict[str, Any]]:
        """The explicit points in file order, or every combination of the grid (the last key varies
        fastest), each repeated for every one of ``seeds``."""
        if self.explicit is not None:
            points = [dict(p) for p in self.explicit]
        else:
            keys = list(self.grid)
            points = [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        return points if self.seeds is None else [{**p, "seed": seed} for p in points for seed in self.seeds]

    def varied(self) -> list[str]:
        """Keys whose value differs between points (they name the point directories)."""
        points = self.points()
        keys = list(dict.fromkeys(k for p in points for k in p))
        return [k for k in keys if len({repr(p.get(k)) for p in points}) > 1]

    def point_name(self, point: dict[str, Any]) -> str:
        """Directory name of a point from its varied values, e.g. ``remove_coef=10`` (the keys it sets:
        explicit points may set different keys)."""
        parts = [f"{k}={_fmt(point[k])}" for k in self.varied() if k in point]
        return "_".join(parts) or "point"

    def config(self, point: dict[str, Any]) -> UnlearnConfig:
        """The validated config of a point.

        Raises:
            UserError: a bad value, or a key the base preset needs (:attr:`needs`) still unset.
        """
        cfg = build(UnlearnConfig, {**self.base, **self.fixed, **point})
        missing = [k for k in self.needs if getattr(cfg, k, None) is None]
        if missing:
            raise UserError(f"{self.source}: the base preset needs {missing[0]}, which it cannot ship; set it in the "
                            "sweep file's set: (or in every point)")
        return cfg


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).replace("/", "-")


def sweeps() -> list[str]:
    """Names of the shipped sweep files."""
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def load_sweep(name_or_file: str) -> Sweep:
    """Read a shipped sweep by name, or a sweep YAML file.

    Raises:
        UserError: unknown sweep, missing keys, a grid that is not lists, or a point whose config
            is invalid (checked for every point before anything runs).
    """
    path = Path(name_or_file)
    if not path.is_file():
        path = SWEEP_DIR / f"{name_or_file}.yaml"
        if not path.is_file():
            raise UserError(f"unknown sweep {name_or_file!r}; give a sweep file or one of: {', '.join(sweeps())}")
    data = read_yaml(path)
    unknown = set(data) - {"name", "base", "base_config", "set", "grid", "points", "seeds", "eval", "notes"}
    if unknown:
        raise UserError(f"{path}: unknown sweep keys {sorted(unknown)}; "
                        "use name, base, base_config, set, grid or points, seeds, eval")
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) < len(seeds)
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise UserError(f"{path}: seeds must be a non-empty list of distinct integers (got {seeds!r})")
    if ("grid" in data) == ("points" in data):
        raise UserError(f"{path}: give either grid (a product of values) or points (a list of mappings), not "
                        f"{'both' if 'grid' in data else 'neither'}")
    if "grid" in data and (not isinstance(data["grid"], dict)
                           or not all(isinstance(v, list) and v for v in data["grid"].values())):
        raise UserError(f"{path}: grid must map config keys to non-empty lists of values")
    points = data.get("points")
    if "points" in data and (not isinstance(points, list) or not points
                             or not all(isinstance(p, dict) and p for p in points)):
        raise UserError(f"{path}: points must be a non-empty list of key: value mappings")
    base = preset_dict(data["base"]) if "base" in data else {}
    if "base_config" in data:
        base.update(read_yaml(Path(data["base_config"])))
    ev = data.get("eval") or {}
    if "forget_task" not in ev or set(ev) - set(EVAL_KEYS):
        raise UserError(f"{path}: eval needs forget_task (and may have {', '.join(EVAL_KEYS[1:])})")
    bad = [s for s in eval_styles(ev) if s not in STYLES]
    if bad or not eval_styles(ev):
        raise UserError(f"{path}: eval style {bad or '[]'} unknown; use letter, cloze or a list of them")
    name = data.get("name", path.stem)
    check_dir_name(name, f"{path}: sweep name", "set name: to a plain name such as my-sweep")
    sweep = Sweep(name, base, data.get("grid") or {}, ev, str(path), data.get("set") or {}, points, seeds,
                  preset_needs(data["base"]) if "base" in data else [])
    check_points(sweep)
    return sweep


def check_dir_name(name: Any, what: str, fix: str) -> None:
    """Refuse a name that would not be one directory inside ``--out``: not a string, empty, ``.``/``..``,
    with a path separator, a control character (a newline) or a NUL, or longer than a file name may be.

    Raises:
        UserError: names ``what``, the name and ``fix``.
    """
    bad = (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
           or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name.encode("utf-8")) > 255)
    if bad:
        raise UserError(f"{what} {name!r} is not a single directory name (it must stay inside --out: no path "
                        f"separator, not . or .., no control characters); {fix}")


def check_points(sweep: Sweep) -> None:
    """Validate every point's config and refuse two points that would share a run directory (the
    same point twice, values equal as numbers such as ``10`` and ``10.0``, or values that print alike).

    Raises:
        UserError: names the two points (by index) and the directory, before anything runs.
    """
    names: dict[str, tuple[int, dict]] = {}
    for i, point in enumerate(sweep.points()):
        sweep.config(point)
        name = sweep.point_name(point)
        check_dir_name(name, f"{sweep.source}: point {i}'s directory", "change the values that name it")
        if name in names:
            j, other = names[name]
            fix = ("are the same point (equal values: 10 and 10.0 are one number) and would share the directory "
                   f"{name}; list each point once") if other == point else \
                f"would share the directory {name}; give each point the keys that tell it apart"
            raise UserError(f"{sweep.source}: points {j} {other} and {i} {point} {fix}")
        names[name] = (i, point)


def evaluate_model(model_path: str, ev: dict[str, Any]) -> dict[str, Any]:
    """Forget (and retain) accuracy of a saved model: the content of a point's ``eval.json``.

    With several styles (``style: [cloze, letter]``) the first gives the headline accuracies and
    ``styles`` holds each style's ``{forget_acc, retain_acc}``.
    """
    from dataclasses import replace

    from sequnlearn.eval import forget_retain_accuracy, with_loaded_tasks
    from sequnlearn.model.load import load_model

    model, tok = load_model(model_path)
    styles = eval_styles(ev)
    spec = with_loaded_tasks(eval_spec(ev))  # read once, scored in every style
    results = {style: forget_retain_accuracy(model, tok, replace(spec, style=style)) for style in styles}
    out = results[styles[0]]
    if len(styles) > 1:
        out["styles"] = {style: {k: r[k] for k in ("forget_acc", "retain_acc") if k in r} for style, r in results.items()}
    return out


def eval_styles(ev: dict[str, Any]) -> list[str]:
    """The scoring styles of a sweep file's ``eval`` mapping (``style``: one or a list; default letter)."""
    style = ev.get("style", "letter")
    return list(style) if isinstance(style, (list, tuple)) else [style]


def eval_spec(ev: dict[str, Any]):
    """The :class:`~sequnlearn.eval.EvalSpec` of a sweep file's ``eval`` mapping (in its first style)."""
    from sequnlearn.eval import EvalSpec

    return EvalSpec(ev["forget_task"], ev.get("retain_task"), eval_styles(ev)[0], ev.get("limit"),
                    ev.get("batch_size", 16), ev.get("num_fewshot", 0))


def check_inputs(sweep: Sweep) -> None:
    """Check what the points share before any runs: the evaluation tasks load, each model is sound.

    Raises:
        UserError: an MCQ file or model directory that is missing, undecodable or damaged.
    """
    from sequnlearn.data.mcq import load_task
    from sequnlearn.model.load import inspect_model

    for key in ("forget_task", "retain_task"):
        if sweep.eval.get(key):
            load_task(sweep.eval[key], num_fewshot=sweep.eval.get("num_fewshot", 0))
    for model, max_length in sorted({(c.model, c.max_length) for c in map(sweep.config, sweep.points())}):
        inspect_model(model, max_length=max_length)


def run_point(sweep: Sweep, index: int, out: Path, proc: Process | None = None) -> Path:
    """Unlearn and evaluate point ``index`` into its run directory (skip if done, resume if started).

    Under ``accelerate launch`` every process unlearns (the engine splits each global batch); the
    evaluation runs on the main process, which alone writes ``eval.json``, while the others wait.
    """
    from sequnlearn.unlearn.engine import unlearn

    proc = proc or Process.start()
    point = sweep.points()[index]
    run = RunDir(out / sweep.point_name(point))
    main = proc.is_main
    if run.eval.exists():
        _say(main, f"[sweep] {run.root.name}: done, skipped")
        return run.root
    cfg = sweep.config(point)
    _say(main, f"[sweep] {index + 1}/{len(sweep.points())} {run.root.name}")
    if not run.is_finished():
        resume = run.is_run()
        proc.barrier()  # every process has looked before the run directory appears (with its first file)
        unlearn(cfg, run, resume=resume, proc=proc)
    result = proc.on_main(lambda: evaluate_model(str(run.model), sweep.eval))
    if main:
        from sequnlearn.modelcard import write_model_card

        write_json(run.eval, {"point": point, **result})
        write_model_card(run)
    proc.barrier()
    return run.root


def run_baseline(sweep: Sweep, out: Path, proc: Process | None = None) -> Path:
    """Evaluate the base model once into ``OUT/baseline/eval.json`` (on the main process)."""
    proc = proc or Process.start()
    run = RunDir(out / "baseline")
    main = proc.is_main
    if not run.eval.exists():
        model = sweep.config(sweep.points()[0]).model
        _say(main, f"[sweep] baseline: {model}")
        result = proc.on_main(lambda: evaluate_model(model, sweep.eval))
        if main:
            write_json(run.eval, {"baseline": True, "model": model, **result})
        proc.barrier()
    return run.root


def _say(main: bool, msg: str) -> None:
    if main:
        print(msg, flush=True)


def slurm_script(sweep: Sweep, out: Path, *, accelerate_args: str | None = None) -> str:
    """An sbatch job-array script: array task N < points runs ``sweep --only N``; the last task evaluates
    the base model (``sweep --baseline``: the tables' baseline row)."""
    n = len(sweep.points())
    launcher = (f"accelerate launch {accelerate_args} -m sequnlearn" if accelerate_args is not None
                else "sequnlearn")
    common = f"sweep {shlex.quote(sweep.source)} --out {shlex.quote(str(out.parent))}"
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=sequnlearn-{sweep.name}",
        f"#SBATCH --array=0-{n}",
        f"#SBATCH --output={out}/slurm-%A_%a.out",
        "#SBATCH --gpus-per-node=1",
        f"# Adjust partition, time and GPUs for your cluster; tasks 0-{n - 1} are the points of the grid, task {n}",
        "# evaluates the base model (the baseline row). Then: sequnlearn report " + shlex.quote(str(out)),
        "set -euo pipefail",
        f'if [ "$SLURM_ARRAY_TASK_ID" -eq {n} ]; then',
        f"  {launcher} {common} --baseline",
        "else",
        f"  {launcher} {common} --only $SLURM_ARRAY_TASK_ID",
        "fi",
        "",
    ])


def write_slurm(sweep: Sweep, out: Path, accelerate_args: str | None = None) -> Path:
    """Write ``OUT/sweep.sbatch`` and return its path."""
    path = out / "sweep.sbatch"
    atomic_write_text(path, slurm_script(sweep, out, accelerate_args=accelerate_args))
    return path
