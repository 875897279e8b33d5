"""``bench overhead``: scenario definitions, and every scenario run tiny with real processes.

The tiny runs start the StepChat emulator and the relay as subprocesses
(``sys.executable -m ...``) on loopback, with 5 frames, 3 streams and 5 idle
streams, one repeat. They assert structure and frame accounting, never a
timing.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from bench.__main__ import main
from bench.overhead import _ClockSample, relay_argv, steady_figures
from bench.readers import StreamRecord
from bench.scenarios import scenarios, select
from protocol.errors import RequestError

if TYPE_CHECKING:
    from pathlib import Path

TINY = ["--quick", "--repeats", "1", "--frames", "5", "--streams", "3", "--idle-streams", "5",
        "--first-delay", "0.05", "--settle", "0.02", "--no-progress"]  # fmt: skip
SCENARIO_KEYS = [
    "latency",
    "throughput-1",
    "throughput-16",
    "concurrency-500",
    "concurrency-200",
    "idle",
    "sustained",
]
FIGURES = {"frames_expected", "frames_received", "frames_lost", "streams_ok", "wall_s"}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny `python -m bench overhead` run over every scenario, its JSON report."""
    out = tmp_path_factory.mktemp("overhead") / "report.json"
    status = main(["overhead", *TINY, "--json", str(out)])
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    report["exit_status"] = status
    return report


def scenario(report: dict[str, Any], key: str) -> dict[str, Any]:
    """The result of scenario ``key`` in ``report``."""
    found: dict[str, Any] = next(s for s in report["scenarios"] if s["key"] == key)
    return found


def test_tiny_run_covers_every_scenario(tiny_report: dict[str, Any]) -> None:
    """Every scenario ran once in both modes, without failure; the command exited 0."""
    assert tiny_report["exit_status"] == 0
    assert [s["key"] for s in tiny_report["scenarios"]] == SCENARIO_KEYS
    assert set(tiny_report) >= {"tool", "options", "machine", "relay_cmd", "scenarios"}
    for result in tiny_report["scenarios"]:
        assert result["failure"] is None, result["failure"]
        assert result["repeats"] == 1
        assert len(result["direct_runs"]) == len(result["relay_runs"]) == 1
        assert result["direct_errors"] == result["relay_errors"] == {}
        if result["key"] == "sustained":
            continue  # its figures are levels (test_sustained_scenario_searches_every_mode)
        assert set(result["direct"]) >= FIGURES
        assert set(result["relay"]) >= FIGURES


def test_run_without_gateways_keeps_the_single_report(tiny_report: dict[str, Any]) -> None:
    """Without --gateway the report has no gateways, no order and no gateways option."""
    assert "gateways" not in tiny_report
    assert "order" not in tiny_report
    assert "gateways" not in tiny_report["options"]


def test_sustained_scenario_searches_every_mode(tiny_report: dict[str, Any]) -> None:
    """Sustained: direct and the relay with 1 and 2 workers each searched from level 1.

    The figures are levels (at most the cap, 2 here), each relay is judged
    against half of direct's level, and every level tried delivered its
    frames' accounting. Whether a level held is timing, so it is not asserted.
    """
    result = scenario(tiny_report, "sustained")
    modes = result["sustained"]["modes"]
    assert list(modes) == ["direct", "relay_w1", "relay_w2"]
    for mode in modes.values():
        (run,) = mode["runs"]
        tried = [level["streams"] for level in run["levels"]]
        assert tried in ([1], [1, 2]), run
        assert run["sustained"] == mode["sustained"] in (0, 1, 2)
        assert run["aborted"] is False
    assert set(result["direct"]) == {"sustained_streams"}
    assert set(result["relay"]) == {"sustained_streams", "sustained_streams_w2"}
    assert [v["figure"] for v in result["verdicts"]] == [
        "sustained_streams", "sustained_streams_w2"
    ]


@pytest.mark.parametrize(
    ("key", "streams", "frames"),
    [
        ("latency", 1, 5),
        ("throughput-1", 1, 5),
        ("throughput-16", 3, 5),
        ("concurrency-500", 3, 5),
        ("concurrency-200", 3, 5),
    ],
)
def test_streaming_scenarios_lose_no_frame(
    tiny_report: dict[str, Any], key: str, streams: int, frames: int
) -> None:
    """Each streaming scenario delivered every stamped frame, directly and through the relay."""
    result = scenario(tiny_report, key)
    assert result["streams"] == streams
    for mode in ("direct", "relay"):
        figures = result[mode]
        assert figures["frames_expected"] == streams * frames
        assert figures["frames_received"] == streams * frames
        assert figures["frames_lost"] == 0
        assert figures["duplicates"] == figures["out_of_order"] == 0
        assert figures["streams_ok"] == streams
        assert figures["latency_ms_p50"] is not None
    assert result["relay"]["cpu_us_per_chunk"] is not None
    assert "cpu_us_per_chunk" not in result["direct"]


