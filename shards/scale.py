"""``python -m shards.scale``: an OpenImages-shaped raw set at scale, and the array-build costs measured on it.

``make`` fabricates the published OpenImages v3 layout (``classes-trainable.txt``, ``class-descriptions.csv``,
``{train,validation,test}/annotations-human.csv`` sorted by ImageID, sparse labels over C classes) in seconds;
with ``--images`` every ImageID gets a tiny JPEG, hard-linked from a small pool so that a million images cost
inodes, not gigabytes. ``parts`` writes the parts of an array build of it with the real builder, the image
check swapped for a pass-through (the pool's JPEGs are known good), so that a merge can be timed at 1M samples
without an hour of decoding. ``read`` times what one part of ``build --parts N`` spends before its first image:
reading the annotations and taking its slice, against a plain line scan of the same CSVs.

    python -m shards.scale make --out /tmp/oi1m --train 1000000 --val 20000 --test 20000 --images
    python -m shards.scale read --src /tmp/oi1m --part 3 --parts 64
    python -m shards.scale parts --src /tmp/oi1m --out /tmp/oi1m-shards --parts 8 --workers 2
    python -m shards.scale fabricate --out /tmp/oi1m-shards --train 1000000 --parts 8 --workers 2

``fabricate`` skips the raw data and the reader altogether: it writes the parts' tars, indexes and manifests
directly, as ``build --part`` writes them when every input passes; minutes at a million samples.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_DIRS = {"train": "train", "val": "validation", "test": "test"}


def _pool(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def make_raw(out: Path, n_train: int, n_val: int, n_test: int, classes: int = 5000, seed: int = 0,
             images: bool = False, labels_per_image: float = 3.0) -> dict:
    """Write an OpenImages v3 raw folder of tiny images; returns rows and images per split."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    mids = [f"/m/0{c:05x}" for c in range(classes)]
    (out / "classes-trainable.txt").write_text("\n".join(mids) + "\n")
    (out / "class-descriptions.csv").write_text("".join(f"{m},class {c}\n" for c, m in enumerate(mids)))
    pool_dir = out / "pool"
    if images:
        pool_dir.mkdir(exist_ok=True)
        for i, data in enumerate(_pool(64, seed)):
            (pool_dir / f"{i}.jpg").write_bytes(data)
    stats = {}
    total = n_train + n_val + n_test
    # unique 16-hex-digit ImageIDs, as OpenImages has
    ids = np.unique(rng.integers(0, 2**63, int(total * 1.01) + 10, dtype=np.int64))[:total]
    rng.shuffle(ids)
    start = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        d = out / SPLIT_DIRS[split]
        d.mkdir(exist_ok=True)
        names = sorted(f"{int(x):016x}" for x in ids[start: start + n])
        start += n
        per = 1 + rng.poisson(labels_per_image - 1, n)
        cls = rng.integers(0, classes, int(per.sum()))
        conf = (rng.random(int(per.sum())) < 0.7).astype(np.int8)
        owner = np.repeat(np.arange(n), per)
        lines = ["ImageID,Source,LabelName,Confidence\n"]
        lines += [f"{names[o]},verification,{mids[c]},{v}\n" for o, c, v in zip(owner.tolist(), cls.tolist(),
                                                                               conf.tolist())]
        (d / "annotations-human.csv").write_text("".join(lines))
        if images:
            img_dir = out / "images" / SPLIT_DIRS[split]
            img_dir.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(names):
                target = img_dir / f"{name}.jpg"
                if not target.exists():
                    os.link(pool_dir / f"{i % 64}.jpg", target)
        stats[split] = {"images": n, "rows": len(lines) - 1}
    return stats


def time_read(src: Path, part: int, parts: int, seed: int = 1200) -> dict:
    """CPU seconds one part spends reading annotations and taking its slice, against two linear scans of the
    same CSVs: iterating their lines, and parsing them with the csv module (doing nothing with the rows)."""
    import csv

    from shards.build import BuildOptions, plan_part
    from shards.readers import get_reader

    files = [src / d / "annotations-human.csv" for d in SPLIT_DIRS.values()]
    c0, rows = time.process_time(), 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            rows += sum(1 for _ in f)
    lines = time.process_time() - c0
    c0 = time.process_time()
    for path in files:
        with open(path, newline="", encoding="utf-8") as f:
            for _ in csv.reader(f):
                pass
    parse = time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    data = get_reader("openimages")(src, seed=seed)
    plan, _ = plan_part(data, BuildOptions(seed=seed, part=part, parts=parts))
    return {"rows": rows, "line_scan_cpu_s": round(lines, 2), "csv_scan_cpu_s": round(parse, 2),
            "read_and_slice_cpu_s": round(time.process_time() - c0, 2),
            "read_and_slice_s": round(time.perf_counter() - t0, 2),
            "part_inputs": {s: len(r) for s, r in plan.items()}}


def _passthrough(data: bytes, max_side: int | None, quality: int) -> tuple[bytes, list[str]]:
    return data, []


def build_parts(src: Path, out: Path, parts: int, workers: int, shard_size: int = 2000, seed: int = 1200) -> float:
    """Every part of an array build of ``src`` into ``out`` (images passed through unchecked); returns seconds."""
    import shards.build as build_mod
    from shards.merge import part_dir
    from shards.readers import get_reader

    build_mod.prepare = _passthrough  # type: ignore[assignment]  # the pool's JPEGs are known good
    data = get_reader("openimages")(src, seed=seed)
    t0 = time.perf_counter()
    for part in range(parts):
        opts = build_mod.BuildOptions(None, 90, shard_size, seed, part, parts)
        build_mod.build(data, part_dir(out, part), opts, workers=workers, show_progress=False,
                        build_args={"dataset": "openimages", "src": str(src), "out": str(out), "seed": seed,
                                    "part": part, "parts": parts})
    return time.perf_counter() - t0


