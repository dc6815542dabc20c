"""Explanations (issue 8): overlays are real PNGs of the image's size, the gap statistics equal hand computations,
and both CLIs run end to end on tiny checkpoints trained with the real trainer (full labels, and AN).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bgtrain.checkpoint import load_model_for_eval
from bgtrain.explain.__main__ import main
from bgtrain.explain.gap import average_ranks, pair_statistics, spearman_rows, summarise, tail_count, tail_means
from bgtrain.explain.overlay import choose_classes, jet
from tests.conftest import REPO, run_together

SIZE = 64


# ----------------------------------------------------------------------------------------------- hand computations

def test_average_ranks_give_ties_their_mean_rank() -> None:
    # [3, 1, 2, 2]: 1 is rank 1, the two 2s share ranks 2 and 3 -> 2.5, 3 is rank 4.
    assert average_ranks(np.array([[3.0, 1.0, 2.0, 2.0]])).tolist() == [[4.0, 1.0, 2.5, 2.5]]
    assert average_ranks(np.array([[5.0, 5.0, 5.0]])).tolist() == [[2.0, 2.0, 2.0]]


def test_spearman_of_2x2_cams_matches_hand_computation() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, -1)       # ranks 1 2 3 4
    b = np.array([[0.1, 0.7], [0.5, 0.9]]).reshape(1, -1)       # ranks 1 3 2 4: d^2 = 0+1+1+0 = 2
    assert spearman_rows(a, b)[0] == pytest.approx(1 - 6 * 2 / (4 * (16 - 1)))  # 0.8, no ties
    assert spearman_rows(a, -a)[0] == pytest.approx(-1.0)
    assert np.isnan(spearman_rows(a, np.ones((1, 4)))[0])        # a constant map has no ranking


def test_spearman_with_ties_is_pearson_of_average_ranks() -> None:
    a = np.array([[1.0, 2.0, 2.0, 4.0]])    # ranks 1, 2.5, 2.5, 4 -> deviations -1.5, 0, 0, 1.5
    b = np.array([[1.0, 2.0, 3.0, 4.0]])    # ranks 1, 2, 3, 4     -> deviations -1.5, -.5, .5, 1.5
    # covariance 2.25 + 2.25 = 4.5; sum of squares 4.5 and 5.0
    assert spearman_rows(a, b)[0] == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert spearman_rows(np.vstack([a, b]), np.vstack([b, b])).tolist() == pytest.approx(
        [4.5 / math.sqrt(22.5), 1.0])


def test_top_and_bottom_five_percent_of_a_14x14_cam() -> None:
    cam = np.arange(196, dtype=np.float64)[::-1].reshape(1, 196)    # a 14x14 map, as at 448 px
    assert tail_count(196) == 10                                     # ceil(0.05 * 196 = 9.8)
    top, bottom = tail_means(cam)
    assert top[0] == pytest.approx(np.mean(np.arange(186, 196)))     # 190.5
    assert bottom[0] == pytest.approx(np.mean(np.arange(0, 10)))     # 4.5
    assert tail_count(16) == 1 and tail_count(20) == 1 and tail_count(40) == 2


def test_pair_statistics_on_a_4x4_cam_match_hand_values() -> None:
    a = np.array([[-2.0, -1.0, 0.5, 3.0, 1.0, 2.0, -0.5, 0.0, 4.0, -3.0, 1.5, 2.5, 0.25, -1.5, 3.5, 0.75]])
    b = a / 2                                                        # same ranking, half the strength
    stats = pair_statistics(a, b, alpha_a=1.0, alpha_b=5.0)          # L = 16: one value per 5% tail
    assert stats["spearman"][0] == pytest.approx(1.0)
    assert (stats["top5_a"][0], stats["bottom5_a"][0]) == (4.0, -3.0)
    assert (stats["top5_b"][0], stats["bottom5_b"][0]) == (2.0, -1.5)
    assert stats["top5_boosted_a"][0] == 4.0                         # alpha 1 changes nothing
    assert stats["top5_boosted_b"][0] == 10.0                        # 5 * 2.0: BoostLU scales positives
    assert stats["bottom5_boosted_b"][0] == -1.5                     # and leaves negatives alone


def test_summary_counts_where_b_is_lower() -> None:
    pairs = {"spearman": np.array([1.0, 0.5, np.nan])}
    for name in ("top5", "bottom5", "top5_boosted", "bottom5_boosted"):
        pairs[f"{name}_a"] = np.array([1.0, 2.0, 3.0])
        pairs[f"{name}_b"] = np.array([0.5, 2.5, 1.0])
    out = summarise(pairs)
    assert out["spearman"] == {"mean": 0.75, "median": 0.75, "std": 0.25, "count": 2}   # NaN left out
    assert out["a"]["top5"]["mean"] == 2.0 and out["b"]["top5"]["median"] == 1.0
    assert out["top5_b_lower_fraction"] == pytest.approx(2 / 3)
    assert out["top5_b_minus_a"]["mean"] == pytest.approx((-0.5 + 0.5 - 2.0) / 3)


def test_jet_runs_from_blue_through_green_to_red() -> None:
    assert jet(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]
    assert jet(np.zeros((3, 5))).shape == (3, 5, 3)


def test_choose_classes_takes_topk_then_names_without_repeats() -> None:
    names = ["cat", "dog", "car", "tree"]
    scores = np.array([0.1, 0.9, 0.5, 0.3])
    assert choose_classes(["top2"], names, scores) == [1, 2]
    assert choose_classes(["top2", "cat", "dog"], names, scores) == [1, 2, 0]
    with pytest.raises(ValueError, match="--classes bird"):
        choose_classes(["bird"], names, scores)


# ----------------------------------------------------------------------------------------------- end to end

def _train_command(shards: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "bgtrain.train", "--config", str(REPO / "configs/smoke.yaml"),
            f"data.shards={shards}", f"out_dir={out}", "optim.epochs=1", "data.workers=0", "model.alpha_train=1.0",
            *overrides]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Tiny shards and two 1-epoch checkpoints: full labels (scheme full) and single positive (AN)."""
    from shards.synthetic import build
    root = tmp_path_factory.mktemp("explain")
    shards = root / "shards"
    build(shards, num_classes=6, n_train=64, n_val=16, n_test=12, size=SIZE, seed=0, shard_size=40)
    runs = {"full": ("loss.scheme=full", "data.labels=full", "name=full"), "an": ("loss.scheme=AN", "name=AN")}
    procs = run_together([_train_command(shards, root / name, *overrides) for name, overrides in runs.items()],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {"root": root, "shards": shards, **{name: root / name / "checkpoints" / "best.pt" for name in runs}}


def test_overlay_cli_writes_pngs_of_the_image_size(tiny) -> None:
    out = tiny["root"] / "overlays"
    assert main(["overlay", "--checkpoint", str(tiny["an"]), "--shards", str(tiny["shards"]), "--split", "test",
                 "--count", "3", "--classes", "top2", "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["alpha"] == 5.0 and index["size"] == SIZE            # smoke.yaml: alpha_eval 5, 64 px
    assert len(index["images"]) == 3
    for entry in index["images"]:
        assert len(entry["overlays"]) == 2
        for overlay in entry["overlays"]:
            with Image.open(out / overlay["file"]) as im:
                im.verify()                                          # a complete, valid PNG
            with Image.open(out / overlay["file"]) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (SIZE, SIZE))
        with Image.open(out / entry["sheet"]) as im:
            assert (im.format, im.size) == ("PNG", (SIZE * 3, SIZE))  # the input and its 2 overlays


def test_overlay_of_image_files_scores_with_the_given_alpha(tiny, tmp_path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "overlays"
    assert main(["overlay", "--checkpoint", str(tiny["full"]), "--images", str(path), "--size", "96",
                 "--alpha", "1", "--classes", "disc_000", "top1", "--out", str(out)]) == 0
    entry = json.loads((out / "index.json").read_text())["images"][0]
    assert [o["class"] for o in entry["overlays"]][0] == "disc_000"
    with Image.open(out / entry["overlays"][0]["file"]) as im:
        assert im.size == (96, 96)
    # Independent check of the score: the model's own forward pass (BoostLU + GAP) at alpha 1.
    model, _ = load_model_for_eval(tiny["full"])
    from bgtrain.data.common import normalise
    from bgtrain.data.wds import decode_image
    x = normalise(torch.from_numpy(np.array(decode_image(path.read_bytes(), 96, False)))[None], torch.device("cpu"),
                  torch.float32, False)
    model.alpha_eval = 1.0
    with torch.no_grad():
        expected = torch.sigmoid(model(x))[0, 0].item()
    assert entry["overlays"][0]["score"] == pytest.approx(expected, abs=1e-5)


def test_overlay_cli_names_a_bad_class(tiny, tmp_path, capsys) -> None:
    assert main(["overlay", "--checkpoint", str(tiny["an"]), "--shards", str(tiny["shards"]), "--count", "1",
                 "--classes", "unicorn", "--out", str(tmp_path)]) == 2
    assert "--classes unicorn" in capsys.readouterr().err


def test_gap_cli_writes_summary_and_histograms(tiny) -> None:
    out = tiny["root"] / "gap"
    assert main(["gap", "--a", str(tiny["full"]), "--b", str(tiny["an"]), "--shards", str(tiny["shards"]),
                 "--split", "test", "--max-images", "10", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 10 and summary["cam_size"] == [2, 2] and summary["tail_count"] == 1
    assert summary["a"]["scheme"] == "full" and summary["b"]["scheme"] == "AN"
    for kind in ("positive", "negative"):
        part = summary[kind]
        assert set(part["spearman"]) == {"mean", "median", "std", "count"}
        for model in ("a", "b"):
            assert set(part[model]) == {"top5", "bottom5", "top5_boosted", "bottom5_boosted"}
            assert part[model]["top5"]["count"] == part["pairs"]
            assert part[model]["top5"]["mean"] >= part[model]["bottom5"]["mean"]
    # Every known label of 10 images is either positive or negative (synthetic test labels are full).
    assert summary["positive"]["pairs"] + summary["negative"]["pairs"] == 10 * 6
    for name in summary["histograms"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    rows = (out / "pairs_positive.csv").read_text().strip().splitlines()
    assert len(rows) == summary["positive"]["pairs"] + 1


def test_gap_of_a_model_with_itself_is_perfect_agreement(tiny) -> None:
    out = tiny["root"] / "gap_self"
    assert main(["gap", "--a", str(tiny["an"]), "--b", str(tiny["an"]), "--shards", str(tiny["shards"]),
                 "--max-images", "4", "--out", str(out)]) == 0
    positive = json.loads((out / "summary.json").read_text())["positive"]
    assert positive["spearman"]["mean"] == pytest.approx(1.0)
    assert positive["top5_b_minus_a"]["mean"] == 0.0 and positive["bottom5_b_minus_a"]["mean"] == 0.0


def test_checkpoint_config_from_an_older_bgtrain_loads_with_a_warning() -> None:
    from bgtrain.checkpoint import config_from_checkpoint
    from bgtrain.config import TrainConfig, to_dict
    tree = to_dict(TrainConfig())
    tree["loss"]["retired_setting"] = 1.0                            # a key a later config.py dropped
    tree["model"]["alpha_eval"] = 3.0
    with pytest.warns(UserWarning, match="loss.retired_setting"):
        cfg = config_from_checkpoint({"config": tree})
    assert cfg.model.alpha_eval == 3.0
