"""Benchmark per-class AP: bgtrain vs the scikit-learn per-class loop vs torchmetrics, same data, same run.

Prints JSON lines: the setup, one line per method, and last a summary with ``exact`` (every class within
``--tol`` of scikit-learn), ``speedup_vs_sklearn`` and ``speedup_vs_torchmetrics``.

Example::

    python -m bgtrain.bench evaluate --n 125000 --classes 5000          # the OpenImages-size run
    python -m bgtrain.bench evaluate --n 20000 --classes 100 --levels 50   # quick, heavy ties
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from bgtrain.metrics import ap_implementation, average_precision


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the evaluator benchmark."""
    p = argparse.ArgumentParser(prog="python -m bgtrain.bench evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m bgtrain.bench evaluate --n 20000 --classes 100")
    p.add_argument("--n", type=int, default=125_000, help="rows (test images)")
    p.add_argument("--classes", type=int, default=5000, help="classes")
    p.add_argument("--pos", type=float, default=0.05, help="fraction of known entries that are positive")
    p.add_argument("--known", type=float, default=1.0, help="fraction of entries that are known (rest -1)")
    p.add_argument("--levels", type=int, default=10_000,
                   help="scores are multiples of 1/levels, so values tie (0 = continuous float32 scores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=1, help="timed runs of bgtrain's AP (best is reported)")
    p.add_argument("--no-torchmetrics", action="store_true", help="skip the torchmetrics comparison")
    p.add_argument("--tol", type=float, default=1e-6, help="max |AP - sklearn AP| for exact=true")
    return p


def make_data(n: int, c: int, pos: float, known: float, levels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 scores in [0, 1] and signed int8 labels, generated in row chunks to bound memory."""
    rng = np.random.default_rng(seed)
    scores = np.empty((n, c), np.float32)
    labels = np.empty((n, c), np.int8)
    step = max(1, (1 << 22) // max(c, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        u = rng.random((r1 - r0, c), dtype=np.float32)
        scores[r0:r1] = np.round(u * levels) / levels if levels > 0 else u
        lab = (rng.random((r1 - r0, c), dtype=np.float32) < pos).astype(np.int8)
        if known < 1.0:
            lab[rng.random((r1 - r0, c), dtype=np.float32) >= known] = -1
        labels[r0:r1] = lab
    return scores, labels


def sklearn_loop(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The reference evaluation: one ``average_precision_score`` call per class on its known entries."""
    from sklearn.metrics import average_precision_score

    out = np.full(scores.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found" for classes without positives
        for k in range(scores.shape[1]):
            known = labels[:, k] >= 0
            if known.any():
                out[k] = average_precision_score(labels[known, k], scores[known, k])
    return out


def torchmetrics_ap(scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """torchmetrics' exact (thresholds=None) multilabel AP with -1 ignored."""
    from torchmetrics.classification import MultilabelAveragePrecision

    metric = MultilabelAveragePrecision(num_labels=scores.shape[1], average="none", thresholds=None,
                                        ignore_index=-1, validate_args=False).to(scores.device)
    metric.update(scores, labels.long())
    return metric.compute().double().cpu().numpy()


def _timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _max_err(a: np.ndarray, ref: np.ndarray) -> tuple[float, bool]:
    both_nan = np.isnan(a) & np.isnan(ref)
    err = np.where(both_nan, 0.0, np.abs(a - ref))
    err = np.where(np.isnan(err), np.inf, err)  # NaN on one side only is a mismatch
    return float(err.max(initial=0.0)), bool(not both_nan.all())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print JSON lines; exit status 1 when the result is not exact."""
    args = build_parser().parse_args(argv)
    scores_np, labels_np = make_data(args.n, args.classes, args.pos, args.known, args.levels, args.seed)
    _emit({"bench": "evaluate", "n": args.n, "classes": args.classes, "pos": args.pos, "known": args.known,
           "levels": args.levels, "device": args.device, "torch_threads": torch.get_num_threads(),
           "implementation": ap_implementation(args.device, args.n * args.classes),
           "cpus": os.cpu_count(), "machine": platform.machine(),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None})
    scores = torch.from_numpy(scores_np).to(args.device)
    labels = torch.from_numpy(labels_np).to(args.device)

    average_precision(scores[:1000, :8], labels[:1000, :8])  # warm-up: thread pool, CUDA context, kernels
    ours_s = float("inf")
    for _ in range(max(1, args.repeats)):
        ours, t = _timed(lambda: average_precision(scores, labels), args.device)
        ours_s = min(ours_s, t)
    ours = ours.cpu().numpy()
    _emit({"method": "bgtrain", "seconds": round(ours_s, 4)})

    ref, sk_s = _timed(lambda: sklearn_loop(scores_np, labels_np), "cpu")
    _emit({"method": "sklearn_loop", "seconds": round(sk_s, 4)})
    err, _ = _max_err(ours, ref)

    tm_s = tm_err = None
    if not args.no_torchmetrics:
        tm, tm_s = _timed(lambda: torchmetrics_ap(scores, labels), args.device)
        tm_err, _ = _max_err(tm, ref)
        _emit({"method": "torchmetrics", "seconds": round(tm_s, 4), "max_abs_err_vs_sklearn": tm_err})

    exact = bool(err <= args.tol)
    _emit({"exact": exact, "max_abs_err_vs_sklearn": err, "classes_compared": args.classes,
           "classes_nan": int(np.isnan(ref).sum()), "bgtrain_s": round(ours_s, 4), "sklearn_s": round(sk_s, 4),
           "torchmetrics_s": None if tm_s is None else round(tm_s, 4),
           "speedup_vs_sklearn": round(sk_s / ours_s, 2),
           "speedup_vs_torchmetrics": None if tm_s is None else round(tm_s / ours_s, 2)})
    return 0 if exact else 1
