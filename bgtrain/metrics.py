"""Per-class average precision, mAP rules and Durand's group-wise mAP: the pure math, no I/O.

AP is scikit-learn's ``average_precision_score`` (non-interpolated, ties grouped):

    AP = (1/P) * sum over distinct score thresholds t (descending) of dTP(t) * TP(>=t) / Known(>=t)

where dTP(t) is the number of positives scoring exactly t. Only known entries (0/1) count; unknown
(-1) entries carry no weight.

Two implementations compute the same sum in the same order, so they give bit-identical AP and the
choice between them never changes a result:

* torch (any device; the GPU path): one batched sort per class block, binary searches for the counts;
* the C++ CPU kernel (``bgtrain/ops/csrc/ap_cpu.cpp``): a radix sort per class, ~4x faster per
  core than the torch path on the CPU.

``BGTRAIN_AP`` picks: ``torch``, ``cpp`` (build the kernel if needed; a failed build is an error) or
``auto`` (default): the kernel when it is already built, or when the matrix is large enough
(``BUILD_KERNEL_ABOVE`` entries) that building it once (~30 s) pays off; otherwise torch.
"""
from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

NoPositiveRule = Literal["zero", "skip"]
NO_POSITIVE_RULES = ("zero", "skip")

# Elements per class block: bounds the temporaries (~10 bytes/element) independently of N and C.
CPU_BLOCK_ELEMENTS = 1 << 24
CUDA_BLOCK_ELEMENTS = 1 << 28

AP_KERNEL_ENV = "BGTRAIN_AP"
AP_KERNEL_CHOICES = ("auto", "cpp", "torch")
# Entries (N*C) above which `auto` builds the C++ kernel: the torch path needs ~1 s per 2**24 on one core.
BUILD_KERNEL_ABOVE = 1 << 24
NAN_MESSAGE = "scores contain NaN; AP is undefined for them (check the model output)"
_kernel_failed: list[str] = []


@dataclass
class APResult:
    """Per-class AP (float64, NaN where no entry is known) and the counts the mAP rules need."""

    ap: torch.Tensor
    n_pos: torch.Tensor
    n_known: torch.Tensor


