"""Training throughput end to end, in one run: the ceiling, the real loader feeding the step, the loader alone.

Modes, each timed over ``--steps`` steps after ``--warmup`` untimed ones (pipeline build, compilation and
cuDNN autotuning happen there):

* ``synthetic``: one batch already on the device, shaped as the loader shapes it (dtype, channels-last,
  signed int8 labels), fed to every step: the step's ceiling.
* ``loader``: the real :func:`~bgtrain.data.build_loader` over shards (``--backend``, ``--decode``) feeding the
  same step. ``data_wait_ms`` is the time the loop blocks on the next batch, ``compute_ms`` the rest of
  the step (on a GPU: the time to queue it, plus any wait for the queue to drain).
* ``loader_only``: the loader alone, no step.

The step is the trainer's: ``build_model`` -> ``build_engine`` -> ``engine.step`` with ``build_criterion``'s loss
(scheme AN), and no host read per step unless ``--host-sync`` asks for the old per-step ``loss.item()``. Each
(compile setting, backend) pair ends with a summary line holding ``input_efficiency = loader / synthetic``
img/s (with ``--repeats R``, the modes alternate R times and the summary takes each mode's fastest round).
Peak memory is CUDA's max allocated over the timed steps on a GPU (DALI's own buffers are not in it), the
process's peak RSS so far on the CPU.

The loader runs in resampled mode (``data.resampled``) with a nominal epoch of every batch the bench takes,
so a few hundred unique images feed any number of steps without an epoch boundary (a DALI pipeline rebuild)
inside the timed region.

Examples::

    python -m bgtrain.bench train --device cpu --synthetic 64 --depth 18 --image-size 64 --classes 20 --steps 6
    python -m bgtrain.bench train --synthetic 1024 --compile both --backend dali webdataset --decode gpu  # anchor
    python -m bgtrain.bench train --shards data/openimages --batch-size 64 --compile yes --compile-mode max-autotune
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
from torch import nn

from bgtrain.bench.loader import endless
from bgtrain.config import Backend, DataConfig, EngineConfig, ModelConfig, TrainConfig
from bgtrain.data import Batch, build_loader
from bgtrain.distributed import WorldInfo

# The step's parts come from the project's factories and the trainer's own step: the bench measures the real step.
from bgtrain.engines import DTYPES, build_engine
from bgtrain.losses import Criterion, build_criterion
from bgtrain.model import build_model
from bgtrain.trainer import train_step

COMPILE_CHOICES = {"no": [False], "yes": [True], "both": [False, True]}
ANCHOR = "R50, 448 px, 5000 classes, batch 64, bf16, channels-last, eager and compile, DALI mixed"


@dataclass(frozen=True)
class Measurement:
    """One timed mode: wall time of the timed steps and the part of it spent waiting for batches."""

    steps: int
    batch_size: int
    seconds: float
    data_wait_s: float
    peak_mem_mib: float
    peak_mem_kind: str
    host_syncs: int | None = None

    def record(self) -> dict:
        """The JSON fields: img/s and the per-step split in milliseconds."""
        per_step = 1e3 / self.steps
        return {"img_per_s": round(self.steps * self.batch_size / self.seconds, 1),
                "step_ms": round(self.seconds * per_step, 2), "data_wait_ms": round(self.data_wait_s * per_step, 2),
                "compute_ms": round((self.seconds - self.data_wait_s) * per_step, 2),
                "peak_mem_mib": round(self.peak_mem_mib, 1), "peak_mem_kind": self.peak_mem_kind,
                "steps": self.steps, "seconds": round(self.seconds, 3),
                **({} if self.host_syncs is None else {"host_syncs_per_step": round(self.host_syncs / self.steps, 2)})}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak; the CPU's peak RSS cannot be reset (it is the process's so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, kind): CUDA max allocated since the last reset, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"  # Linux: KiB


def measure(step: Callable[[Batch], object], batches: Iterator[Batch], warmup: int, steps: int,
            batch_size: int, device: torch.device, count_syncs: bool = False) -> Measurement:
    """Run ``warmup`` untimed then ``steps`` timed steps; the device is synchronised only around the timed ones.

    ``count_syncs`` (CUDA) counts the host syncs torch sees in the timed steps (``torch.cuda.set_sync_debug_mode``).
    """
    for _ in range(warmup):
        step(next(batches))
    synchronize(device)
    reset_peak_memory(device)
    wait = 0.0
    with sync_counter(device, count_syncs) as syncs:
        start = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t
            step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    return Measurement(steps, batch_size, seconds, wait, *peak_memory(device),
                       host_syncs=len(syncs) if count_syncs and device.type == "cuda" else None)


@contextlib.contextmanager
def sync_counter(device: torch.device, enabled: bool) -> Iterator[list]:
    """Collect torch's "synchronizing CUDA operation" warnings raised inside the block (CUDA only)."""
    if not enabled or device.type != "cuda":
        yield []
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        found: list = []
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            found.extend(w for w in caught if "synchroniz" in str(w.message))


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, device: torch.device, dtype: torch.dtype,
                    channels_last: bool, seed: int = 0) -> Batch:
    """A batch as the loader delivers it, made on the device: normal images, one observed positive per row."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    image = torch.randn((batch_size, 3, image_size, image_size), generator=gen).to(device, dtype)
    image = image.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    labels = torch.full((batch_size, num_classes), -1, dtype=torch.int8)
    labels[torch.arange(batch_size), torch.randint(num_classes, (batch_size,), generator=gen)] = 1
    return Batch(image=image, labels=labels.to(device), sample_id=torch.arange(batch_size, device=device),
                 valid=torch.ones(batch_size, dtype=torch.bool, device=device), num_valid=batch_size,
                 step_has_data=True)


def make_step(engine, criterion, epoch: int, host_sync: bool) -> Callable[[Batch], object]:
    """The trainer's step on one batch; ``host_sync`` adds the per-step ``loss.item()`` the loop used to do."""
    def step(batch: Batch):
        out = train_step(engine, criterion, batch, epoch)
        return out.loss.item() if host_sync and out is not None else out
    return step


