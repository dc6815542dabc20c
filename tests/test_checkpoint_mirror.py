"""``checkpoint.mirror``: step checkpoints uploaded to object storage (moto's S3 server on loopback) in the background,
each counted only once its ``.complete`` marker is written; ``resume: latest`` falls back to the mirror when
``out_dir`` has no checkpoint, never taking an unfinished or truncated upload."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import signal
import subprocess
import sys

import pytest
import torch

from bgtrain import checkpoint as ckpt
from bgtrain import storage
from bgtrain.cli import DataError
from bgtrain.config import ConfigError, from_dict, load_config, to_dict
from tests.conftest import REPO
from tests.servers import make_bucket

_buckets = itertools.count()


@pytest.fixture
def mirror(s3_server) -> str:
    """A mirror URL in a fresh bucket of its own."""
    name = f"mirror-{next(_buckets)}"
    make_bucket(name)
    return f"s3://{name}/run"


def step_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def tiny_state(step: int, best_epoch: int = 0) -> dict:
    return {"engine": {"model": {"w": torch.full((16, 16), float(step)), "b": torch.arange(8.0) * step}},
            "global_step": step, "best": {"epoch": best_epoch, "val_map": 10.0 * best_epoch}}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def remote_json(url: str) -> dict:
    return json.loads(storage.read_bytes(url))


def test_the_mirror_holds_the_last_k_with_markers_history_and_best(mirror, tmp_path):
    folder = tmp_path / "checkpoints"
    saver = ckpt.CheckpointSaver(folder, keep_last=2, mirror=mirror)
    for step in range(1, 5):
        saver.save(tiny_state(step), step, is_best=step in (1, 3))
    saver.wait()
    remote = storage.join(mirror, "checkpoints")
    kept = [step_name(3), step_name(4)]
    assert storage.listdir(remote) == sorted(["best.json", "history.json", *kept, *(n + ".complete" for n in kept)])
    for name in kept:
        local = (folder / name).read_bytes()
        assert storage.read_bytes(storage.join(remote, name)) == local
        assert remote_json(storage.join(remote, name + ".complete")) == {
            "step": int(name[5:14]), "size": len(local), "sha256": hashlib.sha256(local).hexdigest(),
            "best": name == step_name(3)}
    assert remote_json(storage.join(remote, "history.json")) == {"steps": kept}
    assert json.loads((folder / "history.json").read_text()) == {"steps": kept}
    assert remote_json(storage.join(remote, "best.json")) == {"file": step_name(3), "step": 3}
    assert (folder / "best.pt").stat().st_ino == (folder / step_name(3)).stat().st_ino


def test_an_upload_that_fails_for_good_is_raised_naming_the_checkpoint(s3_server, tmp_path):
    saver = ckpt.CheckpointSaver(tmp_path, keep_last=2, mirror="s3://no-such-bucket/run")
    path = saver.save(tiny_state(1), 1)
    with pytest.raises(DataError, match=rf"^checkpoint {path} was not uploaded to s3://no-such-bucket/run/checkpoints: "
                                        r"s3://no-such-bucket/run/checkpoints/\S+: not found$"):
        saver.wait()
    assert ckpt.load(path)["global_step"] == 1   # the local checkpoint is written all the same
    saver.wait()   # reported once


KILLED_UPLOAD = """
import sys, time, torch
from pathlib import Path
from bgtrain import checkpoint as ckpt, storage

def state(step):
    return {"engine": {"model": {"w": torch.full((16, 16), float(step))}}, "global_step": step}

saver = ckpt.CheckpointSaver(Path(sys.argv[1]), keep_last=2, mirror=sys.argv[2])
for step in (1, 2):
    saver.save(state(step), step)
    saver.wait()
real = storage.write_bytes
def stuck(location, data, *args, **kwargs):
    if str(location).endswith("step-000000003.pt.complete"):  # the object is up, its marker never comes
        print("uploaded", flush=True)
        time.sleep(120)
    return real(location, data, *args, **kwargs)
