"""``python -m bgtrain.gpu_check``: every GPU check in one run, written to ``docs/gpu/<date>-<gpu>.json`` and a log.

Checks, in order (each one JSON line on stdout and in the log; the report holds them all):

1. ``dali``: DALI imports, or is installed from wheels brought in by hand (``--wheels DIR``, below).
2. ``extension``: the BoostLU extension builds (sm_90 unless ``TORCH_CUDA_ARCH_LIST`` says otherwise) and
   matches the torch reference, fwd and bwd, fp32 / bf16 / fp16, contiguous and channels-last: relative error
   (L2 norm of the difference over the reference's, same dtype, same device) <= 1e-3 in bf16/fp16 and <= 1e-6
   in fp32; the standalone ``boostlu`` bit-exact; ``torch.compile(fullgraph)`` through the op matches eager.
3. ``boostlu_bench``: the extension against eager and ``torch.compile`` at 64x5000x14x14 bf16, both layouts
   (goal: <= 120 us fwd+bwd, channels-last, the layout training uses).
4. ``evaluator``: per-class AP at 125,000 x 5,000 on the GPU (goal <= 0.25 s), exact (<= 1e-6 per class) against
   the CPU path on the same scores.
5. ``bench_train``: ``python -m bgtrain.bench train`` on the anchor shape (R50, 448 px, 5000 classes, batch 64,
   bf16, channels-last, eager and compile) from synthetic shards, DALI ``mixed`` and the WebDataset backend with
   nvJPEG (goal: >= 1,750 img/s end to end with ``input_efficiency`` >= 0.97).
6. ``ddp``: two DDP training steps over NCCL. NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so
   on one lent GPU this is world 1: the process group, DDP's bucketed all-reduce and an all-gather still run
   through NCCL. ``--cpu-smoke`` runs world 2 over gloo, where ranks must end with identical weights.
7. ``criteria``: LL-Cp and EM+APL steps and checkpoints (reloaded equal) with every collective forced through
   NCCL even in a world of 1, and each collectives helper fed a CPU tensor (:mod:`bgtrain.gpu_check_criteria`).
   ``--cpu-smoke``: gloo, world 2.
8. ``host_syncs``: every loss scheme's real steps (:func:`bgtrain.trainer.train_step` on batches from the real
   Loader, two epochs of 3 steps on tiny shards) under ``torch.cuda.set_sync_debug_mode("error")``, each epoch's
   first step excepted (warm-up); a host sync fails the check naming the scheme and the bgtrain call site
   (:mod:`bgtrain.gpu_check_steps`). ``--cpu-smoke`` runs every scheme's steps the same way, without detection.
9. ``step_speed``: img/s of a few steps (R18, 64 px, batch 32, bf16) with ``engine.deterministic`` true and
   false and ``engine.compile`` true and false. GPU only; ``--cpu-smoke`` skips it with the reason.

The report's ``coverage`` lists the paths the run verified and those only a multi-GPU or multi-node run shows
(NCCL all-reduce overlap across ranks, DeepSpeed ZeRO across GPUs, cross-node timing): those stay unverified.

The goals are reported (``goal_met``); the exit status is 1 only when a correctness check fails or errors.
The whole run must fit in 8 minutes on one GPU (``--budget-s 480``): a check that would start after the
budget is spent is skipped with that reason, and the report says how long each took.

``--cpu-smoke`` runs every check end to end on the CPU at tiny sizes, so the first run on a GPU only has to
start it. It skips only what needs CUDA, and says so: running the CUDA kernels (it still builds them when nvcc
is there), nvJPEG, NCCL.

DALI from wheels brought in by hand (the GPU machine reaches no package index, and a transfer is limited to
64 MiB): on a machine with the index, ``pip download --no-deps nvidia-dali-cuda130==2.4.0 -d wheels``, then
``sha256sum X.whl > X.whl.sha256`` and ``split -d -b 60M X.whl X.whl.part-``; carry one part per call into
``wheels/`` (each call adds its part beside those already there), and the ``.sha256`` file. Then
``python -m bgtrain.gpu_check --wheels wheels`` joins the parts in name order (``cat``), checks the SHA-256,
runs ``pip install --no-index --no-deps --target <--wheels-target> X.whl`` and puts the target first on
``sys.path`` (and ``PYTHONPATH`` for the DDP processes). A whole ``X.whl`` with its ``.sha256`` works too.
``--no-deps``: DALI's Python dependencies must already be installed (they are in requirements.txt).

Examples::

    python -m bgtrain.gpu_check                                 # on a GPU: everything, report in docs/gpu/
    python -m bgtrain.gpu_check --wheels wheels --out docs/gpu  # install DALI from hand-carried wheel parts first
    python -m bgtrain.gpu_check --cpu-smoke --out /tmp/gpu-smoke
    python -m bgtrain.gpu_check --only extension,evaluator
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bgtrain.gpu_check_steps import check_host_syncs, check_step_speed, coverage
from bgtrain.ops import library, reference

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}
CASES = [(64, 5000, 14, 14), (256, 80, 14, 14), (4, 37, 14, 14), (3, 70, 20, 20), (2, 33, 7, 7), (5, 1, 3, 3),
         (2, 64, 1, 1)]
SMOKE_CASES = [(4, 37, 14, 14), (3, 70, 20, 20), (2, 33, 7, 7), (5, 1, 3, 3), (2, 64, 1, 1)]
CHECKS = ("dali", "extension", "boostlu_bench", "evaluator", "bench_train", "ddp", "criteria", "host_syncs",
          "step_speed")
GOALS = {"boostlu_fwd_bwd_us": 120.0, "evaluator_s": 0.25, "train_img_per_s": 1750.0, "input_efficiency": 0.97}
NEEDS_CUDA = "needs CUDA, and --cpu-smoke runs on the CPU"


# --- 2. the extension against the reference --------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in fp64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_case(shape: tuple[int, int, int, int], dtype: torch.dtype, channels_last: bool, device: str,
               alpha: float = 5.0, seed: int = 0) -> dict:
    """Compare library.boostlu_pool/boostlu (fwd and bwd) with the reference on one input; return a result row."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cam = torch.randn(shape, generator=gen)
    cam[cam.abs() < 0.05] = 0.0  # exact zeros exercise the strict x > 0 rule
    cam = cam.to(device=device, dtype=dtype)
    if channels_last:
        cam = cam.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape[:2], generator=gen).to(device=device, dtype=dtype)

    x_ext, x_ref = cam.clone().requires_grad_(True), cam.clone().requires_grad_(True)
    out_ext, out_ref = library.boostlu_pool(x_ext, alpha), reference.boostlu_pool(x_ref, alpha)
    (g_ext,) = torch.autograd.grad(out_ext, x_ext, grad)
    (g_ref,) = torch.autograd.grad(out_ref, x_ref, grad)
    y_ext, y_ref = x_ext.clone().requires_grad_(True), x_ref.clone().requires_grad_(True)
    e_ext, e_ref = library.boostlu(y_ext, alpha), reference.boostlu(y_ref, alpha)
    gy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    (ge_ext,) = torch.autograd.grad(e_ext, y_ext, gy)
    (ge_ref,) = torch.autograd.grad(e_ref, y_ref, gy)

    tol = TOLERANCE[dtype]
    row: dict[str, Any] = {
        "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last,
        "pool_fwd_rel": rel_err(out_ext, out_ref), "pool_bwd_rel": rel_err(g_ext, g_ref),
        "grad_layout_kept": g_ext.is_contiguous(memory_format=torch.channels_last) == channels_last
        or shape[1] == 1 or shape[2] * shape[3] == 1,
        "boostlu_fwd_exact": bool(torch.equal(e_ext, e_ref)), "boostlu_bwd_exact": bool(torch.equal(ge_ext, ge_ref))}
    row["ok"] = (row["pool_fwd_rel"] <= tol and row["pool_bwd_rel"] <= tol and row["grad_layout_kept"]
                 and row["boostlu_fwd_exact"] and row["boostlu_bwd_exact"])
    return row


