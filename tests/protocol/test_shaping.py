"""Tests of protocol/shaping.py: stop sequences, max_tokens, JSON extraction and the
AnswerShaper that chains them with the tool-call parser (issue 14)."""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.chunks import estimate_tokens
from protocol.deltas import (
    Citation,
    Finish,
    ImageResult,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
)
from protocol.openai import ChatRequest, Message, ResponseFormat, ToolChoice, ToolSpec
from protocol.shaping import (
    AnswerShaper,
    JsonExtractor,
    StopMatcher,
    TokenBudget,
    json_output_error,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from protocol.deltas import Delta

PROPERTY = settings(max_examples=200, deadline=None)


def pieces(text: str, cuts: list[int]) -> list[str]:
    """``text`` cut at ``cuts`` (empty pieces included, as an upstream may send them)."""
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def words(alphabet: Sequence[str], max_size: int) -> st.SearchStrategy[str]:
    """Texts made of up to ``max_size`` pieces drawn from ``alphabet`` (pieces may be long)."""
    return st.lists(st.sampled_from(alphabet), max_size=max_size).map("".join)


def cuts_of(data: st.DataObject, text: str) -> list[int]:
    """Cut positions for ``text``, drawn by hypothesis."""
    return data.draw(st.lists(st.integers(0, len(text)), max_size=12), label="cuts")


# ---------------------------------------------------------------------------
# StopMatcher


def first_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """The reference: ``text`` cut at the earliest (then longest) occurrence of a stop."""
    best, best_stop = len(text) + 1, ""
    for stop in stops:
        at = text.find(stop) if stop else -1
        if at >= 0 and (at < best or (at == best and len(stop) > len(best_stop))):
            best, best_stop = at, stop
    if not best_stop:
        return text, None
    return text[:best], best_stop


def match_split(text: str, stops: Sequence[str], cuts: list[int]) -> tuple[str, str | None]:
    """Feed ``text`` in pieces, then flush; the emitted text and the stop reported.

    Also checks that a match is reported exactly once, and nothing after it.
    """
    matcher = StopMatcher(stops)
    out: list[str] = []
    reported: list[str] = []
    for piece in pieces(text, cuts):
        emitted, matched = matcher.feed(piece)
        assert not (reported and emitted)
        out.append(emitted)
        if matched is not None:
            reported.append(matched)
    emitted, matched = matcher.flush()
    assert not (reported and emitted)
    out.append(emitted)
    if matched is not None:
        reported.append(matched)
    assert len(reported) <= 1
    assert matcher.matched == (reported[0] if reported else None)
    return "".join(out), matcher.matched


STOP_ALPHABET = "abc\n中"
stop_lists = st.lists(st.text(STOP_ALPHABET, max_size=4), min_size=1, max_size=4)


@PROPERTY
@given(text=st.text(STOP_ALPHABET, max_size=40), stops=stop_lists, data=st.data())
@example(text="ab", stops=["abc", "b"], data=None)
@example(text="xabc", stops=["ab", "abc"], data=None)
@example(text="aab", stops=["ab"], data=None)
def test_any_split_matches_like_a_search_of_the_whole_text(
    text: str, stops: list[str], data: st.DataObject | None
) -> None:
    """However the text is split, the matcher emits the text before the earliest
    (then longest) occurrence of a stop sequence and reports that sequence; with
    no occurrence it emits the whole text."""
    cuts = cuts_of(data, text) if data is not None else list(range(len(text)))
    expected = first_stop(text, stops)
    assert match_split(text, stops, cuts) == expected
    assert match_split(text, stops, list(range(len(text)))) == expected
    assert match_split(text, stops, []) == expected


def test_a_stop_cut_between_pieces_still_matches() -> None:
    """A ReAct stop sequence split across three reads is found; the text before it
    goes out as soon as it cannot be part of the sequence, the rest never."""
    matcher = StopMatcher(["\nObservation:"])
    assert matcher.feed("Action: search\nObs") == ("Action: search", None)
    assert matcher.feed("erva") == ("", None)
    assert matcher.feed("tion: 42 and more") == ("", "\nObservation:")
    assert matcher.feed("later text") == ("", None)
    assert matcher.flush() == ("", None)


def test_a_near_miss_is_released_when_it_stops_matching() -> None:
    """Text held as a possible start of a stop goes out once it diverges."""
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", None)
    assert matcher.feed("D") == ("", "END")
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", None)
    assert matcher.feed("TRY") == ("ENTRY", None)
    assert matcher.flush() == ("", None)


def test_text_without_a_stop_start_goes_out_at_once() -> None:
    """Nothing is held when no tail of the text can begin a stop sequence."""
    matcher = StopMatcher(["STOP", "xyz"])
    assert matcher.feed("hello world") == ("hello world", None)
    assert matcher.feed("ending in S") == ("ending in ", None)
    assert matcher.flush() == ("S", None)


def test_the_earliest_start_wins_and_then_the_longest() -> None:
    """With overlapping stops the match that starts first wins; a shorter one
    found first waits until a longer one at the same start is ruled out."""
    matcher = StopMatcher(["c", "abcd"])
    assert matcher.feed("xabc") == ("x", None)  # "abcd" may still begin at 1
    assert matcher.feed("d") == ("", "abcd")
    matcher = StopMatcher(["ab", "abcd"])
    assert matcher.feed("xab") == ("x", None)
    assert matcher.feed("ce") == ("", "ab")


def test_a_held_stop_is_matched_at_the_end() -> None:
    """At the end a pending longer stop is dead, so a stop inside the held text matches."""
    matcher = StopMatcher(["abc", "b"])
    assert matcher.feed("ab") == ("", None)
    assert matcher.flush() == ("a", "b")


def test_empty_stops_are_ignored() -> None:
    """An empty stop sequence would match everywhere; it is ignored."""
    matcher = StopMatcher(["", ""])
    assert matcher.feed("text") == ("text", None)
    assert matcher.flush() == ("", None)
    matcher = StopMatcher(["", "t"])
    assert matcher.feed("text") == ("", "t")


def test_a_long_stop_sequence_streamed_a_character_at_a_time() -> None:
    """A 300-character stop sequence, fed one character per read after 2,000
    characters of near misses, matches and holds nothing longer than itself."""
    stop = "x" * 299 + "!"
    text = ("x" * 50 + "?") * 40 + stop + "tail"
    matcher = StopMatcher([stop])
    out = []
    for char in text:
        emitted, matched = matcher.feed(char)
        out.append(emitted)
        if matched is not None:
            break
    assert "".join(out) == text[: text.index(stop)]
    assert matcher.matched == stop


# ---------------------------------------------------------------------------
# TokenBudget


def budget_split(text: str, max_tokens: int, cuts: list[int]) -> tuple[str, bool]:
    """Feed ``text`` in pieces to a budget; the text taken and whether it ran out.

    Also checks that once exhausted, the budget takes nothing more.
    """
    budget = TokenBudget(max_tokens)
    out: list[str] = []
    exhausted = False
    for piece in pieces(text, cuts):
        taken, now = budget.take(piece)
        assert not (exhausted and taken)
        assert now or taken == piece
        exhausted = now
        out.append(taken)
    assert budget.exhausted == exhausted
    assert budget.tokens == estimate_tokens("".join(out))
    return "".join(out), exhausted


@PROPERTY
@given(
    text=st.text(st.sampled_from([*"abc d\n", "中", "é", "😀"]), max_size=60),
    max_tokens=st.integers(0, 20),
    data=st.data(),
)
def test_any_split_takes_the_longest_prefix_within_the_budget(
    text: str, max_tokens: int, data: st.DataObject
) -> None:
    """However the text is split, the budget takes the same text: the longest
    prefix whose estimate is within max_tokens. It is exhausted exactly when text
    was cut or not one more character could fit."""
    taken, exhausted = budget_split(text, max_tokens, cuts_of(data, text))
    assert (taken, exhausted) == budget_split(text, max_tokens, [])
    assert (taken, exhausted) == budget_split(text, max_tokens, list(range(len(text))))
    assert text.startswith(taken)
    assert estimate_tokens(taken) <= max_tokens
    if taken != text:
        assert estimate_tokens(text[: len(taken) + 1]) > max_tokens
        assert exhausted
    full = all(estimate_tokens(taken + char) > max_tokens for char in "a中")
    assert exhausted == (taken != text or full)


def test_budget_cuts_ascii_and_cjk_text() -> None:
    """Four ASCII characters make a token, a CJK character one: the cut falls
    where the next character would overflow."""
    assert TokenBudget(1).take("abcde") == ("abcd", True)
    assert TokenBudget(2).take("ab中文") == ("ab中", True)
    assert TokenBudget(3).take("中文") == ("中文", False)


def test_budget_full_without_a_cut_is_exhausted() -> None:
    """Text that fills the budget so that no character fits ends it at once;
    text that leaves room in a partly filled ASCII token does not."""
    budget = TokenBudget(1)
    assert budget.take("abc") == ("abc", False)
    assert budget.take("d") == ("d", True)
    assert budget.take("e") == ("", True)
    assert TokenBudget(0).take("a") == ("", True)


# ---------------------------------------------------------------------------
# JsonExtractor


def extract_split(text: str, cuts: list[int]) -> str:
    """Feed ``text`` in pieces to an extractor, then close it; everything it returned."""
    extractor = JsonExtractor()
    out = [extractor.feed(piece) for piece in pieces(text, cuts)]
    out.append(extractor.close())
    return "".join(out)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.sampled_from('ab{}[]"\\\n中 ')),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(st.sampled_from('k{}"\\]'), max_size=3), children, max_size=3)
    ),
    max_leaves=8,
)
documents = st.builds(
    lambda value, indent: json.dumps(value, indent=indent, ensure_ascii=False),
    st.dictionaries(st.text("xyz", max_size=3), json_values, max_size=3)
    | st.lists(json_values, max_size=3),
    st.sampled_from([None, 2]),
)
prose = words([*"Here is the JSON: \n`.", "好"], 20)
wrappers = st.sampled_from(
    [("", ""), ("```json\n", "\n```"), ("```\n", "\n```\n"), ("```JSON", "```")]
)


