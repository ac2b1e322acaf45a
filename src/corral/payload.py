"""JSON encoding of payloads and results: one place decides what a job may carry."""

from __future__ import annotations

import json
import re
from typing import Any

from corral.errors import PayloadError

MAX_NESTING = 500
"""How deep lists and objects may nest in a payload: well inside Python's recursion limit, so a
payload accepted here also decodes in a worker, whose stack is deeper than the producer's."""

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# Python's json accepts NaN and Infinity, which are not JSON: a payload holding them was not
# written by corral or a BullMQ producer.
_decoder = json.JSONDecoder(parse_constant=_not_json)


MAX_SAFE_INTEGER = 2**53 - 1
"""JavaScript's ``Number.MAX_SAFE_INTEGER``: past it Node.js reads an integer rounded."""

_LONG_DIGITS = re.compile(r"\d{16,}")


def encode_payload(
    data: Any, *, max_bytes: int, what: str = "payload", safe_integers: bool = False
) -> str:
    """Encode ``data`` as compact JSON, refusing anything that would not come back equal.

    With ``safe_integers`` (a queue shared with Node.js) an integer beyond ±(2**53 - 1) is
    refused too: JavaScript would read it rounded.

    Raises:
        PayloadError: ``data`` is not plain JSON (a set, bytes, a tuple, NaN, a non-string
            dict key, a lone surrogate...), its encoding exceeds ``max_bytes``, or (with
            ``safe_integers``) it holds an integer JavaScript cannot represent.
    """
    try:
        text = _encoder.encode(data)
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"{what} is not JSON-serialisable: {exc}; pass dicts, lists, "
            "str, int, finite float, bool or None"
        ) from None
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply to encode as JSON") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise PayloadError(
            f"{what} contains a string that is not valid Unicode "
            "(a lone surrogate); encode binary data as base64 text"
        ) from None
    if size > max_bytes:
        raise PayloadError(
            f"{what} is {size} bytes of JSON, over the limit of {max_bytes} "
            "(QUEUE_MAX_PAYLOAD_BYTES); store large data elsewhere and enqueue a "
            "reference to it"
        )
    if (  # nesting past the limit takes at least two characters a level
        size > 2 * MAX_NESTING
        and text.count("[") + text.count("{") > MAX_NESTING
        and _nesting(text) > MAX_NESTING
    ):
        raise PayloadError(
            f"{what} nests lists and objects more than {MAX_NESTING} levels deep; flatten it"
        )
    if safe_integers and _LONG_DIGITS.search(text):
        found = _unsafe_integer(data)
        if found is not None:
            raise PayloadError(
                f"{what} holds the integer {found[1]} at {found[0]}, beyond ±{MAX_SAFE_INTEGER} "
                "(2**53 - 1): Node.js BullMQ workers and Bull Board would read it rounded. Send "
                "it as a string, or set QUEUE_ALLOW_UNSAFE_INTEGERS=true if only Python reads "
                "this queue"
            )
    if size < 256 and _plain(data, 3):
        return text  # small and made only of exact JSON types: nothing can change on the way
    try:
        back = _decoder.decode(text)
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply to decode as JSON") from None
    if not _same(back, data):
        raise PayloadError(
            f"{what} would not round-trip through JSON unchanged (tuples become "
            "lists, non-string dict keys become strings): "
            f"{_first_difference(data)}"
        )
    return text


def decode_json(text: str | bytes) -> Any:
    """Decode JSON written by corral or a BullMQ producer.

    Raises:
        ValueError: ``text`` is not JSON (``UnicodeDecodeError`` for bytes that are not
            UTF-8), or is nested too deeply to decode.
    """
    try:
        return _decoder.decode(text if isinstance(text, str) else text.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply to decode") from None


def decode_lenient(text: str | None) -> Any:
    """Decode a stored JSON field for display: ``None`` stays ``None``, unreadable text is
    returned as it is (``get_job`` shows what is there rather than failing)."""
    if text is None:
        return None
    try:
        return decode_json(text)
    except (ValueError, UnicodeDecodeError):
        return text


def same_json(a: str | None, b: str | None) -> bool:
    """Whether two stored JSON texts hold the same value (equal texts, or equal once decoded:
    backends may store the same payload with other spacing)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    try:
        return bool(decode_json(a) == decode_json(b))
    except (ValueError, UnicodeDecodeError):
        return False


_SCALARS = (str, int, float, type(None))
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_AS_PARENS = str.maketrans("[]{}", "()()")


def _nesting(text: str) -> int:
    """How deep the arrays and objects of the JSON ``text`` nest (at most MAX_NESTING + 1)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).translate(_AS_PARENS)
    depth = 0
    # Each pass removes the innermost pairs; C-speed string work, one pass per level.
    while brackets and depth <= MAX_NESTING:
        brackets = brackets.replace("()", "")
        depth += 1
    return depth


def _plain(value: Any, depth: int) -> bool:
    """Whether ``value`` is built only of dict (str keys), list and JSON scalars, shallowly."""
    kind = type(value)
    if kind in _SCALARS or kind is bool:
        return True
    if depth == 0:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _plain(item, depth - 1):
                return False
        return True
    if kind is list:
        for item in value:  # noqa: SIM110  (a loop: no generator frame on the hot path)
            if not _plain(item, depth - 1):
                return False
        return True
    return False


def _same(back: Any, data: Any) -> bool:
    # JSON keeps bool/int/float apart on its own; `==` catches tuples and non-string keys.
    try:
        return bool(back == data)
    except RecursionError:
        return False


def _unsafe_integer(data: Any) -> tuple[str, int] | None:
    """Where ``data`` holds an integer beyond ±MAX_SAFE_INTEGER, and which, if it does."""
    stack: list[tuple[str, Any]] = [("payload", data)]
    while stack:
        path, value = stack.pop()
        if type(value) is int and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return path, value
        if isinstance(value, dict):
            stack.extend((f"{path}[{key!r}]", item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _first_difference(data: Any) -> str:
    stack = [("payload", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, tuple):
            return f"{path} is a tuple; pass a list"
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"{path} has the key {key!r} of type {type(key).__name__}; use str keys"
                stack.append((f"{path}[{key!r}]", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return "a value changed type"
