"""``python -m bgtrain.claims RUNS``: the paper's five claims, checked on ``make paper``'s runs over seeds.

``RUNS`` holds one folder per seed (``seed0``, ``seed1``, ...), each written by ``python -m bgtrain.reproduce
--table paper`` (rows ``full``, ``AN``, ``LL-R``, ``LL-R_BoostLU`` and the evaluation-only
``AN_BoostLU_inference``) and by ``python -m bgtrain.explain gap`` into ``gap/full_vs_AN`` (AN's CAMs, boosted at
alpha 5 for the inference-only statistics) and ``gap/full_vs_LL-R_BoostLU``. Every claim is a paired difference
per seed (the rows of one seed share data, trunk and head initialisation), and it **holds** when that margin is
positive in every seed; a claim whose numbers are missing is "not measured", never dropped.

1. LL-R + BoostLU beats LL-R (test mAP).
2. LL-R beats AN.
3. BoostLU at inference only lifts AN: AN's own checkpoint at alpha 5 beats it at alpha 1.
4. Full labels are the upper bound: Full beats every other row.
5. Partial labels shrink the positive attributions without moving them much, and BoostLU restores their scale.
   On (test image, positive class) pairs, raw CAMs: (a) AN's mean top-5% attribution is below Full's;
   (b) the median Spearman correlation of AN's and Full's maps is at least 0.5, the same map ranked alike;
   (c) BoostLU at alpha 5 lifts AN's mean top-5% by at least half its gap to Full's.

Writes ``claims.json``, ``claims.md``, ``curves.png`` and ``report.html`` (the claims, the rows over seeds, the
validation curves of every seed, the explanation gap, then the usual report of the first seed's runs with its CAM
strip).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROWS = {"full": "Full labels", "AN": "AN", "LL-R": "LL-R", "LL-R_BoostLU": "LL-R + BoostLU",
        "AN_BoostLU_inference": "AN + BoostLU at inference (AN's checkpoint, α 5)"}
TRAINED = ("full", "AN", "LL-R", "LL-R_BoostLU")
SPEARMAN_FLOOR = 0.5   # claim 5b: "not moved much" = the maps still rank their cells alike (median rho >= 0.5)
GAP_CLOSED = 0.5       # claim 5c: "restores the scale" = BoostLU closes at least half the top-5% gap
GAPS = {"AN": "full_vs_AN", "LL-R_BoostLU": "full_vs_LL-R_BoostLU"}


@dataclass
class Seed:
    """One seed's folder: test mAP and validation curve per row, the explanation-gap summaries, the time taken."""

    seed: str
    folder: Path
    test: dict[str, float | None] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    gaps: dict[str, dict] = field(default_factory=dict)
    wall_s: float = 0.0


def read_seed(folder: Path) -> Seed:
    """Read a seed folder; rows or gap analyses that are absent are simply left out (reported as missing later)."""
    from bgtrain.report.runs import read_run

    seed = Seed(folder.name.removeprefix("seed"), folder)
    for row in ROWS:
        results = folder / row / "results.json"
        seed.test[row] = json.loads(results.read_text())["test_map"] if results.is_file() else None
        if row in TRAINED and (folder / row / "metrics.jsonl").is_file():
            seed.curves[row] = [(int(r["epoch"]), float(r["val_map"])) for r in read_run(folder / row).val
                                if r.get("val_map") is not None and r.get("epoch") is not None]
    for row, name in GAPS.items():
        summary = folder / "gap" / name / "summary.json"
        if summary.is_file():
            seed.gaps[row] = json.loads(summary.read_text())
    # Training time from the runs' own epoch records, not from the last reproduce call: a rerun of a finished seed
    # only tests its rows again, and its wall time says nothing about their training.
    for run in ["pretrain", *TRAINED]:  # pretrain: only in the seed that pretrained the trunk the others share
        if (folder / run / "metrics.jsonl").is_file():
            seed.wall_s += sum(r.get("epoch_s") or 0.0 for r in read_run(folder / run).epochs)
    return seed


