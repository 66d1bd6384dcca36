"""Reading requests: the caller's identity, the request id, and strictly decoded JSON bodies."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, TypeVar

import msgspec
from litestar import Request

from app.api.errors import request_id_of
from app.domain.context import Context
from app.domain.errors import Unauthorized, UnsupportedMediaType, ValidationFailed
from app.domain.keys import Principal
from app.domain.types import StrictDecoder


def principal(request: Request) -> Principal:
    """The caller the edge authenticated; a route reached without one is refused, never served."""
    found = request.scope.get("state", {}).get("principal")
    if found is None:
        raise Unauthorized()
    return found


def org_of(request: Request) -> str:
    return principal(request).org_id


def request_id(request: Request) -> str:
    return request_id_of(request.scope)


def context(request: Request) -> Context:
    return request.app.state.ctx


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, decoder: StrictDecoder, *, optional: bool = False) -> Any:
    """Decode the body strictly; 415 for a non-JSON content type, 400 for anything malformed."""
    raw = await request.body()
    content_type = request.headers.get("content-type")
    if raw and content_type is not None and not _is_json(content_type):
        raise UnsupportedMediaType("Send the body as application/json.")
    if optional and not raw.strip():
        return decoder.decode(b"{}")
    return decoder.decode(raw)


class _NoBody(msgspec.Struct, forbid_unknown_fields=True):
    pass


_no_body = StrictDecoder(_NoBody)


async def no_body(request: Request) -> None:
    """A route that takes no body: none, or an empty JSON object; anything else is refused as on a JSON route
    (415 for another content type; 400 for malformed JSON, any field, `clientOrgId` among them)."""
    await read_json(request, _no_body, optional=True)


T = TypeVar("T")


def page(rows: list[T], limit: int) -> tuple[list[T], bool]:
    """Rows read with `limit + 1`: the page, and whether another follows (so that the last page, even a full
    one, says `next_cursor: null`)."""
    return rows[:limit], len(rows) > limit


def cursor_scope(*shape: object) -> str:
    """What a cursor pages, as a short tag: the list (its route) and whatever picks its rows (the org, the
    conversation or endpoint, the filters). Every cursor carries the tag of the list that gave it, so one given to
    another list, or to this one with other filters, is refused instead of read as a position there."""
    return hashlib.blake2b(msgspec.json.encode(shape), digest_size=6).hexdigest()


def encode_cursor(scope: str, *parts: object) -> str:
    text = "|".join(str(part) for part in (scope, *parts))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, scope: str, kinds: tuple[type, ...]) -> tuple[Any, ...] | None:
    """The position a cursor of this list (`scope`, from `cursor_scope`) holds; 400 naming `cursor` for anything
    else: a cursor of another list, or one not exactly as this API wrote it."""
    if cursor is None or cursor == "":
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, *parts = text.split("|")
        if len(parts) != len(kinds):
            raise ValueError
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _not_a_cursor() from None
    if tag != scope:
        raise ValidationFailed.field(
            "cursor", "was returned for another list (another route, conversation, endpoint, org or filters)"
        )
    try:
        values = tuple(kind(part) for kind, part in zip(kinds, parts, strict=True))
        if any(isinstance(value, int) and not 0 <= value < 2**63 for value in values):
            raise ValueError  # beyond what SQLite stores, or below any position we hand out
        if encode_cursor(scope, *values) != cursor:
            raise ValueError  # a form this API never writes (`+3`, ` 3`, `3_0`, other digits, stray bytes)
        return values
    except ValueError:
        raise _not_a_cursor() from None


def _not_a_cursor() -> ValidationFailed:
    return ValidationFailed.field("cursor", "is not a cursor this API returned")
