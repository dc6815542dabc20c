"""``python -m bgtrain.report RUN_DIR [RUN_DIR ...] --out report.html``: one HTML file that compares runs.

Loss and validation-mAP curves, the large-loss selection per epoch against the scheme's k, throughput and data wait,
a table of test mAP beside the paper's, group-wise mAP, and a CAM strip (the same validation images under each
run's best model). It only reads the run folders (and the validation shards named in their config, for the strip),
works on finished and on running runs, and lists what it could not show, in the page and on stderr.

    python -m bgtrain.report runs/demo/AN runs/demo/LL-R runs/demo/LL-R_BoostLU --out runs/demo/report.html
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bgtrain.report import figures, page
from bgtrain.report.runs import Run, alpha_text, dataset_of, paper_number, read_run


@dataclass
class Report:
    """What :func:`build_report` wrote: the file, the runs, the table rows, and everything found missing."""

    path: Path
    runs: list[Run]
    rows: list[dict]
    missing: list[str] = field(default_factory=list)


def table_rows(runs: Sequence[Run], dataset: str | None, table: str | None) -> list[dict]:
    """One row per run: test mAP (of the epoch selected on val), the paper's number when it is a paper row."""
    rows = []
    for run in runs:
        test = run.test or {}
        ours = test.get("test_map")
        paper = paper_number(run, dataset or dataset_of(run), table)
        best_val = max((r["val_map"] for r in run.val if r.get("val_map") is not None), default=None)
        rows.append({"name": run.name, "scheme": run.scheme, "status": run.status,
                     "best_epoch": test.get("best_epoch"), "val_map": test.get("val_map", best_val),
                     "test_map": ours, "paper": paper,
                     "diff": None if ours is None or paper is None else ours - paper})
    return rows


def evaluation_notes(runs: Sequence[Run]) -> list[str]:
    """One sentence per evaluation-only row: why it has no curves and whose best epoch and val mAP it shows."""
    notes = []
    for run in runs:
        if run.evaluates is None:
            continue
        test = run.test or {}
        notes.append(f"{run.name} trains nothing: the best checkpoint of {run.source}, selected on validation at "
                     f"alpha {alpha_text(test.get('selected_at_alpha'))}, evaluated on test at alpha "
                     f"{alpha_text(test.get('alpha_eval'))} (best epoch and val mAP are {run.source}'s).")
    return notes


def build_figures(runs: Sequence[Run], cam_images: int, device: torch.device) -> tuple[list[page.Figure], list[str]]:
    """Every figure of the report, and notes on what could not be drawn."""
    missing: list[str] = []
    out = [page.Figure("Loss and validation mAP", figures.curves(runs),
                       "" if any(r.train for r in runs) else "No train lines in any metrics.jsonl yet."),
           page.Figure("Large-loss selection per epoch", figures.selection(runs),
                       "Dots: entries selected (rejected or corrected) per batch on rank 0, averaged over the "
                       "epoch's logged steps; dashed: the scheme's k per batch from the run's config. Ties at the "
                       "k-th loss can add entries; a short last batch has a smaller k."
                       if any(r.scheme in ("LL-R", "LL-Ct", "LL-Cp") and r.evaluates is None for r in runs)
                       else "No large-loss run (LL-R, LL-Ct, LL-Cp) among these."),
           page.Figure("Throughput", figures.throughput(runs),
                       "Images per second over all ranks, and the share of each step spent waiting for the loader."),
           page.Figure("Where the time went", figures.epoch_time(runs),
                       "Each epoch's wall time on rank 0: start-up (first epoch of an attempt), waiting for data, "
                       "steps, validation, the checkpoint stall (the copy to host memory; writing is in the "
                       "background) and the rest (epoch-end collectives, logging)."
                       if any(r.epochs for r in runs) else "No epoch lines in any metrics.jsonl yet.")]
    out.append(page.Figure("Group-wise mAP", figures.group_bars(runs),
                           "" if any(r.groups() for r in runs) else "No run was evaluated with eval.groups > 0."))
    if cam_images > 0:
        from bgtrain.report.cams import cam_strip
        cells, row_labels, column_labels, notes = cam_strip(runs, cam_images, device)
        missing += notes
        png = figures.image_grid(cells, row_labels, column_labels) if cells else None
        out.append(page.Figure("CAMs: the same images under each run's best model", png,
                               "Each column: one validation image and one class it has (+ = positive label); each "
                               "row: that class's boosted CAM under the run's best checkpoint at its evaluation alpha, "
                               "with the score p. Colours are min-max scaled per map."
                               if cells else "No CAM strip: " + "; ".join(notes)))
    return out, missing


def build_report(run_dirs: Sequence[str | Path], out: str | Path, title: str | None = None,
                 dataset: str | None = None, table: str | None = None, cam_images: int = 4,
                 device: str | torch.device = "cpu", lead: Sequence[page.Section] = (),
                 missing: Sequence[str] = ()) -> Report:
    """Read the run folders and write the HTML report; raises FileNotFoundError when a folder does not exist.

    ``lead`` sections go before the runs table; ``missing`` adds what the caller found missing to the page's list.
    """
    runs = [read_run(folder) for folder in run_dirs]
    missing = [*missing, *(m for run in runs for m in run.missing)]
    figure_list, more = build_figures(runs, cam_images, torch.device(device))
    missing += more
    rows = table_rows(runs, dataset, table)
    datasets = {dataset or dataset_of(run) for run in runs}
    note = ("Paper: test mAP published in Kim et al., CVPR 2023, for the row named like the run on dataset "
            f"{', '.join(sorted(str(d) for d in datasets))}; – where the paper has no such row."
            + "".join(f" {line}" for line in evaluation_notes(runs)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    html = page.render(title or f"bgtrain report: {', '.join(r.name for r in runs)}",
                       [(r.name, str(r.folder)) for r in runs], rows, figure_list, missing, note, lead)
    out.write_text(html)
    return Report(out, runs, rows, missing)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bgtrain.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m bgtrain.report runs/demo/AN runs/demo/LL-R runs/demo/LL-R_BoostLU "
               "--out runs/demo/report.html\n  python -m bgtrain.report runs/voc/LL-R_BoostLU --dataset voc "
               "--cam-images 0 --out voc.html")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (out_dir of bgtrain.train)")
    parser.add_argument("--out", required=True, help="the HTML file to write")
    parser.add_argument("--title", default=None, help="page title (default: the run names)")
    parser.add_argument("--dataset", default=None,
                        help="dataset of the paper numbers (default: the 'dataset' of each run's shard manifest)")
    parser.add_argument("--table", default=None,
                        choices=["single_positive", "inference_only", "openimages", "demo", "paper"],
                        help="paper table of the rows (default: guessed from the dataset and row name; demo and "
                             "paper have no published numbers)")
    parser.add_argument("--cam-images", type=int, default=4, help="validation images in the CAM strip; 0 = none")
    parser.add_argument("--device", default="cpu", help="device for the CAM strip's models (default cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cam_images < 0:
        print("error: --cam-images must be >= 0", file=sys.stderr)
        return 2
    try:
        report = build_report(args.runs, args.out, args.title, args.dataset, args.table, args.cam_images,
                              args.device)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report.missing:
        print(f"missing: {line}", file=sys.stderr)
    print(f"wrote {report.path} ({len(report.runs)} runs, {len(report.missing)} things missing)")
    return 0
