"""ChatGLM end to end: client -> relay -> ChatGLM emulator, over loopback.

Each mode of the issue goes through the relay, mostly with the official
``openai`` SDK (its sync client in a worker thread), and each test asserts the
exact text against what the emulator was scripted to send, and what the
emulator recorded (stream bodies, uploads, deleted conversations, per-account
concurrency).
"""

from __future__ import annotations

import base64
import functools
import io
import time
from typing import TYPE_CHECKING, Any

import httpcore
import openai
import orjson
import pytest
import trio
from PIL import Image

from providers.glm import prompt
from providers.glm.client import GlmProvider
from providers.glm.emulator import (
    REFRESH_PATH,
    STREAM_PATH,
    TINY_PNG,
    account_key,
)
from providers.glm.emulator_script import cite
from providers.glm.signing import sign
from tests.relay.conftest import (
    GLM_AUTH,
    GLM_TOKEN,
    GLM_TOKENS,
    RelayFactory,
    Running,
    post,
    send_raw_post,
    sse_events,
    sse_text,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from providers.glm.emulator import GlmEmulator

PATH = "/v1/chat/completions"
ANSWER = "智谱AI是一家人工智能公司。It builds GLM models!"
DRAWING = "65a232c082ff90a2ad2f15e2"
AGENT = "0123456789abcdefabcdef01"  # 24 lowercase letters/digits: an agent id
PNG_DATA_URL = "data:image/png;base64," + base64.b64encode(TINY_PNG).decode()
PDF = b"%PDF-1.4 a tiny test document"
PDF_DATA_URL = "data:application/pdf;base64," + base64.b64encode(PDF).decode()
USER_HI: Any = [{"role": "user", "content": "hi"}]


def _sdk(relay: Running, api_key: str = GLM_TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.base_url + "/v1", api_key=api_key, max_retries=0,
                         timeout=10)


def _glm_provider(relay: Running) -> GlmProvider:
    provider = relay.app.providers["glm"].provider
    assert isinstance(provider, GlmProvider)
    return provider


def _body(content: Any = "hi", *, model: str = "glm-4-plus", stream: bool = False,
          **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "model": model, "stream": stream, "messages": [{"role": "user", "content": content}]
    }
    body.update(extra)
    return orjson.dumps(body)


class Streamed:
    """What the SDK saw of one streamed answer."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.reasons: list[str | None] = []
        self.ids: set[str] = set()

    @property
    def text(self) -> str:
        return "".join(self.content)


async def _sdk_stream(relay: Running, model: str, messages: Any = None,
                      **extra: Any) -> Streamed:
    def run() -> Streamed:
        seen = Streamed()
        with _sdk(relay) as client:
            stream = client.chat.completions.create(
                model=model, messages=messages or USER_HI, stream=True, extra_body=extra or None
            )
            for chunk in stream:
                seen.ids.add(chunk.id)
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    seen.content.append(delta.content or "")
                    seen.reasoning.append(getattr(delta, "reasoning_content", None) or "")
                    seen.reasons.append(chunk.choices[0].finish_reason)
        return seen

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run)


async def _sdk_complete(relay: Running, model: str, messages: Any = None,
                        **extra: Any) -> Any:
    def run() -> Any:
        with _sdk(relay) as client:
            return client.chat.completions.create(
                model=model, messages=messages or USER_HI, extra_body=extra or None
            )

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run)


def _signed(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Content-Type", b"application/json"),
            (b"Authorization", f"Bearer {token}".encode()),
            *sign(int(time.time() * 1000)).headers()]


async def _web_access_token(pool: httpcore.AsyncConnectionPool, glm: GlmEmulator,
                            token: str) -> str:
    """Log in at the emulator the way the site's own web page would."""
    response = await pool.request("POST", glm.base_url + REFRESH_PATH,
                                  headers=_signed(token), content=b"{}")
    access = orjson.loads(response.content)["result"]["access_token"]
    assert isinstance(access, str)
    return access


async def _web_conversation(glm: GlmEmulator, token: str) -> str:
    """A conversation the user started on the site itself (not through the relay)."""
    async with httpcore.AsyncConnectionPool() as pool:
        access = await _web_access_token(pool, glm, token)
        body = prompt.stream_body(assistant_id=prompt.DEFAULT_ASSISTANT, conversation_id="",
                                  prompt="你好\n")
        response = await pool.request("POST", glm.base_url + STREAM_PATH,
                                      headers=_signed(access), content=body)
    first = orjson.loads(sse_events(response.content)[0])
    conversation_id = first["conversation_id"]
    assert isinstance(conversation_id, str)
    return conversation_id


async def _all_deleted(glm: GlmEmulator) -> None:
    """Wait until every conversation the emulator created was deleted (bounded).

    The client sees the end of an answer before the relay's cleanup ran.
    """
    record = glm.record
    await glm.wait_until(
        lambda r: sorted(r.conversations_deleted) == sorted(r.conversations_created), 5
    )
    assert record.conversations_created


# ---------------------------------------------------------------- plain chat


async def test_plain_chat_streams_the_exact_text(relay: Running, glm: GlmEmulator) -> None:
    """Streaming through the SDK gives exactly the emulator's answer, finish 'stop', one id."""
    glm.behavior.answer = ANSWER
    glm.behavior.chunk_chars = 3
    seen = await _sdk_stream(relay, "glm-4-plus")
    assert seen.text == ANSWER
    assert seen.reasons[-1] == "stop"
    assert seen.reasons.count("stop") == 1
    [sent] = glm.record.streams
    assert sent["assistant_id"] == prompt.DEFAULT_ASSISTANT
    assert sent["messages"][0]["content"] == [{"type": "text", "text": "hi\n"}]
    assert "chat_mode" not in sent["meta_data"]
    assert seen.ids == {glm.record.conversations_created[0]}
    assert glm.record.bad_signatures == 0


async def test_plain_chat_non_stream(relay: Running, glm: GlmEmulator) -> None:
    """Without streaming the SDK gets one completion whose id is the upstream conversation."""
    glm.behavior.answer = ANSWER
    messages = [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "再见"},
    ]
    completion = await _sdk_complete(relay, "glm-4", messages)
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.id == glm.record.conversations_created[0]
    [sent] = glm.record.streams
    assert sent["messages"][0]["content"][0]["text"] == (
        "<|system|>\n你是助手\n<|user|>\n你好\n<|assistant|>\n你好！\n<|user|>\n再见\n<|assistant|>\n"
    )


