"""Functional losses for partially annotated multi-label training, and the pieces they share.

Every loss works on logits (B, C) and signed int8 labels (B, C): 1 positive, 0 negative, -1 unknown.
"Assume negative" (AN) reads -1 as 0 inside the loss; the data is never rewritten. ``valid`` (B,) marks
the rows that count; padded rows neither add loss nor count. Losses compute in float32, or in float64
when the logits are float64 (half-precision logits are upcast, float64 ones are never cast down).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    """What a criterion returns for one batch."""

    loss: torch.Tensor
    selected: torch.Tensor                      # (B, C) bool: entries rejected or corrected this step
    corrections: Optional[torch.Tensor] = None  # (B, C) bool: labels that become 1 permanently (LL-Cp)


def loss_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for anything narrower (bf16, fp16, ints)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype losses compute in (see :func:`loss_dtype`)."""
    return x.to(loss_dtype(x))


def valid_rows(valid: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """(n,) bool mask of the rows that count; all of them when ``valid`` is None."""
    return torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.to(device, torch.bool)


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-entry binary cross-entropy with logits, in the losses' dtype."""
    x = upcast(logits)
    return F.binary_cross_entropy_with_logits(x, target.to(x.dtype), reduction="none")


def mean_over_entries(loss: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over all B*C entries of the valid rows; padded rows neither add loss nor count."""
    denom = rows.sum().clamp(min=1) * loss.shape[1]
    return (loss * rows[:, None]).sum() / denom


def batch_mean_sum(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the valid rows of sum_c p."""
    return (p.sum(1) * rows).sum() / rows.sum().clamp(min=1)


def label_smoothing(logits: torch.Tensor, labels: torch.Tensor, epsilon: float,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """AN targets smoothed to 1 - eps and eps."""
    target = torch.where(labels == 1, 1.0 - epsilon, epsilon)
    return mean_over_entries(bce(logits, target), valid_rows(valid, labels.shape[0], labels.device))


def asymmetric_loss(logits: torch.Tensor, labels: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float,
                    valid: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """ASL (Ridnik et al.) on AN targets: focusing per side and a shifted probability for negatives."""
    p = torch.sigmoid(upcast(logits))
    p_neg = (p - clip).clamp(min=0)
    pos_term = (1 - p) ** gamma_pos * torch.log(p.clamp(min=eps))
    neg_term = p_neg ** gamma_neg * torch.log((1 - p_neg).clamp(min=eps))
    entry = -torch.where(labels == 1, pos_term, neg_term)
    return mean_over_entries(entry, valid_rows(valid, labels.shape[0], labels.device))


def expected_positive_regulariser(logits: torch.Tensor, labels: torch.Tensor, expected: float,
                                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """EPR: -log p on positives, plus (batch mean of sum_c p_c - k_hat)^2 / C^2, as in COLE's code."""
    rows = valid_rows(valid, labels.shape[0], labels.device)
    p = torch.sigmoid(upcast(logits))
    entry = torch.where(labels == 1, bce(logits, torch.ones_like(p)), torch.zeros_like(p))
    return mean_over_entries(entry, rows) + (batch_mean_sum(p, rows) - expected) ** 2 / labels.shape[1] ** 2


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Binary entropy of sigmoid(logits), finite for any logit (p is never rounded to 0 or 1 first)."""
    x = upcast(logits)
    p = torch.sigmoid(x)
    return p * F.softplus(-x) + (1 - p) * F.softplus(x)


def entropy_maximisation(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """EM (Zhou et al.): -log p on positives, -alpha * H(p) on unknowns, BCE toward 0 on known negatives."""
    x = upcast(logits)
    entry = torch.where(labels == 1, bce(x, torch.ones_like(x)),
                        torch.where(labels == -1, -alpha * entropy_from_logits(x), bce(x, torch.zeros_like(x))))
    return mean_over_entries(entry, valid_rows(valid, labels.shape[0], labels.device))
