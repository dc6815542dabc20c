"""The reproduction runner follows the paper's protocol: "BoostLU in inference only" is one AN model (its best
epoch selected at alpha 1) evaluated at alpha 1 and at alpha 5, and ``--pretrain`` starts every row from one
exported trunk. Test mAPs are checked against scikit-learn on the same checkpoint's scores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score

from bgtrain.checkpoint import load_model_for_eval
from bgtrain.config import ConfigError, load_config
from bgtrain.data import build_loader
from bgtrain.distributed import WorldInfo
from bgtrain.predict import predict
from bgtrain.reproduce import check_eval_only
from tests.conftest import REPO

TINY = {"model": {"depth": 18, "alpha_train": 1.0, "alpha_eval": 1.0, "channels_last": False},
        "data": {"image_size": 64, "batch_size": 16, "workers": 0, "eval_batch_size": 50},
        "loss": {"scheme": "AN"}, "optim": {"lr": 1.0e-4, "head_lr_mult": 10.0, "epochs": 2},
        "engine": {"timeout_s": 60}, "checkpoint": {"keep_last": 1}}


def _write_configs(root: Path, dataset: str, rows: dict[str, dict]) -> Path:
    folder = root / dataset
    folder.mkdir(parents=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(TINY))
    for row, tree in rows.items():
        (folder / f"{row}.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "name": row, **tree}))
    return root


def _reproduce(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # A private extension cache: a rank never waits on another process's kernel build (this test builds none).
    env = {**os.environ, "BGTRAIN_OPS_CACHE": str(tmp_path / "ops-cache")}
    return subprocess.run([sys.executable, "-m", "bgtrain.reproduce", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=1500, env=env)


def _sklearn_map(checkpoint: Path, shards: Path, alpha: float) -> tuple[float, torch.Tensor]:
    """Test mAP (%) of a checkpoint at BoostLU ``alpha``, every class with a positive, AP by scikit-learn."""
    model, cfg = load_model_for_eval(checkpoint)
    model.alpha_eval = alpha
    cfg.data.shards = str(shards)
    loader = build_loader(cfg.data, "test", WorldInfo(), torch.device("cpu"), train=False, seed=cfg.seed,
                          channels_last=False)
    scores, labels = predict(model, loader)
    y, s = (labels.numpy() == 1), scores.double().numpy()
    assert y.any(0).all(), "every test class should have a positive in the smoke data"
    return 100 * float(np.mean([average_precision_score(y[:, c], s[:, c]) for c in range(y.shape[1])])), scores


@pytest.mark.slow
@pytest.mark.distributed
def test_inference_only_trains_once_and_evaluates_that_checkpoint_at_alpha_1_and_5(smoke_shards, tmp_path):
    # Full labels and a larger lr, so that two short epochs leave positive CAM cells for BoostLU to act on.
    learnt = {"data": {"labels": "full"}, "loss": {"scheme": "full"}, "optim": {"lr": 1.0e-3}}
    configs = _write_configs(tmp_path / "configs", "mini", {
        "AN_alpha1": learnt,
        "AN_BoostLU_inference": {**learnt, "model": {"alpha_eval": 5.0}}})
    out = tmp_path / "runs"
    proc = _reproduce(["--table", "inference_only", "--dataset", "mini", "--configs", str(configs),
                       "--shards", str(smoke_shards), "--out", str(out), "--nproc", "2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    trained, evaluated = out / "AN_alpha1", out / "AN_BoostLU_inference"
    assert not (evaluated / "checkpoints").exists() and not (evaluated / "metrics.jsonl").exists(), "trained twice"
    best = trained / "checkpoints" / "best.pt"
    r1 = json.loads((trained / "results.json").read_text())
    r5 = json.loads((evaluated / "results.json").read_text())
    assert r5["evaluated_checkpoint"] == str(best) and r5["selected_at_alpha"] == 1.0 and r5["alpha_eval"] == 5.0
    assert (r5["best_epoch"], r5["val_map"]) == (r1["best_epoch"], r1["val_map"])

    map1, scores1 = _sklearn_map(best, smoke_shards, 1.0)
    map5, scores5 = _sklearn_map(best, smoke_shards, 5.0)
    assert r1["test_map"] == pytest.approx(map1, abs=1e-6)
    assert r5["test_map"] == pytest.approx(map5, abs=1e-6)
    assert not torch.equal(scores1, scores5), "alpha 5 left every score unchanged: BoostLU was not applied"
    table = json.loads((out / "inference_only.json").read_text())
    assert [r["row"] for r in table] == ["AN_alpha1", "AN_BoostLU_inference"]
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in table)


@pytest.mark.slow
@pytest.mark.distributed
def test_pretrain_trains_once_exports_the_trunk_and_every_row_starts_from_it(smoke_shards, tmp_path):
    configs = _write_configs(tmp_path / "configs", "demo", {
        "pretrain": {"data": {"labels": "full"}, "loss": {"scheme": "full"}, "optim": {"epochs": 1}},
        "AN": {"optim": {"epochs": 1}},
        "AN_BoostLU_inference": {"model": {"alpha_eval": 5.0}, "optim": {"epochs": 1}}})
    out = tmp_path / "runs"
    proc = _reproduce(["--table", "demo", "--configs", str(configs), "--shards", str(smoke_shards),
                       "--pretrain", str(smoke_shards), "--rows", "AN", "AN_BoostLU_inference", "--out", str(out),
                       "--nproc", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trunk = out / "pretrain" / "trunk.pt"
    state = torch.load(trunk, weights_only=True)
    assert "layer4.1.bn2.running_var" in state and not any(k.startswith("fc.") for k in state)
    assert json.loads((out / "pretrain" / "results.json").read_text())["scheme"] == "full"
    # The trunk's quality is printed with its localisation: the pointing game on the pretraining set's test split.
    pointing = json.loads((out / "pretrain" / "pointing.json").read_text())
    objects = json.loads((smoke_shards / "test" / "objects.json").read_text())["objects"]
    assert pointing["pairs"] == sum(len(drawn) for drawn in objects.values()) and 0 <= pointing["hit_rate"] <= 100
    assert "the pointing game hits" in proc.stdout
    run_cfg = yaml.safe_load((out / "AN" / "config.yaml").read_text())
    assert run_cfg["model"]["pretrained"] == str(trunk)
    assert "Every row started from the trunk pretrained on" in (out / "demo.md").read_text()
    assert json.loads((out / "AN_BoostLU_inference" / "results.json").read_text())["alpha_eval"] == 5.0


def test_an_evaluation_only_row_must_match_its_source_but_for_alpha_eval(tmp_path):
    configs = _write_configs(tmp_path, "mini", {"AN_alpha1": {}, "ok": {"model": {"alpha_eval": 5.0}},
                                                "bad": {"model": {"alpha_train": 5.0, "alpha_eval": 5.0}}})
    source = load_config(configs / "mini" / "AN_alpha1.yaml")
    check_eval_only("ok", load_config(configs / "mini" / "ok.yaml"), "AN_alpha1", source)
    with pytest.raises(ConfigError, match="model.alpha_train is 5.0 there and 1.0 in AN_alpha1"):
        check_eval_only("bad", load_config(configs / "mini" / "bad.yaml"), "AN_alpha1", source)


def test_an_evaluation_only_row_without_its_source_fails_in_one_line(smoke_shards, tmp_path):
    configs = _write_configs(tmp_path / "configs", "mini", {
        "AN_alpha1": {}, "AN_BoostLU_inference": {"model": {"alpha_eval": 5.0}}})
    proc = _reproduce(["--table", "inference_only", "--dataset", "mini", "--configs", str(configs),
                       "--shards", str(smoke_shards), "--rows", "AN_BoostLU_inference", "--out", str(tmp_path / "r")],
                      tmp_path)
    assert proc.returncode == 2 and "add AN_alpha1 to --rows" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
