"""The two baselines with per-sample state: ROLE (Cole et al., CVPR 2021) and EM+APL (Zhou et al., ECCV 2022).

Both follow the criterion contract of :mod:`bgtrain.losses`: ``criterion(logits, labels, epoch, valid,
sample_ids) -> LossOutput``, plus ``after_step()``, ``end_epoch(epoch, score_train)`` and
``state_dict()`` / ``load_state_dict()``, which the trainer calls on every rank.

ROLE (reference: github elijahcole/single-positive-multi-label, losses.py ``loss_role`` and models.py
``LabelEstimator``): a learnable N x C table of label-estimate logits, trained jointly with the model.
  * The table is **replicated** on every rank. After each step the ranks all-gather the table gradient
    rows of their batches (each sample is in exactly one rank's batch), so every rank applies the same
    dense Adam step and the copies stay bit-identical. This costs B x C floats per rank per step, and
    avoids a sharded lookup in the forward pass. The gathered gradient is divided by the world size:
    DDP averages the model's gradient over ranks, so the loss both see is the mean of the rank losses.
  * Adam is dense over the whole table, as in the reference: rows seen earlier keep drifting on their
    momentum, and rows never seen have zero moments, so they do not move.
  * The reference sets the observed entries of the table at start-up. The trainer cannot hand over the
    observed label matrix, so a row gets these values the first time its sample is seen. This is
    equivalent, because an unseen row is never updated (see above).
  * Memory: N x C x 4 bytes for the table, four times that with its gradient and Adam moments, on each
    rank. Above ``loss.state_max_gib`` it is refused (OpenImages: 3.6M x 5000 is 67 GiB for the table).

EM+APL (reference: github Correr-Zhou/SPML-AckTheUnknown, losses.py ``loss_EM_APL`` and main.py
``aysmmetric_pseudo_labeling``): EM, and after every epoch ``t >= warm-up`` a pseudo-labelling pass.
  * For each class, the ``int(0.9 * U_c / (epochs - warm-up))`` lowest-scored entries that are still
    unknown become soft negatives. ``U_c`` is the number of unknowns of class c in the training split.
    Their target is the score p they had then, and their loss is ``beta * BCE(p_now, p)``.
  * The selection is global over all ranks. Per class, the k-th smallest (score, sample id) key is found
    by bisection, with one all-reduce of C counts per step. Ties are broken by sample id; the
    reference's ``np.argsort`` breaks them in an unspecified order.
  * The targets live in a :class:`SoftNegativeStore` sharded by sample id, like
    :class:`bgtrain.labels.CorrectionStore`, and are looked up per batch on the device.

``bgtrain.losses.build_criterion`` passes only ``cfg.loss``, so the APL pass count assumes the papers' 10
epochs and the ROLE table learns at 1e-4 (10 x the recipe's lr 1e-5) unless the caller passes ``epochs`` /
``lr`` to :func:`build_stateful_criterion`.

The losses use exact log-sigmoid terms. The references use ``-log(p + 1e-5)``, which differs from them
only for saturated scores.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from bgtrain.config import LossConfig
from bgtrain.distributed import all_gather_rows
from bgtrain.losses import EXPECTED_POSITIVES, LossOutput, _bce, _mean_over_entries, _rows, entropy_from_logits

GIB = 2 ** 30
PAPER_EPOCHS = 10  # both references train for 10 epochs end to end

# ROLE, from COLE's models.py (LabelEstimator) and train.py.
ROLE_INIT_UNKNOWN = 0.1   # unknown entries start uniform in logit(0.5 +- 0.1)
ROLE_INIT_POSITIVE = 0.995
ROLE_INIT_NEGATIVE = 0.005
ROLE_LR = 1e-4            # the table learns at lr_mult (10) x the model lr; the paper's recipe has lr 1e-5
ROLE_ADAM_COPIES = 4      # table, its gradient, Adam's two moments

# EM+APL, from SPML-AckTheUnknown main.py (keys renamed: "pascal" -> "voc"). The reference also uses
# batch 8 on VOC and CUB, and lr 1e-4 on CUB; bgtrain's configs keep the shared recipe for those.
# Datasets the paper did not cover (synthetic, OpenImages, CSV) use these unless the config says otherwise.
GENERIC_EM_APL = {"alpha": 0.1, "beta": 0.1, "warmup": 1}
EM_APL_PAPER = {
    "voc": {"alpha": 0.2, "beta": 0.02, "warmup": 5},
    "coco": {"alpha": 0.1, "beta": 0.9, "warmup": 5},
    "nuswide": {"alpha": 0.1, "beta": 0.2, "warmup": 4},
    "cub": {"alpha": 0.01, "beta": 0.4, "warmup": 3},
}
APL_NEG_PROPORTION = 0.9  # share of each class's unknowns that becomes soft negatives over all passes
NO_TARGET = -1.0          # a soft-negative table entry that was not pseudo-labelled
_KEY_BITS = 62            # (float32 bits of a score in [0, 1]) << 32 | sample id stays below 2**62


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _batch_mean_sum(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the valid rows of sum_c p."""
    return (p.sum(1) * rows).sum() / rows.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------- ROLE
