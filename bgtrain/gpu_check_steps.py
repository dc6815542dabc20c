"""gpu_check's ``host_syncs`` and ``step_speed`` checks, and the report's list of what one GPU cannot show.

``host_syncs``: for every loss scheme (:data:`bgtrain.config.Scheme`), a :class:`~bgtrain.trainer.Trainer` on tiny
synthetic shards runs the real steps, :func:`bgtrain.trainer.train_step` on batches from the real Loader, for two
epochs (the large-loss rules and EM+APL's soft negatives start in epoch 2), with the criterion's epoch hooks in
between as the trainer calls them. On CUDA every step but the first of each epoch (the warm-up: one-time
allocations and caches) runs under ``torch.cuda.set_sync_debug_mode("error")``: a host sync fails the check,
naming the scheme and the call site (the innermost bgtrain frame of the traceback). There is no logging step in
these steps: the trainer reads the loss only at logging steps, by design. With ``--cpu-smoke`` the same code path
runs every scheme (CI exercises it); sync detection needs CUDA, and the report says so.

``step_speed`` (GPU only): img/s of a few training steps with ``engine.deterministic`` true and false, and
``engine.compile`` true and false, on one GPU, at a small shape (a measure of the switches' relative cost, not
of the anchor's throughput, which ``bench_train`` gives).
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
STEPS_PER_EPOCH = {True: 3, False: 2}  # CUDA / CPU: the first of each epoch is the warm-up, the others checked
NEEDS_CUDA = "needs CUDA (torch.cuda.set_sync_debug_mode), and --cpu-smoke runs on the CPU"

# What gpu_check runs on one GPU (or, with --cpu-smoke, on the CPU), and what only a larger run shows.
COVERED = {
    "extension": "BoostLU CUDA kernels vs the torch reference, fwd/bwd, 3 dtypes, both layouts; torch.compile",
    "boostlu_bench": "BoostLU fwd+bwd time vs eager and torch.compile",
    "evaluator": "per-class AP on the GPU vs the CPU path",
    "bench_train": "end-to-end img/s at the anchor shape: DALI mixed and WebDataset + nvJPEG, eager and compile",
    "ddp": "DDP's bucketed all-reduce and an all-gather through NCCL, world 1",
    "criteria": "LL-Cp and EM+APL collectives and checkpoints through NCCL (world 1), helpers' tensor placement",
    "host_syncs": "every loss scheme's real Trainer steps and Loader batches under sync-debug mode 'error'",
    "step_speed": "img/s with engine.deterministic and engine.compile on and off, one GPU",
}
NEEDS_MORE_GPUS = [
    "multi-rank NCCL all-reduce overlapping backward (DDP buckets across >= 2 GPUs; NCCL refuses 2 ranks on 1 GPU)",
    "DeepSpeed ZeRO partitioning of optimizer state and gradients across GPUs (engine.engine=deepspeed)",
    "ROLE / EM+APL / LL-Cp exchanges between >= 2 NCCL ranks (one GPU gives NCCL a world of 1)",
    "cross-node timing: inter-node NCCL bandwidth and latency, multi-node launch (slurm/), node-local shard caches",
    "SyncBatchNorm across GPUs (engine.sync_bn)",
]


def coverage(results: dict[str, dict], smoke: bool) -> dict[str, Any]:
    """The report's list of the paths this run verified and those only a multi-GPU / multi-node run would show."""
    ran = {name: COVERED.get(name, name) for name, r in results.items() if r.get("ok") is True}
    out: dict[str, Any] = {"covered": ran, "not_covered_needs_multi_gpu_or_nodes": NEEDS_MORE_GPUS,
                           "not_run_or_failed": sorted(set(results) - set(ran))}
    if smoke:
        out["not_covered_on_cpu"] = ("--cpu-smoke: CUDA kernels, nvJPEG, NCCL, host-sync detection and GPU timings "
                                     "need a GPU run")
    return out


