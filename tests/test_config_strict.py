"""A strict config: no NaN or infinity, no YAML key given twice, layer lists deepest first and each
layer once; a key added later counts as its default in configs stored before it existed."""

from __future__ import annotations

import pytest

from sequnlearn.cli import main
from sequnlearn.config import TamperConfig, UnlearnConfig, dump_yaml, load_config, presets, with_defaults
from sequnlearn.errors import UserError
from sequnlearn.runs import RunDir
from sequnlearn.sweep import load_sweep


@pytest.mark.parametrize("override", ["lr=nan", "lr=inf", "lr=.nan", "remove_coef=.inf", "retain_coef=-inf",
                                      "weight_decay=NaN", "max_grad_norm=-.inf", "lora_dropout=nan"])
def test_non_finite_numbers_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"^{key} must be a finite number, not .*; fix its value$"):
        load_config(preset="tiny", overrides=[override])


def test_non_finite_numbers_in_a_file_and_a_list_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: .nan\n")
    with pytest.raises(UserError, match="lr must be a finite number"):
        load_config(preset="tiny", config_file=str(cfg))
    with pytest.raises(UserError, match="lrs must be a finite number"):
        load_config(TamperConfig, overrides=["lrs=[2e-5, .inf]"])


def test_nan_lr_on_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    """``--set lr=nan`` used to end in a torch traceback."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--preset", "tiny", "--set", "lr=nan", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err == "sequnlearn unlearn: error: lr must be a finite number, not 'nan'; fix its value"
    assert not out.exists()


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, capsys):
    """It used to take the last value silently (lr 1e-3, then 100)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1.0e-3\nseed: 1\nlr: 100\n")
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--config", str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"config file {cfg} gives the key 'lr' twice (lines 1 and 3); keep one of them" in err


def test_a_key_given_twice_in_a_sweep_file_is_refused(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nbase: tiny\nset:\n  remove_coef: 10\n  remove_coef: 50\n"
                     "grid:\n  seed: [1, 2]\neval:\n  forget_task: wmdp_bio_robust\n")
    with pytest.raises(UserError, match=r"gives the key 'remove_coef' twice \(lines 4 and 5\)"):
        load_sweep(str(sweep))


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from sequnlearn import io

    f = tmp_path / "m.yaml"
    f.write_text("a: &base {x: 1, y: 2}\nb:\n  <<: *base\n  x: 3\n")
    assert io.read_yaml(f) == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


@pytest.mark.parametrize("layers, message", [
    ("[3, 2, 2]", r"layers \[3, 2, 2\] repeat layer 2; give each target layer once"),
    ("[1, 2, 3]", r"layers \[1, 2, 3\] are not deepest first .*give \[3, 2, 1\], or set layer_order: any"),
    ("[3, 1, 2]", r"not deepest first"),
])
def test_layer_lists_must_be_deepest_first_and_each_layer_once(layers, message):
    with pytest.raises(UserError, match=message):
        load_config(preset="tiny", overrides=[f"layers={layers}"])


def test_layer_order_any_allows_another_order_but_never_a_repeat():
    assert load_config(preset="tiny", overrides=["layers=[1, 3]", "layer_order=any"]).target_layers() == [1, 3]
    with pytest.raises(UserError, match="repeat layer 3"):
        load_config(preset="tiny", overrides=["layers=[3, 1, 3]", "layer_order=any"])
    with pytest.raises(UserError, match="layer_order 'shallowest_first' is not valid"):
        load_config(preset="tiny", overrides=["layer_order=shallowest_first"])


def test_shipped_presets_and_sweeps_pass_the_strict_checks():
    from sequnlearn.sweep import sweeps

    for name in presets():
        try:
            load_config(UnlearnConfig, preset=name)
        except UserError:
            load_config(TamperConfig, preset=name)  # the tamper presets
    for name in sweeps():
        load_sweep(name)


def _stored_before_layer_order(cfg: UnlearnConfig) -> str:
    """``config.yaml`` as a run written before ``layer_order`` existed has it."""
    text = dump_yaml(cfg)
    assert "layer_order: deepest_first\n" in text
    return text.replace("layer_order: deepest_first\n", "")


def test_a_run_stored_before_a_key_existed_still_resumes_and_groups(tmp_path):
    from sequnlearn.report import seed_groups
    from sequnlearn.unlearn.engine import check_resume

    cfg = load_config(preset="tiny")
    (tmp_path / "config.yaml").write_text(_stored_before_layer_order(cfg))
    check_resume(cfg, RunDir(tmp_path))  # no "different config (layer_order)"
    with pytest.raises(UserError, match=r"different config \(layer_order\)"):
        check_resume(load_config(preset="tiny", overrides=["layer_order=any"]), RunDir(tmp_path))

    import yaml

    old = yaml.safe_load(_stored_before_layer_order(cfg))
    new = {**cfg.to_dict(), "seed": 7}
    assert "layer_order" not in old and with_defaults(old)["layer_order"] == "deepest_first"
    assert len(seed_groups([{"config": old}, {"config": new}])) == 1
