"""Loss rules of docs/design.md ("Large-loss schemes", "Baselines"), each compared with a reference written out here.

The references work in float64 with the textbook formulas (-log p, -log(1-p)), drop padded rows before computing, and
select large losses by sorting a Python list, so they share no code path with bgtrain.losses.
"""
from __future__ import annotations

import math

import pytest
import torch

from bgtrain.config import LossConfig
from bgtrain.losses import (
    asymmetric_loss,
    build_criterion,
    entropy_maximisation,
    expected_positive_regulariser,
    label_smoothing,
    large_loss,
    large_loss_k,
    large_loss_output,
)

PAPER_DELTA = {"LL-R": 0.005, "LL-Ct": 0.002, "LL-Cp": 0.001}
LL_SCHEMES = ("LL-R", "LL-Ct", "LL-Cp")


# --- reference large-loss rule, written out from docs/design.md ---

def ref_k(scheme: str, b: int, c: int, epoch: int, delta: float) -> int:
    if epoch == 1:
        return 0
    return math.ceil(b * c * delta) if scheme == "LL-Cp" else math.ceil(b * c * (epoch - 1) * delta)


def ref_large_loss(logits: torch.Tensor, labels: torch.Tensor, scheme: str, epoch: int, delta: float | None = None,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, selected) by the rule; padded rows are cut off first, selected is False on them."""
    keep = torch.ones(labels.shape[0], dtype=torch.bool) if valid is None else valid
    x, y = logits[keep].double(), labels[keep]
    b, c = y.shape
    p = torch.sigmoid(x)
    pos = y == 1
    to_one, to_zero = -torch.log(p), -torch.log(1 - p)
    entry = torch.where(pos, to_one, to_zero)                       # AN: -1 read as 0
    selected = torch.zeros_like(pos)
    if scheme == "full":
        known = y >= 0
        loss = entry[known].sum() / known.sum()
    elif scheme == "AN" or epoch == 1:
        loss = entry.sum() / (b * c)
    else:
        delta = PAPER_DELTA[scheme] if delta is None else delta
        k = ref_k(scheme, b, c, epoch, delta)
        cand = y == -1
        values = sorted(entry[cand].tolist(), reverse=True)
        if k > 0 and values:
            tau = values[min(k, len(values)) - 1]
            selected = cand & (entry >= tau)
        if scheme == "LL-R":
            entry = torch.where(selected, torch.zeros_like(entry), entry)
        else:
            entry = torch.where(selected, to_one, entry)
        loss = entry.sum() / (b * c)                                # zeroed entries stay in the denominator
    full_sel = torch.zeros(labels.shape, dtype=torch.bool)
    full_sel[keep] = selected
    return loss, full_sel


def tied_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 x 5 batch. Unknown losses are tied at the top: two entries at logit 4, three at logit 3.

    A positive with logit -6 and a known negative with logit 6 have the largest losses of all, but are not
    unknown, so they must never be selected.
    """
    labels = torch.tensor([[1, -1, -1, -1, -1],
                           [-1, 1, -1, -1, -1],
                           [-1, -1, 1, 0, -1],
                           [-1, -1, -1, -1, 1]], dtype=torch.int8)
    logits = torch.tensor([[2.0, 4.0, -1.0, 3.0, 0.5],
                           [3.0, 1.0, -2.0, 0.0, 1.5],
                           [-0.5, 4.0, 0.3, 6.0, 3.0],
                           [-3.0, 2.0, 1.0, -1.5, -6.0]])
    return logits, labels


# --- large-loss schemes ---

@pytest.mark.parametrize("scheme", LL_SCHEMES)
def test_epoch_1_is_plain_assume_negative(scheme: str) -> None:
    logits, labels = tied_batch()
    loss, selected = large_loss(logits, labels, scheme, epoch=1, delta_rel=0.5)
    an, _ = large_loss(logits, labels, "AN", epoch=1)
    ref, _ = ref_large_loss(logits, labels, "AN", 1)
    assert not selected.any()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, an)


