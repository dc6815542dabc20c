"""The report's HTML: one self-contained file (PNGs embedded as base64, inline CSS, no scripts)."""
from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 9px; text-align: right; }
th { background: #f3f3f3; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
.missing { background: #fff6da; border: 1px solid #e5c158; padding: 8px 14px; }
.missing li { font-family: ui-monospace, monospace; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
img { max-width: 100%; }
"""


@dataclass
class Figure:
    """One section: a title, a PNG (None when it cannot be drawn) and a sentence saying what it shows or lacks."""

    title: str
    png: bytes | None
    note: str = ""


@dataclass
class Section:
    """A section of ready HTML placed before the runs table (``make paper``'s claims, for instance)."""

    title: str
    html: str


def embedded(png: bytes) -> str:
    """An ``<img>`` holding the PNG itself (data URI), so the report is one file."""
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def table(rows: Sequence[dict]) -> str:
    """The runs table: row dicts with name, scheme, status, best_epoch, val_map, test_map, paper, diff."""
    head = ["run", "scheme", "status", "best epoch", "val mAP", "test mAP", "paper", "diff"]
    text = {"scheme", "status"}
    out = ["<table>", "<tr>" + "".join(f'<th class="text">{h}</th>' if h in text else f"<th>{h}</th>"
                                       for h in head) + "</tr>"]
    for r in rows:
        cells = [f"<td>{escape(r['name'])}</td>", f'<td class="text">{escape(str(r.get("scheme") or "–"))}</td>',
                 f'<td class="text">{escape(r["status"])}</td>',
                 f"<td>{escape(str(r['best_epoch'])) if r.get('best_epoch') is not None else '–'}</td>",
                 f"<td>{number(r.get('val_map'))}</td>", f"<td>{number(r.get('test_map'))}</td>",
                 f"<td>{number(r.get('paper'))}</td>", f"<td>{number(r.get('diff'), signed=True)}</td>"]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render(title: str, runs: Sequence[tuple[str, str]], rows: Sequence[dict], figures: Sequence[Figure],
           missing: Sequence[str], table_note: str = "", lead: Sequence[Section] = ()) -> str:
    """The whole page: runs (name, folder), what is missing, the lead sections, the table, then the figures."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>",
             "<p>" + " · ".join(f"<b>{escape(name)}</b> <span class=note>{escape(folder)}</span>"
                                for name, folder in runs) + "</p>"]
    if missing:
        parts.append('<div class="missing"><b>Missing</b> (the report shows everything else):<ul>'
                     + "".join(f"<li>{escape(m)}</li>" for m in missing) + "</ul></div>")
    for section in lead:
        parts += [f"<h2>{escape(section.title)}</h2>", section.html]
    parts += ["<h2>Runs</h2>", table(rows)]
    if table_note:
        parts.append(f'<p class="note">{escape(table_note)}</p>')
    for figure in figures:
        parts.append(f"<h2>{escape(figure.title)}</h2>")
        if figure.note:
            parts.append(f'<p class="note">{escape(figure.note)}</p>')
        if figure.png is not None:
            parts.append(embedded(figure.png))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
