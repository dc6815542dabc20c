"""ROLE under fp16: the table learns from the unscaled gradient, whatever the GradScaler's scale does."""
from __future__ import annotations

import torch

from bgtrain.losses.role import RoleCriterion

SAMPLES, CLASSES, ROWS, FEATURES = 12, 6, 4, 8


def _steps(scaled: bool) -> tuple[list[torch.Tensor], list[float]]:
    """Four steps of a linear model and ROLE; the model's backward goes through an enabled GradScaler whose scale
    doubles after every step (growth_interval=1) and is halved by one overflow step, or is the plain fp32 one."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(FEATURES, CLASSES))
    optimizer = torch.optim.SGD([weight], lr=0.0)  # the model stays put: only the table's path is compared
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1, enabled=scaled)
    criterion = RoleCriterion(SAMPLES, CLASSES, expected=2.0, lr=1e-2, seed=0, batch_rows=ROWS)
    g = torch.Generator().manual_seed(1)
    tables, scales = [], []
    for step in range(4):
        x = torch.randn(ROWS, FEATURES, generator=g)
        labels = torch.randint(-1, 2, (ROWS, CLASSES), generator=g).to(torch.int8)
        ids = torch.randperm(SAMPLES, generator=g)[:ROWS]
        out = criterion(x @ weight, labels, 1, None, ids)
        scales.append(float(scaler.get_scale()) if scaled else 1.0)
        scaler.scale(out.loss).backward()
        if scaled and step == 2:  # an overflow in the model's gradient: the scaler skips the step and halves
            weight.grad.fill_(float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        criterion.after_step(out, ids)
        tables.append(criterion.table.detach().clone())
    return tables, scales


def test_role_table_steps_equal_the_unscaled_fp32_ones_while_the_loss_scale_changes():
    reference, _ = _steps(scaled=False)
    tables, scales = _steps(scaled=True)
    assert scales == [2.0 ** 10, 2.0 ** 11, 2.0 ** 12, 2.0 ** 11]  # the scale changed between every step
    for step, (table, expected) in enumerate(zip(tables, reference)):
        assert torch.equal(table, expected), f"step {step}: the table's update differs from the fp32 one"
    assert not torch.equal(reference[-1], reference[0])  # the table did learn
