"""GET /v1/events: the org's event log for reconciliation, items exactly as they are delivered (SPEC §6)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.params import Parameter

from app.api import requests as rq
from app.api.schemas import ListMeta, errors
from app.domain.conversations import UUID_PATTERN
from app.domain.errors import ValidationFailed
from app.domain.events import EVENT_TYPES
from app.domain.ids import parse_uuid
from app.store import events as store

_encoder = msgspec.json.Encoder()


class EventList(msgspec.Struct):
    """Each item is the PAM envelope a webhook receives for the event, byte for byte."""

    data: list[dict[str, Any]]
    meta: ListMeta


class EventController(Controller):
    path = "/v1/events"
    tags = ["Events"]

    @get("/", summary="The org's event log, oldest first", responses=errors())
    async def list_events(
        self,
        request: Request,
        after: Annotated[str | None, Parameter(description="an event id: list the events after it")] = None,
        event_type: Annotated[str | None, Parameter(query="type", description="only this event type")] = None,
        conversation_id: Annotated[str | None, Parameter(query="conversationId", pattern=UUID_PATTERN)] = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    ) -> EventList:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        if event_type is not None and event_type not in EVENT_TYPES:
            raise ValidationFailed.field("type", f"unknown event type {event_type!r}")
        if conversation_id is not None:  # the pattern let it through: any spelling of a UUID, stored lowercase
            conversation_id = parse_uuid(conversation_id)

        def run(conn: Any) -> list[Any]:
            after_pos = 0
            if after:
                position = store.position_of(conn, org_id, after)
                if position is None:
                    raise ValidationFailed.field("after", "is not an event id of this organization")
                after_pos = position
            return store.list_for_org(
                conn,
                org_id,
                after_pos=after_pos,
                event_type=event_type,
                conversation_id=conversation_id,
                limit=limit + 1,
            )

        rows, more = rq.page(await ctx.db.read(run), limit)
        next_cursor = rows[-1]["id"] if more else None
        meta = _encoder.encode(ListMeta(request_id=rq.request_id(request), next_cursor=next_cursor))
        # The stored payload bytes are spliced in unchanged, so a reconciler sees what receivers saw.
        body = b'{"data":[' + b",".join(row["payload"].encode() for row in rows) + b'],"meta":' + meta + b"}"
        return Response(content=body, media_type="application/json")  # type: ignore[return-value]
