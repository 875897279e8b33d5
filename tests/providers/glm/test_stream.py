"""Tests of providers/glm/stream.py: ChatGLM snapshots -> deltas (PROTOCOLS.md 3.9, 3.11).

The property tests build answers from a small *script* (parts made of text,
reasoning, search hits, images, code and execution output with their final
values), turn it into the growing snapshot sequence the upstream would send in
either layout of 3.9, and check what :class:`GlmStream` makes of it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.deltas import (
    Citation,
    Delta,
    Finish,
    ImageResult,
    ReasoningDelta,
    TextDelta,
    UpstreamError,
)
from protocol.errors import RemoteProtocolError
from protocol.markers import strip_all
from protocol.sse import SSEDecoder, encode_event
from providers.glm.stream import (
    CODE_FENCE_CLOSE,
    CODE_FENCE_OPEN,
    MARKER,
    TAIL_CHARS,
    GlmModes,
    GlmStream,
)

SETTINGS = settings(max_examples=100, deadline=None)
CID = "65f6c28546bae1f0fbb532de"

# ---------------------------------------------------------------- the script

Kind = Literal["text", "think", "legacy_think", "quote", "image", "code", "exec"]
CUMULATIVE: frozenset[str] = frozenset({"text", "think", "legacy_think", "code"})


@dataclass(frozen=True)
class Item:
    """One content item of the script with its final value."""

    kind: Kind
    value: str = ""
    hits: tuple[tuple[str, str], ...] = ()
    urls: tuple[str, ...] = ()


Script = list[list[Item]]
Snapshot = dict[str, Any]

WIRE_TYPE = {
    "text": "text",
    "think": "think",
    "legacy_think": "text_thinking",
    "quote": "quote_result",
    "image": "image",
    "code": "code",
    "exec": "execution_output",
}


def wire_item(item: Item, value: str, status: str, part_done: bool) -> dict[str, Any]:
    """The wire form of ``item`` with its cumulative field at ``value``."""
    out: dict[str, Any] = {"type": WIRE_TYPE[item.kind], "status": status}
    match item.kind:
        case "text" | "legacy_think":
            out["text"] = value
        case "think":
            out["think"] = value
        case "code":
            out["code"] = value
        case "image":
            out["image"] = [{"image_url": url} for url in item.urls] if part_done else []
        case "exec":
            out["content"] = item.value if part_done else ""
        case "quote":
            pass
    return out


def wire_part(
    p: int, items: list[dict[str, Any]], done: bool, hits: list[dict[str, str]], ids: bool
) -> dict[str, Any]:
    """One part of a snapshot."""
    part: dict[str, Any] = {"status": "finish" if done else "init", "content": items}
    part["meta_data"] = {"metadata_list": hits} if done and hits else {}
    if ids:
        part["logic_id"] = f"logic-{p}"
    return part


def part_events(
    p: int, items: list[Item], cuts: dict[tuple[int, int], list[int]], ids: bool
) -> list[dict[str, Any]]:
    """The successive states of part ``p``: each item grows in turn, then the part finishes."""
    states: list[dict[str, Any]] = []
    finished: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if item.kind in CUMULATIVE:
            stages = [item.value[:c] for c in cuts.get((p, i), [])] + [item.value]
        else:
            stages = [""]
        for stage in stages:
            content = [*finished, wire_item(item, stage, "init", False)]
            states.append(wire_part(p, content, False, [], ids))
        finished.append(wire_item(item, item.value, "finish", False))
    hits = [{"title": t, "url": u} for item in items for t, u in item.hits]
    final = [wire_item(item, item.value, "finish", True) for item in items]
    states.append(wire_part(p, final, True, hits, ids))
    return states


def snapshots(
    script: Script,
    cuts: dict[tuple[int, int], list[int]],
    *,
    layout: Literal["a", "b"],
    ids: bool,
    end: Literal["finish", "intervene"] = "finish",
    end_parts: bool = True,
    intervene_text: str = "blocked",
) -> list[Snapshot]:
    """The snapshot sequence of ``script`` in layout (a) (active part only) or (b) (all parts)."""
    events: list[Snapshot] = []
    done_parts: list[dict[str, Any]] = []
    for p, items in enumerate(script):
        states = part_events(p, items, cuts, ids)
        for state in states:
            parts = [*done_parts, state] if layout == "b" else [state]
            events.append(
                {"conversation_id": CID, "status": "init", "last_error": {}, "parts": parts}
            )
        done_parts.append(states[-1])
    # layout (a): the last part once more, or no parts at all; layout (b): every part
    last_parts = done_parts if layout == "b" else done_parts[-1:] if end_parts else []
    last: Snapshot = {"conversation_id": CID, "status": end, "last_error": {}, "parts": last_parts}
    if end == "intervene":
        last["last_error"] = {"intervene_text": intervene_text}
    events.append(last)
    return events


def expected_text(script: Script) -> str:
    """The answer text the script must render to (see the module's "Separators")."""
    renders: list[str] = []
    last_exec = ""
    for items in script:
        for item in items:
            if item.kind == "text":
                renders.append(strip_all(MARKER, item.value))
            elif item.kind == "code" and item.value:
                renders.append(CODE_FENCE_OPEN + item.value + CODE_FENCE_CLOSE)
        # An execution output means something only once its part finished (3.9): it comes
        # after everything else its part wrote.
        for item in items:
            if item.kind == "exec" and item.value and item.value != last_exec:
                last_exec = item.value
                renders.append(item.value + "\n")
    return "\n".join(r for r in renders if r)


def expected_reasoning(script: Script) -> str:
    """The reasoning text the script must render to."""
    thoughts = [i.value for items in script for i in items if i.kind in ("think", "legacy_think")]
    return "\n".join(t for t in thoughts if t)


DEFAULT_MODES = GlmModes()


def run(events: list[Snapshot], modes: GlmModes = DEFAULT_MODES) -> list[list[Delta]]:
    """Feed every snapshot, then close; the deltas of each call."""
    stream = GlmStream(modes)
    out = [stream.feed(orjson.dumps(event).decode()) for event in events]
    out.append(stream.close())
    return out


def flat(per_event: list[list[Delta]]) -> list[Delta]:
    """All deltas in order."""
    return [delta for deltas in per_event for delta in deltas]


def text_of(deltas: list[Delta]) -> str:
    """The concatenated answer text."""
    return "".join(d.text for d in deltas if isinstance(d, TextDelta))


def reasoning_of(deltas: list[Delta]) -> str:
    """The concatenated reasoning text."""
    return "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))


# ---------------------------------------------------------------- strategies

ANSWER_TOKENS = st.sampled_from(
    [
        *("你好", "abc", " ", "世界。", "x\n", '"\\'),  # plain text, JSON escapes
        *("【1†source】", "【23†来源】", "【4†源】"),  # markers
        *("【注】", "【"),  # opener characters that are no marker
    ]
)
answers = st.lists(ANSWER_TOKENS, max_size=8).map("".join)
plain = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


@st.composite
def items(draw: st.DrawFn) -> Item:
    """One script item of any kind."""
    kind: Kind = draw(st.sampled_from(list(WIRE_TYPE)))
    match kind:
        case "text":
            return Item(kind, draw(answers))
        case "quote":
            hits = draw(st.lists(st.tuples(plain, st.text("abc/", max_size=5)), max_size=3))
            return Item(kind, hits=tuple(hits))
        case "image":
            schemes = st.sampled_from(["https://i/", "http://i/", "ftp://i/"])
            urls = draw(st.lists(schemes, max_size=3))
            return Item(kind, urls=tuple(urls))
        case _:
            return Item(kind, draw(plain))


def unique_urls(script: Script) -> Script:
    """Make every hit and image URL distinct (de-duplication is tested on its own)."""
    out: Script = []
    for p, part in enumerate(script):
        new_part = []
        for i, item in enumerate(part):
            hits = tuple((t, f"https://h/{p}/{i}/{n}/{u}") for n, (t, u) in enumerate(item.hits))
            urls = tuple(f"{u}{p}/{i}/{n}.png" for n, u in enumerate(item.urls))
            new_part.append(Item(item.kind, item.value, hits, urls))
        out.append(new_part)
    return out


parts_of_items = st.lists(items(), min_size=1, max_size=3)
scripts = st.lists(parts_of_items, min_size=1, max_size=4).map(unique_urls)


def draw_cuts(data: st.DataObject, script: Script) -> dict[tuple[int, int], list[int]]:
    """Random growth steps for every cumulative item."""
    cuts: dict[tuple[int, int], list[int]] = {}
    for p, part in enumerate(script):
        for i, item in enumerate(part):
            if item.kind in CUMULATIVE and len(item.value) > 1:
                points = data.draw(st.lists(st.integers(1, len(item.value) - 1), max_size=6))
                cuts[(p, i)] = sorted(set(points))
    return cuts


# ---------------------------------------------------------------- properties


@SETTINGS
@given(
    script=scripts,
    data=st.data(),
    layout=st.sampled_from(["a", "b"]),
    ids=st.booleans(),
    end_parts=st.booleans(),
)
def test_rendering_of_any_script(
    script: Script,
    data: st.DataObject,
    layout: Literal["a", "b"],
    ids: bool,
    end_parts: bool,
) -> None:
    """Any script in either layout, with or without logic_id, in any growth steps: the text is
    the script's rendering (nothing twice, nothing lost, markers gone), reasoning is the think
    text, each citation and image comes once, and exactly one Finish comes last."""
    cuts = draw_cuts(data, script)
    per_event = run(snapshots(script, cuts, layout=layout, ids=ids, end_parts=end_parts))
    deltas = flat(per_event)
    assert text_of(deltas) == expected_text(script)
    assert reasoning_of(deltas) == expected_reasoning(script)
    assert all(d.text for d in deltas if isinstance(d, TextDelta | ReasoningDelta))
    hits = [Citation(t, u) for items in script for i in items for t, u in i.hits]
    assert [d for d in deltas if isinstance(d, Citation)] == hits
    images = [
        ImageResult(u)
        for items in script
        for i in items
        for u in i.urls
        if u.startswith(("http://", "https://"))
    ]
    assert [d for d in deltas if isinstance(d, ImageResult)] == images
    assert [d for d in deltas if isinstance(d, Finish | UpstreamError)] == [Finish("stop")]
    assert deltas[-1] == Finish("stop")
    assert per_event[-1] == []  # close() after the finish adds nothing


@SETTINGS
@given(script=scripts, data=st.data(), ids=st.booleans())
def test_both_layouts_give_the_same_deltas(script: Script, data: st.DataObject, ids: bool) -> None:
    """The same answer sent in layout (a) and in layout (b) gives the same deltas, event by
    event."""
    cuts = draw_cuts(data, script)
    a = run(snapshots(script, cuts, layout="a", ids=ids))
    b = run(snapshots(script, cuts, layout="b", ids=ids))
    assert a == b


@SETTINGS
@given(script=scripts, data=st.data(), layout=st.sampled_from(["a", "b"]))
def test_silent_model_hides_reasoning_and_citations(
    script: Script, data: st.DataObject, layout: Literal["a", "b"]
) -> None:
    """A silent model gets the same answer text, with no reasoning and no citations."""
    cuts = draw_cuts(data, script)
    deltas = flat(run(snapshots(script, cuts, layout=layout, ids=True), GlmModes(silent=True)))
    assert text_of(deltas) == expected_text(script)
    assert not any(isinstance(d, ReasoningDelta | Citation) for d in deltas)
    assert deltas[-1] == Finish("stop")


@SETTINGS
@given(script=scripts, data=st.data(), layout=st.sampled_from(["a", "b"]), ids=st.booleans())
def test_any_split_of_the_sse_bytes_gives_the_same_deltas(
    script: Script, data: st.DataObject, layout: Literal["a", "b"], ids: bool
) -> None:
    """The snapshots encoded as SSE and cut anywhere, decoded with SSEDecoder and fed one
    event at a time, give the same deltas as feeding the snapshots directly."""
    events = snapshots(script, draw_cuts(data, script), layout=layout, ids=ids)
    wire = b"".join(encode_event(orjson.dumps(event)) for event in events)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts")))
    decoder, stream = SSEDecoder(), GlmStream()
    got: list[Delta] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        for event in decoder.feed(wire[start:cut]):
            got += stream.feed(event.data)
        start = cut
    for event in decoder.close():
        got += stream.feed(event.data)
    got += stream.close()
    assert got == flat(run(events))


@SETTINGS
@given(script=scripts, data=st.data(), layout=st.sampled_from(["a", "b"]))
def test_intervene_ends_with_content_filter(
    script: Script, data: st.DataObject, layout: Literal["a", "b"]
) -> None:
    """A stream ended by the content filter keeps the text sent so far and ends with one
    Finish("content_filter") carrying the explanation."""
    events = snapshots(
        script,
        draw_cuts(data, script),
        layout=layout,
        ids=False,
        end="intervene",
        intervene_text="已拦截",
    )
    deltas = flat(run(events))
    assert text_of(deltas) == expected_text(script)
    assert [d for d in deltas if isinstance(d, Finish | UpstreamError)] == [
        Finish("content_filter", text="已拦截")
    ]
    assert deltas[-1] == Finish("content_filter", text="已拦截")


@SETTINGS
@given(script=scripts, data=st.data(), layout=st.sampled_from(["a", "b"]))
def test_truncated_stream_reports_an_error(
    script: Script, data: st.DataObject, layout: Literal["a", "b"]
) -> None:
    """Cut before the final snapshot, the text before close() is a prefix of the full
    rendering, and close() (after any held-back text) ends it with UpstreamError("truncated"),
    never a Finish."""
    events = snapshots(script, draw_cuts(data, script), layout=layout, ids=True)
    keep = data.draw(st.integers(0, len(events) - 1), label="keep")
    per_event = run(events[:keep])
    before_close = flat(per_event[:-1])
    assert expected_text(script).startswith(text_of(before_close))
    assert not any(isinstance(d, Finish | UpstreamError) for d in before_close)
    last = per_event[-1]
    assert all(isinstance(d, TextDelta) for d in last[:-1])  # held-back text, if any
    assert isinstance(last[-1], UpstreamError)
    assert last[-1].code == "truncated"


JSON_KEYS = st.sampled_from(
    [
        "parts",
        "content",
        "type",
        "status",
        "text",
        "think",
        "code",
        "content",
        "logic_id",
        "meta_data",
        "metadata_list",
        "title",
        "url",
        "image",
        "image_url",
        "last_error",
        "intervene_text",
        "conversation_id",
        "code",
        "message",
        "finish",
    ]
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        [
            "text",
            "think",
            "code",
            "image",
            "quote_result",
            "execution_output",
            "text_thinking",
            "finish",
            "init",
            "intervene",
            "http://x",
            "【1†",
        ]
    )
    | st.text(max_size=6)
)
json_values = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS, inner, max_size=5),
    max_leaves=30,
)


