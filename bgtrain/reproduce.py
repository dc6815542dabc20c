"""``python -m bgtrain.reproduce``: run a paper table's rows from configs and print ours next to the paper's.

Each row is ``configs/<dataset>/<row>.yaml``; rows run one after another under torchrun on this
machine, or as Slurm jobs (``--slurm``) through ``slurm/train_openimages.sh``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bgtrain.config import load_config
from bgtrain.paper import published

TABLES = {
    "single_positive": ["full", "AN", "LL-R", "LL-R_BoostLU", "LL-Ct_BoostLU", "LL-Cp_BoostLU"],
    "baselines": ["AN", "LS", "ASL", "EPR", "EM", "ROLE", "EM-APL"],
    "inference_only": ["AN_alpha1", "AN_BoostLU_inference"],
    "openimages": ["LL-R", "LL-R_BoostLU", "LL-Ct", "LL-Ct_BoostLU", "LL-Cp", "LL-Cp_BoostLU"],
    "demo": ["AN", "LL-R", "LL-R_BoostLU"],
}


def row_config(dataset: str, row: str) -> Path:
    path = Path("configs") / dataset / f"{row}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config for row {row!r} of dataset {dataset!r}")
    return path


def run_local(config: Path, overrides: list[str], nproc: int, log_path: Path) -> int:
    """One row under torchrun on this machine; output goes to the row's log file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=2", "-m", "bgtrain.train", "--config", str(config), *overrides]
    with open(log_path, "w") as log:
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def run_slurm(config: Path, overrides: list[str], nodes: int, log_path: Path) -> int:
    """One row as a Slurm job (``sbatch --wait``); rows run concurrently as the cluster allows."""
    env = {**os.environ, "BGTRAIN_CONFIG": str(config), "BGTRAIN_OVERRIDES": " ".join(overrides)}
    cmd = ["sbatch", "--wait", f"--nodes={nodes}", f"--output={log_path}", "slurm/train_openimages.sh"]
    return subprocess.call(cmd, env=env)


def collect(out_root: Path, table: str, dataset: str, rows: list[str], codes: dict[str, int]) -> list[dict]:
    results = []
    for row in rows:
        path = out_root / row / "results.json"
        ours = json.loads(path.read_text())["test_map"] if path.is_file() else None
        paper = published(table, row, dataset)
        results.append({"row": row, "ours": ours, "paper": paper, "exit_code": codes.get(row),
                        "diff": None if ours is None or paper is None else ours - paper})
    return results


def render(results: list[dict], table: str, dataset: str) -> tuple[Table, str]:
    """A rich table for the terminal and the same as Markdown."""
    fmt = lambda v: "–" if v is None else f"{v:+.2f}" if isinstance(v, float) and v < 0 else f"{v:.2f}"  # noqa: E731
    t = Table(title=f"{table} / {dataset}: test mAP")
    for col in ("row", "ours", "paper", "diff"):
        t.add_column(col, justify="left" if col == "row" else "right")
    lines = ["| row | ours | paper | diff |", "|---|---|---|---|"]
    for r in results:
        diff = "–" if r["diff"] is None else f"{r['diff']:+.2f}"
        cells = [r["row"], fmt(r["ours"]) if r["ours"] is not None else f"failed ({r['exit_code']})",
                 fmt(r["paper"]), diff]
        t.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    return t, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bgtrain.reproduce",
        description="Run the rows of one of the paper's tables and print our test mAP beside the published one.",
        epilog="example: python -m bgtrain.reproduce --table single_positive --dataset voc --shards data/voc "
               "--rows AN LL-R_BoostLU --nproc 8")
    parser.add_argument("--table", choices=sorted(TABLES), required=True)
    parser.add_argument("--dataset", default=None, help="configs/<dataset>/ (default: the table's own, e.g. demo)")
    parser.add_argument("--shards", required=True, help="shard folder (sets data.shards)")
    parser.add_argument("--rows", nargs="+", help="a subset of the table's rows")
    parser.add_argument("--out", type=Path, default=None, help="run folder root (default runs/<dataset>)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per row under torchrun (local runs)")
    parser.add_argument("--slurm", action="store_true", help="submit each row with sbatch instead")
    parser.add_argument("--nodes", type=int, default=1, help="nodes per row with --slurm")
    parser.add_argument("overrides", nargs="*", help="key.sub=value applied to every row, e.g. optim.epochs=1")
    args = parser.parse_args(argv)
    dataset = args.dataset or {"openimages": "openimages", "demo": "demo"}.get(args.table)
    if dataset is None:
        parser.error("--dataset is required for this table")
    rows = args.rows or TABLES[args.table]
    unknown = [r for r in rows if r not in TABLES[args.table]]
    if unknown:
        parser.error(f"rows {unknown} are not in table {args.table}: {TABLES[args.table]}")
    out_root = args.out or Path("runs") / dataset
    out_root.mkdir(parents=True, exist_ok=True)
    console = Console()
    jobs = {}
    for row in rows:
        config = row_config(dataset, row)
        overrides = [f"data.shards={args.shards}", f"out_dir={out_root / row}", f"name={row}", *args.overrides]
        load_config(config, overrides)  # every row validates before the first one starts
        jobs[row] = (config, overrides)
    codes: dict[str, int] = {}
    if args.slurm:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = {row: pool.submit(run_slurm, c, o, args.nodes, out_root / f"{row}.log")
                       for row, (c, o) in jobs.items()}
            codes = {row: f.result() for row, f in futures.items()}
    else:
        for row, (config, overrides) in jobs.items():
            console.log(f"row {row}: {config} -> {out_root / row} (log {out_root / f'{row}.log'})")
            codes[row] = run_local(config, overrides, args.nproc, out_root / f"{row}.log")
            if codes[row]:
                console.log(f"[red]row {row} failed with exit code {codes[row]}; see its log")
    results = collect(out_root, args.table, dataset, rows, codes)
    table, markdown = render(results, args.table, dataset)
    console.print(table)
    (out_root / f"{args.table}.md").write_text(markdown)
    (out_root / f"{args.table}.json").write_text(json.dumps(results, indent=1))
    console.log(f"wrote {out_root / f'{args.table}.md'} and .json")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="bgtrain.reproduce"))