@pytest.mark.parametrize("scheme", ["full", "AN", *LL_SCHEMES])
@pytest.mark.parametrize("epoch", [1, 2, 3, 4])
@pytest.mark.parametrize("delta", [None, 0.05])
def test_large_loss_matches_the_rule_on_tied_batch(scheme: str, epoch: int, delta: float | None) -> None:
    logits, labels = tied_batch()
    if scheme == "full":
        labels = torch.where(labels < 0, torch.zeros_like(labels), labels)  # Full trains on complete labels
    loss, selected = large_loss(logits, labels, scheme, epoch, delta)
    ref_loss, ref_sel = ref_large_loss(logits, labels, scheme, epoch, delta)
    torch.testing.assert_close(selected, ref_sel)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ["LL-R", "LL-Ct"])
def test_ties_at_the_kth_largest_loss_add_entries(scheme: str) -> None:
    """k = ceil(20 * (t-1) * 0.05) = t-1; the top unknown losses come in a tie of 2 (logit 4) then 3 (logit 3)."""
    logits, labels = tied_batch()
    counts = [int(large_loss(logits, labels, scheme, epoch, 0.05)[1].sum()) for epoch in (2, 3, 4)]
    assert counts == [2, 2, 5]
    sel = large_loss(logits, labels, scheme, 4, 0.05)[1]
    assert torch.all(logits[sel] >= 3.0)


def test_ll_cp_k_is_constant_over_epochs() -> None:
    logits, labels = tied_batch()
    counts = [int(large_loss(logits, labels, "LL-Cp", epoch, 0.05)[1].sum()) for epoch in (2, 3, 4, 9)]
    assert counts == [2, 2, 2, 2]                                   # k = ceil(20 * 0.05) = 1, plus its tie


@pytest.mark.parametrize("scheme", LL_SCHEMES)
@pytest.mark.parametrize("epoch", [2, 3, 4])
def test_only_unknown_entries_are_candidates(scheme: str, epoch: int) -> None:
    logits, labels = tied_batch()
    _, selected = large_loss(logits, labels, scheme, epoch, delta_rel=0.9)   # k larger than the candidates
    torch.testing.assert_close(selected, labels == -1)


@pytest.mark.parametrize("scheme", LL_SCHEMES)
@pytest.mark.parametrize("b,c,epoch,delta", [(16, 20, 2, 0.005), (16, 80, 4, 0.002), (7, 312, 3, 0.001),
                                             (3, 5, 10, 0.2), (64, 5000, 2, 0.005), (200, 1, 2, 0.005)])
def test_k_is_ceil_of_bc_delta(scheme: str, b: int, c: int, epoch: int, delta: float) -> None:
    assert large_loss_k(scheme, b, c, epoch, delta) == ref_k(scheme, b, c, epoch, delta)
    assert large_loss_k(scheme, b, c, 1, delta) == 0


