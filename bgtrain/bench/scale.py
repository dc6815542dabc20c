"""Benchmark the fixed costs of a run as the dataset and the world grow: what must stay flat at 3.6M images.

For each ``--samples N`` it fabricates an OpenImages-shaped shard set (``--classes`` classes, sparse observed
labels with unknowns, shards of ``--shard-size``, one tiny JPEG shared by every sample, a fixed validation and test
split), then for each ``--ranks R`` runs the real commands and reads their costs from the run's own records:

* ``cluster.preflight`` (the default check every sbatch start and requeue runs), wall time;
* ``torchrun -m bgtrain.train`` of configs/smoke.yaml (ResNet-18, 32 px, ``--steps`` steps per epoch, 3 epochs,
  a checkpoint every 2 steps): start-up to the first step, each pass's loader start, the epoch boundary with and
  without validation, the checkpoint stall (what the training loop waits) and background write time;
* a resume of that run to a 4th epoch: its load time and bytes read per rank against the file's size;
* ``torchrun -m bgtrain.evaluate --groups 5`` on the test split, wall time.

One JSON line per (N, R) and a markdown table at the end. The baseline of each figure is the smallest N measured
with the same R: a fixed cost stays near ratio 1.0 as N grows.

Example::

    python -m bgtrain.bench scale --samples 100000 1000000 --ranks 2 8 --data /tmp/scale
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("preflight_s", "first_step_s", "loader_start_s", "epoch_boundary_s", "epoch_boundary_no_val_s",
           "checkpoint_stall_s", "checkpoint_write_s", "resume_load_s", "resume_read_ratio", "evaluate_s")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the scale benchmark."""
    p = argparse.ArgumentParser(prog="python -m bgtrain.bench scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m bgtrain.bench scale --samples 100000 1000000 --ranks 2 8")
    p.add_argument("--samples", type=int, nargs="+", default=[100_000, 1_000_000], help="training images")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 8], help="processes (gloo, one node)")
    p.add_argument("--classes", type=int, default=5000)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--val", type=int, default=2000, help="validation images (the same at every N)")
    p.add_argument("--test", type=int, default=20000, help="test images (the same at every N)")
    p.add_argument("--steps", type=int, default=4, help="training steps per epoch (data.max_batches)")
    p.add_argument("--workers", type=int, default=1, help="data.workers per rank")
    p.add_argument("--data", type=Path, help="where the shard sets go, kept and reused (default: a temporary "
                                             "folder, removed at the end)")
    p.add_argument("--build-workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="processes writing shards")
    p.add_argument("--timeout", type=int, default=1800, help="seconds any one command may take")
    return p


# ------------------------------------------------------------------------------------------- the shard set
def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(buf, "JPEG", quality=75)
    return buf.getvalue()


def _write_shard(job: tuple[str, str, int, int, int, int, int]) -> dict:
    """One shard of ``count`` samples with ids from ``first``: 1-3 observed positives, 0-3 known negatives."""
    from shards.format import SampleLabels, ShardWriter, sample_key
    path, split, index, first, count, classes, seed = job
    rng = np.random.default_rng([seed, index, first])
    jpeg = _tiny_jpeg()
    names = [f"c{c}" for c in range(classes)]
    writer = ShardWriter(Path(path))
    for sid in range(first, first + count):
        labels = rng.choice(classes, int(rng.integers(1, 7)), replace=False)
        cut = int(rng.integers(1, min(4, labels.size) + 1))
        pos, neg = sorted(labels[:cut].tolist()), sorted(labels[cut:].tolist())
        writer.write(sample_key(split, sid), jpeg, SampleLabels(sid, pos, neg, pos, neg), names)
    return writer.close()


def fabricate(out: Path, n_train: int, n_val: int, n_test: int, classes: int, shard_size: int,
              workers: int) -> float:
    """Write the shard set and its manifest; returns seconds (0 when ``out`` already holds this set)."""
    from shards.format import read_manifest, shard_name, write_json_atomic
    from shards.manifest import make_manifest
    want = {"train": n_train, "val": n_val, "test": n_test, "classes": classes, "shard_size": shard_size}
    if (out / "manifest.json").is_file() and read_manifest(out)["build"]["args"] == want:
        return 0.0
    started = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    jobs, sizes = [], {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        (out / split).mkdir(parents=True)
        jobs += [(str(out / split / shard_name(split, i)), split, i, first, min(shard_size, n - first), classes, 0)
                 for i, first in enumerate(range(0, n, shard_size))]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        written = pool.map(_write_shard, jobs, chunksize=1)
    splits: dict[str, dict] = {split: {"shards": [], "rest": {"observed": -1, "full": -1}} for split in sizes}
    for job, entry in zip(jobs, written):
        splits[job[1]]["shards"].append(entry)
    counts = {k: [0] * classes for k in ("obs_pos", "obs_neg", "full_pos", "full_neg")}
    manifest = make_manifest("openimages-shaped", [f"c{c}" for c in range(classes)], splits, counts, want)
    write_json_atomic(out / "manifest.json", manifest)
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------- the measured runs
def _run(cmd: list[str], timeout: int, env: dict | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return time.perf_counter() - started


def _torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def measure(shards: Path, ranks: int, args: argparse.Namespace, work: Path) -> dict:
    """Every figure of one (shard set, world size), from the commands' wall time and the runs' records."""
    config = str(REPO / "configs/smoke.yaml")
    out = work / f"run-{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    train = [f"data.shards={shards}", f"out_dir={out}", "data.image_size=32", f"data.workers={args.workers}",
             "data.batch_size=16", "data.eval_batch_size=250", f"data.max_batches={args.steps}", "optim.epochs=3",
             "checkpoint.every_steps=2", "log.tensorboard=false", "loss.scheme=AN", "engine.timeout_s=600"]
    threads = {"OMP_NUM_THREADS": "1"}
    row: dict = {"preflight_s": _run([sys.executable, "-m", "cluster.preflight", "--config", config,
                                      "--min-free-gb", "0", *train], args.timeout, threads)}
    _run([*_torchrun(ranks), "-m", "bgtrain.train", "--config", config, *train], args.timeout, threads)
    records = _records(out)
    epochs = [r for r in records if r["kind"] == "epoch"]
    later = epochs[1:]  # the first epoch also pays the start-up
    row["first_step_s"] = round(epochs[0]["startup_s"] + epochs[0]["first_batch_s"], 3)
    row["loader_start_s"] = round(statistics.median(e["first_batch_s"] for e in later), 3)
    row["epoch_boundary_s"] = round(statistics.median(e["epoch_s"] - e["steps_s"] for e in later), 3)
    row["epoch_boundary_no_val_s"] = round(statistics.median(
        e["epoch_s"] - e["steps_s"] - e["validation_s"] for e in later), 3)
    saves = [r for r in records if r["kind"] == "checkpoint"]
    row["checkpoint_stall_s"] = round(statistics.median(r["stall_s"] for r in saves), 4)
    row["checkpoint_host_copy_s"] = round(statistics.median(r["host_copy_s"] for r in saves), 4)
    row["checkpoint_write_s"] = round(statistics.median(r["previous_write_s"] for r in saves[1:]), 4)
    row["checkpoint_bytes"] = max(p.stat().st_size for p in (out / "checkpoints").glob("step-*.pt"))

    _run([*_torchrun(ranks), "-m", "bgtrain.train", "--config", config, *train, "optim.epochs=4",
          "checkpoint.resume=latest"], args.timeout, threads)
    resume = next(r for r in _records(out) if r["kind"] == "resume")
    row["resume_load_s"] = resume["load_s"]
    row["resume_read_ratio"] = (round(resume["bytes_read"] / resume["file_bytes"], 3)
                                if resume["bytes_read"] is not None else None)

    row["evaluate_s"] = _run([*_torchrun(ranks), "-m", "bgtrain.evaluate", "--checkpoint",
                              str(out / "checkpoints" / "best.pt"), "--shards", str(shards), "--groups", "5"],
                             args.timeout, threads)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, one column per (N, R)."""
    head = "| figure | " + " | ".join(f"N={r['samples']:,} R={r['ranks']}" for r in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for key in FIGURES:
        cells = []
        for r in rows:
            ratio = r.get("ratio_to_smallest", {}).get(key)
            cells.append(f"{r.get(key)}" + (f" ({ratio}x)" if ratio is not None else ""))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print JSON lines, then the table."""
    args = build_parser().parse_args(argv)
    root = args.data or Path(tempfile.mkdtemp(prefix="bgtrain-scale-"))
    print(json.dumps({"bench": "scale", "samples": args.samples, "ranks": args.ranks, "classes": args.classes,
                      "shard_size": args.shard_size, "val": args.val, "test": args.test, "steps": args.steps,
                      "workers": args.workers, "cpus": os.cpu_count()}), flush=True)
    rows: list[dict] = []
    try:
        for n in sorted(args.samples):
            shards = root / f"oi-{n}"
            built = fabricate(shards, n, args.val, args.test, args.classes, args.shard_size, args.build_workers)
            for ranks in args.ranks:
                row = {"samples": n, "ranks": ranks, "shards": -(-n // args.shard_size), "fabricate_s": round(built, 1),
                       **measure(shards, ranks, args, root)}
                base = next((r for r in rows if r["ranks"] == ranks), None)
                if base is not None:
                    row["ratio_to_smallest"] = {k: round(row[k] / base[k], 2) for k in FIGURES
                                                if row.get(k) is not None and base.get(k)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if args.data is None:
            shutil.rmtree(root, ignore_errors=True)
    print(table(rows), flush=True)
    return 0