@PROPERTY
@given(
    document=documents,
    before=prose,
    wrapper=wrappers,
    after=words([*'Done. {}[]"\\', "```"], 20),
    data=st.data(),
)
@example(document='{"a": "\\"}\\\\"}', before="", wrapper=("", ""), after="}", data=None)
def test_any_split_extracts_the_document(
    document: str, before: str, wrapper: tuple[str, str], after: str, data: st.DataObject | None
) -> None:
    """A JSON document wrapped in prose and a Markdown fence, split anywhere,
    comes out alone and whole: brackets and quotes inside strings, escaped quotes
    and backslashes (possibly cut between reads) do not end it early."""
    text = before + wrapper[0] + document + wrapper[1] + after
    cuts = cuts_of(data, text) if data is not None else list(range(len(text)))
    assert extract_split(text, cuts) == document
    assert extract_split(text, []) == document
    assert extract_split(text, list(range(len(text)))) == document


@PROPERTY
@given(text=st.text(st.sampled_from([*'{}[]"\\ab`'])), data=st.data())
def test_any_split_of_any_text_extracts_the_same(text: str, data: st.DataObject) -> None:
    """Garbage gives the same output however it is split, and that output is a
    slice of the text starting at its first bracket (or the whole text when it has none)."""
    out = extract_split(text, cuts_of(data, text))
    assert out == extract_split(text, [])
    starts = [at for at in (text.find("{"), text.find("[")) if at >= 0]
    if starts:
        assert text.startswith(out, min(starts))
    else:
        assert out == text


