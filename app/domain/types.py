"""Reusable field constraints and the strict JSON decoding used for every request body."""

from __future__ import annotations

import contextlib
import json
import math
import re
import types
import typing
import unicodedata
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import msgspec

from app.domain.errors import FieldProblem, ValidationFailed

T = TypeVar("T")


# msgspec's messages -> what a client is told instead ("matching regex" ones are added by `whole`).
_MEANINGS: dict[str, str] = {"Number out of range": "is a number out of range"}


def whole(pattern: str, meaning: str) -> str:
    r"""`^pattern$` that a value must match entirely, for msgspec and Litestar (Python's `re.search`) and OpenAPI
    alike: Python's `$` also matches before a final newline, which `(?!\n)` refuses (a no-op in ECMA-262).
    A value that does not match is reported as "must be <meaning>", not with the regex."""
    anchored = f"^{pattern}$(?!\\n)"
    message = f"Expected `str` matching regex {anchored!r}"
    if _MEANINGS.setdefault(message, f"must be {meaning}") != f"must be {meaning}":
        raise ValueError(f"{pattern!r} already means {_MEANINGS[message]!r}: give it one name (a shared constant)")
    return anchored


def readable(message: str) -> str:
    """A validation message as a client reads it (patterns by their meaning)."""
    return _MEANINGS.get(message, message)


E164_PATTERN = whole(r"\+[1-9]\d{6,14}", "an E.164 number such as +15555550123")
E164Number = Annotated[str, msgspec.Meta(pattern=E164_PATTERN, examples=["+15555550123"])]
Slug = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
MAX_SMS_CHARS = 1600  # SPEC §3.1: the longest text Parley sends as one (multi-segment) SMS
SmsBody = Annotated[str, msgspec.Meta(max_length=MAX_SMS_CHARS)]
# A text Parley sends: no control character but a tab, a line break or a form feed (GSM-7 has the last three;
# a NUL or a BEL is refused or mangled by carriers).
SMS_CONTROL = r"\x00-\x08\x0b\x0e-\x1f\x7f-\x9f"
SMS_CONTROL_CHARACTER = re.compile(f"[{SMS_CONTROL}]")
SendableSms = Annotated[
    str,
    msgspec.Meta(
        max_length=MAX_SMS_CHARS,
        pattern=whole(f"[^{SMS_CONTROL}]*", "text without control characters (tabs and line breaks are allowed)"),
    ),
]


# Letters and symbols that are drawn blank (Hangul fillers, the blank Braille pattern), and format characters
# that are drawn (the prepended concatenation marks: the Arabic number sign, end of ayah and the like).
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_DRAWN = frozenset("\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd")
_CONTROL_OR_FORMAT = frozenset({"Cc", "Cf"})
_INVISIBLE = _CONTROL_OR_FORMAT | {"Mn", "Me"}  # controls, format characters, marks with nothing to mark


def _invisible(char: str, categories: frozenset[str]) -> bool:
    """Whether `char` is of one of `categories` (of _INVISIBLE) and not one of the format characters that are drawn."""
    return unicodedata.category(char) in categories and char not in _DRAWN


def shows_nothing(text: str) -> bool:
    """Whether an SMS of `text` would show nothing: only spaces, line breaks, invisible format characters (a
    zero-width space or joiner, a byte-order mark), marks or variation selectors with no character to apply to,
    and characters drawn blank."""
    return all(char.isspace() or char in _BLANK or _invisible(char, _INVISIBLE) for char in text)


# Marks that show nothing wherever they stand (Unicode's default-ignorable ones): the variation selectors (an emoji
# keyboard's U+FE0F), the combining grapheme joiner, the Mongolian free variation selectors, the Khmer inherent vowels.
_IGNORABLE_MARKS = frozenset(
    "\u034f\u17b4\u17b5\u180b\u180c\u180d\u180f" + "".join(map(chr, [*range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]))
)


def _as_seen(char: str) -> str:
    """A character as the screen shows it: a letter drawn blank as a space, one that shows nothing as nothing."""
    if char.isspace():
        return char
    if char in _BLANK:
        return " "
    if char in _IGNORABLE_MARKS or _invisible(char, _CONTROL_OR_FORMAT):  # a mark beside a letter is drawn
        return ""
    return char


