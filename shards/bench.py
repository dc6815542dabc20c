"""``python -m shards bench --images DIR``: builder throughput against a plain PIL loop, same images, same run.

Prints JSON lines: the PIL baseline (single process: open, RGB, resize to max side, save JPEG), the
builder's image step (decode-check, keep or re-encode) with ``--workers`` processes, and last a line
with ``speedup_vs_pil`` = builder img/s per core / PIL img/s.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

from PIL import Image

from shards.build import CHUNK, process_chunk
from shards.images import target_size
from shards.pool import pool_map, worker_pool

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def pil_loop(paths: list[Path], max_side: int, quality: int) -> int:
    """The plain baseline: what a one-off conversion script does. Returns images done."""
    done = 0
    for p in paths:
        try:
            with Image.open(p) as opened:
                im = opened.convert("RGB")
                size = target_size(im.size, max_side)
                if size != im.size:
                    im = im.resize(size, Image.Resampling.BICUBIC)
                im.save(io.BytesIO(), format="JPEG", quality=quality)
                done += 1
        except OSError:
            pass
    return done


def builder_step(paths: list[Path], max_side: int, quality: int, workers: int) -> int:
    """The builder's per-image work, on ``workers`` processes. Returns images accepted."""
    items = [(i, str(p)) for i, p in enumerate(paths)]
    tasks = [(items[i: i + CHUNK], max_side, quality) for i in range(0, len(items), CHUNK)]
    with worker_pool(workers) as pool:
        results = pool_map(pool, process_chunk, tasks)
    return sum(1 for chunk in results for _, status, _ in chunk if status == "ok")


def run(images: Path, max_side: int = 512, quality: int = 90, workers: int = 1, repeat: int = 1,
        limit: int | None = None) -> list[dict]:
    """Time both and return the JSON records (last one has ``speedup_vs_pil``)."""
    paths = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in EXTS)[:limit]
    if not paths:
        raise FileNotFoundError(f"{images}: no image files ({', '.join(sorted(EXTS))})")
    for p in paths:  # warm the page cache so both sides read from memory
        p.read_bytes()
    records = []
    best = {}
    for name, fn, cores in (("pil_loop", lambda: pil_loop(paths, max_side, quality), 1),
                            ("builder", lambda: builder_step(paths, max_side, quality, workers), workers)):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t)
        sec = min(times)
        best[name] = len(paths) / sec / cores
        records.append({"what": name, "images": len(paths), "ok": n, "seconds": round(sec, 3), "cores": cores,
                        "img_per_s": round(len(paths) / sec, 1), "img_per_s_per_core": round(best[name], 1),
                        "max_side": max_side, "quality": quality})
    records.append({"what": "summary", "images": len(paths), "workers": workers,
                    "builder_img_per_s_per_core": round(best["builder"], 1),
                    "pil_img_per_s": round(best["pil_loop"], 1),
                    "speedup_vs_pil": round(best["builder"] / best["pil_loop"], 3)})
    return records


def main(args) -> None:
    """Print the records as JSON lines."""
    for r in run(args.images, args.max_side, args.quality, args.workers, args.repeat, args.limit):
        print(json.dumps(r), flush=True)
