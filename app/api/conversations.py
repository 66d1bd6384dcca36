"""The SMS conversation routes (SPEC §3)."""

from __future__ import annotations

import sqlite3
from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import ResponseHeader
from litestar.params import Parameter

from app.api import requests as rq
from app.api.schemas import (
    ClosedConversation,
    ConversationOut,
    CreatedConversation,
    ErrorBody,
    ErrorEnvelope,
    ListMeta,
    MessageOut,
    Meta,
    conversation_out,
    errors,
    json_body,
    message_out,
)
from app.clock import iso
from app.domain import conversations, messaging
from app.domain.conversations import UUID_PATTERN, CloseConversation, CreateConversation, CreateOutcome
from app.domain.errors import NotFound, ValidationFailed
from app.domain.ids import parse_uuid
from app.domain.models import Conversation
from app.domain.types import BLANK_PROBLEM, E164_PATTERN, SendableSms, StrictDecoder, shows_nothing, whole
from app.store import agents as agents_store
from app.store import conversations as store

IDEMPOTENCY_KEY = whole(r"[\x20-\x7e]{1,255}", "1 to 255 printable ASCII characters")
_encoder = msgspec.json.Encoder()


class OperatorMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    content: Annotated[SendableSms, msgspec.Meta(min_length=1)]


class CreatedEnvelope(msgspec.Struct):
    data: CreatedConversation
    meta: Meta


class ClosedEnvelope(msgspec.Struct):
    data: ClosedConversation
    meta: Meta


class ConversationEnvelope(msgspec.Struct):
    data: ConversationOut
    meta: Meta


class ConversationList(msgspec.Struct):
    data: list[ConversationOut]
    meta: ListMeta


class MessageEnvelope(msgspec.Struct):
    data: MessageOut
    meta: Meta


class MessageList(msgspec.Struct):
    data: list[MessageOut]
    meta: ListMeta


create_decoder = StrictDecoder(CreateConversation, conversations.raw_field_problems)
close_decoder = StrictDecoder(CloseConversation)
operator_decoder = StrictDecoder(OperatorMessage)


def render_create(outcome: CreateOutcome, *, replayed: bool) -> Response[bytes]:
    """The same bytes for the first answer and every replay of it."""
    meta = Meta(request_id=outcome.request_id)
    if outcome.status_code == 201:
        data = CreatedConversation(
            conversation_id=outcome.conversation_id,
            provider_message_id=outcome.provider_message_id,
            status="in_progress",
        )
        body = _encoder.encode(CreatedEnvelope(data=data, meta=meta))
    else:
        error = ErrorBody(
            code="provider_error",
            message=outcome.message or "The SMS provider rejected the message.",
            providerCode=outcome.provider_code,
            conversationId=outcome.conversation_id,
        )
        body = _encoder.encode(ErrorEnvelope(error=error, meta=meta))
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return Response(content=body, status_code=outcome.status_code, media_type="application/json", headers=headers)


def _with_slugs(request: Request, items: list[Conversation]) -> list[ConversationOut]:
    ctx = rq.context(request)
    ids = {c.agent_id for c in items}
    slugs = ctx.db.read_now(lambda c: agents_store.slugs_of(c, ids))
    return [conversation_out(c, slugs.get(c.agent_id)) for c in items]


IDEMPOTENT_REPLAYED = ResponseHeader(
    name="Idempotent-Replayed",
    documentation_only=True,
    value="true",  # gives the header its schema (a string) in the document
    description="`true` when this answer replays the first request with the same Idempotency-Key (its status and"
    " body, a 502 included); absent otherwise",
)


