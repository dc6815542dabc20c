"""`python -m bgtrain.ops build`: prebuilds into a given cache, is idempotent, and fails in one line naming the cause;
`ops.boostlu` (auto|cuda|reference) decides between a warned fallback and an error at start-up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bgtrain.ops import __main__ as ops_cli
from bgtrain.ops import dispatch, extension
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def keep_cache_variable(monkeypatch):
    """`build --cache DIR` sets $BGTRAIN_OPS_CACHE in its process: give the tests' process its own back."""
    monkeypatch.setenv("BGTRAIN_OPS_CACHE", str(extension.cache_root()))


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """A dispatch with nothing resolved or warned yet and no forcing variable, restored afterwards."""
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_fallback", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_config", "auto")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return dispatch


def _build_fails(capsys, tmp_path: Path, *extra: str) -> str:
    assert ops_cli.main(["build", "--cache", str(tmp_path / "cache"), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert err.startswith("bgtrain.ops build failed: ToolchainError: ")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "built something first"
    return err


def test_build_without_cuda_torch_fails_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build" in _build_fails(capsys, tmp_path)


def test_build_without_nvcc_fails_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    err = _build_fails(capsys, tmp_path)
    assert "no nvcc" in err and "no-toolkit/bin/nvcc does not exist" in err


def test_build_with_another_cuda_major_fails_in_one_line(monkeypatch, capsys, tmp_path):
    toolkit = tmp_path / "cuda-12.4"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    err = _build_fails(capsys, tmp_path, "--arch", "9.0")
    assert "CUDA major mismatch" in err and "is CUDA 12.4" in err and "with CUDA 13.0" in err
    assert "set CUDA_HOME to a CUDA 13.x toolkit" in err


def test_cpu_only_build_into_a_given_cache_is_idempotent(capsys):
    """The second build finds the first in the cache (--cache) and compiles nothing."""
    cache = extension.cache_root()
    assert ops_cli.main(["build", "--cpu-only", "--cache", str(cache)]) == 0  # builds once if the cache is new
    capsys.readouterr()
    ninja_logs = {p: p.stat().st_mtime_ns for p in cache.glob("*/.ninja_log")}
    assert ops_cli.main(["build", "--cpu-only", "--cache", str(cache)]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["extension"] for r in rows} == {"bgtrain_boostlu_cpu", "bgtrain_ap_cpu"}
    assert all(r["reused"] and r["cache"] == str(cache) and Path(r["path"]).is_file() for r in rows)
    assert "found in the cache" in err
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/.ninja_log")} == ninja_logs, "ninja ran again"


@pytest.mark.slow
def test_full_build_on_this_machine_compiles_or_names_the_cause(tmp_path):
    """The real command: with a usable CUDA toolkit it compiles all three extensions (one arch) into --cache and
    a second run reuses them; without one it fails in one line naming the cause (no CUDA torch, no nvcc, ...)."""
    cmd = [sys.executable, "-m", "bgtrain.ops", "build", "--cache", str(tmp_path / "cache"), "--arch", "8.0"]
    env = {k: v for k, v in os.environ.items() if k != "BGTRAIN_OPS_CACHE"}
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
    try:
        extension.check_cuda_toolchain()
    except extension.ToolchainError as err:
        assert first.returncode == 1 and first.stderr.strip() == f"bgtrain.ops build failed: ToolchainError: {err}"
        return
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert [r["archs"] for r in rows] == ["cpu", "cpu", "8.0"] and not any(r["reused"] for r in rows)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and all(json.loads(line)["reused"] for line in again.stdout.splitlines())


def test_auto_falls_back_with_a_warning_on_every_ranks_first_call():
    """Each rank (process) warns at its first BoostLU call, naming itself and the cause; not only rank 0."""
    code = ("import warnings; warnings.simplefilter('default'); from bgtrain.ops import dispatch as d; "
            "d.configure('auto'); print(d.active_implementation('cuda')); "
            "d._resolve_for_compile('cuda'); d._resolve_for_compile('cuda')")
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    for rank in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**env, "RANK": rank, "TORCH_CUDA_ARCH_LIST": "banana"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["torch"]
        warned = [ln for ln in out.stderr.splitlines() if "CUDA extension unavailable" in ln]
        assert len(warned) == 1, out.stderr
        assert f"rank {rank}: bgtrain BoostLU CUDA extension unavailable" in warned[0] and "banana" in warned[0]
        assert "ops.boostlu=cuda" in warned[0]


def test_reference_setting_never_builds_and_never_warns(fresh_dispatch, recwarn, monkeypatch):
    monkeypatch.setattr(dispatch, "_try_load", lambda device_type: pytest.fail("built an extension"))
    dispatch.configure("reference")
    assert dispatch.require("cuda") == "torch" and dispatch._resolve_for_compile("cuda") == "torch"
    assert not [w for w in recwarn if "BoostLU" in str(w.message)]


def test_cuda_setting_without_a_gpu_fails_at_start_up_in_one_line(fresh_dispatch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dispatch.configure("cuda")
    with pytest.raises(dispatch.BoostLUUnavailable, match=r"ops.boostlu=cuda needs the BoostLU CUDA extension on a "
                                                          r"GPU, but (no CUDA device is visible|torch .* CPU-only)"):
        dispatch.require("cpu")


def test_cuda_setting_with_a_failed_build_names_the_cause(fresh_dispatch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "banana")
    dispatch.configure("cuda")
    with pytest.raises(dispatch.BoostLUUnavailable) as info:
        dispatch.require("cuda")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("ops.boostlu=cuda: building/loading the BoostLU cuda extension failed: "
                                      "ValueError: bad CUDA arch 'banana'")
    # the variable forces the same strictness over a config that says auto
    dispatch.configure("auto")
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(dispatch.BoostLUUnavailable, match="BGTRAIN_BOOSTLU=cuda: building/loading"):
        dispatch.require("cuda")


def test_train_with_ops_boostlu_cuda_on_a_cpu_machine_exits_2_in_one_line(smoke_shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CUDA setting can be honoured here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGTRAIN_")}
    proc = subprocess.run([sys.executable, "-m", "bgtrain.train", "--config", "configs/smoke.yaml",
                           f"data.shards={smoke_shards}", f"out_dir={tmp_path / 'run'}", "ops.boostlu=cuda"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("bgtrain.train: ops.boostlu=cuda needs the BoostLU CUDA extension on a GPU")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_builds_run_the_ninja_beside_this_python_whatever_the_path(monkeypatch, tmp_path):
    """ninja 1.11 (system) and 1.13 (the venv's) hash commands differently and rebuilt each other's extensions:
    a process started without the venv on PATH must use the venv's ninja too."""
    import shutil
    import types

    from torch.utils import cpp_extension

    seen: list[str | None] = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append(shutil.which("ninja")) or types.ModuleType("m"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    extension._load("bgtrain_probe", extension.CPU_SOURCES, tmp_path / "build", None, False)
    here = Path(sys.executable).parent
    if not (here / "ninja").is_file():
        pytest.skip("no ninja beside this Python: the one on PATH is used")
    assert seen == [str(here / "ninja")]
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_cuda_setting_leaves_cpu_tensors_to_the_reference_but_the_variable_does_not(fresh_dispatch, monkeypatch):
    dispatch.configure("cuda")
    assert dispatch.active_implementation("cpu") == "torch"  # e.g. a CAM drawn on the CPU during a GPU run
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="BGTRAIN_BOOSTLU=cuda forces the cuda extension"):
        dispatch.active_implementation("cpu")
