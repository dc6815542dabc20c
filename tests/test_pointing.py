"""The pointing game: synthetic shards record where objects are without changing an image, the hit rule matches a
plain-loop reference on hand-made CAMs, and the command runs end to end on tiny shards and a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bgtrain import checkpoint as ckpt
from bgtrain.config import load_config, to_dict
from bgtrain.explain.__main__ import main
from bgtrain.explain.pointing import pointing_game, score_pairs
from shards.format import decode_labels
from shards.synthetic import build, render, render_objects
from tests.conftest import REPO

# sha256 of render()'s pixels, taken before render_objects existed: recording objects must not move a pixel.
GOLDEN = [((0, [0], 64), "0ec1cf5f1b21fd2112d77d515bcfdd5b8da37f8eaab1448fc7884806058cffca"),
          ((1, [1, 3, 5], 64), "de50b95eee1f45e6577a54d0d1a7f932855c38e6ce285a08519608ed0481154f"),
          ((7, [2, 6], 96), "766b62586302e1075497bb325aebab17eb907a6d0170252674deda4c218b360d"),
          ((3, [0, 1, 2, 3], 32), "d8fb09f3924a189755708ff15d2f9e28217bbecd7c5caabe740d0820a08479a6")]


def _pixels_sha(img) -> str:
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- the generator

@pytest.mark.parametrize(("args", "digest"), GOLDEN)
def test_render_with_objects_draws_the_same_pixels(args, digest) -> None:
    seed, classes, size = args
    plain = render(classes, size, np.random.default_rng([seed, 1, 5]))
    img, objects = render_objects(classes, size, np.random.default_rng([seed, 1, 5]))
    assert _pixels_sha(plain) == digest and _pixels_sha(img) == digest
    assert [int(o[0]) for o in objects] == classes                   # one object per class, in drawing order
    for _, cx, cy, r in objects:
        assert 0.12 * size <= r <= 0.22 * size
        assert r <= cx <= size - r and r <= cy <= size - r           # the whole object is inside the image


def test_render_objects_consumes_the_rng_like_render() -> None:
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    render([0, 2], 48, a)
    render_objects([0, 2], 48, b)
    assert a.integers(1 << 30) == b.integers(1 << 30)                # the next image of a stream is unchanged


# ----------------------------------------------------------------------------------------------- the rule

def reference(cam: np.ndarray, cx: float, cy: float, r: float, width: int, height: int) -> tuple[bool, float]:
    """Plain loops: pixel k's centre is at k, cell (i, j) spans [j*W/w, (j+1)*W/w) x [i*H/h, (i+1)*H/h)."""
    h, w = cam.shape
    cell_w, cell_h = width / w, height / h
    tol = max(cell_w, cell_h) / 2

    def inside(i: int, j: int) -> bool:
        x = j * cell_w + cell_w / 2 - 0.5
        y = i * cell_h + cell_h / 2 - 0.5
        return math.sqrt((x - cx) ** 2 + (y - cy) ** 2) <= r + tol

    best = (0, 0)
    for i in range(h):
        for j in range(w):
            if cam[i, j] > cam[best]:                                # strict: ties keep the first cell
                best = (i, j)
    cells = [inside(i, j) for i in range(h) for j in range(w)]
    return inside(*best), sum(cells) / len(cells)


