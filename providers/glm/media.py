"""ChatGLM image and video generation, sans-IO (PROTOCOLS.md 3.12).

Theory of operation
-------------------
The two media endpoints of our HTTP surface are flows of several upstream
calls; this module holds every decision in them that does not need a socket,
so ``client.py`` is left with the calls themselves:

Images (``POST /v1/images/generations``):
    :func:`parse_image_request` validates the OpenAI body; the drawing
    assistant (or an agent id given as ``model``) is sent
    :func:`drawing_prompt` through the ordinary chat stream (3.7); image URLs
    come from the snapshot's ``image`` items and, as a fallback, from
    markdown images in its text (:func:`image_urls_from_text`); the answer
    is :func:`images_body` or :func:`images_b64_body`.

Videos (``POST /v1/videos/generations``):
    :func:`parse_video_request` validates the body against the allowed
    style values; an optional first-frame image is resized and cropped by
    :func:`first_frame` (geometry from :func:`first_frame_geometry`), then
    uploaded, and yields a ``source_id``
    (:func:`parse_upload_source`); :func:`video_chat_body` starts the job
    (:func:`parse_video_chat`); :func:`parse_video_status` classifies each
    poll; with an ``audio_id`` :func:`composite_body` adds the sound track
    (:func:`parse_composite`); :func:`videos_body` is the answer.

Deliberate differences from the reference
-----------------------------------------
- Only markdown *image* targets count as drawn images, not every URL in
  parentheses (weakness 38).
- The first-frame crop is computed from the resized height, with integer
  offsets (weakness 39).
- ``audio_id`` is split on its first ``-`` only; the rest is the id (the
  reference drops everything after a second ``-``). A missing ``-`` is a
  400 at parse time, before a video is made.
- Invalid input is a :class:`RequestError` naming the parameter, not an
  HTTP 200 with a private error code (weakness 11).
"""

from __future__ import annotations

import base64
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson
from PIL import Image, UnidentifiedImageError

from protocol.deltas import VideoResult
from protocol.errors import RemoteProtocolError, RequestError
from providers.glm.prompt import DRAWING_ASSISTANT as DRAWING_ASSISTANT  # PROTOCOLS.md 3.12
from providers.glm.prompt import is_agent_id, valid_conversation_id

if TYPE_CHECKING:
    from collections.abc import Sequence

# --- wire constants -------------------------------------------------------

#: PROTOCOLS.md 3.2, 3.12: start a video job (signed).
VIDEO_CHAT_PATH = "/chatglm/video-api/v1/chat"
#: PROTOCOLS.md 3.2, 3.12: poll a job; the chat id is appended.
VIDEO_STATUS_PATH = "/chatglm/video-api/v1/chat/status/"
#: PROTOCOLS.md 3.2, 3.12: add a sound track to a finished video.
VIDEO_COMPOSITE_PATH = "/chatglm/video-api/v1/static/composite_video"
#: PROTOCOLS.md 3.2, 3.8: first-frame image upload (multipart, field ``file``).
VIDEO_UPLOAD_PATH = "/chatglm/video-api/v1/static/upload"
#: PROTOCOLS.md 3.2, 3.12: ``DELETE`` a job; the chat id is appended.
VIDEO_DELETE_PATH = "/chatglm/video-api/v1/chat/"
#: PROTOCOLS.md 3.2: referer of every video call.
REFERER_VIDEO_PATH = "/video"

#: PROTOCOLS.md 3.12: image defaults and limits of our surface.
DEFAULT_IMAGE_MODEL = "cogview-3"
MAX_IMAGES = 10
RESPONSE_FORMATS = ("url", "b64_json")
#: PROTOCOLS.md 3.12: "please draw:", and the character that makes it redundant.
DRAW_PREFIX = "请画："
DRAW_CHARACTER = "画"

