"""Tests of ChatGLM image and video generation, sans-IO (providers/glm/media.py, 3.12)."""

from __future__ import annotations

import base64
import contextlib
import io
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from protocol.deltas import VideoResult
from protocol.errors import RemoteProtocolError, RequestError
from providers.glm.media import (
    DRAWING_ASSISTANT,
    EMOTIONAL_ATMOSPHERES,
    MIRROR_MODES,
    VIDEO_STYLES,
    ImageRequest,
    VideoRequest,
    VideoStatus,
    composite_body,
    drawing_assistant,
    drawing_prompt,
    first_frame,
    first_frame_geometry,
    image_urls_from_text,
    images_b64_body,
    images_body,
    parse_composite,
    parse_image_request,
    parse_upload_source,
    parse_video_chat,
    parse_video_request,
    parse_video_status,
    video_chat_body,
    video_delete_path,
    video_referer,
    video_status_path,
    videos_body,
)

SETTINGS = settings(max_examples=200, deadline=None)


# --- images ---------------------------------------------------------------


def test_image_request_defaults() -> None:
    """Only prompt is required; model, n and response_format have OpenAI's defaults."""
    assert parse_image_request(b'{"prompt": "cat"}') == ImageRequest(
        prompt="cat", model="cogview-3", n=1, response_format="url"
    )


def test_image_request_full_and_ignored_fields() -> None:
    """All fields are read; size, quality and style are accepted and ignored; null is absent."""
    body = orjson.dumps(
        {
            "prompt": "一只可爱的猫",
            "model": "my-model",
            "n": 10,
            "response_format": "b64_json",
            "size": "1024x1024",
            "quality": "hd",
            "style": "vivid",
        }
    )
    assert parse_image_request(body) == ImageRequest("一只可爱的猫", "my-model", 10, "b64_json")
    nulls = b'{"prompt": "p", "model": null, "n": null, "response_format": null}'
    assert parse_image_request(nulls) == ImageRequest("p")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "cogview-3"}', "prompt"),
        (b'{"prompt": ""}', "prompt"),
        (b'{"prompt": "   "}', "prompt"),
        (b'{"prompt": 5}', "prompt"),
        (b'{"prompt": "p", "model": 3}', "model"),
        (b'{"prompt": "p", "n": 0}', "n"),
        (b'{"prompt": "p", "n": 11}', "n"),
        (b'{"prompt": "p", "n": 1.5}', "n"),
        (b'{"prompt": "p", "n": "2"}', "n"),
        (b'{"prompt": "p", "n": true}', "n"),
        (b'{"prompt": "p", "response_format": "png"}', "response_format"),
        (b"not json", None),
        (b"[]", None),
        (b"", None),
    ],
)
def test_image_request_validation(body: bytes, param: str | None) -> None:
    """Bad input is a 400 naming the offending parameter (none for a bad body)."""
    with pytest.raises(RequestError) as info:
        parse_image_request(body)
    assert info.value.param == param
    assert info.value.status == 400


def test_drawing_assistant_only_takes_agent_ids() -> None:
    """A model draws with its own agent only when it is an agent id (3.12)."""
    assert drawing_assistant("cogview-3") == DRAWING_ASSISTANT == "65a232c082ff90a2ad2f15e2"
    assert drawing_assistant("0123456789abcdef01234567") == "0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("一只可爱的猫", "请画：一只可爱的猫\n"),
        ("画一只猫", "画一只猫\n"),
        ("a cat", "请画：a cat\n"),
        ("油画风格的猫", "油画风格的猫\n"),
    ],
)
def test_drawing_prompt(prompt: str, expected: str) -> None:
    """The prompt gets 请画： unless it already holds 画, and the pass-through newline."""
    assert drawing_prompt(prompt) == expected


@pytest.mark.parametrize(
    ("text", "urls"),
    [
        ("![图像](https://s/a.png)", ["https://s/a.png"]),
        ("![](http://s/a.png) ![x](https://s/b.png)", ["http://s/a.png", "https://s/b.png"]),
        ("![a](https://s/a.png)\n![a](https://s/a.png)", ["https://s/a.png"]),
        ('![a](https://s/a.png "title")', ["https://s/a.png"]),
        ("![a](https://s/Cat_(x).png)", ["https://s/Cat_(x).png"]),
        ("see [site](https://s/page) (https://s/bare)", []),
        ("![a](ftp://s/a.png) ![b](/local.png)", []),
        ("no images", []),
    ],
)
def test_image_urls_from_text_take_only_image_targets(text: str, urls: list[str]) -> None:
    """Only http(s) markdown image targets count, not links or bare URLs (weakness 38)."""
    assert image_urls_from_text(text) == urls


