"""Typed run configuration: a YAML file plus ``key.sub=value`` overrides, validated before any work.

Values are parsed with ``yaml.safe_load`` and never executed. Every field is checked against its
type; an unknown key or a bad value raises :class:`ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

Scheme = Literal["full", "AN", "LL-R", "LL-Ct", "LL-Cp", "LS", "ASL", "EPR", "ROLE", "EM", "EM-APL"]


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed."""


@dataclass
class ModelConfig:
    depth: Literal[18, 34, 50, 101] = 50
    alpha_train: float = 5.0        # BoostLU alpha while training; 1.0 = plain GAP head
    alpha_eval: float = 5.0         # BoostLU alpha at evaluation ("inference only" = train 1, eval 5)
    pretrained: Optional[str] = None  # local torchvision ResNet state-dict file; never downloaded
    channels_last: bool = True


@dataclass
class DataConfig:
    shards: str = "data/smoke"      # folder with manifest.json, built by `python -m shards`
    backend: Literal["webdataset", "dali"] = "webdataset"
    decode: Literal["cpu", "gpu"] = "cpu"   # webdataset backend: PIL on CPU or nvJPEG on the GPU
    labels: Literal["observed", "full"] = "observed"  # which label set training sees
    image_size: int = 448
    batch_size: int = 16            # per rank; the global batch is batch_size * world * grad_accum
    workers: int = 2                # loader processes per rank
    shuffle_buffer: int = 256       # samples mixed inside each worker's stream
    flip: bool = True
    resampled: bool = False         # draw shards with replacement, epoch = epoch_samples
    epoch_samples: Optional[int] = None  # nominal epoch length (global samples) in resampled mode
    max_batches: Optional[int] = None    # cut every epoch short (smoke tests)
    eval_batch_size: int = 64


@dataclass
class LossConfig:
    scheme: Scheme = "AN"
    delta_rel: Optional[float] = None   # large-loss rate; None = the paper's default for the scheme
    ls_epsilon: float = 0.1
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 1.0
    asl_clip: float = 0.05
    expected_positives: Optional[float] = None  # EPR / ROLE k-hat; None = the dataset default
    em_alpha: Optional[float] = None    # EM / EM+APL entropy weight; None = the paper's value per dataset
    apl_beta: Optional[float] = None    # EM+APL soft-negative weight; None = the paper's value per dataset
    apl_warmup_epochs: Optional[int] = None  # EM+APL epochs before pseudo-labelling; None = the paper's
    state_max_gib: float = 4.0          # ROLE / EM+APL refuse per-sample tables larger than this


@dataclass
class OptimConfig:
    lr: float = 1e-5                # trunk learning rate
    head_lr_mult: float = 10.0      # the 1x1 classifier learns at lr * head_lr_mult
    weight_decay: float = 0.0
    epochs: int = 10
    grad_accum: int = 1
    grad_clip: float = 0.0          # 0 = off


@dataclass
class EngineConfig:
    engine: Literal["ddp", "deepspeed"] = "ddp"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    sync_bn: bool = False
    zero_stage: Literal[0, 1, 2] = 0
    tf32: bool = True
    timeout_s: int = 300            # rendezvous / collective timeout


@dataclass
class CheckpointConfig:
    every_steps: int = 0            # 0 = only at the end of each epoch
    keep_last: int = 2
    resume: Optional[str] = None    # "latest" or a checkpoint path


@dataclass
class EvalConfig:
    no_positive: Literal["zero", "skip"] = "zero"  # "zero" = the reference: AP 0 kept in the mean
    groups: int = 0                 # >0: group-wise mAP with that many groups (OpenImages: 5)
    select_on: Literal["val", "none"] = "val"


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 0
    log_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        return _describe(_strip_optional(tp)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    if _is_optional(tp):
        return None if value is None else _coerce(key, value, _strip_optional(tp))
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string; accept it as the number it plainly is
            return float(value)
        except ValueError:
            pass
    elif tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: got {value!r}, expected {_describe(tp)}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        kwargs[name] = _build(tp, value, key + ".") if dataclasses.is_dataclass(tp) else _coerce(key, value, tp)
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.model.alpha_train >= 1.0, "model.alpha_train", "must be >= 1 (BoostLU boosts positives)"),
        (cfg.model.alpha_eval >= 1.0, "model.alpha_eval", "must be >= 1"),
        (cfg.data.image_size >= 32, "data.image_size", "must be >= 32"),
        (cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
        (cfg.data.workers >= 0, "data.workers", "must be >= 0"),
        (cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1"),
        (not cfg.data.resampled or cfg.data.epoch_samples, "data.epoch_samples", "is required when data.resampled"),
        (cfg.loss.delta_rel is None or 0 < cfg.loss.delta_rel < 1, "loss.delta_rel", "must be in (0, 1)"),
        (cfg.optim.lr > 0, "optim.lr", "must be > 0"),
        (cfg.optim.epochs >= 1, "optim.epochs", "must be >= 1"),
        (cfg.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"),
        (cfg.eval.groups >= 0, "eval.groups", "must be >= 0"),
        (cfg.engine.engine == "deepspeed" or cfg.engine.zero_stage == 0, "engine.zero_stage",
         "needs engine.engine=deepspeed"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings to (key, value); the value is read as a YAML scalar, never executed."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key.strip()}: override value {raw!r} is not a plain YAML value ({e})") from None
        parsed.append((key.strip(), value))
    return parsed


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """A config file as a dict, composed from its ``base:`` files (paths relative to the file).

    ``base`` is one file or a list of files, merged in order underneath the file's own keys: with
    ``base: [base.yaml, ../rows/LL-R.yaml]`` the dataset file is laid down first, the row file on top of it,
    and any key in this file on top of both.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' includes itself")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    bases = tree.pop("base", None)
    if bases is None:
        return tree
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of file names, got {bases!r}")
    composed: dict = {}
    for base in bases:
        composed = _merge(composed, read_yaml_tree(path.parent / base, _seen + (path.resolve(),)))
    return _merge(composed, tree)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Load, override and validate a config; raises ConfigError naming the file and key on any problem."""
    tree: dict = read_yaml_tree(path) if path is not None else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        cfg = _build(TrainConfig, tree, "")
        _validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (YAML) so that a run folder says exactly what produced it."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
