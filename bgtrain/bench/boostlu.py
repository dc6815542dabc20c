"""BoostLU+GAP benchmark: eager reference vs torch.compile(reference) vs the extension, fwd and fwd+bwd.

Prints one JSON line per (shape, dtype, implementation, pass) and a last JSON line with the speedups.

The HBM floor is the time to move the bytes a kernel that keeps the CAM for backward must move, at the GPU's peak
bandwidth (H100 SXM 3.35e12 B/s, H200 4.8e12 B/s; docs/design.md's ~78 us for 64x5000x14x14 bf16 on an H200):
fwd reads the CAM and writes the logits; fwd+bwd also reads the CAM again and the logit gradient, and writes the
CAM gradient. The extension keeps a 1-bit mask instead, so it can go below this floor (ratio < 1).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bgtrain.ops import library, reference

EPILOG = """examples:
  python -m bgtrain.bench boostlu                                  # default shapes for the device
  python -m bgtrain.bench boostlu --device cuda --shapes 64x5000x14x14 --dtypes bf16
  python -m bgtrain.bench boostlu --device cpu --impls eager,ext --channels-last
"""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = {"cuda": "64x5000x14x14,256x80x14x14", "cpu": "8x80x14x14,4x500x14x14"}
PASSES = ("fwd", "fwd+bwd")


def peak_bandwidth(device: torch.device) -> float | None:
    """Peak HBM bandwidth in B/s from the GPU's name (H100, H200), or None when unknown or on the CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return 4.8e12
    if "H100" in name:
        return 2.0e12 if "PCIe" in name else 3.9e12 if "NVL" in name else 3.35e12
    return None


def floor_bytes(shape: tuple[int, ...], dtype: torch.dtype, pass_: str) -> int:
    """Bytes a CAM-saving BoostLU+GAP must move: fwd = CAM + logits, fwd+bwd = 3 CAM passes + 2 logit passes."""
    b, c, h, w = shape
    size = torch.finfo(dtype).bits // 8
    cam, logits = b * c * h * w * size, b * c * size
    return cam + logits if pass_ == "fwd" else 3 * cam + 2 * logits


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """'64x5000x14x14,256x80x14x14' -> [(64, 5000, 14, 14), (256, 80, 14, 14)]."""
    shapes: list[tuple[int, int, int, int]] = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: {item!r} is not BxCxHxW with positive integers, e.g. 64x5000x14x14")
        b, c, h, w = (int(p) for p in parts)
        shapes.append((b, c, h, w))
    return shapes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(step: Callable[[], object], device: torch.device, warmup: int, iters: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of `iters` calls of `step`, in microseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            samples.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(samples)


def _make_steps(fn: Callable, cam: torch.Tensor, grad: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    cam_g = cam.detach().requires_grad_(True)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return fn(cam)

    def fwd_bwd() -> torch.Tensor:
        return torch.autograd.grad(fn(cam_g), cam_g, grad)[0]

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _implementations(names: list[str], alpha: float) -> dict[str, Callable]:
    impls: dict[str, Callable] = {}
    for name in names:
        if name == "eager":
            impls[name] = lambda cam: reference.boostlu_pool(cam, alpha)
        elif name == "compile":
            def eager_pool(cam: torch.Tensor) -> torch.Tensor:
                return reference.boostlu_pool(cam, alpha)

            impls[name] = torch.compile(eager_pool, dynamic=False)
        elif name == "ext":
            impls[name] = lambda cam: library.boostlu_pool(cam, alpha)
        else:
            raise SystemExit(f"--impls: unknown implementation {name!r}; choose from eager, compile, ext")
    return impls


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def run(device: torch.device, shapes, dtypes, impl_names, alpha, channels_last, warmup, iters, emit) -> dict:
    """Benchmark every combination, call `emit(row)` per measurement, and return the summary row."""
    bandwidth = peak_bandwidth(device)
    if "ext" in impl_names:  # build/load first, so that a JIT build is not timed
        from bgtrain.ops import extension

        extension.load_cuda() if device.type == "cuda" else extension.load_cpu()
    times: dict[tuple, float] = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            cam = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            if channels_last:
                cam = cam.contiguous(memory_format=torch.channels_last)
            grad = torch.randn(shape[:2], generator=gen).to(device=device, dtype=dtype)
            expected = {p: s() for p, s in _make_steps(lambda t: reference.boostlu_pool(t, alpha), cam, grad).items()}
            # fresh torch.compile per case: one function over all cases would hit dynamo's recompile limit
            for name, fn in _implementations(impl_names, alpha).items():
                steps = _make_steps(fn, cam, grad)
                for pass_ in PASSES:
                    err = _rel_err(steps[pass_](), expected[pass_])
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    t = time_us(steps[pass_], device, warmup, iters)
                    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
                    fb = floor_bytes(shape, dtype, pass_)
                    floor = fb / bandwidth * 1e6 if bandwidth else None
                    key = ("x".join(map(str, shape)), dname, pass_)
                    times[key + (name,)] = t
                    emit({"bench": "boostlu_pool", "device": device.type, "device_name": _device_name(device),
                          "shape": list(shape), "dtype": dname, "channels_last": channels_last, "impl": name,
                          "pass": pass_, "time_us": round(t, 2), "floor_bytes": fb,
                          "floor_us": None if floor is None else round(floor, 2),
                          "ratio_to_floor": None if floor is None else round(t / floor, 3),
                          "peak_extra_mib": None if peak is None else round(peak, 1), "rel_err_vs_eager": err})
    return _summary(times, impl_names)


def _summary(times: dict[tuple, float], impl_names: list[str]) -> dict:
    keys = sorted({k[:3] for k in times})
    out: dict[str, object] = {"summary": True}
    for base in ("eager", "compile"):
        if base in impl_names and "ext" in impl_names:
            out[f"ext_speedup_vs_{base}"] = {"/".join(k): round(times[k + (base,)] / times[k + ("ext",)], 3)
                                             for k in keys}
    if "compile" in impl_names and "eager" in impl_names:
        out["compile_speedup_vs_eager"] = {"/".join(k): round(times[k + ("eager",)] / times[k + ("compile",)], 3)
                                           for k in keys}
    return out


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    """CLI entry: `python -m bgtrain.bench boostlu [--shapes ...] [--dtypes ...] [--device cpu|cuda]`."""
    parser = argparse.ArgumentParser(prog="python -m bgtrain.bench boostlu", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated BxCxHxW (default: "
                        f"cuda {DEFAULT_SHAPES['cuda']}; cpu {DEFAULT_SHAPES['cpu']})")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, from bf16, fp16, fp32")
    parser.add_argument("--impls", default="eager,compile,ext", help="comma-separated, from eager, compile, ext")
    parser.add_argument("--alpha", type=float, default=5.0, help="BoostLU alpha (default 5)")
    parser.add_argument("--channels-last", action="store_true", help="benchmark channels-last CAMs")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: cuda 10, cpu 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per sample (default: cuda 50, cpu 5)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    shapes = parse_shapes(args.shapes or DEFAULT_SHAPES[device.type])
    gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    iters = args.iters if args.iters is not None else (50 if gpu else 5)
    impl_names = [i.strip() for i in args.impls.split(",") if i.strip()]
    for name in impl_names:
        if name not in ("eager", "compile", "ext"):
            raise SystemExit(f"--impls: unknown implementation {name!r}; choose from eager, compile, ext")

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    summary = run(device, shapes, dtypes, impl_names, args.alpha, args.channels_last, warmup, iters, emit)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
