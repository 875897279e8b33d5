"""Request fields: the validation every request parser shares (sans-IO).

Three parsers read client requests: :mod:`protocol.openai` (chat
completions), :mod:`protocol.responses` (OpenAI's Responses API) and
:mod:`protocol.anthropic` (Anthropic's Messages API). Each validates a body
once, at the edge, and a bad field is a 400
:class:`~protocol.errors.RequestError` whose ``param`` is the field's path.
What the three check alike is here, once:

- the body is one JSON object (:func:`load_json_object`), parsed by orjson,
  which refuses ``NaN`` and ``Infinity``, lone surrogates and invalid UTF-8;
- what a JSON value is: a number but not a boolean (:func:`is_number`), a
  positive integer (:func:`is_positive_int`), an array of strings
  (:func:`is_string_list`);
- how deep a client's document (a JSON Schema, a call's input) may nest:
  :data:`MAX_JSON_DEPTH` levels (:func:`nested_deeper_than`). The relay
  writes these documents back (into the prompt, the token count and the
  Responses echo), and orjson writes fewer levels (254) than it reads (1024).

The two OpenAI dialects also word their errors alike, as OpenAI does
(``Missing required parameter: 'x'.``, ``Invalid type for 'x': expected a
string.``, ``Invalid value for 'x': ...``), and read the same kinds of
fields; the rest of this module is that wording (:func:`missing`,
:func:`invalid_type`, :func:`invalid_value`) and the field readers built on
it (:func:`required_str`, :func:`optional_str`, :func:`optional_bool`,
:func:`required_object`, :func:`optional_positive_int`,
:func:`optional_number`, :func:`optional_int`, :func:`schema_object`,
:func:`function_name`, :func:`part_url`).
Anthropic words its errors as its API does (``path: Field required``), so
:mod:`protocol.anthropic` builds its own messages on the predicates above.

Null means absent, as with OpenAI: an optional field that is ``null`` reads
as missing, a required one that is ``null`` is "missing", not "invalid".
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import orjson

from protocol.datauri import check_file_url
from protocol.errors import RequestError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "FUNCTION_NAME",
    "MAX_JSON_DEPTH",
    "check_depth",
    "checked",
    "function_name",
    "invalid_type",
    "invalid_value",
    "is_number",
    "is_positive_int",
    "is_string_list",
    "load_json_object",
    "missing",
    "nested_deeper_than",
    "optional_bool",
    "optional_int",
    "optional_number",
    "optional_positive_int",
    "optional_str",
    "part_url",
    "required_object",
    "required_str",
    "schema_object",
]

#: How deep a client's JSON Schema, or a call's input, may nest objects and arrays. Far more
#: than any tool needs, and well inside the 254 levels orjson writes (it reads 1024): the
#: relay writes these values back, into the prompt, the token count and the Responses echo.
MAX_JSON_DEPTH: Final = 100

#: OpenAI's rule for function and JSON Schema names (API reference, "tools" and
#: "response_format"): a to z, A to Z, 0 to 9, underscores and dashes, at most 64 characters.
FUNCTION_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")


# ---------------------------------------------------------------------------
# every parser


def load_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object.

    Raises:
        RequestError: (400, no ``param``) the body is not JSON, or not an object.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("invalid JSON body: expected a JSON object")
    return data


def is_number(value: object) -> bool:
    """A JSON number (``true`` and ``false`` are not, though Python's ``bool`` is an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_positive_int(value: object) -> TypeGuard[int]:
    """A JSON integer of at least 1 (not ``true``, not ``1.0``)."""
    return type(value) is int and value >= 1


def is_string_list(value: object) -> TypeGuard[list[str]]:
    """A JSON array of strings (maybe empty)."""
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def nested_deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests objects and arrays more than ``limit`` levels.

    Level by level, without recursion: ``value`` may be as deep as orjson reads.
    """
    frontier = [value]
    for _ in range(limit):
        frontier = [
            child
            for item in frontier
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not frontier:
            return False
    return any(isinstance(item, dict | list) for item in frontier)


# ---------------------------------------------------------------------------
# OpenAI's wording


def missing(param: str) -> RequestError:
    """OpenAI's 400 for a required field that is absent or null."""
    return RequestError(f"Missing required parameter: '{param}'.", param=param)


def invalid_type(param: str, expected: str) -> RequestError:
    """OpenAI's 400 for a field of the wrong JSON type (``expected``: "a string")."""
    return RequestError(f"Invalid type for '{param}': expected {expected}.", param=param)


def invalid_value(param: str, value: object, supported: str) -> RequestError:
    """OpenAI's 400 (``invalid_value``) for a value outside ``supported`` (a string's first
    40 characters are shown)."""
    shown = value[:40] if isinstance(value, str) else value
    return RequestError(
        f"Invalid value for '{param}': {shown!r}; supported values are {supported}.",
        param=param, code="invalid_value",
    )


def required_object(value: object, param: str) -> dict[str, Any]:
    """``value`` if it is a JSON object.

    Raises:
        RequestError: ``value`` is null (missing) or another type, naming ``param``.
    """
    if isinstance(value, dict):
        return value
    if value is None:
        raise missing(param)
    raise invalid_type(param, "an object")


def required_str(obj: dict[str, Any], key: str, param: str) -> str:
    """``obj[key]``, a string.

    Raises:
        RequestError: it is absent or null (missing), or not a string, naming ``param``.
    """
    value = obj.get(key)
    if isinstance(value, str):
        return value
    if value is None:
        raise missing(param)
    raise invalid_type(param, "a string")


def optional_str(obj: dict[str, Any], key: str, param: str) -> str | None:
    """``obj[key]``, a string, or ``None`` when it is absent or null.

    Raises:
        RequestError: it is another type, naming ``param``.
    """
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise invalid_type(param, "a string")


def optional_bool(obj: dict[str, Any], key: str, param: str) -> bool | None:
    """``obj[key]``, a boolean, or ``None`` when it is absent or null.

    Raises:
        RequestError: it is another type, naming ``param``.
    """
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise invalid_type(param, "a boolean")


def optional_positive_int(obj: dict[str, Any], key: str) -> int | None:
    """``obj[key]``, a positive integer (``max_tokens`` and the like), or ``None`` if absent.

    Raises:
        RequestError: it is not a positive integer, naming ``key``.
    """
    value = obj.get(key)
    if value is None:
        return None
    if not is_positive_int(value):
        raise RequestError(f"Invalid '{key}': expected a positive integer.", param=key)
    return value


def _out_of_range(param: str, what: str, value: float, low: float, high: float) -> None:
    """OpenAI's 400 for a number outside ``low..high`` (``what``: "decimal", "integer")."""
    if value < low:
        raise RequestError(
            f"Invalid '{param}': {what} below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.",
            param=param, code=f"{what}_below_min_value",
        )
    if value > high:
        raise RequestError(
            f"Invalid '{param}': {what} above maximum value. Expected a value <= {high}, "
            f"but got {value} instead.",
            param=param, code=f"{what}_above_max_value",
        )


def optional_number(obj: dict[str, Any], key: str, low: float, high: float) -> float | None:
    """``obj[key]``, a number in ``low..high`` (a sampling parameter), or ``None`` if absent.

    An integer reads as a float (``1`` is ``1.0``).

    Raises:
        RequestError: it is not a number (``invalid_type``'s wording), or out of range
            (``decimal_below_min_value``, ``decimal_above_max_value``), naming ``key``.
    """
    value = obj.get(key)
    if value is None:
        return None
    if not is_number(value):
        raise invalid_type(key, "a number")
    _out_of_range(key, "decimal", value, low, high)
    return float(value)


def optional_int(obj: dict[str, Any], key: str, low: int, high: int) -> int | None:
    """``obj[key]``, an integer in ``low..high`` (``seed``), or ``None`` if absent.

    Raises:
        RequestError: it is not an integer (``1.0`` and ``true`` are not), or out of
            range (``integer_below_min_value``, ``integer_above_max_value``), naming ``key``.
    """
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise invalid_type(key, "an integer")
    _out_of_range(key, "integer", value, low, high)
    return value


def check_depth(value: object, param: str) -> None:
    """Refuse a document nested deeper than :data:`MAX_JSON_DEPTH`.

    Raises:
        RequestError: (``invalid_value``) it is, naming ``param``.
    """
    if nested_deeper_than(value, MAX_JSON_DEPTH):
        raise RequestError(
            f"Invalid '{param}': nested more than {MAX_JSON_DEPTH} levels deep.",
            param=param, code="invalid_value",
        )


def schema_object(obj: dict[str, Any], key: str, param: str, *,
                  required: bool = False) -> dict[str, Any] | None:
    """``obj[key]``, a JSON Schema: an object nested at most :data:`MAX_JSON_DEPTH` levels.

    Args:
        obj: the object holding it (a function, a format).
        key: its key (``parameters``, ``schema``).
        param: its path.
        required: absent or null is a 400; else it reads as ``None``.

    Raises:
        RequestError: it is missing (when required), not an object, or too deep.
    """
    schema = obj.get(key)
    if schema is None:
        if required:
            raise missing(param)
        return None
    if not isinstance(schema, dict):
        raise invalid_type(param, "a JSON Schema object")
    check_depth(schema, param)
    return schema


def function_name(name: str, param: str) -> str:
    """``name`` if it follows OpenAI's rule for function names (:data:`FUNCTION_NAME`).

    Raises:
        RequestError: (``invalid_value``) it does not, naming ``param``.
    """
    if not FUNCTION_NAME.fullmatch(name):
        raise RequestError(
            f"Invalid '{param}': {name[:70]!r} does not match the pattern "
            "'^[a-zA-Z0-9_-]{1,64}$'.",
            param=param, code="invalid_value",
        )
    return name


def checked(check: Callable[[str], object], value: str, param: str) -> str:
    """``value`` if ``check`` passes.

    Raises:
        RequestError: ``check``'s, reworded to name ``param`` (its code kept).
    """
    try:
        check(value)
    except RequestError as exc:
        raise RequestError(f"Invalid '{param}': {exc.message}.", param=param,
                           code=exc.code) from None
    return value


def part_url(value: object, param: str) -> str:
    """The URL of an ``image_url`` or ``file_url`` field: ``{"url": str, ...}`` or a string.

    The URL must be one that can be sent on (:func:`protocol.datauri.check_file_url`).

    Raises:
        RequestError: a type fault names ``param`` itself (``...content[1].image_url``),
            a URL that cannot be sent on its own path (``...image_url.url``).
    """
    if isinstance(value, str):
        return checked(check_file_url, value, param)
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        url: str = value["url"]
        return checked(check_file_url, url, f"{param}.url")
    if value is None:
        raise missing(param)
    raise invalid_type(param, "an object with a 'url' string, or a string")