storage.write_bytes = stuck
saver.save(state(3), 3)
time.sleep(120)
"""


def test_a_killed_upload_is_never_resumed_from(mirror, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, str(tmp_path / "a"), mirror], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "uploaded"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    remote = storage.join(mirror, "checkpoints")
    # Killed between object and marker: the object is whole and the history names it, but it has no marker.
    assert storage.size(storage.join(remote, step_name(3))) == (tmp_path / "a" / step_name(3)).stat().st_size
    assert not storage.exists(storage.join(remote, step_name(3) + ".complete"))
    assert remote_json(storage.join(remote, "history.json"))["steps"][-1] == step_name(3)

    folder = tmp_path / "b" / "checkpoints"
    saver = ckpt.CheckpointSaver(folder, keep_last=2, mirror=mirror)
    assert saver.resolve("latest") == folder / step_name(2)
    assert ckpt.load(folder / step_name(2))["engine"]["model"]["w"].eq(2.0).all()
    assert not (folder / step_name(3)).exists() and saver.skipped == []
    assert any(step_name(3) in n and "no .complete marker" in n for n in saver.notes), saver.notes


def test_a_truncated_object_is_skipped_with_a_warning_and_a_markerless_one_passed_over(mirror, tmp_path):
    saver = ckpt.CheckpointSaver(tmp_path / "a", keep_last=3, mirror=mirror)
    for step in (1, 2):
        saver.save(tiny_state(step), step)
    saver.wait()
    remote = storage.join(mirror, "checkpoints")
    ckpt.atomic_save(tiny_state(3), tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    storage.write_bytes(storage.join(remote, step_name(3)), whole[: len(whole) // 2])
    storage.write_bytes(storage.join(remote, step_name(3) + ".complete"), json.dumps(
        {"step": 3, "size": len(whole), "sha256": hashlib.sha256(whole).hexdigest(), "best": False}).encode())
    storage.write_bytes(storage.join(remote, step_name(4)), whole)   # no marker at all
    storage.write_bytes(storage.join(remote, "history.json"),
                        json.dumps({"steps": [step_name(s) for s in range(1, 5)]}).encode())

    folder = tmp_path / "b"
    fresh = ckpt.CheckpointSaver(folder, keep_last=3, mirror=mirror)
    with pytest.warns(UserWarning, match=rf"skipped mirrored checkpoint {remote}/{step_name(3)}: "
                                         rf"{len(whole) // 2} bytes, its marker says {len(whole)}"):
        assert fresh.resolve("latest") == folder / step_name(2)
    assert fresh.skipped == [f"{remote}/{step_name(3)}: {len(whole) // 2} bytes, its marker says {len(whole)}"]
    assert_same_tensors(ckpt.load(folder / step_name(2))["engine"]["model"], tiny_state(2)["engine"]["model"])
    assert sorted(p.name for p in folder.iterdir()) == ["history.json", step_name(2)]


def test_resuming_from_the_mirror_into_an_empty_out_dir_equals_resuming_locally(mirror, smoke_shards, tmp_path):
    cfg = from_dict({"out_dir": str(tmp_path / "a"), "data": {"shards": str(smoke_shards)},
                     "checkpoint": {"keep_last": 2, "mirror": mirror, "resume": "latest"}})
    saver = ckpt.CheckpointSaver(tmp_path / "a" / "checkpoints", keep_last=2, mirror=mirror)
    for step in (1, 2, 3):   # step 1 is the best: pruned from the last 2, it stays as best.pt and in the mirror
        state = {**tiny_state(step, best_epoch=1), "config": to_dict(cfg), "loader": {"epoch": 2, "batches_done": 0}}
        saver.save(state, step, is_best=step == 1)
    saver.wait()
    assert storage.exists(storage.join(mirror, "checkpoints", step_name(1)))

    local_cfg, local_notes = ckpt.prepare_resume(cfg, world_size=1)
    assert local_cfg.checkpoint.resume == str(tmp_path / "a" / "checkpoints" / step_name(3))
    assert not any("downloaded" in n for n in local_notes), local_notes   # a local checkpoint wins

    empty = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"))
    mirrored_cfg, notes = ckpt.prepare_resume(empty, world_size=1)
    folder = tmp_path / "b" / "checkpoints"
    assert mirrored_cfg.checkpoint.resume == str(folder / step_name(3))
    assert f"downloaded mirrored checkpoint {mirror}/checkpoints/{step_name(3)} to {folder / step_name(3)}" in notes
    assert notes[-1] == f"resuming from {folder / step_name(3)}"
    for name in (step_name(3), "best.pt"):
        assert_same_tensors(ckpt.load(folder / name)["engine"]["model"],
                            ckpt.load(tmp_path / "a" / "checkpoints" / name)["engine"]["model"])
    assert ckpt.load(folder / "best.pt")["global_step"] == 1
    # The resumed run continues the mirror's history: its next save prunes the mirror as the first run would have.
    resumed = ckpt.CheckpointSaver(folder, keep_last=2, mirror=mirror)
    assert resumed.resolve(mirrored_cfg.checkpoint.resume) == folder / step_name(3)
    resumed.save(tiny_state(4, best_epoch=1), 4)
    resumed.wait()
    assert [n for n in storage.listdir(storage.join(mirror, "checkpoints")) if n.endswith(".pt")] == \
        [step_name(1), step_name(3), step_name(4)]


def test_a_mirror_that_is_not_a_url_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"checkpoint\.mirror: got 'runs/backup', expected a URL"):
        load_config(None, ["checkpoint.mirror=runs/backup"])
    assert load_config(None, ["checkpoint.mirror=s3://bucket/run"]).checkpoint.mirror == "s3://bucket/run"
