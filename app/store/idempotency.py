"""Idempotency keys of conversation creates: claimed while running, then holding the outcome for 24 h."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection


def get(conn: sqlite3.Connection, org_id: str, key: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT request_hash, state, outcome, expires_at FROM idempotency_keys WHERE org_id = ? AND key = ?",
        (org_id, key),
    ).fetchone()


def claim(
    conn: sqlite3.Connection,
    *,
    org_id: str,
    key: str,
    request_hash: str,
    conversation_id: str,
    now_ms: int,
    expires_at: int,
) -> bool:
    """Take the key for a new run; False when a live (unexpired) record already holds it."""
    return (
        conn.execute(
            "INSERT INTO idempotency_keys (org_id, key, request_hash, state, conversation_id, created_at,"
            " expires_at) VALUES (?, ?, ?, 'running', ?, ?, ?)"
            " ON CONFLICT (org_id, key) DO UPDATE SET request_hash = excluded.request_hash, state = 'running',"
            " outcome = NULL, conversation_id = excluded.conversation_id, created_at = excluded.created_at,"
            " expires_at = excluded.expires_at WHERE idempotency_keys.expires_at <= ?",
            (org_id, key, request_hash, conversation_id, now_ms, expires_at, now_ms),
        ).rowcount
        == 1
    )


def finish(conn: sqlite3.Connection, org_id: str, key: str, outcome: str) -> None:
    conn.execute(
        "UPDATE idempotency_keys SET state = 'done', outcome = ? WHERE org_id = ? AND key = ?",
        (outcome, org_id, key),
    )


def finish_running(conn: sqlite3.Connection, conversation_id: str, outcome: str) -> None:
    """Store the outcome of an interrupted run (start-up recovery knows the conversation, not the key)."""
    conn.execute(
        "UPDATE idempotency_keys SET state = 'done', outcome = ? WHERE conversation_id = ? AND state = 'running'",
        (outcome, conversation_id),
    )


def release_running(conn: sqlite3.Connection, conversation_id: str) -> None:
    """Free a key whose run was interrupted, so the client's retry can run."""
    conn.execute("DELETE FROM idempotency_keys WHERE conversation_id = ? AND state = 'running'", (conversation_id,))


def release_orphaned(conn: sqlite3.Connection, created_before: int | None = None, keep: Collection[str] = ()) -> int:
    """Free every key still held for a conversation that was never created: at start-up (nothing runs yet) all of
    them; while the server runs, with `created_before`, those taken before then (freeing the key failed when its
    create ended), but none whose conversation id is in `keep` (a create still running: its model still writing)."""
    return conn.execute(
        "DELETE FROM idempotency_keys WHERE state = 'running' AND created_at < ?"
        " AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.id = idempotency_keys.conversation_id)"
        " AND IFNULL(conversation_id, '') NOT IN (SELECT value FROM json_each(?))",
        (2**63 - 1 if created_before is None else created_before, json.dumps(list(keep))),
    ).rowcount


def purge_expired(conn: sqlite3.Connection, now_ms: int) -> int:
    return conn.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now_ms,)).rowcount
