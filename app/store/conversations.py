"""Conversations and their messages."""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from app.domain.models import Conversation, Media, Message
from app.domain.status import UNSENT

_json = msgspec.json.Encoder()
_vars = msgspec.json.Decoder(dict[str, str])
_meta = msgspec.json.Decoder(dict[str, Any])
_media = msgspec.json.Decoder(tuple[Media, ...])

CONVERSATION_COLUMNS = (
    "id, org_id, agent_id, status, from_number, to_number, dynamic_variables, metadata,"
    " inactivity_timeout_seconds, created_at, last_activity_at, ended_at, end_reason, superseded_by,"
    " assistant_paused, message_count"
)
MESSAGE_COLUMNS = (
    "id, conversation_id, org_id, seq, direction, author, from_number, to_number, content, status, provider,"
    " provider_message_id, error_code, encoding, segments, created_at, sent_at, delivered_at, keyword, media"
)
# The same, qualified for a join that names the messages table `m`.
_MESSAGE_COLUMNS_OF_M = ", ".join(f"m.{name.strip()}" for name in MESSAGE_COLUMNS.split(","))
# A conversation's `pos` by its id (NULL for none): messages and events are indexed under it (migration 0007),
# so a new conversation's rows append to those indexes instead of landing at a random place.
CONVERSATION_POS = "(SELECT pos FROM conversations WHERE id = ?)"


def conversation_from_row(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row[0],
        org_id=row[1],
        agent_id=row[2],
        status=row[3],
        from_number=row[4],
        to_number=row[5],
        dynamic_variables=_vars.decode(row[6]),
        metadata=_meta.decode(row[7]),
        inactivity_timeout_seconds=row[8],
        created_at=row[9],
        last_activity_at=row[10],
        ended_at=row[11],
        end_reason=row[12],
        superseded_by=row[13],
        assistant_paused=bool(row[14]),
        message_count=row[15],
    )


def message_from_row(row: sqlite3.Row) -> Message:
    """A row selected with MESSAGE_COLUMNS, in that order."""
    return Message(
        id=row[0],
        conversation_id=row[1],
        org_id=row[2],
        seq=row[3],
        direction=row[4],
        author=row[5],
        from_number=row[6],
        to_number=row[7],
        content=row[8],
        status=row[9],
        provider=row[10],
        provider_message_id=row[11],
        error_code=row[12],
        encoding=row[13],
        segments=row[14],
        created_at=row[15],
        sent_at=row[16],
        delivered_at=row[17],
        keyword=row[18],
        media=_media.decode(row[19]) if row[19] else (),
    )


def get(conn: sqlite3.Connection, conversation_id: str, org_id: str | None = None) -> Conversation | None:
    if org_id is None:
        row = conn.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
    else:
        row = conn.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ? AND org_id = ?",
            (conversation_id, org_id),
        ).fetchone()
    return conversation_from_row(row) if row else None


def get_open(conn: sqlite3.Connection, conversation_id: str) -> Conversation | None:
    """The conversation as it is now, when it is still in progress (None when closed or gone)."""
    conversation = get(conn, conversation_id)
    return conversation if conversation is not None and conversation.status == "in_progress" else None


def insert(conn: sqlite3.Connection, c: Conversation) -> None:
    """A new conversation; its `message_count` messages (the opening one, if counted) hold seq 1..count.

    It takes the next `pos`, the integer its messages and events are indexed under (see CONVERSATION_POS)."""
    conn.execute(
        f"INSERT INTO conversations ({CONVERSATION_COLUMNS}, last_message_seq, pos)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
        " (SELECT IFNULL(MAX(pos), 0) + 1 FROM conversations))",
        (
            c.id,
            c.org_id,
            c.agent_id,
            c.status,
            c.from_number,
            c.to_number,
            _json.encode(c.dynamic_variables).decode(),
            _json.encode(c.metadata).decode(),
            c.inactivity_timeout_seconds,
            c.created_at,
            c.last_activity_at,
            c.ended_at,
            c.end_reason,
            c.superseded_by,
            int(c.assistant_paused),
            c.message_count,
            c.message_count,
        ),
    )


