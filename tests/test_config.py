"""Configs: every preset loads; bad keys, types and values are clear errors."""

from pathlib import Path

import pytest

from sequnlearn.config import TamperConfig, UnlearnConfig, load_config, presets, preset_dict
from sequnlearn.errors import UserError

REFERENCE = dict(num_train_examples=1024, per_device_batch_size=4, global_batch_size=32, lr=1e-3, lora_r=16,
                 lora_alpha=16, epochs_per_layer=1, max_length=2048)


@pytest.mark.parametrize("name", presets())
def test_every_preset_loads(name):
    kind = TamperConfig if name.endswith("-tamper") else UnlearnConfig
    cfg = load_config(kind, preset=name)
    assert set(preset_dict(name)) <= set(cfg.__dataclass_fields__)


@pytest.mark.parametrize("name, remove, retain, loss", [("deep-ignorance-l2", 50.0, 5.0, "l2"),
                                                         ("deep-ignorance-kl", 5.0, 100.0, "kl")])
def test_reference_presets_carry_the_reference_table(name, remove, retain, loss):
    cfg = load_config(preset=name)
    assert cfg.model == "EleutherAI/deep-ignorance-unfiltered"
    assert cfg.target_layers() == [28, 24, 20, 16]
    assert (cfg.remove_coef, cfg.retain_coef, cfg.retain_loss) == (remove, retain, loss)
    for key, value in REFERENCE.items():
        assert getattr(cfg, key) == value, key


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(preset="tiny", overrides=["lr=1e-4", "layers=[3, 1]", "retain_layers=null"])
    assert cfg.lr == 1e-4 and cfg.layers == [3, 1] and cfg.retain_layers is None


@pytest.mark.parametrize("override, message", [
    ("remove_cof=3", "unknown config key 'remove_cof'; did you mean 'remove_coef'?"),
    ("remove_coef=-1", "remove_coef must be >= 0"),
    ("lora_r=0", "lora_r must be >= 1"),
    ("lr=0", "lr must be > 0"),
    ("lr=abc", "lr must be a number"),
    ("lora_r=2.5", "lora_r must be an integer"),
    ("retain_loss=mse", "retain_loss 'mse' is not valid; use one of l2, kl"),
    ("layers=[]", "layers is an empty list"),
    ("global_batch_size=6", "not a multiple of per_device_batch_size"),
    ("num_train_examples=4", "fewer than one global batch"),
    ("lr", "is not key=value"),
])
def test_bad_values_are_user_errors(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_config(preset="tiny", overrides=[override])


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        load_config(preset="tinyy")


def test_yaml_errors_name_the_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-3\nlayers: [3, 2\n")
    with pytest.raises(UserError, match="YAML syntax error .* line"):
        load_config(config_file=str(bad))
    with pytest.raises(UserError, match="does not exist"):
        load_config(config_file=str(tmp_path / "missing.yaml"))


def test_start_end_step_must_run_back_to_front():
    with pytest.raises(UserError, match="back to front"):
        UnlearnConfig(layer_start=16, layer_end=28).target_layers()