async def test_agent_model_talks_to_that_assistant(relay: Running, glm: GlmEmulator) -> None:
    """A 24-character agent id as the model is sent as assistant_id (and routed to GLM)."""
    seen = await _sdk_stream(relay, AGENT)
    assert seen.text == "你好，世界！"
    [sent] = glm.record.streams
    assert sent["assistant_id"] == AGENT
    await _all_deleted(glm)


# ---------------------------------------------------------------- reasoning


async def test_think_model_sends_reasoning_content(relay: Running, glm: GlmEmulator) -> None:
    """A think model asks for chat_mode zero; reasoning arrives as reasoning_content."""
    glm.behavior.think = "用户在打招呼，简单回答即可。"
    glm.behavior.answer = ANSWER
    seen = await _sdk_stream(relay, "glm-4-think")
    assert "".join(seen.reasoning) == "用户在打招呼，简单回答即可。"
    assert seen.text == ANSWER
    completion = await _sdk_complete(relay, "glm-4-think")
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["reasoning_content"] == "用户在打招呼，简单回答即可。"
    assert [s["meta_data"]["chat_mode"] for s in glm.record.streams] == ["zero", "zero"]


async def test_think_model_with_tags(relay_factory: RelayFactory, glm: GlmEmulator) -> None:
    """With RELAY_REASONING=tags the reasoning is inline in <think> tags, stream and not."""
    relay = await relay_factory(reasoning="tags")
    glm.behavior.think = "先想一想。"
    glm.behavior.answer = ANSWER
    expected = "<think>\n先想一想。\n</think>\n\n" + ANSWER
    seen = await _sdk_stream(relay, "glm-4-zero")
    assert seen.text == expected
    assert "".join(seen.reasoning) == ""
    completion = await _sdk_complete(relay, "glm-4-zero")
    assert completion.choices[0].message.content == expected


# ---------------------------------------------------------------- search, code, images


async def test_search_citations(relay: Running, glm: GlmEmulator) -> None:
    """Markers are removed; hits are rendered as CITATION_LINE in stream, an appendix whole."""
    answer = "智谱是一家AI公司。它在北京。"
    glm.behavior.answer = answer
    glm.behavior.search_results = [("智谱", "https://www.zhipuai.cn/")]
    assert "【1†source】" in cite(answer, 1)  # the emulator really sends markers
    seen = await _sdk_stream(relay, "glm-4-plus")
    assert seen.text == "检索 智谱(https://www.zhipuai.cn/) ...\n\n" + answer
    completion = await _sdk_complete(relay, "glm-4-plus")
    assert completion.choices[0].message.content == (
        answer + "\n\n搜索结果来自：\n智谱 - https://www.zhipuai.cn/"
    )