def test_images_bodies() -> None:
    """Both response formats have OpenAI's images shape."""
    assert orjson.loads(images_body(["u1", "u2"], 1711507449)) == {
        "created": 1711507449,
        "data": [{"url": "u1"}, {"url": "u2"}],
    }
    decoded = orjson.loads(images_b64_body([b"\x89PNG", b""], 7))
    assert decoded["created"] == 7
    assert [base64.b64decode(item["b64_json"]) for item in decoded["data"]] == [b"\x89PNG", b""]


# --- videos ---------------------------------------------------------------


def test_video_request_defaults() -> None:
    """Only prompt is required; the model defaults to cogvideox and styles to ""."""
    assert parse_video_request('{"prompt": "一只猫"}'.encode()) == VideoRequest(
        model="cogvideox",
        prompt="一只猫",
        conversation_id="",
        image_url=None,
        video_style="",
        emotional_atmosphere="",
        mirror_mode="",
        audio_id=None,
    )


def test_video_request_full() -> None:
    """Every documented field is read as given."""
    body = orjson.dumps(
        {
            "model": "cogvideox-pro",
            "prompt": "一只可爱的猫走在花丛中",
            "conversation_id": "66a537ec0603e53bccb8900a",
            "image_url": "data:image/png;base64,AAAA",
            "video_style": "油画",
            "emotional_atmosphere": "生动活泼",
            "mirror_mode": "水平",
            "audio_id": "k1-a-2",
        }
    )
    request = parse_video_request(body)
    assert request == VideoRequest(
        "cogvideox-pro",
        "一只可爱的猫走在花丛中",
        "66a537ec0603e53bccb8900a",
        "data:image/png;base64,AAAA",
        "油画",
        "生动活泼",
        "水平",
        "k1-a-2",
    )


def test_video_request_accepts_every_allowed_value() -> None:
    """Each value of each set of 3.12 passes validation."""
    for style, mood, mirror in zip(VIDEO_STYLES, EMOTIONAL_ATMOSPHERES, MIRROR_MODES, strict=True):
        body = orjson.dumps(
            {
                "prompt": "p",
                "video_style": style,
                "emotional_atmosphere": mood,
                "mirror_mode": mirror,
            }
        )
        request = parse_video_request(body)
        assert (request.video_style, request.emotional_atmosphere, request.mirror_mode) == (
            style,
            mood,
            mirror,
        )
    assert len(VIDEO_STYLES) == len(EMOTIONAL_ATMOSPHERES) == len(MIRROR_MODES) == 4


def test_video_request_with_invalid_conversation_starts_a_new_one() -> None:
    """A conversation id that is not one (e.g. "none") means a new conversation."""
    request = parse_video_request(b'{"prompt": "p", "conversation_id": "none"}')
    assert request.conversation_id == ""


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("video_style", "水彩", VIDEO_STYLES),
        ("emotional_atmosphere", "happy", EMOTIONAL_ATMOSPHERES),
        ("mirror_mode", "旋转", MIRROR_MODES),
        ("model", "cogvideox-2", ("cogvideox", "cogvideox-pro")),
    ],
)
def test_video_request_values_outside_a_set(
    field: str, value: str, allowed: tuple[str, ...]
) -> None:
    """A value outside its set is a 400 naming the field and listing the allowed values."""
    with pytest.raises(RequestError) as info:
        parse_video_request(orjson.dumps({"prompt": "p", field: value}))
    assert info.value.param == field
    assert all(item in info.value.message for item in allowed)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{}", "prompt"),
        (b'{"prompt": ""}', "prompt"),
        (b'{"prompt": "p", "image_url": "file:///etc/passwd"}', "image_url"),
        (b'{"prompt": "p", "image_url": 5}', "image_url"),
        (b'{"prompt": "p", "audio_id": "nodash"}', "audio_id"),
        (b'{"prompt": "p", "audio_id": "-id"}', "audio_id"),
        (b'{"prompt": "p", "video_style": 1}', "video_style"),
        (b'{"prompt": "p", "conversation_id": 5}', "conversation_id"),
        (b"{", None),
        (b'"p"', None),
    ],
)
def test_video_request_validation(body: bytes, param: str | None) -> None:
    """Bad input is a 400 naming the offending parameter (none for a bad body)."""
    with pytest.raises(RequestError) as info:
        parse_video_request(body)
    assert info.value.param == param


VIDEO_REQUEST = VideoRequest(
    model="cogvideox",
    prompt="一只可爱的猫走在花丛中",
    conversation_id="",
    image_url=None,
    video_style="油画",
    emotional_atmosphere="生动活泼",
    mirror_mode="水平",
    audio_id=None,
)