@SETTINGS
@given(
    datas=st.lists(
        st.one_of(
            json_values.map(lambda v: orjson.dumps(v).decode()),
            st.text(max_size=20),
        ),
        max_size=8,
    )
)
@example(datas=["{", "[]", "1", '"x"', "null"])
@example(datas=['{"parts": 1}', '{"parts": [1, {"content": 2}, {"content": [3, {"type": 4}]}]}'])
@example(datas=['{"code": true}', '{"status": 1.5, "message": 3}', '{"status": "finish"}'])
def test_garbage_gives_deltas_or_remote_protocol_error(datas: list[str]) -> None:
    """Any event data gives deltas or RemoteProtocolError, never another exception, and once a
    terminal delta came nothing follows."""
    stream = GlmStream()
    out: list[Delta] = []
    for data in datas:
        with contextlib.suppress(RemoteProtocolError):
            out += stream.feed(data)
    out += stream.close()
    terminal = [i for i, d in enumerate(out) if isinstance(d, Finish | UpstreamError)]
    assert terminal == [len(out) - 1]


# ---------------------------------------------------------------- unit tests


def feed_all(stream: GlmStream, events: list[Any]) -> list[list[Delta]]:
    """Feed JSON-encodable events; the deltas of each."""
    return [stream.feed(orjson.dumps(event).decode()) for event in events]