def without_unseen(text: str) -> str:
    """`text` without the characters that show nothing where they stand and are no space: control and format
    characters (a zero-width space or joiner, a word joiner, a byte-order mark, a direction mark, a soft hyphen, a
    NUL), the format characters that are drawn kept, and the marks that show nothing (a variation selector, the
    combining grapheme joiner); a letter drawn blank (a Hangul filler, the blank Braille pattern) reads as the space
    it looks like. What is left reads as the customer's screen shows it."""
    return "".join(map(_as_seen, text))


# A terminal's escape sequence, as a model or a template's value may carry one: a control sequence (colours,
# cursor moves: digits and `;` then a letter), an operating-system command (a window title, a link) ended by BEL
# or ST, or a switch to the ASCII or line-drawing character set. Narrow on purpose: after a stray ESC the text
# stays (`\x1b(555) 555-0100`); what other escapes leave behind is visible, never text lost.
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()][0B])")


def sendable_text(text: str) -> str:
    """A text Parley sends without having checked it as input (a model's reply; an agent's text rendered with a
    conversation's variables, or stored by an earlier version): its terminal escape sequences and its control
    characters other than a tab, a line break or a form feed removed (carriers refuse or mangle them), "" when
    nothing visible is left."""
    text = SMS_CONTROL_CHARACTER.sub("", _ANSI_ESCAPE.sub("", text))
    return "" if shows_nothing(text) else text


BLANK_PROBLEM = "must not be blank"
CONTROL_PROBLEM = "must not contain control characters (tabs and line breaks are allowed)"


def sms_text_problem(text: str) -> str | None:
    """Why `text`, written to be sent as an SMS, cannot be, or None (the rules of `SendableSms` and the blank
    check, for texts a type cannot check: stored ones are read without it)."""
    if shows_nothing(text):
        return BLANK_PROBLEM
    if SMS_CONTROL_CHARACTER.search(text):
        return CONTROL_PROBLEM
    return None


VariableName = Annotated[
    str,
    msgspec.Meta(
        pattern=whole(r"[A-Za-z_][A-Za-z0-9_]{0,63}", "a letter or _, then letters, digits or _ (64 at most)")
    ),
]
VariableValue = Annotated[str, msgspec.Meta(max_length=2000)]
DynamicVariables = Annotated[dict[VariableName, VariableValue], msgspec.Meta(max_length=50)]
# Integers as JSON parsers commonly read them (int64): a webhook receiver must be able to take the payload.
MetadataValue = str | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | float | bool
Metadata = Annotated[dict[Annotated[str, msgspec.Meta(max_length=255)], MetadataValue], msgspec.Meta(max_length=20)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
# An API key's name is printed on one line of `parley keys list`: no control character (C0, DEL, C1), no line or
# paragraph separator, no bidirectional control (it would reorder the line as shown). Only request bodies carry it
# (stored rows are read without it, so nothing stored breaks).
NOT_ONE_LINE = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
ONE_LINE_PATTERN = whole(f"[^{NOT_ONE_LINE}]*", "text without control characters (such as a newline or a tab)")
KeyName = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=ONE_LINE_PATTERN)]
# A close's reason becomes `endReason` in reads and webhooks: one line, as a key's name.
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=ONE_LINE_PATTERN)]

