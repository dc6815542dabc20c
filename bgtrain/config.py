"""Typed run configuration: a YAML file plus ``key.sub=value`` overrides, validated before any work.

Values are parsed with ``yaml.safe_load`` and never executed. Every field is checked against its
type and, for a number, its range; an unknown key or a bad value raises :class:`ConfigError` naming the key and
what is allowed. Each field carries its help text and range as metadata (:func:`setting`); the README's key table
is generated from them (``python -m bgtrain.config_docs --markdown``). This module has no command line: one
here would import :mod:`bgtrain.config_docs`, which imports this module, so ``python -m`` would load it twice.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bgtrain.storage import is_remote

Backend = Literal["webdataset", "dali"]  # data.backend
Scheme = Literal["full", "AN", "LL-R", "LL-Ct", "LL-Cp", "LS", "ASL", "EPR", "ROLE", "EM", "EM-APL"]


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed."""


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: ``low``/``high`` bounds (None = unbounded), each closed unless ``*_open``.

    A float must also be finite: ``.inf`` and ``.nan`` are never a learning rate or a weight.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        low, high = _bound(self.low), _bound(self.high)
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "any finite number"


def _bound(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else repr(value)


def yaml_scalar(value: Any) -> str:
    """A value as it is written in a config file: ``null``, ``true``, ``1e-5``, ``data/smoke``."""
    if isinstance(value, float):
        return repr(value).replace("e-0", "e-").replace("e+0", "e+")
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> Any:
    """A config key: its default, one line of help (the README table's), and for a number the range it allows."""
    bounded = low is not None or high is not None
    return field(default=default, metadata={"help": help, "range": Range(low, high, low_open, high_open)
                                            if bounded else None})


def section(cls: type, help: str) -> Any:
    """A nested config section (``model:``, ``data:``, ...)."""
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    depth: Literal[18, 34, 50, 101] = setting(50, "ResNet trunk depth (torchvision); the paper: 50, OpenImages 101")
    alpha_train: float = setting(5.0, "BoostLU α in training (1 = plain GAP head)", low=1.0)
    alpha_eval: float = setting(5.0, 'BoostLU α at evaluation ("inference only" = train 1, eval 5)', low=1.0)
    pretrained: str | None = setting(
        None, "local torchvision ResNet state-dict file; fc is reshaped into the 1x1 conv when class counts match; "
              "never downloaded")
    channels_last: bool = setting(True, "channels-last weights and inputs")


@dataclass
class DataConfig:
    shards: str = setting("data/smoke", "shard folder with `manifest.json` (built by `python -m shards`), or its URL: "
                                        "`s3://…`, `gs://…`, `http(s)://…` (credentials and endpoints from the store's "
                                        "standard configuration, e.g. `AWS_ENDPOINT_URL`)")
    backend: Backend = setting("webdataset", "loader backend")
    decode: Literal["cpu", "gpu"] = setting(
        "cpu", "webdataset backend: `cpu` (PIL in loader workers) or `gpu` (nvJPEG via torchvision)")
    labels: Literal["observed", "full"] = setting(
        "observed", "training labels: `observed` (partial / single positive) or `full`")
    image_size: int = setting(448, "square resize in px (no crop, aspect not kept, as the paper)", low=32)
    batch_size: int = setting(16, "per rank; the global batch is batch_size × world × grad_accum", low=1)
    workers: int = setting(2, "loader processes per rank", low=0)
    shuffle_buffer: int = setting(
        256, "samples mixed inside each worker's stream (shards are pre-shuffled and shard order is reshuffled per "
             "epoch)", low=1)
    flip: bool = setting(True, "horizontal flip, a pure function of (seed, epoch, sample id)")
    resampled: bool = setting(False, "draw shards with replacement, nominal epochs of `data.epoch_samples`")
    epoch_samples: int | None = setting(
        None, "global samples per nominal epoch (resampled mode; required there)", low=1)
    max_batches: int | None = setting(None, "cut every training epoch short (smoke tests)", low=1)
    eval_batch_size: int = setting(64, "per rank, validation and test", low=1)
    max_corrupt_fraction: float = setting(
        0.001, "corrupt samples allowed per pass and rank before the run stops, naming the shard", low=0, high=1)
    retry_s: float = setting(
        120.0, "URL shards: seconds of retries (exponential backoff) allowed per read before the run stops, naming "
               "the object; every retry is counted in the `data` records", low=0)
    cache_dir: str | None = setting(
        None, "URL shards: node-local folder keeping fetched shards, verified against the manifest's sha256 and "
              "shared by the node's ranks and loader processes; null reads byte ranges straight from the store",
    )
    cache_gb: float = setting(100.0, "URL shards: size of `data.cache_dir`; least recently used shards go first",
                              low=0, low_open=True)


@dataclass
class LossConfig:
    scheme: Scheme = setting("AN", "training loss (the paper's rows and the single-positive baselines)")
    delta_rel: float | None = setting(
        None, "large-loss rate Δ_rel; null = the paper's default (LL-R 0.005, LL-Ct 0.002, LL-Cp 0.001)",
        low=0.0, high=1.0, low_open=True, high_open=True)
    large_loss_over: Literal["rank", "global"] = setting(
        "rank", "LL-R / LL-Ct / LL-Cp: k and the k-th largest loss per rank's batch (`rank`), or over all ranks' "
                "batches of the step (`global`: one all-gather of k losses per rank and step; selects what one "
                "device with the whole batch would)")
    ls_epsilon: float = setting(0.1, "LS: AN targets smoothed to 1 - ε and ε", low=0.0, high=1.0)
    asl_gamma_neg: float = setting(4.0, "ASL: focusing exponent γ- on negatives", low=0.0)
    asl_gamma_pos: float = setting(1.0, "ASL: focusing exponent γ+ on positives", low=0.0)
    asl_clip: float = setting(0.05, "ASL: probability shift on negatives", low=0.0, high=1.0)
    expected_positives: float | None = setting(
        None, "EPR / ROLE k̂; null = dataset default (VOC 1.5, COCO 2.9, NUS 1.9, CUB 31.4)", low=0.0, low_open=True)
    em_alpha: float | None = setting(
        None, "EM / EM+APL entropy weight; null = the EM+APL paper's per dataset (VOC 0.2, COCO 0.1, NUS 0.1, "
              "CUB 0.01; others 0.1)", low=0.0)
    apl_beta: float | None = setting(
        None, "EM+APL soft-negative weight; null = per dataset (VOC 0.02, COCO 0.9, NUS 0.2, CUB 0.4; others 0.1)",
        low=0.0)
    apl_warmup_epochs: int | None = setting(
        None, "EM+APL epochs before pseudo-labelling; null = per dataset (VOC 5, COCO 5, NUS 4, CUB 3; others 1)",
        low=0)
    state_max_gib: float = setting(
        4.0, "ROLE / EM+APL refuse per-sample tables larger than this (ROLE at OpenImages scale: 67 GiB)",
        low=0.0, low_open=True)


@dataclass
class OptimConfig:
    lr: float = setting(1e-5, "trunk learning rate (Adam)", low=0.0, low_open=True)
    head_lr_mult: float = setting(10.0, "the 1x1 classifier learns at `lr × head_lr_mult`", low=0.0, low_open=True)
    weight_decay: float = setting(0.0, "Adam weight decay (the paper: none)", low=0.0)
    epochs: int = setting(10, "training epochs; epoch 1 is the large-loss warm-up", low=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step (DDP `no_sync` in between)", low=1)
    grad_clip: float = setting(0.0, "max gradient norm; 0 = off", low=0.0)
    reference_batch: int = setting(
        16, "the global batch (data.batch_size × world × optim.grad_accum) that `optim.lr` is for; the paper: 16",
        low=1)
    lr_scaling: Literal["none", "linear", "sqrt"] = setting(
        "none", "lr (both groups) × global batch / `optim.reference_batch` (`linear`), × its square root (`sqrt`), "
                "or as given (`none`, the paper; warns when the global batch differs)")
    warmup_steps: int = setting(
        0, "optimizer steps of linear warm-up from 0: step s (0-based) uses (s + 1) / warmup_steps of the lr; "
           "0 = none (the paper)", low=0)
    schedule: Literal["constant", "cosine"] = setting(
        "constant", "lr after the warm-up: `constant` (the paper) or `cosine` decay to 0 at the run's last "
                    "optimizer step")


@dataclass
class EngineConfig:
    engine: Literal["ddp", "deepspeed"] = setting("ddp", "training engine")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32", "`bf16` = autocast; `fp16` = autocast + GradScaler, GPU only: refused on a CPU device, where it runs "
                "~40x slower than bf16")
    compile: bool = setting(False, "`torch.compile` of the DDP-wrapped model, so DDP's optimizer splits the graph at "
                                   "gradient-bucket boundaries and the all-reduce overlaps the backward (refused with "
                                   "`engine.engine: deepspeed`)")
    sync_bn: bool = setting(False, "SyncBatchNorm under DDP (refused with `engine.engine: deepspeed`)")
    zero_stage: Literal[0, 1, 2] = setting(0, "DeepSpeed ZeRO stage (needs `engine.engine: deepspeed` above 0)")
    tf32: bool = setting(True, "TF32 matmul/cuDNN on GPUs (both engines)")
    deterministic: bool = setting(
        True, "deterministic kernels (`torch.use_deterministic_algorithms`): same seed, same numbers, and a resume "
              "equal to the run that never stopped; `false` on CUDA turns on `cudnn.benchmark` instead (faster "
              "convolutions, runs not bit-reproducible); the GPU cost is measured by `python -m bgtrain.gpu_check`")
    timeout_s: int = setting(
        300, "rendezvous and collective timeout in seconds; a rank that never arrives gets a message naming the "
             "address, and a watchdog ends a process-group start that hangs past it (so `torchrun --max-restarts` "
             "can retry)", low=1)


@dataclass
class CheckpointConfig:
    every_steps: int = setting(0, "also checkpoint every N steps (0 = only at epoch ends)", low=0)
    keep_last: int = setting(2, "step checkpoints kept (plus `best.pt`)", low=1)
    resume: str | None = setting(
        None, "`latest` or a checkpoint path; when null, a torchrun restart (`--max-restarts`) still resumes from "
              "`latest` instead of starting over")
    mirror: str | None = setting(
        None, "an `s3://`, `gs://` or other URL: checkpoints written under `out_dir` are uploaded there in the "
              "background; `resume: latest` falls back to it when `out_dir` has none")


@dataclass
class LogConfig:
    tensorboard: bool = setting(True, "TensorBoard event files under `out_dir/tb/` (rank 0): the metrics.jsonl "
                                      "scalars, and CAM pictures at each epoch end")
    cam_images: int = setting(4, "validation images whose CAM overlays go to TensorBoard at each epoch end "
                                 "(0 = none)", low=0)


@dataclass
class EvalConfig:
    no_positive: Literal["zero", "skip"] = setting(
        "zero", "a class with known labels but no positive: `zero` (the reference, also on OpenImages: AP 0 kept in "
                "the mean) or `skip` (not the reference); a class with no known label is always left out; the "
                "counts are reported")
    groups: int = setting(0, "> 0: also report Durand's group-wise mAP with that many groups (OpenImages: 5)", low=0)
    select_on: Literal["val", "none"] = setting("val", "`val`: best epoch by validation mAP; `none`: last epoch")


@dataclass
class OpsConfig:
    boostlu: Literal["auto", "cuda", "reference"] = setting(
        "auto", "BoostLU op on GPUs: `auto` = the CUDA extension (prebuilt by `python -m bgtrain.ops build`, else "
                "built at start) with a fallback to the torch reference and a warning on every rank; `cuda` = a "
                "missing or failed build is an error naming the cause; `reference` = the torch reference "
                "(`BGTRAIN_BOOSTLU=cuda|cpu|torch` overrides)")


@dataclass
class TrainConfig:
    name: str = setting("run", "run name (results tables)")
    out_dir: str = setting("runs/run", "run folder")
    # numpy's legacy seeding takes seed + rank below 2**32; 2**31 - 1 leaves room for any world size
    seed: int = setting(0, "seeds weights, shard order, shuffle buffers and flips; same seed → same numbers on CPU",
                        low=0, high=2**31 - 1)
    log_every: int = setting(10, "steps between `metrics.jsonl` train lines", low=1)
    device: Literal["auto", "cuda"] = setting(
        "auto", "`auto`: CUDA when a GPU is visible, else CPU processes on gloo; `cuda`: a rank that sees no GPU "
                "stops at start-up, and `reproduce --slurm` / preflight require GPUs (`BGTRAIN_DEVICE=cuda` also)")
    model: ModelConfig = section(ModelConfig, "the network")
    data: DataConfig = section(DataConfig, "shards and the loader")
    loss: LossConfig = section(LossConfig, "the training loss")
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    engine: EngineConfig = section(EngineConfig, "distributed engine and precision")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints and resume")
    eval: EvalConfig = section(EvalConfig, "validation, test and the mAP rules")
    log: LogConfig = section(LogConfig, "what a run writes besides metrics.jsonl")
    ops: OpsConfig = section(OpsConfig, "custom kernels (the BoostLU extension)")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        return _describe(_strip_optional(tp)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


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
        kwargs[name] = _build(tp, value, key + ".") if _is_section(tp) else _coerce(key, value, tp)
    return cls(**kwargs)


@dataclass(frozen=True)
class Key:
    """One leaf key of the config: its dotted name, type, default, help and range."""

    name: str
    type: Any
    default: Any
    help: str
    range: Range | None

    def allowed(self) -> str:
        """What the key accepts, in words: its values, its range or its type, and "or `null`" when optional."""
        tp = _strip_optional(self.type) if _is_optional(self.type) else self.type
        if typing.get_origin(tp) is Literal:
            text = ", ".join(f"`{yaml_scalar(v)}`" for v in typing.get_args(tp))
        elif tp is bool:
            text = "`true`, `false`"
        elif tp in (int, float):
            text = ("integer " if tp is int else "") + str(self.range or Range())
        else:
            text = "text"
        return text + (" or `null`" if _is_optional(self.type) else "")


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[Key]:
    """Every leaf key of a config dataclass, sections expanded, in declaration order."""
    hints = typing.get_type_hints(cls)
    keys: list[Key] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            keys += config_keys(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            keys.append(Key(f"{prefix}{f.name}", tp, default, f.metadata.get("help", ""), f.metadata.get("range")))
    return keys


def _lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    for key in config_keys():
        value = _lookup(cfg, key.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            allowed = key.range or Range()
            if value not in allowed:
                finite = "" if math.isfinite(value) else "a finite number "
                raise ConfigError(f"{key.name}: got {value!r}, allowed {finite}{allowed}")
    if cfg.checkpoint.mirror is not None and not is_remote(cfg.checkpoint.mirror):
        raise ConfigError(f"checkpoint.mirror: got {cfg.checkpoint.mirror!r}, expected a URL (s3://bucket/prefix, "
                          "gs://bucket/prefix, ...); local checkpoints already go to out_dir")
    # rules that tie two keys together
    if cfg.data.resampled and cfg.data.epoch_samples is None:
        raise ConfigError("data.epoch_samples: is required when data.resampled is true")
    if cfg.data.resampled and cfg.loss.scheme == "LL-Cp":
        # LL-Cp's store relies on every sample being read once per epoch, by one rank (bgtrain.labels).
        raise ConfigError("data.resampled: LL-Cp needs exact epochs (each sample read once per epoch); set "
                          "data.resampled=false or choose another loss.scheme")
    if cfg.engine.zero_stage != 0 and cfg.engine.engine != "deepspeed":
        raise ConfigError(f"engine.zero_stage: {cfg.engine.zero_stage} needs engine.engine=deepspeed")
    if cfg.engine.engine == "deepspeed":  # options the DeepSpeed engine cannot honour fail here, not silently
        for name, on in (("engine.compile", cfg.engine.compile), ("engine.sync_bn", cfg.engine.sync_bn)):
            if on:
                raise ConfigError(f"{name}: is not supported with engine.engine=deepspeed; set {name}=false or use "
                                  "engine.engine=ddp")


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


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load, override and validate a config; raises ConfigError naming the file and key on any problem."""
    tree: dict = read_yaml_tree(path) if path is not None else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def from_dict(tree: dict, validate: bool = True) -> TrainConfig:
    """A config from a nested dict (a saved ``config.yaml``, a checkpoint's config), type-checked and validated."""
    cfg = _build(TrainConfig, tree, "")
    if validate:
        _validate(cfg)
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    """The config as a nested dict of plain values."""
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (YAML) so that a run folder says exactly what produced it."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


if __name__ == "__main__":
    raise SystemExit("python -m bgtrain.config: the config command line is python -m bgtrain.config_docs")
