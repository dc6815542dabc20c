"""The checkpoint lifecycle at scale (issue 24, items 4, 5 and 7): writes in the background with at most one in flight,
a failed write raised naming its path, a kill during a write losing nothing, ``best.pt`` as a link, a resume that
reads the file once, and wall time in every record."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bgtrain import checkpoint as ckpt
from bgtrain.cli import DataError
from bgtrain.runlog import bytes_read
from tests.conftest import REPO

SMOKE = REPO / "configs/smoke.yaml"


def tiny_state(value: float = 1.0) -> dict:
    return {"engine": {"model": {"w": torch.full((64, 64), value)}}, "global_step": 1}


def test_save_returns_before_the_write_and_writes_a_copy_taken_at_the_call(tmp_path, monkeypatch):
    release, writing = threading.Event(), threading.Event()
    real_save = ckpt.atomic_save

    def slow_save(obj, path):
        writing.set()
        assert release.wait(30)
        real_save(obj, path)
    monkeypatch.setattr(ckpt, "atomic_save", slow_save)
    saver = ckpt.CheckpointSaver(tmp_path, keep_last=2)
    state = tiny_state(1.0)
    path = saver.save(state, 1)
    assert writing.wait(30) and not path.exists(), "save() waited for the write"
    state["engine"]["model"]["w"].fill_(7.0)          # training goes on updating the live tensors in place
    saver.check()                                      # nothing failed: no error while the write is in flight
    release.set()
    saver.wait()
    assert torch.load(path, weights_only=True)["engine"]["model"]["w"].eq(1.0).all()
    assert json.loads((tmp_path / "history.json").read_text())["steps"] == [path.name]


def test_at_most_one_write_is_in_flight(tmp_path, monkeypatch):
    active, most = [0], [0]
    real_save = ckpt.atomic_save

    def counting_save(obj, path):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.05)
        real_save(obj, path)
        active[0] -= 1
    monkeypatch.setattr(ckpt, "atomic_save", counting_save)
    saver = ckpt.CheckpointSaver(tmp_path, keep_last=2)
    for step in range(1, 5):
        saver.save(tiny_state(step), step)
    saver.wait()
    assert most[0] == 1
    assert sorted(p.name for p in saver.steps()) == ["step-000000003.pt", "step-000000004.pt"]


def test_a_failed_background_write_is_raised_at_the_next_step_naming_the_path(tmp_path, monkeypatch):
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "atomic_save", full_disk)
    saver = ckpt.CheckpointSaver(tmp_path, keep_last=2)
    path = saver.save(tiny_state(), 5)
    deadline = time.time() + 30
    with pytest.raises(DataError, match=rf"^checkpoint {path} was not written: No space left on device$"):
        while time.time() < deadline:
            saver.check()
            time.sleep(0.01)
    saver.wait()  # reported once: the next save starts clean


def test_best_is_a_link_to_its_step_file_and_outlives_its_pruning(tmp_path):
    saver = ckpt.CheckpointSaver(tmp_path, keep_last=1)
    first = saver.save(tiny_state(3.0), 1, is_best=True)
    saver.wait()
    best = tmp_path / "best.pt"
    assert best.stat().st_ino == first.stat().st_ino, "best.pt was written a second time"
    saver.save(tiny_state(4.0), 2)
    saver.wait()
    assert not first.exists() and torch.load(best, weights_only=True)["engine"]["model"]["w"].eq(3.0).all()


KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
from bgtrain import checkpoint as ckpt
saver = ckpt.CheckpointSaver(Path(sys.argv[1]), keep_last=3)
saver.save({"w": torch.zeros(10)}, 1); saver.wait()
real = torch.save
def slow(obj, f):
    f.write(b"PK partial bytes of a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
ckpt.torch.save = slow
saver.save({"w": torch.ones(10)}, 2)
time.sleep(60)
"""


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_as_latest(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    saver = ckpt.CheckpointSaver(tmp_path)
    assert saver.latest() == tmp_path / "step-000000001.pt" and not (tmp_path / "step-000000002.pt").exists()
    assert ckpt.load(saver.latest())["w"].eq(0).all()


def test_load_checks_every_crc_on_the_bytes_it_reads(tmp_path):
    path = tmp_path / "step-000000001.pt"
    ckpt.atomic_save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    at = data.index(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[4000:4016])
    data[at] ^= 0xFF                                   # one flipped byte inside the tensor's data
    path.write_bytes(bytes(data))
    assert ckpt.why_unloadable(path) is None          # the cheap check used to choose a checkpoint passes
    with pytest.raises(DataError, match=rf"^checkpoint {path} cannot be loaded: corrupt member .* \(CRC mismatch\)$"):
        ckpt.load(path)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io to count bytes read")
def test_a_resume_reads_the_checkpoint_once_and_the_final_test_reads_best_once(smoke_shards, tmp_path, monkeypatch):
    from bgtrain.config import load_config
    from bgtrain.trainer import Trainer
    overrides = [f"data.shards={smoke_shards}", f"out_dir={tmp_path / 'run'}", "data.workers=0", "data.max_batches=1",
                 "optim.epochs=1", "log.tensorboard=false"]
    trainer = Trainer(load_config(SMOKE, overrides))
    loads: list[str] = []
    real_load = ckpt.load
    monkeypatch.setattr(ckpt, "load", lambda path: loads.append(str(path)) or real_load(path))  # load_measured too
    results = trainer.fit()
    best = str(tmp_path / "run" / "checkpoints" / "best.pt")
    assert loads == [best], "the final test reads best.pt once (every rank, so that all hold rank 0's buffers)"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["run_s"], float) and isinstance(r["attempt_s"], float) for r in records)
    epoch = next(r for r in records if r["kind"] == "epoch")
    parts = ("startup_s", "data_s", "steps_s", "checkpoint_s", "validation_s", "other_s")
    assert all(epoch[k] >= 0 for k in parts) and epoch["startup_s"] > 0 and epoch["validation_s"] > 0
    assert abs(sum(epoch[k] for k in parts) - epoch["epoch_s"]) < 0.01
    assert any(r["kind"] == "checkpoint" and r["stall_s"] >= r["host_copy_s"] >= 0 for r in records)

    path = tmp_path / "run" / "checkpoints" / "step-000000001.pt"
    size = path.stat().st_size
    before = bytes_read()
    resumed = Trainer(load_config(SMOKE, [*overrides, f"checkpoint.resume={path}", "optim.epochs=2"]))
    read = bytes_read() - before
    assert size <= read < 1.5 * size, f"the resume read {read / size:.2f} times the checkpoint's {size} bytes"
    assert loads == [best, str(path)]
    resume = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert resume["kind"] == "resume" and resume["file_bytes"] == size and size <= resume["bytes_read"] < 1.5 * size
    assert resumed.log.run_started == trainer.log.run_started  # run_s counts from the first attempt
    resumed.log.close()
    assert results["test_map"] >= 0 and os.path.samefile(path.parent / "best.pt", path)
