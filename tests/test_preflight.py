"""cluster.preflight: a real 2-process torchrun run, a rank that never arrives or is slow, bad shards and configs,
and a default shard check that reads no tar beyond this node's first members."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bgtrain.distributed import WorldInfo, expand_tasks_per_node, world_info_from_env
from cluster.preflight import Meeting, NodeShare, RendezvousTimeout, check_shards
from tests.conftest import REPO, free_port


def run_env(**extra: str) -> dict[str, str]:
    """This environment minus any launcher variables, plus ``extra``."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def preflight(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.preflight", *args], cwd=REPO, env=run_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from shards.synthetic import build
    out = tmp_path_factory.mktemp("preflight") / "shards"
    build(out, num_classes=4, n_train=40, n_val=10, n_test=10, size=32, seed=0, shard_size=20)
    return out


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """Eight training shards of 5, two of validation and two of test: enough for several nodes' shares."""
    from shards.synthetic import build
    out = tmp_path_factory.mktemp("preflight-many") / "shards"
    build(out, num_classes=4, n_train=40, n_val=10, n_test=10, size=16, seed=0, shard_size=5)
    return out


def spoil(tar: Path, start: int, stop: int) -> None:
    """Zero bytes [start, stop) of ``tar`` in place: its size, and so its manifest entry and index, still match."""
    with open(tar, "r+b") as f:
        f.seek(start)
        f.write(bytes(stop - start))


@pytest.mark.distributed
def test_two_process_torchrun_all_reduce_passes(shards: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "cluster.preflight", "--timeout", "60", "--shards", str(shards), "--checkpoint-dir", str(tmp_path / "ck"),
           "--min-free-gb", "0.01"]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sum 2 of 2 ranks" in out
    assert "ranks 0-1" in out
    assert "no GPU: CPU processes on gloo" in out or "GPU(s)" in out
    n_tars = sum(len(list((shards / split).glob("*.tar"))) for split in ("train", "val", "test"))
    assert f"{n_tars} tars readable" in out
    assert (tmp_path / "ck").is_dir()


