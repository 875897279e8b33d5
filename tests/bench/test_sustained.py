"""Sustained streams (bench.sustained, the scenario) and the gateway benchmark's pieces.

The level judge and the search run on synthetic records; the openai direct
client runs against the in-process OpenAI emulator with a few frames; the
LiteLLM config is rendered and parsed, never installed or started.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
import trio
import yaml

from bench import litellm
from bench.__main__ import main
from bench.overhead import relay_argv, relay_variants
from bench.readers import StreamRecord
from bench.scenarios import (
    SUSTAINED_CAP,
    SUSTAINED_FRAME_DELAY_S,
    SUSTAINED_FRAMES,
    SUSTAINED_QUICK_CAP,
    scenarios,
)
from bench.sustained import LevelResult, LevelSearch, judge_level
from bench.upstreams import OPENAI, OPENAI_MODEL, PROVIDERS
from providers.openai.emulator import OpenAIBehavior, OpenAIEmulator

MS = 1_000_000


def stream(
    frames: int = 4,
    spacing_ms: float = 20.0,
    *,
    first_ms: float = 500.0,
    error: str | None = None,
    drop: int = 0,
) -> StreamRecord:
    """A finished record of ``frames`` stamps sent ``spacing_ms`` apart, each received 1 ms later.

    Args:
        frames: frames sent.
        spacing_ms: between two sends.
        first_ms: time to the first frame (not a gap).
        error: the error kind to end with, if any.
        drop: frames missing at the end.
    """
    record = StreamRecord(start_ns=0)
    for index in range(frames - drop):
        sent = int((first_ms + index * spacing_ms) * MS)
        record.text_chunk(f"[ts:{sent}]", sent + MS, stamps=True)
    if error is None:
        record.complete(int((first_ms + frames * spacing_ms) * MS))
    else:
        record.fail(error, "synthetic", int((first_ms + frames * spacing_ms) * MS))
    return record


def test_a_level_with_every_frame_on_time_is_sustained() -> None:
    """Frames 20 ms apart, none lost: sustained; the wait for frame 1 is not a gap."""
    result = judge_level([stream(), stream(first_ms=3000)], frames_per_stream=4, max_gap_ms=40)
    assert result.sustained
    assert result.reason == ""
    assert result.streams == 2
    assert result.max_gap_ms == pytest.approx(20.0)
    assert result.frames_lost == result.streams_failed == 0


def test_one_gap_over_the_limit_fails_the_level() -> None:
    """A single stream with frames 41 ms apart fails the level, naming the gap."""
    result = judge_level([stream(), stream(spacing_ms=41)], frames_per_stream=4, max_gap_ms=40)
    assert not result.sustained
    assert result.max_gap_ms == pytest.approx(41.0)
    assert "gap of 41.0 ms" in result.reason


def test_a_gap_of_exactly_the_limit_is_allowed() -> None:
    """The rule is "no gap exceeds 40 ms": 40 ms itself passes."""
    assert judge_level([stream(spacing_ms=40)], frames_per_stream=4, max_gap_ms=40).sustained


def test_a_lost_frame_or_a_failed_stream_fails_the_level() -> None:
    """A stream one frame short, or one that ended in error, fails the level."""
    lost = judge_level([stream(), stream(drop=1)], frames_per_stream=4, max_gap_ms=40)
    assert not lost.sustained
    assert lost.frames_lost == 1
    assert lost.reason == "1 frames lost"
    failed = judge_level([stream(error="timeout", drop=2)], frames_per_stream=4, max_gap_ms=40)
    assert not failed.sustained
    assert failed.errors == {"timeout": 1}
    assert failed.reason == "1 of 1 streams failed (timeout 1)"


def test_frames_merged_into_one_read_have_no_gap() -> None:
    """Two stamps in one chunk (a gateway that batches) are a gap of 0, not a loss."""
    record = StreamRecord(start_ns=0)
    record.text_chunk(f"[ts:{10 * MS}][ts:{30 * MS}]", 31 * MS, stamps=True)
    record.text_chunk(f"[ts:{50 * MS}]", 51 * MS, stamps=True)
    record.complete(52 * MS)
    result = judge_level([record], frames_per_stream=3, max_gap_ms=40)
    assert result.sustained
    assert result.max_gap_ms == pytest.approx(20.0)


def level(streams: int, sustained: bool) -> LevelResult:
    """A level outcome for the search tests."""
    return LevelResult(streams, sustained, 0, 0 if sustained else 3, 20.0, 20.0,
                       "" if sustained else "3 frames lost")  # fmt: skip


def due(search: LevelSearch) -> int | None:
    """The level due now (a call, so that mypy forgets what an earlier assert narrowed)."""
    return search.next_level


def test_search_doubles_until_a_level_fails() -> None:
    """Levels are tried in order; the figure is the last level before the first failure."""
    search = LevelSearch((1, 2, 4, 8))
    for streams in (1, 2):
        assert due(search) == streams
        search.record(level(streams, True))
    assert due(search) == 4
    search.record(level(4, False))
    assert due(search) is None
    assert search.sustained == 2
    assert not search.capped
    summary = search.as_dict()
    assert summary["sustained"] == 2
    assert summary["failed_level"] == 4
    assert summary["reason"] == "3 frames lost"
    assert [entry["streams"] for entry in summary["levels"]] == [1, 2, 4]


def test_search_that_fails_level_one_sustains_zero() -> None:
    """A failure at one stream gives 0, not "unknown"."""
    search = LevelSearch((1, 2))
    search.record(level(1, False))
    assert search.sustained == 0
    assert search.as_dict()["sustained"] == 0


def test_search_that_sustains_every_level_is_capped() -> None:
    """Every level sustained: the figure is the cap, marked as a floor."""
    search = LevelSearch((1, 2))
    search.record(level(1, True))
    search.record(level(2, True))
    assert due(search) is None
    assert search.sustained == 2
    assert search.capped
    assert search.as_dict()["capped"] is True


def test_aborted_search_has_no_figure() -> None:
    """A relay that did not start ends the search with the reason and no figure."""
    search = LevelSearch((1, 2, 4))
    search.record(level(1, True))
    search.abort("relay exited with status 1")
    assert due(search) is None
    summary = search.as_dict()
    assert summary["sustained"] is None
    assert summary["aborted"] is True
    assert summary["reason"] == "relay exited with status 1"


def test_search_refuses_a_level_out_of_turn() -> None:
    """Recording a level that is not due is a bug in the caller."""
    search = LevelSearch((1, 2))
    with pytest.raises(ValueError, match="level 2 recorded where 1 was due"):
        search.record(level(2, True))


def test_sustained_scenario_levels() -> None:
    """Full size doubles from 1 to the cap; --quick and --streams cap it lower."""
    full = {s.key: s for s in scenarios()}["sustained"]
    assert full.levels == tuple(2**i for i in range(12))
    assert full.levels[-1] == SUSTAINED_CAP
    assert full.params.frames == SUSTAINED_FRAMES == 64
    assert full.params.frame_delay_s == SUSTAINED_FRAME_DELAY_S == 0.020
    quick = {s.key: s for s in scenarios(quick=True)}["sustained"]
    assert quick.levels[-1] == SUSTAINED_QUICK_CAP
    tiny = {s.key: s for s in scenarios(streams=3, frames=5)}["sustained"]
    assert tiny.levels == (1, 2)
    assert tiny.params.frames == 5


def test_a_level_is_a_plain_paced_scenario() -> None:
    """at_level gives a scenario of that many streams, its first frame held until all are set up."""
    sustained = {s.key: s for s in scenarios()}["sustained"]
    at_256 = sustained.at_level(256)
    assert (at_256.key, at_256.streams, at_256.levels) == ("sustained-256", 256, ())
    assert at_256.params.first_delay_s == pytest.approx(0.5 + 0.004 * 256)
    assert at_256.start_spacing_s == pytest.approx(0.020 / 256)
    assert sustained.at_level(4, first_delay_s=0.05).params.first_delay_s == 0.05


def test_relay_variants_follow_the_workers_placeholder() -> None:
    """A command with {workers} is searched with 1 and 2 workers; another one as it is."""
    for provider in PROVIDERS.values():
        assert [v.key for v in relay_variants(provider.relay_cmd)] == ["relay_w1", "relay_w2"]
    other = relay_variants("other --port {port}", "relay-cmd")
    assert [(v.key, v.label, v.workers) for v in other] == [("relay", "relay-cmd", 1)]
    assert relay_variants(litellm.RELAY_CMD, "relay-cmd")[1].label == "relay-cmd --workers 2"


def test_openai_relay_command_names_the_emulator_in_json() -> None:
    """The default openai relay command sets RELAY_OPENAI_UPSTREAMS to the emulator and key."""
    argv = relay_argv(OPENAI.relay_cmd, python="py", host="127.0.0.1", port=8123,
                      upstream="http://127.0.0.1:9/v1", token="sk-k", workers=2)  # fmt: skip
    assert argv[0] == "env"
    name, _, value = argv[1].partition("=")
    assert name == "RELAY_OPENAI_UPSTREAMS"
    assert json.loads(value) == [
        {"name": "bench", "base_url": "http://127.0.0.1:9/v1", "api_keys": ["sk-k"],
         "models": [OPENAI_MODEL]}
    ]  # fmt: skip
    assert argv[2:5] == ["py", "-m", "relay"]
    assert argv[-4:-2] == ["--workers", "2"]


async def test_openai_direct_client_reads_every_stamp() -> None:
    """The direct client of --provider openai reads the emulator's SSE with its key, stamps kept."""
    emulator = OpenAIEmulator(
        keys=[OPENAI.credential], behavior=OpenAIBehavior(stamp=True, stamp_frames=4)
    )
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(emulator.serve)
            client = await OPENAI.open_direct(emulator.base_url)
            record = StreamRecord()
            await client.run_stream(record, timeout_s=4)
            nursery.cancel_scope.cancel()
    assert record.ok
    assert len(record.stamps) == 4
    assert record.stamps == sorted(record.stamps)
    assert record.first_ns is not None
    assert record.first_ns > record.start_ns


