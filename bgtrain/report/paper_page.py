"""``runs/paper/report.html``: the claims over seeds first, then the usual report of the first seed's runs.

The lead sections are built from :func:`bgtrain.claims.summarise`'s summary only (no run is read twice): the
claims with their verdicts and margins, the rows' test mAP over seeds, every seed's validation curve of the four
fine-tuned rows, and the explanation-gap statistics. The rest is :func:`bgtrain.report.cli.build_report` over
the first seed's row folders (curves, large-loss selection, time, the CAM strip).
"""
from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

import numpy as np

from bgtrain.report import figures, page


def plus_minus(stats: dict, digits: int = 2) -> str:
    """``mean ± std`` (``mean`` alone for one seed, ``–`` for none, with the count when some are missing)."""
    if not stats.get("n"):
        return "–"
    text = f"{stats['mean']:.{digits}f}" + (f" ± {stats['std']:.{digits}f}" if stats.get("std") is not None else "")
    return text + (f" ({stats['n']} of {stats['of']} seeds)" if stats["n"] < stats["of"] else "")


def verdict(holds: bool | None) -> str:
    return "not measured" if holds is None else "holds" if holds else "does not hold"


def margin_text(c: dict) -> str:
    if "parts" in c:
        return "; ".join(f"{p['claim']}: {plus_minus(p['margin'])}" for p in c["parts"])
    return plus_minus(c["margin"])


def markdown(summary: dict) -> str:
    """The rows over seeds and the claims table as Markdown (claims.md, docs/results.md)."""
    rows, claims, labels = summary["rows"], summary["claims"], summary["labels"]
    names = ", ".join(summary["seeds"])
    lines = [f"Test mAP over seeds {names} (mean ± sample std over seeds, then each seed's value):", "",
             "| row | test mAP | per seed | min – max |", "|---|---|---|---|"]
    for row, stats in rows.items():
        per_seed = ", ".join("–" if v is None else f"{v:.2f}" for v in stats["values"])
        extent = f"{stats['min']:.2f} – {stats['max']:.2f}" if stats["n"] else "–"
        lines.append(f"| {labels[row]} | {plus_minus(stats)} | {per_seed} | {extent} |")
    lines += ["", "| claim | verdict | margin (mean ± std over seeds) | rule |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['claim']}. {c['text']} | **{verdict(c['holds'])}** | {margin_text(c)} | {c['rule']} |")
        for p in c.get("parts", []):
            lines.append(f"| {p['claim']}. {p['text']} | {verdict(p['holds'])} | {plus_minus(p['margin'])} "
                         f"({p['unit']}) | {p['rule']} |")
    return "\n".join(lines) + "\n"


def html_table(head: Sequence[str], rows: Sequence[Sequence[str]], text: Sequence[int] = ()) -> str:
    """A plain table of escaped cells: numbers right-aligned, the first column and the ``text`` columns left."""
    def cell(tag: str, i: int, value: str) -> str:
        return f'<{tag} class="text">{escape(value)}</{tag}>' if i in text else f"<{tag}>{escape(value)}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    out += ["<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows]
    return "\n".join(out + ["</table>"])


def claims_section(summary: dict) -> str:
    rows = []
    for c in summary["claims"]:
        rows.append([f"{c['claim']}. {c['text']}", verdict(c["holds"]), margin_text(c), c["rule"]])
        rows += [[f"   {p['claim']}. {p['text']}", verdict(p["holds"]), f"{plus_minus(p['margin'])} ({p['unit']})",
                  p["rule"]] for p in c.get("parts", [])]
    seeds = ", ".join(summary["seeds"])
    return (f"<p>Seeds {escape(seeds)}. A claim holds when its margin is positive in every seed; margins are mean ± "
            "sample std over seeds (one seed: no spread).</p>"
            + html_table(["claim", "verdict", "margin", "rule"], rows, text=(1, 3)))


