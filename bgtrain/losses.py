"""Losses for partially annotated multi-label training.

Every loss works on logits (B, C) and signed int8 labels (B, C): 1 positive, 0 negative, -1 unknown.
"Assume negative" (AN) reads -1 as 0 inside the loss; the data is never rewritten. Each loss returns a
:class:`LossOutput`; ``corrections`` marks entries whose training label becomes 1 for good (LL-Cp),
which the trainer hands to the :class:`bgtrain.labels.CorrectionStore`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bgtrain.config import LossConfig

LARGE_LOSS_DEFAULT_DELTA = {"LL-R": 0.005, "LL-Ct": 0.002, "LL-Cp": 0.001}
# Expected positives per image (EPR, ROLE), from the single-positive paper.
EXPECTED_POSITIVES = {"voc": 1.5, "coco": 2.9, "nuswide": 1.9, "cub": 31.4}


@dataclass
class LossOutput:
    loss: torch.Tensor
    selected: torch.Tensor                      # (B, C) bool: entries rejected or corrected this step
    corrections: Optional[torch.Tensor] = None  # (B, C) bool: labels that become 1 permanently


def _rows(valid: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.to(device, torch.bool)


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")


def _mean_over_entries(loss: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over all B*C entries of the valid rows; padded rows neither add loss nor count."""
    denom = rows.sum().clamp(min=1) * loss.shape[1]
    return (loss * rows[:, None]).sum() / denom


def large_loss_k(scheme: str, batch: int, num_classes: int, epoch: int, delta_rel: float) -> int:
    """How many unknown entries a large-loss scheme rejects or corrects at this (1-based) epoch."""
    if epoch <= 1:
        return 0
    if scheme == "LL-Cp":
        return math.ceil(batch * num_classes * delta_rel)
    return math.ceil(batch * num_classes * (epoch - 1) * delta_rel)