def test_search_example_of_protocols_3_9() -> None:
    """The search-backed example of PROTOCOLS.md 3.9: one citation when the quote part
    finishes, the text in two deltas with the marker removed, then Finish("stop")."""
    cid = "65f6c28546bae1f0fbb532de"
    events = [
        {
            "conversation_id": cid,
            "status": "init",
            "parts": [{"status": "init", "content": [{"type": "quote_result", "status": "init"}]}],
        },
        {
            "conversation_id": cid,
            "status": "init",
            "parts": [
                {
                    "status": "finish",
                    "meta_data": {
                        "metadata_list": [{"title": "智谱", "url": "https://www.zhipuai.cn/"}]
                    },
                    "content": [{"type": "quote_result", "status": "finish"}],
                }
            ],
        },
        {
            "conversation_id": cid,
            "status": "init",
            "parts": [
                {
                    "status": "init",
                    "content": [{"type": "text", "status": "init", "text": "智谱是"}],
                }
            ],
        },
        {
            "conversation_id": cid,
            "status": "init",
            "parts": [
                {
                    "status": "init",
                    "content": [
                        {"type": "text", "status": "init", "text": "智谱是一家AI公司【1†source】。"}
                    ],
                }
            ],
        },
        {
            "conversation_id": cid,
            "status": "finish",
            "parts": [
                {
                    "status": "finish",
                    "content": [
                        {
                            "type": "text",
                            "status": "finish",
                            "text": "智谱是一家AI公司【1†source】。",
                        }
                    ],
                }
            ],
        },
    ]
    stream = GlmStream()
    assert feed_all(stream, events) == [
        [],
        [Citation("智谱", "https://www.zhipuai.cn/")],
        [TextDelta("智谱是")],
        [TextDelta("一家AI公司。")],
        [Finish("stop")],
    ]
    assert stream.conversation_id == cid
    assert stream.finished
    assert stream.feed(orjson.dumps(events[-1]).decode()) == []
    assert stream.close() == []


