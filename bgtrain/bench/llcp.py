"""Benchmark LL-Cp's correction store at the OpenImages rate: memory, per-step cost, checkpoint save and load.

For each ``--corrections N`` it fills a store with N corrections the way a resume does (``load_state_dict`` of a
checkpoint's sorted keys), then runs ``--steps`` training steps of ``--batch`` samples x ``--classes`` classes,
each recording ``ceil(B C delta)`` new corrections (80 at OpenImages' 16 x 5000 x 0.001), and times a checkpoint
round trip through a file. One JSON line per N, with ``bytes_per_correction`` (of the tensors the store holds),
``record_us`` and ``apply_us`` per step, ``epoch_merge_s``, ``save_s`` and ``load_s``; beside it, the same figures
for the store this one replaced (a dict of Python sets, measured as resident growth, ``--baseline-max``
corrections at most, since it needs about 400 bytes each) and the ratio.

Example::

    python -m bgtrain.bench llcp --corrections 1000000 10000000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import torch

from bgtrain.labels import CorrectionStore

OPENIMAGES_TRAIN = 3_600_000


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the LL-Cp store benchmark."""
    p = argparse.ArgumentParser(prog="python -m bgtrain.bench llcp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m bgtrain.bench llcp --corrections 1000000 10000000")
    p.add_argument("--corrections", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="store sizes to measure (corrections already held)")
    p.add_argument("--samples", type=int, default=OPENIMAGES_TRAIN, help="training samples the ids are drawn from")
    p.add_argument("--classes", type=int, default=5000, help="classes (OpenImages: 5000)")
    p.add_argument("--batch", type=int, default=16, help="samples per rank and step (OpenImages recipe: 16)")
    p.add_argument("--delta", type=float, default=0.001, help="LL-Cp's delta_rel")
    p.add_argument("--steps", type=int, default=256, help="timed training steps")
    p.add_argument("--baseline-max", type=int, default=1_000_000,
                   help="largest store the old dict-of-sets baseline is measured at (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    return p


def random_keys(n: int, samples: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct sorted keys ``sample * classes + class``, drawn uniformly (a little over-drawn, deduplicated)."""
    space = samples * classes
    if n > space // 2:
        raise ValueError(f"--corrections {n}: more than half of the {samples} x {classes} entries")
    keys = torch.unique(torch.randint(0, space, (n + n // 8 + 16,), generator=generator))
    while keys.numel() < n:
        keys = torch.unique(torch.cat([keys, torch.randint(0, space, (n,), generator=generator)]))
    return keys[torch.randperm(keys.numel(), generator=generator)[:n]].sort().values


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_store(keys: torch.Tensor, args: argparse.Namespace, device: torch.device, folder: Path) -> dict:
    """bgtrain's store: memory held, per-step record and apply, and a checkpoint round trip."""
    g = torch.Generator().manual_seed(args.seed + 1)
    k = math.ceil(args.batch * args.classes * args.delta)
    store = CorrectionStore(args.classes)
    store.load_state_dict({"keys": keys, "num_classes": args.classes})
    store.begin_epoch()
    held = store.nbytes()
    labels = torch.full((args.batch, args.classes), -1, dtype=torch.int8, device=device)
    batches = [torch.randint(0, args.samples, (args.batch,), generator=g).to(device) for _ in range(args.steps)]
    masks = []
    for _ in range(args.steps):
        mask = torch.zeros(args.batch * args.classes, dtype=torch.bool)
        mask[torch.randperm(mask.numel(), generator=g)[:k]] = True
        masks.append(mask.view(args.batch, args.classes).to(device))
    store.apply(labels, batches[0])  # moves the keys to the device once, as the first training step does
    _sync(device)
    t0 = time.perf_counter()
    for ids in batches:
        store.apply(labels, ids)
    _sync(device)
    apply_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ids, mask in zip(batches, masks):
        store.record(ids, mask)
    _sync(device)
    record_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.begin_epoch()  # the epoch boundary's merge of what the epoch found (one rank: nothing to route)
    _sync(device)
    merge_s = time.perf_counter() - t0

    path = folder / "store.pt"
    t0 = time.perf_counter()
    torch.save({"corrections": store.state_dict()}, path)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh = CorrectionStore(args.classes)
    fresh.load_state_dict(torch.load(path, weights_only=True)["corrections"])
    load_s = time.perf_counter() - t0
    if not torch.equal(fresh.keys().cpu(), store.keys().cpu()):
        raise RuntimeError("the store did not survive its checkpoint round trip")
    return {"bytes_per_correction": round(held / keys.numel(), 2) if keys.numel() else None,
            "record_us": round(1e6 * record_s / args.steps, 2), "apply_us": round(1e6 * apply_s / args.steps, 2),
            "epoch_merge_s": round(merge_s, 4), "save_s": round(save_s, 3), "load_s": round(load_s, 3),
            "checkpoint_bytes": path.stat().st_size}


def measure_baseline(keys: torch.Tensor, args: argparse.Namespace, folder: Path) -> dict:
    """The store this one replaced, on one rank: a dict of Python sets, checkpointed as a (K, 2) pair tensor.

    Its memory is what Python allocates for the dict and its sets (tracemalloc: exact, where the process's
    resident growth reads 0 at small sizes whenever freed pages are reused)."""
    pairs_list = torch.stack([keys // args.classes, keys % args.classes], 1).tolist()
    tracemalloc.start()
    owned: dict[int, set[int]] = {}
    for sid, cls in pairs_list:
        owned.setdefault(sid, set()).add(cls)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del pairs_list
    path = folder / "baseline.pt"
    t0 = time.perf_counter()
    pairs = torch.tensor(sorted((s, c) for s, cs in owned.items() for c in cs), dtype=torch.long).reshape(-1, 2)
    torch.save({"pairs": pairs}, path)
    save_s = time.perf_counter() - t0
    del pairs, owned
    t0 = time.perf_counter()
    loaded: dict[int, set[int]] = {}
    for sid, cls in torch.load(path, weights_only=True)["pairs"].tolist():
        loaded.setdefault(sid, set()).add(cls)
    load_s = time.perf_counter() - t0
    return {"bytes_per_correction": round(held / keys.numel(), 2), "save_s": round(save_s, 3),
            "load_s": round(load_s, 3)}


def ratios(ours: dict, baseline: dict) -> dict:
    """ours / baseline for each figure both have (None where the baseline's is 0)."""
    return {k: round(ours[k] / baseline[k], 4) if baseline[k] and ours[k] is not None else None for k in baseline}


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print JSON lines."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    _emit({"bench": "llcp", "samples": args.samples, "classes": args.classes, "batch": args.batch,
           "delta": args.delta, "corrections_per_step": math.ceil(args.batch * args.classes * args.delta),
           "steps": args.steps, "device": str(device), "cpus": os.cpu_count(), "machine": platform.machine(),
           "torch_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None})
    g = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.corrections:
            keys = random_keys(n, args.samples, args.classes, g)
            row: dict = {"corrections": n, **measure_store(keys, args, device, Path(tmp))}
            if 0 < n <= args.baseline_max:
                row["baseline"] = measure_baseline(keys, args, Path(tmp))
                row["ratio_to_baseline"] = ratios(row, row["baseline"])
            _emit(row)
    return 0
