"""The ``d2engine-plot`` command: draw training curves from ``metrics.json``.

::

    d2engine-plot output/demo                                  # -> output/demo/curves.png
    d2engine-plot output/run_a output/run_b --out compare.png  # two runs overlaid
    d2engine-plot output/demo --metrics total_loss 'accuracy/*'

Each OUTPUT_DIR (or metrics.json path) is one run, drawn in its own colour. Also runnable as
``python -m d2engine.tools.plot``. Needs matplotlib: ``pip install 'd2engine[plot]'``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from d2engine.utils.plotting import MissingPlotExtraError, plot_metrics

__all__ = ["build_parser", "cli"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``d2engine-plot``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="d2engine-plot",
        description="Draw the loss, learning-rate, timing and evaluation curves of training "
        "runs from their metrics.json into one PNG.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="OUTPUT_DIR",
        help="a training run's output directory (or its metrics.json); several are overlaid",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="the PNG to write (default: OUTPUT_DIR/curves.png for one run, curves.png for "
        "several)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="NAME",
        help="metrics to draw, one panel each: names or shell patterns such as 'loss_*' "
        "(default: losses, lr, time and data_time, evaluation results)",
    )
    parser.add_argument(
        "--labels", nargs="+", default=None, help="the runs' names in the legend, one per run"
    )
    parser.add_argument(
        "--smoothing",
        type=float,
        default=0.6,
        help="weight of the moving average drawn over the losses, in [0, 1); 0: none",
    )
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch")
    return parser


def cli(argv: Sequence[str] | None = None) -> None:
    """The ``d2engine-plot`` entry point; prints the path of the PNG it wrote.

    Exits with code 2 on a usage error (no metrics file, an unknown metric, matplotlib missing).

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out
    if out is None:
        only = args.runs[0]
        out = os.path.join(only, "curves.png") if len(args.runs) == 1 else "curves.png"
        if len(args.runs) == 1 and not os.path.isdir(only):  # a metrics.json path
            out = os.path.join(os.path.dirname(only) or ".", "curves.png")
    try:
        written = plot_metrics(
            args.runs,
            out,
            args.metrics,
            labels=args.labels,
            smoothing=args.smoothing,
            dpi=args.dpi,
        )
    except (MissingPlotExtraError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"d2engine-plot: error: {e}\n")
    print(written)
    sys.stdout.flush()


if __name__ == "__main__":
    cli()