def text_event(text: str, status: str = "init", **top: Any) -> dict[str, Any]:
    """A snapshot with one text part."""
    return {
        "status": status,
        "parts": [{"logic_id": "p", "status": "init", "content": [{"type": "text", "text": text}]}],
        **top,
    }


def test_intervene_puts_the_explanation_into_finish() -> None:
    """status intervene with last_error.intervene_text -> the text so far, then
    Finish("content_filter") carrying the explanation."""
    stream = GlmStream()
    why = "这个问题我暂时无法回答"  # "I cannot answer this question for now"
    out = feed_all(
        stream,
        [
            text_event("我来回答"),
            text_event("我来回答", "intervene", last_error={"intervene_text": why}),
        ],
    )
    assert out == [[TextDelta("我来回答")], [Finish("content_filter", text=why)]]


def test_intervene_without_explanation() -> None:
    """intervene whose last_error is missing or odd -> Finish("content_filter") with empty text."""
    assert GlmStream().feed('{"status": "intervene", "last_error": []}') == [
        Finish("content_filter")
    ]


def test_silent_model_hides_citations_and_reasoning() -> None:
    """A silent model sees neither reasoning nor search hits, only the answer text."""
    event = {
        "status": "init",
        "parts": [
            {
                "logic_id": "q",
                "status": "finish",
                "meta_data": {"metadata_list": [{"title": "t", "url": "https://u/"}]},
                "content": [{"type": "quote_result", "status": "finish"}],
            },
            {
                "logic_id": "a",
                "status": "init",
                "content": [
                    {"type": "think", "status": "finish", "think": "hmm"},
                    {"type": "text", "status": "init", "text": "answer"},
                ],
            },
        ],
    }
    assert GlmStream(GlmModes(silent=True)).feed(orjson.dumps(event).decode()) == [
        TextDelta("answer")
    ]
    assert GlmStream().feed(orjson.dumps(event).decode()) == [
        Citation("t", "https://u/"),
        ReasoningDelta("hmm"),
        TextDelta("answer"),
    ]


