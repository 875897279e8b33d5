"""End to end: what agents and their SDKs need from the relay (issue 14).

``GET /v1/models/{id}``, Anthropic's ``x-api-key`` header, and the chat
service's shaping of answers (tool calls, stop sequences, max_tokens,
structured output), driven through the official ``openai`` SDK and raw
HTTP against the StepChat and ChatGLM emulators.
"""

from __future__ import annotations

import functools

import openai
import orjson
import pytest
import trio

from tests.relay.conftest import (
    STEP_CREDENTIAL,
    RelayFactory,
    Running,
    chat_body,
    post,
)


def _sdk(relay: Running, api_key: str = STEP_CREDENTIAL) -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.base_url + "/v1", api_key=api_key, max_retries=0,
                         timeout=10)


async def test_models_retrieve_names_the_owner(relay: Running) -> None:
    """The SDK's models.retrieve gets a listed id, an owned (unlisted) id, and a 404."""
    def run() -> tuple[str, str, str, str, int, str | None]:
        with _sdk(relay) as client:
            step = client.models.retrieve("step-v1")
            glm = client.models.retrieve("glm-4-plus")
            try:
                client.models.retrieve("no-such-model")
            except openai.NotFoundError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                return (step.id, step.owned_by, glm.id, glm.owned_by, exc.status_code,
                        body.get("code"))
            raise AssertionError("an unknown model was found")

    with trio.fail_after(10):
        got = await trio.to_thread.run_sync(functools.partial(run))
    assert got == ("step-v1", "step", "glm-4-plus", "glm", 404, "model_not_found")


async def test_model_ids_with_slashes_and_escapes_share_one_route(relay: Running) -> None:
    """/v1/models/<id> is one route: escaped ids are decoded, metrics keep one label."""
    def run() -> str:
        with _sdk(relay) as client:
            return client.models.retrieve("step-v1").id

    await trio.to_thread.run_sync(run)
    rendered = relay.app.metrics.render().decode()
    assert 'route="/v1/models/{id}"' in rendered
    assert "step-v1" not in rendered


@pytest.mark.parametrize("header", [b"x-api-key", b"authorization"])
async def test_relay_keys_may_come_as_x_api_key(
    relay_factory: RelayFactory, header: bytes
) -> None:
    """With RELAY_API_KEYS set, Anthropic's x-api-key is accepted like a Bearer key."""
    relay = await relay_factory(api_keys="sk-relay", step_tokens=STEP_CREDENTIAL)
    value = b"sk-relay" if header == b"x-api-key" else b"Bearer sk-relay"
    with trio.fail_after(10):
        good = await post(relay.base_url, "/v1/chat/completions", chat_body(),
                          headers=[(header, value)])
        wrong = await post(relay.base_url, "/v1/chat/completions", chat_body(),
                           headers=[(b"x-api-key", b"sk-wrong")])
    assert good.status == 200, good.content
    assert orjson.loads(good.content)["choices"][0]["message"]["content"] == "Hello world!"
    assert wrong.status == 401
