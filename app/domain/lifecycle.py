"""Transitions every part of the code shares: closing a conversation and noting activity."""

from __future__ import annotations

import sqlite3

from app.clock import iso
from app.domain.models import Conversation
from app.store import conversations as store
from app.store import events, jobs

INACTIVITY_JOB = "inactivity"


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
    jobs.cancel(conn, conversation.id)
    events.append(
        conn,
        "sms.conversation_closed",
        conversation.scope,
        {"endReason": reason, "endedAt": iso(now_ms), "supersededBy": superseded_by},
        now_ms,
    )
    return True


def note_activity(conn: sqlite3.Connection, conversation: Conversation, now_ms: int) -> None:
    """A message went out or came in: push the inactivity deadline back."""
    store.touch(conn, conversation.id, now_ms)
    jobs.schedule(conn, INACTIVITY_JOB, conversation.id, now_ms + conversation.inactivity_timeout_seconds * 1000)
