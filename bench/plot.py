"""``bench stream --plot FILE.png``: a latency CDF and a per-stream timeline.

matplotlib is an optional extra (``pip install trio-llm-relay[plot]``) so
the core install stays small: it is imported here, lazily, only when a plot
is asked for, with the non-interactive Agg backend. Without it,
:func:`plot_stream_run` raises :class:`~protocol.errors.RequestError` with
that install hint.

Left panel: the empirical CDF of time to first token and of inter-chunk
latency (successful streams only), on a log time axis. Right panel: one
horizontal line per stream from its start to its end, a dot at its first
chunk, failed streams in red.

``bench compare --plot FILE.png`` (:func:`plot_comparison`): one bar chart
per headline figure of several ``bench overhead`` reports (the relay and the
gateways it is compared with), and their sustained levels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bench.stats import gaps
from protocol.errors import RequestError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.stream import StreamRun

PLOT_INSTALL_HINT = "pip install trio-llm-relay[plot]"


def load_pyplot() -> Any:  # noqa: ANN401 - matplotlib is untyped here and optional
    """matplotlib's pyplot on the Agg backend.

    Raises:
        RequestError: matplotlib is not installed (the message says how to get it).
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise RequestError(
            f"--plot needs matplotlib, an optional extra: {PLOT_INSTALL_HINT}", param="plot"
        ) from exc
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The points of an empirical CDF: sorted values and their cumulative share."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def plot_stream_run(run: StreamRun, path: str, title: str = "bench stream") -> None:
    """Write the two-panel PNG of a ``bench stream`` run to ``path``.

    Raises:
        RequestError: matplotlib is missing.
        OSError: ``path`` cannot be written.
    """
    plt = load_pyplot()
    figure, (cdf, timeline) = plt.subplots(1, 2, figsize=(13, 5))
    ok = [r for r in run.records if r.ok]
    ttft = [(r.first_ns - r.start_ns) / 1e6 for r in ok if r.first_ns is not None]
    inter = [g / 1e6 for r in ok for g in gaps(r.chunk_ns) if g > 0]
    for values, label in ((ttft, "time to first token"), (inter, "inter-chunk latency")):
        if values:
            xs, ys = cdf_points(values)
            cdf.step(xs, ys, where="post", label=f"{label} (n={len(values)})")
    if ttft or inter:
        cdf.set_xscale("log")
        cdf.legend(loc="lower right")
    cdf.set_xlabel("ms")
    cdf.set_ylabel("share of samples")
    cdf.set_title("latency CDF")
    cdf.grid(True, which="both", alpha=0.3)
    for index, record in enumerate(run.records):
        start = (record.start_ns - run.start_ns) / 1e9
        end_ns = record.end_ns if record.end_ns is not None else record.start_ns
        end = (end_ns - run.start_ns) / 1e9
        colour = "tab:blue" if record.ok else "tab:red"
        timeline.plot([start, end], [index, index], color=colour, linewidth=1.5)
        if record.first_ns is not None:
            first = (record.first_ns - run.start_ns) / 1e9
            timeline.plot([first], [index], marker="o", markersize=2.5, color="black")
    timeline.set_xlabel("s since start")
    timeline.set_ylabel("stream")
    timeline.set_title("per-stream timeline (dot: first chunk; red: error)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_comparison(
    reports: Sequence[tuple[str, dict[str, Any]]], path: str, title: str = "bench compare"
) -> None:
    """Write a bar chart per headline figure of several ``bench overhead`` reports to ``path``.

    One panel per :data:`bench.compare.HEADLINES` figure (one bar per
    gateway) and a last panel with the sustained levels of every mode of
    every report (each report's own direct floor included).

    Args:
        reports: ``(gateway label, report)`` pairs, in the order to draw.
        path: the PNG to write.
        title: the figure's title.

    Raises:
        RequestError: matplotlib is missing.
        OSError: ``path`` cannot be written.
    """
    from bench.compare import HEADLINES, headlines, mode_label, sustained_levels

    plt = load_pyplot()
    panels = len(HEADLINES) + 1
    columns = 3
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.2 * rows))
    flat = list(axes.flat)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    values = [(label, headlines(report)) for label, report in reports]
    for axis, headline in zip(flat, HEADLINES, strict=False):
        names = [label for label, _ in values]
        heights = [figures.get(headline.key) for _, figures in values]
        shown = [0.0 if h is None else h for h in heights]
        bars = axis.bar(names, shown, color=colours[: len(names)])
        for bar, height in zip(bars, heights, strict=True):
            text = "n/a" if height is None else headline.spec.format(height)
            axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)  # fmt: skip
        axis.set_title(headline.label, fontsize=9)
        axis.set_ylim(bottom=0)
        axis.tick_params(labelsize=8)
        axis.grid(True, axis="y", alpha=0.3)
    axis = flat[len(HEADLINES)]
    names, levels = [], []
    for label, report in reports:
        for mode, level in sustained_levels(report).items():
            name = f"direct ({label} run)" if mode == "direct" else mode_label(label, mode)
            names.append(name)
            levels.append(0.0 if level is None else level)
    bars = axis.bar(range(len(names)), levels, color="tab:gray")
    for bar, level in zip(bars, levels, strict=True):
        axis.annotate(f"{level:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)  # fmt: skip
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    axis.set_title("sustained streams (higher is better)", fontsize=9)
    axis.grid(True, axis="y", alpha=0.3)
    for axis in flat[panels:]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