def read_trunk(seeds: Sequence[Seed]) -> dict | None:
    """The pretrained trunk's quality: validation and test mAP on its single-object set, and how often its CAMs
    point at the object (``pointing.json``, against chance), from the seed folder that pretrained it."""
    for seed in seeds:
        results = seed.folder / "pretrain" / "results.json"
        if results.is_file():
            quality = json.loads(results.read_text())
            trunk = {"folder": str(results.parent), "best_epoch": quality.get("best_epoch"),
                     "val_map": quality.get("val_map"), "test_map": quality.get("test_map")}
            pointing = results.parent / "pointing.json"
            if pointing.is_file():
                found = json.loads(pointing.read_text())
                trunk["pointing"] = {k: found.get(k) for k in ("hit_rate", "chance", "pairs", "cam_size")}
            return trunk
    return None


def find_seeds(root: Path) -> list[Seed]:
    """Every ``seed*`` folder of ``root`` that holds a reproduce table, in seed order."""
    folders = [f for f in root.glob("seed*") if f.is_dir() and f.name[4:].isdigit()]
    return [read_seed(f) for f in sorted(folders, key=lambda f: int(f.name[4:]))]


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation, min and max of the values that exist, and how many were asked for."""
    present = [v for v in values if v is not None]
    out: dict = {"values": list(values), "n": len(present), "of": len(values)}
    if present:
        out.update(mean=statistics.fmean(present), min=min(present), max=max(present),
                   std=statistics.stdev(present) if len(present) > 1 else None)
    return out


def claim(number: str, text: str, rule: str, margins: Sequence[float | None], unit: str = "mAP points") -> dict:
    """A claim from its per-seed margins: holds when every seed's margin is positive; unmeasured when any is absent."""
    stats = spread(margins)
    measured = stats["n"] == stats["of"] and stats["n"] > 0
    return {"claim": number, "text": text, "rule": rule, "unit": unit, "margin": stats,
            "holds": all(m > 0 for m in margins if m is not None) if measured else None}


def explanation_parts(seeds: Sequence[Seed]) -> list[dict]:
    """Claim 5's three parts, each per seed from the Full-vs-AN gap analysis (positives, raw CAMs)."""
    shrink: list[float | None] = []
    direction: list[float | None] = []
    restore: list[float | None] = []
    for seed in seeds:
        gap = seed.gaps.get("AN")
        if gap is None:
            for part in (shrink, direction, restore):
                part.append(None)
            continue
        pos = gap["positive"]
        full_top, an_top, an_boosted = pos["a"]["top5"]["mean"], pos["b"]["top5"]["mean"], \
            pos["b"]["top5_boosted"]["mean"]
        shrink.append(full_top - an_top)
        direction.append(pos["spearman"]["median"] - SPEARMAN_FLOOR)
        # In CAM units rather than a share of the gap: defined (and easy) when AN's top-5% is not below Full's.
        restore.append((an_boosted - an_top) - GAP_CLOSED * (full_top - an_top))
    return [claim("5a", "partial labels shrink the positive attributions",
                  "Full's mean top-5% raw CAM cell minus AN's, on positive pairs of the test split", shrink,
                  "CAM units"),
            claim("5b", "... without moving them much",
                  f"median Spearman rho of AN's and Full's raw CAMs on positive pairs, minus {SPEARMAN_FLOOR}",
                  direction, "rho"),
            claim("5c", "... and BoostLU restores their scale",
                  f"the rise of AN's mean top-5% under BoostLU at alpha 5 (inference only), minus {GAP_CLOSED} x "
                  "its gap to Full's", restore, "CAM units")]


