"""Full, AN and the large-loss schemes LL-R / LL-Ct / LL-Cp (Kim et al., CVPR 2022).

At epoch t >= 2 the k largest losses among a batch's unknown entries are rejected (LL-R) or counted as
positives (LL-Ct, and permanently for LL-Cp). The selection runs without a host sync: the threshold is the
k-th largest of the losses with non-candidates at -inf, so it is -inf (select every candidate) when k is at
least the number of candidates, exactly the rule of "k or all of them".
"""
from __future__ import annotations

import math

import torch

from bgtrain.losses.defaults import LARGE_LOSS_DEFAULT_DELTA
from bgtrain.losses.functional import LossOutput, bce, mean_over_entries, valid_rows


def large_loss_k(scheme: str, batch: int, num_classes: int, epoch: int, delta_rel: float) -> int:
    """How many unknown entries a large-loss scheme rejects or corrects at this (1-based) epoch."""
    if epoch <= 1:
        return 0
    if scheme == "LL-Cp":
        return math.ceil(batch * num_classes * delta_rel)
    return math.ceil(batch * num_classes * (epoch - 1) * delta_rel)


def select_large_losses(entry_loss: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Candidates whose loss is >= the k-th largest candidate loss (so ties can add entries); all
    candidates when there are at most k. No host sync."""
    k = min(k, entry_loss.numel())
    if k <= 0:
        return torch.zeros_like(candidates)
    masked = torch.where(candidates, entry_loss, torch.full_like(entry_loss, -math.inf))
    tau = masked.flatten().topk(k).values[-1]
    return candidates & (entry_loss >= tau)


def large_loss(logits: torch.Tensor, labels: torch.Tensor, scheme: str, epoch: int,
               delta_rel: float | None = None, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full, AN and the large-loss schemes LL-R / LL-Ct / LL-Cp; returns (loss, selected)."""
    out = large_loss_output(logits, labels, scheme, epoch, delta_rel, valid)
    return out.loss, out.selected


def large_loss_output(logits: torch.Tensor, labels: torch.Tensor, scheme: str, epoch: int,
                      delta_rel: float | None = None, valid: torch.Tensor | None = None,
                      num_valid: int | None = None) -> LossOutput:
    """As :func:`large_loss`, with the permanent corrections of LL-Cp.

    ``num_valid`` is the number of valid rows when the caller knows it on the host; otherwise it is
    counted from ``valid`` (a host read of that mask), or is the batch size when ``valid`` is None.
    """
    if epoch < 1:
        raise ValueError(f"epoch is 1-based, got {epoch}")
    rows = valid_rows(valid, labels.shape[0], labels.device)
    none = torch.zeros_like(labels, dtype=torch.bool)
    if scheme == "full":
        known = (labels >= 0) & rows[:, None]
        loss = (bce(logits, labels == 1) * known).sum() / known.sum().clamp(min=1)
        return LossOutput(loss, none)
    if scheme not in ("AN", *LARGE_LOSS_DEFAULT_DELTA):
        raise ValueError(f"large_loss scheme must be full, AN, LL-R, LL-Ct or LL-Cp, got {scheme!r}")
    positive = labels == 1
    entry = bce(logits, positive)
    if scheme == "AN":
        return LossOutput(mean_over_entries(entry, rows), none)
    delta = LARGE_LOSS_DEFAULT_DELTA[scheme] if delta_rel is None else delta_rel
    candidates = (labels == -1) & rows[:, None]
    if num_valid is None:
        num_valid = labels.shape[0] if valid is None else int(valid.sum())
    k = large_loss_k(scheme, num_valid, labels.shape[1], epoch, delta)
    selected = select_large_losses(entry.detach(), candidates, k)
    if scheme == "LL-R":
        entry = torch.where(selected, torch.zeros_like(entry), entry)
    else:  # LL-Ct / LL-Cp: the selected unknowns count as positives this step
        entry = torch.where(selected, bce(logits, torch.ones_like(positive)), entry)
    corrections = selected if scheme == "LL-Cp" else None
    return LossOutput(mean_over_entries(entry, rows), selected, corrections)