async def test_code_interpreter_output(relay: Running, glm: GlmEmulator) -> None:
    """Code is fenced as python and followed by its execution output."""
    glm.behavior.answer = "计算如下："
    glm.behavior.code = "print(1 + 1)"
    glm.behavior.execution_output = "2"
    expected = "计算如下：\n```python\nprint(1 + 1)\n```\n\n2\n"
    seen = await _sdk_stream(relay, "glm-4-plus")
    assert seen.text == expected
    completion = await _sdk_complete(relay, "glm-4-plus")
    assert completion.choices[0].message.content == expected


async def test_image_in_answer_is_markdown(relay: Running, glm: GlmEmulator) -> None:
    """An image part of the answer becomes a markdown image."""
    glm.behavior.answer = "画好了："
    glm.behavior.images = ["cat"]
    url = f"{glm.base_url}/images/cat.png"
    seen = await _sdk_stream(relay, "glm-4-plus")
    assert seen.text == f"画好了：\n![图像]({url})\n"
    completion = await _sdk_complete(relay, "glm-4-plus")
    assert completion.choices[0].message.content == f"画好了：\n![图像]({url})\n"


@pytest.mark.parametrize("stream", [False, True])
async def test_intervene_is_content_filter(
    relay: Running, glm: GlmEmulator, stream: bool
) -> None:
    """The content filter ends the answer with finish_reason content_filter and its text."""
    glm.behavior.answer = "这个问题"
    glm.behavior.intervene_text = "抱歉，我无法回答这个问题。"
    expected = "这个问题\n\n抱歉，我无法回答这个问题。"
    if stream:
        seen = await _sdk_stream(relay, "glm-4-plus")
        assert seen.text == expected
        assert seen.reasons[-1] == "content_filter"
    else:
        completion = await _sdk_complete(relay, "glm-4-plus")
        assert completion.choices[0].message.content == expected
        assert completion.choices[0].finish_reason == "content_filter"
    await _all_deleted(glm)


# ---------------------------------------------------------------- files


async def test_files_are_uploaded_and_attached(relay: Running, glm: GlmEmulator) -> None:
    """A data-URL image becomes an image item and a document a file item of the stream body."""
    content = [
        {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
        {"type": "file", "file_url": {"url": PDF_DATA_URL}},
        {"type": "text", "text": "这是什么？"},
    ]
    completion = await _sdk_complete(relay, "glm-4v", [{"role": "user", "content": content}])
    assert completion.choices[0].message.content == "你好，世界！"
    image, document = sorted(glm.record.uploads, key=lambda u: u.content_type, reverse=True)
    assert (image.data, image.content_type, image.kind) == (TINY_PNG, "image/png", "chat")
    assert (document.data, document.content_type) == (PDF, "application/pdf")
    [sent] = glm.record.streams
    items = {item["type"]: item for item in sent["messages"][0]["content"]}
    assert items["text"]["text"] == "这是什么？\n"
    [image_item] = items["image"]["image"]
    assert image_item["file_id"] == image.file_id
    assert image_item["image_url"] == image_item["file_url"]
    assert (image_item["width"], image_item["height"]) == (1, 1)
    [file_item] = items["file"]["file"]
    assert file_item["file_id"] == document.file_id
    assert "width" not in file_item


async def test_unfetchable_file_is_400_and_nothing_is_sent(
    relay: Running, glm: GlmEmulator
) -> None:
    """A file URL on loopback is refused (SSRF guard) before any upstream stream starts."""
    content = [{"type": "image_url", "image_url": {"url": glm.base_url + "/images/x.png"}}]
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(content), headers=GLM_AUTH)
    assert response.status == 400
    assert orjson.loads(response.content)["error"]["code"] == "forbidden_file_url"
    assert glm.record.streams == []


# ---------------------------------------------------------------- images endpoint


async def test_images_endpoint_returns_urls(relay: Running, glm: GlmEmulator) -> None:
    """/v1/images/generations runs the drawing assistant and returns the drawn URLs."""
    def run() -> list[str | None]:
        with _sdk(relay) as client:
            result = client.images.generate(model="cogview-3", prompt="一只可爱的猫")
            return [image.url for image in result.data or []]

    with trio.fail_after(10):
        urls = await trio.to_thread.run_sync(run)
    [conversation] = glm.record.conversations_created
    assert urls == [f"{glm.base_url}/images/{conversation}_0.png"]
    [sent] = glm.record.streams
    assert sent["assistant_id"] == DRAWING
    assert sent["messages"][0]["content"] == [{"type": "text", "text": "请画：一只可爱的猫\n"}]
    assert "chat_mode" not in sent["meta_data"]
    assert "is_networking" not in sent["meta_data"]
    await glm.wait_until(lambda r: r.conversations_deleted == [conversation])


