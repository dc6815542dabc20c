"""BoostLU ops: the C++/CUDA extension against the reference formula, dispatch, torch.compile, and the CUDA build."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bgtrain.ops import dispatch, extension, library, reference
from tests.conftest import run_together

ALPHA = 5.0
NO_GPU = "no CUDA device visible: the CUDA kernels can only be checked on a GPU (python -m bgtrain.gpu_check)"


def _cam(shape, dtype=torch.float32, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[x.abs() < 0.05] = 0.0  # exact zeros: the reference boosts strictly positive entries only
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _formula_pool(cam: torch.Tensor, alpha: float) -> torch.Tensor:
    """Independent fp64 statement of BoostLU+GAP: mean over HW of max-style boost of strictly positive entries."""
    c = cam.double()
    return (c + (alpha - 1.0) * c.clamp_min(0.0)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def cpu_ext():
    """The C++ CPU extension (JIT-built once into the cache, ~30 s the first time)."""
    return extension.load_cpu()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_boostlu_is_bit_exact_with_reference(cpu_ext, dtype, channels_last):
    x = _cam((3, 37, 5, 6), dtype, channels_last).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = library.boostlu(x, ALPHA), reference.boostlu(xr, ALPHA)
    assert torch.equal(y, yr)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = _cam((3, 37, 5, 6), dtype, channels_last, seed=1)
    (gx,), (gr,) = torch.autograd.grad(y, x, g), torch.autograd.grad(yr, xr, g)
    assert torch.equal(gx, gr)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_pool_fp32_matches_formula(cpu_ext, channels_last):
    cam = _cam((4, 45, 14, 14), torch.float32, channels_last)
    out = library.boostlu_pool(cam, ALPHA)
    torch.testing.assert_close(out.double(), _formula_pool(cam, ALPHA), rtol=1e-6, atol=1e-7)
    # ... and the fp32 reference itself up to its summation order
    torch.testing.assert_close(out, reference.boostlu_pool(cam, ALPHA), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_pool_low_precision_close_to_reference(cpu_ext, dtype, channels_last):
    cam = _cam((4, 45, 14, 14), dtype, channels_last)
    out = library.boostlu_pool(cam, ALPHA)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.boostlu_pool(cam, ALPHA), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_pool_backward_equals_reference_autograd(cpu_ext, dtype, channels_last):
    cam = _cam((3, 40, 7, 9), dtype, channels_last).requires_grad_(True)
    camr = cam.detach().clone().requires_grad_(True)
    g = _cam((3, 40), dtype, seed=2)
    (gx,) = torch.autograd.grad(library.boostlu_pool(cam, ALPHA), cam, g)
    (gr,) = torch.autograd.grad(reference.boostlu_pool(camr, ALPHA), camr, g)
    assert torch.equal(gx, gr)
    assert gx.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_pool_gradient_is_grad_over_hw_times_alpha_on_strict_positives(cpu_ext):
    cam = torch.tensor([[[[-1.0, 0.0], [2.0, -0.0]]]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(library.boostlu_pool(cam, ALPHA), cam, torch.ones(1, 1, dtype=torch.float64))
    assert g.flatten().tolist() == [0.25, 0.25, 0.25 * ALPHA, 0.25]  # zero is not boosted
    assert library.boostlu_pool(cam, ALPHA).item() == pytest.approx((-1.0 + 2.0 * ALPHA) / 4)


def test_non_dense_input_is_handled(cpu_ext):
    cam = _cam((4, 30, 10, 10))[:, ::2, 1:8, ::3]  # strided view: the op copies it to a dense layout
    torch.testing.assert_close(library.boostlu_pool(cam, ALPHA), reference.boostlu_pool(cam, ALPHA))
    assert torch.equal(library.boostlu(cam, ALPHA), reference.boostlu(cam, ALPHA))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_fp64_both_ops(cpu_ext, channels_last):
    cam = _cam((2, 35, 3, 4), torch.float64, channels_last)
    cam = torch.where(cam >= 0, cam + 0.2, cam - 0.2).requires_grad_(True)  # away from the kink at 0
    assert torch.autograd.gradcheck(lambda t: library.boostlu_pool(t, ALPHA), (cam,))
    assert torch.autograd.gradcheck(lambda t: library.boostlu(t, ALPHA), (cam,))


def test_custom_ops_pass_opcheck(cpu_ext):
    cam = _cam((2, 33, 3, 5)).requires_grad_(True)
    cam_cl = _cam((2, 33, 3, 5), channels_last=True).requires_grad_(True)
    for t in (cam, cam_cl):
        torch.library.opcheck(library.boostlu_pool_fwd, (t, ALPHA, True))
        torch.library.opcheck(library.boostlu_fwd, (t, ALPHA))


def test_no_grad_forward_skips_the_mask(cpu_ext):
    cam = _cam((2, 5, 4, 4))
    with torch.no_grad():
        logits, mask = library.boostlu_pool_fwd(cam.requires_grad_(True), ALPHA, False)
    assert mask.numel() == 0 and logits.shape == (2, 5)


def test_dispatch_default_cpu_is_the_reference_and_env_forces(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.active_implementation("cpu") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.active_implementation("cpu") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    assert dispatch.active_implementation("cpu") == "cpu"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="BGTRAIN_BOOSTLU=cuda"):
        dispatch.active_implementation("cpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="BGTRAIN_BOOSTLU='triton'"):
        dispatch.active_implementation("cpu")


def test_failed_cuda_build_falls_back_with_one_warning_unless_forced(monkeypatch):
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_fallback", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "banana")  # a real build failure: no such arch
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with pytest.warns(RuntimeWarning, match="CUDA extension unavailable.*banana") as record:
        assert dispatch.active_implementation("cuda") == "torch"  # the run log's question: no warning yet
        assert dispatch._resolve_for_compile("cuda") == "torch"   # the ops' first call: the warning
        assert dispatch._resolve_for_compile("cuda") == "torch"
    assert len(record) == 1
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="BGTRAIN_BOOSTLU=cuda.*banana"):
        dispatch.active_implementation("cuda")


def test_cpu_default_path_never_builds_an_extension():
    code = ("import sys, torch, bgtrain.ops as o; o.boostlu_pool(torch.randn(2, 3, 4, 4), 5.0); "
            "print(o.active_implementation('cpu'), 'torch.utils.cpp_extension' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k != dispatch.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["torch", "False"]


def test_another_checkout_of_the_same_sources_reuses_the_build_and_an_edit_does_not(cpu_ext, tmp_path):
    """Build folders are keyed by the sources' bytes, not their path: a worktree on the same torch loads its .so."""
    import os
    import shutil
    from pathlib import Path

    built = Path(cpu_ext.__file__)
    before = built.stat().st_mtime_ns, (built.parent / ".ninja_log").read_text()
    copy, edited_copy = tmp_path / "checkout", tmp_path / "edited"
    for checkout in (copy, edited_copy):
        shutil.copytree(Path(extension.__file__).parents[2] / "bgtrain", checkout / "bgtrain",
                        ignore=shutil.ignore_patterns("__pycache__"))
    with (edited_copy / "bgtrain" / "ops" / "csrc" / "boostlu_cpu.cpp").open("a") as f:
        f.write("\n// edited\n")
    # the copy loads the build; a changed source byte is a different build folder (checked without building it)
    load = f"import sys; sys.path.insert(0, {str(copy)!r}); from bgtrain.ops import extension as e; " \
           "print(e.load_cpu().__file__, e.cpu_build_dir())"
    locate = f"import sys; sys.path.insert(0, {str(edited_copy)!r}); from bgtrain.ops import extension as e; " \
             "print(e.__file__, e.cpu_build_dir())"
    env = {**os.environ, "BGTRAIN_OPS_CACHE": str(extension.cache_root())}
    out, edited = run_together([[sys.executable, "-c", load], [sys.executable, "-c", locate]], timeout=600,
                               cwd=tmp_path, env=env)
    assert out.returncode == edited.returncode == 0, out.stderr[-1000:] + edited.stderr[-1000:]
    assert out.stdout.split() == [str(built), str(built.parent)]
    assert (built.stat().st_mtime_ns, (built.parent / ".ninja_log").read_text()) == before, "ninja rebuilt it"
    module, folder = edited.stdout.split()
    assert module.startswith(str(edited_copy)), "the edited checkout's code was not the one imported"
    assert folder != str(built.parent) and folder.startswith(str(extension.cache_root()))


