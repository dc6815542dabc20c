"""``python -m bgtrain.reproduce``: run a paper table's rows from configs and print ours next to the paper's.

Each row is ``configs/<dataset>/<row>.yaml``; rows run one after another under torchrun on this
machine, or as Slurm jobs (``--slurm``) through ``slurm/train_openimages.sh``. ``--slurm --gpus-per-node N`` asks
Slurm for N GPUs per node and runs the rows with ``device=cuda``; a row whose config says ``device: cuda`` is
refused without it, so no row configured for GPUs trains on CPU processes silently.

Two steps follow the paper's protocol rather than training every row:

- **Evaluation-only rows** (:data:`EVAL_ONLY`): "BoostLU in inference only" trains nothing. It takes the best
  checkpoint of another row of the table (selected on validation at that row's own alpha) and evaluates that same
  checkpoint on test at its own config's ``model.alpha_eval``; its config must equal the other row's otherwise.
- **Pretraining** (``--pretrain SHARDS``): ``configs/<dataset>/pretrain.yaml`` is trained once on SHARDS, its
  best checkpoint is exported as a torchvision ResNet state dict without ``fc`` (:mod:`bgtrain.export_trunk`) to
  ``<out>/pretrain/trunk.pt``, and every row starts from it (``model.pretrained``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bgtrain import storage
from bgtrain.config import ConfigError, TrainConfig, load_config, to_dict
from bgtrain.paper import published

TABLES = {
    "single_positive": ["full", "AN", "LL-R", "LL-R_BoostLU", "LL-Ct_BoostLU", "LL-Cp_BoostLU"],
    "baselines": ["AN", "LS", "ASL", "EPR", "EM", "ROLE", "EM-APL"],
    "inference_only": ["AN_alpha1", "AN_BoostLU_inference"],
    "openimages": ["LL-R", "LL-R_BoostLU", "LL-Ct", "LL-Ct_BoostLU", "LL-Cp", "LL-Cp_BoostLU"],
    "demo": ["full", "AN", "LL-R", "LL-R_BoostLU", "AN_BoostLU_inference"],
    "paper": ["full", "AN", "LL-R", "LL-R_BoostLU", "AN_BoostLU_inference"],
}
# (table, row) -> the row whose best checkpoint this row evaluates again, at its own model.alpha_eval.
EVAL_ONLY = {("inference_only", "AN_BoostLU_inference"): "AN_alpha1",
             ("demo", "AN_BoostLU_inference"): "AN", ("paper", "AN_BoostLU_inference"): "AN"}
# Keys in which an evaluation-only row's config may differ from its source row's.
# A row whose folder holds an earlier attempt continues it (a finished row is only tested again), so a killed
# `make demo` or table loses nothing; an explicit checkpoint.resume override still wins, as it comes later.
RESUME = "checkpoint.resume=latest"
_EVAL_ONLY_FREE = {"name", "out_dir", "model.alpha_eval"}


def row_config(dataset: str, row: str, root: Path = Path("configs")) -> Path:
    """``<root>/<dataset>/<row>.yaml``, which must exist."""
    path = root / dataset / f"{row}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config for row {row!r} of dataset {dataset!r}")
    return path


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def check_eval_only(row: str, cfg: TrainConfig, source: str, source_cfg: TrainConfig) -> None:
    """An evaluation-only row must be its source row's config with only ``model.alpha_eval`` changed."""
    mine, theirs = _flatten(to_dict(cfg)), _flatten(to_dict(source_cfg))
    differ = sorted(k for k in mine if k not in _EVAL_ONLY_FREE and mine[k] != theirs.get(k))
    if differ:
        key = differ[0]
        raise ConfigError(f"row {row} evaluates row {source}'s checkpoint, so its config may differ only in "
                          f"model.alpha_eval, but {key} is {mine[key]!r} there and {theirs.get(key)!r} in {source}")


