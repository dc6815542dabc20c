"""Preflight checks run at the top of every sbatch script, before any expensive work starts.

Each rank checks its devices; the first rank of each node checks that the shards are readable and
that the checkpoint folder is writable with enough free space; then all ranks meet at a rendezvous
and run an all-reduce. Rank 0 prints one table for the whole job and every rank exits non-zero if
any rank failed, so a bad node stops the job in seconds instead of hanging NCCL for 30 minutes.

Works under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), under a plain ``srun`` step
(SLURM_PROCID, SLURM_STEP_NUM_TASKS, first host of the nodelist) and as a single process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bgtrain.distributed import WorldInfo, world_info_from_env
from shards.format import read_member

console = Console(stderr=True)


@dataclass(frozen=True)
class Check:
    """Outcome of one check on one rank."""

    rank: int
    node: str
    name: str
    ok: bool
    detail: str


def check_devices(world: WorldInfo, procs_per_node: int | None, require_gpu: bool) -> Check:
    """GPU count against the processes this node will run; no GPU means CPU processes on gloo."""
    import torch

    want = procs_per_node or world.local_world_size
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return Check(world.rank, world.node, "devices", not require_gpu,
                     "no GPU: CPU processes on gloo" + (" but --require-gpu was given" if require_gpu else ""))
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    ok = n >= want
    detail = f"{n} GPU(s) ({', '.join(names)}) for {want} process(es) on this node"
    return Check(world.rank, world.node, "devices", ok, detail if ok else f"only {detail}")


def _shard_path(root: Path, split: str, name: str) -> Path:
    # Builders put tars in root/<split>/; accept a flat folder too.
    for cand in (root / split / name, root / name):
        if cand.is_file():
            return cand
    return root / split / name


def _first_member(path: Path) -> None:
    """--quick: the tar opens and its first member reads."""
    with tarfile.open(path) as tar:
        member = tar.next()
        if member is None:
            raise ValueError("empty tar")
        read_member(tar, member)


def expected_size(path: Path, entry: dict) -> int | None:
    """Smallest size the complete tar can have: the manifest's ``bytes``, else the end of the last member
    its DALI index lists plus the two zero blocks that end a tar (None without either)."""
    if isinstance(entry.get("bytes"), int):
        return entry["bytes"]
    idx = path.with_suffix(".idx")
    if not idx.is_file():
        return None
    end = 0
    for line in idx.read_text().splitlines()[1:]:
        fields = line.split()
        for i in range(0, len(fields) - 3, 4):  # ext offset size name, per member of the sample
            end = max(end, int(fields[i + 1]) + int(fields[i + 2]))
    return -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE


def check_tar(path: Path, entry: dict) -> None:
    """The tar is as long as its index (or manifest) says and holds the manifest's number of samples.

    Walking the headers costs one small read per member, not the image bytes. A truncated tar ends the
    walk early without an error from tarfile, so the sample count is what catches it.
    """
    size, want = path.stat().st_size, expected_size(path, entry)
    if want is not None and size < want:
        raise ValueError(f"{size:,} bytes, its index needs at least {want:,} (truncated)")
    keys: set[str] = set()
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile():
                keys.add(m.name.split(".", 1)[0])
    if len(keys) != entry.get("num_samples", len(keys)):
        raise ValueError(f"{len(keys)} samples, manifest.json says {entry['num_samples']}")


def check_shards(root: Path, world: WorldInfo, quick: bool = False) -> Check:
    """manifest.json parses and every tar it lists has its size and sample count (``quick``: first member reads)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from shards.format import read_manifest

    try:
        manifest = read_manifest(root)
    except (OSError, ValueError) as e:
        return Check(world.rank, world.node, f"shards {root}", False, str(e))
    entries = [(split, s) for split, info in manifest.get("splits", {}).items() for s in info.get("shards", [])]
    if not entries:
        return Check(world.rank, world.node, f"shards {root}", False, f"{root}/manifest.json lists no shards")
    bad: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for split, entry in progress.track(entries, description=f"{'opening' if quick else 'checking'} {root}"):
            path = _shard_path(root, split, entry["name"])
            try:
                _first_member(path) if quick else check_tar(path, entry)
            except (OSError, tarfile.TarError, ValueError, AttributeError) as e:
                bad.append(f"{path}: {e}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        return Check(world.rank, world.node, f"shards {root}", False,
                     f"{len(bad)}/{len(entries)} tars unreadable: " + "; ".join(bad[:3]) + more)
    splits = ", ".join(f"{k}: {v.get('num_samples', '?')}" for k, v in manifest.get("splits", {}).items())
    what = "" if quick else ", sizes and sample counts as in the manifest"
    return Check(world.rank, world.node, f"shards {root}", True, f"{len(entries)} tars readable{what} ({splits})")


