"""Process-wide settings that command-line entry points make before torch is imported.

Library imports never change the environment; ``python -m bgtrain.train`` / ``bgtrain.explain`` /
``bgtrain.bench`` call :func:`prefer_huge_pages` first thing in ``main``, before their lazy torch imports.
This module must not import torch.
"""
from __future__ import annotations

import os
import sys


def prefer_huge_pages() -> bool:
    """Put large CPU tensors on transparent huge pages; True if the setting can still take effect.

    A fresh 448 px float batch is ~77 MB, and the page faults of writing it cost more than the normalisation
    itself (1.6 -> 0.6 ms per image, docs/benchmarks.md). torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its
    first allocation, so this only works before torch is imported; an explicit value in the environment wins.
    """
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return True
