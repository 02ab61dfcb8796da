"""Training curves from ``metrics.json``: read the file, draw the losses, LR, timing and
evaluation metrics of one or several runs into one PNG.

:func:`load_metrics` reads the JSON lines a :class:`~d2engine.utils.events.JSONWriter` wrote.
A resumed run appends to the file and may repeat iterations that were logged before a crash; the
later lines win, so a curve never zig-zags back in time. :func:`plot_metrics` draws the panels
with matplotlib's Agg canvas (no display, no pyplot state); ``d2engine-plot``
(:mod:`d2engine.tools.plot`) is its command line. matplotlib is the optional ``plot`` extra:
``pip install 'd2engine[plot]'``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import math
import os
from collections.abc import Sequence

__all__ = [
    "MissingPlotExtraError",
    "default_panels",
    "figure_size",
    "load_metrics",
    "plot_metrics",
    "plotting_available",
]

Series = dict[str, list[tuple[int, float]]]
"""Metric name -> (iteration, value) points sorted by iteration."""

_HIDDEN = frozenset({"eta_seconds", "rank_data_time", "iteration"})
"""Logged for the console or per rank; left out of the default panels."""

_PANEL_WIDTH_IN = 4.8
_PANEL_HEIGHT_IN = 3.2
_LEGEND_HEIGHT_IN = 0.5
_MAX_COLUMNS = 3


class MissingPlotExtraError(ImportError):
    """matplotlib, the ``plot`` extra, is not installed."""


def plotting_available() -> bool:
    """Whether matplotlib (the ``plot`` extra) can be imported."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _metrics_path(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    return os.path.join(path, "metrics.json") if os.path.isdir(path) else path


def load_metrics(path: str | os.PathLike[str]) -> Series:
    """Read a ``metrics.json`` (JSON lines with an ``"iteration"`` key) into curves.

    The lines are read in order. A line whose iteration is below one read before starts a
    resumed run's part: the points of earlier parts at or after that iteration are dropped, and
    within a part a repeated iteration keeps its last value. So every curve is a function of the
    iteration, as the run that finished last logged it. Lines that are not JSON objects with an
    integer iteration (e.g. a line cut short by a crash) and values that are not finite numbers
    are skipped.

    Args:
        path: the file, or a directory holding ``metrics.json``.

    Returns:
        name -> (iteration, value) points sorted by iteration.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    file = _metrics_path(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"No metrics file at {file}. HINT: give an OUTPUT_DIR of a training run (its "
            "metrics.json is written by the JSONWriter, the 'json' writer of OUTPUT.WRITERS) or "
            "the path of a metrics.json."
        )
    curves: dict[str, dict[int, float]] = {}
    highest = -1
    with open(file, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            it = record.get("iteration")
            if isinstance(it, bool) or not isinstance(it, int):
                continue
            if it < highest:  # a resumed run: what was logged from `it` on is superseded
                for points in curves.values():
                    for stale in [i for i in points if i >= it]:
                        del points[stale]
            highest = it
            for name, value in record.items():
                if name == "iteration" or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    curves.setdefault(name, {})[it] = float(value)
    return {name: sorted(points.items()) for name, points in curves.items() if points}


def default_panels(names: Sequence[str] | set[str]) -> list[list[str]]:
    """The panels drawn by default: which metrics share one plot, in order.

    ``total_loss``; each other metric whose name contains "loss"; ``lr``; ``time`` with
    ``data_time``; then every other metric (evaluation results, ...) alone, by name.
    ``eta_seconds`` and ``rank_data_time`` are left out.

    Args:
        names: the metric names available.

    Returns:
        A list of panels, each a list of metric names.
    """
    names = set(names) - _HIDDEN
    panels: list[list[str]] = []
    if "total_loss" in names:
        panels.append(["total_loss"])
    panels += [[n] for n in sorted(names) if "loss" in n and n != "total_loss"]
    if "lr" in names:
        panels.append(["lr"])
    timing: list[str] = [n for n in ("time", "data_time") if n in names]
    if timing:
        panels.append(timing)
    used = {n for panel in panels for n in panel}
    panels += [[n] for n in sorted(names - used)]
    return panels


def _select_panels(names: set[str], patterns: Sequence[str]) -> list[list[str]]:
    panels: list[list[str]] = []
    for pattern in patterns:
        matched = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
        if not matched:
            raise ValueError(
                f"--metrics {pattern!r} matches none of the metrics: {sorted(names)}. HINT: give "
                "names or shell patterns (e.g. 'loss_*', 'accuracy/*') of logged metrics."
            )
        panels += [[n] for n in matched if [n] not in panels]
    return panels


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased for the first points (TensorBoard's smoothing)."""
    out, last = [], 0.0
    for k, v in enumerate(values, start=1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**k))
    return out


def _run_labels(paths: Sequence[str]) -> list[str]:
    dirs = [os.path.normpath(os.path.dirname(p) if os.path.isfile(p) else p) or "." for p in paths]
    short = [os.path.basename(os.path.abspath(d)) for d in dirs]
    return short if len(set(short)) == len(short) else dirs


def _columns(num_panels: int) -> int:
    """Panels a row: 2 for 2 or 4 panels (a square grid), else up to 3."""
    return 2 if num_panels in (2, 4) else min(_MAX_COLUMNS, max(num_panels, 1))


