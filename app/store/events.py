"""The event outbox: rows written in the same transaction as the change they describe."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from msgspec import Raw

from app.domain.events import EventScope, envelope
from app.domain.ids import new_event_id
from app.store import webhooks
from app.store.conversations import CONVERSATION_POS


def append(
    conn: sqlite3.Connection,
    event_type: str,
    scope: EventScope,
    data: dict[str, Any],
    now_ms: int,
    *,
    sequence: int | None = None,
) -> str:
    """Write one event and queue it for every subscribed webhook; a conversation's get the next gap-free `sequence`.

    A caller that already took the sequence number (in an UPDATE of the conversation it makes anyway,
    see `conversations.start`) passes it."""
    if scope.conversation_id is not None and sequence is None:
        sequence = conn.execute(
            "UPDATE conversations SET last_event_seq = last_event_seq + 1 WHERE id = ? RETURNING last_event_seq",
            (scope.conversation_id,),
        ).fetchone()[0]
    return _insert(conn, event_type, scope, sequence, data, now_ms)


def append_to_conversation(
    conn: sqlite3.Connection, event_type: str, conversation_id: str, items: Sequence[dict[str, Any]], now_ms: int
) -> list[str]:
    """Events of one type about a conversation known by id only, in order (a status report's run of changes).

    One UPDATE takes all their sequence numbers and returns the conversation's scope; the webhook
    subscriptions are looked up once. Returns the event ids (none when there is no such conversation)."""
    row = conn.execute(
        "UPDATE conversations SET last_event_seq = last_event_seq + ? WHERE id = ?"
        " RETURNING last_event_seq, org_id, agent_id, metadata",
        (len(items), conversation_id),
    ).fetchone()
    if row is None:
        return []
    last, org_id, agent_id, metadata = row
    scope = EventScope(org_id=org_id, conversation_id=conversation_id, agent_id=agent_id, metadata=Raw(metadata))
    targets = webhooks.subscribers(conn, org_id, event_type)
    first = last - len(items) + 1
    return [_insert(conn, event_type, scope, first + i, data, now_ms, targets) for i, data in enumerate(items)]


def _insert(
    conn: sqlite3.Connection,
    event_type: str,
    scope: EventScope,
    sequence: int | None,
    data: dict[str, Any],
    now_ms: int,
    targets: list[str] | None = None,
) -> str:
    event_id = new_event_id()
    payload = envelope(
        event_id=event_id, event_type=event_type, scope=scope, sequence=sequence, now_ms=now_ms, data=data
    )
    conn.execute(
        "INSERT INTO events (id, org_id, conversation_id, sequence, type, payload, created_at, conversation_pos)"
        f" VALUES (?, ?, ?, ?, ?, ?, ?, {CONVERSATION_POS})",
        (
            event_id,
            scope.org_id,
            scope.conversation_id,
            sequence,
            event_type,
            payload.decode(),
            now_ms,
            scope.conversation_id,
        ),
    )
    if targets is None:
        targets = webhooks.subscribers(conn, scope.org_id, event_type)
    webhooks.queue_deliveries(conn, targets, scope.org_id, event_id, event_type, now_ms)
    return event_id


def list_for_org(
    conn: sqlite3.Connection,
    org_id: str,
    *,
    after_pos: int,
    event_type: str | None,
    conversation_id: str | None,
    limit: int,
) -> list[sqlite3.Row]:
    sql = "SELECT pos, id, payload FROM events WHERE org_id = ? AND pos > ?"
    args: list[Any] = [org_id, after_pos]
    if event_type:
        sql += " AND type = ?"
        args.append(event_type)
    if conversation_id:
        sql += f" AND conversation_pos = {CONVERSATION_POS}"
        args.append(conversation_id)
    sql += " ORDER BY pos LIMIT ?"
    args.append(limit)
    return conn.execute(sql, args).fetchall()


def position_of(conn: sqlite3.Connection, org_id: str, event_id: str) -> int | None:
    row = conn.execute("SELECT pos FROM events WHERE id = ? AND org_id = ?", (event_id, org_id)).fetchone()
    return row[0] if row else None