def _weight_grad(layer: torch.nn.Conv2d) -> torch.Tensor:
    if layer.weight.grad is None:
        raise RuntimeError("backward left no gradient on the conv weight")
    return layer.weight.grad


def check_compile(device: str) -> dict:
    """torch.compile(fullgraph) of conv1x1 + bgtrain.ops.boostlu_pool matches eager on `device`."""
    from bgtrain.ops import active_implementation, boostlu_pool

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(64, 300, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return boostlu_pool(self.conv(x), 5.0)

    torch.manual_seed(0)
    head = Head().to(device).to(memory_format=torch.channels_last)
    x = torch.randn(8, 64, 14, 14, device=device).to(memory_format=torch.channels_last)
    eager = head(x)
    eager.sum().backward()
    g_eager = _weight_grad(head.conv).clone()
    head.zero_grad()
    compiled = torch.compile(head, fullgraph=True)(x)
    compiled.sum().backward()
    row: dict[str, Any] = {"check": "compile", "implementation": active_implementation(device),
                           "fwd_rel": rel_err(compiled, eager),
                           "weight_grad_rel": rel_err(_weight_grad(head.conv), g_eager)}
    row["ok"] = row["fwd_rel"] <= 1e-3 and row["weight_grad_rel"] <= 1e-3  # TF32 convs may differ
    return row


def check_extension(smoke: bool, log: Callable[[dict], None], cuda_build: bool = False) -> dict:
    """Build the extension(s), then every case x dtype x layout against the reference, and compile through it."""
    from bgtrain.ops import extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    device = "cpu" if smoke else "cuda"
    built = {}
    t = time.perf_counter()
    built["cpu"] = str(extension.load_cpu().__file__)
    if smoke and not cuda_build:
        built["cuda"] = ("skipped: nvcc takes minutes on a few cores (pass --smoke-cuda-build; "
                         "tests/test_ops.py builds it), and running the kernels " + NEEDS_CUDA)
    elif smoke and not _nvcc_available():
        built["cuda"] = "skipped: no nvcc on this machine"
    else:  # with --cpu-smoke this proves the CUDA sources still build; running them needs a GPU
        built["cuda"] = str(extension.load_cuda().__file__)
    log({"check": "extension", "build": built, "archs": extension.resolve_archs(),
         "build_s": round(time.perf_counter() - t, 1)})
    failures, cases = 0, 0
    for shape in SMOKE_CASES if smoke else CASES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for cl in (False, True):
                row = check_case(shape, dtype, cl, device)
                log(row)
                cases += 1
                failures += not row["ok"]
    from bgtrain.ops import dispatch
    # On the CPU the default is the torch reference; the smoke compiles through the C++ extension instead.
    with environment(dispatch.ENV_VAR, "cpu") if smoke else contextlib.nullcontext():
        compiled = check_compile(device)
    log(compiled)
    from bgtrain.ops import active_implementation
    return {"ok": failures == 0 and compiled["ok"], "device": device, "implementation": active_implementation(device),
            "cases": cases, "failed_cases": failures, "compile_ok": compiled["ok"], "build": built,
            "cuda_kernels_run": not smoke}


def _nvcc_available() -> bool:
    from bgtrain.ops import extension
    try:
        return (Path(extension.find_cuda_home()) / "bin" / "nvcc").exists()
    except Exception:  # noqa: BLE001 - no toolkit found at all
        return False


# --- 3. BoostLU benchmark --------------------------------------------------------------------------------------

def check_boostlu_bench(smoke: bool, log: Callable[[dict], None]) -> dict:
    """Extension vs eager vs compile; the goal is read at 64x5000x14x14 bf16 fwd+bwd, channels-last."""
    from bgtrain.bench import boostlu

    device = torch.device("cpu" if smoke else "cuda")
    shape = (4, 50, 14, 14) if smoke else (64, 5000, 14, 14)
    dtype = "fp32" if smoke else "bf16"
    # torch.compile of this op on 2 CPU cores costs minutes; the extension check compiles through the op already.
    impls = ["eager", "ext"] if smoke else ["eager", "compile", "ext"]
    rows: list[dict] = []
    summaries = {}

    def record(row: dict) -> None:
        rows.append(row)
        log(row)

    for cl in (False, True):
        summaries["channels_last" if cl else "contiguous"] = boostlu.run(
            device, [shape], [dtype], impls, 5.0, cl, 2 if smoke else 10, 3 if smoke else 50, record)
    ext = {("channels_last" if r["channels_last"] else "contiguous"): r["time_us"]
           for r in rows if r["impl"] == "ext" and r["pass"] == "fwd+bwd"}
    out = {"ok": all(r["rel_err_vs_eager"] <= TOLERANCE[boostlu.DTYPES[dtype]] * 10 for r in rows),
           "shape": list(shape), "dtype": dtype, "impls": impls, "ext_fwd_bwd_us": ext, "speedups": summaries}
    if smoke:
        out["goal_met"] = None
        out["goal_note"] = f"the {GOALS['boostlu_fwd_bwd_us']} us goal is for 64x5000x14x14 bf16 on a GPU"
    else:
        out["goal_met"] = ext["channels_last"] <= GOALS["boostlu_fwd_bwd_us"]
    return out


# --- 4. evaluator -----------------------------------------------------------------------------------------------

def check_evaluator(smoke: bool, log: Callable[[dict], None]) -> dict:
    """AP on the device path (the torch sort path; on the GPU) against the CPU path on the same data."""
    import numpy as np

    from bgtrain.bench.evaluate import make_data
    from bgtrain.metrics import AP_KERNEL_ENV, ap_implementation, average_precision

    n, c = (4000, 40) if smoke else (125_000, 5000)
    scores_np, labels_np = make_data(n, c, pos=0.05, known=1.0, levels=10_000, seed=0)
    scores, labels = torch.from_numpy(scores_np), torch.from_numpy(labels_np)
    device = torch.device("cpu" if smoke else "cuda")
    # The GPU's code path is the torch one; --cpu-smoke runs that path on the CPU. The reference is the CPU's
    # C++ kernel (built if needed), which is what evaluation on the CPU uses.
    with environment(AP_KERNEL_ENV, "torch"):
        s_dev, l_dev = scores.to(device), labels.to(device)
        average_precision(s_dev[:1000, :8], l_dev[:1000, :8])  # warm-up: context, kernels, thread pool
        best = float("inf")
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            ap_dev = average_precision(s_dev, l_dev)
            _sync(device)
            best = min(best, time.perf_counter() - t)
    with environment(AP_KERNEL_ENV, "cpp"):
        cpu_impl = ap_implementation("cpu", n * c)
        t = time.perf_counter()
        ap_cpu = average_precision(scores, labels)
        cpu_s = time.perf_counter() - t
    a, b = ap_dev.cpu().numpy(), ap_cpu.numpy()
    same_nan = bool((np.isnan(a) == np.isnan(b)).all())
    err = float(np.nanmax(np.abs(a - b), initial=0.0)) if same_nan else float("inf")
    out = {"ok": same_nan and err <= 1e-6, "n": n, "classes": c, "device": device.type,
           "device_implementation": "torch", "cpu_implementation": cpu_impl,
           "seconds": round(best, 4), "cpu_seconds": round(cpu_s, 4), "max_abs_err_vs_cpu": err,
           "bit_identical": bool(np.array_equal(a, b, equal_nan=True))}
    out["goal_met"] = None if smoke else best <= GOALS["evaluator_s"]
    log({"check": "evaluator", **out})
    return out


@contextlib.contextmanager
def environment(key: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a block, then restore it."""
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- 5. bench train ---------------------------------------------------------------------------------------------

def check_bench_train(smoke: bool, log: Callable[[dict], None]) -> dict:
    """``bench train`` on the anchor shape (GPU) or at tiny sizes (CPU), every backend; goals on the best run."""
    from bgtrain.bench import train

    if smoke:
        argv = ["--device", "cpu", "--synthetic", "32", "--depth", "18", "--image-size", "32", "--classes", "10",
                "--batch-size", "8", "--steps", "2", "--warmup", "1", "--backend", "dali", "webdataset"]
    else:  # the anchor is the GPU default; 256 unique 512 px JPEGs feed every step (resampled)
        argv = ["--synthetic", "256", "--source-size", "512", "--backend", "dali", "webdataset", "--decode", "gpu",
                "--compile", "both"]
    records: list[dict] = []

    def record(r: dict) -> None:
        records.append(r)
        log(r)

    train.main(argv, emit=record)
    summaries = [r for r in records if r.get("summary")]
    best = max(summaries, key=lambda s: s["end_to_end_img_per_s"])
    out = {"ok": bool(summaries) and all(s["end_to_end_img_per_s"] > 0 for s in summaries), "argv": argv,
           "summaries": summaries, "best": best}
    if smoke:
        out["goal_met"] = None
        out["skipped"] = "nvJPEG (--decode gpu): " + NEEDS_CUDA
    else:
        out["goal_met"] = (best["end_to_end_img_per_s"] >= GOALS["train_img_per_s"]
                           and best["input_efficiency"] >= GOALS["input_efficiency"])
    return out


# --- 6. DDP smoke -----------------------------------------------------------------------------------------------

def ddp_worker(rank: int, world: int, port: int, out_dir: str, cuda: bool) -> None:
    """One rank of the DDP smoke: two steps of a CAM ResNet-18 on different data per rank, then weight checksums."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bgtrain.bench.train import synthetic_batch
    from bgtrain.collectives import all_gather_fixed, force_collectives
    from bgtrain.config import LossConfig, ModelConfig
    from bgtrain.gpu_check_criteria import join_check_group
    from bgtrain.losses import build_criterion
    from bgtrain.model import build_model
    device = join_check_group(rank, world, port, cuda)
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(depth=18, channels_last=True), num_classes=10).to(device)
        before = sum(float(p.detach().double().sum()) for p in model.parameters())
        ddp = DistributedDataParallel(model, device_ids=[0] if cuda else None)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        criterion = build_criterion(LossConfig(), "synthetic")
        losses = []
        for step in range(2):
            batch = synthetic_batch(4, 64, 10, device, torch.float32, True, seed=100 * rank + step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = ddp(batch.image)
            out = criterion(logits.float(), batch.labels, 1, batch.valid, batch.sample_id)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss))
        weights = sum(float(p.detach().double().sum()) for p in model.parameters())
        with force_collectives():  # world 1 on one GPU: the all-gather still goes through NCCL
            gathered = all_gather_fixed(torch.tensor([weights], dtype=torch.float64, device=device))
        result = {"rank": rank, "backend": dist.get_backend(), "losses": losses, "weights_moved": weights != before,
                  "checksums": gathered.flatten().tolist(),
                  "nccl": str(torch.cuda.nccl.version()) if cuda else None}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def check_ddp(smoke: bool, log: Callable[[dict], None]) -> dict:
    """Two DDP steps: NCCL world 1 on the GPU, gloo world 2 with --cpu-smoke; every rank must agree on the weights."""
    world = 2 if smoke else 1
    ranks = _spawn_ranks(ddp_worker, world, not smoke)
    for r in ranks:
        log({"check": "ddp", **r})
    finite = all(all(x == x and abs(x) < float("inf") for x in r["losses"]) for r in ranks)
    agree = all(r["checksums"] == ranks[0]["checksums"] and len(set(r["checksums"])) == 1 for r in ranks)
    out = {"ok": finite and agree and all(r["weights_moved"] for r in ranks), "world": world,
           "backend": ranks[0]["backend"], "nccl": ranks[0]["nccl"], "losses_finite": finite,
           "ranks_agree_on_weights": agree}
    if smoke:
        out["skipped"] = "NCCL: " + NEEDS_CUDA + "; gloo world 2 instead"
    else:
        out["note"] = "world 1: NCCL refuses two ranks on one GPU"
    return out