async def test_images_endpoint_reads_markdown_images_too(
    relay: Running, glm: GlmEmulator
) -> None:
    """Markdown image targets in the drawing's text count; plain links do not."""
    glm.behavior.answer = "画好了 ![猫](https://sfile.example/cat.png) 见 [链接](https://x.example/)"
    body = orjson.dumps({"prompt": "画一只猫", "model": AGENT})
    with trio.fail_after(5):
        response = await post(relay.base_url, "/v1/images/generations", body, headers=GLM_AUTH)
    assert response.status == 200
    [conversation] = glm.record.conversations_created
    urls = [d["url"] for d in orjson.loads(response.content)["data"]]
    assert urls == ["https://sfile.example/cat.png"]  # an agent id draws no default image
    [sent] = glm.record.streams
    assert sent["assistant_id"] == AGENT
    assert sent["messages"][0]["content"][0]["text"] == "画一只猫\n"
    await relay.settled()
    assert glm.record.conversations_deleted == [conversation]


async def test_images_endpoint_b64_json(relay_factory: RelayFactory, glm: GlmEmulator) -> None:
    """With response_format b64_json the drawn image is downloaded and inlined."""
    relay = await relay_factory(allow_private_urls=True)

    def run() -> list[str | None]:
        with _sdk(relay) as client:
            result = client.images.generate(prompt="一只猫", response_format="b64_json")
            return [image.b64_json for image in result.data or []]

    with trio.fail_after(10):
        images = await trio.to_thread.run_sync(run)
    assert [base64.b64decode(image or "") for image in images] == [TINY_PNG]


async def test_images_b64_download_is_guarded(relay: Running, glm: GlmEmulator) -> None:
    """Generated images on a private address are not fetched without allow_private_urls."""
    body = orjson.dumps({"prompt": "一只猫", "response_format": "b64_json"})
    with trio.fail_after(5):
        response = await post(relay.base_url, "/v1/images/generations", body, headers=GLM_AUTH)
    assert response.status == 502
    assert orjson.loads(response.content)["error"]["code"] == "image_download"


async def test_images_content_filter_is_400(relay: Running, glm: GlmEmulator) -> None:
    """A drawing stopped by the content filter is a 400 with the upstream's explanation."""
    glm.behavior.intervene_text = "该内容无法绘制。"
    body = orjson.dumps({"prompt": "不可以画的东西"})
    with trio.fail_after(5):
        response = await post(relay.base_url, "/v1/images/generations", body, headers=GLM_AUTH)
    assert response.status == 400
    error = orjson.loads(response.content)["error"]
    assert (error["code"], error["message"]) == ("content_filter", "该内容无法绘制。")
    await _all_deleted(glm)


async def test_images_bad_request_is_400(relay: Running) -> None:
    """An images request without a prompt is a 400 naming the parameter."""
    with trio.fail_after(5):
        response = await post(relay.base_url, "/v1/images/generations",
                              orjson.dumps({"model": "cogview-3"}), headers=GLM_AUTH)
    assert response.status == 400
    assert orjson.loads(response.content)["error"]["param"] == "prompt"


# ---------------------------------------------------------------- videos endpoint


async def _video(relay: Running, **fields: Any) -> httpcore.Response:
    _glm_provider(relay).video_poll_interval = 0.005
    body = orjson.dumps({"prompt": "一只猫走在花丛中", **fields})
    with trio.fail_after(5):
        return await post(relay.base_url, "/v1/videos/generations", body, headers=GLM_AUTH)


async def test_video_without_image(relay: Running, glm: GlmEmulator) -> None:
    """A video job is submitted, polled until finished, answered and deleted."""
    response = await _video(relay, video_style="油画", mirror_mode="水平")
    assert response.status == 200
    [data] = orjson.loads(response.content)["data"]
    [chat_id] = glm.record.videos_deleted
    assert data["video_url"] == f"{glm.base_url}/videos/{chat_id}.mp4"
    assert data["cover_url"] == f"{glm.base_url}/images/{chat_id}_cover.png"
    assert (data["video_duration"], data["resolution"]) == ("6s", "1440 × 960")
    assert len(data["conversation_id"]) == 24
    assert glm.record.video_chats == [{
        "conversation_id": "",
        "prompt": "一只猫走在花丛中",
        "advanced_parameter_extra": {
            "emotional_atmosphere": "", "mirror_mode": "水平", "video_style": "油画",
        },
    }]
    assert glm.record.video_polls == 3  # init, processing, finished
    assert glm.record.uploads == []


async def test_video_with_image_and_audio(relay: Running, glm: GlmEmulator) -> None:
    """A first-frame image is uploaded as the source; an audio id is composited in."""
    response = await _video(relay, image_url=PNG_DATA_URL, audio_id="bgm-42")
    assert response.status == 200
    [data] = orjson.loads(response.content)["data"]
    [upload] = glm.record.uploads
    assert upload.kind == "video"
    assert _png_size(upload.data) == (1440, 960)  # 1 x 1 -> 1440 x 1440, centre 960 rows
    [chat] = glm.record.video_chats
    assert chat["source_list"] == [upload.file_id]
    [chat_id] = glm.record.videos_deleted
    assert glm.record.composites == [{"chat_id": chat_id, "key": "bgm", "audio_id": "42"}]
    assert data["video_url"] == f"{glm.base_url}/videos/{chat_id}_42.mp4"


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


