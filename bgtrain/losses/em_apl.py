"""EM+APL (Zhou et al., ECCV 2022): entropy maximisation plus asymmetric pseudo-labelling.

Reference: github Correr-Zhou/SPML-AckTheUnknown, losses.py ``loss_EM_APL`` and main.py
``aysmmetric_pseudo_labeling``. EM, and after every epoch ``t >= warm-up`` a pseudo-labelling pass.
  * For each class, the ``int(0.9 * U_c / (epochs - warm-up))`` lowest-scored entries that are still
    unknown become soft negatives. ``U_c`` is the number of unknowns of class c in the training split.
    Their target is the score p they had then, and their loss is ``beta * BCE(p_now, p)``.
  * The selection is global over all ranks. Per class, the k-th smallest (score, sample id) key is found
    by bisection, with one all-reduce of C counts per step. Ties are broken by sample id; the
    reference's ``np.argsort`` breaks them in an unspecified order.
  * The targets live in a :class:`SoftNegativeStore` sharded by sample id, like
    :class:`bgtrain.labels.CorrectionStore`, and are looked up per batch on the device: the batch's ids,
    padded to the loader's batch size, are all-gathered, and each owner answers every row through one
    fixed-size all-to-all (no size round, no host read).

The losses use exact log-sigmoid terms. The references use ``-log(p + 1e-5)``, which differs from them
only for saturated scores.
"""
from __future__ import annotations

import torch

from bgtrain.collectives import (
    all_gather_padded,
    all_reduce,
    all_to_all_fixed,
    all_to_all_rows,
    max_over_ranks,
    rank_and_world,
)
from bgtrain.losses.criterion import Criterion, ScoreTrain
from bgtrain.losses.defaults import APL_NEG_PROPORTION, PAPER_EPOCHS
from bgtrain.losses.functional import LossOutput, bce, entropy_from_logits, mean_over_entries, upcast, valid_rows

NO_TARGET = -1.0          # a soft-negative table entry that was not pseudo-labelled
KEY_BITS = 62             # (float32 bits of a score in [0, 1]) << 32 | sample id stays below 2**62


