"""No upstream conversation is left behind when the first event comes too late (issue 12).

ChatGLM creates a conversation when it takes the stream request but names it
only in the first event. When the relay's first-byte timeout passes before
that event, the relay answers 504 all the same, but first reads on (for at
most ``cleanup_timeout``) to learn the conversation, and deletes it.

The emulator's ``first_gate`` holds the first event (and, without
``head_first``, the response head) until the test sets it. The test sets it
only after sleeping ``first_byte_timeout`` from the moment the conversation
exists, which is after the relay started its clock: so the relay's deadline
has always passed by then (an order, not a margin).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
import pytest
import trio

from tests.relay.conftest import GLM_AUTH, post

if TYPE_CHECKING:
    import httpcore

    from providers.glm.emulator import GlmEmulator
    from tests.relay.conftest import RelayFactory

PATH = "/v1/chat/completions"
FIRST_BYTE_S = 0.05


@pytest.mark.parametrize("head_first", [False, True], ids=["waiting-head", "waiting-event"])
@pytest.mark.parametrize("stream", [False, True])
async def test_first_byte_timeout_is_504_and_the_conversation_is_deleted(
    relay_factory: RelayFactory, glm: GlmEmulator, head_first: bool, stream: bool
) -> None:
    """The upstream stalls before its first event (with or without the response head):
    past RELAY_FIRST_BYTE_TIMEOUT the client gets a 504, and the conversation the upstream
    created is deleted (before: 1 created, 0 deleted)."""
    relay = await relay_factory(first_byte_timeout=FIRST_BYTE_S, cleanup_timeout=5.0)
    gate = trio.Event()
    glm.behavior.first_gate = gate
    glm.behavior.head_first = head_first
    body = orjson.dumps({"model": "glm-4-plus", "stream": stream,
                         "messages": [{"role": "user", "content": "hi"}]})
    answers: list[httpcore.Response] = []

    async def ask() -> None:
        answers.append(await post(relay.base_url, PATH, body, headers=GLM_AUTH))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await glm.wait_until(lambda r: len(r.conversations_created) == 1)
            await trio.sleep(FIRST_BYTE_S)  # the relay's clock started before this one
            gate.set()
        await glm.wait_until(lambda r: len(r.conversations_deleted) == 1)
    [answer] = answers
    assert answer.status == 504
    error = orjson.loads(answer.content)["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_timeout")
    assert glm.record.conversations_deleted == glm.record.conversations_created
    await relay.settled()


async def test_first_byte_timeout_without_an_event_in_the_grace_is_bounded(
    relay_factory: RelayFactory, glm: GlmEmulator
) -> None:
    """An upstream that never sends its first event costs the client the first-byte
    timeout plus at most the cleanup timeout, then a 504 (the conversation cannot be
    named, so it cannot be deleted)."""
    relay = await relay_factory(first_byte_timeout=FIRST_BYTE_S, cleanup_timeout=0.1)
    glm.behavior.first_gate = trio.Event()  # never set
    glm.behavior.head_first = True
    body = orjson.dumps({"model": "glm-4-plus", "messages": [{"role": "user", "content": "hi"}]})
    with trio.fail_after(5):
        answer = await post(relay.base_url, PATH, body, headers=GLM_AUTH)
    assert answer.status == 504
    assert len(glm.record.conversations_created) == 1