def test_video_chat_body_with_and_without_sources() -> None:
    """The 3.12 body: source_list only when a first frame was uploaded."""
    request = VIDEO_REQUEST
    assert orjson.loads(video_chat_body(request, ["s1"])) == {
        "conversation_id": "",
        "prompt": "一只可爱的猫走在花丛中",
        "source_list": ["s1"],
        "advanced_parameter_extra": {
            "emotional_atmosphere": "生动活泼",
            "mirror_mode": "水平",
            "video_style": "油画",
        },
    }
    assert "source_list" not in orjson.loads(video_chat_body(request, []))


@pytest.mark.parametrize(
    ("status", "done", "pending", "failed"),
    [
        ("finished", True, False, False),
        ("init", False, True, False),
        ("processing", False, True, False),
        ("failed", False, False, True),
        ("", False, False, True),
        ("FINISHED", False, False, True),
    ],
)
def test_video_status_classification(status: str, done: bool, pending: bool, failed: bool) -> None:
    """finished is done, init/processing pending, anything else failed (3.12)."""
    parsed = parse_video_status({"status": status})
    assert (parsed.done, parsed.pending, parsed.failed) == (done, pending, failed)


def test_video_status_fields() -> None:
    """Every field is read; numbers are printed; a missing status counts as failed."""
    result = {
        "status": "finished",
        "msg": "",
        "plan": "x",
        "cover_url": "https://s/cover_0.png",
        "video_url": "https://s/_0.mp4",
        "video_duration": 6,
        "resolution": "1440 × 960",
    }
    status = parse_video_status(result)
    assert status == VideoStatus(
        "finished", "", "https://s/cover_0.png", "https://s/_0.mp4", "6", "1440 × 960"
    )
    assert status.to_result("c1") == VideoResult(
        "c1", "https://s/_0.mp4", "https://s/cover_0.png", "6", "1440 × 960"
    )
    assert status.to_result("c1", "https://s/with-audio.mp4").video_url == (
        "https://s/with-audio.mp4"
    )
    assert parse_video_status({"video_url": None}).failed
    with pytest.raises(RemoteProtocolError):
        parse_video_status(None)


def test_composite_body_splits_on_the_first_dash() -> None:
    """audio_id "<key>-<id>" splits once: everything after the first "-" is the id."""
    assert orjson.loads(composite_body("chat1", "key-id")) == {
        "chat_id": "chat1",
        "key": "key",
        "audio_id": "id",
    }
    assert orjson.loads(composite_body("chat1", "k-a-b"))["audio_id"] == "a-b"
    for bad in ("nodash", "key-", "-id", ""):
        with pytest.raises(RequestError) as info:
            composite_body("chat1", bad)
        assert info.value.param == "audio_id"


def test_videos_body_shape() -> None:
    """The response has the 3.12 shape, one entry per video."""
    result = VideoResult("66a5", "https://s/_0.mp4", "https://s/cover.png", "6s", "1440 × 960")
    assert orjson.loads(videos_body([result], 1722103836)) == {
        "created": 1722103836,
        "data": [
            {
                "conversation_id": "66a5",
                "cover_url": "https://s/cover.png",
                "video_url": "https://s/_0.mp4",
                "video_duration": "6s",
                "resolution": "1440 × 960",
            }
        ],
    }


def test_video_answers_are_read_or_refused() -> None:
    """source_id, chat_id and url are required; a missing conversation id is ""."""
    assert parse_upload_source({"source_id": "s1"}) == "s1"
    assert parse_video_chat({"chat_id": "c", "conversation_id": "v"}) == ("c", "v")
    assert parse_video_chat({"chat_id": "c"}) == ("c", "")
    assert parse_composite({"url": "https://s/x.mp4"}) == "https://s/x.mp4"
    for call, result in (
        (parse_upload_source, {}),
        (parse_video_chat, {"conversation_id": "v"}),
        (parse_composite, {"url": 1}),
        (parse_composite, []),
    ):
        with pytest.raises(RemoteProtocolError):
            call(result)


def test_video_paths_and_referer() -> None:
    """Job ids from upstream are percent-encoded into the path; the referer is {base}/video."""
    assert video_status_path("abc") == "/chatglm/video-api/v1/chat/status/abc"
    assert video_delete_path("a/../b?c") == "/chatglm/video-api/v1/chat/a%2F..%2Fb%3Fc"
    assert video_referer("https://chatglm.cn/") == b"https://chatglm.cn/video"


