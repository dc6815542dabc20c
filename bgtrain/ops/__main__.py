"""`python -m bgtrain.ops build`: build the BoostLU extensions now and print where they went and for which archs."""
from __future__ import annotations

import argparse
import json
import sys
import time

EPILOG = """examples:
  python -m bgtrain.ops build                      # CPU extension + CUDA extension for the visible GPU (or 8.0;9.0)
  python -m bgtrain.ops build --arch "8.0;9.0"     # CUDA archs to compile for (overrides TORCH_CUDA_ARCH_LIST)
  python -m bgtrain.ops build --cpu-only           # only the C++ CPU extension
  BGTRAIN_OPS_CACHE=/scratch/ops python -m bgtrain.ops build   # build cache elsewhere (default ~/.cache/bgtrain/ops)
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
    b.add_argument("--verbose", action="store_true", help="show compiler output")
    args = parser.parse_args(argv)

    from bgtrain.ops import extension

    start = time.perf_counter()
    try:
        infos = extension.build(archs=args.arch, cpu_only=args.cpu_only, verbose=args.verbose)
    except Exception as err:  # report the build failure as one clear line, not a traceback from ninja
        print(f"bgtrain.ops build failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    for info in infos:
        print(json.dumps({"extension": info.name, "path": str(info.path), "archs": info.archs,
                          "cache": str(extension.cache_root())}))
    print(f"built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
