"""Agent administration: syncing managed agents from agents.toml and the custom-agent CRUD."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping

from app.domain import senders
from app.domain.agents import (
    Agent,
    AgentPatch,
    AgentSettings,
    apply_patch,
    check_settings,
    load_agents_file,
    resolve_secret,
    settings_of,
)
from app.domain.errors import NotFound
from app.domain.ids import new_id, new_signing_secret, parse_uuid
from app.domain.rotation import after_rotation
from app.store import agents as store
from app.store import sender_numbers

log = logging.getLogger("parley.agents")


def sync_managed(
    conn: sqlite3.Connection, path: str, now_ms: int, dotenv: Mapping[str, str] | None = None
) -> list[str]:
    """Upsert every agent of agents.toml by slug; retire managed agents no longer listed. `dotenv`: what `.env`
    set, for `toolSecret = "env:NAME"`."""
    entries = load_agents_file(path)
    known = store.managed_slugs(conn)
    for entry in entries:
        settings = settings_of(entry)
        secret = resolve_secret(entry.tool_secret, slug=entry.slug, dotenv=dotenv)
        if entry.slug in known:
            agent_id, current_secret = known[entry.slug]
            # Unchanged (every start syncs): its updatedAt stays what it was.
            store.update_settings(conn, agent_id, settings, now_ms, only_if_changed=True)
            if secret is not None and secret != current_secret:
                # A rotation like `rotate-tool-secret`: the secret it replaces keeps signing beside it for 24 h, so
                # agents.toml and the tool server need not change at the same moment.
                agent = store.by_id_any(conn, agent_id)
                # A secret switched back to one rotated away lately signs as the current one, not twice.
                kept = [p for p in (agent.previous_tool_secrets if agent is not None else []) if p.secret != secret]
                store.set_tool_secret(conn, agent_id, secret, after_rotation(kept, current_secret, now_ms), now_ms)
        else:
            store.insert(
                conn,
                agent_id=new_id(),
                kind="managed",
                slug=entry.slug,
                org_id=None,
                settings=settings,
                tool_secret=secret or new_signing_secret(),
                now_ms=now_ms,
            )
    listed = {entry.slug for entry in entries}
    for slug, (agent_id, _) in known.items():
        if slug not in listed:
            store.soft_delete(conn, agent_id, now_ms)
    return sorted(listed)


def create_custom(conn: sqlite3.Connection, org_id: str, settings: AgentSettings, now_ms: int) -> Agent:
    check_settings(settings, kind="custom")
    if settings.phone_number is not None:
        senders.ensure_own(conn, org_id, settings.phone_number, now_ms, field="phoneNumber")
    agent_id = new_id()
    store.insert(
        conn,
        agent_id=agent_id,
        kind="custom",
        slug=None,
        org_id=org_id,
        settings=settings,
        tool_secret=new_signing_secret(),
        now_ms=now_ms,
    )
    agent = store.by_id(conn, agent_id, org_id)
    assert agent is not None
    return agent


def get_visible(conn: sqlite3.Connection, org_id: str, agent_id: str) -> Agent:
    canonical = parse_uuid(agent_id)
    agent = store.by_id(conn, canonical, org_id) if canonical else None
    if agent is None:
        raise NotFound("Agent not found.")
    return agent


def get_own(conn: sqlite3.Connection, org_id: str, agent_id: str) -> Agent:
    """A custom agent of this org; managed agents are read-only through the API."""
    agent = get_visible(conn, org_id, agent_id)
    if agent.kind != "custom":
        raise NotFound("Agent not found among this organization's custom agents (managed agents are read-only).")
    return agent


def update_custom(conn: sqlite3.Connection, org_id: str, agent_id: str, patch: AgentPatch, now_ms: int) -> Agent:
    agent = get_own(conn, org_id, agent_id)
    settings = apply_patch(agent.settings, patch)
    check_settings(settings, kind="custom", stored=agent.settings)
    renumbered = settings.phone_number != agent.settings.phone_number
    if renumbered and settings.phone_number is not None:
        senders.ensure_own(conn, org_id, settings.phone_number, now_ms, field="phoneNumber")
    store.update_settings(conn, agent.id, settings, now_ms)
    if renumbered and agent.settings.phone_number is not None:
        sender_numbers.release_unused(conn, agent.settings.phone_number, org_id, now_ms)
    updated = store.by_id(conn, agent.id, org_id)
    assert updated is not None
    return updated


def delete_custom(conn: sqlite3.Connection, org_id: str, agent_id: str, now_ms: int) -> None:
    agent = get_own(conn, org_id, agent_id)
    store.soft_delete(conn, agent.id, now_ms)
    if agent.settings.phone_number is not None:
        sender_numbers.release_unused(conn, agent.settings.phone_number, org_id, now_ms)


def rotate_tool_secret(conn: sqlite3.Connection, org_id: str, agent_id: str, now_ms: int) -> tuple[Agent, str]:
    """A new tool secret; the current one, like every other rotated away within the last 24 hours, keeps
    signing beside it until 24 hours after its own rotation."""
    agent = get_own(conn, org_id, agent_id)
    secret = new_signing_secret()
    previous = after_rotation(agent.previous_tool_secrets, agent.tool_secret, now_ms)
    store.set_tool_secret(conn, agent.id, secret, previous, now_ms)
    updated = store.by_id(conn, agent.id, org_id)
    assert updated is not None
    return updated, secret