def _fabricate_part(task: tuple[Path, dict[str, int], int, int, int, int, int]) -> int:
    """Write one part as ``build --part`` would for inputs that all pass; returns samples written."""
    from shards.build import id_width, part_range
    from shards.format import SampleLabels, ShardWriter, sample_key, shard_name, write_json_atomic
    from shards.manifest import make_manifest, train_counts
    from shards.merge import part_dir
    from shards.readers.openimages import REST

    out, sizes, part, parts, num_classes, shard_size, seed = task
    root = part_dir(out, part)
    names = [f"class {c}" for c in range(num_classes)]
    pool = _pool(64, seed)
    splits, inputs, ranges, index = {}, {}, {}, {}
    labels: list[SampleLabels] = []
    for code, (split, total) in enumerate(sizes.items()):
        a, b = part_range(total, part, parts)
        rng = np.random.default_rng([seed, part, code])
        (root / split).mkdir(parents=True, exist_ok=True)
        shards, lines, writer = [], [], None
        for i in range(b - a):
            if i % shard_size == 0:
                if writer is not None:
                    shards.append(writer.close())
                writer = ShardWriter(root / split / shard_name(split, i // shard_size), id_width=id_width(total))
            cls = rng.choice(num_classes, 1 + rng.poisson(2), replace=False)
            positive = rng.random(len(cls)) < 0.7
            pos, neg = sorted(cls[positive].tolist()), sorted(cls[~positive].tolist())
            lab = SampleLabels(i, pos, neg, pos, neg)
            assert writer is not None
            writer.write(sample_key(split, i), pool[(a + i) % len(pool)], lab, names)
            lines.append(json.dumps({"id": i, "ref": f"{split}{a + i:015x}", "path": f"images/{a + i}.jpg"}))
            if split == "train":
                labels.append(lab)
        if writer is not None:
            shards.append(writer.close())
        splits[split] = {"shards": shards, "rest": dict(REST)}
        inputs[split] = {"inputs": b - a, "written": b - a, "rejected": 0, "missing": 0, "reencoded": 0}
        ranges[split], index[split] = [a, b], f"index/{split}.jsonl"
        (root / "index").mkdir(exist_ok=True)
        (root / "index" / f"{split}.jsonl").write_text("".join(x + "\n" for x in lines))
    for name in ("rejected.jsonl", "missing.jsonl", "problems.jsonl"):
        (root / name).write_text("")
    args = {"dataset": "openimages", "seed": seed, "part": part, "parts": parts, "shard_size": shard_size}
    manifest = make_manifest("openimages", names, splits, train_counts(labels, num_classes, REST), args)
    manifest.update(inputs=inputs, annotation_problems={}, index=index, part={"index": part, "parts": parts,
                                                                             "ranges": ranges},
                    class_mids=[f"/m/0{c:05x}" for c in range(num_classes)])
    write_json_atomic(root / "manifest.json", manifest)
    return sum(c["written"] for c in inputs.values())


def fabricate_parts(out: Path, sizes: dict[str, int], parts: int, workers: int = 1, classes: int = 5000,
                    shard_size: int = 2000, seed: int = 1200) -> int:
    """The parts of an array build of an OpenImages-shaped set written directly (no reader, no image check):
    tiny JPEGs, sparse labels, every input written. For timing ``merge`` and ``verify`` at a million samples."""
    from shards.pool import pool_map, worker_pool

    tasks = [(Path(out), sizes, part, parts, classes, shard_size, seed) for part in range(parts)]
    with worker_pool(workers) as pool:
        return sum(pool_map(pool, _fabricate_part, tasks))


def _add_sizes(parser: argparse.ArgumentParser) -> None:
    """The set's size, the same flags for every subcommand that makes one."""
    parser.add_argument("--train", type=int, default=100_000, help="training images (100000)")
    parser.add_argument("--val", type=int, default=20_000, help="validation images (20000)")
    parser.add_argument("--test", type=int, default=20_000, help="test images (20000)")
    parser.add_argument("--classes", type=int, default=5000, help="trainable classes (5000)")


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and print one JSON line."""
    p = argparse.ArgumentParser(prog="python -m shards.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="fabricate an OpenImages v3 raw folder")
    m.add_argument("--out", type=Path, required=True)
    _add_sizes(m)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--images", action="store_true", help="also write a tiny JPEG per ImageID (hard links)")
    r = sub.add_parser("read", help="time one part's annotation read and slice")
    r.add_argument("--src", type=Path, required=True)
    r.add_argument("--part", type=int, default=0)
    r.add_argument("--parts", type=int, default=64)
    b = sub.add_parser("parts", help="build every part, the image check passed through")
    b.add_argument("--src", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--parts", type=int, default=8)
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    b.add_argument("--shard-size", type=int, default=2000)
    f = sub.add_parser("fabricate", help="write the parts of an array build directly, without raw data")
    f.add_argument("--out", type=Path, required=True)
    _add_sizes(f)
    f.add_argument("--parts", type=int, default=8)
    f.add_argument("--shard-size", type=int, default=2000)
    f.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.command == "make":
        res: dict = make_raw(args.out, args.train, args.val, args.test, args.classes, args.seed, args.images)
    elif args.command == "read":
        res = time_read(args.src, args.part, args.parts)
    elif args.command == "parts":
        res = {"build_s": round(build_parts(args.src, args.out, args.parts, args.workers, args.shard_size), 1)}
    else:
        res = {"samples": fabricate_parts(args.out, {"train": args.train, "val": args.val, "test": args.test},
                                          args.parts, args.workers, args.classes, args.shard_size)}
    print(json.dumps({"command": args.command, **res, "wall_s": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()