def test_reasoning_is_emitted_for_models_that_are_not_think_models() -> None:
    """A non-think, non-silent model (deep research) gets each reasoning suffix once, not the
    reference's repeated cumulative value; legacy text_thinking items work the same."""
    stream = GlmStream(GlmModes(think=False))
    out = feed_all(
        stream,
        [
            {"parts": [{"content": [{"type": "think", "think": "Let"}]}]},
            {"parts": [{"content": [{"type": "think", "think": "Let me"}]}]},
            {
                "parts": [
                    {
                        "content": [
                            {"type": "think", "think": "Let me see", "status": "finish"},
                            {"type": "text_thinking", "text": "old"},
                        ]
                    }
                ]
            },
        ],
    )
    assert out == [
        [ReasoningDelta("Let")],
        [ReasoningDelta(" me")],
        [ReasoningDelta(" see\nold")],
    ]


def test_truncated_stream_flushes_held_text_then_errors() -> None:
    """EOF while a possible marker is held back: the held text goes out, then
    UpstreamError("truncated", 502); a second close() gives nothing."""
    stream = GlmStream()
    assert feed_all(stream, [text_event("see 【1†so")]) == [[TextDelta("see ")]]
    assert stream.close() == [
        TextDelta("【1†so"),
        UpstreamError("truncated", "upstream stream ended before the answer was complete", 502),
    ]
    assert stream.finished
    assert stream.close() == []
    assert stream.feed(orjson.dumps(text_event("more")).decode()) == []