def check_claims(seeds: Sequence[Seed]) -> list[dict]:
    """The five claims over the seeds; claim 5 holds when its three parts do."""
    def difference(s: Seed, a: str, b: str) -> float | None:
        mine, theirs = s.test.get(a), s.test.get(b)
        return None if mine is None or theirs is None else mine - theirs

    def diff(a: str, b: str) -> list[float | None]:
        return [difference(s, a, b) for s in seeds]

    def upper_bound(s: Seed) -> float | None:
        margins = [difference(s, "full", row) for row in s.test if row != "full"]
        return None if not margins or None in margins else min(m for m in margins if m is not None)

    parts = explanation_parts(seeds)
    states = [p["holds"] for p in parts]
    five = {"claim": "5", "text": "partial labels shrink the positive attributions without moving them much, and "
                                  "BoostLU restores their scale",
            "rule": "5a, 5b and 5c all hold", "unit": "", "parts": parts,
            "margin": spread([None]), "holds": None if None in states else all(states)}
    return [claim("1", "LL-R + BoostLU beats LL-R", "test mAP of LL-R + BoostLU minus LL-R",
                  diff("LL-R_BoostLU", "LL-R")),
            claim("2", "LL-R beats AN", "test mAP of LL-R minus AN", diff("LL-R", "AN")),
            claim("3", "BoostLU at inference only lifts a trained AN model",
                  "AN's checkpoint at alpha 5 minus the same checkpoint at alpha 1",
                  diff("AN_BoostLU_inference", "AN")),
            claim("4", "Full labels are the upper bound", "test mAP of Full minus the best other row",
                  [upper_bound(s) for s in seeds]),
            five]


def summarise(root: Path) -> dict:
    """Everything claims.json holds, from the seed folders under ``root``."""
    seeds = find_seeds(root)
    if not seeds:
        raise FileNotFoundError(f"{root}: no seed0, seed1, ... folders (run make paper first)")
    rows = {row: spread([s.test.get(row) for s in seeds]) for row in ROWS}
    claims = check_claims(seeds)
    missing = [f"{s.folder / row}: no results.json" for s in seeds for row in ROWS if s.test.get(row) is None]
    missing += [f"{s.folder / 'gap' / GAPS[row]}: no summary.json" for s in seeds for row in GAPS
                if row not in s.gaps]
    gaps = {row: [s.gaps.get(row) for s in seeds] for row in GAPS}
    trunk = read_trunk(seeds)
    if trunk is None:
        missing.append(f"{root}: no seed folder holds pretrain/results.json (the trunk's quality is not shown)")
    return {"seeds": [s.seed for s in seeds], "labels": ROWS, "rows": rows, "claims": claims, "missing": missing,
            "explanation": explanation_table(gaps), "trunk": trunk,
            "wall_s": {"per_seed": [round(s.wall_s, 1) for s in seeds],
                       "total": round(sum(s.wall_s for s in seeds), 1)},
            "curves": {s.seed: s.curves for s in seeds}}


def explanation_table(gaps: dict[str, list[dict | None]]) -> dict[str, dict]:
    """Per compared model (AN, LL-R + BoostLU): the gap statistics on positives, each over seeds."""
    def stat(summaries: list[dict | None], *path: str) -> dict:
        values: list[float | None] = []
        for s in summaries:
            node = s["positive"] if s else None
            for key in path:
                node = None if node is None else node[key]
            values.append(node)
        return spread(values)

    return {row: {"spearman_median": stat(s, "spearman", "median"), "top5_full": stat(s, "a", "top5", "mean"),
                  "top5": stat(s, "b", "top5", "mean"), "top5_boosted": stat(s, "b", "top5_boosted", "mean"),
                  "lower_than_full": stat(s, "top5_b_lower_fraction"),
                  "lower_than_full_boosted": stat(s, "top5_boosted_b_lower_fraction")}
            for row, s in gaps.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bgtrain.claims", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python -m bgtrain.claims runs/paper   (after make paper)")
    parser.add_argument("root", type=Path, help="folder of the seed folders (runs/paper)")
    parser.add_argument("--cam-images", type=int, default=4, help="validation images in the report's CAM strip")
    args = parser.parse_args(argv)
    summary = summarise(args.root)
    from bgtrain.report.paper_page import markdown, write_paper_report  # matplotlib only after the numbers
    text = markdown(summary)
    (args.root / "claims.json").write_text(json.dumps(summary, indent=1))
    (args.root / "claims.md").write_text(text)
    report = write_paper_report(args.root, summary, args.cam_images)
    print(text)
    for line in summary["missing"]:
        print(f"missing: {line}", file=sys.stderr)
    print(f"wrote {args.root / 'claims.json'}, {args.root / 'claims.md'} and {report}")
    return 0


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="bgtrain.claims"))