async def test_video_first_frame_is_resized_and_cropped(relay: Running, glm: GlmEmulator) -> None:
    """A wide JPEG goes up 1440 px wide, aspect kept, as JPEG (PROTOCOLS.md 3.8)."""
    source = io.BytesIO()
    Image.new("RGB", (3000, 1000), (200, 30, 30)).save(source, format="JPEG")
    data_url = "data:image/jpeg;base64," + base64.b64encode(source.getvalue()).decode()
    response = await _video(relay, image_url=data_url)
    assert response.status == 200
    [upload] = glm.record.uploads
    assert (upload.kind, upload.content_type) == ("video", "image/jpeg")
    with Image.open(io.BytesIO(upload.data)) as frame:
        assert (frame.format, frame.size) == ("JPEG", (1440, 480))


async def test_video_first_frame_that_is_no_image_is_400(relay: Running, glm: GlmEmulator) -> None:
    """An image_url whose bytes are not an image is refused before any video job starts."""
    data_url = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    response = await _video(relay, image_url=data_url)
    assert response.status == 400
    error = orjson.loads(response.content)["error"]
    assert error["param"] == "image_url"
    assert glm.record.uploads == []
    assert glm.record.video_chats == []


async def test_video_pro_draws_its_first_frame(
    relay_factory: RelayFactory, glm: GlmEmulator
) -> None:
    """cogvideox-pro draws an image first and uses it as the first frame."""
    relay = await relay_factory(allow_private_urls=True)
    response = await _video(relay, model="cogvideox-pro")
    assert response.status == 200
    [drawing] = glm.record.streams
    assert drawing["assistant_id"] == DRAWING
    [upload] = glm.record.uploads
    assert upload.kind == "video"
    assert _png_size(upload.data) == (1440, 960)
    assert glm.record.video_chats[0]["source_list"] == [upload.file_id]
    await _all_deleted(glm)


async def test_video_failure_is_502_and_deleted(relay: Running, glm: GlmEmulator) -> None:
    """A failed job is a 502 with the upstream's message; the job is still deleted."""
    glm.behavior.video_fail = True
    response = await _video(relay)
    assert response.status == 502
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "video_failed"
    assert "视频生成失败" in error["message"]
    assert len(glm.record.videos_deleted) == 1


async def test_video_timeout_is_504_and_deleted(
    relay_factory: RelayFactory, glm: GlmEmulator
) -> None:
    """A job that never finishes within video_timeout is a 504; the job is still deleted."""
    relay = await relay_factory(video_timeout=0.1)
    glm.behavior.video_polls = 10_000
    response = await _video(relay)
    assert response.status == 504
    assert len(glm.record.videos_deleted) == 1


async def test_video_bad_style_is_400(relay: Running, glm: GlmEmulator) -> None:
    """A style outside the allowed set is a 400 and no job is started."""
    response = await _video(relay, video_style="水彩")
    assert response.status == 400
    assert orjson.loads(response.content)["error"]["param"] == "video_style"
    assert glm.record.video_chats == []


# ---------------------------------------------------------------- cleanup


@pytest.mark.parametrize("stream", [False, True])
async def test_conversation_deleted_after_success(
    relay: Running, glm: GlmEmulator, stream: bool
) -> None:
    """The conversation an answer created is deleted afterwards."""
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(stream=stream), headers=GLM_AUTH)
        assert response.status == 200
        await glm.wait_until(lambda r: len(r.conversations_deleted) == 1)
    await _all_deleted(glm)


@pytest.mark.parametrize("stream", [False, True])
async def test_conversation_deleted_after_upstream_error(
    relay: Running, glm: GlmEmulator, stream: bool
) -> None:
    """A stream the upstream drops mid-answer is an error, and its conversation is deleted."""
    glm.behavior.answer = "abcdefghij"
    glm.behavior.chunk_chars = 2
    glm.behavior.drop_after = 2
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(stream=stream), headers=GLM_AUTH)
        await glm.wait_until(lambda r: len(r.conversations_deleted) == 1)
    if stream:
        events = sse_events(response.content)
        assert events[-1] == b"[DONE]"
        assert "error" in orjson.loads(events[-2])
        assert b'"finish_reason":"stop"' not in response.content
        assert sse_text(response.content) == "abcd"
    else:
        assert response.status == 502
    assert glm.record.streams_dropped == 1
    await _all_deleted(glm)