def bench_config(args: argparse.Namespace, shards: Path, compile_: bool) -> TrainConfig:
    """The TrainConfig a bench run stands for (one loader backend is filled in per run)."""
    needed = (args.warmup + args.steps + 1) * args.batch_size
    data = DataConfig(shards=str(shards), backend=args.backend[0], decode=args.decode, image_size=args.image_size,
                      batch_size=args.batch_size, workers=args.workers, shuffle_buffer=256, resampled=True,
                      epoch_samples=needed)
    return TrainConfig(name="bench-train", seed=0,
                       model=ModelConfig(depth=args.depth, channels_last=args.channels_last),
                       data=data, engine=EngineConfig(engine=args.engine, precision=args.precision, compile=compile_))


def build_step_parts(cfg: TrainConfig, num_classes: int, dataset: str, num_samples: int, device: torch.device,
                     compile_mode: str | None, compile_loss: bool = False):
    """(engine, criterion) from the project's factories; ``compile_mode`` compiles the model here with that mode.

    The engine's own ``torch.compile`` takes no mode (no ``engine.compile_mode`` key yet), so a mode is tried
    by handing the engine a model compiled with it and ``engine.compile=False``. ``compile_loss`` compiles the
    criterion too (the engine compiles the model only), to measure what that is worth before the engine does it.
    """
    torch.manual_seed(cfg.seed)
    model: nn.Module = build_model(cfg.model, num_classes)
    if compile_mode and cfg.engine.compile:  # compiling a Module gives a Module (torch's stub says Callable)
        model = cast(nn.Module, torch.compile(model.to(device), mode=compile_mode))
        cfg = replace(cfg, engine=replace(cfg.engine, compile=False))
    engine = build_engine(cfg, model, WorldInfo(), device)
    criterion = build_criterion(cfg.loss, dataset, num_samples, num_classes, epochs=cfg.optim.epochs,
                                lr=cfg.optim.lr * cfg.optim.head_lr_mult, seed=cfg.seed,
                                batch_rows=cfg.data.batch_size)
    if compile_loss and cfg.engine.compile:
        criterion = CompiledLoss(criterion, compile_mode)
    return engine, criterion


