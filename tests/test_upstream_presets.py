"""The presets of the reference authors' later runs (#27 item 8) and the mapping table of their options (item 10).

Each preset carries the hyperparameters of the log row its comment names, runs end to end on a small toy
world (the data, depth and length of the world; a few steps), and `upstream-sft-all-layers`, whose run masked
the forget loss with a keyword list upstream does not publish, refuses to run without one. Every test that
docs/upstream-options.md cites exists.
"""

import json
import re
from pathlib import Path

import pytest

from sequnlearn.cli import main
from sequnlearn.config import load_config, preset_needs
from sequnlearn.runs import read_jsonl

ROOT = Path(__file__).parents[1]
UPSTREAM = ("upstream-lora-topk", "upstream-sft-maxent", "upstream-sft-all-layers")
SMALL = {  # the toy world's depth (4 layers) for each preset's schedule, and its retain layers
    "upstream-lora-topk": ["layer_start=3", "layer_end=2", "layer_step=1", "retain_layers=[1,3]"],
    "upstream-sft-maxent": ["layer_start=3", "layer_end=1", "layer_step=2"],
    "upstream-sft-all-layers": [],  # layer_start null .. 0: every layer of any model
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A reduced toy world with a short pretraining (its accuracies do not matter here, its files do)."""
    from sequnlearn.toyworld import ToyWorldConfig, build_world

    return build_world(tmp_path_factory.mktemp("world") / "w", ToyWorldConfig.reduced(steps=20), progress=False,
                       threads=1)


def _world_sets(world) -> list[str]:
    """The toy world's model and corpora, 16 examples of 64 tokens, one optimizer step of 8 a phase."""
    return [f"model={world.model}", f"forget_data={world.forget_corpus}", "forget_fields=[text]",
            f"retain_data={world.retain_corpus}", "retain_subset=null", "retain_fields=[text]",
            "num_train_examples=16", "max_length=64", "global_batch_size=8", "steps_per_layer=1",
            "checkpoint_every=0"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_each_preset_carries_its_log_row():
    lora = load_config(preset="upstream-lora-topk")
    assert lora.target_layers() == [28, 24, 20, 16] and (lora.remove_coef, lora.retain_coef) == (50, 5)
    assert (lora.method, lora.forget_loss, lora.forget_top_k, lora.lr) == ("lora", "topk_entropy", 100, 1e-3)
    assert lora.retain_layers == [5, 10, 15, 20, 25, 30] and lora.optimizer_scope == "phase"
    sft = load_config(preset="upstream-sft-maxent")
    assert sft.target_layers() == [31, 27, 23, 19, 15, 11] and (sft.remove_coef, sft.retain_coef) == (14, 1)
    assert (sft.method, sft.forget_loss, sft.retain_layers, sft.lr) == ("full", "max_entropy", "target", 2e-4)
    assert (sft.retain_ramp_start, sft.optimizer_scope, sft.lr_schedule, sft.forget_suffix) == (0.25, "run", "linear",
                                                                                               "original")
    every = load_config(preset="upstream-sft-all-layers")
    assert every.target_layers(32) == list(range(31, -1, -1)) and (every.remove_coef, every.retain_coef) == (5, 2)
    assert (every.optimizer, every.lr, every.forget_suffix, every.method) == ("muon", 0.02, "current", "full")
    for cfg in (sft, every):  # 1024 examples in batches of 32: the log's 128 micro-batches of 8 GPUs a layer
        assert (cfg.num_train_examples, cfg.global_batch_size, cfg.epochs_per_layer) == (1024, 32, 1)
    assert every.forget_keywords is None and preset_needs("upstream-sft-all-layers") == ["forget_keywords"]
    assert preset_needs("upstream-sft-maxent") == [] == preset_needs("toy-l2")


@pytest.mark.parametrize("name", UPSTREAM)
def test_each_preset_runs_end_to_end_on_the_toy_world(world, tmp_path, name):
    keywords = [f"forget_keywords={world.forget_keywords}"] if name == "upstream-sft-all-layers" else []
    out = tmp_path / "run"
    main(["unlearn", "--preset", name, *_sets(_world_sets(world) + SMALL[name] + keywords), "--out", str(out)])
    cfg = load_config(preset=name, overrides=_world_sets(world) + SMALL[name] + keywords)
    layers = cfg.target_layers(4)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["layer"] for m in metrics] == layers  # one optimizer step a phase, deepest first
    assert (out / "model" / "config.json").is_file() and (out / "adapter").exists() == (cfg.method == "lora")
    prov = json.loads((out / "provenance.json").read_text())
    if keywords:
        assert prov["corpora"]["forget"]["keyword_masked_share"] > 0


def test_the_all_layers_preset_refuses_to_run_without_its_keyword_list(world, tmp_path, capsys, snapshot):
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--preset", "upstream-sft-all-layers", *_sets(_world_sets(world)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "needs forget_keywords" in err and "--set forget_keywords=" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before and not out.exists()


# ---------------------------------------------------------------- the mapping table


def _cited_tests(text: str) -> set[tuple[str, str]]:
    """The ``tests/FILE.py::NAME`` references of a markdown text."""
    return set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", text))


def test_every_test_the_mapping_table_cites_exists():
    text = (ROOT / "docs" / "upstream-options.md").read_text(encoding="utf-8")
    cited = _cited_tests(text)
    assert len(cited) >= 15  # the table cites a test for each option
    missing = [f"{path}::{name}" for path, name in sorted(cited)
               if not (ROOT / path).is_file()
               or not re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M)]
    assert missing == []


def test_the_cited_test_check_reads_file_and_name():
    assert _cited_tests("a `tests/test_x.py::test_y` and tests/sub/test_z.py::test_w.") == {
        ("tests/test_x.py", "test_y"), ("tests/sub/test_z.py", "test_w")}


def test_a_sweep_over_a_preset_that_needs_a_key_refuses_points_without_it(tmp_path):
    from sequnlearn.errors import UserError
    from sequnlearn.sweep import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: upstream-sft-all-layers\ngrid: {remove_coef: [14, 20]}\n"
                    "eval: {forget_task: f.jsonl}\n", encoding="utf-8")
    with pytest.raises(UserError, match="the base preset needs forget_keywords, which it cannot ship"):
        load_sweep(str(path))
    kw = tmp_path / "kw.txt"
    kw.write_text("anthrax\n", encoding="utf-8")
    path.write_text(path.read_text() + f"set: {{forget_keywords: {kw}}}\n", encoding="utf-8")
    assert [c.forget_keywords for c in map(load_sweep(str(path)).config, load_sweep(str(path)).points())] == [str(kw)] * 2
