"""Inbound SMS: stored, routed to the pair's open conversation, and emitted, before it is acknowledged."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from app.domain import lifecycle, messaging
from app.domain.context import Context
from app.domain.ids import new_id
from app.domain.models import Conversation, Message
from app.domain.phone import mask
from app.domain.segments import count_segments
from app.store import conversations as store
from app.store import events

log = logging.getLogger("parley.inbound")


class InboundSms(msgspec.Struct, frozen=True, kw_only=True):
    from_number: str  # the customer
    to_number: str  # our number
    body: str
    provider: str
    provider_message_id: str | None = None
    raw: dict[str, Any] = {}
    # Provider-side facts the compliance filter may use (e.g. Twilio's OptOutType).
    provider_opt_out_type: str | None = None


class InboundResult(msgspec.Struct, kw_only=True):
    message: Message
    conversation: Conversation | None
    routed: bool
    duplicate: bool = False


# Hooks run after an inbound message is committed (the assistant and compliance filter plug in here).
InboundHook = Callable[[Context, InboundResult, InboundSms], Awaitable[None]]


def store_inbound(conn: sqlite3.Connection, sms: InboundSms, now_ms: int, org_id: str | None = None) -> InboundResult:
    """Persist one inbound SMS and its `sms.message_received` event in the caller's transaction."""
    if sms.provider_message_id is not None:
        existing = store.inbound_by_provider_id(conn, sms.provider, sms.provider_message_id)
        if existing is not None:
            conversation = store.get(conn, existing.conversation_id) if existing.conversation_id else None
            return InboundResult(message=existing, conversation=conversation, routed=False, duplicate=True)
    conversation = store.latest_for_pair(conn, sms.to_number, sms.from_number, org_id)
    routed = conversation is not None and conversation.status == "in_progress"
    encoding, segments = count_segments(sms.body)
    message = Message(
        id=new_id(),
        conversation_id=conversation.id if conversation else None,
        org_id=conversation.org_id if conversation else None,
        seq=store.next_message_seq(conn, conversation.id) if conversation else None,
        direction="inbound",
        author="customer",
        from_number=sms.from_number,
        to_number=sms.to_number,
        content=sms.body,
        status="received",
        provider=sms.provider,
        provider_message_id=sms.provider_message_id,
        encoding=encoding,
        segments=segments,
        created_at=now_ms,
    )
    store.insert_message(conn, message)
    if conversation is not None:
        if routed:
            lifecycle.note_activity(conn, conversation, now_ms)
        events.append(
            conn,
            "sms.message_received",
            conversation.scope,
            messaging.message_data(message, routed=routed),
            now_ms,
        )
    return InboundResult(message=message, conversation=conversation, routed=routed)


async def receive(ctx: Context, sms: InboundSms, org_id: str | None = None) -> InboundResult:
    """Store and route an inbound SMS, then run the registered hooks (assistant, compliance)."""
    result = await ctx.db.write(lambda c: store_inbound(c, sms, ctx.clock.now_ms(), org_id))
    if result.conversation is None and not result.duplicate:
        # Numbers masked to their last four digits: enough to match a complaint, not a contact list.
        log.info(
            "inbound SMS from %s to %s matched no conversation; stored unrouted",
            mask(sms.from_number),
            mask(sms.to_number),
        )
    if not result.duplicate:
        for hook in ctx.inbound_hooks:
            await hook(ctx, result, sms)
        ctx.scheduler.wake()
    return result
