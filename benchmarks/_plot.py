"""Latency distributions of the benchmark scripts drawn to a PNG (``--plot FILE``).

Imported as ``_plot``, like ``_stats``: a script's directory is ``sys.path[0]`` when it
runs as ``python benchmarks/X.py``.  matplotlib is optional (``pip install
'coord[plot]'``): this module imports it only in :func:`check` and :func:`write`, so a
script without ``--plot`` runs without it.

A script calls :func:`add_arguments` on its parser, :func:`check` right after parsing
(before any benchmark work: a missing matplotlib or output directory is found at once,
not after minutes of measuring), and :func:`write` with its samples at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import NoReturn

from _stats import percentile

INSTALL = "pip install 'coord[plot]'"
DPI = 100
# One marker per quantile, the same for every series; the legend explains them once.
QUANTILES = ((0.5, "p50", "o"), (0.99, "p99", "^"))


def size(text: str) -> tuple[int, int]:
    """``WxH`` (pixels, e.g. ``1000x600``) as ``(width, height)``.

    Raises:
        argparse.ArgumentTypeError: not two integers joined by ``x``, or one of them is
            out of 200..4000.
    """
    parts = text.lower().split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"plot size {text!r} is not WIDTHxHEIGHT in pixels, e.g. 1000x600")
    for name, value in (("width", width), ("height", height)):
        if not 200 <= value <= 4000:
            raise argparse.ArgumentTypeError(
                f"plot {name} {value} is outside 200..4000 pixels")
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--plot FILE`` and ``--plot-size WxH`` to ``parser``."""
    parser.add_argument("--plot", metavar="FILE",
                        help="also draw the latency distribution to FILE (a PNG; needs "
                             f"matplotlib: {INSTALL})")
    parser.add_argument("--plot-size", metavar="WxH", type=size, default=(1000, 600),
                        help="the PNG's size in pixels (default 1000x600)")


def check(args: argparse.Namespace) -> None:
    """Exit with status 2 and a message on stderr, now, if ``args.plot`` cannot be written:
    matplotlib is not importable, or FILE's directory does not exist.  Nothing without
    ``--plot``."""
    if args.plot is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        _refuse(f"--plot needs matplotlib, which cannot be imported ({e}): {INSTALL}")
    directory = os.path.dirname(os.path.abspath(args.plot))
    if not os.path.isdir(directory):
        _refuse(f"--plot {args.plot}: the directory {directory} does not exist")


def _refuse(message: str) -> NoReturn:
    # 2, as argparse exits for a bad command line: this is one, found before any work.
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def write(path: str, title: str,
          panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
          pixels: tuple[int, int] = (1000, 600)) -> None:
    """Draw each panel's series (latencies in milliseconds) as empirical CDFs side by
    side, p50 and p99 marked on each curve and given in its legend entry, to the PNG
    ``path`` of ``pixels`` (width, height).

    Args:
        path: the file to write (replaced if it exists).
        title: the figure's title: what was measured, where (the etcd version).
        panels: ``(x-axis label, {series label: samples in ms})`` per panel, left to
            right.  A series with no samples is listed as such in the legend.
        pixels: the PNG's width and height.

    The x axis is logarithmic when every sample of a panel is above 0 and they span a
    factor of 10 or more (latency tails are long), else linear.  The quantiles are those
    the scripts print (``_stats.percentile``), so the figure and the text agree.
    """
    # The Agg canvas directly, not pyplot: no display is needed or looked for, and no
    # global figure state ($MPLBACKEND does not matter).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    width, height = pixels
    # Half a pixel more: the canvas truncates width * dpi / dpi to an integer, and
    # e.g. 113 / 100 * 100 is 112.99999999999999 (older matplotlib gives 112 pixels).
    figure = Figure(figsize=((width + 0.5) / DPI, (height + 0.5) / DPI), dpi=DPI,
                    layout="constrained")
    FigureCanvasAgg(figure)
    # Wrapped to the width: about 7 pixels a character at matplotlib's default 10 pt,
    # 9 at the title's 12 pt.
    figure.suptitle(textwrap.fill(title, width // 9))
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (xlabel, series) in zip(axes, panels, strict=True):
        samples = [v for values in series.values() for v in values]
        if samples and min(samples) > 0 and max(samples) >= 10 * min(samples):
            ax.set_xscale("log")
            # 3 and 20, not 10^0.5 and 2x10^1; on the minor ticks only 2x and 5x.
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        for label, values in series.items():
            _ecdf(ax, label, sorted(values))
        ax.set_xlabel(textwrap.fill(xlabel, width // len(panels) // 7))
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
        ax.set_ylim(0, 1.02)
        markers = [Line2D([], [], color="black", linestyle="none", marker=m, label=name)
                   for _, name, m in QUANTILES]
        ax.legend(handles=[*ax.get_legend_handles_labels()[0], *markers],
                  loc="lower right", fontsize="small")
    axes[0].set_ylabel("share of samples at or below (ECDF)")
    figure.savefig(path, format="png", dpi=DPI)


def _ecdf(ax, label: str, values: list[float]) -> None:
    n = len(values)
    if not n:
        ax.plot([], [], linestyle="none", label=f"{label}: no samples")
        return
    marks = [(percentile(values, q), q, name, m) for q, name, m in QUANTILES]
    text = ", ".join(f"{name} {_ms(x)}" for x, _, name, _ in marks)
    # From 0 at the first sample up to 1 at the last, one step per sample.
    (line,) = ax.step([values[0], *values], [i / n for i in range(n + 1)], where="post",
                      label=f"{label}\n{text} (n={n:,})")
    for x, q, _, marker in marks:
        if not math.isnan(x):
            ax.plot([x], [q], marker=marker, color=line.get_color(), markersize=8,
                    markeredgecolor="black", linestyle="none")


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms"
