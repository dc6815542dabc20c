"""Loader throughput: ``dali`` and ``webdataset`` against the reference code's ``files`` baseline.

``files`` is what the reference BoostLU code does: a map-style Dataset that opens every JPEG with
PIL from an unpacked folder, then torchvision ``Resize((S, S))``, ``RandomHorizontalFlip``,
``ToTensor``, ``Normalize`` per sample, in a DataLoader with the same workers and batch size. The
tars are unpacked into a temporary folder first, outside the timed region. All backends read the
same images of the same split in the same run; each is timed over ``--batches`` batches after one
warm-up batch (worker start-up and pipeline build are not timed). One JSON line per backend, and a
last line ``{"speedup_vs_files": {...}}``.

Example::

    python -m bgtrain.bench loader --synthetic 600 --source-size 512 --image-size 224 --batches 15
    python -m bgtrain.bench loader --shards data/voc --backend dali webdataset files --workers 2

With ``--shards URL`` (``http(s)://``, ``s3://``, ``gs://``) the same shards are read three ways per backend: from
a local copy (downloaded first, untimed), from the URL by byte range, and from the URL through a node-local cache
(``data.cache_dir``), cold and then warm. Each line carries ``vs_local``, its ratio to the local read.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from bgtrain import storage
from bgtrain.config import Backend, DataConfig
from bgtrain.data import Batch, Loader, build_loader
from bgtrain.data.common import IMAGENET_MEAN, IMAGENET_STD, split_info
from bgtrain.distributed import WorldInfo
from shards.format import decode_labels, read_member

BACKENDS = ("dali", "webdataset", "files")


class FilesDataset(torch.utils.data.Dataset):
    """The reference code's dataset: one JPEG file per item, opened and transformed with PIL per sample."""

    def __init__(self, paths: list[Path], labels: np.ndarray, size: int) -> None:
        from torchvision import transforms
        self.paths, self.labels = paths, labels
        self.transform = transforms.Compose([
            transforms.Resize((size, size)), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            image = im.convert("RGB")
        return self.transform(image), torch.from_numpy(self.labels[i]), i


def unpack(shard_paths: Iterable[str | Path], out: Path, num_classes: int) -> tuple[list[Path], np.ndarray]:
    """Extract every sample's JPEG to ``out`` and return the file paths with dense observed label rows."""
    paths, rows = [], []
    for tar in shard_paths:
        with tarfile.open(tar) as t:
            members = {m.name: m for m in t.getmembers()}
            for name, member in members.items():
                if not name.endswith(".jpg"):
                    continue
                key = name[: -len(".jpg")]
                labels = decode_labels(read_member(t, members[key + ".lbl"]))
                path = out / name
                path.write_bytes(read_member(t, member))
                row = np.full(num_classes, -1, np.int8)
                row[list(labels.obs_pos)] = 1
                row[list(labels.obs_neg)] = 0
                paths.append(path)
                rows.append(row)
    return paths, np.stack(rows)


def _timed(batches: Iterable, n: int, batch_size: int) -> dict:
    """Images per second over ``n`` batches after the first (warm-up) one, and what that first one took (worker
    start-up, pipeline build, and for DALI from a URL the staging of the pass's byte spans)."""
    started = time.perf_counter()
    it = iter(batches)
    next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    seconds = time.perf_counter() - start
    return {"img_per_s": round(n * batch_size / seconds, 1), "seconds": round(seconds, 3),
            "first_batch_s": round(start - started, 3)}


def endless(loader: Loader) -> Iterator[Batch]:
    """Batches of ``loader`` across as many epochs as needed (closing the generator ends its workers)."""
    epoch = 1
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _endless_files(dataset: FilesDataset, batch_size: int, workers: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    while True:
        yield from loader


def run(shards: Path, backends: Sequence[str], batches: int, batch_size: int, workers: int, image_size: int,
        split: str = "train", files_from: Path | None = None) -> list[dict]:
    """Measure each backend on ``shards/split``; returns the JSON records, the speedup record last.

    ``files`` reads the JPEGs of ``files_from`` (default: the same shards), e.g. the original images that
    the shard builder shrank to ``--max-side``.
    """
    info = split_info(shards, split, "observed")
    files_info = split_info(files_from or shards, split, "observed")
    need = (batches + 1) * batch_size
    if info.num_samples < batch_size:
        raise ValueError(f"{shards / split}: {info.num_samples} samples, fewer than one batch of {batch_size}")
    records = []
    with tempfile.TemporaryDirectory(prefix="bgtrain-files-") as tmp:
        if "files" in backends:
            paths, labels = unpack(files_info.shard_paths, Path(tmp), info.num_classes)
        for backend in backends:
            if backend == "files":
                stream = _endless_files(FilesDataset(paths, labels, image_size), batch_size, workers)
            else:
                # not 'files', so one of the loader backends (the CLI's choices)
                cfg = DataConfig(shards=str(shards), backend=cast(Backend, backend), image_size=image_size,
                                 batch_size=batch_size,
                                 workers=workers, shuffle_buffer=min(256, info.num_samples))
                stream = endless(build_loader(cfg, split, WorldInfo(), torch.device("cpu"), train=True, seed=0))
            rec = {"backend": backend, **_timed(stream, batches, batch_size), "batches": batches,
                   "batch_size": batch_size, "workers": workers, "image_size": image_size,
                   "epochs_wrapped": need > info.num_samples}
            del stream
            gc.collect()  # the loader and its backend refer to each other: this ends its workers / pipeline now
            records.append(rec)
            print(json.dumps(rec), flush=True)
    base = next((r["img_per_s"] for r in records if r["backend"] == "files"), None)
    if base:
        speedup = {r["backend"]: round(r["img_per_s"] / base, 2) for r in records if r["backend"] != "files"}
        records.append({"speedup_vs_files": speedup})
        print(json.dumps(records[-1]), flush=True)
    return records


def run_remote(url: str, backends: Sequence[str], batches: int, batch_size: int, workers: int, image_size: int,
               split: str = "train") -> list[dict]:
    """Local copy vs URL vs URL through the cache (cold, warm), per backend; returns the JSON records."""
    from shards.format import read_manifest

    manifest = read_manifest(url)
    records = []
    with tempfile.TemporaryDirectory(prefix="bgtrain-bench-remote-") as tmp:
        local, cache = Path(tmp) / "local", Path(tmp) / "cache"
        (local / split).mkdir(parents=True)
        started = time.perf_counter()
        for entry in manifest["splits"][split]["shards"]:
            for name in (entry["name"], storage.with_suffix(entry["name"], ".idx")):
                storage.download(storage.join(url, split, name), local / split / name)
        storage.write_bytes(str(local / "manifest.json"), storage.read_bytes(storage.join(url, "manifest.json")))
        fetched = {"download_s": round(time.perf_counter() - started, 3),
                   "bytes": sum(e.get("bytes", 0) for e in manifest["splits"][split]["shards"])}
        print(json.dumps({"local_copy": fetched}), flush=True)
        sources = (("local", str(local), None), ("url", url, None), ("url+cache cold", url, str(cache)),
                   ("url+cache warm", url, str(cache)))
        for backend in backends:
            base = None
            for source, shards, cache_dir in sources:
                cfg = DataConfig(shards=shards, backend=cast(Backend, backend), image_size=image_size,
                                 batch_size=batch_size, workers=workers, cache_dir=cache_dir,
                                 shuffle_buffer=min(256, sum(e["num_samples"] for e in
                                                             manifest["splits"][split]["shards"])))
                stream = endless(build_loader(cfg, split, WorldInfo(), torch.device("cpu"), train=True, seed=0))
                retries = storage.COUNTERS["retries"]
                rec = {"backend": backend, "source": source, **_timed(stream, batches, batch_size),
                       "batches": batches, "batch_size": batch_size, "workers": workers, "image_size": image_size}
                del stream
                gc.collect()  # ends the loader's workers before the next source is timed (a reference cycle)
                base = base or rec["img_per_s"]
                rec["vs_local"] = round(rec["img_per_s"] / base, 3)
                rec["retries_in_process"] = storage.COUNTERS["retries"] - retries  # loader workers count their own
                records.append(rec)
                print(json.dumps(rec), flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``python -m bgtrain.bench loader``."""
    parser = argparse.ArgumentParser(
        prog="python -m bgtrain.bench loader",
        description="Images per second of the DALI and WebDataset loaders against the reference code's "
                    "per-file PIL Dataset, on the same shards in the same run (JSON lines).",
        epilog="example: python -m bgtrain.bench loader --synthetic 600 --source-size 512 --image-size 224 "
               "--batches 15 --backend dali webdataset files")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shard folder with manifest.json (from `python -m shards`), or its URL "
                                      "(s3://, gs://, http(s)://): then local vs URL vs URL+cache reads of it")
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="build N synthetic training images into a temporary shard folder instead")
    parser.add_argument("--source-size", type=int, default=512, help="side of synthetic source images (512)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="synthetic mode: shrink the shards' images to this longer side, as `python -m shards "
                             "build --max-side` does, while `files` reads the originals (default: no shrink)")
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="backends to measure, in this order (default: all three)")
    parser.add_argument("--split", default="train", help="split to read (default train)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per backend (default 20)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers / DALI threads (default 2)")
    parser.add_argument("--image-size", type=int, default=448, help="output side in pixels (default 448)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1 or args.workers < 0:
        parser.error("--batches and --batch-size must be >= 1, --workers >= 0")
    if args.shards is not None and storage.is_remote(args.shards):
        backends = [b for b in args.backend if b != "files"] or ["webdataset"]
        run_remote(args.shards, backends, args.batches, args.batch_size, args.workers, args.image_size, args.split)
        return 0
    if args.synthetic is None:
        run(Path(args.shards), args.backend, args.batches, args.batch_size, args.workers, args.image_size, args.split)
        return 0
    from shards.synthetic import build
    with tempfile.TemporaryDirectory(prefix="bgtrain-bench-shards-") as tmp:
        originals = Path(tmp) / "originals"
        build(originals, num_classes=20, n_train=args.synthetic, n_val=0, n_test=1, size=args.source_size,
              seed=0, shard_size=max(1, args.synthetic // 4))
        shards = originals
        if args.max_side:
            shards = shrink_shards(originals, Path(tmp) / "shrunk", args.max_side, args.split)
        run(shards, args.backend, args.batches, args.batch_size, args.workers, args.image_size, args.split,
            files_from=originals)
    return 0


def shrink_shards(src: Path, out: Path, max_side: int, split: str) -> Path:
    """A copy of ``src/split`` whose images went through the shard builder's shrink (``shards.images.prepare``)."""
    from shards.format import ShardWriter, read_manifest, write_json_atomic
    from shards.images import prepare
    manifest = read_manifest(src)
    (out / split).mkdir(parents=True)
    entries = []
    for entry in manifest["splits"][split]["shards"]:
        writer = ShardWriter(out / split / entry["name"])
        with tarfile.open(src / split / entry["name"]) as t:
            members = {m.name: m for m in t.getmembers()}
            for name in members:
                if name.endswith(".jpg"):
                    key = name[: -len(".jpg")]
                    jpeg, _ = prepare(read_member(t, members[name]), max_side)
                    labels = decode_labels(read_member(t, members[key + ".lbl"]))
                    writer.write(key, jpeg, labels, manifest["classes"])
        entries.append(writer.close())
    manifest["splits"] = {split: {**manifest["splits"][split], "shards": entries}}
    write_json_atomic(out / "manifest.json", manifest)
    return out


if __name__ == "__main__":
    sys.exit(main())