def role_loss(logits: torch.Tensor, estimate_logits: torch.Tensor, labels: torch.Tensor, expected: float,
              valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ROLE's joint loss of the classifier f and the label estimate g (COLE's ``loss_role``).

    Per entry: 0.5 * (observed terms of f and g) + 0.5 * (BCE(f, sg(g)) + BCE(g, sg(f))); plus
    0.5 * (EPR(f) + EPR(g)) with EPR(x) = (batch mean of sum_c x - k_hat)^2 / C^2. The reference only
    sees positives; a known negative (label 0) gets the mirrored terms toward 0.
    """
    rows = _rows(valid, labels.shape[0], labels.device)
    p, e = torch.sigmoid(logits.float()), torch.sigmoid(estimate_logits.float())
    ones, zeros = torch.ones_like(p), torch.zeros_like(p)
    observed = torch.where(labels == 1, _bce(logits, ones) + _bce(estimate_logits, ones),
                           torch.where(labels == 0, _bce(logits, zeros) + _bce(estimate_logits, zeros), zeros))
    cross = _bce(logits, e.detach()) + _bce(estimate_logits, p.detach())
    num_classes = labels.shape[1]
    reg = ((_batch_mean_sum(p, rows) - expected) ** 2 + (_batch_mean_sum(e, rows) - expected) ** 2) / num_classes ** 2
    return _mean_over_entries(0.5 * (observed + cross), rows) + 0.5 * reg


def role_memory_gib(num_samples: int, num_classes: int) -> tuple[float, float]:
    """(table, table + gradient + Adam moments) in GiB per rank."""
    table = num_samples * num_classes * 4 / GIB
    return table, table * ROLE_ADAM_COPIES


class RoleCriterion:
    """ROLE with a replicated label-estimate table, updated by its own Adam after every step."""

    def __init__(self, num_samples: int, num_classes: int, expected: float, lr: float = ROLE_LR,
                 seed: int = 0) -> None:
        self.num_samples, self.num_classes, self.expected, self.lr = num_samples, num_classes, expected, lr
        q = _logit(0.5 + ROLE_INIT_UNKNOWN)
        generator = torch.Generator().manual_seed(seed)  # same table on every rank
        table = q * (2 * torch.rand(num_samples, num_classes, generator=generator) - 1)
        self.table = torch.nn.Parameter(table)
        self.seen = torch.zeros(num_samples, dtype=torch.bool)
        self._optimizer: Optional[torch.optim.Adam] = None
        self._optimizer_state: Optional[dict] = None
        self._pending: Optional[tuple] = None

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
        rows = torch.where(fresh & (labels == 1), _logit(ROLE_INIT_POSITIVE), rows)
        return torch.where(fresh & (labels == 0), _logit(ROLE_INIT_NEGATIVE), rows)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, epoch: int, valid: Optional[torch.Tensor] = None,
                 sample_ids: Optional[torch.Tensor] = None) -> LossOutput:
        if sample_ids is None:
            raise ValueError("loss.scheme=ROLE needs the batch's sample ids")
        self._to(logits.device)
        rows = _rows(valid, labels.shape[0], logits.device)
        ids = torch.where(rows, sample_ids.to(logits.device).long(), 0)  # placeholders carry id -1
        estimate = self._first_sight(self.table.detach()[ids], labels, ~self.seen[ids]).requires_grad_(True)
        self._pending = (ids[rows], estimate, labels[rows], rows)
        loss = role_loss(logits, estimate, labels, self.expected, rows)
        return LossOutput(loss, torch.zeros_like(labels, dtype=torch.bool))

    def after_step(self) -> None:
        """One Adam step of the table on the gradient rows of every rank's batch (collective)."""
        if self._pending is None:
            return
        ids, estimate, labels, rows = self._pending
        self._pending = None
        grad = estimate.grad[rows] if estimate.grad is not None else torch.zeros_like(estimate[rows])
        world = _world()[1]  # Adam hardly sees this scale; it keeps the gradient that of the mean rank loss
        ids, labels, grad = all_gather_rows(ids), all_gather_rows(labels), all_gather_rows(grad.float()) / world
        with torch.no_grad():
            fresh = ~self.seen[ids]
            self.table[ids] = self._first_sight(self.table[ids], labels, fresh)
            self.seen[ids] = True
        if not bool(torch.isfinite(grad).all()):  # an fp16 overflow step: the model's optimizer skips it too
            return
        dense = torch.zeros_like(self.table)
        dense.index_put_((ids,), grad, accumulate=True)
        self.table.grad = dense
        self._optimizer.step()
        self.table.grad = None

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