def _spawn_ranks(worker: Callable, world: int, cuda: bool) -> list[dict]:
    """Run ``worker(rank, world, port, out_dir, cuda)`` on ``world`` processes; the rank{r}.json each one writes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bgtrain-ranks-") as tmp:
        mp.spawn(worker, args=(world, port, tmp, cuda), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


# --- 7. LL-Cp and EM+APL under NCCL -----------------------------------------------------------------------------

def check_criteria(smoke: bool, log: Callable[[dict], None]) -> dict:
    """LL-Cp and EM+APL steps and checkpoints, and the collectives helpers' placement: NCCL world 1, or gloo world 2."""
    from bgtrain.gpu_check_criteria import criteria_worker

    world = 2 if smoke else 1
    ranks = _spawn_ranks(criteria_worker, world, not smoke)
    for r in ranks:
        log({"check": "criteria", **r})
    misplaced = sorted({k for r in ranks for k, ok in r["placement"].items() if not ok})
    failed = sorted({c["scheme"] for r in ranks for c in r["criteria"] if not c["ok"]})
    out = {"ok": not misplaced and not failed, "world": world, "backend": ranks[0]["backend"],
           "helpers_checked": len(ranks[0]["placement"]), "helpers_misplaced": misplaced, "criteria_failed": failed,
           "entries_in_checkpoint": {c["scheme"]: c["entries_in_checkpoint"] for c in ranks[0]["criteria"]}}
    if smoke:
        out["skipped"] = "NCCL: " + NEEDS_CUDA + "; gloo world 2 instead"
    return out