def list_for_org(
    conn: sqlite3.Connection,
    org_id: str,
    *,
    status: str | None,
    agent_id: str | None,
    to_number: str | None,
    from_number: str | None,
    before: tuple[int, str] | None,
    limit: int,
) -> list[Conversation]:
    sql = f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE org_id = ?"
    args: list[Any] = [org_id]
    if status == "closed":
        sql += " AND status = 'closed'"
    elif status == "in_progress":
        sql += " AND status IN ('pending', 'in_progress')"
    for column, value in (("agent_id", agent_id), ("to_number", to_number), ("from_number", from_number)):
        if value is not None:
            sql += f" AND {column} = ?"
            args.append(value)
    if before is not None:
        sql += " AND (created_at, id) < (?, ?)"
        args.extend(before)
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    args.append(limit)
    return [conversation_from_row(row) for row in conn.execute(sql, args)]


def open_for_pair(conn: sqlite3.Connection, from_number: str, to_number: str) -> list[Conversation]:
    rows = conn.execute(
        f"SELECT {CONVERSATION_COLUMNS} FROM conversations"
        " WHERE from_number = ? AND to_number = ? AND status = 'in_progress'",
        (from_number, to_number),
    ).fetchall()
    return [conversation_from_row(row) for row in rows]


def latest_for_pair(
    conn: sqlite3.Connection, from_number: str, to_number: str, org_id: str | None = None
) -> Conversation | None:
    sql = f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE from_number = ? AND to_number = ?"
    args: list[Any] = [from_number, to_number]
    if org_id is not None:
        sql += " AND org_id = ?"
        args.append(org_id)
    sql += " ORDER BY (status = 'in_progress') DESC, created_at DESC, id DESC LIMIT 1"
    row = conn.execute(sql, args).fetchone()
    return conversation_from_row(row) if row else None


def interrupted_creates(conn: sqlite3.Connection, created_before: int | None = None) -> list[Conversation]:
    """At start-up, the conversations of creates a stop or crash cut off: those still `pending`, and any other
    whose Idempotency-Key its create still holds (closed while its opening was on its way). With `created_before`,
    only those created before then (while the server runs, older than any create in flight)."""
    before = "" if created_before is None else " AND created_at < :before"
    rows = conn.execute(
        f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE status = 'pending'{before}"
        f" UNION SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id IN"
        f" (SELECT conversation_id FROM idempotency_keys WHERE state = 'running'){before}",
        {"before": created_before},
    ).fetchall()
    return [conversation_from_row(row) for row in rows]


def start(conn: sqlite3.Connection, conversation_id: str, now_ms: int) -> int | None:
    """A pending conversation's opening message went out: mark it in progress (and active now), and take
    the event sequence number of that `sms.message_sent` in the same UPDATE. None: it was not pending."""
    row = conn.execute(
        "UPDATE conversations SET status = 'in_progress', last_activity_at = ?, last_event_seq = last_event_seq + 1"
        " WHERE id = ? AND status = 'pending' RETURNING last_event_seq",
        (now_ms, conversation_id),
    ).fetchone()
    return row[0] if row else None


def close(
    conn: sqlite3.Connection,
    conversation_id: str,
    *,
    reason: str,
    now_ms: int,
    superseded_by: str | None = None,
) -> bool:
    """Close an open conversation; False when it was already closed."""
    return (
        conn.execute(
            "UPDATE conversations SET status = 'closed', ended_at = ?, end_reason = ?, superseded_by = ?"
            " WHERE id = ? AND status != 'closed'",
            (now_ms, reason, superseded_by, conversation_id),
        ).rowcount
        == 1
    )


def set_end_requested(conn: sqlite3.Connection, conversation_id: str, at_ms: int | None) -> None:
    """The model asked to end the conversation once its turn's reply is sent (None: no longer)."""
    conn.execute("UPDATE conversations SET end_requested_at = ? WHERE id = ?", (at_ms, conversation_id))


