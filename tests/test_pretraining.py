"""Bring-your-own pretraining: single-object synthetic images, and a checkpoint exported as a torchvision ResNet
state dict that torchvision's own ResNet and ``model.pretrained`` load with the same weights."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from bgtrain.config import ModelConfig
from bgtrain.export_trunk import main as export_main
from bgtrain.model import TORCHVISION_TRUNK, build_model
from shards.format import SampleLabels, decode_labels
from shards.synthetic import build
from tests.conftest import REPO, run_together


def _labels(shards: Path, split: str) -> list[SampleLabels]:
    """Every sample's labels in a split, decoded from the tars' .lbl members (read in memory)."""
    records = []
    for tar in sorted((shards / split).glob("*.tar")):
        with tarfile.open(tar) as t:
            records += [decode_labels(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".lbl")]
    return records


def test_objects_one_writes_single_label_images_in_every_split(tmp_path):
    build(tmp_path, num_classes=6, n_train=40, n_val=10, n_test=12, size=32, seed=3, shard_size=25,
          min_objects=1, max_objects=1)
    for split, n in (("train", 40), ("val", 10), ("test", 12)):
        records = _labels(tmp_path, split)
        assert len(records) == n
        assert all(len(r.full_pos) == 1 for r in records), split
        # One object, so the single observed positive is that object's class.
        assert all(list(r.obs_pos) == list(r.full_pos) for r in records), split
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["build"]["args"]["min_objects"] == manifest["build"]["args"]["max_objects"] == 1


def test_objects_flag_sets_the_exact_count_and_rejects_zero(tmp_path):
    cmd = [sys.executable, "-m", "shards", "synthetic", "--out", str(tmp_path / "two"), "--classes", "5",
           "--train", "12", "--val", "4", "--test", "6", "--size", "32", "--objects", "2"]
    bad_cmd = [str(tmp_path / "zero") if a == str(tmp_path / "two") else a for a in cmd[:-1]] + ["0"]
    proc, bad = run_together([cmd, bad_cmd], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(len(r.full_pos) == 2 for r in _labels(tmp_path / "two", "test"))
    assert bad.returncode == 2 and "min_objects" in bad.stderr and "Traceback" not in bad.stderr


def test_default_build_draws_the_same_labels_as_before_the_objects_option(tmp_path):
    """The default (1..max objects) consumes the generator exactly as before: integers(1, max + 1) per image."""
    build(tmp_path, num_classes=8, n_train=30, n_val=5, n_test=10, size=32, seed=5, shard_size=50)
    rng = np.random.default_rng(5)
    expected = []
    for _ in range(35 + 10):
        k = int(rng.integers(1, 5))
        expected.append(sorted(rng.choice(8, size=k, replace=False).tolist()))
    written = sorted(sorted(r.full_pos) for r in _labels(tmp_path, "test"))  # test images are shard-shuffled
    assert written == sorted(expected[35:])


@pytest.fixture(scope="module")
def checkpoint(smoke_shards, tmp_path_factory) -> Path:
    """A real (tiny) training run's best checkpoint: ResNet-18, 10 classes."""
    out = tmp_path_factory.mktemp("pretrain")
    proc = subprocess.run([sys.executable, "-m", "bgtrain.train", "--config", str(REPO / "configs/smoke.yaml"),
                           f"data.shards={smoke_shards}", f"out_dir={out}", "optim.epochs=1", "data.max_batches=2",
                           "data.workers=0", "checkpoint.every_steps=0", "model.alpha_train=1",
                           "model.alpha_eval=1"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoints" / "best.pt"


def _trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    model = torch.load(checkpoint, weights_only=True)["engine"]["model"]
    return {k.removeprefix("module."): v for k, v in model.items()}


@pytest.mark.slow  # trains a tiny model first (about a minute on 2 cores)
def test_exported_file_loads_into_torchvision_and_camresnet_with_equal_weights(checkpoint, tmp_path, capsys):
    out = tmp_path / "trunk.pt"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    trained = _trained_weights(checkpoint)

    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    tv.load_state_dict(state, strict=True)                      # every torchvision key, nothing else
    for key, value in tv.state_dict().items():
        top, _, rest = key.partition(".")
        source = (f"classifier.{rest}" if top == "fc"
                  else f"trunk.{TORCHVISION_TRUNK.index(top)}.{rest}")
        assert torch.equal(value, trained[source].reshape(value.shape)), key

    cam = build_model(ModelConfig(depth=18, alpha_train=1.0, alpha_eval=1.0, pretrained=str(out),
                                  channels_last=False), 10)
    for key, value in cam.state_dict().items():
        assert torch.equal(value, trained[key]), key
    # With alpha 1 the CAM model is torchvision's GAP + fc: the same logits from the same weights.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cam.eval()(x), tv.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_no_head_export_leaves_fc_out_so_the_classifier_starts_fresh(checkpoint, tmp_path):
    out = tmp_path / "trunk.pt"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--no-head"]) == 0
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    missing, unexpected = torchvision.models.resnet18(weights=None, num_classes=10).load_state_dict(state,
                                                                                                     strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    trained = _trained_weights(checkpoint)
    torch.manual_seed(123)
    cam = build_model(ModelConfig(depth=18, pretrained=str(out), channels_last=False), 10)
    for key, value in cam.trunk.state_dict().items():
        assert torch.equal(value, trained[f"trunk.{key}"]), key
    assert not torch.equal(cam.classifier.weight, trained["classifier.weight"])


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bgtrain.export_trunk", "--checkpoint", str(tmp_path / "no.pt"),
                           "--out", str(tmp_path / "t.pt")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no.pt" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "t.pt").exists()
