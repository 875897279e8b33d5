"""``python -m bench``: ``stream`` measures any OpenAI-compatible endpoint,
``overhead`` measures what a relay adds over the emulated upstream's wire,
``compare`` puts the headline figures of several ``overhead`` reports side by side.

Exit status: 0 when every stream succeeded (``overhead``: and no scenario
failed and no frame was lost, for the relay and every ``--gateway``), 1
when some did not, 2 for bad options, 130 on Ctrl-C (child
processes are stopped first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson
import trio

from bench.overhead import OverheadOptions, parse_gateway, run_overhead
from bench.progress import NoProgress, Progress
from bench.scenarios import GROUPS, OPTIONAL_GROUPS
from bench.stream import DEFAULT_PROMPT, StreamOptions, report_of, run_streams
from bench.upstreams import PROVIDERS
from protocol.errors import RelayError, RequestError

_EPILOG_OVERHEAD = """\
scenarios: latency, throughput (throughput-1, throughput-16),
concurrency (concurrency-500, concurrency-200), idle, sustained (the most
concurrent streams of 64 deltas 20 ms apart with every frame and no gap over
40 ms, doubling from 1); and, only when named, burst and long (1 stream,
~20,000 characters, cost per chunk by quarter of the stream).
--relay-cmd placeholders: {python} {host} {port} {upstream} {token} {workers}
(sustained runs a command holding {workers} with 1 and with 2 workers, every
other scenario with 1); LiteLLM's proxy: python -m bench.litellm --help.
--gateway NAME=CMD (repeatable; split at the first '=', CMD as --relay-cmd)
measures another gateway beside the relay in the same run: per scenario and
repeat the relay and each gateway take turns in an order that rotates with
the repeat (relay, g1, g2; then g1, g2, relay; ...), each with a fresh
emulator and its own direct run right before it. The report is the relay's,
plus "gateways" (each NAME's scenarios) and "order" (who ran when); the text
ends with bench compare's table, and bench compare REPORT.json splits the
file into its gateways. Beside LiteLLM:
  --gateway litellm="$(python -m bench.litellm relay-cmd)"
The default relay command per provider:
%s
"""


def _epilog() -> str:
    commands = "\n".join(
        f"  {name}: {provider.relay_cmd}" for name, provider in sorted(PROVIDERS.items())
    )
    return _EPILOG_OVERHEAD % commands.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Streaming benchmarks for OpenAI-compatible relays."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    stream = sub.add_parser(
        "stream",
        help="measure any OpenAI-compatible streaming endpoint",
        description="TTFT, inter-chunk latency, chunks/s and chars/s, errors by kind.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    stream.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    stream.add_argument("--api-key", help="sent as Authorization: Bearer")
    stream.add_argument("--model", default="step")
    prompt = stream.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=DEFAULT_PROMPT)
    prompt.add_argument("--prompt-file", help="read the prompt from this file")
    stream.add_argument("--concurrency", type=int, default=1, help="streams in flight")
    bound = stream.add_mutually_exclusive_group()
    bound.add_argument("--requests", type=int, help="streams in total (default 20)")
    bound.add_argument("--duration", type=float, help="start streams for this many seconds")
    stream.add_argument("--timeout", type=float, default=120.0, help="bound on each stream (s)")
    stream.add_argument("--max-tokens", type=int, help="max_tokens of each request")
    stream.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    stream.add_argument("--plot", metavar="FILE.png", help="latency CDF and timeline (matplotlib)")
    stream.add_argument("--no-progress", action="store_true", help="no progress bar")

    overhead = sub.add_parser(
        "overhead",
        help="what a relay adds, measured against the emulated upstream",
        description="Runs each scenario directly against the provider emulator and through "
        "the relay (separate processes on loopback) and prints the difference.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    overhead.add_argument("--provider", choices=sorted(PROVIDERS), default="step")
    default_groups = [group for group in GROUPS if group not in OPTIONAL_GROUPS]
    overhead.add_argument(
        "--scenario",
        help=f"comma-separated scenarios or groups ({', '.join(GROUPS)}); default all but"
        f" {', '.join(OPTIONAL_GROUPS)} ({', '.join(default_groups)})",
    )
    overhead.add_argument("--repeats", type=int, default=3, help="runs per scenario (median)")
    overhead.add_argument("--quick", action="store_true", help="small counts")
    overhead.add_argument("--frames", type=int, help="frames per stream in every scenario")
    overhead.add_argument("--streams", type=int, help="streams of the multi-stream scenarios")
    overhead.add_argument("--idle-streams", type=int, help="open streams of the idle scenario")
    overhead.add_argument(
        "--first-delay", type=float, help="emulator delay before frame 1 of paced scenarios (s)"
    )
    overhead.add_argument("--settle", type=float, default=0.3, help="pause between runs (s)")
    overhead.add_argument("--relay-cmd", help="start this relay instead of ours (placeholders)")
    overhead.add_argument(
        "--gateway",
        action="append",
        metavar="NAME=CMD",
        help="also measure this gateway beside the relay, in the same run (repeatable;"
        " NAME: letters, digits, '.', '_', '-', not relay or direct)",
    )
    overhead.add_argument("--api-key", help="Bearer key for the relay ({token}: the credential)")
    overhead.add_argument("--relay-path", default="/v1/chat/completions")
    overhead.add_argument("--log-dir", help="keep the child processes' logs here")
    overhead.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    overhead.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare = sub.add_parser(
        "compare",
        help="headline figures of several overhead reports side by side",
        description="Reads bench overhead --json reports (the relay's, another gateway's) and"
        " prints added TTFT, added inter-chunk p50/p99, CPU per chunk, memory per idle stream,"
        " frames lost and the sustained levels of each; --plot draws them. A report of a run"
        " with --gateway gives one column per gateway (relay, then each NAME).",
    )
    compare.add_argument("reports", nargs="+", metavar="REPORT.json")
    compare.add_argument(
        "--label",
        action="append",
        help="a name per column, in order (default: relay or NAME in a report with gateways,"
        " else from its command)",
    )
    compare.add_argument("--plot", metavar="FILE.png", help="bar charts (matplotlib)")
    return parser


def _run_compare(args: argparse.Namespace) -> int:
    from bench import report as out
    from bench.compare import gateway_reports, unique_labels

    reports = [orjson.loads(Path(path).read_bytes()) for path in args.reports]
    expanded = [pair for report in reports for pair in gateway_reports(report)]
    labels = list(args.label or [])
    if len(labels) > len(expanded):
        raise RequestError("more --label than reports (and their gateways)", param="label")
    labels = unique_labels([*labels, *(label for label, _ in expanded[len(labels) :])])
    pairs = [(label, report) for label, (_, report) in zip(labels, expanded, strict=True)]
    if args.plot:
        from bench.plot import load_pyplot

        load_pyplot()  # fail now, not after the table
    out.print_comparison(pairs, out.console())
    if args.plot:
        from bench.plot import plot_comparison

        plot_comparison(pairs, args.plot, title="bench overhead: " + " vs ".join(labels))
    return 0


def _write_json(path: str, report: dict[str, Any]) -> None:
    Path(path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def _run_stream(args: argparse.Namespace) -> int:
    from bench import report as out

    prompt = args.prompt
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    options = StreamOptions(
        base_url=args.base_url,
        api_key=args.api_key,
        model=args.model,
        prompt=prompt,
        concurrency=args.concurrency,
        requests=args.requests,
        duration_s=args.duration,
        timeout_s=args.timeout,
        max_tokens=args.max_tokens,
    )
    options.check()
    if args.plot:
        from bench.plot import load_pyplot

        load_pyplot()  # fail now, not after the run
    console = out.console()
    if args.no_progress:
        run = trio.run(run_streams, options, NoProgress())
    else:
        with out.RichProgress(console) as bar:
            run = trio.run(run_streams, options, bar)
    report = report_of(options, run)
    out.print_stream_report(report, console)
    if args.json:
        _write_json(args.json, report)
    if args.plot:
        from bench.plot import plot_stream_run

        plot_stream_run(run, args.plot, title=f"bench stream: {options.base_url}")
    return 0 if report["summary"]["failed"] == 0 else 1


def _run_overhead(args: argparse.Namespace) -> int:
    from bench import report as out

    options = OverheadOptions(
        provider=args.provider,
        scenario=args.scenario,
        repeats=args.repeats,
        quick=args.quick,
        frames=args.frames,
        streams=args.streams,
        idle_streams=args.idle_streams,
        first_delay_s=args.first_delay,
        settle_s=args.settle,
        relay_cmd=args.relay_cmd,
        api_key=args.api_key,
        relay_path=args.relay_path,
        log_dir=args.log_dir,
        gateways=tuple(parse_gateway(text) for text in args.gateway or ()),
    )
    console = out.console()
    progress: Progress
    if args.no_progress:
        report = trio.run(run_overhead, options, NoProgress())
    else:
        with out.RichProgress(console) as progress:
            report = trio.run(run_overhead, options, progress)
    out.print_overhead_report(report, console)
    if args.json:
        _write_json(args.json, report)
    return 0 if overhead_clean(report) else 1


def overhead_clean(report: dict[str, Any]) -> bool:
    """No scenario of the relay or of any gateway failed, saw an error or lost a frame."""
    every = [*report["scenarios"], *(s for g in report.get("gateways", ()) for s in g["scenarios"])]
    return all(
        s["failure"] is None
        and not s["direct_errors"]
        and not s["relay_errors"]
        and not s["relay"].get("frames_lost")
        and not s["direct"].get("frames_lost")
        for s in every
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "stream":
            return _run_stream(args)
        if args.command == "compare":
            return _run_compare(args)
        return _run_overhead(args)
    except RelayError as exc:
        print(f"bench: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
