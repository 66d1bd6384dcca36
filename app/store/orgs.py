"""Organizations and API keys."""

from __future__ import annotations

import sqlite3

from app.domain.ids import new_id


def get_or_create_org(conn: sqlite3.Connection, name: str, now_ms: int) -> str:
    row = conn.execute("SELECT id FROM orgs WHERE name = ?", (name,)).fetchone()
    if row:
        return row[0]
    org_id = new_id()
    conn.execute("INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)", (org_id, name, now_ms))
    return org_id


def find_org(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT id FROM orgs WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def insert_key(
    conn: sqlite3.Connection,
    *,
    key_id: str,
    org_id: str,
    name: str,
    key_hash: str,
    key_prefix: str,
    expires_at: int | None,
    now_ms: int,
) -> None:
    conn.execute(
        "INSERT INTO api_keys (id, org_id, name, key_hash, key_prefix, expires_at, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (key_id, org_id, name, key_hash, key_prefix, expires_at, now_ms),
    )


def key_by_hash(conn: sqlite3.Connection, key_hash: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT id, org_id, expires_at, revoked_at FROM api_keys WHERE key_hash = ?", (key_hash,)
    ).fetchone()


def list_keys(
    conn: sqlite3.Connection, org_id: str, *, after: tuple[int, str] | None = None, limit: int = -1
) -> list[sqlite3.Row]:
    """The org's keys, oldest first: all of them, or `limit` after the (created_at, id) `after`."""
    sql = "SELECT id, name, key_prefix, expires_at, created_at, revoked_at FROM api_keys WHERE org_id = ?"
    args: list[object] = [org_id]
    if after is not None:
        sql += " AND (created_at, id) > (?, ?)"
        args.extend(after)
    return conn.execute(sql + " ORDER BY created_at, id LIMIT ?", (*args, limit)).fetchall()


def get_key(conn: sqlite3.Connection, key_id: str, org_id: str | None = None) -> sqlite3.Row | None:
    sql = "SELECT id, org_id, name, key_prefix, expires_at, created_at, revoked_at FROM api_keys WHERE id = ?"
    args: tuple[str, ...] = (key_id,)
    if org_id is not None:
        sql += " AND org_id = ?"
        args = (key_id, org_id)
    return conn.execute(sql, args).fetchone()


def revoke_key(conn: sqlite3.Connection, key_id: str, now_ms: int) -> None:
    conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now_ms, key_id))