def check_disk(folder: Path, min_free_gb: float, world: WorldInfo) -> Check:
    """The checkpoint folder can be created and written, and has ``min_free_gb`` free."""
    name = f"disk {folder}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".preflight-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return Check(world.rank, world.node, name, False, f"not writable: {e}")
    free = shutil.disk_usage(folder).free / 2**30
    ok = free >= min_free_gb
    return Check(world.rank, world.node, name, ok,
                 f"{free:.1f} GiB free" + ("" if ok else f", needs --min-free-gb {min_free_gb:g}"))


class RendezvousTimeout(RuntimeError):
    """Some ranks never reached the rendezvous."""


def _store(world: WorldInfo, timeout: float):
    """Connect to (or, on rank 0 outside torchrun, host) the TCPStore at MASTER_ADDR:MASTER_PORT."""
    import torch.distributed as dist

    where = f"{world.master_addr}:{world.master_port}"
    # torchrun's agent already serves a store there; outside torchrun rank 0 hosts it.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    host = world.rank == 0 and not agent
    try:
        # A client retries its connect once after a pause, so give each try half the budget.
        store = dist.TCPStore(world.master_addr, world.master_port, None, host,
                              timedelta(seconds=timeout if host else timeout / 2), wait_for_workers=False)
        store.set_timeout(timedelta(seconds=timeout))
    except Exception as e:  # DistNetworkError / RuntimeError with a C++ message
        hosted = "host" if host else "reach"
        raise RendezvousTimeout(
            f"rank {world.rank} could not {hosted} the rendezvous at {where} within {timeout:g} s "
            f"(expected ranks 0-{world.world_size - 1}; rank 0 hosts it): {str(e).splitlines()[0].rstrip('.')}. "
            "Check that rank 0 started, that MASTER_ADDR resolves on every node and that the port is free "
            "and open.") from None
    prefix = f"bgtrain-preflight/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(prefix, store)


def rendezvous(world: WorldInfo, timeout: float):
    """Meet every rank within ``timeout`` s; on failure name the address and the missing ranks."""
    store = _store(world, timeout)
    where = f"{world.master_addr}:{world.master_port}"
    store.set(f"rank/{world.rank}", world.node)
    deadline = time.monotonic() + timeout
    keys = [f"rank/{r}" for r in range(world.world_size)]
    while time.monotonic() < deadline:
        if store.check(keys):
            return store
        time.sleep(0.1)
    missing = [r for r, k in enumerate(keys) if not store.check([k])]
    raise RendezvousTimeout(
        f"rendezvous at {where} timed out after {timeout:g} s: expected {world.world_size} ranks "
        f"(0-{world.world_size - 1}), rank(s) {_ranges(missing)} never arrived. Check that every node "
        "started its processes and can reach MASTER_ADDR:MASTER_PORT.")


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out)


def all_reduce_and_gather(world: WorldInfo, checks: list[Check], timeout: float) -> list[Check]:
    """Start a process group, all-reduce ones (must sum to the world size), gather every rank's checks."""
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > world.local_rank
    backend = "nccl" if use_cuda else "gloo"
    if world.world_size == 1:
        store = dist.HashStore()
    else:
        store = rendezvous(world, timeout)
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    t0 = time.monotonic()
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        x = torch.ones(1, device="cuda" if use_cuda else "cpu")
        dist.all_reduce(x)
        gathered: list = [None] * world.world_size
        dist.all_gather_object(gathered, [asdict(c) for c in checks])
        took = time.monotonic() - t0
    finally:
        dist.destroy_process_group()
    ok = int(x.item()) == world.world_size
    nodes: dict[str, list[int]] = {}
    for rank_checks in gathered:
        if rank_checks:
            nodes.setdefault(rank_checks[0]["node"], []).append(rank_checks[0]["rank"])
    per_node = "; ".join(f"{n}: ranks {_ranges(sorted(r))}" for n, r in sorted(nodes.items()))
    result = Check(world.rank, world.node, "all-reduce", ok,
                   f"{backend}, sum {int(x.item())} of {world.world_size} ranks on {len(nodes)} node(s) "
                   f"in {took:.2f} s; {per_node}")
    return [Check(**c) for rank_checks in gathered for c in rank_checks] + [result]