def _build_shards(out: Path, n_train: int, size: int) -> Path:
    """Synthetic shards (10 classes); the builder's progress bar goes to stderr, away from the JSON lines."""
    from shards.synthetic import build
    with contextlib.redirect_stdout(sys.stderr):
        build(out, num_classes=10, n_train=n_train, n_val=8, n_test=8, size=size, seed=0, shard_size=n_train // 2)
    return out


def _config(shards: Path, out_dir: Path, cuda: bool, overrides: list[str]):
    from bgtrain.config import load_config
    return load_config(SMOKE_CONFIG, [
        f"data.shards={shards}", f"out_dir={out_dir}", "data.image_size=32", "data.batch_size=8",
        "data.eval_batch_size=16", "data.workers=0", f"data.max_batches={STEPS_PER_EPOCH[cuda]}", "log_every=1000",
        "checkpoint.every_steps=0", "log.tensorboard=false", "loss.expected_positives=2.0",  # EPR, ROLE
        f"engine.precision={'bf16' if cuda else 'fp32'}", *overrides])


@contextlib.contextmanager
def _sync_debug(on: bool) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block (CUDA only), restored afterwards."""
    if not on:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def _global_state() -> Iterator[None]:
    """Give back the process-wide switches a Trainer sets (determinism, cuDNN autotuning, TF32), for later checks."""
    import torch.utils.deterministic as det
    fill = det.fill_uninitialized_memory  # type: ignore[attr-defined]
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             fill, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        det.fill_uninitialized_memory = saved[2]  # type: ignore[attr-defined]
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[3:]


def call_site(error: BaseException) -> str:
    """The innermost bgtrain frame of ``error``'s traceback (gpu_check's own frames excluded), as path:line."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/bgtrain/" in f.filename and "/bgtrain/gpu_check" not in f.filename]
    if not frames:
        return "no bgtrain frame (in torch or a library)"
    f = frames[-1]
    path = Path(f.filename)
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return f"{where}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def bgtrain_frames(error: BaseException) -> list[str]:
    """Every bgtrain frame of ``error``'s traceback, outermost first (the path to the call site)."""
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(error.__traceback__)
            if "/bgtrain/" in f.filename and "/bgtrain/gpu_check" not in f.filename]


def _is_sync_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "synchroniz" in str(error).lower()