def _panel_title(panel: Sequence[str]) -> str:
    """A panel's title: its metric, or ``"a (solid), b (dashed)"`` for two."""
    return panel[0] if len(panel) == 1 else f"{panel[0]} (solid), {panel[1]} (dashed)"


def figure_size(num_panels: int, dpi: int = 100) -> tuple[int, int]:
    """The size in pixels of the PNG that :func:`plot_metrics` draws with ``num_panels`` panels.

    Panels are 4.8 x 3.2 inches, 3 a row (2 for 2 or 4 panels), under a 0.5-inch legend.
    """
    cols = _columns(num_panels)
    rows = math.ceil(max(num_panels, 1) / cols)
    width_in = cols * _PANEL_WIDTH_IN
    height_in = rows * _PANEL_HEIGHT_IN + _LEGEND_HEIGHT_IN
    return round(width_in * dpi), round(height_in * dpi)


def plot_metrics(
    runs: Sequence[str | os.PathLike[str]],
    out_file: str | os.PathLike[str],
    metrics: Sequence[str] | None = None,
    *,
    labels: Sequence[str] | None = None,
    smoothing: float = 0.6,
    dpi: int = 100,
) -> str:
    """Draw the curves of one or several runs into one PNG, one panel per metric.

    Each run gets a colour, named in the legend at the top. Loss panels show the logged values
    faintly and their exponential moving average (weight ``smoothing``) in full; ``time`` and
    ``data_time`` share a panel (solid and dashed); curves with few points (evaluations) mark
    each point; a loss falling over two decades gets a log axis. The PNG is :func:`figure_size`
    pixels and replaced atomically.

    Args:
        runs: output directories (holding ``metrics.json``) or metrics files.
        out_file: the PNG to write (parent directories are created).
        metrics: names or shell patterns (``fnmatch``: ``"loss_*"``) of the metrics to draw, one
            panel each, in this order; None draws :func:`default_panels`.
        labels: the runs' names in the legend; default their directory names.
        smoothing: the moving average's weight in [0, 1); 0 draws the logged values only.
        dpi: pixels per inch.

    Returns:
        The path written.

    Raises:
        MissingPlotExtraError: matplotlib is not installed.
        FileNotFoundError: a run has no metrics file.
        ValueError: no run has a metric to draw, a pattern matches nothing, ``labels`` does
            not match ``runs``, or ``smoothing`` is outside [0, 1).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional: the plot extra
        from matplotlib.figure import Figure  # optional: the plot extra
    except ImportError as e:
        raise MissingPlotExtraError(
            "Plotting needs matplotlib, which is not installed. HINT: pip install "
            "'d2engine[plot]' (or pip install matplotlib)."
        ) from e
    if not runs:
        raise ValueError("plot_metrics needs at least one run (an OUTPUT_DIR or metrics.json).")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}.")
    paths = [_metrics_path(r) for r in runs]
    if labels is None:
        labels = _run_labels([os.fspath(r) for r in runs])
    elif len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs: give one label per run.")
    data = [load_metrics(p) for p in paths]
    names = {n for curves in data for n in curves}
    panels = _select_panels(names, metrics) if metrics else default_panels(names)
    if not panels:
        raise ValueError(
            f"Nothing to plot: {', '.join(paths)} hold no numeric metrics besides "
            f"{sorted(names) or 'none'}. HINT: train for at least one writer period (20 "
            "iterations by default) first."
        )

    width_px, height_px = figure_size(len(panels), dpi)
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    cols = _columns(len(panels))
    rows = math.ceil(len(panels) / cols)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    dense = [max((len(points) for points in curves.values()), default=0) for curves in data]
    run_handles: list = [None] * len(data)
    for ax, panel in zip(axes, panels):
        is_loss = all("loss" in n for n in panel)
        drawn: list[float] = []
        for r, curves in enumerate(data):
            color = f"C{r % 10}"
            for k, name in enumerate(panel):
                points = curves.get(name)
                if not points:
                    continue
                xs = [p[0] for p in points]
                ys = [p[1] for p in points]
                drawn += ys
                style = "-" if k == 0 else "--"
                if is_loss and smoothing > 0 and len(points) > 2:
                    ax.plot(xs, ys, style, color=color, alpha=0.3, linewidth=1)
                    ys = _smooth(ys, smoothing)
                sparse = 2 * len(points) <= dense[r]  # e.g. evaluations among training metrics
                (line,) = ax.plot(
                    xs,
                    ys,
                    style,
                    color=color,
                    linewidth=1.6,
                    marker="o" if sparse else None,
                    markersize=4,
                )
                if run_handles[r] is None:
                    run_handles[r] = line
        title = _panel_title(panel)
        if is_loss and smoothing > 0:
            title += f"  [EMA {smoothing:g}]"
        if is_loss and drawn and min(drawn) > 0 and max(drawn) >= 100 * min(drawn):
            ax.set_yscale("log")  # losses falling over decades: a log axis shows the late part
            title += "  (log)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    for r, handle in enumerate(run_handles):
        if handle is None:  # a run with none of the drawn metrics still gets its colour
            (run_handles[r],) = axes[0].plot([], [], color=f"C{r % 10}")
    fig.legend(
        run_handles,
        list(labels),
        loc="outside upper center",
        ncol=min(len(labels), 4),
        frameon=False,
        fontsize=10,
    )

    out = os.fspath(out_file)
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, out)  # a viewer never sees a half-written file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out
