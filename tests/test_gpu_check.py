"""`python -m bgtrain.gpu_check`: the CPU smoke end to end, and DALI's install from hand-carried wheel parts."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import get_args

import pytest

from bgtrain.config import ConfigError, Scheme, load_config
from bgtrain.gpu_check import CHECKS, install_wheels, join_wheel_parts
from bgtrain.gpu_check_steps import call_site, coverage

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # every check once, a 2-rank gloo DDP run among them
@pytest.mark.distributed
def test_cpu_smoke_runs_every_check_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bgtrain.gpu_check", "--cpu-smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    (report_path,) = out.glob("*-cpu-smoke.json")
    (log_path,) = out.glob("*-cpu-smoke.log")
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and report["cpu_smoke"] is True
    assert list(report["checks"]) == list(CHECKS)
    assert all(r["ok"] is True for r in report["checks"].values()), report["checks"]
    ext = report["checks"]["extension"]
    assert ext["cases"] == 30 and ext["failed_cases"] == 0 and ext["compile_ok"]
    assert "needs CUDA" in ext["build"]["cuda"] or ext["build"]["cuda"].endswith(".so")
    assert report["checks"]["evaluator"]["max_abs_err_vs_cpu"] <= 1e-6
    train = report["checks"]["bench_train"]
    assert {s["backend"] for s in train["summaries"]} == {"dali", "webdataset"}
    assert all(s["input_efficiency"] > 0 for s in train["summaries"]) and "needs CUDA" in train["skipped"]
    ddp = report["checks"]["ddp"]
    assert ddp["world"] == 2 and ddp["backend"] == "gloo" and ddp["ranks_agree_on_weights"]
    syncs = report["checks"]["host_syncs"]  # every scheme's real steps ran, through the code path the GPU checks
    assert syncs["schemes"] == list(get_args(Scheme)) and syncs["failed"] == {} and syncs["steps_checked"] == 0
    assert "needs CUDA" in syncs["sync_detection"] and "needs CUDA" in syncs["skipped"]
    ran = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert sorted(r["scheme"] for r in ran if r.get("check") == "host_syncs" and "scheme" in r) == sorted(
        get_args(Scheme))
    assert all(r["steps"] == syncs["steps_per_scheme"] for r in ran if r.get("check") == "host_syncs" and "steps" in r)
    assert "GPU timings" in report["checks"]["step_speed"]["skipped"]
    cover = report["coverage"]
    assert list(cover["covered"]) == list(CHECKS) and cover["not_run_or_failed"] == []
    assert any("DeepSpeed ZeRO" in p for p in cover["not_covered_needs_multi_gpu_or_nodes"])
    assert any("cross-node" in p for p in cover["not_covered_needs_multi_gpu_or_nodes"])
    assert "host-sync detection" in cover["not_covered_on_cpu"]
    # stdout and the log hold the same JSON lines
    assert log_path.read_text().splitlines() == proc.stdout.splitlines()


def _probe_wheel(folder: Path, version: str = "0.1") -> Path:
    """A real (tiny) wheel: one module and its dist-info, as pip expects."""
    name = f"bgtrain_wheel_probe-{version}-py3-none-any.whl"
    path = folder / name
    info = f"bgtrain_wheel_probe-{version}.dist-info"
    files = {"bgtrain_wheel_probe/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: bgtrain-wheel-probe\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def _split(wheel: Path, into: Path, part_size: int) -> None:
    data = wheel.read_bytes()
    for i in range(0, len(data), part_size):
        (into / f"{wheel.name}.part-{i // part_size:02d}").write_bytes(data[i:i + part_size])
    (into / f"{wheel.name}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {wheel.name}\n")


def test_wheel_parts_are_joined_checked_and_installed(tmp_path, monkeypatch):
    built, carried, target = tmp_path / "built", tmp_path / "carried", tmp_path / "site"
    built.mkdir(), carried.mkdir()
    wheel = _probe_wheel(built)
    _split(wheel, carried, part_size=200)
    assert len(list(carried.glob("*.part-*"))) >= 2
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    assert install_wheels(carried, target) == [wheel.name]
    import bgtrain_wheel_probe
    assert bgtrain_wheel_probe.VERSION == "0.1" and Path(bgtrain_wheel_probe.__file__).is_relative_to(target)
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(target)
    sys.modules.pop("bgtrain_wheel_probe")


def test_a_missing_part_fails_the_checksum_naming_the_wheel(tmp_path):
    built, carried = tmp_path / "built", tmp_path / "carried"
    built.mkdir(), carried.mkdir()
    wheel = _probe_wheel(built)
    _split(wheel, carried, part_size=200)
    sorted(carried.glob("*.part-*"))[-1].unlink()
    with pytest.raises(ValueError, match=f"{wheel.name}: SHA-256 .* a part is missing or damaged"):
        join_wheel_parts(carried, tmp_path)


def test_a_wheel_without_its_sha256_file_is_refused(tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    wheel = _probe_wheel(built)
    with pytest.raises(FileNotFoundError, match=f"{wheel.name}.sha256: missing"):
        join_wheel_parts(built, tmp_path)


def test_a_sync_is_named_by_its_innermost_bgtrain_frame():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["loss.scheme=nonsense"])
    assert call_site(caught.value).startswith("bgtrain/config.py:")


def test_coverage_lists_what_ran_and_what_one_gpu_cannot_show():
    cover = coverage({"ddp": {"ok": True}, "host_syncs": {"ok": False}, "step_speed": {"ok": None}}, smoke=False)
    assert list(cover["covered"]) == ["ddp"] and cover["not_run_or_failed"] == ["host_syncs", "step_speed"]
    assert any("all-reduce" in p for p in cover["not_covered_needs_multi_gpu_or_nodes"])
    assert "not_covered_on_cpu" not in cover
