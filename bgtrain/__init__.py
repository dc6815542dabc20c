"""bgtrain: BoostLU and large-loss training for partially annotated multi-label data."""
import os
import sys

__version__ = "0.1.0"

# Large CPU tensors on transparent huge pages: a fresh 448 px float batch is ~77 MB, and the page faults of
# writing it cost more than the normalisation itself (1.6 -> 0.6 ms per image, docs/benchmarks.md). torch
# reads this once, at its first allocation, so it only takes effect when set before torch is imported,
# as the `python -m bgtrain.*` entry points do; an explicit value in the environment wins.
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
