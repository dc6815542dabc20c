"""``build_criterion``: the one place a loss config becomes a :class:`~bgtrain.losses.criterion.Criterion`."""
from __future__ import annotations

from bgtrain.config import LossConfig
from bgtrain.losses.criterion import Criterion, LargeLossCriterion, LossFunction
from bgtrain.losses.defaults import LARGE_LOSS_DEFAULT_DELTA, PAPER_EPOCHS, ROLE_LR, em_apl_params, expected_positives
from bgtrain.losses.em_apl import EmAplCriterion
from bgtrain.losses.functional import (
    asymmetric_loss,
    entropy_maximisation,
    expected_positive_regulariser,
    label_smoothing,
)
from bgtrain.losses.role import GIB, RoleCriterion, role_memory_gib


def build_criterion(cfg: LossConfig, dataset: str, num_samples: int = 0, num_classes: int = 0, *,
                    epochs: int = PAPER_EPOCHS, lr: float = ROLE_LR, seed: int = 0, batch_rows: int = 0) -> Criterion:
    """The training loss for a config; ``num_samples`` / ``num_classes`` size per-sample state, and
    ``epochs`` (APL passes), ``lr`` (ROLE table), ``seed`` and ``batch_rows`` (the per-rank batch size, which
    fixes the size of their per-step exchanges; 0 agrees on it at every step) reach ROLE / EM+APL."""
    scheme = cfg.scheme
    if scheme in ("full", "AN", *LARGE_LOSS_DEFAULT_DELTA):
        over = cfg.large_loss_over if scheme in LARGE_LOSS_DEFAULT_DELTA else "rank"  # full / AN select nothing
        return LargeLossCriterion(scheme, cfg.delta_rel, num_classes, over, batch_rows)
    if scheme == "LS":
        return LossFunction(lambda lg, lb, valid: label_smoothing(lg, lb, cfg.ls_epsilon, valid))
    if scheme == "ASL":
        return LossFunction(lambda lg, lb, valid: asymmetric_loss(lg, lb, cfg.asl_gamma_neg, cfg.asl_gamma_pos,
                                                                  cfg.asl_clip, valid))
    if scheme == "EPR":
        expected = expected_positives(cfg, dataset)
        return LossFunction(lambda lg, lb, valid: expected_positive_regulariser(lg, lb, expected, valid))
    if scheme == "EM":
        alpha = em_apl_params(cfg, dataset)[0]
        return LossFunction(lambda lg, lb, valid: entropy_maximisation(lg, lb, alpha, valid))
    if scheme in ("ROLE", "EM-APL"):
        return build_stateful_criterion(cfg, dataset, num_samples, num_classes, epochs=epochs, lr=lr, seed=seed,
                                        batch_rows=batch_rows)
    raise ValueError(f"loss.scheme: unknown scheme {scheme!r}")


def build_stateful_criterion(cfg: LossConfig, dataset: str, num_samples: int, num_classes: int, *,
                             epochs: int = PAPER_EPOCHS, lr: float = ROLE_LR, seed: int = 0,
                             batch_rows: int = 0) -> Criterion:
    """ROLE or EM+APL for ``num_samples`` training samples; ``epochs`` sizes the APL passes, ``lr`` is
    the ROLE table's learning rate."""
    if num_samples <= 0 or num_classes <= 0:
        raise ValueError(f"loss.scheme={cfg.scheme} needs the training split's size, got "
                         f"{num_samples} samples x {num_classes} classes")
    if cfg.scheme == "ROLE":
        table, total = role_memory_gib(num_samples, num_classes)
        if total > cfg.state_max_gib:
            raise ValueError(
                f"loss.scheme=ROLE keeps a label-estimate table of {num_samples} samples x {num_classes} classes: "
                f"{table:.1f} GiB, {total:.1f} GiB per rank with its gradient and Adam state, above "
                f"loss.state_max_gib={cfg.state_max_gib}. ROLE does not scale to this dataset; use a large-loss "
                f"scheme, or raise loss.state_max_gib if every device has the memory")
        return RoleCriterion(num_samples, num_classes, expected_positives(cfg, dataset), lr, seed, batch_rows)
    if cfg.scheme == "EM-APL":
        size = num_samples * num_classes * 4 / GIB
        if size > cfg.state_max_gib:
            raise ValueError(f"loss.scheme=EM-APL keeps a soft-label table of {num_samples} x {num_classes} "
                             f"({size:.1f} GiB, gathered whole for checkpoints), above loss.state_max_gib="
                             f"{cfg.state_max_gib}")
        alpha, beta, warmup = em_apl_params(cfg, dataset)
        return EmAplCriterion(num_samples, num_classes, alpha, beta, warmup, epochs, batch_rows)
    raise ValueError(f"loss.scheme: {cfg.scheme!r} has no per-sample state (ROLE or EM-APL)")
