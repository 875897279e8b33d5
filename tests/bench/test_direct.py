"""The direct StepChat client (bench.upstreams) against the in-process emulator, and bench.wire."""

from __future__ import annotations

import pytest
import trio

from bench.readers import StreamRecord
from bench.upstreams import STEP, EmulatorParams, StepDirect
from bench.wire import Endpoint
from protocol.errors import AuthError, RequestError
from providers.step.emulator import StepBehavior, StepEmulator


@pytest.fixture
async def emulator(nursery: trio.Nursery) -> StepEmulator:
    """A StepChat emulator in stamp mode, 4 frames, accepting any token."""
    step = StepEmulator(behavior=StepBehavior(stamp=True, stamp_frames=4))
    await nursery.start(step.serve)
    return step


async def run_one(emulator: StepEmulator) -> StreamRecord:
    """Register, then run one direct stream."""
    with trio.fail_after(5):
        client = await STEP.open_direct(emulator.base_url)
        record = StreamRecord()
        await client.run_stream(record, timeout_s=4)
    return record


async def test_direct_stream_reads_every_stamp_and_deletes_the_chat(
    emulator: StepEmulator,
) -> None:
    """A direct stream registers once, creates a chat, reads 4 stamps, then deletes the chat."""
    record = await run_one(emulator)
    assert record.ok
    assert len(record.stamps) == 4
    assert record.stamps == sorted(record.stamps)
    assert record.first_ns is not None
    assert record.first_ns > record.start_ns
    assert emulator.record.registers == 1
    assert emulator.record.chats_created == emulator.record.chats_deleted
    assert len(emulator.record.chats_created) == 1


@pytest.mark.parametrize(
    ("behavior", "kind"),
    [
        (StepBehavior(stamp=True, stamp_frames=4, end_error=("internal", "boom")), "inband_error"),
        (StepBehavior(stamp=True, stamp_frames=4, drop_after=2), "cut_off"),
        (StepBehavior(stamp=True, stamp_frames=4, omit_done=True, omit_end=True), "no_done"),
        (StepBehavior(stamp=True, stamp_frames=4, malformed_after=1), "bad_frame"),
        (StepBehavior(create_error=(429, "resource_exhausted", "busy")), "http_429"),
        (StepBehavior(stream_http_error=(503, "unavailable", "down")), "http_503"),
    ],
)
async def test_direct_stream_failures_are_classified(
    emulator: StepEmulator, behavior: StepBehavior, kind: str
) -> None:
    """Upstream failures of every sort end as the matching error kind, never as success."""
    emulator.behavior = behavior
    record = await run_one(emulator)
    assert record.error == kind
    assert not record.ok


async def test_direct_stream_timeout(emulator: StepEmulator) -> None:
    """A stalled upstream is bounded by the stream timeout."""
    emulator.behavior = StepBehavior(stamp=True, stamp_frames=4, stall_after=1)
    with trio.fail_after(5):
        client = await STEP.open_direct(emulator.base_url)
        record = StreamRecord()
        await client.run_stream(record, timeout_s=0.2)
    assert record.error == "timeout"
    assert record.stamps  # the frame before the stall arrived


async def test_register_refused_raises(nursery: trio.Nursery) -> None:
    """An emulator that does not accept the credential makes setup fail with AuthError."""
    strict = StepEmulator(tokens=["someone-else"])
    await nursery.start(strict.serve)
    with trio.fail_after(5), pytest.raises(AuthError):
        await StepDirect.register(strict.base_url, STEP.credential)


def test_emulator_command_has_the_scenario_knobs() -> None:
    """The emulator argv carries stamp mode, frames, delays and the stall."""
    argv = STEP.emulator_command("py", EmulatorParams(7, 0.01, 0.5, stall_after=1))
    assert argv[:3] == ["py", "-m", "providers.step.emulator"]
    text = " ".join(argv)
    assert "--stamp" in argv
    assert "--frames 7" in text
    assert "--frame-delay-s 0.01" in text
    assert "--first-delay-s 0.5" in text
    assert "--stall-after 1" in text
    assert "--port 0" in text


def test_endpoint_parse() -> None:
    """Base URLs give scheme, host, port (defaulted) and a prefix without a trailing slash."""
    endpoint = Endpoint.parse("http://127.0.0.1:8000/v1/")
    assert endpoint == Endpoint("http", "127.0.0.1", 8000, "/v1")
    assert endpoint.target("/chat/completions") == b"/v1/chat/completions"
    assert endpoint.host_header == b"127.0.0.1:8000"
    secure = Endpoint.parse("https://api.example.com/v1")
    assert secure.port == 443
    assert secure.host_header == b"api.example.com"
    assert Endpoint.parse("http://[::1]:81").host_header == b"[::1]:81"
    for bad in ("ftp://x/", "127.0.0.1:8000", "http://h/v1?x=1", "http://h:99999"):
        with pytest.raises(RequestError):
            Endpoint.parse(bad)