def test_extractor_streams_the_document_as_it_comes() -> None:
    """Prose goes nowhere, the document goes out piece by piece, the rest is dropped."""
    extractor = JsonExtractor()
    assert extractor.feed('Sure! ```json\n{"a": ') == '{"a": '
    assert extractor.feed('"x}"') == '"x}"'
    assert extractor.feed("}\n``` Hope this helps {") == "}"
    assert extractor.feed("more") == ""
    assert extractor.close() == ""


def test_extractor_without_a_bracket_gives_the_raw_text_at_close() -> None:
    """An answer with no JSON document is returned whole by close(), so the
    validation can quote it."""
    extractor = JsonExtractor()
    assert extractor.feed("I cannot ") == ""
    assert extractor.feed("do that.") == ""
    assert extractor.close() == "I cannot do that."


def test_extractor_cut_short_returns_what_it_had() -> None:
    """A document the answer never closes is all sent; close() adds nothing."""
    assert extract_split('x [1, {"a": [2', [3, 7]) == '[1, {"a": [2'


# ---------------------------------------------------------------------------
# json_output_error

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_object_must_be_an_object() -> None:
    """json_object accepts any JSON object and nothing else."""
    fmt = ResponseFormat("json_object")
    assert json_output_error('{"a": [1]}', fmt) is None
    assert "not an object" in (json_output_error("[1, 2]", fmt) or "")
    assert "not valid JSON" in (json_output_error('{"a": 1', fmt) or "")
    assert "not valid JSON" in (json_output_error("I cannot do that.", fmt) or "")
    assert "not valid JSON" in (json_output_error('{"a": NaN}', fmt) or "")


