"""``python -m shards``: build, merge, verify, inspect and benchmark WebDataset shards."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bgtrain.cli import UsageError
from shards.readers import DATASETS

EXAMPLES = """examples:
  python -m shards build voc --src data/raw/voc --out data/shards/voc --workers 8
  python -m shards build openimages --src data/raw/oi --images /scratch/oi/images --out data/shards/oi \\
      --part 3 --parts 64
  python -m shards build openimages --src data/raw/oi --url-column Thumbnail300KURL --out data/shards/oi \\
      --download-workers 32 --per-host 8
  python -m shards build csv --src data/raw/mylist --out data/shards/mylist   # list rows may be https:// URLs
  python -m shards merge data/shards/oi --workers 8
  python -m shards verify data/shards/voc --workers 8
  python -m shards verify s3://bucket/shards/voc --workers 8   # or gs://, https://: each tar fetched once
  python -m shards stats data/shards/voc
  python -m shards bench --images data/raw/voc/VOCdevkit/VOC2012/JPEGImages --limit 500 --workers 2
  python -m shards synthetic --out data/smoke --classes 10 --train 200 --val 50 --test 50 --size 64
"""


def _location(text: str) -> str:
    """A shard folder: a URL kept as given (pathlib would fold ``s3://b`` into ``s3:/b``), a path normalised."""
    from bgtrain import storage

    return text if storage.is_remote(text) else str(Path(text))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="raw dataset -> shards + manifest", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read a dataset in its published layout, decode-check every image and write "
                                   "pre-shuffled tar shards, DALI indexes, index/{split}.jsonl, rejected.jsonl, "
                                   "missing.jsonl, problems.jsonl and manifest.json. Re-running resumes.")
    b.add_argument("dataset", choices=DATASETS)
    b.add_argument("--src", type=Path, required=True, help="raw dataset folder in its published layout")
    b.add_argument("--out", type=Path, required=True, help="output shard folder")
    b.add_argument("--images", type=Path, help="image root (nuswide, openimages, csv), if not under --src")
    b.add_argument("--classes", type=Path, help="csv: class names file (default SRC/classes.txt)")
    b.add_argument("--rest", default=None, metavar="unknown|negative|SPLIT=VALUE,...",
                   help="csv: value of classes a row does not list, for all splits or per split "
                        "(train=unknown,val=negative,test=negative); default: train unknown, val/test negative "
                        "unless their list gives negatives")
    b.add_argument("--max-side", type=int, default=512, help="shrink longer side to this; 0 keeps size (default 512)")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    b.add_argument("--shard-size", type=int, default=2000, help="samples per tar (default 2000)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all cores)")
    b.add_argument("--seed", type=int, default=1200, help="COLE seed of split/single positive and shard order")
    b.add_argument("--part", type=int, default=0, help="array builds: this part, 0-based (default 0)")
    b.add_argument("--parts", type=int, default=1, help="array builds: number of parts; then run merge (default 1)")
    b.add_argument("--dry-run", action="store_true", help="read annotations and stat files only; write nothing")
    d = b.add_argument_group(
        "images from URLs",
        "A csv list entry that starts with http:// or https://, or (openimages) the URL column of\n"
        "{split}/images.csv, is downloaded into --download-dir before its split is built. A file is written\n"
        "under DIR/.partial and renamed into place when complete: a killed build leaves no partial image, and a\n"
        "rerun fetches only what is not there yet (nothing for shards already done). 5xx, 408, 429, resets,\n"
        "timeouts and bodies shorter than their Content-Length are retried with exponential backoff; other\n"
        "4xx are not. A URL that still fails is missing, with its error, in missing.jsonl.")
    d.add_argument("--download-dir", type=Path, default=None, metavar="DIR",
                   help="where downloaded images are kept between runs (default: OUT/downloads, shared by all "
                        "--part runs); safe to delete once the build is done")
    d.add_argument("--download-workers", type=int, default=16, metavar="N", help="downloads at a time (default 16)")
    d.add_argument("--per-host", type=int, default=4, metavar="N", help="downloads at a time from one host (default 4)")
    d.add_argument("--download-timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for the connection and for every read (default 30)")
    d.add_argument("--download-retries", type=int, default=3, metavar="N",
                   help="further tries after a transient failure (default 3)")
    d.add_argument("--url-column", default=None, metavar="COLUMN",
                   help="openimages: download the images from this column of {split}/images.csv (e.g. OriginalURL "
                        "or Thumbnail300KURL); default: OriginalURL (or URL) when there is no image folder")

    m = sub.add_parser("merge", help="merge the parts of an array build", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Hard-link (or move) every part tar to its global name and renumber its sample "
                                   "ids in place (no image is copied), write the indexes, reports and one "
                                   "manifest.json, verify the result as `verify --no-decode` does, then remove "
                                   "OUT/parts. Stopped midway, it is run again; parts/ stays until the result "
                                   "verifies.")
    m.add_argument("out", type=Path, help="the --out folder the parts were built into")
    m.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes placing and verifying shards (default: all cores)")
    m.add_argument("--keep-parts", action="store_true",
                   help="keep OUT/parts after the merge verifies (its tars are hard links to the merged ones)")

    v = sub.add_parser("verify", help="re-hash, decode and count everything (a folder or URL)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("out", type=_location, metavar="OUT",
                   help="shard folder, or its URL (s3://, gs://, http(s)://; credentials and endpoint from the "
                        "store's standard configuration): each remote tar is fetched once into memory, one per "
                        "worker at a time, and checked as a local one; nothing is written to disk")
    v.add_argument("--no-decode", action="store_true", help="skip decoding the JPEGs (hashes and counts only)")
    v.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="shards checked at a time, one process each (default: all cores); the report is the same "
                        "for any number")

    s = sub.add_parser("stats", help="print the split and class tables (a folder or URL)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("out", type=_location, metavar="OUT",
                   help="shard folder, or its URL (s3://, gs://, http(s)://): only manifest.json is read")
    s.add_argument("--top", type=int, default=15, help="rarest and commonest classes shown (default 15); 0: all")

    be = sub.add_parser("bench", help="builder img/s per core vs a plain PIL loop", epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    be.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    be.add_argument("--max-side", type=int, default=512)
    be.add_argument("--quality", type=int, default=90)
    be.add_argument("--workers", type=int, default=1, help="builder processes (default 1)")
    be.add_argument("--repeat", type=int, default=1, help="runs per side; the best is kept (default 1)")
    be.add_argument("--limit", type=int, help="use at most this many images")

    sub.add_parser("synthetic", help="generate a synthetic dataset (see python -m shards synthetic --help)",
                   add_help=False)
    return p


def _build(args: argparse.Namespace) -> int:
    from rich.console import Console

    from shards.build import BuildOptions, build, dry_run
    from shards.download import DownloadOptions
    from shards.merge import part_dir
    from shards.readers import get_reader

    console = Console(stderr=True)
    for name in ("max_side", "quality", "shard_size", "workers", "parts", "download_workers", "per_host",
                 "download_timeout", "download_retries"):
        if getattr(args, name) < (0 if name in ("max_side", "download_retries") else 1e-9):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.src.exists():
        raise UsageError(f"--src {args.src}: no such folder")
    if args.url_column is not None and args.dataset != "openimages":
        raise UsageError(f"--url-column is for openimages; a {args.dataset} list gives URLs as its image paths")
    data = get_reader(args.dataset)(args.src, seed=args.seed, images=args.images, classes=args.classes,
                                    rest=args.rest, url_column=args.url_column)
    download = DownloadOptions(args.download_dir or args.out / "downloads", args.download_workers, args.per_host,
                               args.download_timeout, args.download_retries)
    opts = BuildOptions(args.max_side or None, args.quality, args.shard_size, args.seed, args.part, args.parts)
    for note in data.notes:
        console.print(f"[yellow]note[/]: {note}")
    problems = data.problems.summary()
    if problems:
        console.print(f"[yellow]annotation problems[/]: {problems}")
        for ex in data.problems.examples[:10]:
            console.print(f"  {ex['kind']}: {ex['where']}: {ex['detail']}")
    if args.dry_run:
        print(json.dumps({"dataset": data.name, "classes": len(data.classes), "annotation_problems": problems,
                          "splits": dry_run(data, opts, download.folder)}, indent=1))
        return 0
    out = part_dir(args.out, args.part) if args.parts > 1 else args.out
    tuning = ("command", "workers", "dry_run", "download_workers", "per_host", "download_timeout", "download_retries")
    build_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in tuning}
    m = build(data, out, opts, workers=args.workers, build_args=build_args, download=download)
    for split, c in m["inputs"].items():
        console.print(f"{split:>5}: {c['written']:,} written, {c['rejected']:,} rejected, {c['missing']:,} missing "
                      f"of {c['inputs']:,} ({c['reencoded']:,} re-encoded)")
    console.print(f"wrote {out}/manifest.json; reasons in rejected.jsonl, missing.jsonl, problems.jsonl")
    if args.parts > 1:
        console.print(f"part {args.part} of {args.parts} done; when all are, run: python -m shards merge {args.out}")
    return 0