def test_conversation_id_is_the_first_non_empty_one() -> None:
    """conversation_id is "" until one is seen, then keeps the first non-empty value."""
    stream = GlmStream()
    assert stream.conversation_id == ""
    feed_all(
        stream,
        [
            text_event("a", conversation_id=""),
            text_event("ab", conversation_id=CID),
            text_event("abc", conversation_id="other"),
        ],
    )
    assert stream.conversation_id == CID


def test_rewritten_text_emits_nothing_extra() -> None:
    """When the upstream rewrites a text instead of extending it, nothing is emitted for the
    rewrite, and later growth continues from the new value."""
    stream = GlmStream()
    out = feed_all(
        stream,
        [
            text_event("Hello wor"),
            text_event("Hello world"),
            text_event("Hi there"),  # shorter: a rewrite
            text_event("Hi there, friend"),
            text_event("Hi there, fiend!"),  # same length region changed at the end: a rewrite
            text_event("Hi there, fiend!!"),
            text_event("Hi there, fiend!!"),  # repeated: nothing new
        ],
    )
    assert out == [
        [TextDelta("Hello wor")],
        [TextDelta("ld")],
        [],
        [TextDelta(", friend")],
        [],
        [TextDelta("!")],
        [],
    ]
    assert stream.statistics().rewrites == 2


def test_long_answer_in_one_character_steps_is_linear() -> None:
    """A 20,000-character answer growing one character per event: the text arrives whole and
    exactly once, and the diff compares a bounded number of characters per event."""
    answer = "".join(chr(ord("a") + i % 26) for i in range(20_000))
    stream = GlmStream()
    pieces: list[str] = []
    for n in range(1, len(answer) + 1):
        data = b'{"status":"init","parts":[{"content":[{"type":"text","text":"%s"}]}]}'
        for delta in stream.feed((data % answer[:n].encode()).decode()):
            assert isinstance(delta, TextDelta)
            pieces.append(delta.text)
    assert "".join(pieces) == answer
    assert len(pieces) == len(answer)
    stats = stream.statistics()
    assert stats.events == len(answer)
    assert stats.compared_chars <= TAIL_CHARS * stats.events


def test_marker_split_across_events_is_removed() -> None:
    """A citation marker cut between two snapshots is held back and then removed."""
    stream = GlmStream()
    out = feed_all(
        stream,
        [
            text_event("abc【1†"),
            text_event("abc【1†source】def"),
            text_event("abc【1†source】def", "finish"),
        ],
    )
    assert out == [[TextDelta("abc")], [TextDelta("def")], [Finish("stop")]]


