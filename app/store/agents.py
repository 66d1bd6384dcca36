"""Agents, managed and custom."""

from __future__ import annotations

import functools
import sqlite3

from app.domain.agents import Agent, AgentSettings, settings_decoder, settings_encoder
from app.domain.rotation import PreviousSecret, decode_previous, encode_previous
from app.store.secrets import forget_expired, forget_expired_sql

COLUMNS = "id, kind, slug, org_id, config, tool_secret, previous_tool_secrets, created_at, updated_at"


@functools.lru_cache(maxsize=256)
def _settings(config: str) -> AgentSettings:
    """Decoded settings, memoised by their stored JSON (AgentSettings is frozen, so sharing is safe):
    every create reads its agent, and agents change rarely."""
    return settings_decoder.decode(config)


def _agent(row: sqlite3.Row | None) -> Agent | None:
    """A row selected with COLUMNS, in that order."""
    if row is None:
        return None
    return Agent(
        id=row[0],
        kind=row[1],
        slug=row[2],
        org_id=row[3],
        settings=_settings(row[4]),
        tool_secret=row[5],
        previous_tool_secrets=decode_previous(row[6]),
        created_at=row[7],
        updated_at=row[8],
    )


def by_slug(conn: sqlite3.Connection, slug: str) -> Agent | None:
    return _agent(
        conn.execute(
            f"SELECT {COLUMNS} FROM agents WHERE slug = ? AND kind = 'managed' AND deleted_at IS NULL",
            (slug,),
        ).fetchone()
    )


def by_id(conn: sqlite3.Connection, agent_id: str, org_id: str) -> Agent | None:
    """A managed agent, or a custom agent of this org."""
    return _agent(
        conn.execute(
            f"SELECT {COLUMNS} FROM agents WHERE id = ? AND deleted_at IS NULL AND (kind = 'managed' OR org_id = ?)",
            (agent_id, org_id),
        ).fetchone()
    )


def by_id_any(conn: sqlite3.Connection, agent_id: str) -> Agent | None:
    """Any agent, deleted or not (for conversations that already use it)."""
    return _agent(conn.execute(f"SELECT {COLUMNS} FROM agents WHERE id = ?", (agent_id,)).fetchone())


def list_visible(conn: sqlite3.Connection, org_id: str, *, after: tuple[int, str] | None, limit: int) -> list[Agent]:
    sql = f"SELECT {COLUMNS} FROM agents WHERE deleted_at IS NULL AND (kind = 'managed' OR org_id = ?)"
    args: list[object] = [org_id]
    if after is not None:
        sql += " AND (created_at, id) > (?, ?)"
        args.extend(after)
    sql += " ORDER BY created_at, id LIMIT ?"
    args.append(limit)
    return [a for a in map(_agent, conn.execute(sql, args).fetchall()) if a is not None]


def list_managed(conn: sqlite3.Connection) -> list[Agent]:
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM agents WHERE kind = 'managed' AND deleted_at IS NULL ORDER BY slug"
    ).fetchall()
    return [a for a in map(_agent, rows) if a is not None]


def insert(
    conn: sqlite3.Connection,
    *,
    agent_id: str,
    kind: str,
    slug: str | None,
    org_id: str | None,
    settings: AgentSettings,
    tool_secret: str,
    now_ms: int,
) -> None:
    conn.execute(
        "INSERT INTO agents (id, kind, slug, org_id, config, tool_secret, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            agent_id,
            kind,
            slug,
            org_id,
            settings_encoder.encode(settings).decode(),
            tool_secret,
            now_ms,
            now_ms,
        ),
    )


def update_settings(
    conn: sqlite3.Connection, agent_id: str, settings: AgentSettings, now_ms: int, *, only_if_changed: bool = False
) -> None:
    """Store `settings` (and undelete); with `only_if_changed`, leave an agent already so untouched."""
    sql = "UPDATE agents SET config = ?1, updated_at = ?2, deleted_at = NULL WHERE id = ?3"
    if only_if_changed:
        sql += " AND (config IS NOT ?1 OR deleted_at IS NOT NULL)"
    conn.execute(sql, (settings_encoder.encode(settings).decode(), now_ms, agent_id))


def set_tool_secret(
    conn: sqlite3.Connection,
    agent_id: str,
    secret: str,
    previous: list[PreviousSecret],
    now_ms: int,
) -> None:
    conn.execute(
        "UPDATE agents SET tool_secret = ?, previous_tool_secrets = ?, updated_at = ? WHERE id = ?",
        (secret, encode_previous(previous), now_ms, agent_id),
    )


def soft_delete(conn: sqlite3.Connection, agent_id: str, now_ms: int) -> None:
    conn.execute(  # once: a retired agent keeps its retirement time through later syncs
        "UPDATE agents SET deleted_at = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL",
        (now_ms, now_ms, agent_id),
    )


def managed_slugs(conn: sqlite3.Connection) -> dict[str, tuple[str, str]]:
    """slug -> (id, tool_secret) of every managed agent, deleted ones included."""
    return {
        row[0]: (row[1], row[2])
        for row in conn.execute("SELECT slug, id, tool_secret FROM agents WHERE kind = 'managed'")
    }


def slugs_of(conn: sqlite3.Connection, agent_ids: set[str]) -> dict[str, str | None]:
    if not agent_ids:
        return {}
    marks = ",".join("?" * len(agent_ids))
    rows = conn.execute(f"SELECT id, slug FROM agents WHERE id IN ({marks})", tuple(agent_ids)).fetchall()
    return {row[0]: row[1] for row in rows}


def inactivity_warning(conn: sqlite3.Connection, agent_id: str) -> int | None:
    """The agent's inactivity-warning lead time in seconds (`AgentSettings.warning_lead_seconds`).

    Reads only the stored settings, decoded once per distinct JSON (`_settings`): this runs for every message."""
    row = conn.execute("SELECT config FROM agents WHERE id = ?", (agent_id,)).fetchone()
    return _settings(row[0]).warning_lead_seconds if row else None


_FORGET_EXPIRED = forget_expired_sql("agents", "previous_tool_secrets")


def forget_expired_tool_secrets(conn: sqlite3.Connection, now_ms: int) -> int:
    """Drop the rotated-away tool secrets whose 24 h overlap has ended; return how many agents had one."""
    return forget_expired(conn, _FORGET_EXPIRED, now_ms)