def test_latency_scenario_has_ttft_and_targets(tiny_report: dict[str, Any]) -> None:
    """The latency scenario reports TTFT in both modes and judges its three targets."""
    result = scenario(tiny_report, "latency")
    assert result["direct"]["ttft_ms_p50"] is not None
    assert result["relay"]["ttft_ms_p50"] is not None
    assert [v["figure"] for v in result["verdicts"]] == [
        "ttft_ms_p50",
        "latency_ms_p50",
        "latency_ms_p99",
    ]
    assert all(v["result"] in ("PASS", "MISS") for v in result["verdicts"])


def test_concurrency_scenarios_report_gaps_and_loss_targets(tiny_report: dict[str, Any]) -> None:
    """The concurrency scenarios report the largest gaps and judge 'no frame lost' as PASS."""
    for key in ("concurrency-500", "concurrency-200"):
        result = scenario(tiny_report, key)
        assert result["relay"]["max_gap_ms"] is not None
        assert result["relay"]["max_send_gap_ms"] is not None
        lost = [v for v in result["verdicts"] if v["figure"] == "frames_lost"]
        assert [v["result"] for v in lost] == ["PASS"]


def test_idle_scenario_measures_relay_memory(tiny_report: dict[str, Any]) -> None:
    """Idle: every stream got its first frame and was held; relay RSS figures are present."""
    result = scenario(tiny_report, "idle")
    relay = result["relay"]
    assert result["streams"] == 5
    assert relay["frames_expected"] == relay["frames_received"] == 5
    assert relay["streams_ok"] == 5
    assert relay["rss_kib_open"] > 0
    assert relay["rss_kib_per_stream"] is not None
    assert [v["figure"] for v in result["verdicts"]] == ["rss_kib_per_stream"]


def test_idle_repeats_measure_fresh_processes_on_both_sides(tmp_path: Path) -> None:
    """Each idle repeat starts a new emulator as well as a new relay.

    A second run in the same emulator measured the growth of a heap the first
    run had already grown: the direct column read about 1 KiB per stream
    instead of 25.
    """
    logs = tmp_path / "logs"
    out = tmp_path / "report.json"
    argv = ["overhead", *TINY, "--repeats", "2", "--scenario", "idle", "--log-dir", str(logs)]
    assert main([*argv, "--json", str(out)]) == 0
    result = scenario(orjson.loads(out.read_bytes()), "idle")
    assert result["repeats"] == 2
    assert sorted(p.name for p in logs.glob("idle-emulator-*.log")) == [
        "idle-emulator-1.log", "idle-emulator-2.log"
    ]
    assert sorted(p.name for p in logs.glob("idle-relay-*.log")) == [
        "idle-relay-1.log", "idle-relay-2.log"
    ]


def test_other_relay_command_with_placeholders(tmp_path: Path) -> None:
    """--relay-cmd starts the given command with {python} {host} {port} {upstream} {token}."""
    out = tmp_path / "report.json"
    command = (
        "{python} -m relay serve --host {host} --port {port} --step-base-url {upstream}"
        " --log-level error"
    )
    status = main(["overhead", *TINY, "--scenario", "latency", "--relay-cmd", command,
                   "--api-key", "{token}", "--json", str(out)])  # fmt: skip
    report = orjson.loads(out.read_bytes())
    assert status == 0
    assert report["relay_cmd"] == command
    assert report["options"]["api_key"] == "***"
    assert scenario(report, "latency")["relay"]["frames_lost"] == 0


def test_relay_that_does_not_start_fails_the_scenario(tmp_path: Path) -> None:
    """A relay command that exits is reported as the scenario's failure, exit status 1."""
    out = tmp_path / "report.json"
    command = "{python} -c 'raise SystemExit(3)'"
    status = main(["overhead", *TINY, "--scenario", "latency", "--relay-cmd", command,
                   "--json", str(out)])  # fmt: skip
    report = orjson.loads(out.read_bytes())
    failure = scenario(report, "latency")["failure"]
    assert status == 1
    assert failure is not None
    assert "exited with status 3" in failure


