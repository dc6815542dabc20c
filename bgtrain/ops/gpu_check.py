"""`python -m bgtrain.ops.gpu_check`: build the CUDA extension (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise),
check it against the torch reference, benchmark it, and print JSON lines; exits 1 if a check fails.

Criteria (issue "Custom CUDA BoostLU extension"): relative error (L2 norm of the difference over the norm of the
reference, both in the same dtype on the same GPU) <= 1e-3 in bf16/fp16 and <= 1e-6 in fp32 ("equal up to
summation order"), for the logits and the CAM gradient; the standalone boostlu must be bit-exact.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bgtrain.ops import library, reference

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}
CASES = [(64, 5000, 14, 14), (256, 80, 14, 14), (4, 37, 14, 14), (3, 70, 20, 20), (2, 33, 7, 7), (5, 1, 3, 3),
         (2, 64, 1, 1)]
EPILOG = """examples:
  python -m bgtrain.ops.gpu_check                   # build for sm_90, check, benchmark
  TORCH_CUDA_ARCH_LIST=8.0 python -m bgtrain.ops.gpu_check --no-bench
"""


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
    row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last,
           "pool_fwd_rel": rel_err(out_ext, out_ref), "pool_bwd_rel": rel_err(g_ext, g_ref),
           "grad_layout_kept": g_ext.is_contiguous(memory_format=torch.channels_last) == channels_last
           or shape[1] == 1 or shape[2] * shape[3] == 1,
           "boostlu_fwd_exact": bool(torch.equal(e_ext, e_ref)), "boostlu_bwd_exact": bool(torch.equal(ge_ext, ge_ref))}
    row["ok"] = (row["pool_fwd_rel"] <= tol and row["pool_bwd_rel"] <= tol and row["grad_layout_kept"]
                 and row["boostlu_fwd_exact"] and row["boostlu_bwd_exact"])
    return row


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
    g_eager = head.conv.weight.grad.clone()
    head.zero_grad()
    compiled = torch.compile(head, fullgraph=True)(x)
    compiled.sum().backward()
    row = {"check": "compile", "implementation": active_implementation(device),
           "fwd_rel": rel_err(compiled, eager), "weight_grad_rel": rel_err(head.conv.weight.grad, g_eager)}
    row["ok"] = row["fwd_rel"] <= 1e-3 and row["weight_grad_rel"] <= 1e-3  # TF32 convs may differ
    return row


def main(argv: list[str] | None = None) -> int:
    """Build, check and benchmark the CUDA extension; print JSON lines; return 1 on any failed check."""
    parser = argparse.ArgumentParser(prog="python -m bgtrain.ops.gpu_check", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--bench-args", default="", help='extra args for the benchmark, e.g. "--dtypes bf16"')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"gpu_check": "skipped", "reason": "no CUDA device visible"}))
        return 1
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from bgtrain.ops import extension

    module = extension.load_cuda()
    print(json.dumps({"build": str(module.__file__), "archs": extension.resolve_archs(),
                      "device_name": torch.cuda.get_device_name()}), flush=True)
    failures = []
    for shape in CASES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for cl in (False, True):
                row = check_case(shape, dtype, cl, "cuda")
                print(json.dumps(row), flush=True)
                if not row["ok"]:
                    failures.append(row)
    row = check_compile("cuda")
    print(json.dumps(row), flush=True)
    if not row["ok"]:
        failures.append(row)
    if not args.no_bench:
        from bgtrain.bench import boostlu as bench

        for extra in ([], ["--channels-last"]):
            bench.main(["--device", "cuda", *extra, *args.bench_args.split()])
    print(json.dumps({"gpu_check": "fail" if failures else "pass", "failures": len(failures)}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