async def test_conversation_deleted_after_client_disconnect(
    relay: Running, glm: GlmEmulator
) -> None:
    """A client that leaves mid-stream cancels the upstream stream; the conversation goes too."""
    glm.behavior.answer = "x" * 600
    glm.behavior.chunk_chars = 1
    glm.behavior.frame_delay_s = 0.01
    body = _body(stream=True)
    with trio.fail_after(5):
        stream = await send_raw_post(relay, body, GLM_TOKEN)
        received = b""
        while b"data: " not in received:
            received += await stream.receive_some(65536)
        await stream.aclose()
        await glm.wait_until(lambda r: r.streams_aborted == 1 and len(r.conversations_deleted) == 1)
    assert glm.record.streams_finished == 0
    await _all_deleted(glm)


async def test_non_sse_error_answer_is_502(relay: Running, glm: GlmEmulator) -> None:
    """A JSON error body instead of a stream is a 502 carrying the upstream's message."""
    glm.behavior.stream_error = (200, {"code": 10500, "message": "内部错误"})
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(), headers=GLM_AUTH)
    assert response.status == 502
    assert "内部错误" in orjson.loads(response.content)["error"]["message"]


async def test_conversation_id_reuse_continues_and_keeps_it(
    relay: Running, glm: GlmEmulator
) -> None:
    """A valid conversation_id continues that conversation (pass-through prompt), not deleted."""
    conversation = await _web_conversation(glm, GLM_TOKEN)
    messages = [{"role": "user", "content": "第一句"}, {"role": "user", "content": "第二句"}]
    completion = await _sdk_complete(relay, "glm-4-plus", messages, conversation_id=conversation)
    assert completion.choices[0].message.content == "你好，世界！"
    assert completion.id == conversation
    sent = glm.record.streams[-1]
    assert sent["conversation_id"] == conversation
    assert sent["messages"][0]["content"][0]["text"] == "第一句\n第二句\n"
    assert glm.record.conversations_created == [conversation]  # nothing new
    await relay.settled()
    assert glm.record.conversations_deleted == []


async def test_empty_conversation_id_keeps_the_new_conversation_for_the_next_turn(
    relay: Running, glm: GlmEmulator
) -> None:
    """`conversation_id: ""` starts a conversation that is kept; its id continues it next turn."""
    first = await _sdk_complete(relay, "glm-4-plus", conversation_id="")
    [created] = glm.record.conversations_created
    assert first.id == created
    second = await _sdk_complete(relay, "glm-4-plus", conversation_id=first.id)
    assert second.id == created
    assert glm.record.streams[-1]["conversation_id"] == created
    assert glm.record.conversations_created == [created]
    await relay.settled()
    assert glm.record.conversations_deleted == []


async def test_without_conversation_id_the_conversation_is_deleted(
    relay: Running, glm: GlmEmulator
) -> None:
    """A client that never mentions conversation_id leaves no conversation behind."""
    await _sdk_complete(relay, "glm-4-plus")
    await _all_deleted(glm)
    assert len(glm.record.conversations_deleted) == 1


# ---------------------------------------------------------------- accounts


async def test_two_accounts_serve_two_streams(relay: Running, glm: GlmEmulator) -> None:
    """With two accounts and one stream each, two concurrent streams use both accounts."""
    glm.behavior.answer = "慢慢地回答一个问题"
    glm.behavior.chunk_chars = 1
    glm.behavior.frame_delay_s = 0.01
    header = [(b"authorization", f"Bearer {GLM_TOKENS[0]},{GLM_TOKENS[1]}".encode())]
    texts: list[str] = []

    async def one() -> None:
        response = await post(relay.base_url, PATH, _body(stream=True), headers=header)
        texts.append(sse_text(response.content))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
    assert texts == ["慢慢地回答一个问题"] * 2
    assert glm.record.max_active_per_account == {
        account_key(GLM_TOKENS[0]): 1, account_key(GLM_TOKENS[1]): 1
    }
    assert glm.record.concurrent_rejections == 0


async def test_one_account_queues_streams(relay: Running, glm: GlmEmulator) -> None:
    """With one account, a second concurrent stream waits for the first, then succeeds."""
    glm.behavior.answer = "排队回答"
    glm.behavior.chunk_chars = 1
    glm.behavior.frame_delay_s = 0.02
    texts: list[str] = []
    finished_before_second: list[int] = []

    async def one() -> None:
        response = await post(relay.base_url, PATH, _body(stream=True), headers=GLM_AUTH)
        texts.append(sse_text(response.content))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await glm.wait_until(lambda r: len(r.streams) == 1)
            nursery.start_soon(one)
            await glm.wait_until(lambda r: len(r.streams) == 2)
            finished_before_second.append(glm.record.streams_finished)
    assert texts == ["排队回答"] * 2
    assert finished_before_second == [1]
    assert glm.record.max_active_per_account == {account_key(GLM_TOKEN): 1}
    assert glm.record.concurrent_rejections == 0