@pytest.mark.parametrize("epoch", [2, 3])
def test_default_deltas_are_the_papers(epoch: int) -> None:
    """With delta_rel=None, B*C = 2000 and continuous losses, LL-R/LL-Ct/LL-Cp select 10/4/2 entries per (t-1)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 50, generator=g) * 2
    labels = torch.full((40, 50), -1, dtype=torch.int8)
    labels[torch.arange(40), torch.randint(0, 50, (40,), generator=g)] = 1
    expected = {"LL-R": 10 * (epoch - 1), "LL-Ct": 4 * (epoch - 1), "LL-Cp": 2}
    for scheme, n in expected.items():
        _, selected = large_loss(logits, labels, scheme, epoch)
        assert int(selected.sum()) == n, scheme
        ref_loss, ref_sel = ref_large_loss(logits, labels, scheme, epoch)
        torch.testing.assert_close(selected, ref_sel)


@pytest.mark.parametrize("scheme", LL_SCHEMES)
def test_final_loss_is_mean_over_all_entries(scheme: str) -> None:
    """sum of the kept/corrected entry losses divided by B*C, the zeroed ones included in the count."""
    logits, labels = tied_batch()
    loss, sel = large_loss(logits, labels, scheme, 4, 0.05)
    p = torch.sigmoid(logits.double())
    entry = torch.where(labels == 1, -torch.log(p), -torch.log(1 - p))
    if scheme == "LL-R":
        total = entry[~sel].sum()
    else:
        total = entry[~sel].sum() + (-torch.log(p[sel])).sum()
    torch.testing.assert_close(loss.double(), total / labels.numel(), rtol=1e-6, atol=1e-7)


def test_ll_r_zeroes_and_ll_ct_corrects_toward_one() -> None:
    """Same selection; LL-R drops the selected losses, LL-Ct replaces them with BCE toward 1."""
    logits, labels = tied_batch()
    loss_r, sel_r = large_loss(logits, labels, "LL-R", 3, 0.05)
    loss_ct, sel_ct = large_loss(logits, labels, "LL-Ct", 3, 0.05)
    torch.testing.assert_close(sel_r, sel_ct)
    p = torch.sigmoid(logits[sel_r].double())
    diff = (-torch.log(p)).sum() / labels.numel()                   # LL-Ct adds the "toward 1" losses back
    torch.testing.assert_close((loss_ct - loss_r).double(), diff, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_ll_cp_corrections_equal_selected(epoch: int) -> None:
    logits, labels = tied_batch()
    out = large_loss_output(logits, labels, "LL-Cp", epoch, 0.05)
    assert out.corrections is not None
    torch.testing.assert_close(out.corrections, out.selected)
    assert bool(out.selected.any()) == (epoch > 1)
    for scheme in ("LL-R", "LL-Ct"):                                # only LL-Cp changes labels for good
        other = large_loss_output(logits, labels, scheme, epoch, 0.05)
        assert other.corrections is None or not other.corrections.any()


def test_ll_cp_corrected_entry_is_no_longer_a_candidate() -> None:
    """After applying the corrections, the same entries are positives and the next selection avoids them."""
    logits, labels = tied_batch()
    first = large_loss_output(logits, labels, "LL-Cp", 2, 0.05)
    corrected = torch.where(first.corrections, torch.ones_like(labels), labels)
    second = large_loss_output(logits, corrected, "LL-Cp", 3, 0.05)
    assert not (second.selected & first.corrections).any()
    ref_loss, ref_sel = ref_large_loss(logits, corrected, "LL-Cp", 3, 0.05)
    torch.testing.assert_close(second.selected, ref_sel)
    assert int(second.selected.sum()) == 3                          # next in line: the three ties at logit 3


def test_scheme_names_compare_by_value_not_identity() -> None:
    """The snucml repo compared with `is`, so a scheme name read from a config ran as LL-Ct."""
    literal = "LL-Cp"
    cp = "".join(["LL-", "Cp"])
    assert cp == literal and cp is not literal                      # equal by value, a different object
    logits, labels = tied_batch()
    # Epoch 4, delta 0.05: LL-Cp's k is 1 (2 selected with the tie), LL-Ct's k is 3 (5 selected).
    out = large_loss_output(logits, labels, cp, 4, 0.05)
    ref_loss, ref_sel = ref_large_loss(logits, labels, "LL-Cp", 4, 0.05)
    torch.testing.assert_close(out.selected, ref_sel)
    assert int(out.selected.sum()) == 2
    assert out.corrections is not None and torch.equal(out.corrections, out.selected)
    # The default delta is looked up by value too (LL-Cp 0.001, not LL-Ct 0.002).
    g = torch.Generator().manual_seed(1)
    big_logits = torch.randn(40, 50, generator=g)
    big_labels = torch.full((40, 50), -1, dtype=torch.int8)
    assert int(large_loss(big_logits, big_labels, cp, 3)[1].sum()) == 2
    # And through the config path.
    crit = build_criterion(LossConfig(scheme="".join(["LL", "-Cp"]), delta_rel=0.05), "voc")
    got = crit(logits, labels, 4)
    torch.testing.assert_close(got.selected, ref_sel)
    assert got.corrections is not None


@pytest.mark.parametrize("scheme", ["full", "AN", *LL_SCHEMES])
@pytest.mark.parametrize("epoch", [1, 3])
def test_padded_rows_neither_add_loss_nor_count(scheme: str, epoch: int) -> None:
    logits, labels = tied_batch()
    if scheme == "full":
        labels = torch.where(labels < 0, torch.zeros_like(labels), labels)
    pad_logits = torch.cat([logits, torch.full((3, 5), 9.0)])        # huge unknown losses in the padding
    pad_labels = torch.cat([labels, torch.full((3, 5), -1 if scheme != "full" else 0, dtype=torch.int8)])
    valid = torch.tensor([True] * 4 + [False] * 3)
    loss, sel = large_loss(pad_logits, pad_labels, scheme, epoch, 0.05, valid=valid)
    ref_loss, ref_sel = ref_large_loss(pad_logits, pad_labels, scheme, epoch, 0.05, valid=valid)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sel, ref_sel)
    assert not sel[4:].any()
    plain_loss, plain_sel = large_loss(logits, labels, scheme, epoch, 0.05)
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(sel[:4], plain_sel)


@pytest.mark.parametrize("scheme", ["AN", *LL_SCHEMES])
def test_large_loss_gradients_match_reference(scheme: str) -> None:
    logits, labels = tied_batch()
    x = logits.clone().requires_grad_(True)
    loss, sel = large_loss(x, labels, scheme, 4, 0.05)
    loss.backward()
    xr = logits.double().clone().requires_grad_(True)
    ref_loss, _ = ref_large_loss(xr, labels, scheme, 4, 0.05)
    ref_loss.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    if scheme == "LL-R":
        assert torch.all(x.grad[sel] == 0) and torch.all(x.grad[~sel] != 0)


def test_large_loss_rejects_unknown_scheme_and_epoch_0() -> None:
    logits, labels = tied_batch()
    with pytest.raises(ValueError, match="LL-Cq"):
        large_loss(logits, labels, "LL-Cq", 2)
    with pytest.raises(ValueError, match="1-based"):
        large_loss(logits, labels, "LL-R", 0)


# --- baselines ---

def sp_batch(seed: int = 0, b: int = 6, c: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-positive batch: one 1 per row, -1 elsewhere; moderate logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g) * 2
    labels = torch.full((b, c), -1, dtype=torch.int8)
    labels[torch.arange(b), torch.randint(0, c, (b,), generator=g)] = 1
    return logits, labels


def test_label_smoothing_targets_are_one_minus_eps_and_eps() -> None:
    logits, labels = sp_batch(1)
    labels[0, labels[0] == -1] = 0                                  # a known negative smooths like an unknown
    eps = 0.1
    p = torch.sigmoid(logits.double())
    t = torch.where(labels == 1, 1 - eps, eps).double()
    ref = (-(t * torch.log(p) + (1 - t) * torch.log(1 - p))).mean()
    torch.testing.assert_close(label_smoothing(logits, labels, eps).double(), ref, rtol=1e-6, atol=1e-7)


def test_asl_is_ridniks_formula() -> None:
    """Positives: -(1-p)^g+ log p. Others: -(p_m)^g- log(1-p_m), p_m = max(p - clip, 0)."""
    logits, labels = sp_batch(2)
    logits[0, 0] = -4.0                                             # p < clip: shifted probability is 0
    labels[0, 0] = -1
    gneg, gpos, clip = 4.0, 1.0, 0.05
    p = torch.sigmoid(logits.double())
    pm = (p - clip).clamp(min=0)
    pos = -((1 - p) ** gpos) * torch.log(p)
    neg = -(pm ** gneg) * torch.log(1 - pm)
    ref = torch.where(labels == 1, pos, neg).mean()
    torch.testing.assert_close(asymmetric_loss(logits, labels, gneg, gpos, clip).double(), ref, rtol=1e-5,
                               atol=1e-7)


def test_epr_is_coles_code() -> None:
    """COLE: mean over B*C of -log p on positives, + (batch mean of sum_c p_c - k_hat)^2 / C^2."""
    logits, labels = sp_batch(3)
    k_hat = 1.5
    b, c = labels.shape
    p = torch.sigmoid(logits.double())
    pos_term = torch.where(labels == 1, -torch.log(p), torch.zeros_like(p)).sum() / (b * c)
    reg = (p.sum(1).mean(0) - k_hat) ** 2 / c ** 2
    got = expected_positive_regulariser(logits, labels, k_hat)
    torch.testing.assert_close(got.double(), pos_term + reg, rtol=1e-6, atol=1e-7)


def test_em_is_neg_log_on_positives_and_neg_alpha_entropy_on_unknowns() -> None:
    logits, labels = sp_batch(4)
    alpha = 0.1
    p = torch.sigmoid(logits.double())
    h = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    ref = torch.where(labels == 1, -torch.log(p), -alpha * h).mean()
    torch.testing.assert_close(entropy_maximisation(logits, labels, alpha).double(), ref, rtol=1e-6, atol=1e-7)


def test_em_stays_finite_for_confident_logits() -> None:
    """A confident unknown (sigmoid rounds to 1.0 in float32) has entropy ~0, not NaN: 0 * log 0 is 0."""
    logits = torch.tensor([[20.0, -20.0, 0.5], [30.0, 2.0, -1.0]], requires_grad=True)
    labels = torch.tensor([[-1, -1, 1], [-1, 1, -1]], dtype=torch.int8)
    alpha = 0.1
    loss = entropy_maximisation(logits, labels, alpha)
    p = torch.sigmoid(logits.detach().double())
    h = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    ref = torch.where(labels == 1, -torch.log(p), -alpha * h).mean()
    assert torch.isfinite(loss), f"EM loss is {loss.item()} for logits of magnitude 20-30"
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn,args", [(label_smoothing, (0.1,)), (asymmetric_loss, (4.0, 1.0, 0.05)),
                                     (expected_positive_regulariser, (1.5,)), (entropy_maximisation, (0.1,))])
def test_baselines_ignore_padded_rows(fn, args) -> None:
    logits, labels = sp_batch(5)
    pad_logits = torch.cat([logits, torch.full((2, logits.shape[1]), 7.0)])
    pad_labels = torch.cat([labels, torch.full((2, labels.shape[1]), -1, dtype=torch.int8)])
    valid = torch.tensor([True] * labels.shape[0] + [False, False])
    torch.testing.assert_close(fn(pad_logits, pad_labels, *args, valid=valid), fn(logits, labels, *args))


def test_build_criterion_uses_the_papers_baseline_settings() -> None:
    """LS eps 0.1, ASL 4/1/0.05, EPR k_hat per dataset (VOC 1.5, COCO 2.9, NUS 1.9, CUB 31.4), from defaults."""
    logits, labels = sp_batch(6)
    p = torch.sigmoid(logits.double())
    b, c = labels.shape

    t = torch.where(labels == 1, 0.9, 0.1).double()
    ref_ls = (-(t * torch.log(p) + (1 - t) * torch.log(1 - p))).mean()
    torch.testing.assert_close(build_criterion(LossConfig(scheme="LS"), "voc")(logits, labels, 1).loss.double(),
                               ref_ls, rtol=1e-6, atol=1e-7)

    pm = (p - 0.05).clamp(min=0)
    ref_asl = torch.where(labels == 1, -(1 - p) * torch.log(p), -(pm ** 4) * torch.log(1 - pm)).mean()
    torch.testing.assert_close(build_criterion(LossConfig(scheme="ASL"), "voc")(logits, labels, 1).loss.double(),
                               ref_asl, rtol=1e-5, atol=1e-7)

    pos_term = torch.where(labels == 1, -torch.log(p), torch.zeros_like(p)).sum() / (b * c)
    for dataset, k_hat in {"voc": 1.5, "coco": 2.9, "nuswide": 1.9, "cub": 31.4}.items():
        ref = pos_term + (p.sum(1).mean() - k_hat) ** 2 / c ** 2
        got = build_criterion(LossConfig(scheme="EPR"), dataset)(logits, labels, 1)
        torch.testing.assert_close(got.loss.double(), ref, rtol=1e-6, atol=1e-7)
        assert not got.selected.any()


@pytest.mark.parametrize("scheme", ["full", "AN", "LL-R", "LL-Ct", "LL-Cp", "LS", "ASL", "EPR", "EM", "EM-APL", "ROLE"])
def test_every_loss_keeps_float64_and_upcasts_half_precision(scheme: str) -> None:
    """float64 logits give a float64 loss equal to a float64 reference; bf16/fp16 logits compute in float32."""
    from bgtrain.losses import bce
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(-1, 2, (6, 5), generator=g).to(torch.int8)
    ids = torch.arange(6)
    kwargs = {"num_samples": 6, "num_classes": 5} if scheme in ("ROLE", "EM-APL") else {}
    crit = build_criterion(LossConfig(scheme=scheme), "voc", **kwargs)
    assert crit(logits, labels, 2, None, ids).loss.dtype == torch.float64
    for half in (torch.bfloat16, torch.float16):
        assert crit(logits.to(half), labels, 2, None, ids).loss.dtype == torch.float32
    # bce itself: float64 in, float64 out, and equal to the textbook formula in float64
    p = torch.sigmoid(logits)
    target = (labels == 1).double()
    reference = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    got = bce(logits, labels == 1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
    assert bce(logits.half(), labels == 1).dtype == torch.float32