#: PROTOCOLS.md 3.12: video models; the pro model draws its own first frame.
VIDEO_MODELS = ("cogvideox", "cogvideox-pro")
#: PROTOCOLS.md 3.12: 3D cartoon, old black-and-white photo, oil painting, cinematic.
VIDEO_STYLES = ("卡通3D", "黑白老照片", "油画", "电影感")
#: PROTOCOLS.md 3.12: warm, lively, tense, desolate.
EMOTIONAL_ATMOSPHERES = ("温馨和谐", "生动活泼", "紧张刺激", "凄凉寂寞")
#: PROTOCOLS.md 3.12 (camera move): horizontal, vertical, push in, pull out.
MIRROR_MODES = ("水平", "垂直", "推近", "拉远")
#: PROTOCOLS.md 3.12: poll statuses.
VIDEO_DONE = "finished"
VIDEO_PENDING = frozenset({"init", "processing"})

#: PROTOCOLS.md 3.8: first-frame geometry, in pixels.
FRAME_WIDTH_PX = 1440
FRAME_MAX_HEIGHT_PX = 960
#: The largest first-frame image decoded (pixels), against decompression bombs.
FRAME_MAX_SOURCE_PIXELS = 40_000_000

# weakness 38: the http(s) target of a markdown image, with an optional
# title; one level of parentheses inside the URL is allowed.
_IMAGE_TARGET_RE = re.compile(
    r"!\[(?:[^\[\]\n]|\[[^\[\]\n]*\])*\]"  # ![alt]
    r"\(\s*(https?://(?:[^\s()]|\([^\s()]*\))+)"  # (url
    r'(?:\s+"[^"\n]*")?\s*\)'  # optional "title")
)


# --- images ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """A validated ``/v1/images/generations`` body."""

    prompt: str
    model: str = DEFAULT_IMAGE_MODEL
    #: accepted (1..10); the upstream draws what it draws, usually one to four
    n: int = 1
    response_format: str = "url"


