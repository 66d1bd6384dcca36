"""Rotated-away signing secrets (webhook endpoints' and agents' tool secrets), as stored: a JSON array of
{"secret", "until"}, newest first (`app.domain.rotation`)."""

from __future__ import annotations

import sqlite3


def forget_expired_sql(table: str, column: str) -> str:
    """The statement that drops, from every `table` row's `column`, the secrets whose overlap has ended (a secret
    that signs nothing is not kept), the others in their order; bound: now (ms), twice. `table` and `column` are
    the callers' constants."""
    return (
        f"UPDATE {table} SET {column} = (SELECT json_group_array(json(value)) FROM (SELECT value FROM"
        f" json_each({table}.{column}) WHERE json_extract(value, '$.until') > ? ORDER BY key))"
        f" WHERE {column} != '[]' AND EXISTS"
        f" (SELECT 1 FROM json_each({table}.{column}) WHERE json_extract(value, '$.until') <= ?)"
    )


def forget_expired(conn: sqlite3.Connection, statement: str, now_ms: int) -> int:
    """Run a `forget_expired_sql` statement; return how many rows had a secret to forget."""
    return conn.execute(statement, (now_ms, now_ms)).rowcount
