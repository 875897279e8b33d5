"""The operator's view of each request (issue 15): request ids, the access line, metrics.

Every response carries ``X-Request-Id`` (the client's when it is sane, else
ours), an in-band error names it, the access line carries the request's
facts as fields in JSON mode (and never a credential), and ``/metrics``
has the histograms an operator alerts on, without ``_created`` series.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING

import httpcore
import orjson
import pytest
import trio

from relay.cli import _JsonFormatter
from tests.relay.conftest import (
    AUTH,
    STEP_CREDENTIAL,
    STEP_TOKEN,
    Running,
    chat_body,
    post,
    sse_events,
)

if TYPE_CHECKING:
    from providers.glm.emulator import GlmEmulator
    from providers.step.emulator import StepEmulator
    from tests.relay.conftest import RelayFactory

PATH = "/v1/chat/completions"
OUR_ID = re.compile(r"[0-9a-f]{32}")


def _request_id(response: httpcore.Response) -> str:
    ids = [value.decode() for key, value in response.headers if key.lower() == b"x-request-id"]
    assert len(ids) == 1, response.headers
    return ids[0]


@pytest.mark.parametrize(("sent", "kept"), [
    (b"req-123_abc.DEF:9", True),
    (b"0f8fad5b-d9cb-469f-a165-70867728950e", True),
    (b"has spaces", False),
    (b'quote"s', False),
    (b"x" * 129, False),
    (b"", False),
])
async def test_request_id_is_honoured_when_sane(relay: Running, sent: bytes, kept: bool) -> None:
    """A sane X-Request-Id comes back as sent; anything else is replaced by one of ours."""
    with trio.fail_after(10):
        response = await post(relay.base_url, PATH, chat_body(),
                              headers=[*AUTH, (b"x-request-id", sent)])
    assert response.status == 200
    got = _request_id(response)
    if kept:
        assert got == sent.decode()
    else:
        assert OUR_ID.fullmatch(got), got


async def test_every_response_has_a_request_id(relay: Running) -> None:
    """Errors (404, 400, a malformed request head refused by the server) carry one too,
    each request its own."""
    with trio.fail_after(10):
        missing = await post(relay.base_url, "/nowhere", b"{}")
        bad = await post(relay.base_url, PATH, b"[]")
        stream = await trio.open_tcp_stream(relay.host, relay.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                raw += chunk
    assert missing.status == 404
    assert bad.status == 400
    ids = {_request_id(missing), _request_id(bad)}
    assert len(ids) == 2
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", raw), raw


async def test_in_band_errors_name_the_request(relay: Running, step: StepEmulator) -> None:
    """An upstream that drops mid-stream: the SSE error event names the request id the
    client got in the response head, so the two can be matched in the logs."""
    step.behavior.text_frames = ["a", "b", "c"]
    step.behavior.drop_after = 2
    with trio.fail_after(10):
        response = await post(relay.base_url, PATH, chat_body(stream=True),
                              headers=[*AUTH, (b"x-request-id", b"trace-42")])
    assert _request_id(response) == "trace-42"
    errors = [orjson.loads(e)["error"] for e in sse_events(response.content)
              if e != b"[DONE]" and b'"error"' in e]
    assert len(errors) == 1
    assert "(request id trace-42)" in errors[0]["message"]


async def test_json_access_line_has_the_requests_facts(
    relay: Running, step: StepEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """One access record per request, with real fields in JSON mode; no credential."""
    caplog.set_level(logging.INFO, logger="relay.access")
    step.behavior.answer = "Hello there, world"
    with trio.fail_after(10):
        response = await post(relay.base_url, PATH, chat_body(stream=True),
                              headers=[*AUTH, (b"x-request-id", b"line-1")])
        await relay.settled()
    assert response.status == 200
    [record] = [r for r in caplog.records if r.name == "relay.access"]
    line = json.loads(_JsonFormatter().format(record))
    assert line["msg"] == "access"
    assert line["request_id"] == "line-1"
    assert (line["method"], line["path"], line["status"]) == ("POST", PATH, 200)
    assert (line["provider"], line["model"], line["stream"]) == ("step", "step", True)
    assert line["end"] == "done"
    assert line["client"].startswith("127.0.0.1:")
    assert line["bytes_out"] == len(response.content)
    assert 0 <= line["ttft_ms"] <= line["duration_ms"]
    assert line["prompt_tokens"] > 0
    assert line["completion_tokens"] == 5  # "Hello there, world": 18 ASCII characters
    assert len(line["account"]) == 10
    text = json.dumps(line) + record.getMessage()
    assert STEP_TOKEN not in text
    assert STEP_CREDENTIAL not in text


async def test_access_line_says_why_the_answer_ended(
    relay: Running, step: StepEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """stop and length are told apart from a plain done, and an upstream failure."""
    caplog.set_level(logging.INFO, logger="relay.access")
    step.behavior.answer = "one two three four five six seven eight"
    with trio.fail_after(10):
        for extra in ({"stop": ["four"]}, {"max_tokens": 2}, {}):
            await post(relay.base_url, PATH, chat_body(**extra))
        step.behavior.stream_http_error = (500, "internal", "boom")
        await post(relay.base_url, PATH, chat_body())
        await relay.settled()
    ends = [record.__dict__["access"]["end"] for record in caplog.records
            if record.name == "relay.access"]
    assert ends == ["stop", "length", "done", "upstream_error"]


async def test_metrics_have_latency_histograms_and_no_created_series(
    relay: Running, step: StepEmulator
) -> None:
    """After a streamed answer of several writes: request duration, time to first token
    and inter-chunk gaps are histograms in seconds; requests carry provider and model;
    an upstream failure is counted by kind."""
    step.behavior.text_frames = ["a", "b", "c", "d"]
    step.behavior.frame_delay_s = 0.01
    with trio.fail_after(10):
        await post(relay.base_url, PATH, chat_body(stream=True))
        step.behavior.text_frames = None
        step.behavior.stream_http_error = (500, "internal", "boom")
        failed = await post(relay.base_url, PATH, chat_body())
        await relay.settled()
    assert failed.status == 502
    text = relay.app.metrics.render().decode()
    assert "_created" not in text
    assert 'relay_requests_total{model="step",provider="step",route="/v1/chat/completions",' \
           'status="200"} 1.0' in text
    assert 'relay_time_to_first_token_seconds_count{provider="step"} 1.0' in text
    assert re.search(r'relay_request_duration_seconds_count\{provider="step",'
                     r'route="/v1/chat/completions"\} 2\.0', text)
    gaps = re.search(r'relay_inter_chunk_gap_seconds_count\{provider="step"\} (\d+)\.0', text)
    assert gaps is not None
    assert int(gaps.group(1)) >= 2
    assert re.search(r'relay_upstream_errors_total\{kind="[a-z_]+",provider="step"\} 1\.0',
                     text)
    assert 'relay_active_streams{provider="step"} 0.0' in text
    assert "# TYPE relay_account_logins_total counter" in text


# --- readiness ------------------------------------------------------------------------------


async def _get(base_url: str, path: str) -> httpcore.Response:
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request("GET", base_url + path)


async def test_ready_in_open_mode_and_while_shutting_down(relay: Running) -> None:
    """Clients bring their credentials: ready. Once shutting down: not ready (503), while
    /ping still answers on the connections being drained."""
    with trio.fail_after(10):
        ready = await _get(relay.base_url, "/ready")
    assert (ready.status, orjson.loads(ready.content)) == (200, {"ready": True})
    relay.app.shutdown()
    assert await relay.app.readiness() == "shutting down"


async def test_not_ready_without_accounts_in_pooled_mode(relay_factory: RelayFactory) -> None:
    """API keys set but no server-side accounts: nothing can be served."""
    relay = await relay_factory(api_keys="k")
    with trio.fail_after(10):
        response = await _get(relay.base_url, "/ready")
    assert response.status == 503
    assert "no upstream accounts" in orjson.loads(response.content)["reason"]


async def test_not_ready_while_every_account_rests(
    relay_factory: RelayFactory, glm: GlmEmulator
) -> None:
    """Pooled accounts whose tokens are refused rest; when all of them do, /ready says so;
    when some provider still has a healthy account, the relay is ready."""
    relay = await relay_factory(api_keys="k", glm_tokens="revoked-token",
                                step_tokens=STEP_CREDENTIAL, account_cooldown=600.0)
    key = [(b"authorization", b"Bearer k")]
    with trio.fail_after(10):
        refused = await post(relay.base_url, PATH, orjson.dumps(
            {"model": "glm-4", "messages": [{"role": "user", "content": "hi"}]}), headers=key)
        still = await _get(relay.base_url, "/ready")
    assert refused.status == 401
    assert still.status == 200  # StepChat's account is fine
    only_glm = await relay_factory(api_keys="k", glm_tokens="revoked-token",
                                   account_cooldown=600.0)
    with trio.fail_after(10):
        await post(only_glm.base_url, PATH, orjson.dumps(
            {"model": "glm-4", "messages": [{"role": "user", "content": "hi"}]}), headers=key)
        response = await _get(only_glm.base_url, "/ready")
    assert response.status == 503
    assert "every glm account is resting" in orjson.loads(response.content)["reason"]
