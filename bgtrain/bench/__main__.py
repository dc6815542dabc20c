"""Dispatch ``python -m bgtrain.bench NAME [args]`` to ``bgtrain.bench.NAME.main(args)``.

Example::

    python -m bgtrain.bench evaluate --n 20000 --classes 200
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "evaluate": "bgtrain.bench.evaluate",
    "boostlu": "bgtrain.bench.boostlu",
    "loader": "bgtrain.bench.loader",
    "train": "bgtrain.bench.train",
    "llcp": "bgtrain.bench.llcp",
    "scale": "bgtrain.bench.scale",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark subcommand; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m bgtrain.bench {{{','.join(SUBCOMMANDS)}}} [args]\n"
              "example: python -m bgtrain.bench evaluate --n 20000 --classes 200\n"
              "each subcommand has its own --help")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    from bgtrain.process_env import prefer_huge_pages
    prefer_huge_pages()  # before the benchmark imports torch (moved here from bgtrain/__init__.py)
    if name not in SUBCOMMANDS:
        print(f"unknown benchmark {name!r}; choose one of {sorted(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as e:
        # Only "the benchmark module itself is missing" gets the friendly message; a missing
        # dependency inside it should show its real traceback.
        if e.name != SUBCOMMANDS[name]:
            raise
        print(f"benchmark {name!r} is not available: module {SUBCOMMANDS[name]} is missing", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="bgtrain.bench"))