def test_full_scenarios_match_the_issue() -> None:
    """Full size: the counts and pacing the issue asks for."""
    by_key = {s.key: s for s in scenarios()}
    assert list(by_key) == SCENARIO_KEYS
    latency = by_key["latency"]
    assert (latency.streams, latency.params.frames, latency.params.frame_delay_s) == (1, 200, 0.002)
    assert by_key["throughput-1"].streams == 1
    assert by_key["throughput-16"].streams == 16
    assert by_key["throughput-16"].params.frame_delay_s == 0.0
    c500, c200 = by_key["concurrency-500"], by_key["concurrency-200"]
    assert (c500.streams, c500.params.frames, c500.params.frame_delay_s) == (500, 100, 0.020)
    assert (c200.streams, c200.params.frame_delay_s) == (200, 0.010)
    assert by_key["idle"].streams == 1000
    assert by_key["idle"].params.stall_after == 1
    assert by_key["idle"].frames_per_stream == 1
    sustained = by_key["sustained"]
    assert (sustained.levels[0], sustained.levels[-1]) == (1, 2048)
    assert (sustained.params.frames, sustained.params.frame_delay_s) == (64, 0.020)


def test_quick_and_overrides_scale_down() -> None:
    """--quick uses small counts; --frames/--streams/--idle-streams override them."""
    quick = {s.key: s for s in scenarios(quick=True)}
    assert quick["latency"].params.frames == 50
    assert quick["concurrency-500"].streams == 50
    assert quick["idle"].streams == 100
    tiny = {s.key: s for s in scenarios(quick=True, frames=5, streams=3, idle_streams=5)}
    assert {s.params.frames for k, s in tiny.items() if k != "idle"} == {5}
    assert tiny["throughput-16"].streams == tiny["concurrency-200"].streams == 3
    assert tiny["latency"].streams == tiny["throughput-1"].streams == 1
    assert tiny["idle"].streams == 5


def test_paced_streams_start_spread_over_one_interval() -> None:
    """Paced scenarios spread stream starts over one frame interval; others start at once."""
    by_key = {s.key: s for s in scenarios()}
    assert by_key["concurrency-500"].start_spacing_s == pytest.approx(0.020 / 500)
    assert by_key["throughput-16"].start_spacing_s == 0.0
    assert by_key["latency"].start_spacing_s == 0.0
    assert by_key["idle"].start_spacing_s == 0.0


def test_select_by_group_or_key() -> None:
    """--scenario takes keys or groups; an unknown name is refused."""
    every = scenarios()
    assert [s.key for s in select(every, "throughput")] == ["throughput-1", "throughput-16"]
    assert [s.key for s in select(every, "idle, latency")] == ["latency", "idle"]
    assert select(every, None) == every
    with pytest.raises(RequestError, match="unknown scenario"):
        select(every, "latency,warp")


def test_relay_argv_fills_placeholders() -> None:
    """Placeholders are filled per argument, so values with spaces stay one argument."""
    argv = relay_argv(
        "{python} -m relay serve --port {port} --step-base-url {upstream}",
        python="/opt/my python/bin/python",
        port=8123,
        upstream="http://127.0.0.1:9",
    )
    assert argv == ["/opt/my python/bin/python", "-m", "relay", "serve", "--port", "8123",
                    "--step-base-url", "http://127.0.0.1:9"]  # fmt: skip
    with pytest.raises(RequestError, match="placeholder"):
        relay_argv("{python} --x {nope}", python=sys.executable)


def test_steady_figures_cover_only_the_window_where_every_stream_flows() -> None:
    """Busy and waiting shares come from the samples between the last first stamp and the
    first last stamp; too few samples there give nothing."""
    ms = 1_000_000

    def record(first_ms: int, last_ms: int) -> StreamRecord:
        got = StreamRecord()
        got.stamp_ns = [first_ms * ms, last_ms * ms]
        return got

    def sample(at_ms: int, cpu: float, waited: float) -> _ClockSample:
        return _ClockSample(at_ms * ms, {"relay": cpu, "client": None}, {"relay": waited})

    records = [record(100, 900), record(150, 800)]  # all flowing from 150 to 800 ms
    clocks = [
        sample(0, 0.0, 0.0),  # setup: left out
        sample(200, 1.0, 0.1),
        sample(700, 1.25, 0.15),  # 0.5 s later: 0.25 s busy, 0.05 s waiting
        sample(850, 9.0, 9.0),  # after the first stream ended: left out
    ]
    figures = steady_figures(records, clocks)
    assert figures["steady_s"] == pytest.approx(0.5)
    assert figures["relay_cpu_pct_steady"] == pytest.approx(50.0)
    assert figures["relay_runq_pct_steady"] == pytest.approx(10.0)
    assert "client_cpu_pct_steady" not in figures  # its clock could not be read
    assert steady_figures(records, clocks[:2]) == {}  # one sample in the window
    assert steady_figures([*records, StreamRecord()], clocks) == {}  # a stream never flowed