def test_strict_json_schema_is_validated() -> None:
    """With strict, the document must satisfy the schema; the message says where."""
    fmt = ResponseFormat("json_schema", schema=PERSON, name="person", strict=True)
    assert json_output_error('{"name": "Ann", "age": 7}', fmt) is None
    message = json_output_error('{"name": "Ann", "age": "seven"}', fmt)
    assert message is not None
    assert "['age']" in message
    assert "integer" in message
    assert json_output_error('{"name": "Ann"}', fmt) is not None
    assert "not valid JSON" in (json_output_error("{", fmt) or "")


def test_json_schema_without_strict_only_parses() -> None:
    """Without strict, any JSON document passes; non-JSON does not."""
    fmt = ResponseFormat("json_schema", schema=PERSON)
    assert json_output_error('{"name": 1}', fmt) is None
    assert json_output_error("[]", fmt) is None
    assert json_output_error("nope", fmt) is not None


@pytest.mark.parametrize(
    "schema",
    [
        {"type": 5},
        {"$ref": "https://127.0.0.1:1/nowhere.json"},
        {"$ref": "#/$defs/missing"},
        {"type": "string", "pattern": "(?<=a+)b"},
        None,
    ],
)
def test_a_schema_that_cannot_be_used_means_cannot_check(schema: object) -> None:
    """An invalid schema, an unresolvable $ref (never fetched) or a pattern Python
    cannot compile does not crash: the answer passes unchecked."""
    fmt = ResponseFormat("json_schema", schema=schema, strict=True)
    assert json_output_error('"abc"', fmt) is None


def test_error_messages_are_short() -> None:
    """A message stays short however long the answer or the failing value is."""
    fmt = ResponseFormat("json_schema", schema={"type": "integer"}, strict=True)
    assert len(json_output_error(json.dumps("x" * 5000), fmt) or "") <= 500
    assert len(json_output_error("{" * 5000, ResponseFormat("json_object")) or "") <= 500


# ---------------------------------------------------------------------------
# AnswerShaper


def request(**fields: object) -> ChatRequest:
    """A one-message request with the given shaping fields."""
    return ChatRequest(
        model="m",
        messages=(Message("user", (), False),),
        stream=True,
        include_usage=False,
        conversation_id=None,
        use_search=None,
        **fields,  # type: ignore[arg-type]
    )


def counter_ids() -> Callable[[], str]:
    """Deterministic call ids: call_0, call_1, ..."""
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def merged(events: Sequence[Delta]) -> list[Delta]:
    """``events`` in a split-independent form: adjacent text joined, and each tool
    call's argument pieces joined into its first delta."""
    out: list[Delta] = []
    for event in events:
        match event:
            case TextDelta(text=text) if out and isinstance(out[-1], TextDelta):
                out[-1] = TextDelta(out[-1].text + text)
            case ToolCallDelta(index=index, id="", arguments_part=part) if (
                out and isinstance(out[-1], ToolCallDelta) and out[-1].index == index
            ):
                last = out[-1]
                out[-1] = ToolCallDelta(index, last.id, last.name, last.arguments_part + part)
            case _:
                out.append(event)
    return out


