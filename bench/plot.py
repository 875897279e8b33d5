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