def test_code_fence_and_execution_output() -> None:
    """Code grows inside one ```python fence closed when its part finishes; the execution
    output follows once; an identical second output is skipped; parts are separated."""

    def code_part(code: str, done: bool) -> dict[str, Any]:
        return {
            "logic_id": "c",
            "status": "finish" if done else "init",
            "content": [{"type": "code", "code": code}],
        }

    def exec_part(lid: str, content: str) -> dict[str, Any]:
        return {
            "logic_id": lid,
            "status": "finish",
            "content": [{"type": "execution_output", "content": content}],
        }

    stream = GlmStream()
    out = feed_all(
        stream,
        [
            text_event("Let me compute."),
            {"parts": [code_part("print(", False)]},
            {"parts": [code_part("print(1)", True)]},
            {"parts": [exec_part("e1", "1")]},
            {"parts": [exec_part("e2", "1")]},
            {"status": "finish", "parts": []},
        ],
    )
    assert out == [
        [TextDelta("Let me compute.")],
        [TextDelta("\n```python\nprint(")],
        [TextDelta("1)\n```\n")],
        [TextDelta("\n1\n")],
        [],
        [Finish("stop")],
    ]


def test_unfinished_code_fence_is_closed_by_the_next_text() -> None:
    """A code part that never finishes gets its fence closed before the next item's text, and
    at the end of the answer."""
    stream = GlmStream()
    out = feed_all(
        stream,
        [
            {"parts": [{"logic_id": "c", "content": [{"type": "code", "code": "x = 1"}]}]},
            {"parts": [{"logic_id": "t", "content": [{"type": "text", "text": "done"}]}]},
            {"parts": [{"logic_id": "c2", "content": [{"type": "code", "code": "y"}]}]},
            {"status": "finish"},
        ],
    )
    assert out == [
        [TextDelta("```python\nx = 1")],
        [TextDelta("\n```\n\ndone")],
        [TextDelta("\n```python\ny")],
        [TextDelta("\n```\n"), Finish("stop")],
    ]


def test_images_once_per_item_when_the_part_finishes() -> None:
    """Image URLs come out once the part finishes, only http(s) ones, each URL once."""
    image_part: dict[str, Any] = {
        "logic_id": "i",
        "status": "init",
        "content": [{"type": "image", "image": [{"image_url": "https://a/1.png"}]}],
    }
    done = {
        **image_part,
        "status": "finish",
        "content": [
            {
                "type": "image",
                "image": [
                    {"image_url": "https://a/1.png"},
                    {"image_url": "data:x"},
                    {"image_url": "http://a/2.png"},
                    {"image_url": "https://a/1.png"},
                    "odd",
                    {"image_url": 3},
                ],
            }
        ],
    }
    stream = GlmStream()
    out = feed_all(stream, [{"parts": [image_part]}, {"parts": [done]}, {"parts": [done]}])
    assert out == [[], [ImageResult("https://a/1.png"), ImageResult("http://a/2.png")], []]


def test_citations_are_deduplicated_by_url() -> None:
    """The same hit URL in two search parts is cited once; hits without string title/url are
    skipped."""

    def quote(lid: str, hits: list[Any]) -> dict[str, Any]:
        return {
            "logic_id": lid,
            "status": "finish",
            "meta_data": {"metadata_list": hits},
            "content": [{"type": "quote_result", "status": "finish"}],
        }

    stream = GlmStream()
    out = feed_all(
        stream,
        [
            {
                "parts": [
                    quote("q1", [{"title": "A", "url": "https://a/"}, {"title": 1, "url": "x"}])
                ]
            },
            {
                "parts": [
                    quote(
                        "q2",
                        [
                            {"title": "A again", "url": "https://a/"},
                            {"title": "B", "url": "https://b/"},
                            "odd",
                        ],
                    )
                ]
            },
        ],
    )
    assert out == [[Citation("A", "https://a/")], [Citation("B", "https://b/")]]