def scheme_steps(scheme: str, shards: Path, out_dir: Path, cuda: bool) -> dict[str, Any]:
    """Two epochs of one scheme's real steps; the steps after each epoch's first under sync-debug mode on CUDA."""
    from bgtrain import trainer as trainer_module
    from bgtrain.predict import score_split

    cfg = _config(shards, out_dir, cuda, [f"loss.scheme={scheme}"])
    trainer = trainer_module.Trainer(cfg)
    steps, checked, losses = 0, 0, []
    try:
        engine, criterion, loader = trainer.engine, trainer.criterion, trainer.loader
        for epoch in (1, 2):
            loader.set_epoch(epoch, 0)
            criterion.begin_epoch(loader.sample_readers)
            engine.train(True)
            batches = iter(loader)
            for i in range(len(loader)):
                check = cuda and i > 0
                try:
                    with _sync_debug(check):
                        batch = next(batches)  # the Loader's _finish (normalise, flips, labels) is in the step
                        out = trainer_module.train_step(engine, criterion, batch, epoch)
                except Exception as e:  # noqa: BLE001 - a sync (or any error) fails this scheme, naming where
                    return {"scheme": scheme, "ok": False, "epoch": epoch, "step": i + 1,
                            "sync": _is_sync_error(e), "call_site": call_site(e), "bgtrain_frames": bgtrain_frames(e),
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                steps += 1
                checked += check
                if out is not None:
                    losses.append(out.loss.detach())
            # The criterion's epoch hook as the trainer calls it (a scoring pass: syncs by design, not checked)
            criterion.end_epoch(epoch, lambda: score_split(engine, trainer.scoring_loader("train", cfg.data.labels)))
        values = [float(x) for x in losses]  # read after the checked steps
        finite = bool(values) and all(v == v and abs(v) < float("inf") for v in values)
        return {"scheme": scheme, "ok": finite, "steps": steps, "steps_checked": checked, "losses_finite": finite}
    finally:
        trainer.log.close()


def check_host_syncs(smoke: bool, log: Callable[[dict], None]) -> dict:
    """Every loss scheme's real Trainer steps; on CUDA a host sync outside the warm-up fails, naming scheme and site."""
    from bgtrain.config import Scheme

    cuda = not smoke
    schemes = list(get_args(Scheme))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bgtrain-host-syncs-") as tmp, _global_state():
        shards = _build_shards(Path(tmp) / "shards", 48, 32)
        for scheme in schemes:
            try:
                row = scheme_steps(scheme, shards, Path(tmp) / scheme, cuda)
            except Exception as e:  # noqa: BLE001 - one scheme that cannot run must not hide the others
                row = {"scheme": scheme, "ok": False, "sync": False, "call_site": call_site(e),
                       "error": f"{type(e).__name__}: {e}"}
            log({"check": "host_syncs", **row})
            rows.append(row)
    failed = {r["scheme"]: r.get("call_site") or "non-finite loss" for r in rows if not r["ok"]}
    out: dict[str, Any] = {
        "ok": not failed, "schemes": schemes, "failed": failed,
        "syncs": {r["scheme"]: r["call_site"] for r in rows if r.get("sync")},
        "steps_per_scheme": 2 * STEPS_PER_EPOCH[cuda],
        "steps_checked": sum(r.get("steps_checked", 0) for r in rows),
        "sync_detection": "torch.cuda.set_sync_debug_mode('error'), every step but each epoch's first" if cuda
        else "skipped: " + NEEDS_CUDA + "; every scheme's steps ran through the same code path"}
    if smoke:
        out["skipped"] = "sync detection: " + NEEDS_CUDA
    return out


def _img_per_s(shards: Path, out_dir: Path, overrides: list[str], warmup: int, timed: int) -> float:
    """img/s of ``timed`` training steps (after ``warmup``) on batches fetched from the real Loader beforehand."""
    from bgtrain import trainer as trainer_module

    cfg = _config(shards, out_dir, True, ["data.image_size=64", "data.batch_size=32", "data.max_batches=1000",
                                          "loss.scheme=AN", *overrides])
    trainer = trainer_module.Trainer(cfg)
    try:
        loader, engine, criterion = trainer.loader, trainer.engine, trainer.criterion
        criterion.begin_epoch(loader.sample_readers)
        engine.train(True)
        batches: list = []
        epoch = 1
        while len(batches) < warmup + timed:  # fetched first: the timing is the steps'
            loader.set_epoch(epoch, 0)
            batches += list(loader)
            epoch += 1
        for batch in batches[:warmup]:
            trainer_module.train_step(engine, criterion, batch, 1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        images = 0
        for batch in batches[warmup:warmup + timed]:
            trainer_module.train_step(engine, criterion, batch, 1)
            images += batch.num_valid
        torch.cuda.synchronize()
        return images / (time.perf_counter() - t)
    finally:
        trainer.log.close()


def check_step_speed(smoke: bool, log: Callable[[dict], None]) -> dict:
    """img/s with engine.deterministic and engine.compile on and off (one GPU, R18 at 64 px, batch 32)."""
    if smoke:
        return {"ok": True, "skipped": "img/s of deterministic / compile: GPU timings, and --cpu-smoke runs on the CPU"}
    runs = {"deterministic=true,compile=false": ["engine.deterministic=true", "engine.compile=false"],
            "deterministic=false,compile=false": ["engine.deterministic=false", "engine.compile=false"],
            "deterministic=true,compile=true": ["engine.deterministic=true", "engine.compile=true"]}
    speeds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bgtrain-step-speed-") as tmp, _global_state():
        shards = _build_shards(Path(tmp) / "shards", 128, 64)
        for name, overrides in runs.items():
            speeds[name] = round(_img_per_s(shards, Path(tmp) / name.replace(",", "_"), overrides, 5, 20), 1)
            log({"check": "step_speed", "run": name, "img_per_s": speeds[name]})
    base = speeds["deterministic=true,compile=false"]
    return {"ok": all(v > 0 for v in speeds.values()), "img_per_s": speeds, "shape": "R18, 64 px, batch 32, bf16",
            "deterministic_off_speedup": round(speeds["deterministic=false,compile=false"] / base, 3),
            "compile_speedup": round(speeds["deterministic=true,compile=true"] / base, 3)}