@pytest.fixture
async def busy_on_site(glm: GlmEmulator) -> AsyncIterator[None]:
    """GLM_TOKENS[0] is busy with a stream the user runs on the site itself.

    Request it as an argument: pytest-trio runs only the fixtures a test names.
    """
    glm.behavior.stall_after = 1
    async with httpcore.AsyncConnectionPool() as pool, trio.open_nursery() as nursery:
        access = await _web_access_token(pool, glm, GLM_TOKENS[0])

        async def hold() -> None:
            body = prompt.stream_body(assistant_id=prompt.DEFAULT_ASSISTANT,
                                      conversation_id="", prompt="长问题\n")
            async with pool.stream("POST", glm.base_url + STREAM_PATH,
                                   headers=_signed(access), content=body):
                await trio.sleep_forever()

        nursery.start_soon(hold)
        await glm.wait_until(lambda r: r.active_streams == 1)
        glm.behavior.stall_after = None
        yield
        nursery.cancel_scope.cancel()


async def test_busy_account_fails_over(
    relay: Running, glm: GlmEmulator, busy_on_site: None
) -> None:
    """An account busy upstream (one stream per account) makes the relay use the next one."""
    header = [(b"authorization", f"Bearer {GLM_TOKENS[0]},{GLM_TOKENS[1]}".encode())]
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(), headers=header)
    assert response.status == 200
    assert orjson.loads(response.content)["choices"][0]["message"]["content"] == "你好，世界！"
    assert glm.record.concurrent_rejections == 1


async def test_busy_single_account_is_429(
    relay: Running, glm: GlmEmulator, busy_on_site: None
) -> None:
    """With its only account busy upstream, a request gets 429 (rate_limit_error)."""
    header = [(b"authorization", f"Bearer {GLM_TOKENS[0]}".encode())]
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(), headers=header)
    assert response.status == 429
    assert orjson.loads(response.content)["error"]["code"] == "account_busy"


async def test_expired_refresh_token_is_a_clear_401(relay: Running, glm: GlmEmulator) -> None:
    """A refresh token the site calls expired (40102) is a 401 saying so, never echoing it."""
    glm.expire_refresh_token(GLM_TOKEN)
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(), headers=GLM_AUTH)
    assert response.status == 401
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "refresh_token_expired"
    assert "expired" in error["message"]
    assert GLM_TOKEN.encode() not in response.content
    assert glm.record.streams == []


async def test_expired_access_token_is_refreshed(relay: Running, glm: GlmEmulator) -> None:
    """When the site expires the access token, the relay logs in again and succeeds."""
    with trio.fail_after(5):
        first = await post(relay.base_url, PATH, _body(), headers=GLM_AUTH)
        # the first conversation deleted before the token expires (the answer can reach
        # the client before its delete is even queued, so wait for the emulator's record)
        await glm.wait_until(lambda r: len(r.conversations_deleted) == 1)
        glm.expire_access_tokens()
        second = await post(relay.base_url, PATH, _body(), headers=GLM_AUTH)
    assert (first.status, second.status) == (200, 200)
    assert glm.record.refreshes == 2


async def test_wrong_signing_secret_fails(relay_factory: RelayFactory, glm: GlmEmulator) -> None:
    """The signing secret is the configured one: a wrong one is refused by the site."""
    relay = await relay_factory(glm_sign_secret="0" * 32)
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(), headers=GLM_AUTH)
    assert response.status == 502
    assert "sign invalid" in orjson.loads(response.content)["error"]["message"]
    assert glm.record.bad_signatures == 1


async def test_malformed_glm_credential_is_401(relay: Running, glm: GlmEmulator) -> None:
    """A credential with a control character is refused without asking the site."""
    with trio.fail_after(5):
        response = await post(relay.base_url, "/glm/v1/chat/completions", _body(),
                              headers=[(b"authorization", b"Bearer a\x7fb")])
    assert response.status == 401
    assert glm.record.refreshes == 0


# ---------------------------------------------------------------- surface and routing


async def test_token_check_for_glm(relay: Running, glm: GlmEmulator) -> None:
    """/token/check is live for a good refresh token and not for unknown or expired ones."""
    glm.expire_refresh_token(GLM_TOKENS[2])

    async def check(token: str) -> Any:
        response = await post(relay.base_url, "/token/check",
                              orjson.dumps({"token": token, "provider": "glm"}), headers=[])
        return orjson.loads(response.content)

    with trio.fail_after(5):
        results = [await check(t) for t in (GLM_TOKEN, "unknown", GLM_TOKENS[2], "two words")]
        implicit = await post(relay.base_url, "/token/check",
                              orjson.dumps({"token": GLM_TOKENS[1]}), headers=[])
    assert results == [{"live": True}, {"live": False}, {"live": False}, {"live": False}]
    assert orjson.loads(implicit.content) == {"live": True}