class ConversationController(Controller):
    path = "/v1/sms-conversations"
    tags = ["SMS conversations"]

    @post(
        "/",
        status_code=201,
        operation_class=json_body(
            CreateConversation,
            # Exactly one of the two is given: present and not null.
            extra={
                "oneOf": [
                    {"required": [name], "properties": {name: {"type": "string"}}} for name in ("agentSlug", "agentId")
                ]
            },
        ),
        responses=errors(404, 409, 413, 415, 422, 502, conflicts="idempotency_in_progress, recipient_opted_out"),
        response_description="The conversation is in progress: the provider took its opening SMS",
        response_headers=[IDEMPOTENT_REPLAYED],
        summary="Create an SMS conversation and send its opening message",
    )
    async def create(
        self,
        request: Request,
        idempotency_key: Annotated[
            str | None, Parameter(header="Idempotency-Key", required=False, pattern=IDEMPOTENCY_KEY)
        ] = None,
    ) -> CreatedEnvelope:
        ctx = rq.context(request)
        if idempotency_key is not None and len(request.headers.getall("idempotency-key")) > 1:
            # Litestar reads the first; a proxy may fold them into "a, b", another key: a retry could send twice.
            raise ValidationFailed.field("Idempotency-Key", "is given more than once")
        body = await rq.read_json(request, create_decoder)
        outcome, replayed = await conversations.create(
            ctx, rq.org_of(request), body, request_id=rq.request_id(request), idempotency_key=idempotency_key
        )
        return render_create(outcome, replayed=replayed)  # type: ignore[return-value]

    @get("/", summary="List conversations, newest first", responses=errors())
    async def list_conversations(
        self,
        request: Request,
        status: Literal["in_progress", "closed"] | None = None,
        agent_id: Annotated[str | None, Parameter(query="agentId", pattern=UUID_PATTERN)] = None,
        to_number: Annotated[str | None, Parameter(query="toNumber", pattern=E164_PATTERN)] = None,
        from_number: Annotated[str | None, Parameter(query="fromNumber", pattern=E164_PATTERN)] = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        cursor: str | None = None,
    ) -> ConversationList:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        agent_filter = None
        if agent_id is not None:
            agent_filter = parse_uuid(agent_id)
            if agent_filter is None:
                raise ValidationFailed.field("agentId", "must be a UUID")
        scope = rq.cursor_scope("conversations", org_id, status, agent_filter, to_number, from_number)
        before = rq.decode_cursor(cursor, scope, (int, str))

        def run(conn: sqlite3.Connection) -> list[Conversation]:
            return store.list_for_org(
                conn,
                org_id,
                status=status,
                agent_id=agent_filter,
                to_number=to_number,
                from_number=from_number,
                before=before,  # type: ignore[arg-type]
                limit=limit + 1,
            )

        items, more = rq.page(await ctx.db.read(run), limit)
        next_cursor = rq.encode_cursor(scope, items[-1].created_at, items[-1].id) if more else None
        return ConversationList(
            data=_with_slugs(request, items),
            meta=ListMeta(request_id=rq.request_id(request), next_cursor=next_cursor),
        )

    @get("/{conversation_id:str}", summary="Read one conversation", responses=errors(404))
    async def get_conversation(self, request: Request, conversation_id: str) -> ConversationEnvelope:
        conversation = await conversations.get(rq.context(request), rq.org_of(request), conversation_id)
        (out,) = _with_slugs(request, [conversation])
        return ConversationEnvelope(data=out, meta=Meta(request_id=rq.request_id(request)))

    @post(
        "/{conversation_id:str}/close",
        status_code=200,
        operation_class=json_body(CloseConversation, required=False),
        responses=errors(404, 413, 415),
        summary="Close a conversation",
    )
    async def close(self, request: Request, conversation_id: str) -> ClosedEnvelope:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        if parse_uuid(conversation_id) is None:
            raise NotFound("Conversation not found.")
        body = await rq.read_json(request, close_decoder, optional=True)
        if body.reason is not None and shows_nothing(body.reason):
            raise ValidationFailed.field("reason", BLANK_PROBLEM)
        result = await conversations.close(ctx, org_id, conversation_id, body.reason)
        c = result.conversation
        data = ClosedConversation(
            conversation_id=c.id,
            status=c.status,
            ended_at=iso(c.ended_at),
            end_reason=c.end_reason,
            already_closed=result.already_closed,
        )
        return ClosedEnvelope(data=data, meta=Meta(request_id=rq.request_id(request)))

    @get(
        "/{conversation_id:str}/messages",
        summary="The conversation's messages, in order",
        responses=errors(404),
    )
    async def list_messages(
        self,
        request: Request,
        conversation_id: str,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        cursor: str | None = None,
    ) -> MessageList:
        ctx = rq.context(request)
        conversation = await conversations.get(ctx, rq.org_of(request), conversation_id)
        scope = rq.cursor_scope("messages", conversation.id)
        after = rq.decode_cursor(cursor, scope, (int,))
        after_seq = after[0] if after else 0
        # One page (at most 100 rows) walked on the (conversation_id, seq) index: a point read, done inline.
        rows = ctx.db.read_now(lambda c: store.messages_of(c, conversation.id, after_seq=after_seq, limit=limit + 1))
        items, more = rq.page(rows, limit)
        next_cursor = rq.encode_cursor(scope, items[-1].seq) if more else None
        return MessageList(
            data=[message_out(m) for m in items],
            meta=ListMeta(request_id=rq.request_id(request), next_cursor=next_cursor),
        )

    @post(
        "/{conversation_id:str}/messages",
        status_code=201,
        operation_class=json_body(OperatorMessage),
        responses=errors(
            404, 409, 413, 415, 502, conflicts="conversation_closed, conversation_pending, recipient_opted_out"
        ),
        summary="Send an operator message in the conversation",
    )
    async def send_message(self, request: Request, conversation_id: str) -> MessageEnvelope:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        canonical = parse_uuid(conversation_id)
        if canonical is None:
            raise NotFound("Conversation not found.")
        body = await rq.read_json(request, operator_decoder)
        if shows_nothing(body.content):
            raise ValidationFailed.field("content", BLANK_PROBLEM)
        message = await messaging.send_in_conversation(ctx, canonical, org_id, body.content, "operator")
        return MessageEnvelope(data=message_out(message), meta=Meta(request_id=rq.request_id(request)))
