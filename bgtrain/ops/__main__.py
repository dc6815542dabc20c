"""`python -m bgtrain.ops build`: build the BoostLU extensions now and print where they went and for which archs.

Run it once per node before the training ranks start (the sbatch scripts in slurm/ do, on GPU jobs), so no rank
compiles at its first step; a second run finds the build in the cache and compiles nothing. When the CUDA
extension cannot be built the command exits 1 with one line naming the cause (a CPU-only torch, no nvcc, nvcc's
CUDA major differing from torch's, a compiler error).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

EPILOG = """examples:
  python -m bgtrain.ops build                      # CPU extension + CUDA extension for the visible GPU (or 8.0;9.0)
  python -m bgtrain.ops build --arch "8.0;9.0"     # CUDA archs to compile for (overrides TORCH_CUDA_ARCH_LIST)
  python -m bgtrain.ops build --cpu-only           # only the C++ CPU extension
  python -m bgtrain.ops build --cache /scratch/ops  # build cache elsewhere (default $BGTRAIN_OPS_CACHE, else
                                                   # ~/.cache/bgtrain/ops); export BGTRAIN_OPS_CACHE=/scratch/ops
                                                   # for the training ranks so that they load this build
  srun --ntasks-per-node=1 python -m bgtrain.ops build --cache $BGTRAIN_OPS_CACHE   # once per node of a job
"""


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the build; prints one JSON line per extension."""
    parser = argparse.ArgumentParser(prog="python -m bgtrain.ops", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the extensions now", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--arch", default=None, help='CUDA arch list, e.g. "8.0;9.0" (default: $TORCH_CUDA_ARCH_LIST, '
                                                "else the visible GPUs, else 8.0;9.0)")
    b.add_argument("--cpu-only", action="store_true", help="build only the C++ CPU extension (no nvcc)")
    b.add_argument("--cache", metavar="DIR", default=None,
                   help="build cache folder (sets $BGTRAIN_OPS_CACHE for this build; default $BGTRAIN_OPS_CACHE, "
                        "else ~/.cache/bgtrain/ops)")
    b.add_argument("--verbose", action="store_true", help="show compiler output")
    args = parser.parse_args(argv)
    if args.cache:
        os.environ["BGTRAIN_OPS_CACHE"] = str(args.cache)

    from bgtrain.ops import extension

    start = time.perf_counter()
    try:
        infos = extension.build(archs=args.arch, cpu_only=args.cpu_only, verbose=args.verbose)
    except Exception as err:  # report the build failure as one clear line, not a traceback from ninja
        print(f"bgtrain.ops build failed: {extension.one_line(err)}", file=sys.stderr)
        return 1
    for info in infos:
        print(json.dumps({"extension": info.name, "path": str(info.path), "archs": info.archs,
                          "cache": str(extension.cache_root()), "reused": info.reused}))
    verb = "found in the cache" if all(info.reused for info in infos) else "built"
    print(f"{verb} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