async def test_openai_direct_client_reports_a_refused_key() -> None:
    """An emulator that does not accept the key gives an http_401 record, not an exception."""
    emulator = OpenAIEmulator(keys=["sk-other"], behavior=OpenAIBehavior(stamp=True))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(emulator.serve)
            client = await OPENAI.open_direct(emulator.base_url)
            record = StreamRecord()
            await client.run_stream(record, timeout_s=4)
            nursery.cancel_scope.cancel()
    assert record.error == "http_401"
    assert not record.ok


def test_litellm_config_points_at_the_emulator() -> None:
    """The proxy's config serves the bench's model through LiteLLM's openai/ provider."""
    text = litellm.render_config("http://127.0.0.1:9/v1", 'sk-"quoted"', "emu-chat")
    config = yaml.safe_load(text)
    assert config["model_list"] == [
        {
            "model_name": "emu-chat",
            "litellm_params": {
                "model": "openai/emu-chat",
                "api_base": "http://127.0.0.1:9/v1",
                "api_key": 'sk-"quoted"',
            },
        }
    ]
    assert config["general_settings"]["disable_spend_logs"] is True
    assert "master_key" not in config["general_settings"]


def test_litellm_relay_command_and_argv() -> None:
    """The --relay-cmd fills every placeholder; the proxy gets --num_workers only above 1."""
    argv = relay_argv(litellm.RELAY_CMD, python="py", host="127.0.0.1", port=8123,
                      upstream="http://127.0.0.1:9/v1", token="sk-k", workers=2)  # fmt: skip
    assert argv[:3] == ["py", "-m", "bench.litellm"]
    assert argv[argv.index("--upstream") + 1] == "http://127.0.0.1:9/v1"
    assert argv[argv.index("--workers") + 1] == "2"
    venv = Path("/v")
    one = litellm.serve_argv(venv, "127.0.0.1", 8123, Path("/c.yaml"), 1)
    assert one == ["/v/bin/litellm", "--config", "/c.yaml", "--host", "127.0.0.1", "--port", "8123"]
    assert litellm.serve_argv(venv, "h", 1, Path("/c"), 2)[-2:] == ["--num_workers", "2"]
    assert litellm.OFFLINE_ENV["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    # 0 would leave aiohttp's cap of 100 in place: the caps must be large numbers
    assert all(int(value) >= 10_000 for value in litellm.UNCAPPED_ENV.values())


def test_litellm_serve_without_install_says_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the venv, serve exits 2 and names the install command; nothing is written."""
    status = litellm.main(["serve", "--venv", str(tmp_path / "none"), "--port", "1",
                           "--upstream", "http://127.0.0.1:9/v1", "--token", "k"])  # fmt: skip
    assert status == 2
    assert "python -m bench.litellm install" in capsys.readouterr().err


def test_openai_provider_runs_through_the_relay(tmp_path: Path) -> None:
    """--provider openai: the emulator read directly and through the relay, every frame arrives."""
    out = tmp_path / "report.json"
    status = main(["overhead", "--provider", "openai", "--scenario", "latency", "--quick",
                   "--repeats", "1", "--frames", "5", "--first-delay", "0.05", "--settle", "0.02",
                   "--no-progress", "--json", str(out)])  # fmt: skip
    report = orjson.loads(out.read_bytes())
    (latency,) = report["scenarios"]
    assert status == 0, latency["failure"]
    assert "RELAY_OPENAI_UPSTREAMS" in report["relay_cmd"]
    for mode in ("direct", "relay"):
        assert latency[mode]["frames_received"] == latency[mode]["frames_expected"] == 5
        assert latency[mode]["frames_lost"] == 0
