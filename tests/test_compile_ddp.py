"""``engine.compile=true`` under DDP: the DDP-wrapped module is compiled (Dynamo's DDPOptimizer splits the graph at
the buckets), it trains like eager, a short batch does not recompile, and checkpoints keep the plain keys."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bgtrain.config import load_config
from bgtrain.distributed import WorldInfo
from bgtrain.engines import build_engine
from bgtrain.losses.functional import LossOutput
from bgtrain.model import build_model
from tests.conftest import REPO, free_port, join_gloo_group

SMOKE = REPO / "configs/smoke.yaml"
NUM_CLASSES = 5
# The smallest model the config allows (ResNet-18 at 32 px) and few steps: inductor compiles slowly on a CPU.
# Batches of 4, 4 and 3 rows per rank: the last one is an epoch's short batch.
BATCHES = (4, 4, 3)


def _batch(rank: int, step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    images = torch.randn(rows, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(rows, NUM_CLASSES, generator=g) < 0.3).float()
    return images, labels


def _run(rank: int, world: int, backend: str | None, accum: int = 1) -> dict:
    """Losses, first step's (all-reduced) gradient, model state dict, and the graphs and the AOT-compiled pieces
    so far after each step, of a few steps of a fresh engine (``backend``: torch.compile's; None: eager)."""
    import functools

    import torch._dynamo

    cfg = load_config(SMOKE, ["model.depth=18", "data.image_size=32", "data.batch_size=4", f"optim.grad_accum={accum}",
                              f"engine.compile={str(backend is not None).lower()}", "engine.precision=fp32"])
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_fn = torch.compile
    torch.compile = functools.partial(compile_fn, backend=backend or "inductor")  # type: ignore[assignment]
    try:
        engine = build_engine(cfg, build_model(cfg.model, NUM_CLASSES), WorldInfo(rank, world), torch.device("cpu"))
    finally:
        torch.compile = compile_fn
    grads: list[torch.Tensor] = []
    step_fn = engine.optimizer.step

    def recording_step(*args, **kwargs):
        if not grads:  # the gradient the optimizer sees: after DDP's all-reduce
            grads.append(torch.cat([p.grad.flatten() for p in engine.module.parameters()]))
        return step_fn(*args, **kwargs)

    engine.optimizer.step = recording_step
    losses, graphs, pieces = [], [], []
    for step, rows in enumerate(BATCHES):
        images, labels = _batch(rank, step, rows)
        out = engine.step(images, lambda logits, y=labels: LossOutput(
            torch.nn.functional.binary_cross_entropy_with_logits(logits, y), torch.zeros_like(y).bool()))
        losses.append(float(out.loss.detach()))
        graphs.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        pieces.append(int(torch._dynamo.utils.counters["aot_autograd"]["total"]))
    return {"losses": losses, "grad": grads[0], "state": engine.state_dict()["model"], "graphs": graphs,
            "pieces": pieces}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_gloo_group(rank, world, port)
    import torch.distributed as dist
    try:
        runs = {"eager": _run(rank, world, None), "aot_eager": _run(rank, world, "aot_eager"),
                "compiled": _run(rank, world, "inductor"),
                # accumulation: the first micro-step under DDP's no_sync, the second all-reduces the sum
                "eager_accum": _run(rank, world, None, accum=2), "aot_eager_accum": _run(rank, world, "aot_eager", 2)}
        torch.save(runs, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed  # two gloo ranks
def test_compiled_ddp_trains_like_eager_without_recompiling_and_keeps_plain_keys(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for r in runs:
        eager, traced, compiled = r["eager"], r["aot_eager"], r["compiled"]
        # Without inductor's kernels (aot_eager) the split graph's all-reduced gradient is eager's, bit for bit:
        # DDPOptimizer's pieces and DDP's buckets hand every gradient to the all-reduce once, in the same order.
        assert torch.equal(traced["grad"], eager["grad"])
        assert traced["losses"] == eager["losses"]
        # and so is it under gradient accumulation: no_sync, set on the DDP wrapper, holds for its compiled form
        assert torch.equal(r["aot_eager_accum"]["grad"], r["eager_accum"]["grad"])
        assert r["aot_eager_accum"]["losses"] == r["eager_accum"]["losses"]
        # Inductor's kernels round differently; ResNet's BatchNorm backward cancels, and the two ranks' gradients
        # partly cancel in their mean, so the relative difference of the first gradient is ~6e-3 (4e-4 on one
        # process without DDP). Adam then divides by each gradient's own size, so near-zero gradients move their
        # weights by up to a whole step: later losses drift by up to ~1%.
        assert float((compiled["grad"] - eager["grad"]).norm() / eager["grad"].norm()) < 2e-2
        assert compiled["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-4)
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=3e-2)
        assert list(compiled["state"]) == list(eager["state"])  # checkpoint keys: no module. / _orig_mod.
        assert not any(k.startswith("module.") or "_orig_mod." in k for k in compiled["state"])
        # Dynamo's DDPOptimizer split the one graph into pieces at DDP's buckets (ResNet-18's 45 MB of gradients
        # fill several 25 MB buckets); the short 3-row batch compiled nothing new.
        assert compiled["graphs"] == [1, 1, 1], compiled["graphs"]
        for run in (traced, compiled):
            first, _, last = run["pieces"]
            assert first >= 2 and last == first, run["pieces"]
    # the all-reduce ran: both ranks saw the same gradient though each had its own data
    assert torch.equal(runs[0]["compiled"]["grad"], runs[1]["compiled"]["grad"])