def em_apl_loss(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None, alpha: float,
                beta: float, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EM+APL (``loss_EM_APL``): -log p on positives, BCE to 0 on known negatives, beta * BCE(p, s) on
    pseudo-labelled unknowns (soft target s >= 0), -alpha * H(p) on the other unknowns; mean over B*C.

    Returns (loss, pseudo-labelled mask).
    """
    x = upcast(logits)
    pseudo = (labels == -1) & (soft >= 0) if soft is not None else torch.zeros_like(labels, dtype=torch.bool)
    target = soft.clamp(min=0) if soft is not None else torch.zeros_like(x)
    entry = torch.where(labels == 1, bce(x, torch.ones_like(x)), bce(x, torch.zeros_like(x)))
    entry = torch.where(labels == -1, -alpha * entropy_from_logits(x), entry)
    entry = torch.where(pseudo, beta * bce(x, target), entry)
    rows = valid_rows(valid, labels.shape[0], labels.device)
    return mean_over_entries(entry, rows), pseudo & rows[:, None]


def apl_counts(unknown_per_class: torch.Tensor, epochs: int, warmup: int) -> torch.Tensor:
    """Soft negatives per class and pass: ``int(0.9 * U_c / (epochs - warmup))`` as in the reference."""
    passes = max(epochs - warmup, 1)
    return torch.tensor([int(APL_NEG_PROPORTION * int(u) / passes) for u in unknown_per_class.tolist()],
                        dtype=torch.long)


def kth_smallest_keys(sorted_keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row c, the smallest key v with #(keys <= v) >= k[c], counted over every rank (collective).

    ``sorted_keys`` (C, n) holds this rank's keys per class in ascending order, non-candidates as int64
    max. The bisection runs a fixed number of steps so that every rank does the same collectives.
    """
    lo = torch.full_like(k, -1)
    hi = torch.full_like(k, 2 ** KEY_BITS)
    for _ in range(KEY_BITS + 1):
        mid = lo + (hi - lo) // 2
        count = all_reduce(torch.searchsorted(sorted_keys, mid[:, None].contiguous(), right=True)[:, 0])
        enough = count >= k
        hi, lo = torch.where(enough, mid, hi), torch.where(enough, lo, mid)
    return hi


class SoftNegativeStore:
    """EM+APL's soft-negative targets, sharded by sample id: rank r owns the ids with ``id % world == r``.

    A pass and a lookup are collectives. Checkpoints hold the whole (N, C) table, so a resume may
    change the world size. The table starts on the CPU and moves to the training device at the first pass or
    lookup; the collectives helpers put it where the backend needs it either way.
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

    def lookup(self, sample_ids: torch.Tensor, batch_rows: int = 0) -> torch.Tensor:
        """(B, C) targets of these samples, NO_TARGET where none (collective; -1 ids get none).

        ``batch_rows``: the most ids any rank passes (the loader's batch size), the same on every rank; with it the
        lookup has no size round and no host read. 0 agrees on the largest batch first (a size round).
        """
        device, n = sample_ids.device, sample_ids.numel()
        self._to(device)
        bound = batch_rows or max_over_ranks(n)
        if bound == 0:  # no rank has a row
            return torch.full((0, self.num_classes), NO_TARGET, device=device)
        wanted = all_gather_padded(sample_ids.long().reshape(-1), bound, -1)  # (world * bound,)
        # Each rank answers every wanted row: the owner its target, the others NO_TARGET, below any target.
        mine = (wanted >= 0) & (wanted % self.world == self.rank)
        answer = torch.full((wanted.numel(), self.num_classes), NO_TARGET, device=device)
        if self.table.shape[0]:  # a rank may own no sample at all
            local = torch.where(mine, wanted // self.world, 0)
            answer = torch.where(mine[:, None], self.table[local], answer)
        back = all_to_all_fixed(answer.view(-1, bound, self.num_classes))  # (world, bound, C): each owner's answers
        return back.amax(dim=0)[:n]

    def _route_to_owners(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Rows of (ids, ...) moved to the rank that owns each id, in source-rank order (collective)."""
        owner = tensors[0] % self.world
        return [all_to_all_rows(t, owner) for t in tensors]

    def pseudo_label(self, scores: torch.Tensor, observed: torch.Tensor, sample_ids: torch.Tensor,
                     epochs: int, warmup: int) -> int:
        """One APL pass over this rank's share of the training split; returns the global count labelled."""
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("EM+APL: non-finite training scores in the pseudo-labelling pass")
        self._to(scores.device)
        ids, scores, observed = self._route_to_owners(sample_ids.long(), scores.float().clamp(0, 1), observed)
        unknown = observed == -1
        k = apl_counts(all_reduce(unknown.sum(0).long()), epochs, warmup).to(scores.device)
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
        return int(all_reduce(torch.tensor([rows.numel()], device=scores.device))[0])

    def state_dict(self) -> dict:
        """The whole (N, C) table on every rank, CPU (collective; rank r's rows are ids r, r + world, ...)."""
        bound = -(-self.num_samples // self.world)  # the most ids one rank owns
        rows = all_gather_padded(self.table, bound, NO_TARGET).view(-1, bound, self.num_classes).cpu()
        full = torch.full((self.num_samples, self.num_classes), NO_TARGET)
        for r in range(self.world):
            full[r::self.world] = rows[r, : len(range(r, self.num_samples, self.world))]
        return {"soft": full, "active": self.active}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["soft"].shape) != (self.num_samples, self.num_classes):
            raise ValueError(f"EM+APL table in the checkpoint is {tuple(state['soft'].shape)}, this run has "
                             f"{self.num_samples} samples x {self.num_classes} classes")
        self.table = state["soft"][self.rank::self.world].clone().float()
        self.active = bool(state["active"])


class EmAplCriterion(Criterion):
    """EM+APL: EM with soft negatives that grow after every epoch past the warm-up."""

    def __init__(self, num_samples: int, num_classes: int, alpha: float, beta: float, warmup: int,
                 epochs: int = PAPER_EPOCHS, batch_rows: int = 0) -> None:
        self.alpha, self.beta, self.warmup, self.epochs = alpha, beta, warmup, epochs
        self.batch_rows = batch_rows  # per-rank batch size: the lookup's fixed exchange size (0: agreed per step)
        self.store = SoftNegativeStore(num_samples, num_classes, *rank_and_world())
        self.last_pass = 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, epoch: int, valid: torch.Tensor | None = None,
                 sample_ids: torch.Tensor | None = None) -> LossOutput:
        soft = None
        if self.store.active:
            if sample_ids is None:
                raise ValueError("loss.scheme=EM-APL needs the batch's sample ids")
            rows = valid_rows(valid, labels.shape[0], logits.device)
            soft = self.store.lookup(torch.where(rows, sample_ids.to(logits.device).long(), -1), self.batch_rows)
        loss, pseudo = em_apl_loss(logits, labels, soft, self.alpha, self.beta, valid)
        return LossOutput(loss, pseudo)

    def end_epoch(self, epoch: int, score_train: ScoreTrain) -> None:
        """The reference's pass runs after every epoch t >= warm-up (1-based)."""
        if epoch < self.warmup:
            return
        scores, observed, ids = score_train()
        self.last_pass = self.store.pseudo_label(scores, observed, ids, self.epochs, self.warmup)

    def state_dict(self) -> dict:
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state)