def as_matrix(x, name: str) -> torch.Tensor:
    """A torch view of an (N, C) tensor or array, with a clear error for any other shape."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() != 2:
        raise ValueError(f"{name} must be (N, C), got shape {tuple(t.shape)}")
    return t


def _check_inputs(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes and dtypes; NaN is checked by each implementation (the kernel does it in its one pass)."""
    scores, labels = as_matrix(scores, "scores"), as_matrix(labels, "labels")
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ in shape")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if labels.dtype != torch.int8:
        raise ValueError(f"labels must be signed int8 (1 pos, 0 neg, -1 unknown), got {labels.dtype}")
    return scores, labels.to(scores.device)


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Ascending sort of each row of a fresh (c, N) tensor, values only."""
    if x.is_cuda:
        return torch.sort(x, dim=1).values
    # numpy's values-only sort is SIMD (x86-simd-sort) and ~3x faster than torch.sort on CPU;
    # it releases the GIL, so row slices sort in parallel threads.
    arr = x.numpy()
    threads = max(1, min(torch.get_num_threads(), arr.shape[0]))
    if threads == 1 or arr.size < (1 << 18):
        arr.sort(axis=1)
    else:
        cuts = np.linspace(0, arr.shape[0], threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda ab: arr[ab[0]:ab[1]].sort(axis=1), zip(cuts[:-1], cuts[1:])))
    return x


def _block_ap_sums(scores_cn: torch.Tensor, labels_cn: torch.Tensor, n_pos: torch.Tensor,
                   n_known: torch.Tensor) -> torch.Tensor:
    """Sum over positives of precision at their score, per row of a (c, N) block, float64.

    Per positive i, precision is TP(>= s_i) / Known(>= s_i): tied entries all count, which is exactly
    sklearn's rule of evaluating only at distinct thresholds. Both counts come from binary searches
    into sorted rows, so only one full sort (the known scores) is needed per class.
    """
    c, n = scores_cn.shape
    dev = scores_cn.device
    neg_inf = torch.tensor(float("-inf"), dtype=scores_cn.dtype, device=dev)
    # Unknown entries go to -inf: below every real threshold, so they are never counted above one.
    known_sorted = _sort_rows(torch.where(labels_cn >= 0, scores_cn, neg_inf))
    rows, cols = torch.nonzero(labels_cn == 1, as_tuple=True)
    width = int(n_pos.max()) if rows.numel() else 0
    if width == 0:
        return torch.zeros(c, dtype=torch.float64, device=dev)
    start = torch.cumsum(n_pos, 0) - n_pos
    pos_sorted = torch.full((c, width), float("-inf"), dtype=scores_cn.dtype, device=dev)
    pos_sorted[rows, torch.arange(rows.numel(), device=dev) - start[rows]] = scores_cn[rows, cols]
    pos_sorted = _sort_rows(pos_sorted)  # -inf padding first; real entries are the last n_pos columns
    # The min() only matters for a score of -inf, where padding/unknowns tie with real entries.
    known_ge = torch.minimum(n - torch.searchsorted(known_sorted, pos_sorted), n_known[:, None])
    tp_ge = torch.minimum(width - torch.searchsorted(pos_sorted, pos_sorted), n_pos[:, None])
    valid = torch.arange(width, device=dev)[None, :] >= (width - n_pos)[:, None]
    precision = torch.where(valid, tp_ge.double() / known_ge.clamp_min(1).double(), 0.0)
    # Running sum along each row: a sequential order that depends on that row only, so a class gets
    # bit-identical AP whichever block or rank computes it.
    return precision.cumsum(1)[:, -1]


def ap_kernel_choice() -> str:
    """The implementation setting from $BGTRAIN_AP: 'auto' (default), 'cpp' or 'torch'."""
    value = os.environ.get(AP_KERNEL_ENV, "").strip().lower() or "auto"
    if value not in AP_KERNEL_CHOICES:
        raise ValueError(f"{AP_KERNEL_ENV}={value!r} is not one of {', '.join(AP_KERNEL_CHOICES)}")
    return value


def _cpu_kernel(device: torch.device, dtype: torch.dtype, entries: int):
    """The C++ AP kernel module for a matrix of `entries` scores, or None for the torch path."""
    if device.type != "cpu" or dtype == torch.float64:
        return None
    choice = ap_kernel_choice()
    if choice == "torch":
        return None
    from bgtrain.ops import extension

    if choice == "cpp":
        return extension.load_ap_cpu()
    built = extension.ap_cpu_is_built()
    if _kernel_failed or (entries < BUILD_KERNEL_ABOVE and not built):
        return None
    if not built:
        logging.getLogger("bgtrain.metrics").warning("building the CPU AP kernel once (~30 s), cached in %s",
                                                     extension.ap_cpu_build_dir())
    try:
        return extension.load_ap_cpu()
    except Exception as err:  # noqa: BLE001 - no compiler etc.: the torch path gives the same numbers
        _kernel_failed.append(str(err))
        warnings.warn(f"bgtrain AP kernel unavailable, using the torch path (same results, slower; set "
                      f"{AP_KERNEL_ENV}=cpp to make this an error): {type(err).__name__}: {err}",
                      RuntimeWarning, stacklevel=3)
        return None


def ap_implementation(device: torch.device | str, entries: int) -> str:
    """'cpp' or 'torch': what :func:`ap_with_counts` uses for a float32 matrix of `entries` scores on `device`
    (building the kernel first when the setting asks for it)."""
    return "torch" if _cpu_kernel(torch.device(device), torch.float32, entries) is None else "cpp"


def _finish(sums: torch.Tensor, n_pos: torch.Tensor, n_known: torch.Tensor) -> APResult:
    ap = torch.where(n_pos > 0, sums / n_pos.clamp_min(1).double(), torch.zeros_like(sums))
    ap = torch.where(n_known > 0, ap, torch.full_like(ap, float("nan")))
    return APResult(ap=ap, n_pos=n_pos, n_known=n_known)


def ap_with_counts(scores, labels, block_elements: int | None = None) -> APResult:
    """Per-class AP with positive/known counts; see :func:`average_precision`."""
    scores, labels = _check_inputs(scores, labels)
    n, c = scores.shape
    kernel = _cpu_kernel(scores.device, scores.dtype, n * c)
    if kernel is not None:
        # Half/bfloat16 -> float32 is exact and keeps every tie.
        sums, n_pos, n_known, has_nan = kernel.ap_sums(scores.float(), labels)
        if has_nan:
            raise ValueError(NAN_MESSAGE)
        return _finish(sums, n_pos, n_known)
    if torch.isnan(scores).any():
        raise ValueError(NAN_MESSAGE)
    if block_elements is None:
        block_elements = CUDA_BLOCK_ELEMENTS if scores.is_cuda else CPU_BLOCK_ELEMENTS
    n_pos = (labels == 1).sum(0, dtype=torch.int64)
    n_known = (labels >= 0).sum(0, dtype=torch.int64)
    sums = torch.empty(c, dtype=torch.float64, device=scores.device)
    step = max(1, block_elements // max(n, 1))
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        # (c, N) row-major so each class is one contiguous row for the sort and the scans.
        # Half/bfloat16 -> float32 is exact and keeps every tie, and numpy sorts float32.
        block = scores[:, c0:c1].t().contiguous()
        block = block.float() if block.dtype in (torch.float16, torch.bfloat16) else block
        sums[c0:c1] = _block_ap_sums(block, labels[:, c0:c1].t().contiguous(),
                                     n_pos[c0:c1], n_known[c0:c1])
    return _finish(sums, n_pos, n_known)


def average_precision(scores, labels, block_elements: int | None = None) -> torch.Tensor:
    """Per-class AP (C,) float64, equal to sklearn's ``average_precision_score`` on the known entries.

    ``scores`` (N, C) float, ``labels`` (N, C) int8 with 1 pos / 0 neg / -1 unknown (ignored); torch
    tensors (CPU or CUDA) or numpy arrays. A class with no known entry is NaN; a class with known
    entries but no positive is 0.0 (as sklearn), and since any class with a positive has AP > 0,
    ``ap == 0`` is exactly the no-positive flag that :func:`mean_ap` uses.
    """
    return ap_with_counts(scores, labels, block_elements).ap


def _numpy(x) -> np.ndarray:
    return np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)


def mean_ap(aps, no_positive: NoPositiveRule = "zero", positives_per_class=None,
            negatives_per_class=None) -> tuple[float, dict]:
    """mAP in percent over the classes the rule keeps, and how many classes each rule affected.

    ``no_positive="zero"`` is the reference rule (AP 0 stays in the mean), ``"skip"`` leaves such
    classes out. NaN (no known entry) is always left out. Without ``positives_per_class`` a class
    counts as "no positive" when its AP is exactly 0 (impossible for a class with a positive).
    With ``negatives_per_class`` (known negatives per class) the info also counts the known negatives
    and the classes with a positive but no known negative, whose AP is 1 whatever the scores.
    """
    if no_positive not in NO_POSITIVE_RULES:
        raise ValueError(f"no_positive must be one of {NO_POSITIVE_RULES}, got {no_positive!r}")
    aps = np.asarray(aps.cpu() if isinstance(aps, torch.Tensor) else aps, dtype=np.float64)
    no_known = np.isnan(aps)
    if positives_per_class is None:
        no_pos = aps == 0.0
    else:
        pos = np.asarray(positives_per_class.cpu() if isinstance(positives_per_class, torch.Tensor)
                         else positives_per_class)
        if pos.shape != aps.shape:
            raise ValueError(f"positives_per_class has shape {pos.shape}, aps has {aps.shape}")
        no_pos = (pos == 0) & ~no_known
    used = ~no_known & ~(no_pos if no_positive == "skip" else np.zeros_like(no_pos))
    value = float(100.0 * aps[used].mean()) if used.any() else float("nan")
    info = {"n_classes": int(aps.size), "n_classes_used": int(used.sum()),
            "n_no_positive": int(no_pos.sum()), "n_no_known": int(no_known.sum()),
            "no_positive_rule": no_positive}
    if negatives_per_class is not None:
        neg = _numpy(negatives_per_class)
        if neg.shape != aps.shape:
            raise ValueError(f"negatives_per_class has shape {neg.shape}, aps has {aps.shape}")
        info["n_negatives"] = int(neg.sum())
        info["n_no_negative"] = int(((neg == 0) & ~no_known & ~no_pos).sum())
    return value, info


def class_groups(train_pos_counts, num_groups: int = 5) -> list[np.ndarray]:
    """Durand's groups: class ids sorted ascending by training count (ties by class id), cut in equal parts.

    G1 (index 0) is the rarest. When C is not a multiple of ``num_groups`` the cut is
    ``np.array_split``: the first ``C % num_groups`` groups get one class more.
    """
    counts = np.asarray(train_pos_counts)
    if counts.ndim != 1:
        raise ValueError(f"train counts must be one value per class, got shape {counts.shape}")
    if not 1 <= num_groups <= counts.size:
        raise ValueError(f"num_groups must be in [1, {counts.size}] (number of classes), got {num_groups}")
    order = np.argsort(counts, kind="stable")
    return np.array_split(order, num_groups)


def group_map(aps, train_pos_counts, num_groups: int = 5, no_positive: NoPositiveRule = "zero",
              positives_per_class=None, negatives_per_class=None) -> dict:
    """Per-group and all-class mAP; ``aps`` stays indexed by class id (never compacted)."""
    aps = np.asarray(aps.cpu() if isinstance(aps, torch.Tensor) else aps, dtype=np.float64)
    counts = np.asarray(train_pos_counts)
    if counts.shape != aps.shape:
        raise ValueError(f"{counts.size} training counts for {aps.size} classes: the manifest and "
                         "the evaluated model disagree on the class list")
    pos = None if positives_per_class is None else np.asarray(
        positives_per_class.cpu() if isinstance(positives_per_class, torch.Tensor) else positives_per_class)
    neg = None if negatives_per_class is None else _numpy(negatives_per_class)
    groups = []
    for g, ids in enumerate(class_groups(counts, num_groups)):
        value, info = mean_ap(aps[ids], no_positive, None if pos is None else pos[ids],
                              None if neg is None else neg[ids])
        groups.append({"group": f"G{g + 1}", "map": value, "class_ids": ids.tolist(),
                       "train_count_min": int(counts[ids].min()), "train_count_max": int(counts[ids].max()),
                       **info})
    value, info = mean_ap(aps, no_positive, pos, neg)
    return {"groups": groups, "all": {"map": value, **info}, "num_groups": num_groups}