def shape_split(
    shaper_request: ChatRequest, text: str, finish: Finish, cuts: list[int], groups: list[int]
) -> list[Delta]:
    """The upstream answer ``text`` cut at ``cuts``, then ``finish``, its events
    batched into groups of the sizes in ``groups``; the shaper's merged output."""
    shaper = AnswerShaper(shaper_request, new_id=counter_ids())
    events: list[Delta] = [TextDelta(piece) for piece in pieces(text, cuts)]
    events.append(finish)
    out: list[Delta] = []
    sizes = iter(groups)
    start = 0
    while start < len(events):
        size = next(sizes, len(events))
        out += shaper.feed(events[start : start + max(size, 1)])
        start += max(size, 1)
    assert shaper.done
    assert shaper.feed([TextDelta("after the end"), Finish()]) == []
    assert shaper.text == "".join(e.text for e in out if isinstance(e, TextDelta))
    return merged(out)


def expected_plain(text: str, stops: list[str], max_tokens: int | None) -> list[Delta]:
    """The reference of a stop + max_tokens shaper over a whole answer ending in Finish()."""
    before, stop = first_stop(text, stops)
    budget = TokenBudget(max_tokens) if max_tokens is not None else None
    taken, exhausted = budget.take(before) if budget is not None else (before, False)
    out: list[Delta] = [TextDelta(taken)] if taken else []
    if exhausted:
        out.append(Finish("length"))
    elif stop is not None:
        out.append(Finish("stop", stop_sequence=stop))
    else:
        out.append(Finish())
    return out


@PROPERTY
@given(
    text=words([*"ab \n", "中", "OBS", "Obs"], 40),
    stops=st.lists(st.sampled_from(["", "OBS", "\n\n", "b中", "ab ab"]), max_size=3),
    max_tokens=st.none() | st.integers(0, 12),
    data=st.data(),
)
def test_any_batching_gives_the_same_answer(
    text: str, stops: list[str], max_tokens: int | None, data: st.DataObject
) -> None:
    """However the upstream splits its text and batches its events, the shaped
    answer is the same: the text before the first stop sequence, cut to the
    budget, then Finish "length" if the budget ran out, else "stop" naming the
    sequence, else the upstream's own Finish. No stop sequence appears in the output
    and its estimate is within max_tokens."""
    req = request(stop=tuple(stops), max_tokens=max_tokens)
    cuts = cuts_of(data, text)
    groups = data.draw(st.lists(st.integers(1, 4), max_size=12), label="groups")
    out = shape_split(req, text, Finish(), cuts, groups)
    assert out == shape_split(req, text, Finish(), list(range(len(text))), [1])
    assert out == shape_split(req, text, Finish(), [], [])
    assert out == expected_plain(text, stops, max_tokens)
    answer = "".join(e.text for e in out if isinstance(e, TextDelta))
    assert not any(stop and stop in answer for stop in stops)
    if max_tokens is not None:
        assert estimate_tokens(answer) <= max_tokens
        if len(answer) < len(first_stop(text, stops)[0]):
            assert out[-1] == Finish("length")


def test_needed_only_for_shaping_fields() -> None:
    """A plain request needs no shaper; each shaping field makes one needed."""
    assert not AnswerShaper.needed(request())
    assert not AnswerShaper.needed(request(stop=("",)))
    assert not AnswerShaper.needed(request(tools=(ToolSpec("f"),), tool_choice=ToolChoice("none")))
    assert AnswerShaper.needed(request(stop=("x",)))
    assert AnswerShaper.needed(request(max_tokens=5))
    assert AnswerShaper.needed(request(tools=(ToolSpec("f"),)))
    assert AnswerShaper.needed(request(response_format=ResponseFormat("json_object")))


