"""ROLE (Cole et al., CVPR 2021): a criterion with a label-estimate table per sample.

Reference: github elijahcole/single-positive-multi-label, losses.py ``loss_role`` and models.py
``LabelEstimator``. A learnable N x C table of label-estimate logits, trained jointly with the model.
  * The table is **replicated** on every rank. After each step the ranks all-gather the table gradient
    rows of their batches (each sample is in exactly one rank's batch), so every rank applies the same
    dense Adam step and the copies stay bit-identical. This costs B x C floats per rank per step, and
    avoids a sharded lookup in the forward pass. Each rank pads its rows to the loader's batch size (id -1),
    so the gathers have a fixed size: no size round and no host read. The gathered gradient is divided by the
    world size: DDP averages the model's gradient over ranks, so the loss both see is the mean of the rank losses.
  * Adam is dense over the whole table, as in the reference: rows seen earlier keep drifting on their
    momentum, and rows never seen have zero moments, so they do not move.
  * The reference sets the observed entries of the table at start-up. The trainer cannot hand over the
    observed label matrix, so a row gets these values the first time its sample is seen. This is
    equivalent, because an unseen row is never updated (see above).
  * Memory: N x C x 4 bytes for the table, four times that with its gradient and Adam moments, on each
    rank. Above ``loss.state_max_gib`` it is refused (OpenImages: 3.6M x 5000 is 67 GiB for the table).

The losses use exact log-sigmoid terms. The references use ``-log(p + 1e-5)``, which differs from them
only for saturated scores.
"""
from __future__ import annotations

import math

import torch

from bgtrain.collectives import all_gather_padded, max_over_ranks, rank_and_world
from bgtrain.losses.criterion import Criterion
from bgtrain.losses.defaults import ROLE_ADAM_COPIES, ROLE_INIT_NEGATIVE, ROLE_INIT_POSITIVE, ROLE_INIT_UNKNOWN, ROLE_LR
from bgtrain.losses.functional import LossOutput, batch_mean_sum, bce, mean_over_entries, upcast, valid_rows

GIB = 2 ** 30


def logit(p: float) -> float:
    """log(p / (1 - p))."""
    return math.log(p / (1 - p))


