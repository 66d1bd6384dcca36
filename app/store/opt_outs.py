"""The opt-out list: (org, our number, the customer's number) pairs that must not be texted."""

from __future__ import annotations

import sqlite3


def add(
    conn: sqlite3.Connection, org_id: str, sender_number: str, phone_number: str, keyword: str, now_ms: int
) -> bool:
    """Put the pair on the list; False when it already was."""
    return (
        conn.execute(
            "INSERT INTO opt_outs (org_id, sender_number, phone_number, keyword, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (org_id, sender_number, phone_number) DO NOTHING",
            (org_id, sender_number, phone_number, keyword, now_ms),
        ).rowcount
        == 1
    )


def remove(conn: sqlite3.Connection, org_id: str, sender_number: str, phone_number: str) -> bool:
    """Take the pair off the list; False when it was not on it."""
    return (
        conn.execute(
            "DELETE FROM opt_outs WHERE org_id = ? AND sender_number = ? AND phone_number = ?",
            (org_id, sender_number, phone_number),
        ).rowcount
        == 1
    )


def contains(conn: sqlite3.Connection, org_id: str, sender_number: str, phone_number: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM opt_outs WHERE org_id = ? AND sender_number = ? AND phone_number = ?",
            (org_id, sender_number, phone_number),
        ).fetchone()
        is not None
    )