def cpu_seconds_of_children() -> float:
    """User + system CPU time of all finished child processes so far (torchrun and its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _torchrun(module: str, args: list[str], nproc: int, log_path: Path) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=2", "-m", module, *args]
    with open(log_path, "w") as log:
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def run_local(config: Path, overrides: list[str], nproc: int, log_path: Path) -> int:
    """One row under torchrun on this machine; output goes to the row's log file."""
    return _torchrun("bgtrain.train", ["--config", str(config), *overrides], nproc, log_path)


def evaluate_checkpoint(row: str, cfg: TrainConfig, source_dir: Path, out_dir: Path, nproc: int,
                        log_path: Path) -> int:
    """An evaluation-only row: the source row's best checkpoint on test at ``cfg.model.alpha_eval``.

    Writes ``out_dir/results.json`` like a trained row's, naming the checkpoint it evaluated and the source row's
    best epoch and validation mAP (measured at the source's alpha, where the epoch was selected).
    """
    checkpoint = source_dir / "checkpoints" / "best.pt"
    source_results = json.loads((source_dir / "results.json").read_text())
    code = _torchrun("bgtrain.evaluate", [
        "--checkpoint", str(checkpoint), "--shards", cfg.data.shards, "--split", "test",
        "--alpha-eval", str(cfg.model.alpha_eval), "--no-positive", cfg.eval.no_positive,
        "--groups", str(cfg.eval.groups or 1), "--out", str(out_dir)], nproc, log_path)
    if code:
        return code
    report = json.loads((out_dir / "map_test.json").read_text())
    results = {"name": row, "scheme": cfg.loss.scheme, "alpha_train": cfg.model.alpha_train,
               "alpha_eval": cfg.model.alpha_eval, "best_epoch": source_results["best_epoch"],
               "val_map": source_results["val_map"], "test_map": report["all"]["map"],
               "evaluated_checkpoint": str(checkpoint), "selected_at_alpha": source_results["alpha_eval"]}
    if cfg.eval.groups:
        results["groups"] = report["groups"]
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def pretrain(dataset: str, shards: str, out_root: Path, nproc: int, configs: Path, console: Console) -> Path:
    """Train ``<dataset>/pretrain.yaml`` on ``shards`` once and export its trunk; returns the trunk file."""
    from bgtrain.export_trunk import export_trunk

    config = row_config(dataset, "pretrain", configs)
    run_dir = out_root / "pretrain"
    overrides = [f"data.shards={shards}", f"out_dir={run_dir}", "name=pretrain", RESUME]
    load_config(config, overrides)
    console.log(f"pretraining: {config} on {shards} -> {run_dir} (log {out_root / 'pretrain.log'})")
    code = run_local(config, overrides, nproc, out_root / "pretrain.log")
    if code:
        raise RuntimeError(f"pretraining failed with exit code {code}; see {out_root / 'pretrain.log'}")
    trunk = run_dir / "trunk.pt"
    export_trunk(run_dir / "checkpoints" / "best.pt", trunk, head=False)
    results = json.loads((run_dir / "results.json").read_text())
    console.log(f"pretrained trunk {trunk} (val mAP {results['val_map']:.2f} at epoch {results['best_epoch']}, "
                f"test mAP {results['test_map']:.2f})")
    localisation = trunk_localisation(run_dir, shards)
    if localisation:
        console.log(f"trunk CAMs: the pointing game hits {localisation['hit_rate']:.1f}% of "
                    f"{localisation['pairs']} test objects (chance {localisation['chance']:.1f}%, CAM "
                    f"{'x'.join(map(str, localisation['cam_size']))}; {run_dir / 'pointing.json'})")
    return trunk


def trunk_localisation(run_dir: Path, shards: str) -> dict | None:
    """Whether the pretrained model's CAMs point at its objects (bgtrain.explain.pointing), on the pretraining set's
    test split; None, with nothing written, when those shards record no object positions (not synthetic)."""
    from bgtrain.explain.pointing import pointing_game
    from shards.synthetic import OBJECTS_FILE

    if not storage.exists(storage.join(shards, "test", OBJECTS_FILE)):
        return None
    result = pointing_game(run_dir / "checkpoints" / "best.pt", shards, "test", device="cpu")
    (run_dir / "pointing.json").write_text(json.dumps(result, indent=1))
    return result