def select_large_losses(entry_loss: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Candidates whose loss is >= the k-th largest candidate loss (so ties can add entries)."""
    n_candidates = int(candidates.sum())
    if k <= 0 or n_candidates == 0:
        return torch.zeros_like(candidates)
    if k >= n_candidates:
        return candidates.clone()
    tau = entry_loss[candidates].topk(k).values[-1]
    return candidates & (entry_loss >= tau)


def large_loss(logits: torch.Tensor, labels: torch.Tensor, scheme: str, epoch: int,
               delta_rel: float | None = None, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full, AN and the large-loss schemes LL-R / LL-Ct / LL-Cp; returns (loss, selected)."""
    out = large_loss_output(logits, labels, scheme, epoch, delta_rel, valid)
    return out.loss, out.selected


def large_loss_output(logits: torch.Tensor, labels: torch.Tensor, scheme: str, epoch: int,
                      delta_rel: float | None = None, valid: torch.Tensor | None = None) -> LossOutput:
    """As :func:`large_loss`, with the permanent corrections of LL-Cp."""
    if epoch < 1:
        raise ValueError(f"epoch is 1-based, got {epoch}")
    rows = _rows(valid, labels.shape[0], labels.device)
    none = torch.zeros_like(labels, dtype=torch.bool)
    if scheme == "full":
        known = (labels >= 0) & rows[:, None]
        loss = (_bce(logits, labels == 1) * known).sum() / known.sum().clamp(min=1)
        return LossOutput(loss, none)
    if scheme not in ("AN", *LARGE_LOSS_DEFAULT_DELTA):
        raise ValueError(f"large_loss scheme must be full, AN, LL-R, LL-Ct or LL-Cp, got {scheme!r}")
    positive = labels == 1
    entry = _bce(logits, positive)
    if scheme == "AN":
        return LossOutput(_mean_over_entries(entry, rows), none)
    delta = LARGE_LOSS_DEFAULT_DELTA[scheme] if delta_rel is None else delta_rel
    candidates = (labels == -1) & rows[:, None]
    k = large_loss_k(scheme, int(rows.sum()), labels.shape[1], epoch, delta)
    selected = select_large_losses(entry.detach(), candidates, k)
    if scheme == "LL-R":
        entry = torch.where(selected, torch.zeros_like(entry), entry)
    else:  # LL-Ct / LL-Cp: the selected unknowns count as positives this step
        entry = torch.where(selected, _bce(logits, torch.ones_like(positive)), entry)
    corrections = selected if scheme == "LL-Cp" else None
    return LossOutput(_mean_over_entries(entry, rows), selected, corrections)


def label_smoothing(logits: torch.Tensor, labels: torch.Tensor, epsilon: float,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """AN targets smoothed to 1 - eps and eps."""
    target = torch.where(labels == 1, 1.0 - epsilon, epsilon)
    return _mean_over_entries(_bce(logits, target), _rows(valid, labels.shape[0], labels.device))


def asymmetric_loss(logits: torch.Tensor, labels: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float,
                    valid: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """ASL (Ridnik et al.) on AN targets: focusing per side and a shifted probability for negatives."""
    p = torch.sigmoid(logits.float())
    p_neg = (p - clip).clamp(min=0)
    pos_term = (1 - p) ** gamma_pos * torch.log(p.clamp(min=eps))
    neg_term = p_neg ** gamma_neg * torch.log((1 - p_neg).clamp(min=eps))
    entry = -torch.where(labels == 1, pos_term, neg_term)
    return _mean_over_entries(entry, _rows(valid, labels.shape[0], labels.device))


def expected_positive_regulariser(logits: torch.Tensor, labels: torch.Tensor, expected: float,
                                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """EPR: -log p on positives, plus (batch mean of sum_c p_c - k_hat)^2 / C^2, as in COLE's code."""
    rows = _rows(valid, labels.shape[0], labels.device)
    p = torch.sigmoid(logits.float())
    entry = torch.where(labels == 1, _bce(logits, torch.ones_like(p)), torch.zeros_like(p))
    expected_sum = (p.sum(1) * rows).sum() / rows.sum().clamp(min=1)
    return _mean_over_entries(entry, rows) + (expected_sum - expected) ** 2 / labels.shape[1] ** 2


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Binary entropy of sigmoid(logits), finite for any logit (p is never rounded to 0 or 1 first)."""
    x = logits.float()
    p = torch.sigmoid(x)
    return p * F.softplus(-x) + (1 - p) * F.softplus(x)


def entropy_maximisation(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """EM (Zhou et al.): -log p on positives, -alpha * H(p) on unknowns, BCE toward 0 on known negatives."""
    entry = torch.where(labels == 1, _bce(logits, torch.ones_like(logits, dtype=torch.float32)),
                        torch.where(labels == -1, -alpha * entropy_from_logits(logits),
                                    _bce(logits, torch.zeros_like(logits, dtype=torch.float32))))
    return _mean_over_entries(entry, _rows(valid, labels.shape[0], labels.device))


Criterion = Callable[..., LossOutput]
"""``criterion(logits, labels, epoch, valid=None, sample_ids=None) -> LossOutput``.

A criterion with per-sample state (ROLE, EM+APL) may also have ``after_step()``, called after each
optimizer step, ``end_epoch(epoch, score_train)``, called after each epoch with a function that
scores this rank's share of the training split, and ``state_dict`` / ``load_state_dict`` for checkpoints.
"""


def build_criterion(cfg: LossConfig, dataset: str, num_samples: int = 0, num_classes: int = 0,
                    **stateful: object) -> Criterion:
    """The training loss for a config; ``num_samples`` / ``num_classes`` size per-sample state and
    ``stateful`` (epochs, lr, seed) reaches ROLE / EM+APL."""
    scheme = cfg.scheme
    if scheme in ("full", "AN", *LARGE_LOSS_DEFAULT_DELTA):
        return lambda logits, labels, epoch, valid=None, sample_ids=None: large_loss_output(
            logits, labels, scheme, epoch, cfg.delta_rel, valid)

    def plain(fn: Callable[..., torch.Tensor]) -> Criterion:
        return lambda logits, labels, epoch, valid=None, sample_ids=None: LossOutput(
            fn(logits, labels, valid=valid), torch.zeros_like(labels, dtype=torch.bool))

    if scheme == "LS":
        return plain(lambda lg, lb, valid: label_smoothing(lg, lb, cfg.ls_epsilon, valid))
    if scheme == "ASL":
        return plain(lambda lg, lb, valid: asymmetric_loss(lg, lb, cfg.asl_gamma_neg, cfg.asl_gamma_pos,
                                                           cfg.asl_clip, valid))
    if scheme == "EPR":
        expected = cfg.expected_positives or EXPECTED_POSITIVES.get(dataset)
        if expected is None:
            raise ValueError(f"loss.expected_positives: no default for dataset {dataset!r}; set it in the config")
        return plain(lambda lg, lb, valid: expected_positive_regulariser(lg, lb, expected, valid))
    if scheme == "EM":
        from bgtrain.pseudo_labels import em_apl_params
        alpha = em_apl_params(cfg, dataset)[0]
        return plain(lambda lg, lb, valid: entropy_maximisation(lg, lb, alpha, valid))
    if scheme in ("ROLE", "EM-APL"):
        from bgtrain.pseudo_labels import build_stateful_criterion
        return build_stateful_criterion(cfg, dataset, num_samples, num_classes, **stateful)
    raise ValueError(f"loss.scheme: unknown scheme {scheme!r}")
