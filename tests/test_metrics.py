"""Per-class AP vs scikit-learn, the mAP no-positive rules, Durand's groups, the report and the benchmark."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from bgtrain.evaluate import average_precision, class_groups, group_map, mean_ap, print_report, report, write_report
from bgtrain.metrics import AP_KERNEL_ENV, ap_with_counts


@pytest.fixture(params=["torch", "cpp"])
def ap_impl(request, monkeypatch):
    """Run an AP test on both implementations: the torch path and the C++ radix-sort kernel."""
    monkeypatch.setenv(AP_KERNEL_ENV, request.param)
    return request.param


def sklearn_per_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Independent reference: sklearn on the known entries of each class, NaN when none is known."""
    out = np.full(scores.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(scores.shape[1]):
            known = labels[:, k] >= 0
            if known.any():
                out[k] = average_precision_score(labels[known, k], scores[known, k])
    return out


def random_case(n: int, c: int, levels: int, seed: int, dtype=np.float32):
    """Scores with heavy ties (multiples of 1/levels) and labels with many unknowns."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, levels + 1, (n, c)) / levels).astype(dtype)
    labels = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, c), p=[0.4, 0.45, 0.15])
    labels[:, 0] = -1  # no known entry
    labels[:, 1][labels[:, 1] == 1] = 0  # known entries, no positive
    labels[:, 2] = np.where(labels[:, 2] >= 0, 1, -1)  # positives only: AP 1
    return scores, labels


@pytest.mark.usefixtures("ap_impl")
@pytest.mark.parametrize("levels", [3, 20, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ap_equals_sklearn_with_ties_and_unknowns(levels, dtype):
    scores, labels = random_case(700, 13, levels, seed=levels, dtype=dtype)
    ours = average_precision(scores, labels)
    assert ours.dtype == torch.float64 and ours.shape == (13,)
    np.testing.assert_allclose(ours.numpy(), sklearn_per_class(scores, labels), rtol=0, atol=1e-12)


@pytest.mark.usefixtures("ap_impl")
def test_ties_are_grouped_like_sklearn():
    # Three entries tie at 0.5 (two positives): precision is taken only after the whole tie, 2/3.
    scores = np.array([[0.5], [0.5], [0.5], [0.1]], np.float32)
    labels = np.array([[1], [0], [1], [0]], np.int8)
    assert average_precision(scores, labels).item() == pytest.approx(2 / 3, abs=1e-15)


@pytest.mark.usefixtures("ap_impl")
def test_class_without_known_entries_is_nan():
    scores, labels = random_case(50, 4, 10, seed=1)
    assert math.isnan(average_precision(scores, labels)[0].item())


@pytest.mark.usefixtures("ap_impl")
def test_class_without_positive_is_zero_with_counts():
    scores, labels = random_case(50, 4, 10, seed=2)
    res = ap_with_counts(scores, labels)
    assert res.ap[1].item() == 0.0 and res.n_pos[1].item() == 0 and res.n_known[1].item() > 0
    assert res.ap[2].item() == 1.0
    np.testing.assert_array_equal(res.n_pos.numpy(), (labels == 1).sum(0))
    np.testing.assert_array_equal(res.n_known.numpy(), (labels >= 0).sum(0))


@pytest.mark.usefixtures("ap_impl")
def test_class_blocks_do_not_change_a_single_bit():
    scores, labels = random_case(400, 11, 7, seed=3)
    whole = average_precision(scores, labels)
    torch.testing.assert_close(average_precision(scores, labels, block_elements=1), whole,
                               rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(average_precision(scores, labels, block_elements=400 * 3), whole,
                               rtol=0, atol=0, equal_nan=True)


@pytest.mark.usefixtures("ap_impl")
def test_row_order_does_not_change_a_single_bit():
    scores, labels = random_case(300, 9, 5, seed=4)
    perm = np.random.default_rng(0).permutation(300)
    torch.testing.assert_close(average_precision(scores[perm], labels[perm]), average_precision(scores, labels),
                               rtol=0, atol=0, equal_nan=True)


@pytest.mark.usefixtures("ap_impl")
def test_infinite_scores_rank_like_extreme_finite_ones():
    # sklearn refuses infinities; AP depends only on the order, so compare with finite stand-ins.
    scores, labels = random_case(200, 5, 10, seed=5)
    scores[:20, 3], scores[20:30, 4] = -np.inf, np.inf
    finite = np.where(np.isneginf(scores), -1.0, np.where(np.isposinf(scores), 2.0, scores)).astype(np.float32)
    np.testing.assert_allclose(average_precision(scores, labels).numpy(), sklearn_per_class(finite, labels),
                               rtol=0, atol=1e-12)


@pytest.mark.usefixtures("ap_impl")
def test_half_precision_and_torch_inputs():
    scores, labels = random_case(300, 6, 30, seed=6)
    ref = sklearn_per_class(scores, labels)
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(scores).to(dtype)
        np.testing.assert_allclose(average_precision(t, torch.from_numpy(labels)).numpy(),
                                   sklearn_per_class(t.float().numpy(), labels), rtol=0, atol=1e-12)
    np.testing.assert_allclose(average_precision(torch.from_numpy(scores), torch.from_numpy(labels)).numpy(), ref,
                               rtol=0, atol=1e-12)


@pytest.mark.usefixtures("ap_impl")
def test_zero_rows_gives_nan_everywhere():
    ap = average_precision(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int8))
    assert ap.shape == (3,) and torch.isnan(ap).all()


@pytest.mark.usefixtures("ap_impl")
@pytest.mark.parametrize("scores,labels,match", [
    (np.zeros((3, 2), np.float32), np.zeros((3, 3), np.int8), "differ in shape"),
    (np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64), "signed int8"),
    (np.full((3, 2), np.nan, np.float32), np.zeros((3, 2), np.int8), "NaN"),
    (np.zeros((3,), np.float32), np.zeros((3,), np.int8), r"\(N, C\)"),
])
def test_bad_inputs_are_named(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        average_precision(scores, labels)


def test_kernel_and_torch_paths_are_bit_identical(monkeypatch):
    """The two implementations sum the same terms in the same order, so `auto` may pick either."""
    rng = np.random.default_rng(11)
    big = rng.integers(0, 40, (900, 37)).astype(np.float32) / 40
    big[rng.random(big.shape) < 0.05] = -0.0  # -0.0 ties with +0.0
    big[:, 5] = np.inf
    big[::7, 6] = -np.inf
    labels = rng.choice(np.array([-1, 0, 1], np.int8), size=big.shape, p=[0.3, 0.6, 0.1])
    labels[:, 7] = -1
    labels[:, 8] = np.where(labels[:, 8] == 1, 0, labels[:, 8])
    s, y = torch.from_numpy(big), torch.from_numpy(labels)
    cases = {
        "row-major": (s, y),
        "column slice (strided rows)": (s[:, 3:29], y[:, 3:29]),
        "class-major view": (s.t().contiguous().t(), y.t().contiguous().t()),
        "every other row": (s[::2], y[::2]),
        "float16": (s.half(), y),
        "no rows": (s[:0], y[:0]),
        "no classes": (s[:, :0], y[:, :0]),
        "continuous scores": (torch.from_numpy(rng.random((500, 19), dtype=np.float32)), y[:500, :19]),
        # like OpenImages' test labels
        "mostly unknown labels": (s, torch.from_numpy(rng.choice(np.array([-1, 0, 1], np.int8), size=big.shape,
                                                                p=[0.9, 0.08, 0.02]))),
    }
    for name, (scores, lab) in cases.items():
        results = {}
        for impl in ("torch", "cpp"):
            monkeypatch.setenv(AP_KERNEL_ENV, impl)
            results[impl] = ap_with_counts(scores, lab)
        for field in ("ap", "n_pos", "n_known"):
            torch.testing.assert_close(getattr(results["cpp"], field), getattr(results["torch"], field),
                                       rtol=0, atol=0, equal_nan=True, msg=f"{name}: {field} differs")
        if name in ("continuous scores", "mostly unknown labels"):  # and both equal sklearn
            finite = np.where(np.isinf(scores.numpy()), np.sign(scores.numpy()) * 2, scores.numpy())
            np.testing.assert_allclose(results["cpp"].ap.numpy(), sklearn_per_class(
                finite.astype(np.float32), lab.numpy()), rtol=0, atol=1e-12, err_msg=name)
    ref = sklearn_per_class(np.where(np.isinf(big), np.sign(big) * 2, big).astype(np.float32), labels)
    monkeypatch.setenv(AP_KERNEL_ENV, "cpp")
    np.testing.assert_allclose(average_precision(s, y).numpy(), ref, rtol=0, atol=1e-12)


def test_unknown_implementation_setting_is_named(monkeypatch):
    monkeypatch.setenv(AP_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match=f"{AP_KERNEL_ENV}='fast'"):
        average_precision(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int8))


def test_mean_ap_no_positive_rules():
    aps = np.array([0.5, 0.0, np.nan, 1.0])
    zero, info_zero = mean_ap(aps, "zero")
    skip, info_skip = mean_ap(aps, "skip")
    assert zero == pytest.approx(100 * 1.5 / 3) and skip == pytest.approx(100 * 1.5 / 2)
    assert info_zero == {"n_classes": 4, "n_classes_used": 3, "n_no_positive": 1, "n_no_known": 1,
                         "no_positive_rule": "zero"}
    assert info_skip["n_classes_used"] == 2 and info_skip["n_no_positive"] == 1
    # Explicit positive counts give the same flag as AP == 0.
    assert mean_ap(aps, "skip", positives_per_class=[3, 0, 0, 2]) == (skip, info_skip)
    with pytest.raises(ValueError, match="no_positive"):
        mean_ap(aps, "drop")


def test_mean_ap_with_no_usable_class_is_nan():
    value, info = mean_ap(np.array([np.nan, 0.0]), "skip")
    assert math.isnan(value) and info["n_classes_used"] == 0


# A hand-made manifest: 7 classes, group order worked out by hand from obs_pos (ties by class id):
# counts 5,1,9,1,3,9,0 -> ascending order 6(0),1(1),3(1),4(3),0(5),2(9),5(9);
# np.array_split into 3 groups of 3,2,2 -> G1 {6,1,3}, G2 {4,0}, G3 {2,5}.
MANIFEST = {
    "format": "bgtrain-shards/1", "dataset": "synthetic",
    "classes": ["c0", "c1", "c2", "c3", "c4", "c5", "c6"],
    "train_counts": {"obs_pos": [5, 1, 9, 1, 3, 9, 0], "obs_neg": [0, 10, 0, 0, 0, 0, 20],
                     "full_pos": [5, 1, 9, 1, 3, 9, 0], "full_neg": [0] * 7},
}


def test_groups_follow_durand_on_a_hand_made_manifest():
    groups = class_groups(MANIFEST["train_counts"]["obs_pos"], 3)
    assert [g.tolist() for g in groups] == [[6, 1, 3], [4, 0], [2, 5]]
    # obs_known = pos + neg: 5,11,9,1,3,9,20 -> 3(1),4(3),0(5),2(9),5(9),1(11),6(20)
    known = np.add(MANIFEST["train_counts"]["obs_pos"], MANIFEST["train_counts"]["obs_neg"])
    assert [g.tolist() for g in class_groups(known, 3)] == [[3, 4, 0], [2, 5], [1, 6]]


def test_group_map_keeps_aps_indexed_by_class_id():
    # AP = class id / 10, class 3 unknown (NaN): misaligned (compacted) arrays would give other means.
    aps = np.arange(7) / 10.0
    aps[3] = np.nan
    res = group_map(aps, MANIFEST["train_counts"]["obs_pos"], num_groups=3)
    assert [g["map"] for g in res["groups"]] == pytest.approx([100 * (0.6 + 0.1) / 2, 100 * (0.4 + 0.0) / 2,
                                                              100 * (0.2 + 0.5) / 2])
    assert res["groups"][0]["n_no_known"] == 1 and res["groups"][1]["n_no_positive"] == 1
    assert res["all"]["map"] == pytest.approx(100 * np.nanmean(aps))


def test_report_table_and_json(tmp_path, capsys):
    aps = np.array([0.9, 0.0, 0.7, np.nan, 0.5, 0.4, 0.3])
    result = report(aps, MANIFEST, num_groups=3, no_positive="skip")
    assert [g["n_classes"] for g in result["groups"]] == [3, 2, 2]
    assert result["all"]["n_classes_used"] == 5 and result["all"]["n_no_positive"] == 1
    assert result["groups"][0]["map"] == pytest.approx(30.0)  # G1 {6,1,3}: 0.3 kept, 0.0 skipped, NaN left out
    assert result["per_class"][3] == {"id": 3, "name": "c3", "ap": None, "train_count": 1}
    print_report(result)
    out = capsys.readouterr().out
    assert "G1" in out and "All" in out and "30.00" in out
    written = json.loads(write_report(result, tmp_path).read_text())
    assert written["groups"][2]["class_ids"] == [2, 5]
    with pytest.raises(ValueError, match="7 classes but 6 APs"):
        report(aps[:6], MANIFEST)
    with pytest.raises(ValueError, match="train_counts"):
        report(aps, {"classes": MANIFEST["classes"]})


def test_benchmark_tiny_run_is_exact(capsys):
    from bgtrain.bench.__main__ import main as bench_main

    assert bench_main(["evaluate", "--n", "800", "--classes", "12", "--levels", "20", "--known", "0.6"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    last = lines[-1]
    assert last["exact"] is True and last["max_abs_err_vs_sklearn"] <= 1e-6
    assert last["speedup_vs_sklearn"] > 0 and last["speedup_vs_torchmetrics"] > 0
    assert {line.get("method") for line in lines} >= {"bgtrain", "sklearn_loop", "torchmetrics"}


def test_benchmark_dispatcher_names_missing_modules(monkeypatch, capsys):
    from bgtrain.bench import __main__ as bench

    assert bench.main(["nosuch"]) == 2
    monkeypatch.setitem(bench.SUBCOMMANDS, "ghost", "bgtrain.bench.ghost_module_that_does_not_exist")
    assert bench.main(["ghost"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nosuch'" in err and "bgtrain.bench.ghost_module_that_does_not_exist is missing" in err


@pytest.mark.usefixtures("ap_impl")
def test_nan_is_refused_even_where_the_label_is_unknown():
    scores = np.random.default_rng(0).random((64, 20), dtype=np.float32)
    labels = np.full((64, 20), -1, np.int8)
    labels[::9, 3] = 1
    scores[5, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        average_precision(scores, labels)
