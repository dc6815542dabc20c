"""A real, throwaway Slurm cluster on this one machine, for tests and demos.

It runs Debian's Slurm 22.05 daemons (munged, slurmctld and one slurmd per fake node) out of one
work folder, with no systemd, no cgroups and no accounting:

- ``NodeName=node[1-N]``: several slurmd on one host, each on its own port (Debian builds Slurm
  with --enable-multiple-slurmd), so ``sbatch --nodes=2`` gets a real 2-node allocation;
- ``proctrack/linuxproc`` and ``task/none``, because containers rarely have usable cgroups;
- a private munge key and socket, so a system munged (if any) is left alone;
- ``/etc/hosts`` entries for the fake node names, because torchrun resolves the first node's name;
- a small ``MinJobAge``, because ``sbatch --wait`` otherwise polls at 2, 8, 32, 32... s.

Every daemon is started and stopped by the PID it wrote, and only if its command line names the
work folder: ``down`` never touches processes it did not start.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from cluster.slurm_config import (
    DEFAULT_DIR,
    ClusterError,
    ClusterSpec,
    gres_conf,
    hosts_add,
    hosts_remove,
    load_spec,
    slurm_conf,
    slurm_env,
)

console = Console(stderr=True)  # messages on stderr, so `eval "$(... up)"` only sees export lines

MARKER = ".bgtrain-slurm"  # proves a folder was made by this module before `down` deletes it
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel",
            "munged")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and could not be installed (not root, no apt-get, apt failed)."""


def missing_binaries() -> list[str]:
    """Slurm and munge programs not found on PATH (plus /usr/sbin and /sbin)."""
    return [b for b in BINARIES if shutil.which(b, path=SBIN_PATH) is None]


def ensure_installed() -> None:
    """Install Debian's Slurm and munge packages with apt-get if any binary is missing."""
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm programs missing ({', '.join(missing)}) and not root: install "
                               f"{' '.join(PACKAGES)} yourself")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm programs missing ({', '.join(missing)}) and no apt-get: install "
                               f"{' '.join(PACKAGES)} yourself")
    console.print(f"[yellow]Slurm programs missing ({', '.join(missing)}): running apt-get update and "
                  f"apt-get install -y {' '.join(PACKAGES)} (about 10-60 s)[/]")
    # A policy-rc.d that exits 101 keeps the packages' postinst from starting system-wide daemons.
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            with console.status(" ".join(cmd)):
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n"
                                       f"{(proc.stdout + proc.stderr)[-2000:]}")
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    still = missing_binaries()
    if still:
        raise SlurmUnavailable(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(still)} is still missing")
    console.print("[green]Slurm installed[/]")


def _pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def _ours(pid: int | None, spec: ClusterSpec) -> bool:
    """The process lives (not a zombie) and its command line names our folder."""
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state != "Z" and f"{spec.dir}/" in cmdline


def _pid_files(spec: ClusterSpec) -> dict[str, Path]:
    """Daemon name -> PID file, in start order."""
    files = {"munged": spec.dir / "munge" / "munged.pid", "slurmctld": spec.dir / "run" / "slurmctld.pid"}
    files.update({f"slurmd-{n}": spec.dir / "run" / f"slurmd-{n}.pid" for n in spec.node_names})
    return files


def _log_file(spec: ClusterSpec, daemon: str) -> Path:
    return spec.dir / "munge" / "munged.log" if daemon == "munged" else spec.dir / "log" / f"{daemon}.log"


def daemons(spec: ClusterSpec) -> dict[str, int | None]:
    """Daemon name -> PID if it is alive and ours, else None."""
    return {name: (pid if _ours(pid := _pid(f), spec) else None) for name, f in _pid_files(spec).items()}


