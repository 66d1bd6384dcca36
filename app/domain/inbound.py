"""Inbound SMS: stored, routed to the pair's open conversation, emitted and acted on, before it is acknowledged.

What an inbound SMS changes (a STOP's opt-out and close, the assistant turn it schedules, a confirmation or HELP
answer queued to send) is committed in the transaction that stores it: a crash keeps the message and its effects
together or neither. Only the handing of queued answers to the provider comes after the commit; a crash there
leaves a `queued` message, which start-up settles (`messaging.recover_unsent`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from app.domain import lifecycle, messaging
from app.domain.context import Context
from app.domain.ids import new_id
from app.domain.models import Conversation, Media, Message
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
    media: tuple[Media, ...] = ()  # an MMS's attachments


class InboundResult(msgspec.Struct, kw_only=True):
    message: Message
    conversation: Conversation | None
    routed: bool
    duplicate: bool = False


# Effects run in the transaction that stores an inbound message (the compliance filter, then the assistant's
# scheduling, plug in here): each may return a queued SMS of Parley's own to hand to the provider once committed.
InboundEffect = Callable[[Context, sqlite3.Connection, InboundResult, InboundSms, int], "messaging.Outgoing | None"]


class Accepted(msgspec.Struct, kw_only=True):
    result: InboundResult
    replies: list[messaging.Outgoing]  # persisted and committed, not yet handed to the provider


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
        media=sms.media,
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


def _store_and_apply(
    ctx: Context, conn: sqlite3.Connection, sms: InboundSms, org_id: str | None
) -> tuple[InboundResult, list[messaging.Outgoing]]:
    now_ms = ctx.clock.now_ms()
    result = store_inbound(conn, sms, now_ms, org_id)
    if result.duplicate:
        return result, []  # its effects were committed with its first copy
    replies = [reply for effect in ctx.inbound_effects if (reply := effect(ctx, conn, result, sms, now_ms))]
    return result, replies


async def accept(ctx: Context, sms: InboundSms, org_id: str | None = None) -> Accepted:
    """Store and route an inbound SMS and apply its effects, in one transaction; the replies it queued are left
    for the caller to hand to the provider (`send_replies`)."""
    result, replies = await ctx.db.write(lambda c: _store_and_apply(ctx, c, sms, org_id))
    if result.conversation is None and not result.duplicate:
        # Numbers masked to their last four digits: enough to match a complaint, not a contact list.
        log.info(
            "inbound SMS from %s to %s matched no conversation; stored unrouted",
            mask(sms.from_number),
            mask(sms.to_number),
        )
    if not result.duplicate:
        ctx.scheduler.wake()  # the assistant turn it may have scheduled
    return Accepted(result=result, replies=replies)


async def send_replies(ctx: Context, replies: Sequence[messaging.Outgoing]) -> None:
    """Hand the replies an inbound message queued to the provider. Never raises: the inbound message is stored
    whatever happens here, and its sender must not be told otherwise (or be led to send it again). A reply an
    unexpected error leaves `queued` is settled at the next start-up."""
    for reply in replies:
        try:
            await messaging.send_queued(ctx, reply)
        except Exception:
            log.exception(
                "could not hand an answer to an inbound message to the provider (message %s)", reply.message.id
            )


async def receive(ctx: Context, sms: InboundSms, org_id: str | None = None) -> InboundResult:
    """`accept`, then hand its replies to the provider before returning."""
    accepted = await accept(ctx, sms, org_id)
    await send_replies(ctx, accepted.replies)
    return accepted.result