def test_stop_ends_the_answer_in_the_batch_that_completes_it() -> None:
    """The text before the stop goes out, then Finish "stop" with the sequence; the
    shaper is done and ignores the rest of the upstream's answer."""
    shaper = AnswerShaper(request(stop=("\nObservation:",)))
    assert shaper.feed([TextDelta("Thought: look\nObserv")]) == [TextDelta("Thought: look")]
    done = [shaper.done]
    assert shaper.feed([TextDelta("ation: x"), TextDelta("more"), Finish()]) == [
        Finish("stop", stop_sequence="\nObservation:")
    ]
    done.append(shaper.done)
    assert done == [False, True]
    assert shaper.feed([TextDelta("late")]) == []


def test_max_tokens_ends_the_answer_with_length() -> None:
    """At the limit the text is cut and the answer ends with "length" at once."""
    shaper = AnswerShaper(request(max_tokens=2))
    assert shaper.feed([TextDelta("abcdefghij")]) == [TextDelta("abcdefgh"), Finish("length")]
    assert shaper.done


def test_reasoning_and_results_pass_through_uncounted() -> None:
    """Reasoning, citations and images pass in order, not counted against max_tokens,
    and held text is not flushed for them."""
    shaper = AnswerShaper(request(max_tokens=1, stop=("STOP",)))
    citation = Citation("t", "https://example.com/")
    batch: list[Delta] = [
        ReasoningDelta("a long chain of thought " * 10),
        TextDelta("abST"),
        citation,
        ImageResult("https://example.com/i.png"),
    ]
    assert shaper.feed(batch) == [batch[0], TextDelta("ab"), citation, batch[3]]
    assert shaper.feed([TextDelta("OP")]) == [Finish("stop", stop_sequence="STOP")]


def test_upstream_finish_flushes_held_text_and_keeps_its_reason() -> None:
    """At the upstream's Finish the text held as a possible stop goes out, then the
    upstream's own finish, reason and text kept."""
    shaper = AnswerShaper(request(stop=("STOP",)))
    assert shaper.feed([TextDelta("ST")]) == []
    finish = Finish("content_filter", text="filtered")
    assert shaper.feed([finish]) == [TextDelta("ST"), finish]


def test_upstream_error_passes_and_drops_held_text() -> None:
    """An upstream failure goes through as it is; held text is not flushed."""
    shaper = AnswerShaper(request(stop=("STOP",)))
    error = UpstreamError("upstream_error", "boom")
    assert shaper.feed([TextDelta("ok ST"), error, TextDelta("x")]) == [TextDelta("ok "), error]
    assert shaper.done
    assert shaper.feed([Finish()]) == []


def test_json_output_is_trimmed_and_kept_in_text() -> None:
    """With response_format the fence and prose go, streamed; text is the document."""
    shaper = AnswerShaper(request(response_format=ResponseFormat("json_object")))
    out = shaper.feed([TextDelta('Here:\n```json\n{"a"'), TextDelta(": [1]}\n```\nBye")])
    out += shaper.feed([Finish()])
    assert merged(out) == [TextDelta('{"a": [1]}'), Finish()]
    assert shaper.text == '{"a": [1]}'


def test_json_output_without_a_document_gives_the_raw_text_at_the_end() -> None:
    """An answer with no bracket comes out whole at the end, for the validation to quote."""
    shaper = AnswerShaper(request(response_format=ResponseFormat("json_object")))
    assert shaper.feed([TextDelta("I cannot")]) == []
    assert shaper.feed([Finish()]) == [TextDelta("I cannot"), Finish()]
    assert shaper.text == "I cannot"


# ---------------------------------------------------------------------------
# AnswerShaper with tools (the real protocol.toolcalls parser)

WEATHER = ToolSpec("get_weather", "The weather in a city.", {"type": "object"})
TIME = ToolSpec("get_time")
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def calls_and_text(events: Sequence[Delta]) -> tuple[list[tuple[int, str, str, object]], str]:
    """The merged calls (index, id, name, parsed arguments) and the joined text of ``events``."""
    calls = [
        (event.index, event.id, event.name, json.loads(event.arguments_part))
        for event in merged(events)
        if isinstance(event, ToolCallDelta)
    ]
    return calls, "".join(e.text for e in events if isinstance(e, TextDelta))