def train_script() -> Path:
    """slurm/train_openimages.sh of this checkout (so ``--slurm`` works from any folder), else the relative path."""
    script = Path(__file__).resolve().parents[1] / "slurm" / "train_openimages.sh"
    return script if script.is_file() else Path("slurm/train_openimages.sh")


def sbatch_command(nodes: int, log_path: Path, gpus_per_node: int | None) -> list[str]:
    """The ``sbatch`` line of one row; ``--gpus-per-node`` asks Slurm for the GPUs the row trains on."""
    gpus = [f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    return ["sbatch", "--wait", f"--nodes={nodes}", *gpus, f"--output={log_path}", str(train_script())]


def run_slurm(config: Path, overrides: list[str], nodes: int, log_path: Path, gpus_per_node: int | None = None) -> int:
    """One row as a Slurm job (``sbatch --wait``); rows run concurrently as the cluster allows."""
    env = {**os.environ, "BGTRAIN_CONFIG": str(config), "BGTRAIN_OVERRIDES": " ".join(overrides)}
    if gpus_per_node:
        env["GPUS_PER_NODE"] = str(gpus_per_node)  # one process per GPU (slurm/train_openimages.sh)
    return subprocess.call(sbatch_command(nodes, log_path, gpus_per_node), env=env)


def check_slurm_devices(jobs: dict[str, tuple[Path, list[str], TrainConfig]], gpus_per_node: int | None) -> None:
    """Refuse, in one line, rows configured for CUDA (``device: cuda``) that would be submitted without GPUs."""
    cuda_rows = [row for row, (_, _, cfg) in jobs.items() if cfg.device == "cuda"]
    if cuda_rows and not gpus_per_node:
        raise ConfigError(f"rows {', '.join(cuda_rows)} have device: cuda, and --slurm would submit them without "
                          "GPUs: pass --gpus-per-node N (GPUs per node each row's job asks for), or set device=auto")


def collect(out_root: Path, table: str, dataset: str, rows: list[str], codes: dict[str, int],
            times: dict[str, dict] | None = None) -> list[dict]:
    """One record per row: our test mAP, the paper's, the difference, the exit code and the time taken."""
    results = []
    for row in rows:
        path = out_root / row / "results.json"
        ours = json.loads(path.read_text())["test_map"] if path.is_file() else None
        paper = published(table, row, dataset)
        results.append({"row": row, "ours": ours, "paper": paper, "exit_code": codes.get(row),
                        "diff": None if ours is None or paper is None else ours - paper,
                        **(times or {}).get(row, {})})
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


def plan_rows(table: str, dataset: str, rows: list[str], shards: str, out_root: Path, overrides: list[str],
              configs_root: Path, trunk: Path | None) -> dict[str, tuple[Path, list[str], TrainConfig]]:
    """Each row's config file, overrides and resolved config, all validated before anything runs."""
    jobs = {}
    for row in rows:
        config = row_config(dataset, row, configs_root)
        row_overrides = [f"data.shards={shards}", f"out_dir={out_root / row}", f"name={row}", RESUME,
                         *([f"model.pretrained={trunk}"] if trunk else []), *overrides]
        jobs[row] = (config, row_overrides, load_config(config, row_overrides))
    for row in rows:
        source = EVAL_ONLY.get((table, row))
        if source is None:
            continue
        if source in jobs:
            source_cfg = jobs[source][2]
        else:
            source_cfg = load_config(row_config(dataset, source, configs_root), jobs[row][1])
            if not (out_root / source / "checkpoints" / "best.pt").is_file():
                raise FileNotFoundError(f"row {row} evaluates row {source}'s best checkpoint, and "
                                        f"{out_root / source}/checkpoints/best.pt does not exist: add {source} "
                                        "to --rows")
        check_eval_only(row, jobs[row][2], source, source_cfg)
    return jobs


class Stopwatch:
    """Wall time of this process and CPU time of its finished children, per named step."""

    def __init__(self) -> None:
        self.times: dict[str, dict] = {}

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), cpu_seconds_of_children()

    def stop(self, name: str, started: tuple[float, float]) -> dict:
        wall, cpu = started
        self.times[name] = {"wall_s": round(time.perf_counter() - wall, 1),
                            "cpu_s": round(cpu_seconds_of_children() - cpu, 1)}
        return self.times[name]