def end_requested(conn: sqlite3.Connection, conversation_id: str) -> bool:
    row = conn.execute("SELECT end_requested_at FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
    return row is not None and row[0] is not None


def set_paused(conn: sqlite3.Connection, conversation_id: str, paused: bool) -> None:
    conn.execute("UPDATE conversations SET assistant_paused = ? WHERE id = ?", (int(paused), conversation_id))


def touch(conn: sqlite3.Connection, conversation_id: str, now_ms: int) -> None:
    conn.execute("UPDATE conversations SET last_activity_at = ? WHERE id = ?", (now_ms, conversation_id))


def next_message_seq(conn: sqlite3.Connection, conversation_id: str) -> int:
    return conn.execute(
        "UPDATE conversations SET last_message_seq = last_message_seq + 1, message_count = message_count + 1"
        " WHERE id = ? RETURNING last_message_seq",
        (conversation_id,),
    ).fetchone()[0]


def insert_message(conn: sqlite3.Connection, m: Message) -> None:
    conn.execute(
        f"INSERT INTO messages ({MESSAGE_COLUMNS}, updated_at, conversation_pos)"
        f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {CONVERSATION_POS})",
        (
            m.id,
            m.conversation_id,
            m.org_id,
            m.seq,
            m.direction,
            m.author,
            m.from_number,
            m.to_number,
            m.content,
            m.status,
            m.provider,
            m.provider_message_id,
            m.error_code,
            m.encoding,
            m.segments,
            m.created_at,
            m.sent_at,
            m.delivered_at,
            m.keyword,
            _json.encode(m.media).decode() if m.media else None,
            m.created_at,
            m.conversation_id,
        ),
    )


def set_keyword(conn: sqlite3.Connection, message_id: str, action: str) -> None:
    conn.execute("UPDATE messages SET keyword = ? WHERE id = ?", (action, message_id))


def get_message(conn: sqlite3.Connection, message_id: str) -> Message | None:
    row = conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
    return message_from_row(row) if row else None


def message_by_provider_id(conn: sqlite3.Connection, provider_message_id: str) -> Message | None:
    row = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE provider_message_id = ? AND direction = 'outbound'",
        (provider_message_id,),
    ).fetchone()
    return message_from_row(row) if row else None


def inbound_by_provider_id(conn: sqlite3.Connection, provider: str, provider_message_id: str) -> Message | None:
    row = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages"
        " WHERE provider = ? AND provider_message_id = ? AND direction = 'inbound'",
        (provider, provider_message_id),
    ).fetchone()
    return message_from_row(row) if row else None


def messages_of(conn: sqlite3.Connection, conversation_id: str, *, after_seq: int, limit: int) -> list[Message]:
    rows = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_pos = {CONVERSATION_POS} AND seq > ?"
        " ORDER BY seq LIMIT ?",
        (conversation_id, after_seq, limit),
    ).fetchall()
    return [message_from_row(row) for row in rows]


def _has_message(conn: sqlite3.Connection, conversation_id: str, condition: str, *params: object) -> bool:
    """Whether a message of the conversation meets `condition` (SQL on `messages`, with `params`)."""
    row = conn.execute(
        f"SELECT 1 FROM messages WHERE conversation_pos = {CONVERSATION_POS} AND {condition} LIMIT 1",
        (conversation_id, *params),
    ).fetchone()
    return row is not None


# Not a message known not to have reached the phone.
_NOT_UNSENT = "status NOT IN (" + ", ".join(f"'{name}'" for name in sorted(UNSENT)) + ")"
# An outbound message persisted whose send has had no answer yet (inbound messages are never `queued`).
_UNANSWERED = "status = 'queued' AND provider_message_id IS NULL"


def sending(conn: sqlite3.Connection, conversation_id: str, since_ms: int) -> bool:
    """Whether an outbound message of the conversation persisted since `since_ms` is on its way to the provider
    (no answer yet)."""
    return _has_message(conn, conversation_id, f"{_UNANSWERED} AND created_at > ?", since_ms)


def written_after(conn: sqlite3.Connection, conversation_id: str, seq: int, since_ms: int) -> bool:
    """Whether a message was sent, is on its way (persisted since `since_ms`), or was received after message `seq`
    (one the provider refused was neither), other than Parley's own (`author: system`)."""
    condition = f"seq > ? AND status != 'failed' AND author != 'system' AND NOT ({_UNANSWERED} AND created_at <= ?)"
    return _has_message(conn, conversation_id, condition, seq, since_ms)


def operator_wrote_after(conn: sqlite3.Connection, conversation_id: str, seq: int) -> bool:
    """Whether a person (an operator message) wrote in the conversation after message `seq`: one known not to have
    reached the phone (`status.UNSENT`) answered nothing."""
    return _has_message(
        conn, conversation_id, f"seq > ? AND direction = 'outbound' AND author = 'operator' AND {_NOT_UNSENT}", seq
    )


