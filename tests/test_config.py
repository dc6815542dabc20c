"""Config rules: YAML + key.sub=value overrides into typed dataclasses, validated at load, saved and reloaded as is,
and values are data only (never executed).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from bgtrain.config import (
    ConfigError,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_loads_into_typed_dataclasses(tmp_path) -> None:
    path = _write(tmp_path, """
name: voc-llr
model:
  depth: 18
  alpha_train: 1
  alpha_eval: 5.0
  pretrained: weights/resnet18.pth
loss:
  scheme: LL-R
  delta_rel: 0.005
optim:
  lr: 1.0e-5
  epochs: 10
""")
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelConfig) and isinstance(cfg.loss, LossConfig)
    assert cfg.name == "voc-llr"
    assert cfg.model.depth == 18 and cfg.model.pretrained == "weights/resnet18.pth"
    assert cfg.model.alpha_train == 1.0 and isinstance(cfg.model.alpha_train, float)   # int widened to float
    assert cfg.loss.scheme == "LL-R" and cfg.loss.delta_rel == 0.005
    assert cfg.optim.lr == 1e-5 and cfg.optim.epochs == 10
    assert cfg.data == TrainConfig().data                          # untouched sections keep their defaults


def test_no_file_gives_the_defaults() -> None:
    assert load_config(None) == TrainConfig()


def test_repo_smoke_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    assert cfg.model.depth == 18 and cfg.loss.scheme == "LL-R"


def test_overrides_set_dotted_keys(tmp_path) -> None:
    path = _write(tmp_path, "model:\n  depth: 18\n")
    cfg = load_config(path, ["model.depth=50", "loss.scheme=LL-Cp", "optim.lr=3e-4", "model.pretrained=null",
                             "data.flip=false", "name=from-cli"])
    assert cfg.model.depth == 50 and cfg.loss.scheme == "LL-Cp" and cfg.optim.lr == 3e-4
    assert cfg.model.pretrained is None and cfg.data.flip is False and cfg.name == "from-cli"


def test_parse_overrides_reads_yaml_scalars() -> None:
    assert parse_overrides(["a.b=5", "c=x", "d=1.5", "e=true", "f=null"]) == [
        ("a.b", 5), ("c", "x"), ("d", 1.5), ("e", True), ("f", None)]


def test_override_without_equals_sign_is_an_error() -> None:
    with pytest.raises(ConfigError, match="model.depth"):
        parse_overrides(["model.depth"])


def test_string_1e_minus_5_is_accepted_as_float(tmp_path) -> None:
    """YAML 1.1 reads `1e-5` (no dot) as a string; it is plainly a number."""
    assert yaml.safe_load("lr: 1e-5")["lr"] == "1e-5"              # the trap this rule is about
    cfg = load_config(_write(tmp_path, "optim:\n  lr: 1e-5\nloss:\n  delta_rel: 5e-3\n"))
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.delta_rel == 5e-3
    assert load_config(None, ["optim.lr=1e-5"]).optim.lr == 1e-5


@pytest.mark.parametrize("override,key,allowed", [
    ("model.dept=50", "model.dept", ["alpha_eval", "alpha_train", "channels_last", "depth", "pretrained"]),
    ("optim.learning_rate=1", "optim.learning_rate", ["lr", "head_lr_mult", "epochs"]),
    ("modle.depth=50", "modle", ["model", "data", "loss", "optim", "engine", "checkpoint", "eval"]),
])
def test_unknown_key_names_key_and_allowed_keys(override: str, key: str, allowed: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert key in msg and "unknown" in msg
    for name in allowed:
        assert name in msg


@pytest.mark.parametrize("override,key,allowed", [
    ("loss.scheme=LLCp", "loss.scheme", ["'LL-R'", "'LL-Ct'", "'LL-Cp'", "'AN'", "'full'"]),
    ("model.depth=20", "model.depth", ["18", "34", "50", "101"]),
    ("engine.precision=fp64", "engine.precision", ["'fp32'", "'bf16'", "'fp16'"]),
    ("data.backend=tfrecord", "data.backend", ["'webdataset'", "'dali'"]),
])
def test_bad_literal_value_names_allowed_values(override: str, key: str, allowed: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert key in msg
    for value in allowed:
        assert value in msg


@pytest.mark.parametrize("override,key", [
    ("optim.epochs=2.5", "optim.epochs"),          # float for an int
    ("optim.lr=fast", "optim.lr"),                 # text for a float
    ("optim.lr=true", "optim.lr"),                 # bool is not a number here
    ("data.flip=1", "data.flip"),                  # int for a bool
    ("optim.epochs=true", "optim.epochs"),         # bool for an int
    ("model.depth='50'", "model.depth"),           # a string is not the int 50
    ("name=[a, b]", "name"),                       # a list for a string
    ("model=5", "model"),                          # a scalar for a section
])
def test_bad_type_names_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override,key", [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-4", "optim.lr"),
    ("optim.epochs=0", "optim.epochs"),
    ("model.alpha_train=0.5", "model.alpha_train"),
    ("model.alpha_eval=0", "model.alpha_eval"),
    ("loss.delta_rel=0", "loss.delta_rel"),
    ("loss.delta_rel=1.5", "loss.delta_rel"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.resampled=true", "data.epoch_samples"),
    ("engine.zero_stage=2", "engine.zero_stage"),   # ZeRO needs the deepspeed engine
])
def test_validation_rules_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_errors_from_a_file_name_the_file(tmp_path) -> None:
    path = _write(tmp_path, "optim:\n  lr: -1\n", "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "optim.lr" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    broken = _write(tmp_path, "model: [unclosed\n", "broken.yaml")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)


def test_save_config_round_trips_through_load_config(tmp_path) -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        "optim.lr=1e-5", "loss.scheme=LL-Cp", "loss.delta_rel=0.001", "model.pretrained=w/r18.pth",
        "model.alpha_train=1", "engine.engine=deepspeed", "engine.zero_stage=2", "checkpoint.resume=latest"])
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert yaml.safe_load(out.read_text())["loss"]["scheme"] == "LL-Cp"   # plain YAML, readable without bgtrain


def test_override_values_are_never_executed(tmp_path) -> None:
    """A YAML tag that would run a command is refused by safe_load: a ConfigError naming the key, nothing runs."""
    marker = tmp_path / "ran"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.pretrained={payload}"])
    assert "model.pretrained" in str(err.value)
    assert not marker.exists()


def test_config_file_values_are_never_executed(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = _write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=str(path).replace(".", r"\.")):
        load_config(path)
    assert not marker.exists()


def test_defaults_are_the_papers_recipe() -> None:
    """Adam lr 1e-5 for the trunk, x10 for the classifier, 10 epochs, batch 16, 448 px, alpha 5, LS/ASL settings."""
    cfg = TrainConfig()
    assert (cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.epochs, cfg.optim.weight_decay) == (1e-5, 10.0, 10, 0.0)
    assert (cfg.data.batch_size, cfg.data.image_size) == (16, 448)
    assert (cfg.model.alpha_train, cfg.model.alpha_eval, cfg.model.depth) == (5.0, 5.0, 50)
    loss = LossConfig()
    assert (loss.ls_epsilon, loss.asl_gamma_neg, loss.asl_gamma_pos, loss.asl_clip) == (0.1, 4.0, 1.0, 0.05)
    assert OptimConfig().grad_accum == 1


def test_override_that_is_not_valid_yaml_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["name=[unclosed"])
    assert "name" in str(err.value)