@pytest.mark.parametrize(
    ("size", "geometry"),
    [
        ((1440, 960), (1440, 960, 0, 960)),  # already right
        ((1920, 1080), (1440, 810, 0, 810)),  # landscape: no crop needed
        ((1080, 1920), (1440, 2560, 800, 960)),  # portrait: centre crop
        ((100, 100), (1440, 1440, 240, 960)),  # small square: upscaled, then cropped
        ((3000, 1), (1440, 1, 0, 1)),  # a thin strip keeps at least one row
        ((7, 5), (1440, 1029, 34, 960)),  # 1028.57 rounds to 1029; odd remainder
    ],
)
def test_first_frame_geometry(size: tuple[int, int], geometry: tuple[int, int, int, int]) -> None:
    """Resize to 1440 wide, then centre-crop to min(new height, 960), in integers."""
    assert first_frame_geometry(*size) == geometry


@SETTINGS
@given(st.integers(1, 20_000), st.integers(1, 20_000))
def test_first_frame_crop_is_inside_and_centred(width: int, height: int) -> None:
    """The crop always lies inside the resized image, centred to within one pixel."""
    new_width, new_height, top, crop = first_frame_geometry(width, height)
    assert new_width == 1440
    assert abs(new_height - height * 1440 / width) <= 0.5 or new_height == 1
    assert crop == min(new_height, 960)
    assert top >= 0
    assert top + crop <= new_height
    assert abs((new_height - top - crop) - top) <= 1


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-1, 5)])
def test_first_frame_geometry_refuses_empty_images(size: tuple[int, int]) -> None:
    """An image without a size cannot be a first frame."""
    with pytest.raises(RequestError):
        first_frame_geometry(*size)


def _encoded(image: Image.Image, image_format: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format, **options)
    return out.getvalue()


def test_first_frame_of_a_tall_image_keeps_its_centre() -> None:
    """A 100 x 300 image in three bands: resized to 1440 x 4320, the middle 960 rows stay."""
    image = Image.new("RGB", (100, 300), (255, 0, 0))
    image.paste((0, 255, 0), (0, 100, 100, 200))
    image.paste((0, 0, 255), (0, 200, 100, 300))
    data, mime, extension = first_frame(_encoded(image, "PNG"))
    assert (mime, extension) == ("image/png", "png")
    with Image.open(io.BytesIO(data)) as frame:
        assert frame.size == (1440, 960)
        frame = frame.convert("RGB")
        for y in (0, 480, 959):  # all inside the green band (rows 1440..2880 of 4320)
            assert frame.getpixel((720, y)) == (0, 255, 0)


def test_first_frame_keeps_transparency_as_png() -> None:
    """A JPEG cannot carry alpha: an image with transparency is written as PNG."""
    image = Image.new("RGBA", (50, 20), (10, 20, 30, 0))
    data, mime, _ = first_frame(_encoded(image, "WEBP", lossless=True))
    assert mime == "image/png"
    with Image.open(io.BytesIO(data)) as frame:
        assert (frame.mode, frame.size) == ("RGBA", (1440, 576))
        assert frame.getpixel((0, 0))[3] == 0


def test_first_frame_of_a_photo_is_jpeg() -> None:
    data, mime, extension = first_frame(_encoded(Image.new("RGB", (640, 480)), "JPEG"))
    assert (mime, extension) == ("image/jpeg", "jpg")
    with Image.open(io.BytesIO(data)) as frame:
        assert (frame.format, frame.size) == ("JPEG", (1440, 960))  # 1080 high, cropped


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR claiming a size and an empty IDAT: no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    size = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", size + bytes([8, 2, 0, 0, 0])) + chunk(
        b"IDAT", b""
    )


def test_first_frame_refuses_huge_images_before_decoding() -> None:
    """The size in the header is checked before a single pixel is decoded."""
    with pytest.raises(RequestError, match="pixels") as caught:
        first_frame(_png_header(10_000, 5_000))
    assert caught.value.param == "image_url"


@pytest.mark.parametrize(
    "data", [b"", b"not an image", _png_header(10, 10), _png_header(10, 10)[:20]]
)
def test_first_frame_refuses_what_is_not_an_image(data: bytes) -> None:
    """Garbage, a truncated header and a header without pixels are all a 400."""
    with pytest.raises(RequestError) as caught:
        first_frame(data)
    assert caught.value.param == "image_url"


@SETTINGS
@given(st.binary(max_size=80))
def test_request_parsers_only_raise_request_errors(body: bytes) -> None:
    """Any body parses or raises RequestError, never anything else."""
    for parse in (parse_image_request, parse_video_request):
        with contextlib.suppress(RequestError):
            parse(body)