def test_new_item_after_a_finished_one_at_the_same_place() -> None:
    """Without logic_id, a new part at the position of a finished one is a new part: its text
    is emitted whole, after a separator, even when it starts like the old one."""

    def part(text: str, status: str) -> dict[str, Any]:
        return {"parts": [{"status": status, "content": [{"type": "text", "text": text}]}]}

    stream = GlmStream()
    out = feed_all(
        stream,
        [part("ab", "init"), part("abc", "finish"), part("ab", "init"), part("abcd", "init")],
    )
    assert out == [[TextDelta("ab")], [TextDelta("c")], [TextDelta("\nab")], [TextDelta("cd")]]


def test_item_replaced_after_finishing_within_a_logic_id_part() -> None:
    """Within one logic_id part, an item that finished and is followed at the same index by an
    item in progress is a new item."""

    def ev(text: str, status: str) -> dict[str, Any]:
        return {
            "parts": [
                {
                    "logic_id": "p",
                    "status": "init",
                    "content": [{"type": "text", "status": status, "text": text}],
                }
            ]
        }

    stream = GlmStream()
    out = feed_all(stream, [ev("one", "finish"), ev("one", "finish"), ev("two", "init")])
    assert out == [[TextDelta("one")], [], [TextDelta("\ntwo")]]


@pytest.mark.parametrize(
    ("envelope", "expected"),
    [
        ({"code": 401, "message": "token expired"}, UpstreamError("401", "token expired", 401)),
        (
            {"status": 1, "message": "40102 refresh expired"},
            UpstreamError("1", "40102 refresh expired", 401),
        ),
        ({"code": 40102}, UpstreamError("40102", "ChatGLM error 40102", 401)),
        (
            {"code": 10002, "message": "当前有对话正在进行中"},
            UpstreamError("10002", "当前有对话正在进行中", 502),
        ),
        ({"status": 500.0, "message": "x"}, UpstreamError("500", "x", 502)),
    ],
)
def test_error_envelope_instead_of_a_snapshot(
    envelope: dict[str, Any], expected: UpstreamError
) -> None:
    """A 3.6 error envelope in the stream ends it with an UpstreamError, 401 for expired
    credentials; later events are ignored."""
    stream = GlmStream()
    assert stream.feed(orjson.dumps(envelope).decode()) == [expected]
    assert stream.finished
    assert stream.feed(orjson.dumps(text_event("x")).decode()) == []
    assert stream.close() == []


def test_success_envelope_and_status_zero_are_not_errors() -> None:
    """A numeric status 0 without parts, or a boolean code, is not an error: nothing happens."""
    stream = GlmStream()
    assert stream.feed('{"status": 0, "message": "success"}') == []
    assert stream.feed('{"code": true}') == []
    assert not stream.finished


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '"text"', "{", "\ud800"])
def test_non_json_or_non_object_raises_remote_protocol_error(data: str) -> None:
    """Event data that is not a JSON object raises RemoteProtocolError and leaves the stream
    usable."""
    stream = GlmStream()
    with pytest.raises(RemoteProtocolError):
        stream.feed(data)
    assert stream.feed(orjson.dumps(text_event("ok")).decode()) == [TextDelta("ok")]


@pytest.mark.parametrize("data", ["", "[DONE]", "  \n"])
def test_done_and_empty_data_are_ignored(data: str) -> None:
    """[DONE] and empty event data give no deltas and are not counted as snapshots."""
    stream = GlmStream()
    assert stream.feed(data) == []
    assert stream.statistics().events == 0


def test_different_part_at_the_same_position_is_a_new_part() -> None:
    """Without logic_id, a part whose item types differ from the finished part that held its
    position is a new part even when it is first seen finished: all its items are emitted."""

    def part(content: list[dict[str, Any]], status: str) -> dict[str, Any]:
        return {"parts": [{"status": status, "content": content}]}

    stream = GlmStream()
    out = feed_all(
        stream,
        [
            part([{"type": "code", "code": "x"}, {"type": "text", "text": "hello"}], "finish"),
            part([{"type": "text", "text": "new"}, {"type": "text", "text": "world"}], "finish"),
        ],
    )
    assert text_of(flat(out)) == "```python\nx\n```\n\nhello\nnew\nworld"