def test_rank_that_never_arrives_times_out_with_clear_message() -> None:
    port = free_port()
    t0 = time.monotonic()
    proc = preflight(["--timeout", "2"], RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    took = time.monotonic() - t0
    err = " ".join((proc.stdout + proc.stderr).split())  # rich wraps lines
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in err
    assert "timed out after 2 s" in err
    assert "rank(s) 1 never arrived" in err
    assert took < 2 + 15, f"took {took:.1f} s for a 2 s timeout"


def test_rank_whose_host_never_starts_times_out_with_clear_message() -> None:
    port = free_port()
    t0 = time.monotonic()
    proc = preflight(["--timeout", "2"], RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    took = time.monotonic() - t0
    err = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert f"rank 1 could not reach the rendezvous at 127.0.0.1:{port} within 2 s" in err
    assert "expected ranks 0-1" in err
    assert took < 2 + 15, f"took {took:.1f} s for a 2 s timeout"


def test_unreadable_tar_fails_and_names_it(shards: Path, tmp_path: Path) -> None:
    broken = tmp_path / "shards"
    subprocess.run(["cp", "-r", str(shards), str(broken)], check=True)
    victim = sorted((broken / "train").glob("*.tar"))[0]
    victim.write_bytes(b"not a tar")
    proc = preflight(["--shards", str(broken), "--timeout", "10"])
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1
    assert victim.name in out
    assert "1/" in out and "tars unreadable" in out


def test_missing_manifest_and_full_disk_fail(tmp_path: Path) -> None:
    proc = preflight(["--shards", str(tmp_path / "nothing"), "--checkpoint-dir", str(tmp_path / "ck"),
                      "--min-free-gb", "1e9", "--timeout", "10"])
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1
    assert "manifest.json: no shard manifest here" in out
    assert "needs --min-free-gb 1e+09" in out


def test_config_error_fails_before_any_rendezvous(tmp_path: Path) -> None:
    # World of 2 with nobody else coming: a config error must be reported at once, not after a timeout.
    t0 = time.monotonic()
    proc = preflight(["--config", "configs/smoke.yaml", "--timeout", "60", "model.depth=7"],
                     RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1
    assert "model.depth" in out and "bad config" in out
    assert time.monotonic() - t0 < 30


def test_config_gives_shards_and_checkpoint_dir(shards: Path, tmp_path: Path) -> None:
    proc = preflight(["--config", "configs/smoke.yaml", "--min-free-gb", "0.01", f"data.shards={shards}",
                      f"out_dir={tmp_path / 'run'}"])
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, out
    assert f"shards {shards}" in out
    assert (tmp_path / "run").is_dir()


def test_slurm_tasks_per_node_expands() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node("x")


def test_world_info_reads_torchrun_then_srun_then_nothing() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
                "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    w = world_info_from_env(torchrun)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.master_addr, w.master_port, w.launcher) == \
        (3, 4, 1, 2, "h", 1234, "torchrun")
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "MASTER_ADDR": "node1", "SLURM_JOB_ID": "77",
            "SLURMD_NODENAME": "node3"}
    w = world_info_from_env(srun)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.master_addr, w.master_port, w.node) == \
        (5, 6, 1, 2, "node1", 20077, "node3")
    # Inside the batch script (no srun step) SLURM_NTASKS counts tasks that do not exist: stay single.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77"}
    assert world_info_from_env(batch).world_size == 1


def test_default_check_reads_no_tar_past_its_first_member_and_full_walks_every_header(
        many_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shutil.copytree(many_shards, out)
    tar = out / "train" / "train-000003.tar"
    spoil(tar, tar.stat().st_size // 2, tar.stat().st_size - 1024)  # headers gone past the middle; size intact
    assert check_shards(out, WorldInfo()).ok  # sizes, indexes and first members as the manifest says
    full = check_shards(out, WorldInfo(), "full")
    assert not full.ok and "train-000003.tar" in full.detail and "manifest.json says 5" in full.detail


def test_default_check_fails_a_truncated_tar_and_a_missing_or_miscounted_index(many_shards: Path,
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shutil.copytree(many_shards, out)
    cut = out / "train" / "train-000001.tar"
    os.truncate(cut, cut.stat().st_size - 512)
    (out / "train" / "train-000002.idx").unlink()
    miscounted = out / "val" / "val-000000.idx"
    miscounted.write_text(miscounted.read_text().replace("v1.2 5", "v1.2 4", 1))
    check = check_shards(out, WorldInfo())
    detail = " ".join(check.detail.split())
    assert not check.ok and "3/12 tars unreadable" in detail
    assert "train-000001.tar: " in detail and "(truncated;" in detail
    assert "train-000002.idx missing" in detail
    assert "val-000000.idx: 4 samples, manifest.json says 5" in detail


def test_default_check_reads_the_first_member_of_this_nodes_share_only(many_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shutil.copytree(many_shards, out)
    spoil(out / "train" / "train-000006.tar", 0, 512)  # its first header: a tar that does not open
    first, second = NodeShare(node=0, nodes=2), NodeShare(node=1, nodes=2)
    assert first.shards("train", [5] * 8) == {0, 1, 2, 3} and second.shards("train", [5] * 8) == {4, 5, 6, 7}
    assert check_shards(out, WorldInfo(), share=first).ok
    failed = check_shards(out, WorldInfo(), share=second)
    assert not failed.ok and "train-000006.tar" in failed.detail
    assert not check_shards(out, WorldInfo(), "quick").ok  # --quick opens every tar, as before


def test_node_share_with_a_config_is_what_its_ranks_loaders_read_in_epoch_one(many_shards: Path) -> None:
    import torch

    from bgtrain.config import load_config
    from bgtrain.data import build_loader

    cfg = load_config("configs/smoke.yaml", [f"data.shards={many_shards}", "data.workers=2", "data.batch_size=2"])
    nodes, procs, sizes = 3, 2, [5] * 8
    for split, n_shards in (("train", 8), ("val", 2)):
        covered: set[int] = set()
        for node in range(nodes):
            share = NodeShare(node, nodes, procs, cfg).shards(split, sizes[:n_shards])
            read = set()
            for rank in range(node * procs, (node + 1) * procs):
                loader = build_loader(cfg.data, split, WorldInfo(rank=rank, world_size=nodes * procs),
                                      torch.device("cpu"), train=split == "train", seed=cfg.seed)
                plan = loader.plan()
                read |= {p.shard for w in range(plan.workers) for p in plan.units(rank, w) if len(p)}
            assert share == read, (split, node)
            covered |= share
        assert covered == set(range(n_shards))  # together the nodes open every shard epoch 1 reads


def test_node_share_numbers_nodes_by_rank() -> None:
    torchrun = WorldInfo(rank=5, world_size=8, local_rank=1, local_world_size=4)
    assert (NodeShare.of(torchrun, None, None).node, NodeShare.of(torchrun, None, None).nodes) == (1, 2)
    srun = WorldInfo(rank=2, world_size=3)  # one preflight task per node, 8 training processes each
    assert NodeShare.of(srun, 8, None) == NodeShare(2, 3, 8, None)


def meet_two(timeout: float, rank1: object, monkeypatch: pytest.MonkeyPatch) -> tuple[float, Exception | None]:
    """Rank 0 waits at a meeting of two with ``timeout``; rank 1 runs ``rank1(meeting)`` in a thread.

    Returns rank 0's seconds at the wait and what it raised, if anything.
    """
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    port = free_port()
    worlds = [WorldInfo(rank=r, world_size=2, master_addr="127.0.0.1", master_port=port) for r in range(2)]
    host = Meeting(worlds[0], timeout)
    other = threading.Thread(target=lambda: rank1(Meeting(worlds[1], timeout)), daemon=True)  # type: ignore[operator]
    other.start()
    t0, error = time.monotonic(), None
    try:
        host.wait()
    except RendezvousTimeout as e:
        error = e
    took = time.monotonic() - t0
    other.join(timeout=10)
    return took, error


def test_a_node_slower_than_the_timeout_that_keeps_checking_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_checks(meeting: Meeting) -> None:
        for shard in range(30):  # 3 s of checks against a 1 s timeout, reporting progress as check_shards does
            meeting.beat(f"tar {shard + 1} of 30")
            time.sleep(0.1)
        meeting.wait()

    took, error = meet_two(1.0, slow_checks, monkeypatch)
    assert error is None, error
    assert took > 2.5  # rank 0 waited past the 1 s that the old hard rendezvous deadline allowed


def test_a_node_that_goes_silent_fails_the_meeting_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def hung(meeting: Meeting) -> None:
        meeting.beat("tar 7 of 30", force=True)
        time.sleep(2.5)  # stuck in a read past the timeout: no progress, never done

    took, error = meet_two(1.0, hung, monkeypatch)
    text = " ".join(str(error).split())
    assert isinstance(error, RendezvousTimeout)
    assert "timed out after 1 s without news" in text
    assert "rank(s) 1 arrived but went silent" in text and "rank 1: tar 7 of 30" in text
    assert took < 5
