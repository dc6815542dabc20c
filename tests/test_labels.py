"""Label rules of docs/design.md ("Label encoding", "Training recipe"): COLE's single positive and split, Durand's
partial labels and dense rows. The LL-Cp correction store is tested in tests/test_llcp_store.py.

Every reference here is written out from the published procedure, not taken from bgtrain.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bgtrain.labels import dense_rows, keep_fraction, single_positive, split_train_val

# --- COLE's procedure, written out (elijahcole/single-positive-multi-label, preproc/generate_observed_labels.py) ---

def cole_observe_uniform(full01: np.ndarray, seed: int = 1200) -> np.ndarray:
    """COLE's observe_uniform(num_pos=1, num_neg=0) on a 0/1 matrix, returned in bgtrain's 1/-1 encoding."""
    signed = np.where(full01 == 1, 1, -1)             # COLE converts 0 -> -1 first
    rng = np.random.RandomState(seed)
    obs = np.zeros_like(signed)
    for i in range(signed.shape[0]):
        idx_pos = np.nonzero(signed[i, :] == 1.0)[0]
        rng.shuffle(idx_pos)
        obs[i, idx_pos[:1]] = 1
        idx_neg = np.nonzero(signed[i, :] == -1.0)[0]
        rng.shuffle(idx_neg)                          # keeps none (num_neg=0) but consumes RNG state
        obs[i, idx_neg[:0]] = -1
    return np.where(obs == 1, 1, -1)                  # unobserved (0 in COLE) is -1 in bgtrain


def cole_split(n: int, frac: float = 0.2, seed: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """COLE's generate_split: the last round(frac*n) of a RandomState(seed) permutation is val, both sorted."""
    n_val = int(np.round(frac * n))
    idx = np.random.RandomState(seed).permutation(n)
    return np.sort(idx[: n - n_val]), np.sort(idx[n - n_val:])


def _random_full(n: int, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    full = (rng.random((n, c)) < rng.uniform(0.05, 0.6, size=(n, 1))).astype(np.int64)
    full[3] = 0                                       # a row with no positive (NUS-WIDE has ~22% of them)
    full[7] = 1                                       # a row of all positives
    full[11] = 0
    full[11, 5] = 1                                   # exactly one positive
    return full


@pytest.mark.parametrize("n,c,seed", [(40, 20, 0), (200, 81, 1), (57, 312, 2)])
def test_single_positive_matches_coles_procedure_bit_exactly(n: int, c: int, seed: int) -> None:
    full = _random_full(n, c, seed)
    got = single_positive(full)
    np.testing.assert_array_equal(got, cole_observe_uniform(full))
    assert got.dtype == np.int8
    assert set(np.unique(got).tolist()) <= {1, -1}


def test_single_positive_keeps_exactly_one_true_positive_per_row_and_none_for_empty_rows() -> None:
    full = _random_full(120, 20, 3)
    got = single_positive(full)
    has_pos = full.sum(1) > 0
    np.testing.assert_array_equal((got == 1).sum(1), has_pos.astype(int))
    assert np.all(full[got == 1] == 1)               # the kept label is a real positive
    assert np.all(got[~has_pos] == -1)


def test_single_positive_negative_shuffle_consumes_rng_state() -> None:
    """Dropping the second shuffle would change later rows: the reference output must differ from that variant."""
    full = _random_full(60, 20, 4)
    rng = np.random.RandomState(1200)
    without_neg_shuffle = np.full(full.shape, -1)
    for i, row in enumerate(full):
        pos = np.nonzero(row == 1)[0]
        rng.shuffle(pos)
        without_neg_shuffle[i, pos[:1]] = 1
    got = single_positive(full)
    assert not np.array_equal(got, without_neg_shuffle)
    np.testing.assert_array_equal(got, cole_observe_uniform(full))


def test_single_positive_uses_a_fresh_rng_per_call() -> None:
    """A fresh RandomState(1200) per phase: the same matrix twice gives the same draw."""
    full = _random_full(50, 30, 5)
    np.testing.assert_array_equal(single_positive(full), single_positive(full))


@pytest.mark.parametrize("n", [1, 5, 10, 97, 1000, 5717])
def test_split_train_val_last_round_fifth_of_permutation_is_val(n: int) -> None:
    train, val = split_train_val(n)
    ref_train, ref_val = cole_split(n)
    np.testing.assert_array_equal(train, ref_train)
    np.testing.assert_array_equal(val, ref_val)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)     # sorted, no repeats
    assert not set(train.tolist()) & set(val.tolist())                # disjoint
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))  # cover
    assert val.size == int(np.round(0.2 * n))


@pytest.mark.parametrize("n_trainval,n_train,n_val", [(5717, 4574, 1143), (82081, 65665, 16416),
                                                      (150000, 120000, 30000), (5994, 4795, 1199)])
def test_split_train_val_reproduces_published_split_sizes(n_trainval: int, n_train: int, n_val: int) -> None:
    train, val = split_train_val(n_trainval)
    assert (train.size, val.size) == (n_train, n_val)


def _partial_full(n: int, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([1, 0, -1], dtype=np.int8), size=(n, c), p=[0.2, 0.5, 0.3])


@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.5, 0.9])
def test_keep_fraction_keeps_round_fraction_of_known_labels_unchanged(fraction: float) -> None:
    full = _partial_full(80, 40, 6)
    got = keep_fraction(full, fraction, seed=3)
    assert got.dtype == np.int8 and got.shape == full.shape
    kept = got != -1
    np.testing.assert_array_equal(got[kept], full[kept])            # kept labels keep their value
    assert np.all(full[kept] >= 0)                                   # only known labels can be kept
    known = (full >= 0).sum(1)
    np.testing.assert_array_equal(kept.sum(1), np.round(fraction * known).astype(int))


def test_keep_fraction_is_seeded_and_fraction_one_keeps_everything() -> None:
    full = _partial_full(50, 30, 7)
    np.testing.assert_array_equal(keep_fraction(full, 0.3, seed=1), keep_fraction(full, 0.3, seed=1))
    assert not np.array_equal(keep_fraction(full, 0.3, seed=1), keep_fraction(full, 0.3, seed=2))
    np.testing.assert_array_equal(keep_fraction(full, 1.0, seed=0), full)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_keep_fraction_rejects_fraction_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        keep_fraction(np.zeros((2, 3), dtype=np.int8), fraction, seed=0)


@pytest.mark.parametrize("rest", [-1, 0])
def test_dense_rows_writes_positives_negatives_and_rest(rest: int) -> None:
    pos = [[0, 3], [], [4], [1, 2, 5]]
    neg = [[1], [0, 5], [], []]
    ref = np.full((4, 6), rest, dtype=np.int8)
    for i in range(4):
        for c in neg[i]:
            ref[i, c] = 0
        for c in pos[i]:
            ref[i, c] = 1
    got = dense_rows(pos, neg, 6, rest)
    assert got.dtype == torch.int8 and tuple(got.shape) == (4, 6)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_dense_rows_with_no_ids_at_all_is_all_rest() -> None:
    got = dense_rows([[], []], [[], []], 3, -1)
    np.testing.assert_array_equal(got.numpy(), np.full((2, 3), -1, dtype=np.int8))
