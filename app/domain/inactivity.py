"""Inactivity timeouts (SPEC §3.4): the optional warning nudge, the closing message, and the close.

`lifecycle.note_activity` (re)schedules the `inactivity` job on every message with an `InactivityTimer`
payload: at the warning time when the agent has a warning, else at the deadline. The warning run sends the
nudge and re-arms the job for the same deadline; the close run sends the closing message and closes with
`inactivity_timeout`. Messages Parley sends itself also count as activity in `note_activity`, so after the
nudge the deadline is put back where it was, unless someone really wrote in the meantime.
"""

from __future__ import annotations

import logging
import sqlite3

import msgspec

from app.domain import lifecycle, messaging
from app.domain.context import Context
from app.domain.errors import Conflict, NotFound, ProviderFailed
from app.domain.lifecycle import InactivityTimer
from app.domain.models import Conversation, Message
from app.store import agents, jobs
from app.store import conversations as store
from app.store.jobs import Job

log = logging.getLogger("parley.inactivity")

REASON = "inactivity_timeout"
_timer_decoder = msgspec.json.Decoder(InactivityTimer)


def _timer(job: Job, conversation: Conversation) -> InactivityTimer:
    if job.payload:
        try:
            return _timer_decoder.decode(job.payload)
        except msgspec.DecodeError:
            log.warning("unreadable inactivity payload for a conversation; closing on its last activity")
    return InactivityTimer(deadline=conversation.last_activity_at + conversation.inactivity_timeout_seconds * 1000)


def _arm_close(conn: sqlite3.Connection, conversation_id: str, deadline: int) -> None:
    lifecycle.schedule_inactivity(conn, conversation_id, InactivityTimer(deadline=deadline), deadline)


def _written_since(conn: sqlite3.Connection, conversation_id: str, after_seq: int, own: Message) -> bool:
    """True when a message other than `own` was sent or received after message `after_seq` (one the provider
    refused was neither). Sending `own` re-armed the timer itself, so the timer cannot tell."""
    later = store.messages_of(conn, conversation_id, after_seq=after_seq, limit=100)
    return any(message.id != own.id and message.status != "failed" for message in later)


async def _send_system(ctx: Context, conversation: Conversation, content: str, what: str) -> Message | None:
    """Send a message of Parley's own; a refusal (opt-out, provider rejection, closed) is logged, not raised."""
    try:
        return await messaging.send_in_conversation(ctx, conversation.id, conversation.org_id, content, "system")
    except (ProviderFailed, Conflict, NotFound) as exc:
        log.info("inactivity %s not sent: %s", what, exc.message)
        return None


async def run(ctx: Context, job: Job) -> int | None:
    """The `inactivity` job: warn, or close a conversation that stayed quiet for its timeout."""
    conversation = await ctx.db.read(lambda c: store.get(c, job.ref))
    if conversation is None or conversation.status != "in_progress":
        return None
    timer = _timer(job, conversation)
    now = ctx.clock.now_ms()
    if timer.warn and now < timer.deadline:
        await _warn(ctx, job, conversation, timer.deadline)
        return None
    if now < timer.deadline:
        return timer.deadline
    await _close(ctx, job, conversation)
    return None


async def _warn(ctx: Context, job: Job, conversation: Conversation, deadline: int) -> None:
    def arm(conn: sqlite3.Connection) -> str | None:
        if not jobs.is_current(conn, job):
            return None  # a message came in or went out since the claim: its new timer stands
        agent = agents.by_id_any(conn, conversation.agent_id)
        # Re-armed for the close before sending, so a crash mid-send cannot nudge the customer twice.
        _arm_close(conn, conversation.id, deadline)
        return agent.settings.inactivity_warning_message if agent is not None else None

    text = await ctx.db.write(arm)
    if text:
        sent = await _send_system(ctx, conversation, text, "warning")
        if sent is not None:

            def restore(conn: sqlite3.Connection) -> None:
                current = store.get_open(conn, conversation.id)
                assert sent.seq is not None
                if current is not None and not _written_since(conn, current.id, sent.seq, sent):
                    _arm_close(conn, current.id, deadline)

            await ctx.db.write(restore)
    ctx.scheduler.wake()


async def _close(ctx: Context, job: Job, conversation: Conversation) -> None:
    agent = await ctx.db.read(lambda c: agents.by_id_any(c, conversation.agent_id))
    closing = agent.settings.closing_message if agent is not None else None
    sent = None
    if closing:
        if not await ctx.db.read(lambda c: jobs.is_current(c, job)):
            return  # activity since the claim pushed the deadline back
        sent = await _send_system(ctx, conversation, closing, "closing message")

    def close(conn: sqlite3.Connection) -> bool:
        current = store.get_open(conn, conversation.id)
        if current is None:
            return False
        if sent is None and not jobs.is_current(conn, job):
            return False  # a message arrived while we looked: not quiet after all
        if sent is not None and _written_since(conn, conversation.id, conversation.message_count, sent):
            return False  # the customer (or someone) wrote while the closing message was on its way: a new quiet period
        return lifecycle.close(conn, current, reason=REASON, now_ms=ctx.clock.now_ms())

    if await ctx.db.write(close):
        log.info("conversation closed after inactivity")
