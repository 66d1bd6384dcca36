"""Reusable field constraints and the strict JSON decoding used for every request body."""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec

from app.domain.errors import FieldProblem, ValidationFailed

T = TypeVar("T")

E164Number = Annotated[str, msgspec.Meta(pattern=r"^\+[1-9]\d{6,14}$", examples=["+15555550123"])]
Slug = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
SmsBody = Annotated[str, msgspec.Meta(max_length=1600)]
VariableName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
VariableValue = Annotated[str, msgspec.Meta(max_length=2000)]
DynamicVariables = Annotated[dict[VariableName, VariableValue], msgspec.Meta(max_length=50)]
MetadataValue = str | int | float | bool
Metadata = Annotated[dict[Annotated[str, msgspec.Meta(max_length=255)], MetadataValue], msgspec.Meta(max_length=20)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]

_PATH = re.compile(r" - at (?:`key` in )?`\$(.*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def _dotted(path: str) -> str:
    # msgspec paths look like `.dynamicVariables[...]` or `.tools[0].url`
    return re.sub(r"\[(\d+|\.\.\.)\]", lambda m: "." + m.group(1), path).lstrip(".")


def problem_from_msgspec(exc: msgspec.DecodeError | msgspec.ValidationError) -> ValidationFailed:
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        match = _PATH.search(text)
        where = _dotted(match.group(1)) if match else ""
        message = _PATH.sub("", text)
        if unknown := _UNKNOWN.match(message):
            field = ".".join(filter(None, [where, unknown.group(1)]))
            if unknown.group(1) == "clientOrgId":
                message = "clientOrgId is not accepted: the API key decides the organization"
            else:
                message = "unknown field"
            return ValidationFailed(f"{field}: {message}", [FieldProblem(field, message)])
        if missing := _MISSING.match(message):
            field = ".".join(filter(None, [where, missing.group(1)]))
            return ValidationFailed(f"{field}: is required", [FieldProblem(field, "is required")])
        field = where or "body"
        return ValidationFailed(f"{field}: {message}", [FieldProblem(field, message)])
    return ValidationFailed("The request body is not valid JSON.", [FieldProblem("body", "malformed JSON")])


class StrictDecoder:
    """A prebuilt, strict JSON decoder whose failures become `ValidationFailed`."""

    def __init__(self, type_: type[T]) -> None:
        self.type = type_
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(type_, strict=True)

    def decode(self, raw: bytes) -> Any:
        if not raw.strip():
            raise ValidationFailed("A JSON body is required.", [FieldProblem("body", "is required")])
        try:
            return self._decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise problem_from_msgspec(exc) from None