def role_loss(logits: torch.Tensor, estimate_logits: torch.Tensor, labels: torch.Tensor, expected: float,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """ROLE's joint loss of the classifier f and the label estimate g (COLE's ``loss_role``).

    Per entry: 0.5 * (observed terms of f and g) + 0.5 * (BCE(f, sg(g)) + BCE(g, sg(f))); plus
    0.5 * (EPR(f) + EPR(g)) with EPR(x) = (batch mean of sum_c x - k_hat)^2 / C^2. The reference only
    sees positives; a known negative (label 0) gets the mirrored terms toward 0.
    """
    rows = valid_rows(valid, labels.shape[0], labels.device)
    p, e = torch.sigmoid(upcast(logits)), torch.sigmoid(upcast(estimate_logits))
    ones, zeros = torch.ones_like(p), torch.zeros_like(p)
    observed = torch.where(labels == 1, bce(logits, ones) + bce(estimate_logits, ones),
                           torch.where(labels == 0, bce(logits, zeros) + bce(estimate_logits, zeros), zeros))
    cross = bce(logits, e.detach()) + bce(estimate_logits, p.detach())
    num_classes = labels.shape[1]
    reg = ((batch_mean_sum(p, rows) - expected) ** 2 + (batch_mean_sum(e, rows) - expected) ** 2) / num_classes ** 2
    return mean_over_entries(0.5 * (observed + cross), rows) + 0.5 * reg


def role_memory_gib(num_samples: int, num_classes: int) -> tuple[float, float]:
    """(table, table + gradient + Adam moments) in GiB per rank."""
    table = num_samples * num_classes * 4 / GIB
    return table, table * ROLE_ADAM_COPIES


class RoleCriterion(Criterion):
    """ROLE with a replicated label-estimate table, updated by its own Adam after every step."""

    def __init__(self, num_samples: int, num_classes: int, expected: float, lr: float = ROLE_LR,
                 seed: int = 0, batch_rows: int = 0) -> None:
        self.num_samples, self.num_classes, self.expected, self.lr = num_samples, num_classes, expected, lr
        self.batch_rows = batch_rows  # per-rank batch size: the gathers' fixed size (0: agreed at every step)
        q = logit(0.5 + ROLE_INIT_UNKNOWN)
        generator = torch.Generator().manual_seed(seed)  # same table on every rank
        table = q * (2 * torch.rand(num_samples, num_classes, generator=generator) - 1)
        self.table = torch.nn.Parameter(table)
        self.seen = torch.zeros(num_samples, dtype=torch.bool)
        self._optimizer: torch.optim.Adam | None = None
        self._optimizer_state: dict | None = None
        self._pending: tuple | None = None

    def _to(self, device: torch.device) -> None:
        """Move the table and its Adam state to the training device (at the first step or after a load)."""
        if self._optimizer is not None and self.table.device == device:
            return
        state = self._optimizer.state_dict() if self._optimizer is not None else self._optimizer_state
        self.table = torch.nn.Parameter(self.table.detach().to(device))
        self.seen = self.seen.to(device)
        self._optimizer = torch.optim.Adam([self.table], lr=self.lr)
        if state:
            self._optimizer.load_state_dict(state)  # casts the moments to the table's device
        self._optimizer_state = None

    def _first_sight(self, rows: torch.Tensor, labels: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """Table rows with the observed entries of never-seen samples set to COLE's initial values."""
        fresh = fresh[:, None]
        rows = torch.where(fresh & (labels == 1), logit(ROLE_INIT_POSITIVE), rows)
        return torch.where(fresh & (labels == 0), logit(ROLE_INIT_NEGATIVE), rows)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, epoch: int, valid: torch.Tensor | None = None,
                 sample_ids: torch.Tensor | None = None) -> LossOutput:
        if sample_ids is None:
            raise ValueError("loss.scheme=ROLE needs the batch's sample ids")
        self._to(logits.device)
        rows = valid_rows(valid, labels.shape[0], logits.device)
        ids = torch.where(rows, sample_ids.to(logits.device).long(), 0)  # placeholders carry id -1
        estimate = self._first_sight(self.table.detach()[ids], labels, ~self.seen[ids]).requires_grad_(True)
        loss = role_loss(logits, estimate, labels, self.expected, rows)
        # The table's gradient is taken here, from this loss itself, not read from ``estimate.grad`` after the
        # engine's backward: that one is multiplied by the fp16 GradScaler's scale (which changes between steps,
        # and Adam's moments would mix differently scaled gradients) and by whatever else an engine applies to the
        # loss (1 / grad_accum, DeepSpeed's own loss scaler). This gradient is the unscaled fp32 one in every
        # engine and precision. Only the table's branch of the graph runs (the estimate does not reach the model);
        # the graph is kept for the engine's backward.
        (grad,) = torch.autograd.grad(loss, estimate, retain_graph=True)
        self._pending = (torch.where(rows, ids, -1), grad, labels, rows)
        return LossOutput(loss, torch.zeros_like(labels, dtype=torch.bool))

    def after_step(self, out: LossOutput | None = None, sample_ids: torch.Tensor | None = None) -> None:
        """One Adam step of the table on the gradient rows of every rank's batch (collective)."""
        if self._pending is None:
            return
        ids, grad, labels, rows = self._pending
        self._pending = None
        grad = torch.where(rows[:, None], grad.float(), 0.0)
        bound = self.batch_rows or max_over_ranks(ids.shape[0])
        world = rank_and_world()[1]  # Adam hardly sees this scale; it keeps the gradient that of the mean rank loss
        ids, labels = all_gather_padded(ids, bound, -1), all_gather_padded(labels, bound, -1)
        grad = all_gather_padded(grad, bound, 0.0) / world
        if ids.numel():
            self._first_sights(ids, labels)
        if not bool(torch.isfinite(grad).all()):  # non-finite logits (an fp16 overflow in the forward)
            return
        dense = torch.zeros_like(self.table)
        dense.index_put_((ids.clamp(min=0),), grad, accumulate=True)  # padding rows add +0.0 to row 0: no change
        self.table.grad = dense
        if self._optimizer is None:  # made by _to in __call__, which set _pending
            raise RuntimeError("ROLE: after_step without the table's optimizer (no loss call this step)")
        self._optimizer.step()
        self.table.grad = None

    def _first_sights(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the observed entries of the gathered rows' never-seen samples, and mark them seen (id -1: no sample).

        Rows without a sample become copies of the first real row, so that their writes repeat that row's own
        (index writes with repeated indices must agree); with no real row at all they point at row 0 and change
        nothing there. No host read.
        """
        valid = ids >= 0
        first = torch.argmax(valid.to(torch.uint8))
        copy = torch.where(valid, torch.arange(ids.shape[0], device=ids.device), first)
        at, valid_at = ids[copy].clamp(min=0), valid[copy]
        with torch.no_grad():
            fresh = ~self.seen[at] & valid_at
            self.table[at] = self._first_sight(self.table[at], labels[copy], fresh)
            self.seen[at] = self.seen[at] | valid_at

    def estimates(self) -> torch.Tensor:
        """The current label estimates sigmoid(table), (N, C)."""
        return torch.sigmoid(self.table.detach())

    def state_dict(self) -> dict:
        """Table, seen flags and Adam state (identical on every rank; CPU tensors)."""
        opt = self._optimizer.state_dict() if self._optimizer is not None else self._optimizer_state
        if opt:
            opt = {"state": {k: {n: (v.cpu() if torch.is_tensor(v) else v) for n, v in s.items()}
                             for k, s in opt["state"].items()}, "param_groups": opt["param_groups"]}
        return {"table": self.table.detach().cpu(), "seen": self.seen.cpu(), "optimizer": opt or {}}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["table"].shape) != (self.num_samples, self.num_classes):
            raise ValueError(f"ROLE table in the checkpoint is {tuple(state['table'].shape)}, this run has "
                             f"{self.num_samples} samples x {self.num_classes} classes")
        self.table = torch.nn.Parameter(state["table"].clone().float())
        self.seen = state["seen"].clone().bool()
        self._optimizer, self._optimizer_state = None, state["optimizer"] or None
