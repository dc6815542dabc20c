"""Every config key documents itself (help, range) and the README's key table is generated from it; every numeric key
is checked against its range at load, with one line naming the key and the range.
"""
from __future__ import annotations

import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from bgtrain.config import ConfigError, Range, TrainConfig, config_keys, load_config, to_dict
from bgtrain.config_docs import BEGIN, END, markdown_table, replace_table

REPO = Path(__file__).resolve().parents[1]
KEYS = config_keys()


def _numeric(tp: typing.Any) -> bool:
    return any(a in (int, float) for a in (typing.get_args(tp) or (tp,)))


def test_keys_cover_every_leaf_of_the_config() -> None:
    def leaves(tree: dict, prefix: str = "") -> list[str]:
        out: list[str] = []
        for k, v in tree.items():
            out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
        return out
    assert [k.name for k in KEYS] == leaves(to_dict(TrainConfig()))


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_every_key_has_help_and_every_number_a_range(key) -> None:
    assert key.help.strip(), f"{key.name}: no help text (use bgtrain.config.setting)"
    if _numeric(key.type) and typing.get_origin(key.type) is not typing.Literal:
        assert isinstance(key.range, Range), f"{key.name}: a number needs a range"
        assert key.default is None or key.default in key.range, f"{key.name}: default outside its own range"


def test_readme_table_is_generated_from_the_dataclasses() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme == replace_table(readme, markdown_table()), \
        "README config table differs from bgtrain/config.py: run python -m bgtrain.config_docs --write-readme README.md"
    for key in KEYS:
        assert f"| `{key.name}` |" in readme


def test_replace_table_needs_both_markers() -> None:
    assert replace_table(f"a\n{BEGIN}\nold\n{END}\nb\n", "new\n") == f"a\n{BEGIN}\nnew\n{END}\nb\n"
    with pytest.raises(ValueError, match="expected one"):
        replace_table("no markers here", "new\n")
    with pytest.raises(ValueError, match="expected one"):
        replace_table(f"{END}\n{BEGIN}\n", "new\n")


@pytest.mark.parametrize("override,key,allowed", [
    ("optim.lr=.inf", "optim.lr", "a finite number > 0"),
    ("optim.lr=.nan", "optim.lr", "a finite number > 0"),
    ("optim.lr=-.inf", "optim.lr", "a finite number > 0"),
    ("data.eval_batch_size=0", "data.eval_batch_size", ">= 1"),
    ("data.max_batches=-1", "data.max_batches", ">= 1"),
    ("data.max_batches=0", "data.max_batches", ">= 1"),
    ("seed=-1", "seed", "[0, 2147483647]"),
    ("seed=2147483648", "seed", "[0, 2147483647]"),
    ("log_every=0", "log_every", ">= 1"),
    ("data.workers=-1", "data.workers", ">= 0"),
    ("data.epoch_samples=0", "data.epoch_samples", ">= 1"),
    ("data.image_size=16", "data.image_size", ">= 32"),
    ("loss.ls_epsilon=1.5", "loss.ls_epsilon", "[0, 1]"),
    ("loss.asl_gamma_neg=-1", "loss.asl_gamma_neg", ">= 0"),
    ("loss.asl_clip=-0.1", "loss.asl_clip", "[0, 1]"),
    ("loss.expected_positives=0", "loss.expected_positives", "> 0"),
    ("loss.em_alpha=-0.1", "loss.em_alpha", ">= 0"),
    ("loss.apl_warmup_epochs=-1", "loss.apl_warmup_epochs", ">= 0"),
    ("loss.state_max_gib=0", "loss.state_max_gib", "> 0"),
    ("optim.head_lr_mult=0", "optim.head_lr_mult", "> 0"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay", ">= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip", ">= 0"),
    ("optim.grad_accum=0", "optim.grad_accum", ">= 1"),
    ("engine.timeout_s=0", "engine.timeout_s", ">= 1"),
    ("checkpoint.every_steps=-5", "checkpoint.every_steps", ">= 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last", ">= 1"),
    ("eval.groups=-2", "eval.groups", ">= 0"),
    ("model.alpha_eval=.inf", "model.alpha_eval", "a finite number >= 1"),
])
def test_out_of_range_fails_at_load_naming_key_and_range(override: str, key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "smoke.yaml", [override])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{REPO / 'configs' / 'smoke.yaml'}: {key}: got ")
    assert msg.endswith(f"allowed {allowed}")


@pytest.mark.parametrize("key", [k for k in KEYS if k.range is not None], ids=lambda k: k.name)
def test_range_edges_are_accepted(key) -> None:
    """Each closed bound is itself allowed (no off-by-one in a rule); an open bound is not."""
    is_int = int in (typing.get_args(key.type) or (key.type,))
    for bound, is_open, step in ((key.range.low, key.range.low_open, 1), (key.range.high, key.range.high_open, -1)):
        if bound is None:
            continue
        value = int(bound) if is_int else float(bound)
        if is_open:
            with pytest.raises(ConfigError, match=key.name.replace(".", r"\.")):
                load_config(None, [f"{key.name}={value}"])
            value = value + step if is_int else value + step * 1e-3
        assert load_config(None, [f"{key.name}={value}"]) is not None


def test_range_membership() -> None:
    r = Range(0.0, 1.0, low_open=True)
    assert 0.5 in r and 1.0 in r and 0.0 not in r and 1.5 not in r and math.inf not in r and math.nan not in r
    assert str(r) == "(0, 1]" and str(Range(low=1)) == ">= 1" and str(Range(high=2.5, high_open=True)) == "< 2.5"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bgtrain.config_docs", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_the_resolved_config_and_the_table() -> None:
    proc = _cli("configs/voc/LL-R_BoostLU.yaml", "data.shards=data/voc2")
    assert proc.returncode == 0, proc.stderr
    tree = yaml.safe_load(proc.stdout)
    assert tree == to_dict(load_config(REPO / "configs/voc/LL-R_BoostLU.yaml", ["data.shards=data/voc2"]))
    assert tree["loss"]["scheme"] == "LL-R" and tree["data"]["shards"] == "data/voc2"
    proc = _cli("--markdown")
    assert proc.returncode == 0 and proc.stdout == markdown_table()


def test_cli_bad_config_is_one_line() -> None:
    proc = _cli("configs/smoke.yaml", "optim.lr=.inf")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "config error: configs/smoke.yaml: optim.lr: got inf, allowed a finite number > 0"


def test_cli_writes_the_readme_block(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{BEGIN}\nstale\n{END}\nafter\n")
    assert _cli("--write-readme", str(readme)).returncode == 0
    assert readme.read_text() == f"# x\n{BEGIN}\n{markdown_table()}{END}\nafter\n"
    readme.write_text("no markers\n")
    proc = _cli("--write-readme", str(readme))
    assert proc.returncode == 1 and str(readme) in proc.stderr and "Traceback" not in proc.stderr