# --- 1. DALI, from wheels brought in by hand -------------------------------------------------------------------

def join_wheel_parts(folder: Path, work: Path) -> list[Path]:
    """Every wheel in ``folder``, whole or split into ``X.whl.part-*`` parts, joined into ``work`` and checked.

    Each wheel needs ``X.whl.sha256`` beside it (``sha256sum`` output or the bare digest); a missing or
    different digest is an error naming the file.
    """
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        match = re.fullmatch(r"(.+\.whl)(?:\.part-.+)?", path.name)
        if match:
            groups.setdefault(match.group(1), []).append(path)
    if not groups:
        raise FileNotFoundError(f"--wheels {folder}: no X.whl or X.whl.part-* files there")
    wheels = []
    for name, parts in sorted(groups.items()):
        digest_file = folder / f"{name}.sha256"
        if not digest_file.is_file():
            raise FileNotFoundError(f"{digest_file}: missing; write it with `sha256sum {name} > {name}.sha256`")
        expected = digest_file.read_text().split()[0].lower()
        target = work / name
        sha = hashlib.sha256()
        with open(target, "wb") as out:  # `cat` of the parts, in name order
            for part in sorted(parts):
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        sha.update(chunk)
                        out.write(chunk)
        if sha.hexdigest() != expected:
            raise ValueError(f"{folder / name}: SHA-256 {sha.hexdigest()} of the joined {len(parts)} part(s) is not "
                             f"{expected} from {digest_file.name}; a part is missing or damaged")
        wheels.append(target)
    return wheels


