"""Tool calls the model made during assistant turns: persisted on invocation, completed with the result."""

from __future__ import annotations

import sqlite3

import msgspec

COLUMNS = (
    "pos, id, conversation_id, org_id, turn_id, round, position, call_id, after_seq, assistant_content, name, kind,"
    " arguments, result, is_error, duration_ms, created_at, completed_at"
)


class ToolCall(msgspec.Struct, kw_only=True):
    """One tool call; `result` is JSON text and stays None until the call finished."""

    pos: int = 0
    id: str
    conversation_id: str
    org_id: str
    turn_id: str
    round: int
    position: int
    call_id: str
    after_seq: int
    assistant_content: str | None
    name: str
    kind: str
    arguments: str
    result: str | None = None
    is_error: bool | None = None
    duration_ms: int | None = None
    created_at: int
    completed_at: int | None = None


def _from_row(row: sqlite3.Row) -> ToolCall:
    values = {key: row[key] for key in row.keys()}  # noqa: SIM118 - sqlite3.Row is not a mapping
    if values["is_error"] is not None:
        values["is_error"] = bool(values["is_error"])
    return ToolCall(**values)


def insert(conn: sqlite3.Connection, call: ToolCall) -> ToolCall:
    pos = conn.execute(
        "INSERT INTO tool_calls (id, conversation_id, org_id, turn_id, round, position, call_id, after_seq,"
        " assistant_content, name, kind, arguments, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " RETURNING pos",
        (
            call.id,
            call.conversation_id,
            call.org_id,
            call.turn_id,
            call.round,
            call.position,
            call.call_id,
            call.after_seq,
            call.assistant_content,
            call.name,
            call.kind,
            call.arguments,
            call.created_at,
        ),
    ).fetchone()[0]
    return msgspec.structs.replace(call, pos=pos)


def complete(
    conn: sqlite3.Connection, tool_call_id: str, *, result: str, is_error: bool, duration_ms: int, now_ms: int
) -> None:
    conn.execute(
        "UPDATE tool_calls SET result = ?, is_error = ?, duration_ms = ?, completed_at = ? WHERE id = ?",
        (result, int(is_error), duration_ms, now_ms, tool_call_id),
    )


def running(conn: sqlite3.Connection) -> list[ToolCall]:
    """Tool calls started and never completed (at start-up: cut off by a stop or crash)."""
    rows = conn.execute(f"SELECT {COLUMNS} FROM tool_calls WHERE completed_at IS NULL ORDER BY pos").fetchall()
    return [_from_row(row) for row in rows]


def of_conversation(
    conn: sqlite3.Connection, conversation_id: str, *, after_pos: int = 0, limit: int = 10_000
) -> list[ToolCall]:
    """A conversation's tool calls in the order the model made them."""
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM tool_calls WHERE conversation_id = ? AND pos > ? ORDER BY pos LIMIT ?",
        (conversation_id, after_pos, limit),
    ).fetchall()
    return [_from_row(row) for row in rows]


def since_seq(conn: sqlite3.Connection, conversation_id: str, min_after_seq: int) -> list[ToolCall]:
    """Tool calls made after the model had seen message `min_after_seq` or later (for history building)."""
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM tool_calls WHERE conversation_id = ? AND after_seq >= ? ORDER BY pos",
        (conversation_id, min_after_seq),
    ).fetchall()
    return [_from_row(row) for row in rows]


# --- assistant turns (table assistant_turns, same migration) ------------------------------------------------


def record_turn(
    conn: sqlite3.Connection, turn_id: str, conversation_id: str, after_seq: int, now_ms: int, *, dropped: bool = False
) -> None:
    """A turn reached its reply, having seen the conversation up to message `after_seq`; `dropped` when a person's
    message answered those texts instead (the reply is not sent) and they are the assistant's again should that
    message fail (not for a turn that handed off: its texts stay the person's)."""
    conn.execute(
        "INSERT INTO assistant_turns (id, conversation_id, after_seq, created_at, dropped) VALUES (?, ?, ?, ?, ?)",
        (turn_id, conversation_id, after_seq, now_ms, int(dropped)),
    )


def end_call_recorded(conn: sqlite3.Connection, conversation_id: str) -> bool:
    """Whether a turn recorded its reply after the conversation's latest `end_conversation` call: the turn that made
    it, or a re-run of it after a stop or crash (which carries the end). Told by the messages each had seen, not by
    time: an earlier turn had seen fewer, since the call's turn ran for a text that earlier turn had not read."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM assistant_turns WHERE conversation_id = ?1 AND after_seq >= (SELECT after_seq"
        " FROM tool_calls WHERE conversation_id = ?1 AND kind = 'end_conversation' ORDER BY pos DESC LIMIT 1))",
        (conversation_id,),
    ).fetchone()
    return bool(row[0])


def unanswered_handoff(conn: sqlite3.Connection, conversation_id: str) -> int | None:
    """The messages the turn behind the conversation's latest `handoff_to_human` call had seen, when no turn has been
    recorded since (that turn is still running, was cut off by a stop or crash after the hand-off was committed,
    or is failing); None otherwise."""
    row = conn.execute(
        "SELECT h.after_seq FROM (SELECT after_seq FROM tool_calls WHERE conversation_id = ?1"
        " AND kind = 'handoff_to_human' AND completed_at IS NOT NULL ORDER BY pos DESC LIMIT 1) h"
        " WHERE NOT EXISTS (SELECT 1 FROM assistant_turns WHERE conversation_id = ?1 AND after_seq >= h.after_seq)",
        (conversation_id,),
    ).fetchone()
    return None if row is None else row[0]


def rounds_made(conn: sqlite3.Connection, conversation_id: str, after_seq: int) -> int:
    """The tool rounds that runs of a turn no one recorded made having read exactly up to message `after_seq`: what a
    turn cut off by a stop or crash already used of its `maxToolRounds` when it runs again for the same texts."""
    row = conn.execute(
        "SELECT COUNT(DISTINCT t.turn_id || ':' || t.round) FROM tool_calls t WHERE t.conversation_id = ? AND"
        " t.after_seq = ? AND NOT EXISTS (SELECT 1 FROM assistant_turns a WHERE a.id = t.turn_id)",
        (conversation_id, after_seq),
    ).fetchone()
    return row[0]


def set_turn_reply(conn: sqlite3.Connection, turn_id: str, message_id: str) -> None:
    conn.execute("UPDATE assistant_turns SET reply_message_id = ? WHERE id = ?", (message_id, turn_id))


def answered_seq(conn: sqlite3.Connection, conversation_id: str) -> int:
    """The last message seq a completed turn of the conversation had seen (0 before any). A turn whose reply was
    dropped for a person's message answered nothing itself: that message stands for it (`needs_reply`), as long as
    it is not known to have failed to reach the phone."""
    row = conn.execute(
        "SELECT MAX(after_seq) FROM assistant_turns WHERE conversation_id = ? AND dropped = 0", (conversation_id,)
    ).fetchone()
    return row[0] or 0


def reply_positions(conn: sqlite3.Connection, conversation_id: str, min_after_seq: int) -> dict[str, int]:
    """message id of each turn's reply -> the last message seq that turn had seen."""
    rows = conn.execute(
        "SELECT reply_message_id, after_seq FROM assistant_turns"
        " WHERE conversation_id = ? AND after_seq >= ? AND reply_message_id IS NOT NULL",
        (conversation_id, min_after_seq),
    ).fetchall()
    return {row[0]: row[1] for row in rows}