def test_another_torch_install_of_the_same_version_builds_into_its_own_folder(monkeypatch):
    """Two virtualenvs share a cache without making ninja rebuild on every switch (its command holds torch's path)."""
    here = extension._torch_tag.__wrapped__()
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/lib/python3.11/site-packages/torch/__init__.py")
    elsewhere = extension._torch_tag.__wrapped__()
    assert here != elsewhere
    assert here.rsplit("_", 1)[0] == elsewhere.rsplit("_", 1)[0] == f"torch{torch.__version__}".replace("+", "_")


class _Head(torch.nn.Module):
    """1x1 classifier conv + bgtrain.ops.boostlu_pool, as in CamResNet's head."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 40, 1)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bgtrain.ops import boostlu_pool

        return boostlu_pool(self.conv(x), self.alpha)


@pytest.mark.parametrize("choice", ["default", "cpu"])
def test_torch_compile_of_head_matches_eager_on_cpu(monkeypatch, choice):
    if choice == "default":
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_VAR, choice)
    torch._dynamo.reset()
    assert dispatch.active_implementation("cpu") == ("torch" if choice == "default" else "cpu")
    torch.manual_seed(0)
    head = _Head(ALPHA).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 7, 7).to(memory_format=torch.channels_last)
    eager = head(x)
    eager.sum().backward()
    g_eager = head.conv.weight.grad.clone()
    head.zero_grad()
    compiled = torch.compile(head, fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(head.conv.weight.grad, g_eager)
    torch.testing.assert_close(eager.double(), _formula_pool(head.conv(x).detach(), ALPHA), rtol=1e-5, atol=1e-6)


def test_torch_compile_of_camresnet_runs_on_the_cpu_extension(monkeypatch, cpu_ext):
    from bgtrain.model import CamResNet

    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CamResNet(num_classes=12, depth=18).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_bench_cli_prints_json_rows_and_summary(cpu_ext, capsys):
    from bgtrain.bench import boostlu as bench

    assert bench.main(["--device", "cpu", "--shapes", "2x8x4x4", "--dtypes", "fp32", "--impls", "eager,ext",
                       "--warmup", "0", "--iters", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["impl"], r["pass"]) for r in rows[:-1]} == {(i, p) for i in ("eager", "ext") for p in bench.PASSES}
    assert all(r["floor_us"] is None and r["rel_err_vs_eager"] < 1e-6 for r in rows[:-1])
    assert rows[-1]["summary"] is True and set(rows[-1]["ext_speedup_vs_eager"]) == {"2x8x4x4/fp32/fwd",
                                                                                      "2x8x4x4/fp32/fwd+bwd"}


def test_hbm_floor_matches_design_figure():
    # docs/design.md: BoostLU+GAP fwd+bwd at 64x5000x14x14 bf16 has an HBM floor of about 78 us on an H200 (4.8e12 B/s).
    from bgtrain.bench.boostlu import floor_bytes

    assert floor_bytes((64, 5000, 14, 14), torch.bfloat16, "fwd+bwd") / 4.8e12 * 1e6 == pytest.approx(78, abs=1)


@pytest.mark.slow
def test_cuda_sources_compile_and_link_for_sm80_and_sm90(tmp_path):
    """A real nvcc build (no GPU needed), ~40-90 s on 2 cores; proves the kernels compile for A100 and H100/H200."""
    try:
        extension.find_cuda_home()
    except RuntimeError as err:
        pytest.skip(f"no CUDA toolkit on this machine: {err}")
    module = extension.build_cuda("8.0;9.0", tmp_path / "build")
    assert {"pool_forward", "pool_backward", "boostlu_forward", "boostlu_backward"} <= set(dir(module))
    so = (tmp_path / "build" / f"{module.__name__}.so").read_bytes()
    assert b"sm_80" in so and b"sm_90" in so  # both archs' SASS is embedded in the fat binary
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, torch.AcceleratorError)):  # calling it without a GPU must fail loudly
            module.pool_forward(torch.randn(1, 1, 2, 2), ALPHA, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 37, 14, 14), (3, 70, 20, 20), (64, 500, 14, 14), (2, 33, 7, 7)])
def test_gpu_extension_matches_reference(shape, dtype, channels_last):
    from bgtrain.gpu_check import check_case

    row = check_case(shape, dtype, channels_last, "cuda")
    assert row["ok"], row


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_gpu_torch_compile_through_the_extension(monkeypatch):
    from bgtrain.gpu_check import check_compile

    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    torch._dynamo.reset()
    row = check_compile("cuda")
    assert row["implementation"] == "cuda" and row["ok"], row