def rows_section(summary: dict) -> str:
    rows = [[summary["labels"][row], plus_minus(s), ", ".join("–" if v is None else f"{v:.2f}" for v in s["values"]),
             f"{s['min']:.2f} – {s['max']:.2f}" if s["n"] else "–"] for row, s in summary["rows"].items()]
    wall, trunk = summary["wall_s"], summary.get("trunk")
    quality = "" if trunk is None else (
        f"Every row starts from one trunk pretrained on single-object images: validation mAP {trunk['val_map']:.2f} "
        f"(test {trunk['test_map']:.2f}) at epoch {trunk['best_epoch']}"
        + (f"; its CAMs point at the object in {trunk['pointing']['hit_rate']:.1f}% of "
           f"{trunk['pointing']['pairs']} test images (chance {trunk['pointing']['chance']:.1f}%)"
           if trunk.get("pointing") else "") + ". ")
    minutes = ", ".join(f"{w / 60:.1f}" for w in wall["per_seed"])
    return (html_table(["row", "test mAP (mean ± std)", "per seed", "min – max"], rows)
            + f'<p class="note">{escape(quality)}Training time (the epochs of the runs, from their metrics.jsonl): '
              f'{minutes} min per seed ({wall["total"] / 60:.1f} min in all; the first seed includes pretraining the '
              "trunk).</p>")


def explanation_section(summary: dict) -> str:
    names = {"AN": "AN (boosted: α 5 at inference only)", "LL-R_BoostLU": "LL-R + BoostLU (boosted: its α 5)"}
    rows = [[names[row], plus_minus(t["spearman_median"]), plus_minus(t["top5_full"]), plus_minus(t["top5"]),
             plus_minus(t["top5_boosted"]), plus_minus(t["lower_than_full"]), plus_minus(t["lower_than_full_boosted"])]
            for row, t in summary["explanation"].items()]
    return ("<p>Positive (test image, class) pairs, raw CAMs against the Full-label model's (python -m bgtrain.explain "
            "gap); each cell mean ± std over seeds.</p>"
            + html_table(["model", "median Spearman ρ", "top-5% Full", "top-5% raw", "top-5% boosted",
                          "share below Full (raw)", "share below Full (boosted)"], rows))


def seed_curves(curves: dict[str, dict[str, list]], labels: dict[str, str]) -> bytes | None:
    """Validation mAP per epoch of the fine-tuned rows: a thin line per seed, the mean over seeds thick."""
    if not any(curves.values()):
        return None
    fig, ax = figures.plt.subplots(figsize=(9, 4.2))
    trained = [row for row in labels if any(c.get(row) for c in curves.values())]
    for i, row in enumerate(trained):
        per_seed = [dict(c[row]) for c in curves.values() if c.get(row)]
        for points in per_seed:
            ax.plot(list(points), list(points.values()), color=figures.colour(i), alpha=0.35, linewidth=0.8)
        epochs = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
        if epochs:
            mean = [float(np.mean([p[e] for p in per_seed])) for e in epochs]
            ax.plot(epochs, mean, color=figures.colour(i), linewidth=2.2,
                    label=f"{labels[row]} (mean of {len(per_seed)} seeds)")
    ax.set(xlabel="epoch", ylabel="validation mAP", title="validation mAP per epoch, every seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figures.to_png(fig)


def write_paper_report(root: Path, summary: dict, cam_images: int = 4) -> Path:
    """Write ``root/report.html`` (and ``root/curves.png``): the claims, then the first seed's runs as usual."""
    from bgtrain.report.cli import build_report

    curves = seed_curves(summary["curves"], summary["labels"])
    if curves:
        (root / "curves.png").write_bytes(curves)  # the same figure as a file, for docs and slides
    lead = [page.Section("The paper's claims", claims_section(summary)),
            page.Section("Test mAP over seeds", rows_section(summary)),
            page.Section("Validation curves", page.embedded(curves) if curves else "<p>No validation lines yet.</p>"),
            page.Section("The explanation gap", explanation_section(summary))]
    first = root / f"seed{summary['seeds'][0]}"
    out = root / "report.html"
    build_report([first / row for row in summary["labels"] if (first / row).is_dir()], out,
                 title="bgtrain: make paper, the paper's claims on synthetic data", dataset="paper", table="paper",
                 cam_images=cam_images, lead=lead, missing=summary["missing"])
    return out
