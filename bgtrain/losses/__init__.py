"""Losses for partially annotated multi-label training.

- :mod:`~bgtrain.losses.functional`: the stateless losses (LS, ASL, EPR, EM) and the pieces they share;
- :mod:`~bgtrain.losses.large_loss`: Full, AN and the large-loss rules LL-R / LL-Ct / LL-Cp;
- :mod:`~bgtrain.losses.criterion`: the :class:`Criterion` contract (call plus no-op hooks), and the criteria
  without per-sample state; LL-Cp's criterion owns its :class:`bgtrain.labels.CorrectionStore`;
- :mod:`~bgtrain.losses.role`, :mod:`~bgtrain.losses.em_apl`: the baselines with per-sample state;
- :mod:`~bgtrain.losses.defaults`: the papers' default settings;
- :mod:`~bgtrain.losses.factory`: :func:`build_criterion`.
"""
from bgtrain.losses.criterion import Criterion, LargeLossCriterion, LossFunction
from bgtrain.losses.defaults import EXPECTED_POSITIVES, LARGE_LOSS_DEFAULT_DELTA, em_apl_params
from bgtrain.losses.em_apl import EmAplCriterion, SoftNegativeStore, em_apl_loss
from bgtrain.losses.factory import build_criterion, build_stateful_criterion
from bgtrain.losses.functional import (
                                       LossOutput,
                                       asymmetric_loss,
                                       bce,
                                       entropy_from_logits,
                                       entropy_maximisation,
                                       expected_positive_regulariser,
                                       label_smoothing,
                                       mean_over_entries,
                                       valid_rows,
)
from bgtrain.losses.large_loss import (
    large_loss,
    large_loss_k,
    large_loss_output,
    select_large_losses,
    select_large_losses_global,
)
from bgtrain.losses.role import RoleCriterion, role_loss

__all__ = ["Criterion", "EXPECTED_POSITIVES", "EmAplCriterion", "LARGE_LOSS_DEFAULT_DELTA", "LargeLossCriterion",
           "LossFunction", "LossOutput", "RoleCriterion", "SoftNegativeStore", "asymmetric_loss", "bce",
           "build_criterion", "build_stateful_criterion", "em_apl_loss", "em_apl_params", "entropy_from_logits",
           "entropy_maximisation", "expected_positive_regulariser", "label_smoothing", "large_loss", "large_loss_k",
           "large_loss_output", "mean_over_entries", "role_loss", "select_large_losses",
           "select_large_losses_global", "valid_rows"]