def _object(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise RequestError("request body must be a JSON object")
    return parsed


def _string(body: dict[str, Any], name: str, default: str) -> str:
    """An optional string field (null means absent)."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be a string", param=name)
    return value


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError(
            "'prompt' is required", param="prompt", code="missing_required_parameter"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("'prompt' must be a non-empty string", param="prompt")
    return prompt


def _choice(body: dict[str, Any], name: str, allowed: Sequence[str], default: str) -> str:
    value = _string(body, name, default)
    if value not in allowed:
        listed = ", ".join(repr(item) for item in allowed)
        raise RequestError(f"'{name}' must be one of {listed}; got {value!r}", param=name)
    return value


def parse_image_request(body: bytes) -> ImageRequest:
    """Validate a ``/v1/images/generations`` body (PROTOCOLS.md 3.12).

    ``size``, ``quality``, ``style`` and ``user`` are accepted and ignored,
    as the reference does; null counts as absent everywhere.

    Raises:
        RequestError: invalid JSON or not an object; ``prompt`` missing or
            empty; ``model`` not a string; ``n`` not an integer in 1..10;
            ``response_format`` neither ``url`` nor ``b64_json``. ``param``
            names the field.
    """
    fields = _object(body)
    prompt = _prompt(fields)
    model = _string(fields, "model", DEFAULT_IMAGE_MODEL) or DEFAULT_IMAGE_MODEL
    n = fields.get("n")
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise RequestError(f"'n' must be an integer from 1 to {MAX_IMAGES}", param="n")
    response_format = _choice(fields, "response_format", RESPONSE_FORMATS, "url")
    return ImageRequest(prompt=prompt, model=model, n=n, response_format=response_format)


def drawing_assistant(model: str, default: str = DRAWING_ASSISTANT) -> str:
    """The assistant that draws: an agent id given as ``model``, else ``default`` (3.12)."""
    return model if is_agent_id(model) else default


def drawing_prompt(prompt: str) -> str:
    """The text item of a drawing request (PROTOCOLS.md 3.12).

    ``请画：`` ("please draw:") is prefixed unless the prompt already holds
    ``画`` ("draw"); the pass-through newline follows, as for chat.
    """
    if DRAW_CHARACTER not in prompt:
        prompt = DRAW_PREFIX + prompt
    return prompt + "\n"


def image_urls_from_text(text: str) -> list[str]:
    """The http(s) targets of markdown images in ``text``, first seen first.

    Only ``![alt](url)`` counts, optionally with a title; ordinary links and
    bare parenthesised URLs do not (weakness 38). Duplicates are dropped.
    """
    if "![" not in text:
        return []
    return list(dict.fromkeys(match[1] for match in _IMAGE_TARGET_RE.finditer(text)))


def images_body(urls: Sequence[str], created: int) -> bytes:
    """OpenAI's images response with URLs: ``{"created", "data": [{"url"}]}``."""
    return orjson.dumps({"created": created, "data": [{"url": url} for url in urls]})


def images_b64_body(images: Sequence[bytes], created: int) -> bytes:
    """OpenAI's images response with inline images: ``[{"b64_json"}]``."""
    data = [{"b64_json": base64.b64encode(image).decode("ascii")} for image in images]
    return orjson.dumps({"created": created, "data": data})


# --- videos ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VideoRequest:
    """A validated ``/v1/videos/generations`` body."""

    model: str
    prompt: str
    #: "" for a new conversation
    conversation_id: str
    #: an http(s) or data URL of the first frame, or None
    image_url: str | None
    #: "" when not given (sent as an empty string, 3.12)
    video_style: str
    emotional_atmosphere: str
    mirror_mode: str
    #: "<key>-<id>" of a sound track, or None
    audio_id: str | None


def _optional_choice(body: dict[str, Any], name: str, allowed: Sequence[str]) -> str:
    value = _string(body, name, "")
    if value and value not in allowed:
        listed = ", ".join(allowed)
        raise RequestError(f"'{name}' must be one of: {listed}; got {value!r}", param=name)
    return value


def _split_audio_id(audio_id: str) -> tuple[str, str]:
    key, dash, ident = audio_id.partition("-")
    if not (dash and key and ident):
        raise RequestError("'audio_id' must look like '<key>-<id>'", param="audio_id")
    return key, ident


def parse_video_request(body: bytes) -> VideoRequest:
    """Validate a ``/v1/videos/generations`` body (PROTOCOLS.md 3.12).

    Null counts as absent. A ``conversation_id`` that cannot name an upstream
    conversation (see :func:`valid_conversation_id`) starts a new one, as in
    chat.

    Raises:
        RequestError: invalid JSON or not an object; ``model`` not
            ``cogvideox``/``cogvideox-pro``; ``prompt`` missing or empty; a
            field not a string; ``image_url`` neither http(s) nor a data URL;
            ``video_style``, ``emotional_atmosphere`` or ``mirror_mode``
            outside its set (the message lists the allowed values);
            ``audio_id`` without a ``-``. ``param`` names the field.
    """
    fields = _object(body)
    model = _choice(fields, "model", VIDEO_MODELS, VIDEO_MODELS[0])
    prompt = _prompt(fields)
    conversation_id = valid_conversation_id(_string(fields, "conversation_id", "")) or ""
    image_url = _string(fields, "image_url", "") or None
    if image_url is not None and not image_url.startswith(("http://", "https://", "data:")):
        raise RequestError("'image_url' must be an http(s) URL or a data URL", param="image_url")
    audio_id = _string(fields, "audio_id", "") or None
    if audio_id is not None:
        _split_audio_id(audio_id)
    return VideoRequest(
        model=model,
        prompt=prompt,
        conversation_id=conversation_id,
        image_url=image_url,
        video_style=_optional_choice(fields, "video_style", VIDEO_STYLES),
        emotional_atmosphere=_optional_choice(
            fields, "emotional_atmosphere", EMOTIONAL_ATMOSPHERES
        ),
        mirror_mode=_optional_choice(fields, "mirror_mode", MIRROR_MODES),
        audio_id=audio_id,
    )


def video_chat_body(req: VideoRequest, source_ids: Sequence[str]) -> bytes:
    """The JSON body that starts a video job; ``source_list`` only with images (3.12)."""
    body: dict[str, Any] = {"conversation_id": req.conversation_id, "prompt": req.prompt}
    if source_ids:
        body["source_list"] = list(source_ids)
    body["advanced_parameter_extra"] = {
        "emotional_atmosphere": req.emotional_atmosphere,
        "mirror_mode": req.mirror_mode,
        "video_style": req.video_style,
    }
    return orjson.dumps(body)


def video_referer(base_url: str) -> bytes:
    """The ``Referer`` of every video call: ``{base}/video``."""
    return (base_url.rstrip("/") + REFERER_VIDEO_PATH).encode()


def video_status_path(chat_id: str) -> str:
    """The poll path of a job; the id is percent-encoded (it comes from upstream)."""
    return VIDEO_STATUS_PATH + quote(chat_id, safe="")


def video_delete_path(chat_id: str) -> str:
    """The ``DELETE`` path of a job; the id is percent-encoded."""
    return VIDEO_DELETE_PATH + quote(chat_id, safe="")


def _result_dict(result: object, what: str) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise RemoteProtocolError(f"ChatGLM {what} answer is not an object")
    return result


def _required_str(result: dict[str, Any], name: str, what: str) -> str:
    value = result.get(name)
    if not isinstance(value, str) or not value:
        raise RemoteProtocolError(f"ChatGLM {what} answer has no {name}")
    return value


def parse_upload_source(result: object) -> str:
    """The ``source_id`` of a video first-frame upload's ``result`` (3.8).

    Raises:
        RemoteProtocolError: it is missing or not a string.
    """
    return _required_str(_result_dict(result, "upload"), "source_id", "upload")


def parse_video_chat(result: object) -> tuple[str, str]:
    """``(chat_id, conversation_id)`` of a started video job (3.12).

    Raises:
        RemoteProtocolError: no ``chat_id`` (a missing conversation id is "").
    """
    fields = _result_dict(result, "video chat")
    chat_id = _required_str(fields, "chat_id", "video chat")
    conversation_id = fields.get("conversation_id")
    return chat_id, conversation_id if isinstance(conversation_id, str) else ""


def parse_composite(result: object) -> str:
    """The ``url`` of a video with its sound track (3.12).

    Raises:
        RemoteProtocolError: no ``url``.
    """
    return _required_str(_result_dict(result, "composite"), "url", "composite")


def _text(value: object) -> str:
    """A status field as text: strings as they are, numbers printed, else ""."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


@dataclass(frozen=True, slots=True)
class VideoStatus:
    """One poll of a video job (PROTOCOLS.md 3.12)."""

    status: str
    msg: str = ""
    cover_url: str = ""
    video_url: str = ""
    video_duration: str = ""
    resolution: str = ""

    @property
    def done(self) -> bool:
        """The video is ready."""
        return self.status == VIDEO_DONE

    @property
    def pending(self) -> bool:
        """Still being made: poll again."""
        return self.status in VIDEO_PENDING

    @property
    def failed(self) -> bool:
        """Any other status: the job failed (``msg`` may say why)."""
        return not (self.done or self.pending)

    def to_result(self, conversation_id: str, video_url: str | None = None) -> VideoResult:
        """The finished video as a delta; ``video_url`` overrides (after composite)."""
        return VideoResult(
            conversation_id=conversation_id,
            video_url=self.video_url if video_url is None else video_url,
            cover_url=self.cover_url,
            video_duration=self.video_duration,
            resolution=self.resolution,
        )


def parse_video_status(result: object) -> VideoStatus:
    """Read one poll's ``result``; missing fields are "" (so no status = failed).

    Raises:
        RemoteProtocolError: ``result`` is not an object.
    """
    fields = _result_dict(result, "video status")
    return VideoStatus(
        status=_text(fields.get("status")),
        msg=_text(fields.get("msg")),
        cover_url=_text(fields.get("cover_url")),
        video_url=_text(fields.get("video_url")),
        video_duration=_text(fields.get("video_duration")),
        resolution=_text(fields.get("resolution")),
    )


def composite_body(chat_id: str, audio_id: str) -> bytes:
    """The JSON body that adds sound track ``<key>-<id>`` to a video (3.12).

    Raises:
        RequestError: ``audio_id`` has no ``-`` (or an empty key or id).
    """
    key, ident = _split_audio_id(audio_id)
    return orjson.dumps({"chat_id": chat_id, "key": key, "audio_id": ident})


def videos_body(results: Sequence[VideoResult], created: int) -> bytes:
    """Our videos response (the shape of 3.12)."""
    data = [
        {
            "conversation_id": result.conversation_id,
            "cover_url": result.cover_url,
            "video_url": result.video_url,
            "video_duration": result.video_duration,
            "resolution": result.resolution,
        }
        for result in results
    ]
    return orjson.dumps({"created": created, "data": data})


def first_frame_geometry(width: int, height: int) -> tuple[int, int, int, int]:
    """Where a first-frame image is resized and cropped (PROTOCOLS.md 3.8).

    Resize to 1440 px wide keeping the aspect ratio (rounded, at least 1 px
    high), then centre-crop to ``min(new_height, 960)`` px high. Unlike the
    reference (weakness 39) every number comes from the resized image and is
    an integer, and the crop always lies inside it.

    Args:
        width: the source image's width in pixels.
        height: the source image's height in pixels.

    Returns:
        ``(new_width, new_height, crop_top, crop_height)``.

    Raises:
        RequestError: a dimension is not positive (``param`` ``image_url``).
    """
    if width <= 0 or height <= 0:
        raise RequestError("the first-frame image has no size", param="image_url")
    new_height = max(1, (height * FRAME_WIDTH_PX + width // 2) // width)  # round half up
    crop_height = min(new_height, FRAME_MAX_HEIGHT_PX)
    crop_top = (new_height - crop_height) // 2
    return FRAME_WIDTH_PX, new_height, crop_top, crop_height


def first_frame(data: bytes) -> tuple[bytes, str, str]:
    """A client's first-frame image made ready for the video upload (PROTOCOLS.md 3.8).

    Resized to :data:`FRAME_WIDTH_PX` wide and centre-cropped to at most
    :data:`FRAME_MAX_HEIGHT_PX` high (:func:`first_frame_geometry`); the
    first frame of an animation is used. Images with transparency, and PNG
    and GIF sources, are written as PNG; the rest as JPEG (quality 92).
    CPU-bound: call it off the event loop.

    Args:
        data: the fetched image file.

    Returns:
        ``(image bytes, MIME type, file extension)``.

    Raises:
        RequestError: ``data`` is not an image Pillow can read, or it has
            more than :data:`FRAME_MAX_SOURCE_PIXELS` pixels (``param``
            ``image_url``).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as source:
                width, height = source.size
                if width * height > FRAME_MAX_SOURCE_PIXELS:
                    raise RequestError(
                        f"the first-frame image is {width} x {height} px; at most "
                        f"{FRAME_MAX_SOURCE_PIXELS:,} pixels are accepted",
                        param="image_url",
                    )
                new_width, new_height, top, crop = first_frame_geometry(width, height)
                source_format = source.format
                alpha = source.mode in ("RGBA", "LA", "PA") or "transparency" in source.info
                image = source.convert("RGBA" if alpha else "RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            OSError, ValueError, SyntaxError) as exc:
        raise RequestError(
            "the first-frame image_url is not an image that can be read", param="image_url"
        ) from exc
    image = image.resize((new_width, new_height), Image.Resampling.LANCZOS)
    image = image.crop((0, top, new_width, top + crop))
    out = io.BytesIO()
    if alpha or source_format in ("PNG", "GIF"):
        image.save(out, format="PNG")
        return out.getvalue(), "image/png", "png"
    image.save(out, format="JPEG", quality=92)
    return out.getvalue(), "image/jpeg", "jpg"
