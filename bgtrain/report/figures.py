"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes."""
from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: a report is often built over ssh or in CI, with no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bgtrain.report.runs import Run, ll_schedule  # noqa: E402

DPI = 90


def colour(i: int) -> str:
    """The i-th run's colour, the same in every figure."""
    return f"C{i % 10}"


def to_png(fig) -> bytes:
    """Render and close a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def series(records: Sequence[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of the records that have both keys."""
    pairs = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


Points = Callable[[Run], tuple[list[float], list[float]]]


def line_panels(runs: Sequence[Run], panels: Sequence[tuple[str, str, str, Points, str]], height: float = 3.6):
    """A row of line plots (title, x label, y label, points of a run, line style), one colour per run."""
    fig, axes = plt.subplots(1, len(panels), figsize=(11, height), squeeze=False)
    for ax, (title, xlabel, ylabel, points, style) in zip(axes[0], panels):
        for i, run in enumerate(runs):
            xs, ys = points(run)
            if xs:
                ax.plot(xs, ys, style, color=colour(i), label=run.name, linewidth=1.2)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def curves(runs: Sequence[Run]) -> bytes | None:
    """Train loss per logged step and validation mAP per epoch, one colour per run."""
    if not any(r.train or r.val for r in runs):
        return None
    fig = line_panels(runs, [("train loss (logged steps)", "step", "loss",
                              lambda run: series(run.train, "step", "loss"), "-"),
                             ("validation mAP", "epoch", "mAP (%)", lambda run: series(run.val, "epoch", "val_map"),
                              "o-")])
    fig.axes[1].xaxis.get_major_locator().set_params(integer=True)
    return to_png(fig)


def wait_share(run: Run) -> tuple[list[float], list[float]]:
    """(steps, % of the step spent waiting for data): step_s includes the wait, so this is at most 100."""
    timed = [r for r in run.train if r.get("step_s") and r.get("data_s") is not None]
    return [r["step"] for r in timed], [100 * r["data_s"] / r["step_s"] for r in timed]


def per_epoch_mean(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """Mean of ``key`` over each epoch's logged train steps."""
    by_epoch: dict[int, list[float]] = {}
    for r in records:
        if r.get("epoch") is not None and r.get(key) is not None:
            by_epoch.setdefault(int(r["epoch"]), []).append(float(r[key]))
    epochs = sorted(by_epoch)
    return epochs, [float(np.mean(by_epoch[e])) for e in epochs]


def selection(runs: Sequence[Run]) -> bytes | None:
    """Large-loss runs: entries selected per batch (epoch mean of logged steps) against the scheme's k per batch."""
    drawn = [(i, run, schedule) for i, run in enumerate(runs) if (schedule := ll_schedule(run)) is not None]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for i, run, (epochs, ks) in drawn:
        ax.plot(epochs, ks, "x--", color=colour(i), alpha=0.8,
                label=f"{run.name}: k per batch ({run.scheme})")
        observed_epochs, selected = per_epoch_mean(run.train, "selected")
        if observed_epochs:
            ax.plot(observed_epochs, selected, "o", color=colour(i), markersize=7,
                    label=f"{run.name}: selected (mean per logged step)")
    ax.set(title="large-loss selection per batch: measured vs the scheme's k = ceil(B·C·Δ·(epoch-1)) "
                 "(LL-Cp: ceil(B·C·Δ)); rank 0's batch",
           xlabel="epoch", ylabel="entries per batch")
    # the default locator is an AutoLocator, a MaxNLocator, which takes integer= (the base Locator's stub does not)
    ax.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_png(fig)


def throughput(runs: Sequence[Run]) -> bytes | None:
    """Images per second and the share of each step spent waiting for data, per logged step."""
    if not any(r.train for r in runs):
        return None
    fig = line_panels(runs, [("throughput (all ranks)", "step", "images / s",
                              lambda run: series(run.train, "step", "img_s"), "-"),
                             ("data wait (share of step time)", "step", "%", wait_share, "-")], height=3.4)
    fig.axes[1].set_ylim(0, 100)
    return to_png(fig)


TIME_PARTS = (("startup_s", "start-up"), ("data_s", "data wait"), ("steps_s", "steps"),
              ("validation_s", "validation"), ("checkpoint_s", "checkpoint stall"), ("other_s", "other"))


def epoch_time(runs: Sequence[Run]) -> bytes | None:
    """Where each epoch's wall time went on rank 0, one stacked bar per (run, epoch)."""
    found = [(run, e) for run in runs for e in run.epochs]
    if not found:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.6))
    labels = [f"{run.name}\nepoch {e['epoch']}" if len(runs) > 1 else f"epoch {e['epoch']}" for run, e in found]
    bottom = np.zeros(len(found))
    for k, (key, name) in enumerate(TIME_PARTS):
        values = np.array([max(0.0, float(e.get(key) or 0.0)) for _, e in found])
        ax.bar(range(len(found)), values, bottom=bottom, color=colour(k), label=name)
        bottom += values
    ax.set_xticks(range(len(found)), labels, fontsize=7)
    ax.set(title="where each epoch's time went (rank 0)", ylabel="seconds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=len(TIME_PARTS))
    return to_png(fig)


def group_bars(runs: Sequence[Run]) -> bytes | None:
    """Group-wise mAP bars (G1 rarest), one bar per run in each group."""
    found = [(i, run, g) for i, run in enumerate(runs) if (g := run.groups()) is not None]
    if not found:
        return None
    names = sorted({group["group"] for _, _, (_, groups) in found for group in groups},
                   key=lambda n: (len(n), n))
    width = 0.8 / len(found)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for j, (i, run, (source, groups)) in enumerate(found):
        values = {g["group"]: g.get("map") for g in groups}
        xs = [k + j * width for k, n in enumerate(names) if values.get(n) is not None]
        ys = [v for n in names if (v := values.get(n)) is not None]
        ax.bar(xs, ys, width=width, color=colour(i), label=f"{run.name} ({source})")
    ax.set_xticks([k + width * (len(found) - 1) / 2 for k in range(len(names))], names)
    ax.set(title="group-wise mAP (G1: rarest classes)", ylabel="mAP (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return to_png(fig)


def image_grid(cells: Sequence[Sequence[np.ndarray | None]], row_labels: Sequence[str],
               column_labels: Sequence[str]) -> bytes:
    """A grid of uint8 images (None: an empty cell), with a label per row and per column."""
    rows, cols = len(cells), max(len(row) for row in cells)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1.2, 2.6 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            image = cells[r][c] if c < len(cells[r]) else None
            if image is not None:
                ax.imshow(image)
            else:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes, color="grey")
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
            if r == 0:
                ax.set_title(column_labels[c], fontsize=9)
    fig.tight_layout()
    return to_png(fig)
