"""Full, AN and the large-loss schemes LL-R / LL-Ct / LL-Cp (Kim et al., CVPR 2022).

At epoch t >= 2 the k largest losses among a batch's unknown entries are rejected (LL-R) or counted as
positives (LL-Ct, and permanently for LL-Cp). The selection runs without a host sync: the threshold is the
k-th largest of the losses with non-candidates at -inf, so it is -inf (select every candidate) when k is at
least the number of candidates, exactly the rule of "k or all of them".

Which batch the rule sees (``loss.large_loss_over``):

- ``rank`` (the default, the rule as it always was): each rank's own batch; k = ceil(B·C·Δ·(t−1)) with B that
  rank's rows, so W ranks select W·ceil(B·C·Δ·(t−1)) entries, each rank its own share.
- ``global``: the step's batches of all ranks, as one device holding their concatenation would
  (:func:`select_large_losses_global`). k is computed on the device from the step's global row count, each
  rank contributes its largest candidate losses in a fixed-size tensor padded with -inf (one all-gather, no
  host read), and every rank selects its own candidates at or above the global k-th largest. The rule is a
  threshold (every candidate >= τ is selected, ties included), so it needs no tie order: the selection equals
  :func:`select_large_losses` on the concatenated batch, entry for entry, at any split.
"""
from __future__ import annotations

import math

import torch

from bgtrain.collectives import all_gather_fixed, world_size
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


def large_loss_k_tensor(scheme: str, batch: torch.Tensor, num_classes: int, epoch: int,
                        delta_rel: float) -> torch.Tensor:
    """:func:`large_loss_k` for a row count held on the device (an int64 scalar): the same IEEE double product
    and ceiling as the host function, so the two agree exactly; no host read."""
    if epoch <= 1:
        return torch.zeros_like(batch, dtype=torch.int64)
    entries = batch.to(torch.int64) * (num_classes if scheme == "LL-Cp" else num_classes * (epoch - 1))
    return torch.ceil(entries.to(torch.float64) * delta_rel).to(torch.int64)


def select_large_losses_global(entry_loss: torch.Tensor, candidates: torch.Tensor, scheme: str, epoch: int,
                               delta_rel: float, rows: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """:func:`select_large_losses` over the step's batches of every rank (collective: one all-gather; no host read).

    ``entry_loss`` / ``candidates`` are this rank's (n, C); ``rows`` is an int64 scalar on the device, this rank's
    valid row count; ``batch_rows`` is the per-rank batch size, the same on every rank, which bounds n and fixes
    the exchange's size: every rank sends its ``min(K, batch_rows·C)`` largest candidate losses, K = k of a full
    global batch (``batch_rows`` × world), padded with -inf, and its row count. The global k (from the summed row
    counts, so a partial last batch gets the k its real rows give) picks the threshold τ among the gathered
    values; since each rank sent at least its top k, τ is the k-th largest candidate loss of the concatenation.
    """
    n, classes = entry_loss.shape
    if n > batch_rows:
        raise ValueError(f"{n} rows on this rank exceed the per-rank batch of {batch_rows} the global rule sizes for")
    k_max = large_loss_k(scheme, batch_rows * world_size(), classes, epoch, delta_rel)
    if k_max <= 0:
        return torch.zeros_like(candidates)
    width = min(k_max, batch_rows * classes)
    masked = torch.where(candidates, entry_loss, torch.full_like(entry_loss, -math.inf)).flatten()
    top = masked.topk(min(width, masked.numel())).values
    # float32 at least: the row count rides in the last slot, exact below 2**24 rows
    dtype = torch.promote_types(entry_loss.dtype, torch.float32)
    send = torch.full((width + 1,), -math.inf, dtype=dtype, device=entry_loss.device)
    send[: top.numel()] = top
    send[width] = rows.to(dtype)
    gathered = all_gather_fixed(send)  # (world, width + 1)
    k = large_loss_k_tensor(scheme, gathered[:, width].sum().to(torch.int64), classes, epoch, delta_rel)
    pool = gathered[:, :width].flatten()
    ranked = pool.topk(min(k_max, pool.numel())).values
    # k >= 1 whenever some rank has a row; k beyond the pool means "all candidates" (the last value is -inf then,
    # or the smallest candidate loss when every gathered value is a candidate's)
    index = (k.clamp(min=1, max=ranked.numel()) - 1).reshape(1)
    tau = ranked.index_select(0, index)[0]
    return candidates & (entry_loss.to(dtype) >= tau)


def large_loss(logits: torch.Tensor, labels: torch.Tensor, scheme: str, epoch: int,
               delta_rel: float | None = None, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full, AN and the large-loss schemes LL-R / LL-Ct / LL-Cp; returns (loss, selected)."""
    out = large_loss_output(logits, labels, scheme, epoch, delta_rel, valid)
    return out.loss, out.selected


def large_loss_output(logits: torch.Tensor, labels: torch.Tensor, scheme: str, epoch: int,
                      delta_rel: float | None = None, valid: torch.Tensor | None = None,
                      num_valid: int | None = None, over: str = "rank", batch_rows: int = 0) -> LossOutput:
    """As :func:`large_loss`, with the permanent corrections of LL-Cp.

    ``num_valid`` is the number of valid rows when the caller knows it on the host; otherwise it is
    counted from ``valid`` (a host read of that mask), or is the batch size when ``valid`` is None.
    ``over="global"`` selects over every rank's batch of the step (:func:`select_large_losses_global`, a
    collective every rank must join, with the per-rank batch size ``batch_rows``); the row count then stays on
    the device.
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
    if over == "global":
        if batch_rows <= 0:
            raise ValueError("large_loss_over=global needs the per-rank batch size (batch_rows), the same on all ranks")
        count = (torch.tensor(labels.shape[0] if num_valid is None else num_valid, device=labels.device)
                 if valid is None or num_valid is not None else valid.sum())
        selected = select_large_losses_global(entry.detach(), candidates, scheme, epoch, delta, count, batch_rows)
    elif over == "rank":
        if num_valid is None:
            num_valid = labels.shape[0] if valid is None else int(valid.sum())
        k = large_loss_k(scheme, num_valid, labels.shape[1], epoch, delta)
        selected = select_large_losses(entry.detach(), candidates, k)
    else:
        raise ValueError(f"large_loss_over must be rank or global, got {over!r}")
    if scheme == "LL-R":
        entry = torch.where(selected, torch.zeros_like(entry), entry)
    else:  # LL-Ct / LL-Cp: the selected unknowns count as positives this step
        entry = torch.where(selected, bce(logits, torch.ones_like(positive)), entry)
    corrections = selected if scheme == "LL-Cp" else None
    return LossOutput(mean_over_entries(entry, rows), selected, corrections)
