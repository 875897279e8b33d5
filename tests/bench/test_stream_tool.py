"""``bench stream`` against a fake OpenAI server on loopback: timings, checks, CLI, outputs."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import orjson
import pytest
import trio

from bench.__main__ import main
from bench.plot import cdf_points
from bench.stream import StreamOptions, report_of, run_streams, summarize_run
from protocol.errors import RequestError
from tests.bench.fake_openai import GOOD_TEXT, FakeOpenAI

if TYPE_CHECKING:
    from pathlib import Path

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOpenAI:
    """A fake OpenAI server in the test's nursery."""
    server = FakeOpenAI()
    await nursery.start(server.serve)
    return server


async def test_good_streams_are_timed(fake: FakeOpenAI) -> None:
    """Complete streams count as ok, with TTFT, inter-chunk gaps, chunks and characters."""
    options = StreamOptions(base_url=fake.base_url, model="good", requests=4, concurrency=2)
    with trio.fail_after(5):
        run = await run_streams(options)
    summary = summarize_run(run)
    assert fake.requests == 4
    assert summary["ok"] == 4
    assert summary["failed"] == 0
    assert summary["errors"] == {}
    figures = summary["figures"]
    assert figures["ttft_ms"]["n"] == 4
    assert figures["ttft_ms"]["p50"] > 0
    assert figures["inter_chunk_ms"]["n"] == 4 * (len(GOOD_TEXT) - 1)
    assert figures["total_s"]["n"] == 4
    assert figures["stream_chars_per_s"]["n"] == 4
    assert summary["aggregate"]["chunks"] == 4 * len(GOOD_TEXT)
    assert summary["aggregate"]["chars"] == 4 * len("".join(GOOD_TEXT))


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("nodone", "no_done"),
        ("inband", "inband_error"),
        ("cutoff", "cut_off"),
        ("http500", "http_500"),
        ("notsse", "not_sse"),
    ],
)
async def test_bad_streams_are_errors_not_fast_successes(
    fake: FakeOpenAI, model: str, kind: str
) -> None:
    """Streams without [DONE], with an in-band error, cut off or refused are counted as errors."""
    options = StreamOptions(base_url=fake.base_url, model=model, requests=2, concurrency=2)
    with trio.fail_after(5):
        run = await run_streams(options)
    summary = summarize_run(run)
    assert summary["errors"] == {kind: 2}
    assert summary["ok"] == 0
    assert summary["figures"]["ttft_ms"]["n"] == 0
    assert summary["figures"]["inter_chunk_ms"]["n"] == 0
    assert len(summary["error_samples"]) == 2


async def test_stalled_stream_times_out(fake: FakeOpenAI) -> None:
    """A stream that goes silent is bounded by --timeout and counted as a timeout."""
    options = StreamOptions(base_url=fake.base_url, model="stall", requests=1, timeout_s=0.2)
    with trio.fail_after(5):
        run = await run_streams(options)
    assert summarize_run(run)["errors"] == {"timeout": 1}


async def test_connection_refused_is_a_connect_error() -> None:
    """Nothing listening: every stream fails with kind 'connect'."""
    with trio.fail_after(5):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()  # the port is now closed
        options = StreamOptions(base_url=f"http://127.0.0.1:{port}/v1", requests=2)
        run = await run_streams(options)
    assert summarize_run(run)["errors"] == {"connect": 2}


async def test_duration_mode_is_bounded(fake: FakeOpenAI) -> None:
    """--duration starts streams until the time is up, then lets them finish."""
    options = StreamOptions(base_url=fake.base_url, model="good", duration_s=0.15, concurrency=2)
    with trio.fail_after(5):
        run = await run_streams(options)
    summary = summarize_run(run)
    assert summary["requests"] >= 2
    assert summary["ok"] == summary["requests"]


def test_bad_options_are_refused() -> None:
    """Both bounds, no valid URL, or zero concurrency are refused before any request."""
    with pytest.raises(RequestError, match="not both"):
        StreamOptions(requests=1, duration_s=1.0).check()
    with pytest.raises(RequestError, match="http"):
        StreamOptions(base_url="ftp://x").check()
    with pytest.raises(RequestError, match="concurrency"):
        StreamOptions(concurrency=0).check()


async def test_report_hides_the_api_key(fake: FakeOpenAI) -> None:
    """The JSON report keeps per-stream rows but never the API key."""
    options = StreamOptions(base_url=fake.base_url, model="good", requests=2, api_key="sk-secret")
    with trio.fail_after(5):
        run = await run_streams(options)
    report = report_of(options, run)
    assert report["options"]["api_key"] == "***"
    assert b"sk-secret" not in orjson.dumps(report)
    assert [row["ok"] for row in report["streams"]] == [True, True]


async def test_cli_writes_json_and_prints_a_table(
    fake: FakeOpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m bench stream --json` exits 0, prints the table and writes the report."""
    out = tmp_path / "report.json"
    argv = ["stream", "--base-url", fake.base_url, "--model", "good", "--requests", "3",
            "--concurrency", "2", "--no-progress", "--json", str(out)]  # fmt: skip
    with trio.fail_after(10):
        status = await trio.to_thread.run_sync(main, argv)
    assert status == 0
    report = orjson.loads(out.read_bytes())
    assert set(report) == {"tool", "options", "summary", "streams"}
    assert len(report["streams"]) == 3
    assert report["summary"]["ok"] == 3
    printed = capsys.readouterr().out
    assert "time to first token" in printed
    assert "inter-chunk latency" in printed


async def test_cli_exit_status_reports_errors(
    fake: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failed streams make the command exit 1 and show the errors by kind."""
    argv = ["stream", "--base-url", fake.base_url, "--model", "nodone", "--requests", "2",
            "--no-progress"]  # fmt: skip
    with trio.fail_after(10):
        status = await trio.to_thread.run_sync(main, argv)
    assert status == 1
    assert "no_done" in capsys.readouterr().out


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="matplotlib is installed")
def test_plot_without_matplotlib_names_the_extra(capsys: pytest.CaptureFixture[str]) -> None:
    """Without matplotlib, --plot fails at once (before any request) naming the extra."""
    status = main(["stream", "--base-url", "http://127.0.0.1:9/v1", "--plot", "x.png"])
    assert status == 2
    assert "pip install trio-llm-relay[plot]" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the plot extra) is not installed")
async def test_plot_writes_a_png(fake: FakeOpenAI, tmp_path: Path) -> None:
    """With matplotlib, --plot writes a PNG of the latency CDF and the timeline."""
    out = tmp_path / "plot.png"
    argv = ["stream", "--base-url", fake.base_url, "--model", "good", "--requests", "3",
            "--no-progress", "--plot", str(out)]  # fmt: skip
    with trio.fail_after(20):
        status = await trio.to_thread.run_sync(main, argv)
    assert status == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_cdf_points() -> None:
    """The CDF of a sample is its sorted values with cumulative shares ending at 1."""
    assert cdf_points([3.0, 1.0, 2.0, 2.0]) == ([1.0, 2.0, 2.0, 3.0], [0.25, 0.5, 0.75, 1.0])
    assert cdf_points([]) == ([], [])
