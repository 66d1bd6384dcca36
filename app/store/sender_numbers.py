"""Sender numbers and the organization each belongs to: the first to send from a number owns it."""

from __future__ import annotations

import sqlite3


def claim(conn: sqlite3.Connection, number: str, org_id: str, now_ms: int) -> tuple[str, bool]:
    """Make `number` `org_id`'s unless an organization owns it already; return its owner and whether the owner has
    sent from it (one point read once the number has one)."""
    row = conn.execute("SELECT org_id, sent_at FROM sender_numbers WHERE number = ?", (number,)).fetchone()
    if row is not None:
        return row[0], row[1] is not None
    conn.execute("INSERT INTO sender_numbers (number, org_id, created_at) VALUES (?, ?, ?)", (number, org_id, now_ms))
    return org_id, False


def mark_sent(conn: sqlite3.Connection, number: str, org_id: str, now_ms: int) -> None:
    """The owner sent from `number` (the provider took a message): its claim is for good."""
    conn.execute(
        "UPDATE sender_numbers SET sent_at = ? WHERE number = ? AND org_id = ? AND sent_at IS NULL",
        (now_ms, number, org_id),
    )


def release_unused(conn: sqlite3.Connection, number: str, org_id: str) -> bool:
    """Give back `org_id`'s claim on `number` when it never sent from it and nothing of its own holds it: no live
    custom agent has it as its number, and no create from it is still in flight (`pending`). True if released."""
    released = conn.execute(
        "DELETE FROM sender_numbers WHERE number = ?1 AND org_id = ?2 AND sent_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM agents WHERE org_id = ?2 AND kind = 'custom' AND deleted_at IS NULL"
        " AND json_extract(config, '$.phoneNumber') = ?1)"
        " AND NOT EXISTS (SELECT 1 FROM conversations WHERE status = 'pending' AND org_id = ?2 AND from_number = ?1)",
        (number, org_id),
    )
    return released.rowcount > 0
