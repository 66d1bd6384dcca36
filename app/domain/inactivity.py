"""Inactivity timeouts (SPEC §3.4): the optional warning nudge, the closing message, and the close.

`lifecycle.note_activity` (re)schedules the `inactivity` job on every message with an `InactivityTimer`
payload: at the warning time when the agent has a warning, else at the deadline. Messages Parley writes
itself are not activity (`messaging._record_sent`), so the nudge and the closing message leave the timer alone.

Each step commits what it will do before the provider is asked, so that a crash never repeats it: the warning
run re-arms the job for the close and persists the nudge in one transaction, then sends it (a crash before the
send loses the nudge: start-up recovery never sends a message twice). The close run persists the closing
message and marks the timer `closing` in one transaction, sends it, then closes unless a message was sent or
received meanwhile (that re-armed the timer without the mark: a new quiet period). A crash after the mark
leaves a job due a minute later that finishes the close without sending anything again.

A close due while a message of the conversation is on its way to the provider, or whose closing message was
followed by one, looks again every 5 s until that send is taken (activity: a new quiet period) or refused, for 10
minutes at most; every run waits the same way while start-up settles a message of the conversation a stop or
crash cut off.
"""

from __future__ import annotations

import logging
import sqlite3

import msgspec

from app.domain import lifecycle, messaging
from app.domain.context import Context
from app.domain.lifecycle import InactivityTimer
from app.domain.models import Conversation
from app.domain.types import sendable_text
from app.store import agents, jobs, opt_outs
from app.store import conversations as store
from app.store.jobs import Job

log = logging.getLogger("parley.inactivity")

REASON = "inactivity_timeout"
# A close cut off after its closing message was persisted (a crash, or a provider slower than this) is finished
# by the job then, without sending anything again.
FINISH_CLOSE_AFTER_MS = 60_000
SENDING_RECHECK_MS = 5_000  # a close due while a message is on its way looks again this much later
SENDING_FOR_AT_MOST_MS = 600_000
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


async def run(ctx: Context, job: Job) -> int | None:
    """The `inactivity` job: warn, or close a conversation that stayed quiet for its timeout."""
    conversation = await ctx.db.read(lambda c: store.get(c, job.ref))
    if conversation is None or conversation.status != "in_progress":
        return None
    if conversation.id in ctx.recovering:
        # Start-up is still asking the provider about a message a stop or crash cut off: taken, it was activity.
        return ctx.clock.now_ms() + SENDING_RECHECK_MS
    timer = _timer(job, conversation)
    now = ctx.clock.now_ms()
    if timer.closing is not None:  # a close cut off after its closing message was persisted
        await _finish_close(ctx, conversation.id, timer.closing)
        return None
    if timer.warn and now < timer.deadline:
        await _warn(ctx, job, conversation, timer.deadline)
        return None
    if now < timer.deadline:
        return timer.deadline
    await _close(ctx, job, conversation, timer.deadline)
    return None


def _system_text(conn: sqlite3.Connection, conversation: Conversation, text_of: str) -> str | None:
    """The agent's warning or closing text, unless it has none or the customer opted out of this number."""
    agent = agents.by_id_any(conn, conversation.agent_id)
    text = sendable_text(getattr(agent.settings, text_of) or "") if agent is not None else None
    if text and opt_outs.contains(conn, conversation.org_id, conversation.from_number, conversation.to_number):
        log.info("inactivity %s not sent: the recipient opted out", text_of)
        return None
    return text


async def _warn(ctx: Context, job: Job, conversation: Conversation, deadline: int) -> None:
    def arm(conn: sqlite3.Connection) -> messaging.Outgoing | None:
        current = store.get_open(conn, conversation.id)
        if current is None or not jobs.is_current(conn, job):
            return None  # a message came in or went out since the claim: its new timer stands
        _arm_close(conn, current.id, deadline)
        text = _system_text(conn, current, "inactivity_warning_message")
        return messaging.queue_system(ctx, conn, current, text) if text else None

    if (outgoing := await ctx.db.write(arm)) is not None:
        await messaging.send_queued(ctx, outgoing)
    ctx.scheduler.wake()


async def _close(ctx: Context, job: Job, conversation: Conversation, deadline: int) -> None:
    def begin(conn: sqlite3.Connection) -> messaging.Outgoing | None:
        current = store.get_open(conn, conversation.id)
        if current is None or not jobs.is_current(conn, job):
            return None  # closed meanwhile, or activity since the claim pushed the deadline back
        now = ctx.clock.now_ms()
        if store.sending(conn, current.id, now - SENDING_FOR_AT_MOST_MS):
            # A message is on its way: once the provider takes it, that is activity (a new quiet period). Looked
            # at again shortly, the timer as it was (a refused message was neither sent nor received). One queued
            # for longer is not a send in flight (start-up recovery settles what a crash cut off).
            timer = InactivityTimer(deadline=deadline)
            lifecycle.schedule_inactivity(conn, current.id, timer, now + SENDING_RECHECK_MS)
            return None
        text = _system_text(conn, current, "closing_message")
        if not text:
            _closed(ctx, conn, current)
            return None
        outgoing = messaging.queue_system(ctx, conn, current, text)
        timer = InactivityTimer(deadline=deadline, closing=outgoing.message.id)
        lifecycle.schedule_inactivity(conn, current.id, timer, now + FINISH_CLOSE_AFTER_MS)
        return outgoing

    if (outgoing := await ctx.db.write(begin)) is not None:
        await messaging.send_queued(ctx, outgoing)  # a refusal is logged: the close goes ahead all the same
        await _finish_close(ctx, conversation.id, outgoing.message.id)
    ctx.scheduler.wake()


async def _finish_close(ctx: Context, conversation_id: str, closing_id: str) -> None:
    def finish(conn: sqlite3.Connection) -> None:
        current = store.get_open(conn, conversation_id)
        if current is None:
            return
        payload = jobs.payload_of(conn, lifecycle.INACTIVITY_JOB, conversation_id)
        timer = _timer_decoder.decode(payload) if payload is not None else None  # written by us: readable
        if timer is None or timer.closing != closing_id:
            return  # a message was sent or received while the closing message was on its way: a new quiet period
        closing, now = store.get_message(conn, closing_id), ctx.clock.now_ms()
        since = now - SENDING_FOR_AT_MOST_MS
        if (
            closing is not None
            and closing.seq is not None
            and store.written_after(conn, conversation_id, closing.seq, since)
        ):
            # One went out after the closing message and is still on its way: taken, it starts a new quiet period;
            # refused, the close goes ahead. Looked at again shortly, the mark kept (this may be the mark's own run).
            lifecycle.schedule_inactivity(conn, conversation_id, timer, now + SENDING_RECHECK_MS)
            return
        _closed(ctx, conn, current)

    await ctx.db.write(finish)


def _closed(ctx: Context, conn: sqlite3.Connection, conversation: Conversation) -> None:
    if lifecycle.close(conn, conversation, reason=REASON, now_ms=ctx.clock.now_ms()):
        log.info("conversation closed after inactivity")
