"""Sender numbers and the organization each belongs to: the first to send from a number owns it."""

from __future__ import annotations

import sqlite3


def claim(conn: sqlite3.Connection, number: str, org_id: str, now_ms: int) -> str:
    """Make `number` `org_id`'s unless an organization owns it already; return its owner (one point read once
    the number has one)."""
    row = conn.execute("SELECT org_id FROM sender_numbers WHERE number = ?", (number,)).fetchone()
    if row is not None:
        return row[0]
    conn.execute("INSERT INTO sender_numbers (number, org_id, created_at) VALUES (?, ?, ?)", (number, org_id, now_ms))
    return org_id