class CompiledLoss(Criterion):
    """A criterion whose loss runs under ``torch.compile``; its label hooks are the wrapped criterion's."""

    def __init__(self, inner: Criterion, mode: str | None) -> None:
        self.inner, self.loss = inner, torch.compile(inner.__call__, mode=mode)

    def __call__(self, *args, **kwargs):
        return self.loss(*args, **kwargs)

    def prepare_labels(self, labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.prepare_labels(labels, sample_ids)

    def after_step(self, out=None, sample_ids=None) -> None:
        self.inner.after_step(out, sample_ids)


def _loader_stream(cfg: TrainConfig, backend: Backend, device: torch.device, dtype: torch.dtype):
    data = replace(cfg.data, backend=backend)
    loader = build_loader(data, "train", WorldInfo(), device, train=True, seed=cfg.seed,
                          channels_last=cfg.model.channels_last, dtype=dtype)
    return endless(loader)


def run(args: argparse.Namespace, shards: Path, emit: Callable[[dict], None]) -> list[dict]:
    """Every mode for every compile setting and backend; returns the summary records (also emitted)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[args.precision] if device.type == "cuda" else torch.float32  # as the trainer feeds the step
    probe = build_loader(bench_config(args, shards, False).data, "train", WorldInfo(), device, train=True, seed=0)
    info, num_classes = probe.info, probe.num_classes
    emit({"bench": "train", "device": device.type, "device_name": _device_name(device), "torch": torch.__version__,
          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
          "depth": args.depth, "image_size": args.image_size, "classes": num_classes, "batch_size": args.batch_size,
          "precision": args.precision, "input_dtype": str(dtype).removeprefix("torch."),
          "channels_last": args.channels_last, "engine": args.engine, "compile_mode": args.compile_mode,
          "compile_loss": args.compile_loss,
          "backends": args.backend, "decode": args.decode, "workers": args.workers, "steps": args.steps,
          "warmup": args.warmup, "repeats": args.repeats, "host_sync": args.host_sync, "shards": str(shards),
          "unique_samples": info.num_samples, "resampled": True, "synthetic_images": args.synthetic})
    summaries = []
    for compile_ in COMPILE_CHOICES[args.compile]:
        cfg = bench_config(args, shards, compile_)
        label = ("compile" + (f":{args.compile_mode}" if args.compile_mode else "")
                 + ("+loss" if args.compile_loss else "")) if compile_ else "eager"
        engine, criterion = build_step_parts(cfg, num_classes, info.dataset, info.num_samples, device,
                                             args.compile_mode, args.compile_loss)
        step = make_step(engine, criterion, epoch=1, host_sync=args.host_sync)
        batch = synthetic_batch(args.batch_size, args.image_size, num_classes, device, dtype, args.channels_last)
        best: dict[str, Measurement] = {}
        for round_ in range(args.repeats):  # rounds alternate the modes, so a noisy spell hits both
            m = measure(step, itertools.repeat(batch), args.warmup, args.steps, args.batch_size, device,
                        args.count_syncs)
            emit({"mode": "synthetic", "compile": label, "round": round_, **m.record()})
            best["synthetic"] = _faster(best.get("synthetic"), m)
            for backend in args.backend:
                stream = _loader_stream(cfg, backend, device, dtype)
                try:
                    m = measure(step, stream, args.warmup, args.steps, args.batch_size, device, args.count_syncs)
                finally:
                    stream.close()  # ends the loader's workers / DALI pipeline before the next mode
                emit({"mode": "loader", "compile": label, "round": round_, "backend": backend,
                      "decode": _decode_label(backend, args.decode, device), **m.record()})
                best[backend] = _faster(best.get(backend), m)
        del batch
        a = best["synthetic"].record()["img_per_s"]
        for backend in args.backend:
            b = best[backend].record()["img_per_s"]
            summaries.append({"summary": True, "compile": label, "backend": backend,
                              "decode": _decode_label(backend, args.decode, device), "rounds": args.repeats,
                              "ceiling_img_per_s": a, "end_to_end_img_per_s": b, "input_efficiency": round(b / a, 3),
                              "data_wait_ms": best[backend].record()["data_wait_ms"],
                              "compute_ms": best[backend].record()["compute_ms"]})
        del engine, criterion, step
    for backend in args.backend:
        stream = _loader_stream(bench_config(args, shards, False), backend, device, dtype)
        try:
            alone = measure(lambda batch: None, stream, args.warmup, args.steps, args.batch_size, device)
        finally:
            stream.close()
        emit({"mode": "loader_only", "backend": backend, "decode": _decode_label(backend, args.decode, device),
              **alone.record()})
        for s in summaries:
            if s["backend"] == backend:
                s["loader_alone_img_per_s"] = alone.record()["img_per_s"]
    for s in summaries:
        emit(s)
    return summaries


def _faster(a: Measurement | None, b: Measurement) -> Measurement:
    return b if a is None or b.seconds < a.seconds else a


def _decode_label(backend: str, decode: str, device: torch.device) -> str:
    """Where JPEGs are decoded: DALI decodes 'mixed' (nvJPEG) whenever it runs for a GPU, else on the CPU."""
    if backend == "dali":
        return "mixed" if device.type == "cuda" else "cpu"
    return decode


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``bench train``; defaults are the anchor shape on a GPU, tiny sizes on the CPU."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bgtrain.bench train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python -m bgtrain.bench train --device cpu --synthetic 64 "
                                       "--depth 18 --image-size 64 --classes 20 --steps 6\n"
                                       "  python -m bgtrain.bench train --synthetic 1024   # on a GPU: the anchor, "
                                       f"{ANCHOR}")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", type=Path, help="shard folder with manifest.json (its train split is read)")
    src.add_argument("--synthetic", type=int, metavar="N", help="build N synthetic training images into a temporary "
                     "shard folder (shards.synthetic) and read those")
    p.add_argument("--source-size", type=int, default=None,
                   help="--synthetic: side of the source JPEGs (default min(512, 2 x --image-size))")
    p.add_argument("--classes", type=int, default=5000, help="--synthetic: classes (default 5000; --shards: "
                   "the manifest's)")
    p.add_argument("--depth", type=int, choices=(18, 34, 50, 101), default=50, help="ResNet depth (default 50)")
    p.add_argument("--image-size", type=int, default=448, help="training side in pixels (default 448)")
    p.add_argument("--batch-size", type=int, default=64 if gpu else 16,
                   help="per-step batch (default: 64 on a GPU, 16 on the CPU)")
    p.add_argument("--precision", choices=tuple(DTYPES), default="bf16" if gpu else "fp32",
                   help="engine.precision (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--compile", nargs="?", const="yes", choices=tuple(COMPILE_CHOICES), default="both" if gpu else "no",
                   help="engine.compile: no, yes (bare --compile) or both, measured one after the other "
                        "(default: both on a GPU, no on the CPU)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled runs, e.g. "
                   "reduce-overhead (CUDA graphs) or max-autotune (default: torch's default)")
    p.add_argument("--compile-loss", action="store_true",
                   help="compiled runs: compile the loss as well as the model (the engine compiles the model only)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="model.channels_last (default on)")
    p.add_argument("--backend", nargs="+", choices=("dali", "webdataset"), default=["dali"],
                   help="loader backends to measure, in order (default dali: 'mixed' nvJPEG on a GPU)")
    p.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                   help="data.decode for the webdataset backend: PIL in the workers or nvJPEG on the GPU")
    p.add_argument("--workers", type=int, default=8 if gpu else 2,
                   help="data.workers: loader processes / DALI threads (default: 8 on a GPU, 2 on the CPU)")
    p.add_argument("--steps", type=int, default=50 if gpu else 6, help="timed steps per mode (default: 50 GPU, 6 CPU)")
    p.add_argument("--warmup", type=int, default=10 if gpu else 2,
                   help="untimed steps before each mode (default: 10 GPU, 2 CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if gpu else "cpu",
                   help="default: cuda when available")
    p.add_argument("--engine", choices=("ddp", "deepspeed"), default="ddp", help="engine.engine (default ddp)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of (synthetic, loaders) per compile setting; summaries take each mode's best (1)")
    p.add_argument("--host-sync", action="store_true",
                   help="read the loss with .item() after every step, as the training loop once did")
    p.add_argument("--count-syncs", action="store_true",
                   help="CUDA: count host syncs in the timed steps (torch.cuda.set_sync_debug_mode; slows them a bit)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors for values the parser's types cannot rule out."""
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.workers < 0:
        p.error("--steps, --repeats and --batch-size must be >= 1, --warmup and --workers >= 0")
    if args.image_size < 16:
        p.error(f"--image-size: {args.image_size} is below 16 pixels")
    if args.synthetic is not None and (args.synthetic < 1 or args.classes < 2):
        p.error("--synthetic needs N >= 1 images and --classes >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if args.decode == "gpu" and args.device != "cuda":
        p.error("--decode gpu needs --device cuda (nvJPEG)")
    if (args.compile_mode or args.compile_loss) and args.compile == "no":
        p.error("--compile-mode and --compile-loss need --compile yes or both")


@contextlib.contextmanager
def synthetic_shards(n: int, num_classes: int, source_size: int) -> Iterator[Path]:
    """A temporary shard folder of ``n`` synthetic training images (and one test image)."""
    from shards.synthetic import build
    with tempfile.TemporaryDirectory(prefix="bgtrain-bench-train-") as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # its progress bar must not mix with the JSON lines
            build(Path(tmp), num_classes=num_classes, n_train=n, n_val=0, n_test=1, size=source_size, seed=0,
                  shard_size=max(1, min(250, n // 8)))
        yield Path(tmp)


def deepspeed_env() -> None:
    """DeepSpeed starts a process group even for one process: give it a local single-rank rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def main(argv: Sequence[str] | None = None, emit: Callable[[dict], None] | None = None) -> int:
    """CLI entry: ``python -m bgtrain.bench train``; prints JSON lines (or hands them to ``emit``)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    emit = emit or (lambda record: print(json.dumps(record), flush=True))
    if args.engine == "deepspeed":
        deepspeed_env()
    try:
        if args.shards is not None:
            run(args, args.shards, emit)
            return 0
        source = args.source_size or min(512, 2 * args.image_size)
        with synthetic_shards(args.synthetic, args.classes, source) as shards:
            run(args, shards, emit)
        return 0
    finally:
        if torch.distributed.is_initialized():  # DeepSpeed's single-rank group
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