def run_rows(table: str, jobs: dict, out_root: Path, nproc: int, slurm: bool, nodes: int, console: Console,
             clock: Stopwatch, gpus_per_node: int | None = None) -> dict[str, int]:
    """Train every row (locally one after another, or all at once on Slurm), then the evaluation-only rows."""
    codes: dict[str, int] = {}
    train_rows = {row: job for row, job in jobs.items() if (table, row) not in EVAL_ONLY}
    if slurm and train_rows:
        with ThreadPoolExecutor(len(train_rows)) as pool:
            futures = {row: pool.submit(run_slurm, c, o, nodes, out_root / f"{row}.log", gpus_per_node)
                       for row, (c, o, _) in train_rows.items()}
            codes = {row: f.result() for row, f in futures.items()}
    for row, (config, overrides, cfg) in jobs.items():
        if row in codes:
            continue
        started = clock.start()
        log = out_root / f"{row}.log"
        source = EVAL_ONLY.get((table, row))
        if source is not None and codes.get(source):
            codes[row] = codes[source]
            console.log(f"[red]row {row} not evaluated: its source row {source} failed")
            continue
        if source is not None:
            console.log(f"row {row}: row {source}'s best checkpoint at alpha {cfg.model.alpha_eval} -> "
                        f"{out_root / row} (log {log})")
            codes[row] = evaluate_checkpoint(row, cfg, out_root / source, out_root / row, nproc, log)
        else:
            console.log(f"row {row}: {config} -> {out_root / row} (log {log})")
            codes[row] = run_local(config, overrides, nproc, log)
        spent = clock.stop(row, started)
        console.log(f"row {row}: {spent['wall_s']:.0f} s wall, {spent['cpu_s']:.0f} s CPU (all processes)")
        if codes[row]:
            console.log(f"[red]row {row} failed with exit code {codes[row]}; see its log")
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bgtrain.reproduce",
        description="Run the rows of one of the paper's tables and print our test mAP beside the published one.",
        epilog="examples:\n  python -m bgtrain.reproduce --table single_positive --dataset voc --shards data/voc "
               "--rows AN LL-R_BoostLU --nproc 8\n"
               "  python -m bgtrain.reproduce --table demo --shards data/demo --pretrain data/demo-pretrain --nproc 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), required=True)
    parser.add_argument("--dataset", default=None, help="configs/<dataset>/ (default: the table's own, e.g. demo)")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="config root (default configs)")
    parser.add_argument("--shards", required=True, help="shard folder (sets data.shards)")
    parser.add_argument("--pretrain", metavar="SHARDS", default=None,
                        help="first train <dataset>/pretrain.yaml on these shards and start every row from its "
                             "exported trunk (model.pretrained=<out>/pretrain/trunk.pt)")
    parser.add_argument("--rows", nargs="+", help="a subset of the table's rows")
    parser.add_argument("--out", type=Path, default=None, help="run folder root (default runs/<dataset>)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per row under torchrun (local runs)")
    parser.add_argument("--slurm", action="store_true", help="submit each trained row with sbatch instead "
                                                             "(evaluation-only rows then run here)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes per row with --slurm")
    parser.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                        help="with --slurm: GPUs each row's job asks for on every node (sbatch --gpus-per-node=N, "
                             "one process per GPU), and the rows run with device=cuda, so none trains on CPU "
                             "silently; required when a row's config has device: cuda")
    parser.add_argument("overrides", nargs="*", help="key.sub=value applied to every row, e.g. optim.epochs=1")
    args = parser.parse_args(argv)
    dataset = args.dataset or {"openimages": "openimages", "demo": "demo", "paper": "paper"}.get(args.table)
    if dataset is None:
        parser.error("--dataset is required for this table")
    rows = args.rows or TABLES[args.table]
    unknown = [r for r in rows if r not in TABLES[args.table]]
    if unknown:
        parser.error(f"rows {unknown} are not in table {args.table}: {TABLES[args.table]}")
    if args.pretrain and args.slurm:
        parser.error("--pretrain runs on this machine; with --slurm, pretrain first and pass model.pretrained=PATH")
    if args.gpus_per_node is not None and (not args.slurm or args.gpus_per_node < 1):
        parser.error("--gpus-per-node takes a count >= 1 and goes with --slurm (local rows use the GPUs they see)")
    out_root = args.out or Path("runs") / dataset
    trunk = out_root / "pretrain" / "trunk.pt" if args.pretrain else None
    # GPUs asked of Slurm are GPUs to train on: a row that lands on a node without one stops, never trains on CPU.
    overrides = ["device=cuda", *args.overrides] if args.gpus_per_node else args.overrides
    try:
        if args.pretrain:
            load_config(row_config(dataset, "pretrain", args.configs), [f"data.shards={args.pretrain}"])
        jobs = plan_rows(args.table, dataset, rows, args.shards, out_root, overrides, args.configs, trunk)
        if args.slurm:
            check_slurm_devices({r: j for r, j in jobs.items() if (args.table, r) not in EVAL_ONLY},
                                args.gpus_per_node)
    except (ConfigError, FileNotFoundError) as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2
    if args.slurm and not args.gpus_per_node:
        print("reproduce: --slurm without --gpus-per-node: the rows' jobs ask Slurm for no GPU, so they train as CPU "
              "processes on gloo unless the cluster gives GPUs by default", file=sys.stderr)
    out_root.mkdir(parents=True, exist_ok=True)
    console, clock = Console(), Stopwatch()
    if args.pretrain:
        started = clock.start()
        try:
            pretrain(dataset, args.pretrain, out_root, args.nproc, args.configs, console)
        except RuntimeError as e:
            console.log(f"[red]{e}")
            return 1
        spent = clock.stop("pretrain", started)
        console.log(f"pretraining: {spent['wall_s']:.0f} s wall, {spent['cpu_s']:.0f} s CPU (all processes)")
    codes = run_rows(args.table, jobs, out_root, args.nproc, args.slurm, args.nodes, console, clock,
                     args.gpus_per_node)
    results = collect(out_root, args.table, dataset, rows, codes, clock.times)
    table, markdown = render(results, args.table, dataset)
    console.print(table)
    if "pretrain" in clock.times:
        spent = clock.times["pretrain"]
        markdown += (f"\nEvery row started from the trunk pretrained on {args.pretrain} ({trunk}; "
                     f"{spent['wall_s']:.0f} s wall, {spent['cpu_s']:.0f} s CPU).\n")
        (out_root / "pretrain" / "time.json").write_text(json.dumps(spent))
    (out_root / f"{args.table}.md").write_text(markdown)
    (out_root / f"{args.table}.json").write_text(json.dumps(results, indent=1))
    console.log(f"wrote {out_root / f'{args.table}.md'} and .json")
    from bgtrain.report.cli import build_report  # matplotlib only once the table is done
    report = out_root / "report.html"
    build_report([out_root / row for row in rows if (out_root / row).is_dir()], report,
                 title=f"bgtrain: {args.table} / {dataset}", dataset=dataset, table=args.table)
    console.log(f"wrote {report}: curves, the table against the paper, and the CAM strip of every row")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="bgtrain.reproduce"))