def _synthetic_checks(argv: list[str]) -> list[str]:
    """``synthetic``: refuse counts that build nothing and a non-empty ``--out`` unless ``--overwrite``.

    With ``--overwrite`` an existing shard folder (one with a manifest.json) is deleted first, so no
    stale tar of the old dataset stays beside the new ones; any other non-empty folder is refused.
    Returns the arguments for the synthetic parser (``--overwrite`` removed).
    """
    import shutil

    if any(a in ("-h", "--help") for a in argv):
        print("python -m shards synthetic also takes --overwrite: replace an existing shard folder at --out")
        return argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--out", type=Path)
    pre.add_argument("--overwrite", action="store_true")
    for name in ("--shard-size", "--classes", "--size", "--max-objects"):
        pre.add_argument(name, type=int, default=1)
    for name in ("--train", "--val", "--test"):
        pre.add_argument(name, type=int, default=0)
    known, _ = pre.parse_known_args(argv)
    for name in ("shard_size", "classes", "size", "max_objects"):
        if getattr(known, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(known, name)}")
    for name in ("train", "val", "test"):
        if getattr(known, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(known, name)}")
    out = known.out
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not known.overwrite:
            raise UsageError(f"--out {out} is not empty; pass --overwrite to replace the shard folder there")
        # a shard folder, or what a killed synthetic build leaves: split folders and no manifest yet
        if not (out / "manifest.json").is_file() and not all(
                e.name in ("train", "val", "test", "manifest.json.partial") for e in out.iterdir()):
            raise UsageError(f"--out {out} is not empty and holds no manifest.json (not a shard folder); "
                             "--overwrite only replaces shard folders, choose an empty --out")
        shutil.rmtree(out)
    return [a for a in argv if a != "--overwrite"]


def main(argv: list[str] | None = None) -> int:
    """Dispatch a subcommand; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synthetic"]:  # its own parser and --help
        from shards.synthetic import main as synthetic_main
        synthetic_main(_synthetic_checks(argv[1:]))
        return 0
    args = _parser().parse_args(argv)
    if args.command == "build":
        return _build(args)
    if args.command == "merge":
        from shards.merge import merge
        if args.workers < 1:
            raise UsageError(f"--workers must be positive, got {args.workers}")
        m = merge(args.out, args.workers, keep_parts=args.keep_parts)
        print(json.dumps({s: i["num_samples"] for s, i in m["splits"].items()}))
        return 0
    if args.command == "verify":
        from shards.verify import verify
        if args.workers < 1:
            raise UsageError(f"--workers must be positive, got {args.workers}")
        errors = verify(args.out, decode=not args.no_decode, workers=args.workers)
        for e in errors[:50]:
            print(e)
        print(f"{len(errors)} problems" if errors else f"{args.out}: OK")
        return 1 if errors else 0
    if args.command == "stats":
        from shards.stats import show
        show(args.out, args.top or None)
        return 0
    if args.command == "bench":
        from shards.bench import main as bench_main
        bench_main(args)
        return 0
    return 2


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="shards"))
