"""API keys (SPEC §2): snake_case resources, the raw key shown once."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import Parameter

from app.api import requests as rq
from app.api.schemas import ListMeta, Meta, errors, json_body
from app.clock import epoch_ms, iso
from app.domain import keys
from app.domain.errors import ValidationFailed
from app.domain.types import KeyName, StrictDecoder
from app.store import orgs


class CreateKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: KeyName
    expires_at: datetime | None = None


class KeyOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    key_prefix: str
    expires_at: str | None
    created_at: str
    revoked_at: str | None


class NewKeyOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    key: str
    key_prefix: str
    expires_at: str | None
    created_at: str


class NewKeyEnvelope(msgspec.Struct):
    data: NewKeyOut
    meta: Meta


class KeyEnvelope(msgspec.Struct):
    data: KeyOut
    meta: Meta


class KeyList(msgspec.Struct):
    data: list[KeyOut]
    meta: ListMeta


create_decoder = StrictDecoder(CreateKey)


def key_out(row: sqlite3.Row) -> KeyOut:
    return KeyOut(
        id=row["id"],
        name=row["name"],
        key_prefix=row["key_prefix"],
        expires_at=iso(row["expires_at"]),
        created_at=iso(row["created_at"]) or "",
        revoked_at=iso(row["revoked_at"]),
    )


class ApiKeyController(Controller):
    path = "/v1/api-keys"
    tags = ["API keys"]

    @post("/", status_code=201, operation_class=json_body(CreateKey), responses=errors(413, 415))
    async def create(self, request: Request) -> NewKeyEnvelope:
        ctx = rq.context(request)
        body = await rq.read_json(request, create_decoder)
        expires_at = None
        if body.expires_at is not None:
            try:
                expires_at = epoch_ms(body.expires_at)
            except ValueError:
                raise ValidationFailed.field("expires_at", "must be an RFC 3339 timestamp with a zone") from None
            if expires_at <= ctx.clock.now_ms():
                raise ValidationFailed.field("expires_at", "must be in the future")
        caller = rq.principal(request)
        if caller.expires_at is not None and (expires_at is None or expires_at > caller.expires_at):
            raise ValidationFailed.field(
                "expires_at",
                f"must be no later than {iso(caller.expires_at)}, when the key making this request expires"
                " (a key cannot make one that outlives it)",
            )
        org_id = caller.org_id
        created = await ctx.db.write(lambda c: keys.create_key(c, org_id, body.name, expires_at, ctx.clock.now_ms()))
        data = NewKeyOut(
            id=created.id,
            name=created.name,
            key=created.key,
            key_prefix=created.key_prefix,
            expires_at=iso(created.expires_at),
            created_at=iso(created.created_at) or "",
        )
        return NewKeyEnvelope(data=data, meta=Meta(request_id=rq.request_id(request)))

    @get("/", responses=errors())
    async def list_keys(
        self,
        request: Request,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        cursor: str | None = None,
    ) -> KeyList:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        scope = rq.cursor_scope("api-keys", org_id)
        after = rq.decode_cursor(cursor, scope, (int, str))
        rows = await ctx.db.read(
            lambda c: orgs.list_keys(c, org_id, after=after, limit=limit + 1)  # type: ignore[arg-type]
        )
        page, more = rq.page(rows, limit)
        next_cursor = rq.encode_cursor(scope, page[-1]["created_at"], page[-1]["id"]) if more else None
        return KeyList(
            data=[key_out(row) for row in page],
            meta=ListMeta(request_id=rq.request_id(request), next_cursor=next_cursor),
        )

    @post("/{key_id:str}/revoke", status_code=200, responses=errors(404, 415))
    async def revoke(self, request: Request, key_id: str) -> KeyEnvelope:
        await rq.no_body(request)
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        row = await ctx.db.write(lambda c: keys.revoke(c, key_id, ctx.clock.now_ms(), org_id))
        request.app.state.edge.key_cache.forget(row["id"])
        return KeyEnvelope(data=key_out(row), meta=Meta(request_id=rq.request_id(request)))
