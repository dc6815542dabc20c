"""Preflight checks run at the top of every sbatch script, before any expensive work starts.

Each rank checks its devices; the first rank of each node checks that the shards are readable and
that the checkpoint folder is writable with enough free space; then all ranks meet and run an
all-reduce. Rank 0 prints one table for the whole job and every rank exits non-zero if any rank
failed, so a bad node stops the job in seconds instead of hanging NCCL for 30 minutes.

The default shard check costs O(shards) per node, never O(samples), and reads no tar beyond one
member: every listed tar's size against ``manifest.json``, every ``.idx``'s presence, its header's
sample count against the manifest and its last entry's end against the tar's size, and the first
member of each shard in this node's share (:class:`NodeShare`: with ``--config``, the shards this
node's ranks read in epoch 1 of the epoch plan of :mod:`bgtrain.data.plan`; without one, a
contiguous run of each split's shards). ``--full`` walks every tar header of every shard (O(samples),
the old default); ``--quick`` only reads each tar's first member, as before; ``python -m shards
verify`` remains the thorough check (it decodes every image).

A shard root may be a URL (``s3://``, ``gs://``, ``http(s)://``, read through :mod:`bgtrain.storage`). Then
the default check is that ``manifest.json`` reads and that every tar of this node's share exists with the
manifest's size, and its ``.idx`` too: a HEAD per object, 16 at a time, nothing fetched, and nothing asked
of the tars other nodes read. ``--quick`` reads the first member of every tar (a range read each);
``--full`` fetches every tar once and walks its headers in memory (nothing is written to disk).

Ranks meet in a TCPStore that rank 0 hosts before any check starts. A node is waited for as long as
its checks make progress: ``--timeout`` bounds the silence of a rank (one that never arrives, or stops
reporting progress), not the spread between the fastest and the slowest node.

Works under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), under a plain ``srun`` step
(SLURM_PROCID, SLURM_STEP_NUM_TASKS, first host of the nodelist) and as a single process.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.table import Table

from bgtrain import storage
from bgtrain.distributed import WorldInfo, world_info_from_env
from shards.format import read_member

if TYPE_CHECKING:
    from bgtrain.config import TrainConfig

console = Console(stderr=True)
Mode = Literal["default", "full", "quick"]  # the shard check: see the module docstring


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
                     "no GPU: CPU processes on gloo" + (" but --require-gpu was given (or the config's device: cuda); "
                                                        "submit with --gpus-per-node=N" if require_gpu else ""))
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
    """The tar opens and its first member reads."""
    with tarfile.open(path, "r:") as tar:  # shards are plain tars: skip probing three compressions
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


def index_facts(idx: Path, tail: int = 1 << 16) -> tuple[int, int]:
    """(samples its header states, end of the last member's data) of a DALI ``.idx``, from its first and last lines.

    Two small reads whatever the shard's size: members are indexed in tar order, so the last line ends last.
    The full parse (every line against the header) is ``python -m shards verify``'s.
    """
    with open(idx, "rb") as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != b"v1.2" or not head[1].isdigit():
            raise ValueError(f"{idx.name}: not a v1.2 DALI index")
        if int(head[1]) == 0:
            return 0, 0
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - tail))
        lines = f.read().splitlines()
    fields = lines[-1].split() if lines else []
    try:
        if not fields or len(fields) % 4 or fields[0] == b"v1.2":
            raise ValueError
        end = max(int(fields[i + 1]) + int(fields[i + 2]) for i in range(0, len(fields), 4))
    except ValueError:
        raise ValueError(f"{idx.name}: its last line is not an index entry (truncated?)") from None
    return int(head[1]), end


def check_listed(path: Path, entry: dict) -> None:
    """The tar is as long as the manifest says, and its ``.idx`` exists, counts the manifest's samples and fits in it.

    A stat and two small reads of the index: no tar byte is read.
    """
    size, want = path.stat().st_size, entry.get("bytes")
    if isinstance(want, int) and size != want:
        what = "truncated" if size < want else "replaced"
        raise ValueError(f"{size:,} bytes, manifest.json says {want:,} ({what}; check it with "
                         "`python -m shards verify`)")
    idx = path.with_suffix(".idx")
    if not idx.is_file():
        raise ValueError(f"{idx.name} missing; rebuild the shards or run `wds2idx` (ships with DALI)")
    samples, end = index_facts(idx)
    if samples != entry.get("num_samples", samples):
        raise ValueError(f"{idx.name}: {samples} samples, manifest.json says {entry['num_samples']}")
    if end > size:
        raise ValueError(f"{size:,} bytes, its index has data up to byte {end:,} (truncated)")


def _remote_listed(url: str, entry: dict) -> None:
    """The object exists with the manifest's size, and its ``.idx`` exists: two HEADs, nothing fetched."""
    size, want = storage.size(url), entry.get("bytes")
    if isinstance(want, int) and size != want:
        what = "truncated" if size < want else "replaced"
        raise ValueError(f"{size:,} bytes, manifest.json says {want:,} ({what}; check it with "
                         "`python -m shards verify`)")
    idx = storage.with_suffix(url, ".idx")
    if not storage.exists(idx):
        raise ValueError(f"{idx.rsplit('/', 1)[-1]} missing; rebuild the shards or run `wds2idx` (ships with DALI)")


def _remote_first_member(url: str, window: int = 1 << 20) -> None:
    """The object is a tar whose first member reads: range reads of its first ``window`` bytes (and, for a
    larger first member, of the rest of that member)."""
    size = storage.size(url)
    head = storage.read_range(url, 0, min(size, window)) if size else b""
    with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as tar:
        member = tar.next()
        if member is None:
            raise ValueError("empty tar")
        if not member.isfile():
            raise ValueError(f"first member {member.name} is not a regular file")
        end = member.offset_data + member.size
        if end > size:
            raise ValueError(f"{size:,} bytes, its first member needs {end:,} (truncated)")
        if end > len(head):
            storage.read_range(url, member.offset_data, member.size)
        else:
            read_member(tar, member)


def _remote_tar(url: str, entry: dict) -> None:
    """``--full`` for a URL: the object, fetched once into memory, is as long as the manifest says and its
    headers walk to the manifest's sample count."""
    size = storage.size(url)
    want = entry.get("bytes")
    if isinstance(want, int) and size < want:
        raise ValueError(f"{size:,} bytes, manifest.json says {want:,} (truncated)")
    data = storage.read_range(url, 0, size) if size else b""
    keys: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            if m.isfile():
                keys.add(m.name.split(".", 1)[0])
    if len(keys) != entry.get("num_samples", len(keys)):
        raise ValueError(f"{len(keys)} samples, manifest.json says {entry['num_samples']}")


@dataclass(frozen=True)
class NodeShare:
    """Which shards this node reads first, whose first member the default check reads.

    With a training config (``--config``): the shards its ranks read in epoch 1 of the epoch plan
    (:func:`bgtrain.data.plan.plan_sizes`, as the loader calls it), taking node n to run training ranks
    [n P, (n + 1) P) for P processes per node. torchrun's c10d rendezvous may number the nodes otherwise than
    this preflight does (and a resumed run starts at a later epoch), so it is the node's likely share; either
    way the nodes' shares together cover every shard that epoch 1 reads. Without a config: the n-th of
    ``nodes`` contiguous runs of each split's shards.
    """

    node: int = 0
    nodes: int = 1
    procs_per_node: int = 1
    cfg: TrainConfig | None = None

    @classmethod
    def of(cls, world: WorldInfo, procs_per_node: int | None, cfg: TrainConfig | None) -> NodeShare:
        """This node's share; nodes are numbered by rank, each running the same number of preflight processes
        (as torchrun and the sbatch scripts do)."""
        per_node = max(1, world.local_world_size)
        return cls(world.rank // per_node, max(1, -(-world.world_size // per_node)),
                   procs_per_node or per_node, cfg)

    def shards(self, split: str, sizes: Sequence[int]) -> set[int]:
        """Indices of ``split``'s shards (``sizes``: their sample counts) this node reads first."""
        n = len(sizes)
        if self.cfg is None:
            return set(range(n * self.node // self.nodes, n * (self.node + 1) // self.nodes))
        from bgtrain.data.plan import plan_sizes

        data, train = self.cfg.data, split == "train"  # the trainer's splits: train is shuffled, others in order
        dali = data.backend == "dali"  # one stream per rank; the WebDataset backend one per loader worker
        nominal = data.epoch_samples if train and data.resampled else None
        try:
            plan = plan_sizes(tuple(sizes), self.cfg.seed, 1, self.nodes * self.procs_per_node,
                              1 if dali else max(1, data.workers), data.batch_size if train else data.eval_batch_size,
                              shuffle=train, epoch_samples=nominal, pad_at_end=dali)
        except ValueError:  # a split the plan refuses (no samples to resample): the loader names it
            return set(range(n))
        ranks = range(self.node * self.procs_per_node, (self.node + 1) * self.procs_per_node)
        return {p.shard for r in ranks for w in range(plan.workers) for p in plan.units(r, w) if len(p)}

    def describe(self) -> str:
        """Where the share comes from, for the table."""
        how = "its ranks' epoch-1 plan" if self.cfg else "a contiguous run of each split"
        return f"node {self.node + 1} of {self.nodes}: {how}"


def check_shards(root: Path | str, world: WorldInfo, mode: Mode = "default", share: NodeShare | None = None,
                 beat: Callable[[str], None] | None = None) -> Check:
    """manifest.json parses and its tars pass ``mode``'s check (module docstring); ``beat`` hears of each tar.

    ``root`` is a folder or a URL (a ``str``: pathlib folds ``s3://b`` into ``s3:/b``).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from shards.format import read_manifest

    remote = storage.is_remote(root)
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError) as e:
        return Check(world.rank, world.node, f"shards {root}", False, str(e))
    share = share or NodeShare()
    entries: list[tuple[str, dict, bool]] = []  # (split, manifest entry, its first member is read here)
    for split, info in manifest.get("splits", {}).items():
        listed = info.get("shards", [])
        mine = share.shards(split, [s.get("num_samples", 0) for s in listed]) if mode == "default" else set()
        entries += [(split, s, mode == "quick" or i in mine) for i, s in enumerate(listed)]
    if not entries:
        return Check(world.rank, world.node, f"shards {root}", False, f"{root}/manifest.json lists no shards")
    if remote and mode == "default":  # a HEAD costs a round trip: only this node's share is asked about
        entries = [e for e in entries if e[2]]
    bad: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    verb = {"default": "checking", "full": "walking", "quick": "opening"}[mode]

    def check(item: tuple[str, dict, bool]) -> str | None:
        split, entry, read_first = item
        where: Path | str = (storage.join(str(root), split, entry["name"]) if remote
                             else _shard_path(Path(root), split, entry["name"]))
        try:
            if isinstance(where, str):
                if mode == "full":
                    _remote_tar(where, entry)
                elif mode == "default":
                    _remote_listed(where, entry)
                else:
                    _remote_first_member(where)
                return None
            if mode == "full":
                check_tar(where, entry)
            if mode == "default":
                check_listed(where, entry)
            if read_first:
                _first_member(where)
        except (OSError, tarfile.TarError, ValueError, AttributeError) as e:
            text = str(e)  # storage's one-line errors name the URL already
            return text if isinstance(where, str) and text.startswith(f"{where}:") else f"{where}: {text}"
        return None

    def results() -> Iterator[str | None]:
        """Each entry's problem, in order; ``beat`` hears of each tar from this thread only."""
        if not remote:
            for i, item in enumerate(entries):
                if beat:
                    beat(f"{root}: tar {i + 1} of {len(entries)}")
                yield check(item)
            return
        with ThreadPoolExecutor(16 if mode != "full" else 4) as pool:  # round trips, not bandwidth: overlap them
            for i, problem in enumerate(pool.map(check, entries)):
                if beat:
                    beat(f"{root}: {i + 1} of {len(entries)} tars checked")
                yield problem

    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task(f"{verb} {root}", total=len(entries))
        for problem in results():
            if problem is not None:
                bad.append(problem)
            progress.advance(bar)
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        return Check(world.rank, world.node, f"shards {root}", False,
                     f"{len(bad)}/{len(entries)} tars unreadable: " + "; ".join(bad[:3]) + more)
    splits = ", ".join(f"{k}: {v.get('num_samples', '?')}" for k, v in manifest.get("splits", {}).items())
    if remote and mode == "default":
        return Check(world.rank, world.node, f"shards {root}", True,
                     f"{len(entries)} tars of this node's share there, with the manifest's sizes and their .idx "
                     f"({share.describe()}) ({splits})")
    what = {"quick": " (first members read)",
            "full": ", sizes and sample counts as in the manifest (every header walked)",
            "default": f", sizes and .idx sample counts as in the manifest, first member of "
                       f"{sum(r for _, _, r in entries)} read ({share.describe()})"}[mode]
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
    """Some ranks never reached the rendezvous, or went silent there."""


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


class Meeting:
    """Where the ranks meet: a TCPStore that rank 0 hosts (or torchrun's agent serves) before any check starts.

    Each rank says it arrived, reports progress while it checks (:meth:`beat`), and says when it is done;
    :meth:`wait` returns once every rank is done. It fails only on silence: ``timeout`` s in which no unfinished
    rank arrived or made progress. A slow node that keeps checking is waited for however long it takes, so the
    spread between the fastest and the slowest node never fails a job; a hung or missing one fails it
    ``timeout`` s after the last news of any unfinished rank, naming it.
    """

    def __init__(self, world: WorldInfo, timeout: float) -> None:
        self.world, self.timeout = world, timeout
        self.where = f"{world.master_addr}:{world.master_port}"
        self.store = _store(world, timeout)
        self.every = min(1.0, timeout / 4)  # progress reports, often enough for a short timeout to see them
        self._last = -float("inf")
        self.beat("arrived", force=True)

    def beat(self, doing: str, force: bool = False) -> None:
        """Tell the others this rank is alive and what it is doing (at most every ``self.every`` s unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        rank = self.world.rank
        try:
            self.store.set(f"doing/{rank}", doing)
            self.store.add(f"beats/{rank}", 1)
            self.store.add("beats", 1)  # the one counter a waiter reads: any unfinished rank's progress moves it
        except Exception:  # the host went away: wait() says so once the checks end
            pass

    def wait(self, poll: float = 0.1) -> None:
        """Say this rank is done; return once every rank is. RendezvousTimeout names the ranks not heard from."""
        store, n = self.store, self.world.world_size
        try:
            store.set(f"done/{self.world.rank}", "1")
            store.add("done", 1)
            beats, heard = -1, time.monotonic()
            while store.add("done", 0) < n:
                now = time.monotonic()
                if (seen := store.add("beats", 0)) != beats:
                    beats, heard = seen, now
                elif now - heard > self.timeout:
                    raise RendezvousTimeout(self._silence())
                time.sleep(poll)
        except RendezvousTimeout:
            raise
        except Exception as e:  # the host went away (its rank failed) or the network broke
            raise RendezvousTimeout(f"lost the rendezvous at {self.where}: {str(e).splitlines()[0]}") from None

    def _silence(self) -> str:
        """Which ranks the wait gave up on, and what each was last doing."""
        store, n = self.store, self.world.world_size
        pending = [r for r in range(n) if not store.check([f"done/{r}"])]
        never = [r for r in pending if store.add(f"beats/{r}", 0) == 0]
        stuck = [r for r in pending if r not in never]
        parts = [f"rank(s) {_ranges(never)} never arrived"] if never else []
        if stuck:
            last = "; ".join(f"rank {r}: {store.get(f'doing/{r}').decode()}" for r in stuck[:3])
            parts.append(f"rank(s) {_ranges(stuck)} arrived but went silent before finishing their checks "
                         f"(last news: {last})")
        return (f"rendezvous at {self.where} timed out after {self.timeout:g} s without news: expected {n} ranks "
                f"(0-{n - 1}), {' and '.join(parts)}. Check that every node started its processes, can reach "
                "MASTER_ADDR:MASTER_PORT and is not stuck reading its file systems.")


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


def all_reduce_and_gather(world: WorldInfo, checks: list[Check], timeout: float,
                          meeting: Meeting | None = None) -> list[Check]:
    """Wait at ``meeting`` for every rank, start a process group, all-reduce ones (must sum to the world size),
    gather every rank's checks."""
    import torch
    import torch.distributed as dist

    from bgtrain.collectives import all_gather_object, all_reduce, force_collectives

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > world.local_rank
    backend = "nccl" if use_cuda else "gloo"
    store: dist.Store
    if world.world_size == 1:
        store = dist.HashStore()
    else:
        meeting = meeting or Meeting(world, timeout)
        meeting.wait()
        store = dist.PrefixStore("pg", meeting.store)  # the group's keys apart from the meeting's
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    t0 = time.monotonic()
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        with force_collectives():  # one rank too: the backend must run a collective
            x = all_reduce(torch.ones(1, device="cuda" if use_cuda else "cpu"))
            gathered = all_gather_object([asdict(c) for c in checks])
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


def apply_config(args: argparse.Namespace) -> TrainConfig:
    """Fill --shards and --checkpoint-dir from a training config (data.shards, out_dir) when not given; the config."""
    from bgtrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # raises ConfigError naming the file and key
    if not args.shards:
        args.shards = [cfg.data.shards]
    if not args.checkpoint_dir:
        args.checkpoint_dir = cfg.out_dir
    if cfg.device == "cuda":  # a run configured for CUDA must not start on CPU nodes
        args.require_gpu = True
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run every check; return the exit code."""
    world = world_info_from_env()
    cfg = None
    if args.config:
        try:
            cfg = apply_config(args)
        except (ValueError, OSError) as e:  # ConfigError is a ValueError; fail before any rendezvous
            console.print(f"[red]preflight FAILED on rank {world.rank}: bad config:[/] {e}")
            return 1
    elif args.overrides:
        console.print(f"[red]preflight: overrides {args.overrides} given without --config[/]")
        return 1
    try:
        # Meet before checking: rank 0 hosts the store at once, and a slow node's progress reaches the others.
        meeting = Meeting(world, args.timeout) if world.world_size > 1 else None
    except RendezvousTimeout as e:
        console.print(f"[red]preflight FAILED on rank {world.rank} ({world.node}):[/] {e}")
        return 2
    checks = [check_devices(world, args.procs_per_node, args.require_gpu)]
    if world.local_rank == 0:  # file systems are per node; one reader per node is enough
        mode: Mode = "full" if args.full else "quick" if args.quick else "default"
        share = NodeShare.of(world, args.procs_per_node, cfg)
        beat = meeting.beat if meeting else None
        checks += [check_shards(s if storage.is_remote(s) else Path(s), world, mode, share, beat)
                   for s in args.shards]  # a URL stays a str: pathlib folds s3://b into s3:/b
        if args.checkpoint_dir:
            checks.append(check_disk(Path(args.checkpoint_dir), args.min_free_gb, world))
    try:
        checks = all_reduce_and_gather(world, checks, args.timeout, meeting)
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
        epilog="shard check: by default O(shards) per node, no tar read beyond one member: every tar's size\n"
               "against manifest.json, every .idx present with the manifest's sample count and its last entry\n"
               "inside the tar, and the first member of each tar in this node's share (its ranks' epoch-1 plan\n"
               "with --config, else a contiguous run of each split). --full and --quick keep their old checks.\n"
               "A URL root (s3://, gs://, http(s)://): manifest.json reads, and each tar of this node's share and its\n"
               ".idx exist, the tar with the manifest's size (HEADs, 16 at a time; no tar byte read).\n\n"
               "examples:\n"
               "  python -m cluster.preflight --shards data/smoke --checkpoint-dir runs/x\n"
               "  python -m cluster.preflight --shards data/smoke --full        # every tar header, as before\n"
               "  python -m cluster.preflight --config configs/smoke.yaml data.shards=/tmp/smoke\n"
               "  python -m cluster.preflight --shards s3://bucket/shards/oi   # URL: HEADs of this node's share\n"
               "  torchrun --standalone --nproc_per_node=2 -m cluster.preflight --timeout 30\n"
               "  srun python -m cluster.preflight --shards /data/openimages --checkpoint-dir runs/slurm/$SLURM_JOB_ID")
    parser.add_argument("--shards", action="append", default=[], metavar="DIR|URL",
                        help="shard folder with manifest.json to check, or its URL (s3://, gs://, http(s)://: "
                             "then each node checks that its share's tars and .idx exist with the manifest's "
                             "sizes, a HEAD each; --full fetches every tar) (repeatable; default: the config's "
                             "data.shards)")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help="folder checkpoints go to: created, write-tested (default: the config's out_dir)")
    parser.add_argument("--config", metavar="YAML",
                        help="training config: validated here (before any rendezvous), gives the defaults above")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for bgtrain.train")
    parser.add_argument("--min-free-gb", type=float, default=10.0,
                        help="free space needed under --checkpoint-dir in GiB (default 10)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without news from any unfinished rank before the rendezvous fails (a rank "
                             "that never arrives, or stops making progress), and the all-reduce's timeout; a "
                             "slower node that keeps checking is waited for (default 60)")
    parser.add_argument("--procs-per-node", type=int, default=None,
                        help="processes each node will run, checked against its GPU count "
                             "(default LOCAL_WORLD_SIZE / tasks on this node)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="fail on a node without a GPU (implied by a --config with device: cuda)")
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--full", action="store_true",
                       help="shards: walk every tar's headers on every node, checking its size and sample count "
                            "(O(samples): the default before; `python -m shards verify` also decodes); a URL's "
                            "tars are fetched, each once, into memory")
    depth.add_argument("--quick", action="store_true",
                       help="shards: only open every tar and read its first member, as before (kept for old "
                            "scripts; the default below checks more and reads fewer first members); a URL's by "
                            "range reads")
    args = parser.parse_args(argv)
    # c10d logs each failed connect with a C++ stack trace; the table and message below say it better.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    return run(args)


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="cluster.preflight"))