@PROPERTY
@given(
    before=words(["Let me check.", " ", "\n", "<tool", "<"], 4),
    after=words(["\n", "Done", "<tool_call>", " "], 3),
    data=st.data(),
)
def test_any_batching_gives_the_same_tool_calls(
    before: str, after: str, data: st.DataObject
) -> None:
    """An answer with two calls among text, split and batched anyhow, gives the
    same text and calls and ends with Finish "tool_calls"."""
    second = '<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>'
    text = before + CALL + "\n" + second + after
    req = request(tools=(WEATHER, TIME))
    cuts = cuts_of(data, text)
    groups = data.draw(st.lists(st.integers(1, 4), max_size=12), label="groups")
    out = shape_split(req, text, Finish(), cuts, groups)
    assert out == shape_split(req, text, Finish(), list(range(len(text))), [1])
    assert out == shape_split(req, text, Finish(), [], [])
    calls, _ = calls_and_text(out)
    assert calls == [
        (0, "call_0", "get_weather", {"city": "Paris"}),
        (1, "call_1", "get_time", {}),
    ]
    assert out[-1] == Finish("tool_calls")


def test_text_before_a_call_streams_then_the_call_then_tool_calls() -> None:
    """Text before a block goes out before the block is complete; the block becomes
    a call with an id; the upstream's Finish becomes Finish "tool_calls"."""
    shaper = AnswerShaper(request(tools=(WEATHER,)), new_id=counter_ids())
    first = shaper.feed([TextDelta("Checking. " + CALL[:20])])
    assert first == [TextDelta("Checking. ")]
    rest = shaper.feed([TextDelta(CALL[20:])]) + shaper.feed([Finish()])
    calls, text = calls_and_text(rest)
    assert calls == [(0, "call_0", "get_weather", {"city": "Paris"})]
    assert text == ""
    assert rest[-1] == Finish("tool_calls")


def test_a_named_function_choice_parses_only_that_function() -> None:
    """With tool_choice naming a function, a block calling another offered tool is
    not a call: it stays text, and the answer ends with the upstream's reason."""
    req = request(tools=(WEATHER, TIME), tool_choice=ToolChoice("function", "get_time"))
    out = AnswerShaper(req, new_id=counter_ids()).feed([TextDelta(CALL), Finish()])
    assert merged(out) == [TextDelta(CALL), Finish()]


def test_tool_choice_none_parses_no_calls() -> None:
    """With tool_choice "none" a block is plain text."""
    req = request(tools=(WEATHER,), tool_choice=ToolChoice("none"))
    out = AnswerShaper(req).feed([TextDelta(CALL), Finish()])
    assert out == [TextDelta(CALL), Finish()]


def test_max_tokens_inside_a_block_degrades_it_to_text() -> None:
    """A budget that runs out inside a block closes the parser: the half block goes
    out as text (never a half call) and the answer ends with "length"."""
    req = request(tools=(WEATHER,), max_tokens=5)
    out = AnswerShaper(req, new_id=counter_ids()).feed([TextDelta(CALL), Finish()])
    assert merged(out) == [TextDelta(CALL[:20]), Finish("length")]


def test_stop_after_a_call_ends_with_stop() -> None:
    """A stop sequence after a complete call ends the answer with "stop" and the
    sequence; the call went out before it."""
    req = request(tools=(WEATHER,), stop=("Observation",))
    shaper = AnswerShaper(req, new_id=counter_ids())
    out = shaper.feed([TextDelta(CALL + "\nObservation: sunny")])
    calls, text = calls_and_text(out)
    assert calls == [(0, "call_0", "get_weather", {"city": "Paris"})]
    assert text == ""
    assert out[-1] == Finish("stop", stop_sequence="Observation")


def test_tools_and_json_output_together() -> None:
    """With tools and response_format, calls are parsed first and only the text
    around them is trimmed to the JSON document."""
    req = request(tools=(WEATHER,), response_format=ResponseFormat("json_object"))
    shaper = AnswerShaper(req, new_id=counter_ids())
    out = shaper.feed([TextDelta('Result: {"ok": true} bye'), Finish()])
    assert merged(out) == [TextDelta('{"ok": true}'), Finish()]
    assert shaper.text == '{"ok": true}'