# --------------------------------------------------------------------------------------------- EM+APL
def em_apl_loss(logits: torch.Tensor, labels: torch.Tensor, soft: Optional[torch.Tensor], alpha: float,
                beta: float, valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EM+APL (``loss_EM_APL``): -log p on positives, BCE to 0 on known negatives, beta * BCE(p, s) on
    pseudo-labelled unknowns (soft target s >= 0), -alpha * H(p) on the other unknowns; mean over B*C.

    Returns (loss, pseudo-labelled mask).
    """
    x = logits.float()
    pseudo = (labels == -1) & (soft >= 0) if soft is not None else torch.zeros_like(labels, dtype=torch.bool)
    target = soft.clamp(min=0) if soft is not None else torch.zeros_like(x)
    entry = torch.where(labels == 1, _bce(x, torch.ones_like(x)), _bce(x, torch.zeros_like(x)))
    entry = torch.where(labels == -1, -alpha * entropy_from_logits(x), entry)
    entry = torch.where(pseudo, beta * _bce(x, target), entry)
    rows = _rows(valid, labels.shape[0], labels.device)
    return _mean_over_entries(entry, rows), pseudo & rows[:, None]


def apl_counts(unknown_per_class: torch.Tensor, epochs: int, warmup: int) -> torch.Tensor:
    """Soft negatives per class and pass: ``int(0.9 * U_c / (epochs - warmup))`` as in the reference."""
    passes = max(epochs - warmup, 1)
    return torch.tensor([int(APL_NEG_PROPORTION * int(u) / passes) for u in unknown_per_class.tolist()],
                        dtype=torch.long)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def kth_smallest_keys(sorted_keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row c, the smallest key v with #(keys <= v) >= k[c], counted over every rank (collective).

    ``sorted_keys`` (C, n) holds this rank's keys per class in ascending order, non-candidates as int64
    max. The bisection runs a fixed number of steps so that every rank does the same collectives.
    """
    lo = torch.full_like(k, -1)
    hi = torch.full_like(k, 2 ** _KEY_BITS)
    for _ in range(_KEY_BITS + 1):
        mid = lo + (hi - lo) // 2
        count = _all_reduce(torch.searchsorted(sorted_keys, mid[:, None].contiguous(), right=True)[:, 0])
        enough = count >= k
        hi, lo = torch.where(enough, mid, hi), torch.where(enough, lo, mid)
    return hi


class SoftNegativeStore:
    """EM+APL's soft-negative targets, sharded by sample id: rank r owns the ids with ``id % world == r``.

    A pass and a lookup are collectives. Checkpoints hold the whole (N, C) table, so a resume may
    change the world size.
    """

    def __init__(self, num_samples: int, num_classes: int, rank: int = 0, world: int = 1) -> None:
        if num_samples >= 2 ** 32:
            raise ValueError(f"EM+APL: {num_samples} samples; sample ids must fit in 32 bits")
        self.num_samples, self.num_classes, self.rank, self.world = num_samples, num_classes, rank, world
        owned = len(range(rank, num_samples, world))
        self.table = torch.full((owned, num_classes), NO_TARGET)
        self.active = False  # True after the first pass, on every rank alike

    def _to(self, device: torch.device) -> None:
        if self.table.device != device:
            self.table = self.table.to(device)

    def lookup(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """(B, C) targets of these samples, NO_TARGET where none (collective; -1 ids get none)."""
        device = sample_ids.device
        self._to(device)
        wanted = all_gather_rows(sample_ids.long())
        mine = torch.unique(wanted[(wanted >= 0) & (wanted % self.world == self.rank)])
        found_ids = all_gather_rows(mine)
        found = all_gather_rows(self.table[mine // self.world])
        out = torch.full((sample_ids.numel(), self.num_classes), NO_TARGET, device=device)
        if found_ids.numel() == 0:
            return out
        order = torch.argsort(found_ids)
        found_ids, found = found_ids[order], found[order]
        pos = torch.searchsorted(found_ids, sample_ids.long()).clamp(max=found_ids.numel() - 1)
        hit = found_ids[pos] == sample_ids
        out[hit] = found[pos[hit]]
        return out

    def _route_to_owners(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Rows of (ids, ...) moved to the rank that owns each id (collective)."""
        ids = tensors[0]
        kept: list[torch.Tensor] = []
        for owner in range(self.world):
            sel = ids % self.world == owner
            parts = [all_gather_rows(t[sel]) for t in tensors]
            if owner == self.rank:
                kept = parts
        return kept

    def pseudo_label(self, scores: torch.Tensor, observed: torch.Tensor, sample_ids: torch.Tensor,
                     epochs: int, warmup: int) -> int:
        """One APL pass over this rank's share of the training split; returns the global count labelled."""
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("EM+APL: non-finite training scores in the pseudo-labelling pass")
        self._to(scores.device)
        ids, scores, observed = self._route_to_owners(sample_ids.long(), scores.float().clamp(0, 1), observed)
        unknown = observed == -1
        k = apl_counts(_all_reduce(unknown.sum(0).long()), epochs, warmup).to(scores.device)
        local = ids // self.world
        candidate = unknown & (self.table[local] < 0)
        # Probabilities are >= 0, so their float32 bit patterns sort like the values.
        keys = (scores.contiguous().view(torch.int32).long() << 32) | ids[:, None]
        keys = torch.where(candidate, keys, torch.iinfo(torch.long).max)
        tau = kth_smallest_keys(keys.t().sort(dim=1).values.contiguous(), k)
        chosen = candidate & (keys <= tau[None, :]) & (k > 0)[None, :]
        rows, cols = chosen.nonzero(as_tuple=True)
        self.table[local[rows], cols] = scores[rows, cols]
        self.active = True
        return int(_all_reduce(torch.tensor([rows.numel()], device=scores.device))[0])

    def state_dict(self) -> dict:
        """The whole (N, C) table on every rank, CPU (collective)."""
        ids = torch.arange(self.rank, self.num_samples, self.world, device=self.table.device)
        all_ids, rows = all_gather_rows(ids), all_gather_rows(self.table)
        full = torch.full((self.num_samples, self.num_classes), NO_TARGET)
        full[all_ids.cpu()] = rows.cpu()
        return {"soft": full, "active": self.active}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["soft"].shape) != (self.num_samples, self.num_classes):
            raise ValueError(f"EM+APL table in the checkpoint is {tuple(state['soft'].shape)}, this run has "
                             f"{self.num_samples} samples x {self.num_classes} classes")
        self.table = state["soft"][self.rank::self.world].clone().float()
        self.active = bool(state["active"])


class EmAplCriterion:
    """EM+APL: EM with soft negatives that grow after every epoch past the warm-up."""

    def __init__(self, num_samples: int, num_classes: int, alpha: float, beta: float, warmup: int,
                 epochs: int = PAPER_EPOCHS) -> None:
        self.alpha, self.beta, self.warmup, self.epochs = alpha, beta, warmup, epochs
        self.store = SoftNegativeStore(num_samples, num_classes, *_world())
        self.last_pass = 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, epoch: int, valid: Optional[torch.Tensor] = None,
                 sample_ids: Optional[torch.Tensor] = None) -> LossOutput:
        soft = None
        if self.store.active:
            if sample_ids is None:
                raise ValueError("loss.scheme=EM-APL needs the batch's sample ids")
            rows = _rows(valid, labels.shape[0], logits.device)
            soft = self.store.lookup(torch.where(rows, sample_ids.to(logits.device).long(), -1))
        loss, pseudo = em_apl_loss(logits, labels, soft, self.alpha, self.beta, valid)
        return LossOutput(loss, pseudo)

    def end_epoch(self, epoch: int, score_train: Callable[[], tuple]) -> None:
        """The reference's pass runs after every epoch t >= warm-up (1-based)."""
        if epoch < self.warmup:
            return
        scores, observed, ids = score_train()
        self.last_pass = self.store.pseudo_label(scores, observed, ids, self.epochs, self.warmup)

    def state_dict(self) -> dict:
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state)


# -------------------------------------------------------------------------------------------- factory
def em_apl_params(cfg: LossConfig, dataset: str) -> tuple[float, float, int]:
    """(alpha_EM, beta, warm-up): the config's value, or the paper's for this dataset where it is null."""
    paper = EM_APL_PAPER.get(dataset, GENERIC_EM_APL)

    def pick(value, key):
        return paper[key] if value is None else value

    return pick(cfg.em_alpha, "alpha"), pick(cfg.apl_beta, "beta"), pick(cfg.apl_warmup_epochs, "warmup")


def build_stateful_criterion(cfg: LossConfig, dataset: str, num_samples: int, num_classes: int, *,
                             epochs: int = PAPER_EPOCHS, lr: float = ROLE_LR, seed: int = 0):
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
        expected = cfg.expected_positives or EXPECTED_POSITIVES.get(dataset)
        if expected is None:
            raise ValueError(f"loss.expected_positives: no default for dataset {dataset!r}; set it in the config")
        return RoleCriterion(num_samples, num_classes, expected, lr, seed)
    if cfg.scheme == "EM-APL":
        size = num_samples * num_classes * 4 / GIB
        if size > cfg.state_max_gib:
            raise ValueError(f"loss.scheme=EM-APL keeps a soft-label table of {num_samples} x {num_classes} "
                             f"({size:.1f} GiB, gathered whole for checkpoints), above loss.state_max_gib="
                             f"{cfg.state_max_gib}")
        alpha, beta, warmup = em_apl_params(cfg, dataset)
        return EmAplCriterion(num_samples, num_classes, alpha, beta, warmup, epochs)
    raise ValueError(f"loss.scheme: {cfg.scheme!r} has no per-sample state (ROLE or EM-APL)")