def is_running(spec: ClusterSpec) -> bool:
    """Whether munged, slurmctld and every slurmd of this cluster are alive."""
    return (spec.dir / MARKER).exists() and all(p is not None for p in daemons(spec).values())


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _check_ports_free(spec: ClusterSpec) -> None:
    # slurmctld forks, exits 0, then dies if its port is taken: catch that up front with a clear message.
    for port in range(spec.port, spec.port + spec.nodes + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError as e:
                raise ClusterError(f"port {port} is in use ({e.strerror}); the cluster needs ports "
                                   f"{spec.port}-{spec.port + spec.nodes}: choose others with --port") from None


def _run(cmd: list[str], spec: ClusterSpec, timeout: float = 10) -> subprocess.CompletedProcess:
    env = {**os.environ, **slurm_env(spec), "PATH": SBIN_PATH}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _start(cmd: list[str], name: str, spec: ClusterSpec) -> None:
    proc = subprocess.run(cmd, env={**os.environ, **slurm_env(spec), "PATH": SBIN_PATH}, capture_output=True,
                          text=True)
    # These daemons fork and the parent exits 0 before binding ports: give the child a moment, then look.
    deadline = time.monotonic() + 5
    while proc.returncode == 0 and time.monotonic() < deadline:
        if _ours(_pid(_pid_files(spec)[name]), spec):
            return
        time.sleep(0.1)
    raise ClusterError(f"{name} did not start (exit code {proc.returncode}): {proc.stderr.strip()}\n"
                       f"{_tail(_log_file(spec, name))}")


def wait_idle(spec: ClusterSpec) -> None:
    """Wait until every node reports idle; fail early, with the daemon's log, if one died."""
    deadline = time.monotonic() + spec.timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        dead = [name for name, pid in daemons(spec).items() if pid is None]
        if dead:
            logs = "\n".join(f"--- {_log_file(spec, n)}\n{_tail(_log_file(spec, n))}" for n in dead)
            raise ClusterError(f"{', '.join(dead)} died after starting (a port in use?):\n{logs}")
        try:  # sinfo blocks ~10 s while slurmctld is not answering yet, so keep each try short
            out = _run(["sinfo", "-h", "-N", "-o", "%N %T"], spec, timeout=5)
            states = sorted(set(out.stdout.split("\n")) - {""})
        except subprocess.TimeoutExpired:
            states = []
        if sum(s.endswith(" idle") for s in states) == spec.nodes:
            return
        time.sleep(0.2)
    raise ClusterError(f"nodes not idle after {spec.timeout:.0f} s: {states or 'sinfo gave no answer'}\n"
                       f"{_tail(_log_file(spec, 'slurmctld'))}")


def up(spec: ClusterSpec) -> None:
    """Start the cluster (installing Slurm if needed), or reuse it if it already runs with this spec."""
    t0 = time.monotonic()
    state_file = spec.dir / "cluster.json"
    earlier = load_spec(spec.dir, **asdict(spec) | {"dir": None}) if state_file.exists() else spec
    if is_running(earlier):
        if earlier.identity() != spec.identity():
            raise ClusterError(f"a cluster with {earlier.identity()} already runs in {spec.dir}; run "
                               f"`python -m cluster.local_slurm down --dir {spec.dir}` first")
        wait_idle(earlier)
        console.print(f"[green]cluster already up[/] in {spec.dir} ({spec.nodes} nodes)")
        return
    ensure_installed()
    if (spec.dir / MARKER).exists():
        console.print(f"[yellow]stopping what is left of an earlier cluster in {spec.dir}[/]")
        down(earlier, quiet=True)
    elif spec.dir.exists() and any(spec.dir.iterdir()):
        raise ClusterError(f"{spec.dir} exists, is not empty and was not made by cluster.local_slurm; "
                           "refusing to use it: choose another --dir")
    _check_ports_free(spec)
    shutil.rmtree(spec.dir, ignore_errors=True)
    for sub in ["state", "log", "run", "munge", *(f"spool/{n}" for n in spec.node_names)]:
        (spec.dir / sub).mkdir(parents=True, exist_ok=True)
    (spec.dir / MARKER).touch()
    # munged refuses a socket folder that others cannot traverse.
    for d in (spec.dir, spec.dir / "munge"):
        d.chmod(0o755)
    key = spec.dir / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    state_file.write_text(json.dumps({**asdict(spec), "dir": str(spec.dir)}, indent=1))
    try:
        m = spec.dir / "munge"
        _start(["munged", "--force", f"--key-file={key}", f"--socket={m}/munge.sock", f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], "munged", spec)
        spec.conf.write_text(slurm_conf(spec, socket.gethostname().split(".")[0]))
        (spec.dir / "plugstack.conf").write_text("")
        spec.gres_conf.write_text(gres_conf(spec))  # read from beside slurm.conf
        hosts_add(spec)
        _start(["slurmctld", "-f", str(spec.conf)], "slurmctld", spec)
        for node in spec.node_names:
            _start(["slurmd", "-f", str(spec.conf), "-N", node], f"slurmd-{node}", spec)
        with console.status(f"waiting for {spec.nodes} node(s) to become idle"):
            wait_idle(spec)
    except BaseException:
        down(spec, quiet=True, keep_logs=True)
        raise
    console.print(f"[green]cluster up[/]: {spec.nodes} node(s) {','.join(spec.node_names)} in "
                  f"{time.monotonic() - t0:.1f} s; SLURM_CONF={spec.conf}")


def _kill(pid: int | None, spec: ClusterSpec) -> None:
    """SIGTERM one of our daemons, wait up to 5 s, then SIGKILL."""
    if pid is None or not _ours(pid, spec):
        return
    os.kill(pid, 15)
    for _ in range(50):
        if not _ours(pid, spec):
            return
        time.sleep(0.1)
    console.print(f"[yellow]PID {pid} ignored SIGTERM; sending SIGKILL[/]")
    os.kill(pid, 9)


def _cancel_jobs(spec: ClusterSpec) -> None:
    try:
        jobs = _run(["squeue", "-h", "-o", "%A"], spec).stdout.split()
        if not jobs:
            return
        _run(["scancel", *jobs], spec)
        deadline = time.monotonic() + 15  # let the jobs' slurmstepd exit before their slurmd goes
        while time.monotonic() < deadline and _run(["squeue", "-h", "-o", "%A"], spec).stdout.strip():
            time.sleep(0.2)
    except subprocess.TimeoutExpired:
        pass


def down(spec: ClusterSpec, quiet: bool = False, keep_logs: bool = False) -> None:
    """Cancel jobs, stop this cluster's daemons by PID, remove its /etc/hosts line and folder."""
    if not (spec.dir / MARKER).exists():
        if not quiet:
            console.print(f"nothing to stop in {spec.dir}")
        return
    procs = daemons(spec)
    if procs.get("slurmctld"):
        _cancel_jobs(spec)
    for name in reversed(list(procs)):  # slurmd first, munged last: they need munge to say goodbye
        _kill(procs[name], spec)
    hosts_remove(spec)
    if keep_logs:
        msg = f"logs kept in {spec.dir}/log"
    else:
        shutil.rmtree(spec.dir, ignore_errors=True)
        msg = f"removed {spec.dir}"
    if not quiet:
        console.print(f"[green]cluster stopped[/]; {msg}")


def status(spec: ClusterSpec) -> int:
    """Print each daemon and sinfo; 0 if everything runs."""
    from rich.table import Table

    if not (spec.dir / MARKER).exists():
        console.print(f"no cluster in {spec.dir}")
        return 1
    table = Table(title=f"local Slurm cluster in {spec.dir}")
    table.add_column("daemon")
    table.add_column("state")
    table.add_column("pid")
    for name, pid in daemons(spec).items():
        table.add_row(name, "[green]up[/]" if pid else "[red]down[/]", str(pid or "-"))
    console.print(table)
    if not is_running(spec):
        return 1
    print(_run(["sinfo"], spec).stdout, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m cluster.local_slurm", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  eval \"$(python -m cluster.local_slurm up --nodes 2)\"\n"
               "  sbatch --wait --nodes=2 slurm/train_openimages.sh\n  python -m cluster.local_slurm down")
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--nodes", type=int, default=2, help="number of fake nodes node1..nodeN (up; default 2)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"work folder (default {DEFAULT_DIR})")
    parser.add_argument("--port", type=int, default=16817,
                        help="slurmctld port; slurmd i uses PORT+i (up; default 16817)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs each node advertises (up; default: this machine's count)")
    parser.add_argument("--mem-mb", type=int, default=0,
                        help="RealMemory per node in MB (up; default 90%% of MemAvailable / nodes)")
    parser.add_argument("--prefix", default="node", help="node-name prefix (up; default node)")
    parser.add_argument("--gpus", type=int, default=0,
                        help="GPUs each node advertises as gres, counted only: no GPU is visible in a job (up; "
                             "default 0)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for idle nodes (default 60)")
    parser.add_argument("--keep-logs", action="store_true", help="down: keep the work folder and its logs")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    given = dict(nodes=args.nodes, port=args.port, cpus=args.cpus, mem_mb=args.mem_mb, prefix=args.prefix,
                 timeout=args.timeout, gpus=args.gpus)
    root = args.dir.resolve()
    try:
        if args.command == "up":
            spec = ClusterSpec(dir=root, **given)
            up(spec)
        else:
            spec = load_spec(root, **given)
        if args.command in ("up", "env"):
            for k, v in slurm_env(spec).items():
                print(f"export {k}={v}")
        elif args.command == "down":
            down(spec, keep_logs=args.keep_logs)
        elif args.command == "status":
            return status(spec)
    except (ClusterError, SlurmUnavailable) as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    return 0


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="cluster.local_slurm"))