def set_provider_id(
    conn: sqlite3.Connection, message_id: str, provider_message_id: str, sent_at: int, now_ms: int
) -> tuple[str, int] | None:
    """Record the provider's id and the send time (unless a status report that overtook the send's answer
    recorded one first); return the message's status and send time (None: no such message)."""
    return conn.execute(
        "UPDATE messages SET provider_message_id = ?, sent_at = COALESCE(sent_at, ?), updated_at = ? WHERE id = ?"
        " RETURNING status, sent_at",
        (provider_message_id, sent_at, now_ms, message_id),
    ).fetchone()


def update_message(conn: sqlite3.Connection, message_id: str, now_ms: int, **fields: Any) -> None:
    assignments = ", ".join(f"{name} = ?" for name in fields)
    conn.execute(
        f"UPDATE messages SET {assignments}, updated_at = ? WHERE id = ?",
        (*fields.values(), now_ms, message_id),
    )


def received_by_number(conn: sqlite3.Connection, org_id: str, number: str, limit: int) -> list[Message]:
    """Outbound messages a provider accepted for `number`, oldest first (the last `limit`).

    Found through the org's conversations to `number` (every outbound message is filed under one, and
    goes to its toNumber): no index of messages by number is kept for this one listing."""
    rows = conn.execute(
        f"SELECT * FROM (SELECT {_MESSAGE_COLUMNS_OF_M}"
        " FROM conversations c JOIN messages m ON m.conversation_pos = c.pos"
        " WHERE c.to_number = ? AND c.org_id = ? AND m.direction = 'outbound' AND m.provider_message_id IS NOT NULL"
        " ORDER BY m.created_at DESC, m.rowid DESC LIMIT ?) ORDER BY created_at, seq",
        (number, org_id, limit),
    ).fetchall()
    return [message_from_row(row) for row in rows]


def unfinished_outbound(conn: sqlite3.Connection, older_than: int, limit: int) -> list[Message]:
    rows = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE status IN ('queued', 'sent') AND updated_at < ?"
        " AND direction = 'outbound' AND provider_message_id IS NOT NULL ORDER BY updated_at LIMIT ?",
        (older_than, limit),
    ).fetchall()
    return [message_from_row(row) for row in rows]


def unsent_outbound(conn: sqlite3.Connection, created_before: int | None = None) -> list[Message]:
    """Outbound messages persisted but never recorded as taken by a provider, oldest first: at start-up, the ones
    a stop or crash cut off between persist and the send's outcome (found through the unfinished-status index). With
    `created_before`, only those persisted before then (nothing changes such a message's `updated_at`, the index's
    key, so it is the time it was persisted)."""
    before = "" if created_before is None else " AND updated_at < :before"
    rows = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages INDEXED BY messages_unfinished WHERE status IN ('queued', 'sent')"
        f"{before} AND status = 'queued' AND direction = 'outbound' AND provider_message_id IS NULL"
        " ORDER BY created_at",
        {"before": created_before},
    ).fetchall()
    return [message_from_row(row) for row in rows]


def provider_ids_for_pair(conn: sqlite3.Connection, message: Message, since_ms: int) -> set[str]:
    """Provider ids recorded for the other outbound messages of `message`'s pair created since `since_ms`."""
    rows = conn.execute(
        "SELECT m.provider_message_id FROM conversations c JOIN messages m ON m.conversation_pos = c.pos"
        " WHERE c.from_number = ? AND c.to_number = ? AND m.direction = 'outbound'"
        " AND m.provider_message_id IS NOT NULL AND m.created_at >= ? AND m.id != ?",
        (message.from_number, message.to_number, since_ms, message.id),
    ).fetchall()
    return {row[0] for row in rows}


def insert_status_reports(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Keep raw provider reports: (message_id, provider, provider_message_id, provider_status, error_code,
    raw, applied, received_at) each."""
    conn.executemany(
        "INSERT INTO status_reports (message_id, provider, provider_message_id, provider_status, error_code,"
        " raw, applied, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def defer_status_lookup(conn: sqlite3.Connection, message_id: str, base_ms: int) -> None:
    """For a message still `queued`/`sent`, `updated_at` is also when its wait for the next status look-up starts
    (`unfinished_outbound`): set it to `base_ms`, which may lie ahead to space the look-ups out."""
    conn.execute("UPDATE messages SET updated_at = ? WHERE id = ?", (base_ms, message_id))
