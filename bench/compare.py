"""``python -m bench compare``: headline figures of several ``bench overhead`` reports side by side.

Theory of operation
-------------------
The gateway benchmark measures the relay and other gateways on the same
emulator. Best in one run: ``bench overhead --provider openai --gateway
NAME=CMD`` measures each gateway beside the relay, turn by turn within
every repeat, and writes one report holding the relay's scenarios at the
top level and each gateway's under ``gateways``; :func:`gateway_reports`
splits such a report into one plain report per gateway, labelled
``relay`` and NAME, so one file gives the whole comparison. Reports of
separate runs (``--relay-cmd`` for the other gateway) are read as they
are, labelled by :func:`gateway_label`.

From each report this module takes the figures the issue names
(:data:`HEADLINES`): what the gateway *adds* over its own direct floor
(time to first token, per-chunk latency p50 and p99), its CPU per chunk,
its memory per idle stream, the frames it lost, and the sustained levels.
"Added" is always against the floor measured with the same gateway (in a
run with gateways, each gateway's direct runs come right before its own),
so two runs an hour apart still compare fairly as long as each had a quiet
machine; the machine and time of each report are printed beside the
figures, and in a run with gateways they are one and the same.

Everything here is pure: :func:`headlines` maps a report to named values,
:func:`sustained_levels` its sustained levels by mode; the table and the
plot (:func:`bench.plot.plot_comparison`) only draw them. Labels are made
unique (:func:`unique_labels`): the plot's bars are keyed by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Headline:
    """One figure of the comparison.

    Attributes:
        key: its name in :func:`headlines`' result.
        label: how the table and the plot title it.
        scenario: the scenario it comes from (``*``: all of them).
        figure: the figure's name in that scenario's results.
        basis: ``added`` (gateway minus direct), ``relay`` (the gateway's
            own figure) or ``sum`` (the gateway's, added over scenarios).
        spec: the number format.
    """

    key: str
    label: str
    scenario: str
    figure: str
    basis: Literal["added", "relay", "sum"]
    spec: str


#: The figures the issue asks to show beside each gateway (lower is better for all).
HEADLINES = (
    Headline("ttft", "added time to first token p50 (ms)", "latency", "ttft_ms_p50", "added",
             "{:.2f}"),
    Headline("chunk_p50", "added inter-chunk latency p50 (ms)", "latency", "latency_ms_p50",
             "added", "{:.3f}"),
    Headline("chunk_p99", "added inter-chunk latency p99 (ms)", "latency", "latency_ms_p99",
             "added", "{:.3f}"),
    Headline("chunk_p99_200", "added per-chunk p99, 200 paced streams (ms)", "concurrency-200",
             "latency_ms_p99", "added", "{:.1f}"),
    Headline("cpu", "CPU per chunk, 16 streams (us)", "throughput-16", "cpu_us_per_chunk",
             "relay", "{:.1f}"),
    Headline("cpu_200", "CPU per chunk, 200 paced streams (us)", "concurrency-200",
             "cpu_us_per_chunk", "relay", "{:.1f}"),
    Headline("rss", "memory per idle stream (KiB)", "idle", "rss_kib_per_stream", "relay",
             "{:.1f}"),
    Headline("lost", "frames lost, all scenarios", "*", "frames_lost", "sum", "{:.0f}"),
)  # fmt: skip


def _scenario(report: dict[str, Any], key: str) -> dict[str, Any] | None:
    for scenario in report.get("scenarios", ()):
        if scenario.get("key") == key:
            found: dict[str, Any] = scenario
            return found
    return None


def headlines(report: dict[str, Any]) -> dict[str, float | None]:
    """The :data:`HEADLINES` of one ``bench overhead`` report; None where it has no such figure."""
    values: dict[str, float | None] = {}
    for headline in HEADLINES:
        if headline.basis == "sum":
            counts = [
                s["relay"][headline.figure]
                for s in report.get("scenarios", ())
                if s.get("relay", {}).get(headline.figure) is not None
            ]
            values[headline.key] = float(sum(counts)) if counts else None
            continue
        scenario = _scenario(report, headline.scenario)
        if scenario is None:
            values[headline.key] = None
            continue
        relay = scenario["relay"].get(headline.figure)
        if headline.basis == "relay":
            values[headline.key] = relay
            continue
        direct = scenario["direct"].get(headline.figure)
        values[headline.key] = None if relay is None or direct is None else relay - direct
    return values


def sustained_levels(report: dict[str, Any]) -> dict[str, float | None]:
    """The sustained level of each mode of a report (``direct``, ``relay_w1``, ...), in order."""
    scenario = _scenario(report, "sustained")
    if scenario is None or not scenario.get("sustained"):
        return {}
    return {key: mode["sustained"] for key, mode in scenario["sustained"]["modes"].items()}


def gateway_label(report: dict[str, Any]) -> str:
    """A name for the gateway a report measured: ``LiteLLM`` for bench.litellm, else ``relay``."""
    command = str(report.get("relay_cmd", ""))
    return "LiteLLM" if "bench.litellm" in command or "litellm" in command.split()[0:1] else "relay"


def gateway_reports(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A report as ``(label, plain report)`` pairs, one per gateway it measured.

    A report of ``bench overhead --gateway`` gives ``("relay", its top
    level)`` and then ``(NAME, ...)`` per gateway: the top level with that
    gateway's ``relay_cmd`` and ``scenarios`` (same machine and options);
    neither has ``gateways`` or ``order``. Any other report gives itself,
    labelled by :func:`gateway_label`.
    """
    gateways = report.get("gateways")
    if not gateways:
        return [(gateway_label(report), report)]
    top = {key: value for key, value in report.items() if key not in ("gateways", "order")}
    pairs = [("relay", top)]
    for gateway in gateways:
        name = str(gateway["name"])
        pairs.append(
            (name, {**top, "relay_cmd": gateway["relay_cmd"], "scenarios": gateway["scenarios"]})
        )
    return pairs


def unique_labels(labels: list[str]) -> list[str]:
    """``labels`` with a repeated one numbered from its second use: ``relay``, ``relay (2)``."""
    used: set[str] = set()
    out: list[str] = []
    for label in labels:
        candidate, count = label, 1
        while candidate in used:
            count += 1
            candidate = f"{label} ({count})"
        used.add(candidate)
        out.append(candidate)
    return out


def mode_label(gateway: str, mode: str) -> str:
    """``direct``, or the gateway with its worker count (``relay w2``)."""
    if mode == "direct":
        return "direct"
    if mode.startswith("relay_w"):
        return f"{gateway} w{mode[7:]}"
    return gateway
