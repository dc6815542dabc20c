"""The paper configs are compositions (a dataset's base.yaml plus a shared row file), and every one of them
resolves to exactly the config it resolved to before the composition (tests/fixtures/resolved_configs.json, dumped
from the per-dataset copies before they were replaced).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from bgtrain.config import ConfigError, TrainConfig, load_config, read_yaml_tree, to_dict

REPO = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((REPO / "tests" / "fixtures" / "resolved_configs.json").read_text())

# Deliberate changes since the fixture was dumped, per file: {key: (before, after)}.
# OpenImages as the reference (issue 16): its models.py builds a ResNet-101 (so ImageNet ResNet-101 weights), and its
# compute_metrics_openimages keeps AP 0 for a class with known labels but no positive.
OPENIMAGES_AS_REFERENCE = {
    "model.depth": (50, 101),
    "model.pretrained": ("weights/resnet50-imagenet.pth", "weights/resnet101-imagenet.pth"),
    "eval.no_positive": ("skip", "zero"),
}
# The 64-GPU choice (configs/openimages/base.yaml): keys added after the fixture was dumped, "before" their default.
OPENIMAGES_MULTI_GPU = {"optim.lr_scaling": ("none", "sqrt"), "optim.warmup_steps": (0, 300)}
OPENIMAGES = sorted(p for p in FIXTURE if p.startswith("configs/openimages"))
CHANGES: dict[str, dict[str, tuple]] = {p: {**OPENIMAGES_AS_REFERENCE, **OPENIMAGES_MULTI_GPU} for p in OPENIMAGES}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


DEFAULTS = _flat(to_dict(TrainConfig()))


def test_fixture_covers_every_config_outside_demo() -> None:
    # make demo's and make paper's configs came after the fixture; test_paper_configs_are_the_demo_recipe covers them
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
               if p.parent.name not in ("demo", "paper", "rows")}
    assert on_disk == set(FIXTURE)


@pytest.mark.parametrize("path", sorted(FIXTURE))
def test_config_resolves_as_before(path: str) -> None:
    now = _flat(to_dict(load_config(REPO / path)))
    expected = dict(FIXTURE[path])
    for key, (before, after) in CHANGES.get(path, {}).items():
        assert expected.get(key, DEFAULTS[key]) == before, f"{path}: the fixture no longer has {key}={before!r}"
        expected[key] = after
    for key in set(now) - set(expected):   # a key added to the dataclasses later: no config may set it
        assert now[key] == DEFAULTS[key], f"{path}: sets {key}, which the fixture does not know"
        expected[key] = DEFAULTS[key]
    assert now == expected


def test_openimages_rows_are_the_reference_setting() -> None:
    assert len(OPENIMAGES) == 8         # base, six rows, and the Slurm script's default
    for path in OPENIMAGES:
        cfg = load_config(REPO / path)
        assert (cfg.model.depth, cfg.eval.no_positive, cfg.eval.groups) == (101, "zero", 5), path
        assert (cfg.data.image_size, cfg.data.batch_size, cfg.optim.lr) == (448, 16, 1e-5), path


def test_no_two_configs_are_copies() -> None:
    """A recipe change is one edit: no two YAML files (outside demo/) set the same keys to the same values."""
    seen: dict[str, str] = {}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if path.parent.name == "demo":
            continue
        own = yaml.safe_load(path.read_text())
        own.pop("base", None)
        if not own:         # a pure composition: its two file names are the whole content
            continue
        key = json.dumps(own, sort_keys=True)
        assert key not in seen, f"{path.relative_to(REPO)} repeats {seen.get(key)}"
        seen[key] = str(path.relative_to(REPO))


def test_paper_configs_are_the_demo_recipe_with_larger_sizes() -> None:
    """make paper may change only sizes, epochs and pretraining length, never the demo's recipe (issue: no tuning)."""
    sizes = {"name", "out_dir", "data.shards", "optim.epochs", "model.pretrained"}
    for path in sorted((REPO / "configs" / "paper").glob("*.yaml")):
        paper = _flat(to_dict(load_config(path)))
        demo = _flat(to_dict(load_config(REPO / "configs" / "demo" / path.name)))
        differ = {key: (demo[key], paper[key]) for key in paper if paper[key] != demo[key]}
        assert set(differ) <= sizes, f"{path.name}: {differ}"
        assert paper["optim.epochs"] == (4 if path.stem == "pretrain" else 16)


def test_every_paper_row_is_a_dataset_plus_a_row_file() -> None:
    for dataset in ("voc", "coco", "nuswide", "cub", "openimages"):
        for path in (REPO / "configs" / dataset).glob("*.yaml"):
            if path.name == "base.yaml":
                continue
            assert f"base: [base.yaml, ../rows/{path.name}]" in path.read_text().splitlines(), path
            assert load_config(path).name == path.stem


def test_base_list_merges_in_order_and_the_file_wins(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\nmodel:\n  depth: 18\n  alpha_train: 2.0\n")
    (tmp_path / "b.yaml").write_text("name: b\nmodel:\n  alpha_train: 3.0\n")
    (tmp_path / "run.yaml").write_text("base: [a.yaml, b.yaml]\nmodel:\n  alpha_eval: 4.0\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.name, cfg.model.depth, cfg.model.alpha_train, cfg.model.alpha_eval) == ("b", 18, 3.0, 4.0)
    (tmp_path / "top.yaml").write_text("base: [b.yaml, a.yaml]\n")
    assert load_config(tmp_path / "top.yaml").model.alpha_train == 2.0      # the later file wins
    (tmp_path / "one.yaml").write_text("base: a.yaml\n")                    # a single name still works
    assert read_yaml_tree(tmp_path / "one.yaml") == {"name": "a", "model": {"depth": 18, "alpha_train": 2.0}}


@pytest.mark.parametrize("base,match", [
    ("[a.yaml, 5]", "base: expected a file name or a list"),
    ("[]", "base: expected a file name or a list"),
    ("{x: 1}", "base: expected a file name or a list"),
    ("[a.yaml, absent.yaml]", "absent.yaml: config file not found"),
    ("[a.yaml, run.yaml]", "'base' includes itself"),
])
def test_bad_base_names_the_file(tmp_path, base: str, match: str) -> None:
    (tmp_path / "a.yaml").write_text("name: a\n")
    (tmp_path / "run.yaml").write_text(f"base: {base}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "run.yaml")


def test_shared_base_twice_is_not_a_cycle(tmp_path) -> None:
    """Two bases that both build on the same recipe (a diamond) compose; only a file that includes itself fails."""
    (tmp_path / "recipe.yaml").write_text("optim:\n  lr: 2.0e-5\n")
    (tmp_path / "a.yaml").write_text("base: recipe.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: recipe.yaml\nseed: 3\n")
    (tmp_path / "run.yaml").write_text("base: [a.yaml, b.yaml]\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.name, cfg.seed, cfg.optim.lr) == ("a", 3, 2e-5)
    assert dataclasses.replace(cfg, name="run", seed=0, optim=TrainConfig().optim) == TrainConfig()