def print_table(world: WorldInfo, checks: list[Check]) -> None:
    """Rank 0's checks in full, plus every failure of any rank."""
    table = Table(title=f"preflight ({world.launcher}, {world.world_size} rank(s), MASTER "
                        f"{world.master_addr}:{world.master_port})")
    for col in ("rank", "node", "check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in checks:
        if c.rank == world.rank or not c.ok:
            table.add_row(str(c.rank), c.node, c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
    Console(width=160).print(table)  # stdout, wide: it lands in Slurm log files


def apply_config(args: argparse.Namespace) -> None:
    """Fill --shards and --checkpoint-dir from a training config (data.shards, out_dir) when not given."""
    from bgtrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # raises ConfigError naming the file and key
    if not args.shards:
        args.shards = [cfg.data.shards]
    if not args.checkpoint_dir:
        args.checkpoint_dir = cfg.out_dir


def run(args: argparse.Namespace) -> int:
    """Run every check; return the exit code."""
    world = world_info_from_env()
    if args.config:
        try:
            apply_config(args)
        except (ValueError, OSError) as e:  # ConfigError is a ValueError; fail before any rendezvous
            console.print(f"[red]preflight FAILED on rank {world.rank}: bad config:[/] {e}")
            return 1
    elif args.overrides:
        console.print(f"[red]preflight: overrides {args.overrides} given without --config[/]")
        return 1
    checks = [check_devices(world, args.procs_per_node, args.require_gpu)]
    if world.local_rank == 0:  # file systems are per node; one reader per node is enough
        checks += [check_shards(Path(s), world, args.quick) for s in args.shards]
        if args.checkpoint_dir:
            checks.append(check_disk(Path(args.checkpoint_dir), args.min_free_gb, world))
    try:
        checks = all_reduce_and_gather(world, checks, args.timeout)
    except RendezvousTimeout as e:
        print_table(world, checks)
        console.print(f"[red]preflight FAILED on rank {world.rank} ({world.node}):[/] {e}")
        return 2
    except Exception as e:  # a collective that fails or times out after the rendezvous
        print_table(world, checks)
        console.print(f"[red]preflight FAILED on rank {world.rank} ({world.node}): all-reduce over "
                      f"{world.world_size} ranks at {world.master_addr}:{world.master_port} failed:[/] {e}")
        return 2
    failed = [c for c in checks if not c.ok]
    if world.rank == 0 or failed:
        print_table(world, checks)
    if failed:
        console.print("[red]preflight FAILED:[/] " + "; ".join(f"rank {c.rank} {c.name}: {c.detail}"
                                                                  for c in failed))
        return 1
    if world.rank == 0:
        console.print(f"[green]preflight passed[/] on {world.world_size} rank(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m cluster.preflight", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m cluster.preflight --shards data/smoke --checkpoint-dir runs/x\n"
               "  python -m cluster.preflight --config configs/smoke.yaml data.shards=/tmp/smoke\n"
               "  torchrun --standalone --nproc_per_node=2 -m cluster.preflight --timeout 30\n"
               "  srun python -m cluster.preflight --shards /data/openimages --checkpoint-dir runs/slurm/$SLURM_JOB_ID")
    parser.add_argument("--shards", action="append", default=[], metavar="DIR",
                        help="shard folder with manifest.json to check (repeatable; default: the config's "
                             "data.shards)")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help="folder checkpoints go to: created, write-tested (default: the config's out_dir)")
    parser.add_argument("--config", metavar="YAML",
                        help="training config: validated here (before any rendezvous), gives the defaults above")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for bgtrain.train")
    parser.add_argument("--min-free-gb", type=float, default=10.0,
                        help="free space needed under --checkpoint-dir in GiB (default 10)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for every rank at the rendezvous and all-reduce (default 60)")
    parser.add_argument("--procs-per-node", type=int, default=None,
                        help="processes each node will run, checked against its GPU count "
                             "(default LOCAL_WORLD_SIZE / tasks on this node)")
    parser.add_argument("--require-gpu", action="store_true", help="fail on a node without a GPU")
    parser.add_argument("--quick", action="store_true",
                        help="shards: only open each tar and read its first member (default: check every tar's "
                             "size against its index and its sample count against manifest.json)")
    args = parser.parse_args(argv)
    # c10d logs each failed connect with a C++ stack trace; the table and message below say it better.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    return run(args)


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="cluster.preflight"))
