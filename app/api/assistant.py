"""Assistant routes on a conversation (SPEC §5): resume after a handoff, and the tool calls the model made."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import Parameter

from app.api import requests as rq
from app.api.schemas import ConversationOut, ListMeta, Meta, conversation_out, errors
from app.clock import iso
from app.domain import conversations
from app.domain.assistant import Assistant
from app.store import agents as agents_store
from app.store import tool_calls as tool_calls_store
from app.store.tool_calls import ToolCall

_json = msgspec.json.Decoder()


class ToolCallOut(msgspec.Struct, rename="camel", kw_only=True):
    tool_call_id: str
    name: str
    arguments: Any
    result: Any
    is_error: bool | None
    duration_ms: int | None
    status: str  # running | completed
    created_at: str
    completed_at: str | None


class ToolCallList(msgspec.Struct):
    data: list[ToolCallOut]
    meta: ListMeta


class ResumedEnvelope(msgspec.Struct):
    data: ConversationOut
    meta: Meta


def _decoded(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return _json.decode(text)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested deeper than the decoder goes
        return text  # arguments the model wrote as invalid JSON are shown as it wrote them


def tool_call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(
        tool_call_id=call.id,
        name=call.name,
        arguments=_decoded(call.arguments),
        result=_decoded(call.result),
        is_error=call.is_error,
        duration_ms=call.duration_ms,
        status="running" if call.completed_at is None else "completed",
        created_at=iso(call.created_at) or "",
        completed_at=iso(call.completed_at),
    )


def assistant_of(request: Request) -> Assistant:
    assistant = rq.context(request).assistant
    assert assistant is not None, "the lifespan wires the assistant"
    return assistant


class AssistantController(Controller):
    path = "/v1/sms-conversations"
    tags = ["SMS conversations"]

    @post(
        "/{conversation_id:str}/resume",
        status_code=200,
        responses=errors(404, 409, 415, conflicts="conversation_closed, conversation_pending"),
        summary="Give a handed-off conversation back to the assistant",
    )
    async def resume(self, request: Request, conversation_id: str) -> ResumedEnvelope:
        await rq.no_body(request)
        ctx = rq.context(request)
        conversation = await assistant_of(request).resume(rq.org_of(request), conversation_id)
        agent = await ctx.db.read(lambda c: agents_store.by_id_any(c, conversation.agent_id))
        data = conversation_out(conversation, agent.slug if agent else None)
        return ResumedEnvelope(data=data, meta=Meta(request_id=rq.request_id(request)))

    @get(
        "/{conversation_id:str}/tool-calls",
        summary="The tool calls the assistant made in the conversation, in order",
        responses=errors(404),
    )
    async def list_tool_calls(
        self,
        request: Request,
        conversation_id: str,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        cursor: str | None = None,
    ) -> ToolCallList:
        ctx = rq.context(request)
        conversation = await conversations.get(ctx, rq.org_of(request), conversation_id)
        scope = rq.cursor_scope("tool-calls", conversation.id)
        after = rq.decode_cursor(cursor, scope, (int,))
        after_pos = after[0] if after else 0
        rows = await ctx.db.read(
            lambda c: tool_calls_store.of_conversation(c, conversation.id, after_pos=after_pos, limit=limit + 1)
        )
        items, more = rq.page(rows, limit)
        next_cursor = rq.encode_cursor(scope, items[-1].pos) if more else None
        return ToolCallList(
            data=[tool_call_out(call) for call in items],
            meta=ListMeta(request_id=rq.request_id(request), next_cursor=next_cursor),
        )