def _peak_at(i: int, j: int, shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    cam = np.zeros(shape)
    cam[i, j] = 3.0
    return cam


# 4x4 CAM on 64 px: 16 px cells with centres at 7.5, 23.5, 39.5, 55.5; tolerance 8 px.
CASES = [
    (_peak_at(2, 2), (40.0, 40.0, 5.0), True),                      # peak on the object
    (_peak_at(0, 0), (40.0, 40.0, 5.0), False),                     # peak far away
    (_peak_at(0, 0), (7.5 + 13.0, 7.5, 5.0), True),                 # distance 13 = r + tolerance: a hit
    (_peak_at(0, 0), (7.5 + 13.01, 7.5, 5.0), False),               # just beyond it
    (_peak_at(3, 1), (23.5, 55.5 - 12.0, 4.0), True),               # rows are y, columns x
    (_peak_at(1, 3), (23.5, 55.5 - 12.0, 4.0), False),
    (np.ones((4, 4)), (7.5, 7.5, 1.0), True),                       # a flat CAM points at its first cell
    (_peak_at(1, 0, (2, 3)), (10.0, 48.0, 4.0), True),              # 2x3 CAM: cells 21.3 x 32 px, tolerance 16
]


@pytest.mark.parametrize(("cam", "obj", "hit"), CASES)
def test_pointing_rule_matches_the_loop_reference(cam, obj, hit) -> None:
    hits, chance = score_pairs(cam[None], np.asarray([obj]), (64, 64))
    ref_hit, ref_chance = reference(cam, *obj, 64, 64)
    assert bool(hits[0]) is hit is ref_hit
    assert chance[0] == pytest.approx(ref_chance)


def test_chance_of_a_one_cell_object_is_one_cell_in_sixteen() -> None:
    hits, chance = score_pairs(np.stack([_peak_at(2, 2), _peak_at(0, 1)]), np.asarray([[39.5, 39.5, 0.5]] * 2),
                               (64, 64))
    assert hits.tolist() == [True, False]
    assert chance.tolist() == [1 / 16, 1 / 16]                      # only its own cell is within 0.5 + 8 px


def test_random_cams_agree_with_the_reference() -> None:
    rng = np.random.default_rng(0)
    cams = rng.normal(size=(50, 3, 5))
    objects = np.column_stack([rng.uniform(0, 80, 50), rng.uniform(0, 48, 50), rng.uniform(2, 15, 50)])
    hits, chance = score_pairs(cams, objects, (80, 48))
    expected = [reference(c, *o, 80, 48) for c, o in zip(cams, objects)]
    assert hits.tolist() == [e[0] for e in expected]
    assert chance.tolist() == pytest.approx([e[1] for e in expected])


# ----------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """4-class synthetic shards with objects.json and an untrained (random) ResNet-18 checkpoint of smoke.yaml."""
    from bgtrain.model import build_model
    root = tmp_path_factory.mktemp("pointing")
    shards = root / "shards"
    build(shards, num_classes=4, n_train=16, n_val=4, n_test=8, size=64, seed=0)
    cfg = load_config(str(REPO / "configs" / "smoke.yaml"), ["model.pretrained=null"])
    path = root / "random.pt"
    ckpt.atomic_save({"engine": {"model": build_model(cfg.model, 4).state_dict()}, "config": to_dict(cfg)}, path)
    return {"root": root, "shards": shards, "checkpoint": path}


def _test_positives(shards: Path) -> dict[str, list[int]]:
    """Full positive labels of the test split, per sample key, read from the tars themselves."""
    out = {}
    for tar_path in sorted((shards / "test").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".lbl"):
                    out[member.name.split(".")[0]] = list(decode_labels(tar.extractfile(member).read()).full_pos)
    return out


def test_objects_file_lists_every_sample_with_its_classes(tiny) -> None:
    positives = _test_positives(tiny["shards"])
    doc = json.loads((tiny["shards"] / "test" / "objects.json").read_text())
    assert doc["size"] == [64, 64] and len(positives) == 8
    assert {k: sorted(int(o[0]) for o in v) for k, v in doc["objects"].items()} == {
        k: sorted(v) for k, v in positives.items()}
    for split in ("train", "val"):
        assert (tiny["shards"] / split / "objects.json").is_file()


def test_pointing_game_scores_every_positive_pair(tiny) -> None:
    positives = _test_positives(tiny["shards"])
    result = pointing_game(tiny["checkpoint"], str(tiny["shards"]), device="cpu")
    assert result["pairs"] == sum(len(v) for v in positives.values()) and result["images"] == 8
    assert result["split"] == "test" and result["cam_size"] == [2, 2] and result["tolerance_px"] == 16.0
    assert 0 <= result["hit_rate"] <= 100 and 0 <= result["chance"] <= 100
    assert sum(c["pairs"] for c in result["per_class"].values()) == result["pairs"]
    assert sum(c["hits"] for c in result["per_class"].values()) == result["hits"]
    assert result["hit_rate"] == pytest.approx(100 * result["hits"] / result["pairs"])
    assert result["alpha"] == 5.0                                     # smoke.yaml's alpha_eval


def test_pointing_cli_at_another_input_size_writes_json(tiny, capsys) -> None:
    out = tiny["root"] / "out"
    assert main(["pointing", "--checkpoint", str(tiny["checkpoint"]), "--shards", str(tiny["shards"]),
                 "--max-images", "3", "--size", "128", "--device", "cpu", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "chance" in line
    result = json.loads((out / "pointing.json").read_text())
    assert result["images"] == 3 and result["input_size"] == 128
    assert result["cam_size"] == [4, 4] and result["tolerance_px"] == 8.0   # cells of the 64 px image the objects use


def test_missing_objects_file_is_one_line_naming_it(tiny, tmp_path, capsys) -> None:
    old = tmp_path / "old"
    build(old, num_classes=4, n_train=4, n_val=0, n_test=2, size=32, seed=1)
    (old / "test" / "objects.json").unlink()                          # as written before objects were recorded
    assert main(["pointing", "--checkpoint", str(tiny["checkpoint"]), "--shards", str(old), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(old / "test" / "objects.json") in err
    assert "older" in err and "rebuild" in err