def install_wheels(folder: Path, target: Path) -> list[str]:
    """Join, check and ``pip install --no-index --no-deps --target`` every wheel in ``folder``; returns their names.

    ``target`` goes first on ``sys.path`` and on ``PYTHONPATH`` (for processes started later).
    """
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bgtrain-wheels-") as work:
        wheels = join_wheel_parts(folder, Path(work))
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade",
                               "--target", str(target), *map(str, wheels)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install of {[w.name for w in wheels]} into {target} failed: "
                               f"{proc.stderr.strip().splitlines()[-1:]}")
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    return [w.name for w in wheels]


def check_dali(wheels: Path | None, target: Path, log: Callable[[dict], None]) -> dict:
    """DALI imports, after installing ``--wheels`` when given."""
    installed = install_wheels(wheels, target) if wheels else []
    try:
        dali = importlib.import_module("nvidia.dali")
    except ImportError as e:
        hint = "" if wheels else "; bring its wheel in by hand and pass --wheels DIR (see --help)"
        return {"ok": False, "installed": installed, "error": f"nvidia.dali does not import ({e}){hint}"}
    if dali.__file__ is None:  # a namespace package, not the DALI wheel
        return {"ok": False, "installed": installed,
                "error": "nvidia.dali imports but is not the DALI package (it has no file)"}
    out = {"ok": True, "installed": installed, "version": dali.__version__, "path": str(Path(dali.__file__).parent)}
    log({"check": "dali", **out})
    return out


