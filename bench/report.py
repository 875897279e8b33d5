"""Human output of both benchmarks: a rich progress bar and readable tables.

Everything here reads the JSON-ready reports that :mod:`bench.stream` and
:mod:`bench.overhead` build, so what is printed and what ``--json`` writes
are the same numbers. rich is the ``bench`` extra
(``pip install trio-llm-relay[bench]``); it is imported when a report is
drawn, not when the package is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from protocol.errors import RequestError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgressBar
    from rich.progress import TaskID

INSTALL_HINT = "pip install trio-llm-relay[bench]"
#: Columns of the report when the output is not a terminal.
REPORT_WIDTH = 120

#: Figures shown per scenario group of ``bench overhead``: (figure, label, unit format).
OVERHEAD_ROWS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "latency": (
        ("ttft_ms_p50", "TTFT p50 (ms)", "{:.3f}"),
        ("latency_ms_p50", "chunk latency p50 (ms)", "{:.3f}"),
        ("latency_ms_p99", "chunk latency p99 (ms)", "{:.3f}"),
        ("latency_ms_max", "chunk latency max (ms)", "{:.3f}"),
        ("frames_lost", "frames lost (sum)", "{:.0f}"),
    ),
    "throughput": (
        ("chunks_per_s", "chunks/s", "{:,.0f}"),
        ("cpu_us_per_chunk", "relay CPU/chunk (us)", "{:.2f}"),
        ("frames_lost", "frames lost (sum)", "{:.0f}"),
    ),
    "concurrency": (
        ("latency_ms_p50", "chunk latency p50 (ms)", "{:.3f}"),
        ("latency_ms_p99", "chunk latency p99 (ms)", "{:.3f}"),
        ("max_gap_ms", "largest gap (ms)", "{:.2f}"),
        ("max_send_gap_ms", "gap at emulator (ms)", "{:.2f}"),
        ("cpu_us_per_chunk", "relay CPU/chunk (us)", "{:.2f}"),
        ("frames_lost", "frames lost (sum)", "{:.0f}"),
    ),
    "idle": (
        ("streams_ok", "streams held open", "{:.0f}"),
        ("rss_kib_per_stream", "RSS/open stream (KiB)", "{:.2f}"),
        ("rss_kib_open", "RSS, all open (KiB)", "{:,.0f}"),
        ("frames_lost", "first frames lost", "{:.0f}"),
    ),
    "burst": (
        ("ttft_ms_p50", "TTFT p50 (ms)", "{:.3f}"),
        ("latency_ms_p50", "chunk latency p50 (ms)", "{:.3f}"),
        ("chunks_per_s", "chunks/s", "{:,.0f}"),
        ("cpu_us_per_chunk", "relay CPU/chunk (us)", "{:.2f}"),
        ("frames_lost", "frames lost (sum)", "{:.0f}"),
    ),
    "long": (
        ("answer_chars", "answer length (chars)", "{:,.0f}"),
        ("chunks_per_s", "chunks/s", "{:,.0f}"),
        ("chunks_per_s_q1", "chunks/s, first quarter", "{:,.0f}"),
        ("chunks_per_s_q4", "chunks/s, last quarter", "{:,.0f}"),
        ("cpu_us_per_chunk", "relay CPU/chunk (us)", "{:.2f}"),
        ("cpu_us_per_chunk_q1", "relay CPU/chunk, first quarter (us)", "{:.2f}"),
        ("cpu_us_per_chunk_q4", "relay CPU/chunk, last quarter (us)", "{:.2f}"),
        ("client_us_per_chunk_q1", "client CPU/chunk, first quarter (us)", "{:.2f}"),
        ("client_us_per_chunk_q4", "client CPU/chunk, last quarter (us)", "{:.2f}"),
        ("frames_lost", "frames lost (sum)", "{:.0f}"),
    ),
}
_HARNESS = (("relay", "relay"), ("emulator", "emulator"), ("client", "bench client"))


def _import_rich(module: str) -> Any:  # noqa: ANN401 - a module object
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RequestError(f"the benchmarks need rich: {INSTALL_HINT}") from exc


def console(stderr: bool = False) -> Console:
    """A rich console (raises :class:`RequestError` naming the extra if rich is missing)."""
    module = _import_rich("rich.console")
    made: Console = module.Console(stderr=stderr, highlight=False)
    if not made.is_terminal:
        made.width = max(made.width, REPORT_WIDTH)  # a log file: do not wrap the tables
    return made


class RichProgress:
    """Draws :class:`bench.progress.Progress` calls as a rich progress bar.

    Use as a context manager; the bar is removed when it ends.
    """

    def __init__(self, out: Console) -> None:
        progress = _import_rich("rich.progress")
        self._bar: RichProgressBar = progress.Progress(
            progress.SpinnerColumn(),
            progress.TextColumn("{task.description}"),
            progress.BarColumn(),
            progress.MofNCompleteColumn(),
            progress.TimeElapsedColumn(),
            console=out,
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def begin(self, description: str, total: int) -> None:
        """Show a new bar for a run of ``total`` streams (0: unknown)."""
        self._task = self._bar.add_task(description, total=total or None)

    def advance(self) -> None:
        """One stream ended."""
        if self._task is not None:
            self._bar.advance(self._task)

    def end(self) -> None:
        """Remove the current bar."""
        if self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None


def _escape(text: str) -> str:
    escaped: str = _import_rich("rich.markup").escape(text)
    return escaped


def _fmt(value: float | None, spec: str = "{:.3f}") -> str:
    return "-" if value is None else spec.format(value)


def _table(title: str | None = None) -> Any:  # noqa: ANN401 - rich.table.Table
    table_module = _import_rich("rich.table")
    box = _import_rich("rich.box")
    return table_module.Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")


# --- bench stream --------------------------------------------------------------


def print_stream_report(report: dict[str, Any], out: Console) -> None:
    """The ``bench stream`` table: figures as p50/p90/p99/max, aggregate, errors."""
    summary = report["summary"]
    options = report["options"]
    out.print(
        f"[bold]bench stream[/bold] {options['base_url']}  model={options['model']}"
        f"  concurrency={options['concurrency']}"
    )
    table = _table()
    for name in ("figure", "n", "p50", "p90", "p99", "max", "mean"):
        table.add_column(name, justify="left" if name == "figure" else "right")
    rows = (
        ("ttft_ms", "time to first token (ms)", "{:.1f}"),
        ("inter_chunk_ms", "inter-chunk latency (ms)", "{:.2f}"),
        ("stream_chunks_per_s", "chunks/s per stream", "{:.1f}"),
        ("stream_chars_per_s", "characters/s per stream", "{:.1f}"),
        ("total_s", "total time per stream (s)", "{:.3f}"),
    )
    for key, label, spec in rows:
        figure = summary["figures"][key]
        table.add_row(
            label,
            str(figure["n"]),
            *(_fmt(figure[q], spec) for q in ("p50", "p90", "p99", "max", "mean")),
        )
    out.print(table)
    aggregate = summary["aggregate"]
    out.print(
        f"requests {summary['requests']}: ok {summary['ok']}, failed {summary['failed']}"
        f" in {summary['wall_s']:.2f} s;  aggregate {_fmt(aggregate['chunks_per_s'], '{:,.1f}')}"
        f" chunks/s, {_fmt(aggregate['chars_per_s'], '{:,.0f}')} chars/s,"
        f" {_fmt(aggregate['requests_per_s'], '{:.2f}')} req/s"
    )
    if summary["empty_answers"]:
        out.print(f"[yellow]{summary['empty_answers']} stream(s) completed with no text[/yellow]")
    if summary["errors"]:
        errors = _table("errors by kind")
        errors.add_column("kind")
        errors.add_column("count", justify="right")
        for kind, count in sorted(summary["errors"].items(), key=lambda item: -item[1]):
            errors.add_row(kind, str(count))
        out.print(errors)
        for sample in summary["error_samples"]:
            out.print(f"  [dim]{_escape(sample)}[/dim]")


# --- bench overhead ------------------------------------------------------------


def _errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(errors.items())) or "-"


def _verdict_for(scenario: dict[str, Any], figure: str) -> tuple[str, str]:
    for verdict in scenario["verdicts"]:
        if verdict["figure"] == figure:
            colour = {"PASS": "green", "MISS": "red"}.get(verdict["result"], "yellow")
            goal = f"{verdict['basis']} <= {verdict['limit']:g}"
            return goal, f"[{colour}]{verdict['result']}[/{colour}]"
    return "", ""


def _last_line(text: str, limit: int = 90) -> str:
    """The last non-empty line of ``text``, cut to ``limit`` characters (a traceback's error)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= limit else last[: limit - 3] + "..."


def _print_sustained(scenario: dict[str, Any], out: Console) -> int:
    """The ``sustained`` table: each mode's highest sustained level, and why the next failed.

    Returns:
        The number of targets missed.
    """
    sustained = scenario["sustained"]
    title = (
        f"{scenario['key']}: streams of {sustained['frames']} deltas"
        f" {sustained['frame_delay_ms']:g} ms apart, concurrency doubled until a level loses a"
        f" frame or shows a gap over {sustained['max_gap_ms']:g} ms;"
        f" median of {scenario['repeats']}"
    )
    table = _table(title)
    for name in ("mode", "sustained", "each repeat", "first failed level", "target", "verdict"):
        table.add_column(name, justify="right" if name in ("sustained", "verdict") else "left")
    verdicts = {v["figure"]: v for v in scenario["verdicts"]}
    relay_keys = [key for key in sustained["modes"] if key != "direct"]
    misses = 0
    for key, mode in sustained["modes"].items():
        runs = mode["runs"]
        each = ", ".join(
            "-" if run["sustained"] is None else f"{run['sustained']}{'+' * run['capped']}"
            for run in runs
        )
        failed = [
            f"{run['failed_level']}: {_last_line(run['reason'])}"
            if run["failed_level"]
            else _last_line(run["reason"])
            for run in runs
        ]
        figure = None
        if key in relay_keys:
            figure = "sustained_streams" if key == relay_keys[0] else f"sustained_streams_{key[6:]}"
        verdict = verdicts.get(figure or "")
        target = shown = ""
        if verdict is not None:
            colour = "green" if verdict["result"] == "PASS" else "red"
            target = f">= {verdict['limit']:g} (half of direct)"
            shown = f"[{colour}]{verdict['result']}[/{colour}]"
            misses += verdict["result"] == "MISS"
        table.add_row(
            _escape(mode["label"]),
            _fmt(mode["sustained"], "{:.0f}"),
            each or "-",
            _escape("; ".join(f for f in failed if f) or "-"),
            target,
            shown,
        )
    table.caption = (
        "+: every level up to the cap was sustained (the figure is a floor);"
        " -: the search was cut short by the harness (a process that did not start)"
    )
    out.print(table)
    if scenario["failure"]:
        out.print(f"[red]scenario failed:[/red] {_escape(scenario['failure'])}")
    return misses


def print_overhead_report(report: dict[str, Any], out: Console) -> None:
    """One table per scenario: direct, relay, added, ratio, target and verdict.

    A report with ``gateways`` (``--gateway``) then gets each gateway's
    tables under a heading, and :func:`print_comparison` of the relay and
    every gateway.
    """
    machine = report["machine"]
    out.print(
        f"[bold]bench overhead[/bold]: {machine['cpus']} CPUs, Python {machine['python']},"
        f" trio {machine['trio']}, load {machine['loadavg']}, {machine['when']}"
    )
    out.print(f"relay command: {report['relay_cmd']}", markup=False)
    out.print(
        "[dim]direct: the bench client reads the emulator itself (the floor); relay: through"
        " the relay; added = relay - direct; medians of the repeats; counts summed[/dim]"
    )
    quick = report["options"]["quick"]
    if quick:
        out.print("[yellow]--quick: smaller counts than the targets assume[/yellow]")
    _print_scenarios(report["scenarios"], out)
    gateways = report.get("gateways") or []
    for gateway in gateways:
        name = gateway["name"]
        out.print()
        out.print(f"[bold]gateway {_escape(name)}[/bold], measured beside the relay in this run")
        out.print(f"{name} command: {gateway['relay_cmd']}", markup=False)
        _print_scenarios(gateway["scenarios"], out, name)
    if gateways:
        from bench.compare import gateway_reports

        order = "; ".join(
            f"{key}: " + " | ".join(", ".join(turns) for turns in repeats)
            for key, repeats in report.get("order", {}).items()
        )
        out.print()
        out.print(f"[dim]order of the turns, per repeat: {_escape(order)}[/dim]")
        print_comparison(gateway_reports(report), out)


def _print_scenarios(scenarios: list[dict[str, Any]], out: Console, name: str = "relay") -> None:
    """The tables of one relay's (or gateway's, ``name``) scenarios and its targets."""
    misses = 0
    for scenario in scenarios:
        group = scenario["key"].split("-")[0]
        if scenario.get("sustained"):
            misses += _print_sustained(scenario, out)
            continue
        title = f"{scenario['key']}: {scenario['label']}, median of {scenario['repeats']}"
        table = _table(title)
        for column in ("figure", "direct", name, "added", "ratio", "target", "verdict"):
            table.add_column(
                _escape(column),
                justify="left" if column in ("figure", "target") else "right",
                no_wrap=column in ("figure", "verdict"),
            )
        direct, relay = scenario["direct"], scenario["relay"]
        for figure, label, spec in OVERHEAD_ROWS.get(group, ()):
            a, b = direct.get(figure), relay.get(figure)
            diff = None if a is None or b is None else b - a
            ratio = None if a is None or b is None or not a else b / a
            target, verdict = _verdict_for(scenario, figure)
            misses += "MISS" in verdict
            shown_a = _fmt(a, spec) if figure != "cpu_us_per_chunk" else "-"
            table.add_row(
                label,
                shown_a,
                _fmt(b, spec),
                _fmt(diff, spec),
                _fmt(ratio, "{:.2f}x"),
                target,
                verdict,
            )
        load = ", ".join(
            f"{name if key == 'relay' else who} {_fmt(relay.get(f'{key}_cpu_pct'), '{:.0f}')}%"
            for key, who in _HARNESS
        )
        waiting = ", ".join(
            f"{name if key == 'relay' else who} {_fmt(relay.get(f'{key}_runq_pct'), '{:.0f}')}%"
            for key, who in _HARNESS
        )
        steady = ""
        if relay.get("steady_s"):
            shares = ", ".join(
                f"{name if key == 'relay' else who} busy "
                f"{_fmt(relay.get(f'{key}_cpu_pct_steady'), '{:.0f}')}%, waiting "
                f"{_fmt(relay.get(f'{key}_runq_pct_steady'), '{:.0f}')}%"
                for key, who in _HARNESS
            )
            steady = f" with every stream flowing ({relay['steady_s']:.1f} s): {shares};"
        table.caption = _escape(
            f"CPU busy during the {name} run (100% = one core): {load};"
            f" waiting for a CPU: {waiting};{steady}"
            f" errors direct: {_errors_text(scenario['direct_errors'])},"
            f" {name}: {_errors_text(scenario['relay_errors'])}"
        )
        out.print(table)
        if scenario["failure"]:
            out.print(f"[red]scenario failed:[/red] {_escape(scenario['failure'])}")
        for sample in scenario["error_samples"]:
            out.print(f"  [dim]{_escape(sample)}[/dim]")
        for warning in scenario["warnings"]:
            out.print(f"  [yellow]note:[/yellow] {_escape(warning)}")
    if any(s["key"] == "idle" for s in scenarios):
        out.print("[dim]idle, direct column: the emulator's RSS per open stream, for scale[/dim]")
    verdicts = [(s["key"], v) for s in scenarios for v in s["verdicts"]]
    summary = _table("targets (from the issue)" + ("" if name == "relay" else f", {name}"))
    for column in ("scenario", "target", "value", "verdict"):
        summary.add_column(column, justify="right" if column in ("value", "verdict") else "left")
    for key, verdict in verdicts:
        colour = {"PASS": "green", "MISS": "red"}.get(verdict["result"], "yellow")
        summary.add_row(
            key, verdict["target"], _fmt(verdict["value"], "{:.3g}"),
            f"[{colour}]{verdict['result']}[/{colour}]",
        )  # fmt: skip
    if verdicts:
        out.print(summary)
    passed = sum(1 for _, v in verdicts if v["result"] == "PASS")
    who = "" if name == "relay" else f" ({_escape(name)})"
    out.print(f"targets{who}: {passed} PASS, {misses} MISS of {len(verdicts)}")


# --- bench compare -------------------------------------------------------------


def print_comparison(reports: list[tuple[str, dict[str, Any]]], out: Console) -> None:
    """The ``bench compare`` table: each headline figure per gateway, then sustained levels."""
    from bench.compare import HEADLINES, headlines, mode_label, sustained_levels

    for label, report in reports:
        machine = report["machine"]
        out.print(
            f"[bold]{_escape(label)}[/bold]: {machine['cpus']} CPUs, load {machine['loadavg']},"
            f" {machine['when']}; relay command: {_escape(report['relay_cmd'])}"
        )
    table = _table("lower is better; added = gateway - direct of the same run")
    table.add_column("figure")
    for label, _ in reports:
        table.add_column(label, justify="right")
    values = [headlines(report) for _, report in reports]
    for headline in HEADLINES:
        table.add_row(
            headline.label, *(_fmt(figures.get(headline.key), headline.spec) for figures in values)
        )
    out.print(table)
    levels = _table("sustained streams (higher is better)")
    levels.add_column("mode")
    levels.add_column("sustained", justify="right")
    for label, report in reports:
        for mode, level in sustained_levels(report).items():
            name = f"direct ({label} run)" if mode == "direct" else mode_label(label, mode)
            levels.add_row(_escape(name), _fmt(level, "{:.0f}"))
    out.print(levels)