_PATH = re.compile(r" - at (?:`key` in )?`\$(.*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def _dotted(path: str) -> str:
    # msgspec paths look like `.dynamicVariables[...]` or `.tools[0].url`; `[...]` is a map's value whose key it
    # does not name, so the path ends at the map.
    path = path.split("[...]", 1)[0]
    return re.sub(r"\[(\d+)\]", lambda m: "." + m.group(1), path).lstrip(".")


def _join(base: str, name: object) -> str:
    return f"{base}.{name}" if base else str(name)


_NOT_CLIENT_ORG_ID = "clientOrgId is not accepted: the API key decides the organization"
_UNKNOWN_FIELD = ("unknown field", _NOT_CLIENT_ORG_ID)  # what `_unknown` says


def _unknown(where: str, name: str) -> FieldProblem:
    if name == "clientOrgId" and not where:
        return FieldProblem(name, _NOT_CLIENT_ORG_ID)
    return FieldProblem(_join(where, name), "unknown field")


def _problem(exc: msgspec.ValidationError, base: str = "") -> FieldProblem:
    """One msgspec validation error as a problem at `base` plus the path msgspec names (if any)."""
    text = str(exc)
    match = _PATH.search(text)
    where = _dotted(match.group(1)) if match else ""
    where = _join(base, where) if where else base
    message = readable(_PATH.sub("", text))
    if unknown := _UNKNOWN.match(message):
        return _unknown(where, unknown.group(1))
    if missing := _MISSING.match(message):
        return FieldProblem(_join(where, missing.group(1)), "is required")
    return FieldProblem(where or "body", message)


def _unwrap(type_: Any) -> Any:
    """The type to look inside: without `Annotated` constraints, and the one real member of `X | None | UNSET`."""
    while True:
        if typing.get_origin(type_) is Annotated:
            type_ = typing.get_args(type_)[0]
            continue
        if typing.get_origin(type_) in (typing.Union, types.UnionType):
            members = [m for m in typing.get_args(type_) if m not in (type(None), msgspec.UnsetType)]
            if len(members) == 1:
                type_ = members[0]
                continue
        return type_


def _problems(value: Any, type_: Any, path: str) -> list[FieldProblem]:
    """Every problem in a parsed JSON value against `type_`, each at its own dotted path.

    msgspec stops at the first error; this walks into objects, maps and lists so that a client sees all of
    them at once. Where nothing inside is wrong (a constraint on the whole, such as a map's size), the
    whole is reported."""
    try:
        msgspec.convert(value, type_, strict=True)
        return []
    except msgspec.ValidationError as exc:
        whole_problem = _problem(exc, path)
    inner = _unwrap(type_)
    found: list[FieldProblem] = []
    if isinstance(value, dict) and isinstance(inner, type) and issubclass(inner, msgspec.Struct):
        fields = msgspec.structs.fields(inner)
        for field in fields:
            if field.encode_name in value:
                found += _problems(value[field.encode_name], field.type, _join(path, field.encode_name))
            elif field.required:
                found.append(FieldProblem(_join(path, field.encode_name), "is required"))
        if inner.__struct_config__.forbid_unknown_fields:
            known = {field.encode_name for field in fields}
            found += [_unknown(path, name) for name in value if name not in known]
    elif isinstance(value, dict) and typing.get_origin(inner) is dict:
        key_type, value_type = typing.get_args(inner)
        for key, item in value.items():
            at = _join(path, key)
            found += [FieldProblem(at, f"invalid key: {p.message}") for p in _problems(key, key_type, at)]
            found += _problems(item, value_type, at)
    elif isinstance(value, list) and typing.get_origin(inner) is list:
        (item_type,) = typing.get_args(inner)
        for index, item in enumerate(value):
            found += _problems(item, item_type, _join(path, index))
    return found or [whole_problem]


Rules = Callable[[dict[str, Any]], list[FieldProblem]]


def every_problem(
    value: Any, type_: Any, first: msgspec.ValidationError, rules: Rules | None = None
) -> ValidationFailed:
    """All of a parsed body's problems against `type_` (`first` is the one msgspec stopped at), and those `rules`
    (checks a type cannot express) find in it, for fields without a problem of their own."""
    found = _problems(value, type_, "") or [_problem(first)]
    if rules is not None and isinstance(value, dict):
        named = {problem.field for problem in found}
        found += [problem for problem in rules(value) if problem.field not in named]
    return ValidationFailed.of(found)


def _unparsable(message: str, detail: str) -> ValidationFailed:
    return ValidationFailed(message, [FieldProblem("body", detail)])


@contextlib.contextmanager
def _parsing_body(raw: bytes) -> Iterator[None]:
    """Turn a body that cannot be parsed at all into its 400; a msgspec.ValidationError (the body parsed, a value
    in it is wrong) passes through. A body that is not UTF-8 says so, whichever way msgspec reports it (a
    UnicodeDecodeError before 0.23, a DecodeError since)."""
    try:
        yield
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError:
        if not _is_utf8(raw):
            raise _unparsable("The request body is not valid UTF-8.", "not valid UTF-8") from None
        raise _unparsable("The request body is not valid JSON.", "malformed JSON") from None
    except UnicodeDecodeError:
        raise _unparsable("The request body is not valid UTF-8.", "not valid UTF-8") from None
    except RecursionError:
        raise _unparsable("The request body is nested too deeply.", "nested too deeply") from None


class StrictDecoder:
    """A prebuilt, strict JSON decoder whose failures become `ValidationFailed`, naming every problem."""

    def __init__(self, type_: type[T], rules: Rules | None = None) -> None:
        self.type = type_
        self.rules = rules  # the checks a type cannot express, reported with a failed decode's problems
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(type_, strict=True)

    def decode(self, raw: bytes) -> Any:
        if not raw.strip():
            raise ValidationFailed("A JSON body is required.", [FieldProblem("body", "is required")])
        try:
            with _parsing_body(raw):
                return self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            first = exc
        # The failure path only: parse without the type, then look for every problem, not just the first.
        with _parsing_body(raw):
            try:
                value = msgspec.json.decode(raw)
            except msgspec.ValidationError:  # only a number no double holds (1e999) fails here
                raise _with_numbers_out_of_range(raw, self.type, first, self.rules) from None
            problems = every_problem(value, self.type, first, self.rules)
        raise problems


class _OutOfRange:
    """Where the body had a number no double holds."""


_OUT_OF_RANGE = _OutOfRange()


def _float_or_marked(text: str) -> Any:
    value = float(text)
    return _OUT_OF_RANGE if math.isinf(value) else value


def _int_or_marked(text: str) -> Any:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (4300): msgspec read it as a float out of range
        return _OUT_OF_RANGE


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _utf8(text: str) -> str:
    """A string as msgspec would have read it: the standard library's parser lets a lone surrogate (`\\ud800`)
    through, which no UTF-8 answer can then carry."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise _unparsable("The request body is not valid UTF-8.", "not valid UTF-8") from None
    return text


def _with_numbers_out_of_range(
    raw: bytes, type_: Any, first: msgspec.ValidationError, rules: Rules | None
) -> ValidationFailed:
    """Every problem of a body with numbers no double holds: each such number at its own path, and the body's other
    problems (the standard library's parser reads such a number, as infinity: marked, then set aside)."""
    try:
        marked = json.loads(raw, parse_float=_float_or_marked, parse_int=_int_or_marked)
    except ValueError:  # msgspec stopped at the number: what follows it was never read (cut off, trailing data)
        raise _unparsable("The request body is not valid JSON.", "malformed JSON") from None
    where: list[str] = []

    def set_aside(node: Any, path: str) -> Any:
        if node is _OUT_OF_RANGE:
            where.append(path)
            return None  # nothing is below it: only its own place can report a problem about it
        if isinstance(node, str):
            return _utf8(node)
        if isinstance(node, dict):
            return {_utf8(key): set_aside(item, _join(path, key)) for key, item in node.items()}
        if isinstance(node, list):
            return [set_aside(item, _join(path, index)) for index, item in enumerate(node)]
        return node

    value = set_aside(marked, "")
    places = {path or "body" for path in where}
    found: list[FieldProblem] = []
    unknown: set[str] = set()
    for problem in every_problem(value, type_, first, rules).details or []:
        if problem.message == readable("Number out of range"):
            continue  # `first`, where msgspec stopped: named below, at its own path
        if problem.field in places:
            if problem.message in _UNKNOWN_FIELD:
                unknown.add(problem.field)  # a field that does not exist: that is what is wrong with it
                found.append(problem)
            continue  # anything else its place reports is about the null put there, not the client's
        found.append(problem)
    # Empty when a later duplicate key replaced the number (the standard parser keeps the last, as msgspec does):
    # the number msgspec stopped at is then the problem.
    return ValidationFailed.of(
        [FieldProblem(place, "is a number out of range") for place in sorted(places - unknown)] + found
        or [_problem(first)]
    )