# --- the run ----------------------------------------------------------------------------------------------------

def gpu_slug(smoke: bool) -> str:
    """'nvidia-h200' from the device name; 'cpu-smoke' for a --cpu-smoke run."""
    if smoke:
        return "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def run_checks(args: argparse.Namespace, log: Callable[[dict], None]) -> dict:
    """Every selected check in order, each timed and isolated (an exception fails that check only)."""
    smoke = args.cpu_smoke
    checks: dict[str, Callable[[], dict]] = {
        "dali": lambda: check_dali(args.wheels, args.wheels_target, log),
        "extension": lambda: check_extension(smoke, log, args.smoke_cuda_build),
        "boostlu_bench": lambda: check_boostlu_bench(smoke, log),
        "evaluator": lambda: check_evaluator(smoke, log),
        "bench_train": lambda: check_bench_train(smoke, log),
        "ddp": lambda: check_ddp(smoke, log),
        "criteria": lambda: check_criteria(smoke, log),
        "host_syncs": lambda: check_host_syncs(smoke, log),
        "step_speed": lambda: check_step_speed(smoke, log),
    }
    results: dict[str, dict] = {}
    start = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else (float("inf") if smoke else 480.0)
    for name in args.only:
        if time.perf_counter() - start > budget:
            results[name] = {"ok": None, "skipped": f"time budget of {budget} s spent before it started"}
        else:
            t = time.perf_counter()
            try:
                results[name] = checks[name]()
            except Exception as e:  # noqa: BLE001 - one failed check must not hide the others' results
                log({"check": name, "traceback": traceback.format_exc()})
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            results[name]["seconds"] = round(time.perf_counter() - t, 1)
        log({"check": name, "result": results[name]})
    total = time.perf_counter() - start
    return {"checks": results, "seconds": round(total, 1), "budget_s": budget, "within_budget": total <= budget,
            "passed": all(r.get("ok") is True for r in results.values()),
            "goals_met": {k: r["goal_met"] for k, r in results.items() if r.get("goal_met") is not None},
            "coverage": coverage(results, smoke)}


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m bgtrain.gpu_check``."""
    p = argparse.ArgumentParser(prog="python -m bgtrain.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/gpu"),
                   help="folder for <date>-<gpu>.json and .log (default docs/gpu)")
    p.add_argument("--cpu-smoke", action="store_true", help="every check on the CPU at tiny sizes (CI)")
    p.add_argument("--wheels", type=Path, default=None,
                   help="folder of hand-carried wheels (X.whl or X.whl.part-*, with X.whl.sha256) to install first")
    p.add_argument("--wheels-target", type=Path, default=Path(tempfile.gettempdir()) / "bgtrain-wheels",
                   help="pip --target folder for --wheels (default $TMPDIR/bgtrain-wheels)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip (and fail) checks that would start after this many seconds (default: 480 on a GPU, "
                        "none with --cpu-smoke)")
    p.add_argument("--smoke-cuda-build", action="store_true",
                   help="--cpu-smoke: also build the CUDA extension with nvcc (minutes on a few cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print JSON lines, write the report and the log; 1 if a correctness check failed."""
    p = build_parser()
    args = p.parse_args(argv)
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(args.only) - set(CHECKS))
    if unknown:
        p.error(f"--only: unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels {args.wheels}: not a folder")
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device is visible (torch.cuda.is_available() is False); use --cpu-smoke on a CPU machine")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{gpu_slug(args.cpu_smoke)}"
    log_path, report_path = args.out / f"{stem}.log", args.out / f"{stem}.json"
    with open(log_path, "w") as log_file:
        def log(record: dict) -> None:
            line = json.dumps(record, default=str)
            log_file.write(line + "\n")
            log_file.flush()
            print(line, flush=True)

        header = {"gpu_check": stem, "cpu_smoke": args.cpu_smoke, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "device_name": "cpu" if args.cpu_smoke else torch.cuda.get_device_name(),
                  "cpus": os.cpu_count(), "python": sys.version.split()[0], "nvidia_smi": _nvidia_smi(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        log(header)
        report = {**header, "goals": GOALS, **run_checks(args, log), "log": log_path.name}
        log({"gpu_check": "pass" if report["passed"] else "fail", "report": str(report_path),
             "seconds": report["seconds"], "goals_met": report["goals_met"]})
    report_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if report["passed"] else 1


def _nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    proc = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
