"""BoostLU in plain torch: the definition every other implementation is tested against."""
from __future__ import annotations

import torch


def boostlu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """BoostLU(x) = alpha * x where x > 0, else x (the reference boosts strictly positive entries)."""
    return torch.where(x > 0, x * alpha, x)


def boostlu_pool(cam: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spatial mean of BoostLU(cam): (B, C, H, W) -> (B, C) logits."""
    return boostlu(cam, alpha).mean(dim=(2, 3))