async def test_models_lists_glm_ids(relay: Running) -> None:
    """/v1/models lists the GLM model ids too."""
    def run() -> list[tuple[str, str]]:
        with _sdk(relay) as client:
            return [(m.id, m.owned_by) for m in client.models.list()]

    ids = await trio.to_thread.run_sync(functools.partial(run))
    assert {(model, "glm") for model in prompt.MODELS} <= set(ids)


@pytest.mark.parametrize(
    ("settings", "path", "model"),
    [
        ({}, PATH, "glm-4"),
        ({}, PATH, "chatglm"),
        ({"default_provider": "glm"}, PATH, "gpt-4o"),
        ({}, "/glm/v1/chat/completions", "step"),
    ],
)
async def test_routing_to_glm(
    relay_factory: RelayFactory, glm: GlmEmulator, settings: dict[str, Any], path: str,
    model: str,
) -> None:
    """glm* models, RELAY_DEFAULT_PROVIDER=glm and the /glm/ prefix all reach ChatGLM."""
    relay = await relay_factory(**settings)
    with trio.fail_after(5):
        response = await post(relay.base_url, path, _body(model=model), headers=GLM_AUTH)
    assert response.status == 200
    body = orjson.loads(response.content)
    assert body["choices"][0]["message"]["content"] == "你好，世界！"
    assert body["model"] == model
    assert len(glm.record.streams) == 1


async def test_step_models_do_not_reach_glm(relay: Running, glm: GlmEmulator) -> None:
    """A step model on /v1 goes to StepChat, not ChatGLM."""
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(model="step"))
    assert response.status == 200
    assert glm.record.streams == []


@pytest.mark.parametrize("head_first", [False, True], ids=["waiting-head", "waiting-event"])
@pytest.mark.parametrize("stream", [True, False])
async def test_conversation_deleted_when_client_leaves_before_the_first_snapshot(
    relay: Running, glm: GlmEmulator, stream: bool, head_first: bool
) -> None:
    """The conversation exists upstream before its id reaches the relay (in the first snapshot).

    A client that leaves in that window (the relay waits for the response
    head, or has it and waits for the first event) must not cost a
    conversation: the relay reads on (bounded) until it learns the id, then
    deletes it.
    """
    glm.behavior.first_delay_s = 0.4
    glm.behavior.head_first = head_first
    body = _body(stream=stream)
    with trio.fail_after(5):
        client = await send_raw_post(relay, body, GLM_TOKEN)
        await glm.wait_until(lambda r: len(r.conversations_created) == 1)
        await client.aclose()  # the emulator is still in its first delay
        await glm.wait_until(lambda r: len(r.conversations_deleted) == 1)
    assert glm.record.conversations_deleted == glm.record.conversations_created
    await _all_deleted(glm)


async def test_leaving_before_a_first_snapshot_that_never_comes_is_bounded(
    relay_factory: RelayFactory, glm: GlmEmulator
) -> None:
    """The wait for the id is bounded by the cleanup timeout once the client has gone.

    The upstream takes 30 s to answer at all; the client leaves, the relay
    is told to stop: it must not sit out the upstream's silence (the first-
    byte timeout is 120 s), only ``cleanup_timeout`` more.
    """
    relay = await relay_factory(cleanup_timeout=0.3, grace_period=0.1)
    glm.behavior.first_delay_s = 30
    body = _body(stream=True)
    client = await send_raw_post(relay, body, GLM_TOKEN)
    with trio.fail_after(3):
        await glm.wait_until(lambda r: len(r.conversations_created) == 1)
        await client.aclose()
        relay.app.shutdown()
        await relay.app.stopped.wait()


async def test_video_job_deleted_when_client_leaves_while_it_starts(
    relay: Running, glm: GlmEmulator
) -> None:
    """The video chat call was sent but had not answered (with the job's id) when the
    client left: the relay still reads the id (bounded) and deletes the job."""
    glm.behavior.video_start_delay_s = 0.3
    body = orjson.dumps({"prompt": "一只猫"})
    with trio.fail_after(5):
        client = await send_raw_post(relay, body, GLM_TOKEN, "/v1/videos/generations")
        await trio.sleep(0.1)  # the video chat call is on its way
        await client.aclose()
        await glm.wait_until(lambda r: len(r.video_chats) == 1)
        await glm.wait_until(lambda r: len(r.videos_deleted) == 1)
