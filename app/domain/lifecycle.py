"""Transitions every part of the code shares: closing a conversation and noting activity."""

from __future__ import annotations

import sqlite3

import msgspec

from app.clock import iso
from app.domain.agents import Agent
from app.domain.errors import Conflict
from app.domain.models import Conversation, Message
from app.domain.status import UNSENT
from app.store import agents, events, jobs
from app.store import conversations as store

INACTIVITY_JOB = "inactivity"
TURN_JOB = "assistant_turn"
# Every job kind whose `ref` is a conversation id: closing a conversation cancels them all. Naming the
# kinds lets the delete use the jobs' (kind, ref) key; by `ref` alone it would scan every job.
CONVERSATION_JOBS = (INACTIVITY_JOB, TURN_JOB)


class InactivityTimer(msgspec.Struct, frozen=True, kw_only=True):
    """The `inactivity` job's payload: the quiet period's deadline, and whether this run is the warning."""

    deadline: int
    warn: bool = False
    # The close is under way: its closing message (this id) is persisted. Any message sent or received since
    # re-arms the timer without it (a new quiet period); while it is still here, the close goes ahead.
    closing: str | None = None


def ensure_in_progress(conversation: Conversation, closed: str) -> None:
    """409 unless the conversation is in progress: `conversation_pending` while its opening SMS is on its way
    (it is in progress a moment later, or closed if the send fails), else `conversation_closed` with `closed`."""
    if conversation.status == "pending":
        raise Conflict(
            "conversation_pending",
            "The conversation's opening message is still being sent; try again once it is in progress.",
        )
    if conversation.status != "in_progress":
        raise Conflict("conversation_closed", closed)


def inactivity_warning_seconds(
    conn: sqlite3.Connection, conversation: Conversation, agent: Agent | None = None
) -> int | None:
    """The agent's warning lead time, when it has a warning that fits inside this conversation's timeout.

    Read from `agent` when the caller has it loaded already, else from the database."""
    if agent is None:
        lead = agents.inactivity_warning(conn, conversation.agent_id)
    else:
        lead = agent.settings.warning_lead_seconds
    return lead if lead is not None and 0 < lead < conversation.inactivity_timeout_seconds else None


def close(
    conn: sqlite3.Connection,
    conversation: Conversation,
    *,
    reason: str,
    now_ms: int,
    superseded_by: str | None = None,
) -> bool:
    """Close an open conversation, cancel its timers and pending turns, and emit the event."""
    if not store.close(conn, conversation.id, reason=reason, now_ms=now_ms, superseded_by=superseded_by):
        return False
    jobs.cancel(conn, conversation.id, CONVERSATION_JOBS)
    events.append(
        conn,
        "sms.conversation_closed",
        conversation.scope,
        {"endReason": reason, "endedAt": iso(now_ms), "supersededBy": superseded_by},
        now_ms,
    )
    return True


def note_activity(conn: sqlite3.Connection, conversation: Conversation, now_ms: int) -> int:
    """A message went out or came in: push the inactivity deadline (and the warning before it) back.

    Returns when the `inactivity` job is now due."""
    store.touch(conn, conversation.id, now_ms)
    return arm_inactivity(conn, conversation, now_ms)


def note_status(conn: sqlite3.Connection, message: Message, new_status: str, now_ms: int) -> None:
    """An outbound message moved to `new_status`. When a person's (an operator's) message turns out not to reach
    the phone (`status.UNSENT`), it answered nothing: the customer's texts it stood for are the assistant's again,
    so the conversation's turn runs (it decides what is left unanswered), unless the conversation is closed or
    handed to a person."""
    if message.author != "operator" or new_status not in UNSENT or message.status in UNSENT:
        return
    conversation = store.get_open(conn, message.conversation_id) if message.conversation_id else None
    if conversation is not None and not conversation.assistant_paused:
        jobs.run_soon(conn, TURN_JOB, conversation.id, now_ms)


def arm_inactivity(
    conn: sqlite3.Connection, conversation: Conversation, now_ms: int, agent: Agent | None = None
) -> int:
    """(Re)schedule the `inactivity` job for activity at `now_ms` (already recorded on the conversation);
    `agent` is the conversation's agent when the caller has it loaded."""
    deadline = now_ms + conversation.inactivity_timeout_seconds * 1000
    lead = inactivity_warning_seconds(conn, conversation, agent)
    due = deadline - lead * 1000 if lead is not None else deadline
    schedule_inactivity(conn, conversation.id, InactivityTimer(deadline=deadline, warn=lead is not None), due)
    return due


def schedule_inactivity(conn: sqlite3.Connection, conversation_id: str, timer: InactivityTimer, due: int) -> None:
    """(Re)schedule the conversation's `inactivity` job to run at `due` with this timer."""
    jobs.schedule(conn, INACTIVITY_JOB, conversation_id, due, msgspec.json.encode(timer).decode())
