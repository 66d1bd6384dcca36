"""The store: migrations, group commit and its isolation, and start-up recovery."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app.clock import FakeClock
from app.config import ConfigError, load_settings
from app.domain import conversations, messaging
from app.domain.ids import new_signing_secret
from app.providers.base import SendAccepted, SendRequest, StatusReport
from app.providers.simulator import SimulatorProvider
from app.store.db import Database, connect_sync, write_sync
from app.store.migrate import MIGRATIONS_DIR, MigrationError, migrate, migration_files
from tests.assistant_support import call_tool, open_conversation, signers, webhook_tool
from tests.conftest import start_harness
from tests.fake_llm import FakeLLM, FakeToolServer
from tests.provider_doubles import BreaksOnNth, HangingProvider, SimulatorHolding
from tests.seed import SEED_CREATE
from tests.webhook_receiver import Receiver, emit, eventually


def schema(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return [
        tuple(row)
        for row in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]


def test_migration_numbers_are_unique_and_named() -> None:
    files = migration_files()
    numbers = [n for n, _ in files]
    assert numbers == sorted(set(numbers))
    assert numbers[0] == 1


def test_a_fresh_database_equals_every_file_applied_and_migrate_is_rerunnable(tmp_path: Path) -> None:
    conn = connect_sync(str(tmp_path / "a.db"))
    applied = migrate(conn)
    assert applied == [n for n, _ in migration_files()]
    assert migrate(conn) == []
    by_hand = sqlite3.connect(str(tmp_path / "b.db"), isolation_level=None)
    by_hand.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
    )
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        by_hand.executescript(path.read_text())
    assert schema(conn) == schema(by_hand)


def test_a_failing_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_ok.sql").write_text("CREATE TABLE a (x);")
    (migrations / "0002_broken.sql").write_text("CREATE TABLE b (x); INSERT INTO nowhere VALUES (1);")
    conn = connect_sync(str(tmp_path / "m.db"))
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, migrations)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "a" in tables and "b" not in tables
    assert [row[0] for row in conn.execute("SELECT version FROM schema_migrations")] == [1]


def database_at(tmp_path: Path, last: int) -> sqlite3.Connection:
    """`parley.db` in `tmp_path` as an earlier release left it: migrations up to number `last` applied."""
    previous = tmp_path / "previous-migrations"
    previous.mkdir()
    for number, path in migration_files():
        if number <= last:
            (previous / path.name).write_text(path.read_text())
    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn, previous)
    return conn


async def test_migration_0007_numbers_existing_conversations_and_keeps_their_messages_and_events(
    tmp_path: Path,
) -> None:
    """A database the previous release left (migrations up to 0006) is upgraded at start-up: its conversations
    get `pos` in creation order, their messages and events carry it, and the API lists them as before."""
    conn = database_at(tmp_path, 6)
    conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org-1', 'acme', 0)")
    conn.execute(
        "INSERT INTO agents (id, kind, slug, org_id, config, tool_secret, created_at, updated_at)"
        " VALUES ('00000000-0000-4000-8000-00000000000a', 'custom', NULL, 'org-1', '{\"name\":\"Old\"}', 's', 0, 0)"
    )
    old_ids = ["11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"]
    for n, cid in enumerate(old_ids, start=1):
        conn.execute(
            "INSERT INTO conversations (id, org_id, agent_id, status, from_number, to_number, dynamic_variables,"
            " metadata, inactivity_timeout_seconds, created_at, last_activity_at, ended_at, end_reason,"
            " message_count, last_message_seq, last_event_seq)"
            " VALUES (?, 'org-1', '00000000-0000-4000-8000-00000000000a', 'closed', '+15555550123', ?, '{}', '{}',"
            " 3600, ?, ?, ?, 'admin_closed', 2, 2, 1)",
            (cid, f"+1555555010{n}", n, n, n),
        )
        for seq in (1, 2):
            conn.execute(
                "INSERT INTO messages (id, conversation_id, org_id, seq, direction, author, from_number, to_number,"
                " content, status, provider, encoding, segments, created_at, updated_at)"
                " VALUES (?, ?, 'org-1', ?, 'outbound', 'agent', '+15555550123', ?, ?, 'delivered', 'simulator',"
                " 'GSM-7', 1, ?, ?)",
                (f"{cid[:-1]}{seq}", cid, seq, f"+1555555010{n}", f"message {seq} of {n}", n, n),
            )
        conn.execute(
            "INSERT INTO events (id, org_id, conversation_id, sequence, type, payload, created_at)"
            " VALUES (?, 'org-1', ?, 1, 'sms.conversation_closed', ?, ?)",
            (f"evt_old{n}", cid, f'{{"id":"evt_old{n}"}}', n),
        )
    conn.close()

    async with start_harness(tmp_path) as h:
        numbered = h.rows("SELECT id, pos FROM conversations ORDER BY pos")
        assert [(r["id"], r["pos"]) for r in numbered] == [(old_ids[0], 1), (old_ids[1], 2)]
        carried = h.rows("SELECT DISTINCT conversation_id, conversation_pos FROM messages ORDER BY conversation_pos")
        assert [tuple(r) for r in carried] == [(old_ids[0], 1), (old_ids[1], 2)]
        for n, cid in enumerate(old_ids, start=1):
            listed = (await h.get(f"/v1/sms-conversations/{cid}/messages")).json()["data"]
            assert [m["content"] for m in listed] == [f"message 1 of {n}", f"message 2 of {n}"]
            logged = (await h.get("/v1/events", conversationId=cid)).json()["data"]
            assert [e["id"] for e in logged] == [f"evt_old{n}"]
        created = await h.post("/v1/sms-conversations", SEED_CREATE)
        assert created.status_code == 201
        new_id = created.json()["data"]["conversationId"]
        assert h.rows("SELECT pos FROM conversations WHERE id = ?", new_id)[0]["pos"] == 3
        assert len((await h.get(f"/v1/sms-conversations/{new_id}/messages")).json()["data"]) == 1
        assert len((await h.get("/v1/events", conversationId=new_id)).json()["data"]) >= 1


async def test_migration_0008_carries_a_webhooks_previous_secret_into_the_list_and_it_keeps_signing(
    tmp_path: Path,
) -> None:
    """A database the previous release left (migrations up to 0007) with a rotation in its overlap: the
    previous secret becomes the list's one entry, with its expiry, and signs beside the current one, and
    beside a newer one after another rotation; the old columns are gone."""
    clock = FakeClock()
    s0, s1 = new_signing_secret(), new_signing_secret()
    until = clock.now_ms() + 12 * 3_600_000
    rotated_id, plain_id = "33333333-3333-4333-8333-333333333333", "44444444-4444-4444-8444-444444444444"
    with Receiver() as receiver:
        conn = database_at(tmp_path, 7)
        conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org-1', 'acme', 0)")
        conn.execute(
            "INSERT INTO webhooks (id, org_id, url, events, is_active, secret, previous_secret, previous_secret_until,"
            " created_at, updated_at) VALUES (?, 'org-1', ?, '[\"*\"]', 1, ?, ?, ?, 0, 0)",
            (rotated_id, receiver.url, s1, s0, until),
        )
        conn.execute(
            "INSERT INTO webhooks (id, org_id, url, events, is_active, secret, created_at, updated_at)"
            " VALUES (?, 'org-1', ?, '[\"*\"]', 0, ?, 0, 0)",
            (plain_id, receiver.url, new_signing_secret()),
        )
        conn.close()

        async with start_harness(tmp_path, clock=clock) as h:
            columns = {row["name"] for row in h.rows("PRAGMA table_info(webhooks)")}
            assert "previous_secrets" in columns
            assert not columns & {"previous_secret", "previous_secret_until"}
            stored = {row["id"]: json.loads(row["previous_secrets"]) for row in h.rows("SELECT * FROM webhooks")}
            assert stored == {rotated_id: [{"secret": s0, "until": until}], plain_id: []}

            receiver.secrets = [s1, s0]
            await emit(h)
            (record,) = await receiver.wait_count(1)
            assert len(record.signatures()) == 2
            assert record.verified_by == [s1, s0]

            rotated = await h.post(f"/v1/webhooks/{rotated_id}/rotate-secret")
            assert rotated.status_code == 200
            s2 = rotated.json()["data"]["secret"]
            receiver.secrets = [s2, s1, s0]
            await emit(h)
            received = await receiver.wait_count(2)
            assert received[1].verified_by == [s2, s1, s0]


def test_a_managed_agents_tool_secret_changed_in_the_agents_file_keeps_the_old_one_signing_for_a_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like `rotate-tool-secret`: agents.toml and the tool server need not change at the same moment."""
    from app.domain import agent_registry
    from app.store import agents as agents_store

    path = tmp_path / "agents.toml"
    path.write_text('[[agents]]\nslug = "tooling"\nname = "Tooling"\nsystemPrompt = "Hi."\ntoolSecret = "env:TOOL_S"\n')
    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)
    s0, s1, s2 = new_signing_secret(), new_signing_secret(), new_signing_secret()
    hour = 3_600_000
    for now, secret in ((0, s0), (hour, s1), (2 * hour, s2), (3 * hour, s2)):  # the last sync changes nothing
        monkeypatch.setenv("TOOL_S", secret)
        agent_registry.sync_managed(conn, str(path), now)
    (agent_id,) = [row[0] for row in conn.execute("SELECT id FROM agents WHERE slug = 'tooling'")]
    agent = agents_store.by_id_any(conn, agent_id)
    assert agent is not None
    assert agent.signing_secrets(3 * hour) == [s2, s1, s0]
    assert agent.signing_secrets(hour + 24 * hour + 1) == [s2, s1]  # s0 was replaced at hour 1
    monkeypatch.setenv("TOOL_S", s1)  # switched back: s1 signs once, as the current secret
    agent_registry.sync_managed(conn, str(path), 4 * hour)
    agent = agents_store.by_id_any(conn, agent_id)
    assert agent is not None
    assert agent.signing_secrets(4 * hour) == [s1, s2, s0]
    conn.close()


def test_syncing_an_unchanged_agents_file_leaves_updated_at_alone_and_a_change_or_relisting_moves_it(
    tmp_path: Path,
) -> None:
    """Every start syncs agents.toml: an agent it does not change keeps its `updatedAt`."""
    from app.domain import agent_registry

    path = tmp_path / "agents.toml"
    listed = '[[agents]]\nslug = "steady"\nname = "Steady"\nsystemPrompt = "Hi."\n'
    path.write_text(listed)
    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)

    def updated_at() -> tuple[int, int | None]:
        return tuple(conn.execute("SELECT updated_at, deleted_at FROM agents WHERE slug = 'steady'").fetchone())

    agent_registry.sync_managed(conn, str(path), 1)
    agent_registry.sync_managed(conn, str(path), 2)
    assert updated_at() == (1, None)
    path.write_text(listed.replace("Hi.", "Hello."))
    agent_registry.sync_managed(conn, str(path), 3)
    assert updated_at() == (3, None)
    path.write_text("agents = []\n")
    agent_registry.sync_managed(conn, str(path), 4)
    agent_registry.sync_managed(conn, str(path), 5)  # still retired: it keeps its retirement time
    assert updated_at() == (4, 4)
    path.write_text(listed.replace("Hi.", "Hello."))  # listed again, unchanged: back, as of now
    agent_registry.sync_managed(conn, str(path), 6)
    assert updated_at() == (6, None)
    conn.close()


async def test_migration_0009_carries_an_agents_previous_tool_secret_into_the_list_and_it_keeps_signing(
    tmp_path: Path,
) -> None:
    """A database migrated up to 0008 with a tool-secret rotation in its overlap: the previous secret becomes
    the list's one entry, with its expiry, and signs the tool server's request beside the current one, and
    beside a newer one after another rotation; the old columns are gone."""
    clock = FakeClock()
    s0, s1 = new_signing_secret(), new_signing_secret()
    until = clock.now_ms() + 12 * 3_600_000
    rotated_id, plain_id = "55555555-5555-4555-8555-555555555555", "66666666-6666-4666-8666-666666666666"
    with FakeLLM() as llm, FakeToolServer() as tool_server:
        config = json.dumps({"name": "Old", "replyDebounceMs": 0, "tools": [webhook_tool(tool_server.url)]})
        conn = database_at(tmp_path, 8)
        conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org-1', 'acme', 0)")
        conn.execute(
            "INSERT INTO agents (id, kind, slug, org_id, config, tool_secret, previous_tool_secret,"
            " previous_tool_secret_until, created_at, updated_at)"
            " VALUES (?, 'custom', NULL, 'org-1', ?, ?, ?, ?, 0, 0)",
            (rotated_id, config, s1, s0, until),
        )
        conn.execute(
            "INSERT INTO agents (id, kind, slug, org_id, config, tool_secret, created_at, updated_at)"
            " VALUES (?, 'custom', NULL, 'org-1', '{\"name\":\"Plain\"}', ?, 0, 0)",
            (plain_id, new_signing_secret()),
        )
        conn.close()

        async with start_harness(tmp_path, clock=clock, llm_base_url=llm.base_url, llm_model="test-model") as h:
            columns = {row["name"] for row in h.rows("PRAGMA table_info(agents)")}
            assert "previous_tool_secrets" in columns
            assert not columns & {"previous_tool_secret", "previous_tool_secret_until"}
            stored = {
                row["id"]: json.loads(row["previous_tool_secrets"])
                for row in h.rows("SELECT id, previous_tool_secrets FROM agents WHERE kind = 'custom'")
            }
            assert stored == {rotated_id: [{"secret": s0, "until": until}], plain_id: []}

            conversation_id = await open_conversation(h, {"agentId": rotated_id})
            assert signers(await call_tool(h, llm, tool_server, conversation_id), [s0, s1]) == [s1, s0]

            rotated = await h.post(f"/v1/agents/{rotated_id}/rotate-tool-secret")
            assert rotated.status_code == 200
            s2 = rotated.json()["data"]["toolSecret"]
            call = await call_tool(h, llm, tool_server, conversation_id)
            assert signers(call, [s0, s1, s2]) == [s2, s1, s0]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """An open Database on a fresh file, with a scratch table `t (x INTEGER PRIMARY KEY, body TEXT)`."""
    database = Database(str(tmp_path / "store.db"))
    await database.open()
    try:
        await database.write(lambda c: c.execute("CREATE TABLE t (x INTEGER PRIMARY KEY, body TEXT)"))
        yield database
    finally:
        await database.close()


async def test_migration_0010_gives_each_number_to_the_one_organization_that_used_it(tmp_path: Path) -> None:
    """Numbers one organization sent from (or gave its custom agent) become its own; a number two organizations
    both sent from stays unowned until one of them sends from it again."""
    acme_only, shared, globex_agent = "+15555550130", "+15555550131", "+15555550132"
    conn = database_at(tmp_path, 9)
    conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org-1', 'acme', 0), ('org-2', 'globex', 0)")
    conn.execute(
        "INSERT INTO agents (id, kind, slug, org_id, config, tool_secret, created_at, updated_at) VALUES"
        " ('00000000-0000-4000-8000-00000000000a', 'custom', NULL, 'org-1', '{\"name\":\"A\"}', 's', 0, 0),"
        " ('00000000-0000-4000-8000-00000000000b', 'custom', NULL, 'org-2', ?, 's', 0, 0)",
        (json.dumps({"name": "B", "phoneNumber": globex_agent}),),
    )
    for n, (org, number) in enumerate([("org-1", acme_only), ("org-1", shared), ("org-2", shared)], start=1):
        conn.execute(
            "INSERT INTO conversations (id, org_id, agent_id, status, from_number, to_number, dynamic_variables,"
            " metadata, inactivity_timeout_seconds, created_at, last_activity_at, ended_at, end_reason,"
            " message_count, last_message_seq, last_event_seq)"
            " VALUES (?, ?, '00000000-0000-4000-8000-00000000000a', 'closed', ?, '+15555550199', '{}', '{}',"
            " 3600, ?, ?, ?, 'admin_closed', 0, 0, 0)",
            (f"11111111-1111-4111-8111-11111111111{n}", org, number, n, n, n),
        )
    conn.close()

    async with start_harness(tmp_path) as h:
        owners = {row["number"]: row["org_id"] for row in h.rows("SELECT number, org_id FROM sender_numbers")}
        assert owners == {acme_only: "org-1", globex_agent: "org-2"}
        assert (
            await h.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": acme_only}, org="globex")
        ).status_code == 400
        assert (await h.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": globex_agent})).status_code == 400
        assert (
            await h.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": shared}, org="globex")
        ).status_code == 201
        assert (await h.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": shared})).status_code == 400


async def test_migration_0017_keeps_numbers_sent_from_or_held_by_an_agent_and_gives_back_the_rest(
    tmp_path: Path,
) -> None:
    """Before 0017 a refused create, or an agent deleted since, kept its number for good: such claims are given
    back; a number its owner sent from (or may have: a failed opening the provider took, or whose outcome it could
    not say), or a live custom agent of its owner holds, stays the owner's."""
    sent, refused_only, agent_held, deleted_agent = "+15555550150", "+15555550151", "+15555550152", "+15555550153"
    unknown_outcome, taken_then_failed = "+15555550154", "+15555550155"
    conn = database_at(tmp_path, 16)
    conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org-1', 'acme', 0), ('org-2', 'globex', 0)")
    conn.execute(
        "INSERT INTO agents (id, kind, slug, org_id, config, tool_secret, created_at, updated_at, deleted_at) VALUES"
        " ('00000000-0000-4000-8000-00000000000a', 'custom', NULL, 'org-2', ?, 's', 0, 0, NULL),"
        " ('00000000-0000-4000-8000-00000000000b', 'custom', NULL, 'org-2', ?, 's', 0, 0, 5)",
        (json.dumps({"name": "A", "phoneNumber": agent_held}), json.dumps({"name": "B", "phoneNumber": deleted_agent})),
    )
    openings = [
        (sent, "admin_closed", "delivered", None, "SMa"),
        (refused_only, "opening_message_failed", "failed", "21211", None),
        (unknown_outcome, "opening_message_failed", "failed", "provider_outcome_unknown", None),
        (taken_then_failed, "opening_message_failed", "failed", "parley_interrupted", "SMb"),
    ]
    for n, (number, reason, status, error_code, provider_id) in enumerate(openings, 1):
        conversation_id = f"11111111-1111-4111-8111-11111111111{n}"
        conn.execute(
            "INSERT INTO conversations (id, org_id, agent_id, status, from_number, to_number, dynamic_variables,"
            " metadata, inactivity_timeout_seconds, created_at, last_activity_at, ended_at, end_reason,"
            " message_count, last_message_seq, last_event_seq, pos)"
            " VALUES (?, 'org-2', '00000000-0000-4000-8000-00000000000a', 'closed', ?, '+15555550199', '{}', '{}',"
            " 3600, ?, ?, ?, ?, 1, 1, 0, ?)",
            (conversation_id, number, n, n, n, reason, n),
        )
        conn.execute(
            "INSERT INTO messages (id, conversation_id, org_id, seq, direction, author, from_number, to_number,"
            " content, status, provider, provider_message_id, error_code, encoding, segments, created_at,"
            " updated_at, conversation_pos)"
            " VALUES (?, ?, 'org-2', 1, 'outbound', 'agent', ?, '+15555550199', 'Hi', ?, 'simulator', ?, ?,"
            " 'GSM-7', 1, ?, ?, ?)",
            (
                f"22222222-2222-4222-8222-22222222222{n}",
                conversation_id,
                number,
                status,
                provider_id,
                error_code,
                n,
                n,
                n,
            ),
        )
    conn.executemany(
        "INSERT INTO sender_numbers (number, org_id, created_at) VALUES (?, 'org-2', 1)",
        [(number,) for number in (sent, refused_only, agent_held, deleted_agent, unknown_outcome, taken_then_failed)],
    )
    conn.close()

    async with start_harness(tmp_path) as h:
        rows = {row["number"]: row["sent_at"] for row in h.rows("SELECT number, sent_at FROM sender_numbers")}
        assert rows == {sent: 1, unknown_outcome: 1, taken_then_failed: 1, agent_held: None}
        for number, status in [
            (sent, 400),
            (unknown_outcome, 400),
            (taken_then_failed, 400),
            (agent_held, 400),
            (refused_only, 201),
            (deleted_agent, 201),
        ]:
            answer = await h.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": number})
            assert answer.status_code == status, (number, answer.text)


def test_a_database_a_newer_version_migrated_is_refused_not_misread(tmp_path: Path) -> None:
    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)
    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, '9999_from_the_future')")
    with pytest.raises(MigrationError, match="newer version of Parley"):
        migrate(conn)
    conn.close()


def test_a_migration_another_process_applied_meanwhile_is_skipped(tmp_path: Path) -> None:
    """Two processes start on an old database at once: the second, which read the list of applied migrations
    before the first applied 0017, waits for the write lock and then finds 0017 recorded instead of failing."""
    database_at(tmp_path, 16).close()
    first = connect_sync(str(tmp_path / "parley.db"))
    first.execute("BEGIN IMMEDIATE")
    outcome: list[object] = []
    second = threading.Thread(target=lambda: outcome.append(_migrate_or_error(str(tmp_path / "parley.db"))))
    second.start()
    time.sleep(0.3)  # the second has read the applied list and waits for the lock
    first.execute("ALTER TABLE sender_numbers ADD COLUMN sent_at INTEGER")
    first.execute("INSERT INTO schema_migrations (version, name) VALUES (17, '0017_sender_numbers_sent')")
    first.execute("COMMIT")
    second.join(15)
    assert outcome == [[n for n, _ in migration_files() if n > 17]]
    first.close()


def test_a_new_database_switched_to_wal_while_another_process_writes_it_waits_instead_of_failing(
    tmp_path: Path,
) -> None:
    """Switching a file to WAL does not wait for a lock as other statements do: two processes starting on a brand-new
    database at once refused the second ("database is locked"), in about one start in five."""
    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x INTEGER)")
    other.execute("BEGIN IMMEDIATE")  # another process, in the middle of its own first write
    later = threading.Timer(0.3, lambda: other.execute("ROLLBACK"))
    later.start()

    conn = connect_sync(str(path))

    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    later.join()
    other.close()


def _migrate_or_error(path: str) -> object:
    conn = connect_sync(path)
    try:
        return migrate(conn)
    except Exception as exc:
        return exc
    finally:
        conn.close()


async def test_an_unowned_number_another_organization_has_open_conversations_from_is_not_taken(
    harness: Any,
) -> None:
    """A number two organizations shared before migration 0010 has no owner; while one of them still has a
    conversation open from it, the other's create would supersede it: refused until that one closes."""
    shared = "+15555550160"
    opened = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": shared}, org="globex")
    assert opened.status_code == 201, opened.text
    await harness.ctx.db.write(lambda c: c.execute("DELETE FROM sender_numbers WHERE number = ?", (shared,)))

    refused = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": shared})
    assert refused.status_code == 400, refused.text
    globex_conversation = opened.json()["data"]["conversationId"]
    assert (await harness.get(f"/v1/sms-conversations/{globex_conversation}", org="globex")).json()["data"][
        "status"
    ] == "in_progress"

    closed = await harness.post(f"/v1/sms-conversations/{globex_conversation}/close", org="globex")
    assert closed.status_code == 200
    taken = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": shared})
    assert taken.status_code == 201, taken.text


def plan_of(conn: sqlite3.Connection, run: Callable[[], object]) -> str:
    """SQLite's query plan for the first statement `run` executes on `conn`, with its values bound."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        run()
    finally:
        conn.set_trace_callback(None)
    return " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statements[0]))


def test_only_messages_a_provider_took_are_in_the_provider_id_index(tmp_path: Path) -> None:
    """Every outbound message is inserted before a provider takes it: the index skips those rows, and the
    look-ups by provider id (a status report's message) still use it."""
    from app.store import conversations as store

    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)
    partial = {row["name"]: row["partial"] for row in conn.execute("PRAGMA index_list(messages)")}
    assert partial["messages_provider_id"] == 1
    plan = plan_of(conn, lambda: store.message_by_provider_id(conn, "SM0001"))
    assert "USING INDEX messages_provider_id" in plan
    conn.close()


def test_the_delivery_log_pages_on_an_index_and_pending_look_ups_keep_the_pending_only_one(tmp_path: Path) -> None:
    """Newest first from the cursor, on an index: not every delivery of the endpoint read and sorted per page."""
    from app.store import webhooks

    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)
    for status in (None, "failed"):
        plan = plan_of(
            conn, lambda s=status: webhooks.list_deliveries(conn, "w-1", before_rowid=10, status=s, limit=20)
        )
        assert "USING INDEX webhook_deliveries_by_endpoint" in plan and "TEMP B-TREE" not in plan, plan
    # The look-ups of what is pending stay on the pending-only index, not the endpoint's whole log.
    for run in (
        lambda: webhooks.next_due(conn, "w-1"),
        lambda: webhooks.fail_pending(conn, "w-1", 0),
        lambda: webhooks.claim_due(conn, "w-1", 0, 4, 1000),
    ):
        plan = plan_of(conn, run)
        assert "INDEX webhook_deliveries_due" in plan, plan
    conn.close()


def test_giving_a_number_back_reads_only_recent_unfinished_messages_and_a_new_number_only_open_conversations(
    tmp_path: Path,
) -> None:
    """Messages a carrier never reported on stay `sent` for good: the look-up for a send in flight reads the recent
    ones only, on the unfinished-messages index by its key; a fresh claim's look-up for another organization's open
    conversations is on the open-pair index."""
    from app.store import sender_numbers

    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)
    plan = plan_of(conn, lambda: sender_numbers.release_unused(conn, "+15555550123", "org-1", 10**12))
    assert "INDEX messages_unfinished (updated_at>?)" in plan, plan
    conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org-1', 'acme', 0)")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    sender_numbers.claim(conn, "+15555550124", "org-1", 0)
    conn.set_trace_callback(None)
    (looking,) = [sql for sql in statements if "FROM conversations" in sql]
    others = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + looking))
    assert "conversations_one_open_per_pair" in others, others
    conn.close()


def test_an_early_status_report_marks_its_number_sent_from(tmp_path: Path) -> None:
    """The provider's status callback overtook the send's own answer: the provider took a message from the
    number, so its organization's claim is for good even before the create records the send."""
    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)
    conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org-1', 'acme', 0)")
    conn.execute("INSERT INTO sender_numbers (number, org_id, created_at) VALUES ('+15555550123', 'org-1', 0)")
    conn.execute(
        "INSERT INTO messages (id, conversation_id, org_id, seq, direction, author, from_number, to_number, content,"
        " status, provider, encoding, segments, created_at, updated_at)"
        " VALUES ('m-1', NULL, 'org-1', NULL, 'outbound', 'operator', '+15555550123', '+15555550199', 'Hi',"
        " 'queued', 'simulator', 'GSM-7', 1, 0, 0)"
    )
    report = StatusReport(provider_message_id="SMx", provider_status="sent", message_id="m-1", error_code=None, raw={})
    write_sync(conn, lambda c: messaging.apply_reports(c, [report], "simulator", 5))
    assert conn.execute("SELECT sent_at FROM sender_numbers").fetchone()[0] == 5
    # Only a claim the organization holds is marked: a report never makes one (that skips `claim`'s checks).
    conn.execute("DELETE FROM sender_numbers")
    conn.execute("UPDATE messages SET provider_message_id = NULL, status = 'queued'")
    write_sync(conn, lambda c: messaging.apply_reports(c, [report], "simulator", 6))
    assert conn.execute("SELECT COUNT(*) FROM sender_numbers").fetchone()[0] == 0
    conn.close()


def test_a_command_whose_write_finds_the_database_locked_too_long_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app import cli
    from app.store import db as db_module

    path = tmp_path / "parley.db"
    migrate(connect_sync(str(path)))
    holder = connect_sync(str(path))
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARLEY_DATABASE", str(path))
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 200)  # the production 10 s, shrunk for the test

    assert cli.main(["keys", "create", "--org", "acme"]) == 2

    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "locked by another process" in err, err
    holder.execute("ROLLBACK")
    holder.close()


def test_a_database_locked_past_the_busy_timeout_is_named_as_locked_not_as_unwritable(tmp_path: Path) -> None:
    from app.cli import _bad_database

    path = tmp_path / "parley.db"
    holder = connect_sync(str(path))
    holder.execute("BEGIN IMMEDIATE")
    impatient = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError) as busy:
        impatient.execute("BEGIN IMMEDIATE")
    message = str(_bad_database(load_settings({"PARLEY_DATABASE": str(path)}, env_file=None), busy.value))
    assert "locked by another process" in message and "writable" not in message
    holder.execute("ROLLBACK")
    holder.close()
    impatient.close()


async def test_group_commit_isolates_a_failing_write_from_its_batch(db: Database) -> None:

    def insert(value: int) -> Any:
        return lambda c: c.execute("INSERT INTO t (x) VALUES (?)", (value,)).rowcount

    def broken(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t (x) VALUES (1000)")
        raise ValueError("this write fails after a statement")

    results = await asyncio.gather(*(db.write(insert(i)) for i in range(100)), db.write(broken), return_exceptions=True)
    assert results[:100] == [1] * 100
    assert isinstance(results[100], ValueError)
    values = await db.read(lambda c: [row[0] for row in c.execute("SELECT x FROM t ORDER BY x")])
    assert values == list(range(100))
    pragmas = await db.read(lambda c: (c.execute("PRAGMA journal_mode").fetchone()[0],))
    assert pragmas == ("wal",)


async def test_write_stats_count_group_commits_and_split_their_time(db: Database) -> None:
    before = dataclasses.replace(db.stats)
    await asyncio.gather(
        *(db.write(lambda c, i=i: c.execute("INSERT INTO t (x) VALUES (?)", (i,))) for i in range(100))
    )
    stats = db.stats
    assert stats.jobs - before.jobs == 100
    assert 2 <= stats.batches - before.batches < 100  # grouped, at most MAX_BATCH writes per commit
    assert stats.run_seconds > before.run_seconds
    assert stats.commit_seconds > before.commit_seconds
    assert stats.commit_wait_seconds - before.commit_wait_seconds >= stats.commit_seconds - before.commit_seconds


async def test_writes_arriving_during_a_commit_are_counted_as_queued_until_their_batch_runs(db: Database) -> None:
    release = threading.Event()
    blocking = asyncio.create_task(db.write(lambda c: release.wait(5), long=True))  # holds the writer
    await asyncio.sleep(0.05)
    queued = [
        asyncio.create_task(db.write(lambda c, i=i: c.execute("INSERT INTO t (x) VALUES (?)", (i,)))) for i in range(3)
    ]
    await asyncio.sleep(0.05)
    assert db.queued_writes == 3
    release.set()
    await asyncio.gather(blocking, *queued)
    assert db.queued_writes == 0


async def test_metrics_export_the_write_path_counters(tmp_path: Path) -> None:
    async with start_harness(tmp_path) as h:
        assert (await h.post("/v1/sms-conversations", SEED_CREATE)).status_code == 201
        text = (await h.client.get("/metrics")).text
        values = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("parley_db_write_"))
        assert int(values["parley_db_write_batches_total"]) >= 2  # the create's persist and its outcome
        assert int(values["parley_db_write_jobs_total"]) >= int(values["parley_db_write_batches_total"])
        assert float(values["parley_db_write_commit_seconds_total"]) > 0
        assert float(values["parley_db_write_commit_wait_seconds_total"]) >= float(
            values["parley_db_write_commit_seconds_total"]
        )
        assert float(values["parley_db_write_run_seconds_total"]) > 0


async def test_metrics_stay_bounded_and_grouped_whatever_methods_clients_invent(tmp_path: Path) -> None:
    """No key is needed to send any method: invented ones are counted together as OTHER (a label each would grow
    /metrics and the server's memory without bound). Each family's TYPE line and samples form one group, as the
    text format requires."""
    async with start_harness(tmp_path) as h:
        assert (await h.post("/v1/sms-conversations", SEED_CREATE)).status_code == 201
        for method in ("FOO", "BAR1", "X" * 4000):
            assert (await h.client.request(method, "/healthz")).status_code == 405
        text = (await h.client.get("/metrics")).text
        assert 'parley_http_requests_total{method="OTHER",status="405"} 3' in text
        assert "FOO" not in text and "BAR1" not in text and len(text) < 10_000
        families = [
            line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0] for line in text.splitlines()
        ]
        groups = [name for index, name in enumerate(families) if index == 0 or families[index - 1] != name]
        assert len(groups) == len(set(groups)), groups  # no family comes back after another
        assert {"parley_conversations", "parley_jobs"} <= set(groups)


async def test_committed_pages_reach_the_database_file_by_background_checkpoints(db: Database) -> None:
    path = Path(db.path)
    before = path.stat().st_size
    rows = [(i, "x" * 1000) for i in range(2000)]  # ~500 pages: far below the writer's own threshold
    await db.write(lambda c: c.executemany("INSERT INTO t (x, body) VALUES (?, ?)", rows))
    for _ in range(40):  # within ~2 s: a checkpoint runs every CHECKPOINT_SECONDS
        if path.stat().st_size >= before + 1_500_000:
            break
        await asyncio.sleep(0.05)
    assert path.stat().st_size >= before + 1_500_000
    busy, frames, copied = await db.checkpoint()
    assert busy == 0 and copied == frames


async def test_the_wal_file_shrinks_back_to_its_limit_after_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.store import db as db_module

    monkeypatch.setattr(db_module, "JOURNAL_SIZE_LIMIT", 256 * 1024)
    database = Database(str(tmp_path / "store.db"))
    await database.open()
    try:
        wal = Path(database.path + "-wal")
        await database.write(lambda c: c.execute("CREATE TABLE t (x INTEGER PRIMARY KEY, body TEXT)"))
        rows = [(i, "x" * 1000) for i in range(3000)]  # ~3 MB of WAL
        await database.write(lambda c: c.executemany("INSERT INTO t (x, body) VALUES (?, ?)", rows))
        assert wal.stat().st_size > 2_000_000
        busy, frames, copied = await database.checkpoint()
        assert busy == 0 and copied == frames
        # The next write starts the WAL over, and its commit cuts the file back to the limit.
        await database.write(lambda c: c.execute("UPDATE t SET body = 'y' WHERE x = 1"))
        assert wal.stat().st_size <= 256 * 1024
    finally:
        await database.close()


async def test_a_write_waiting_for_another_process_lock_never_blocks_the_event_loop(db: Database) -> None:
    other = connect_sync(db.path)  # another process, as far as SQLite can tell
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t (x) VALUES (1)")
    short = asyncio.ensure_future(db.write(lambda c: c.execute("INSERT INTO t (x) VALUES (2)").rowcount))
    long = asyncio.ensure_future(db.write(lambda c: c.execute("DELETE FROM t WHERE x < 0").rowcount, long=True))
    # The writes wait for the lock on the writer's thread; the loop keeps turning meanwhile.
    started = asyncio.get_running_loop().time()
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert not short.done() and not long.done()
    other.execute("COMMIT")
    other.close()
    assert await asyncio.wait_for(short, 15) == 1
    assert await asyncio.wait_for(long, 15) == 0
    assert await db.read(lambda c: [row[0] for row in c.execute("SELECT x FROM t ORDER BY x")]) == [1, 2]


async def test_a_crash_between_persist_and_send_is_resolved_at_start_up(tmp_path: Path) -> None:
    hanging = HangingProvider()
    async with start_harness(tmp_path, provider=hanging) as first:
        task = asyncio.create_task(first.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "crash-1"}))
        await asyncio.wait_for(hanging.called.wait(), 5)
        assert first.rows("SELECT status FROM conversations")[0][0] == "pending"
        assert first.rows("SELECT status FROM messages")[0][0] == "queued"
        key = first.key()
        # A second process on the same file: its start-up finds the pending conversation.
        async with start_harness(tmp_path) as second:
            second.keys["acme"] = key
            row = second.rows("SELECT status, end_reason FROM conversations")[0]
            assert tuple(row) == ("closed", "opening_message_failed")
            assert tuple(second.rows("SELECT status, error_code FROM messages")[0]) == ("failed", "parley_interrupted")
            retry = await second.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "crash-1"})
            assert retry.status_code == 201  # the key was released, so the client's retry runs
        hanging.release.set()
        await task
        assert first.rows("SELECT COUNT(*) FROM conversations WHERE status = 'pending'")[0][0] == 0


def sender_claims(h: Any) -> list[tuple[str, str, bool]]:
    return [
        (row[0], row[1], bool(row[2]))
        for row in h.rows(
            "SELECT s.number, o.name, s.sent_at IS NOT NULL FROM sender_numbers s JOIN orgs o ON o.id = s.org_id"
        )
    ]


async def assert_another_org_cannot_take_the_number(h: Any) -> None:
    taken = await h.post("/v1/sms-conversations", {**SEED_CREATE, "toNumber": "+15555550777"}, org="globex")
    assert taken.status_code == 400, taken.text


async def test_an_opening_a_status_report_shows_taken_goes_on_after_a_crash_and_keeps_its_number(
    tmp_path: Path,
) -> None:
    """The provider's status callback recorded its id before the create recorded the acceptance, then the process
    died: the provider took the opening, so the conversation goes on as the create would have left it."""
    hanging = HangingProvider()
    async with start_harness(tmp_path, provider=hanging) as first:
        task = asyncio.create_task(first.post("/v1/sms-conversations", SEED_CREATE))
        await asyncio.wait_for(hanging.called.wait(), 5)
        (message_id,) = [row[0] for row in first.rows("SELECT id FROM messages")]
        report = StatusReport(
            provider_message_id="SMtaken1", provider_status="sent", message_id=message_id, error_code=None, raw={}
        )
        await first.ctx.db.write(lambda c: messaging.apply_reports(c, [report], "simulator", first.clock.now_ms()))
        key = first.key()
        async with start_harness(tmp_path) as second:
            second.keys["acme"] = key
            assert tuple(second.rows("SELECT status, end_reason FROM conversations")[0]) == ("in_progress", None)
            assert tuple(second.rows("SELECT provider_message_id FROM messages")[0]) == ("SMtaken1",)
            assert sender_claims(second) == [(SEED_CREATE["fromNumber"], "acme", True)]
            await assert_another_org_cannot_take_the_number(second)
        hanging.release.set()
        await task


class ProviderThatCannotSay(SimulatorProvider):
    async def find_sent(self, message: Any, taken: Any = ()) -> SendAccepted | None:
        raise RuntimeError("provider unreachable")


async def test_a_number_whose_opening_may_have_gone_out_stays_its_organizations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash cut off the send and the provider cannot say whether it took it: the opening may have gone out from
    the number, so later refused creates do not give it back."""
    monkeypatch.setattr(conversations, "LOOKUP_RETRY_WAITS", (0.01, 0.01))  # the production 1 s and 3 s, shrunk
    hanging = HangingProvider()
    async with start_harness(tmp_path, provider=hanging) as first:
        task = asyncio.create_task(first.post("/v1/sms-conversations", SEED_CREATE))
        await asyncio.wait_for(hanging.called.wait(), 5)
        key = first.key()
        async with start_harness(tmp_path, provider=ProviderThatCannotSay()) as second:
            second.keys["acme"] = key
            unknown = "SELECT error_code FROM messages WHERE error_code = 'provider_outcome_unknown'"
            await eventually(lambda: second.rows(unknown))
            refused = await second.post("/v1/sms-conversations", {**SEED_CREATE, "toNumber": "+15005550001"})
            assert refused.status_code == 502, refused.text
            assert sender_claims(second) == [(SEED_CREATE["fromNumber"], "acme", True)]
            await assert_another_org_cannot_take_the_number(second)
        hanging.release.set()
        await task


async def create_closed_while_at_the_provider(h: Any, holding: SimulatorHolding) -> asyncio.Task[Any]:
    """A create whose opening the provider holds, and whose conversation an operator closes meanwhile: its task."""
    create = asyncio.create_task(h.post("/v1/sms-conversations", SEED_CREATE))
    await eventually(holding.holding.is_set)
    (conversation_id,) = [row[0] for row in h.rows("SELECT id FROM conversations")]
    assert (await h.post(f"/v1/sms-conversations/{conversation_id}/close")).status_code == 200
    return create


async def test_an_opening_that_completes_after_its_conversation_was_closed_supersedes_nothing(tmp_path: Path) -> None:
    """An operator closed the first create's conversation while its opening was at the provider, and a second
    create for the same pair went through meanwhile: the first's late acceptance must not close the second."""
    holding = SimulatorHolding(1)
    async with start_harness(tmp_path, provider=holding) as h:
        first = await create_closed_while_at_the_provider(h, holding)
        second = await h.post("/v1/sms-conversations", SEED_CREATE)
        assert second.status_code == 201, second.text

        holding.release.set()
        assert (await first).status_code == 201

        second_id = second.json()["data"]["conversationId"]
        kept = (await h.get(f"/v1/sms-conversations/{second_id}")).json()["data"]
        assert (kept["status"], kept["supersededBy"]) == ("in_progress", None)


async def test_a_send_request_hands_the_provider_the_ids_already_recorded_for_its_pair(harness: Any) -> None:
    """What a provider needs to tell an earlier identical text from this one's after a restart (Twilio's look-up
    after a lost answer): read only when asked."""
    from app.store import conversations as conversation_store

    created = await harness.post("/v1/sms-conversations", SEED_CREATE)
    conversation_id = created.json()["data"]["conversationId"]
    earlier = created.json()["data"]["providerMessageId"]
    conversation = await harness.ctx.db.read(lambda c: conversation_store.get(c, conversation_id))
    # Written well after the earlier one (an identical text may wait at the provider's door long after its row).
    later = harness.ctx.clock.now_ms() + 90 * 60_000
    message = messaging.new_outbound(conversation, "Hi again", "operator", later, "simulator")

    request = messaging.send_request(harness.ctx, message)

    assert request.recorded is not None and earlier in await request.recorded()


async def test_a_refused_create_does_not_give_back_a_number_another_create_is_still_sending_from(
    tmp_path: Path,
) -> None:
    """An operator closed the first create's conversation while its opening was at the provider; a refused create
    from the same number must not free it meanwhile, or another organization could take the number it goes out from."""
    holding = SimulatorHolding(1)
    async with start_harness(tmp_path, provider=holding) as h:
        first = await create_closed_while_at_the_provider(h, holding)
        refused = await h.post("/v1/sms-conversations", {**SEED_CREATE, "toNumber": "+15005550001"})
        assert refused.status_code == 502, refused.text

        await assert_another_org_cannot_take_the_number(h)
        holding.release.set()
        assert (await first).status_code == 201
        assert sender_claims(h) == [(SEED_CREATE["fromNumber"], "acme", True)]


async def test_an_unkeyed_create_cut_off_after_its_conversation_was_closed_leaves_no_message_queued(
    tmp_path: Path,
) -> None:
    """As below, without an Idempotency-Key to find the create by: its opening is still settled at start-up."""
    hanging = HangingProvider()
    async with start_harness(tmp_path, provider=hanging) as first:
        task = asyncio.create_task(first.post("/v1/sms-conversations", SEED_CREATE))
        await asyncio.wait_for(hanging.called.wait(), 5)
        (conversation_id,) = [row[0] for row in first.rows("SELECT id FROM conversations")]
        assert (await first.post(f"/v1/sms-conversations/{conversation_id}/close")).status_code == 200
        async with start_harness(tmp_path) as second:  # another process on the same file
            settled = "SELECT status, error_code FROM messages WHERE conversation_id = ? AND status != 'queued'"
            message = await eventually(lambda: second.rows(settled, conversation_id))  # settled just after start-up
            assert tuple(message[0]) == ("failed", "parley_interrupted")
            conversation = second.rows("SELECT status, end_reason FROM conversations")[0]
            assert tuple(conversation) == ("closed", "admin_closed")
        hanging.release.set()
        await task


async def test_a_create_cut_off_after_its_conversation_was_closed_is_settled_at_start_up(tmp_path: Path) -> None:
    """An operator closed the conversation while its opening was on its way, then the process died: the
    conversation is no longer `pending`, but its create still held the Idempotency-Key."""
    hanging = HangingProvider()
    async with start_harness(tmp_path, provider=hanging) as first:
        task = asyncio.create_task(first.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "cut-1"}))
        await asyncio.wait_for(hanging.called.wait(), 5)
        (conversation_id,) = [row[0] for row in first.rows("SELECT id FROM conversations")]
        assert (await first.post(f"/v1/sms-conversations/{conversation_id}/close")).status_code == 200
        key = first.key()
        # A second process on the same file: its start-up finds the create cut off.
        async with start_harness(tmp_path) as second:
            second.keys["acme"] = key
            message = second.rows("SELECT status, error_code FROM messages WHERE conversation_id = ?", conversation_id)
            assert tuple(message[0]) == ("failed", "parley_interrupted")  # not left `queued` for ever
            retry = await second.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "cut-1"})
            assert retry.status_code == 201, retry.text  # the key was freed: not 409 for a day
            assert retry.json()["data"]["conversationId"] != conversation_id
        hanging.release.set()
        await task


FOUND = SendAccepted(provider_message_id="SM" + "f" * 32, provider_status="sent")


class FindsItSent(SimulatorProvider):
    """A provider that, asked after a crash, says it took the message."""

    async def find_sent(self, message: Any, taken: Any = ()) -> SendAccepted | None:
        return FOUND


class CannotSay(SimulatorProvider):
    """A provider that cannot be asked after a crash (its API is down), for good or for its first `down_for`
    look-ups (after which it says it took the message, as FindsItSent)."""

    down_for: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def find_sent(self, message: Any, taken: Any = ()) -> SendAccepted | None:
        self.asked += 1
        if self.down_for is None or self.asked <= self.down_for:
            raise ConnectionError("provider unreachable")
        return FOUND


class CannotSayAtFirst(CannotSay):
    """Down for the first two look-ups after a crash, then says it took the message."""

    down_for = 2


@contextlib.asynccontextmanager
async def operator_message_cut_off(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A first process whose operator message ("Hi") is with the provider, never answered, as when the process
    dies: yields (the conversation's id, the org's key) for a second process on the same file."""
    held = SimulatorHolding(2)  # the opening goes out; the operator's message waits
    async with start_harness(tmp_path, provider=held) as first:
        created = await first.post("/v1/sms-conversations", SEED_CREATE)
        conversation_id = created.json()["data"]["conversationId"]
        task = asyncio.create_task(first.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Hi"}))
        await asyncio.wait_for(held.holding.wait(), 5)
        yield conversation_id, first.key()
        held.release.set()
        await task


@pytest.mark.parametrize(
    ("provider", "settled", "event"),
    [
        (SimulatorProvider, ("failed", "parley_interrupted", None), "sms.message_delivery_updated"),
        (FindsItSent, ("sent", None, "SM" + "f" * 32), "sms.message_sent"),
        (CannotSay, ("failed", "provider_outcome_unknown", None), "sms.message_delivery_updated"),
        (CannotSayAtFirst, ("sent", None, "SM" + "f" * 32), "sms.message_sent"),
    ],
)
async def test_a_message_cut_off_between_persist_and_send_is_settled_at_start_up(
    tmp_path: Path, provider: type[SimulatorProvider], settled: tuple[Any, ...], event: str
) -> None:
    """Not only a create's opening: any outbound SMS (here an operator's) the process died sending is settled by
    asking the provider, not left `queued` for ever; nothing is sent twice. A provider that cannot say is asked
    again after each of `messaging.RECOVERY_WAITS` before the outcome is unknown."""
    clock = FakeClock()
    async with (
        operator_message_cut_off(tmp_path) as (conversation_id, key),
        start_harness(tmp_path, provider=provider(), clock=clock) as second,  # another process on the same file
    ):
        second.keys["acme"] = key
        settled_rows = (
            "SELECT id, status, error_code, provider_message_id FROM messages"
            " WHERE author = 'operator' AND (status != 'queued' OR provider_message_id IS NOT NULL)"
        )
        waited = 0.0
        while not (rows := second.rows(settled_rows)) and waited < sum(messaging.RECOVERY_WAITS) + 60:
            await asyncio.sleep(0.01)  # settled in the background, just after start-up
            if not second.rows(settled_rows):
                await clock.advance(1)
                waited += 1
        (row,) = rows
        assert tuple(row)[1:] == settled
        asked = getattr(second.ctx.provider, "asked", None)
        if provider is CannotSay:  # asked after every wait, and only then settled as unknown
            assert asked == len(messaging.RECOVERY_WAITS) + 1
            assert waited >= sum(messaging.RECOVERY_WAITS)
        elif provider is CannotSayAtFirst:
            assert asked == 3 and waited >= sum(messaging.RECOVERY_WAITS[:2])
        payloads = [json.loads(r["payload"]) for r in second.rows("SELECT payload FROM events WHERE type = ?", event)]
        assert [p["data"]["messageId"] for p in payloads if p["data"]["author"] == "operator"] == [row["id"]]
        conversation = (await second.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
        assert conversation["status"] == "in_progress"  # only the message is settled


async def test_a_cut_off_message_a_status_callback_settles_while_the_provider_cannot_be_asked_is_recorded_as_sent(
    tmp_path: Path,
) -> None:
    """The provider's API is down at start-up, but its status callback (it names our message id) arrives during the
    recovery's waits: the message was taken, and gets its `sms.message_sent` like any sent message."""
    clock = FakeClock()
    provider = CannotSay()
    async with (
        operator_message_cut_off(tmp_path) as (conversation_id, key),
        start_harness(tmp_path, provider=provider, clock=clock) as second,
    ):
        second.keys["acme"] = key
        await eventually(lambda: provider.asked == 1)
        (message_id,) = [r["id"] for r in second.rows("SELECT id FROM messages WHERE author = 'operator'")]
        sid = "SM" + "1" * 32
        report = StatusReport(provider_message_id=sid, provider_status="sent", message_id=message_id)
        await messaging.record_reports(second.ctx, [report])
        for _ in range(30):
            await clock.advance(10)
            await asyncio.sleep(0.01)
        await eventually(lambda: conversation_id not in second.ctx.recovering)
        (row,) = second.rows("SELECT status, provider_message_id, error_code FROM messages WHERE id = ?", message_id)
        assert tuple(row) == ("sent", sid, None)
        sent = [
            json.loads(r["payload"])["data"]
            for r in second.rows("SELECT payload FROM events WHERE type = 'sms.message_sent'")
        ]
        (operator,) = [d for d in sent if d["messageId"] == message_id]
        assert (operator["providerMessageId"], operator["status"]) == (sid, "sent")
        assert provider.asked == 1  # a recorded provider id answers the question: not asked again


async def test_a_send_that_fails_unexpectedly_is_settled_at_once(tmp_path: Path) -> None:
    """Not a refusal: the provider's send raised something else (a bug, an unreadable answer). The provider is asked
    whether it took the message, and one it did not take fails with `parley_send_failed` at once, instead of
    staying `queued` until the next start-up (or, for a create, `pending` behind a 500)."""
    async with start_harness(tmp_path, provider=BreaksOnNth(1)) as h:
        created = await h.post("/v1/sms-conversations", SEED_CREATE)
        assert created.status_code == 502, created.text
        error = created.json()["error"]
        assert (error["code"], error["providerCode"]) == ("provider_error", "parley_send_failed")
        conversation = (await h.get(f"/v1/sms-conversations/{error['conversationId']}")).json()["data"]
        assert (conversation["status"], conversation["endReason"]) == ("closed", "opening_message_failed")
        (opening,) = h.rows("SELECT status, error_code FROM messages")
        assert tuple(opening) == ("failed", "parley_send_failed")


class BreaksThenFinds(BreaksOnNth, FindsItSent):
    """The first send fails unexpectedly; asked about it, the provider says it took it."""


class BreaksThenCannotSay(BreaksOnNth, CannotSay):
    """The first send fails unexpectedly, and the provider cannot be asked about it."""


async def test_a_send_that_failed_unexpectedly_but_was_taken_is_a_201(tmp_path: Path) -> None:
    async with start_harness(tmp_path, provider=BreaksThenFinds(1)) as h:
        created = await h.post("/v1/sms-conversations", SEED_CREATE)
        assert created.status_code == 201, created.text
        assert created.json()["data"]["providerMessageId"] == "SM" + "f" * 32


async def test_a_send_that_failed_unexpectedly_with_no_word_from_the_provider_is_an_unknown_outcome(
    tmp_path: Path,
) -> None:
    async with start_harness(tmp_path, provider=BreaksThenCannotSay(1)) as h:
        created = await h.post("/v1/sms-conversations", SEED_CREATE)
        assert created.status_code == 502, created.text
        assert created.json()["error"]["providerCode"] == "provider_outcome_unknown"
        (opening,) = h.rows("SELECT status, error_code FROM messages")
        assert tuple(opening) == ("failed", "provider_outcome_unknown")


class AsksSlowly(SimulatorProvider):
    """A start-up look-up that does not return until the test says so (an unreachable provider)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def find_sent(self, message: Any, taken: Any = ()) -> SendAccepted | None:
        self.asked.set()
        await self.release.wait()
        return None


async def test_a_slow_start_up_look_up_does_not_hold_up_the_server(tmp_path: Path) -> None:
    async with operator_message_cut_off(tmp_path) as (conversation_id, key):
        slow = AsksSlowly()
        # Bounded: a start-up that waited for the look-up would never come up (a failure, not a hung run).
        async with asyncio.timeout(15), start_harness(tmp_path, provider=slow) as second:
            second.keys["acme"] = key
            await asyncio.wait_for(slow.asked.wait(), 5)
            assert (await second.get(f"/v1/sms-conversations/{conversation_id}")).status_code == 200
            assert second.rows("SELECT status FROM messages WHERE author = 'operator'")[0][0] == "queued"
            slow.release.set()
            settled = "SELECT status FROM messages WHERE author = 'operator' AND status = 'failed'"
            await eventually(lambda: second.rows(settled))


class AsksForever(AsksSlowly):
    """A look-up that never answers, and notes when it is given up (cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.given_up = asyncio.Event()

    async def find_sent(self, message: Any, taken: Any = ()) -> SendAccepted | None:
        try:
            return await super().find_sent(message, taken)
        except asyncio.CancelledError:
            self.given_up.set()
            raise


async def test_a_sweep_of_stalled_creates_a_stop_cuts_off_leaves_no_look_up_behind(tmp_path: Path) -> None:
    """Housekeeping asks about stalled creates' openings in tasks of their own. A stop that cancels the pass (the
    scheduler's grace ran out) left them running: asking a provider the stop then closed, then the closed database,
    and then destroyed pending with the loop."""
    slow = AsksForever()
    async with start_harness(tmp_path, provider=slow) as h:
        assert (await h.post("/v1/sms-conversations", SEED_CREATE)).status_code == 201
        await eventually(lambda: h.rows("SELECT 1 FROM messages WHERE status = 'delivered'"))
        with contextlib.closing(sqlite3.connect(h.settings.database)) as conn, conn:
            # As a create whose outcome could not be written leaves it, 11 minutes ago.
            conn.execute("UPDATE conversations SET status = 'pending', created_at = created_at - 660000")
            conn.execute("UPDATE messages SET status = 'queued', provider_message_id = NULL, delivered_at = NULL")
        sweep = asyncio.create_task(conversations.recover_stalled(h.ctx))
        await asyncio.wait_for(slow.asked.wait(), 5)
        sweep.cancel()
        await asyncio.gather(sweep, return_exceptions=True)
        assert slow.given_up.is_set()  # the look-up ended with the pass
        assert h.rows("SELECT status FROM conversations")[0][0] == "pending"  # nothing settled by a cut-off pass


class CallbackOvertakes(SimulatorProvider):
    """Takes the operator's message, whose status report (naming our message id) lands first; then `send` raises
    something unexpected (an answer the adapter cannot read)."""

    sid = "SM" + "e" * 32
    ctx: Any = None

    async def send(self, request: SendRequest) -> SendAccepted:
        if request.body != "A person here.":
            return await super().send(request)
        report = StatusReport(message_id=request.message_id, provider_message_id=self.sid, provider_status="sent")
        await messaging.record_reports(self.ctx, [report])
        raise RuntimeError("unreadable answer")

    async def find_sent(self, message: Any, taken: Any = ()) -> SendAccepted | None:
        return None if self.sid in taken else SendAccepted(provider_message_id=self.sid, provider_status="sent")


async def test_a_send_whose_status_report_came_first_is_sent_though_its_answer_was_unreadable(tmp_path: Path) -> None:
    """The report recorded the provider's id on the message: that is the provider saying it took it, not an id
    taken by another message."""
    provider = CallbackOvertakes()
    async with start_harness(tmp_path, provider=provider) as h:
        provider.ctx = h.ctx
        created = await h.post("/v1/sms-conversations", SEED_CREATE)
        conversation_id = created.json()["data"]["conversationId"]
        answered = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
        assert answered.status_code == 201, answered.text
        (row,) = h.rows("SELECT status, error_code, provider_message_id FROM messages WHERE author = 'operator'")
        assert tuple(row) == ("sent", None, provider.sid)


def test_unsent_messages_are_found_on_the_unfinished_index(tmp_path: Path) -> None:
    """Start-up reads only the messages still `queued`/`sent`, not every message ever sent."""
    from app.store import conversations as conversation_store

    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)
    plan = plan_of(conn, lambda: conversation_store.unsent_outbound(conn))
    assert "INDEX messages_unfinished" in plan, plan
    conn.close()


def test_keys_held_by_running_creates_are_found_on_their_own_index(tmp_path: Path) -> None:
    """Start-up recovery and the freeing of a key by its conversation read only the keys still `running`, not
    every key of the last 24 hours."""
    from app.store import conversations as conversation_store
    from app.store import idempotency

    conn = connect_sync(str(tmp_path / "parley.db"))
    migrate(conn)
    for run in (
        lambda: idempotency.finish_running(conn, "c-1", "{}"),
        lambda: idempotency.release_running(conn, "c-1"),
        lambda: idempotency.release_orphaned(conn),
        lambda: conversation_store.interrupted_creates(conn),
    ):
        plan = plan_of(conn, run)
        assert "INDEX idempotency_running" in plan, plan
    conn.close()


def test_a_bad_setting_stops_start_up_with_one_line_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="PARLEY_PORT"):
        load_settings({"PARLEY_PORT": "eighty"}, env_file=None)
    with pytest.raises(ConfigError, match="PARLEY_SMS_PROVIDER"):
        load_settings({"PARLEY_SMS_PROVIDER": "carrier-pigeon"}, env_file=None)
    for schedule in ("5,soon", "5,,6", "5,6,", "5,-1", "5,99999999999999999", f"5,{30 * 86_400 + 1}"):
        with pytest.raises(ConfigError, match="PARLEY_WEBHOOK_RETRY_SCHEDULE"):
            load_settings({"PARLEY_WEBHOOK_RETRY_SCHEDULE": schedule}, env_file=None)
    spaced = load_settings({"PARLEY_WEBHOOK_RETRY_SCHEDULE": "5, 60 ,600"}, env_file=None)
    assert spaced.webhook_retry_schedule == (5, 60, 600)
    with pytest.raises(ConfigError, match="TWILIO_ACCOUNT_SID"):
        load_settings({"PARLEY_SMS_PROVIDER": "twilio"}, env_file=None)
    twilio = {"PARLEY_SMS_PROVIDER": "twilio", "PARLEY_PUBLIC_URL": "https://parley.example.test"}
    good = {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "0123abcd" * 4}
    assert load_settings({**twilio, **good}, env_file=None).twilio_account_sid == good["TWILIO_ACCOUNT_SID"]
    for name, bad in [
        ("TWILIO_ACCOUNT_SID", good["TWILIO_ACCOUNT_SID"] + " "),
        ("TWILIO_ACCOUNT_SID", "https://api.twilio.com/AC1"),
        ("TWILIO_AUTH_TOKEN", '"' + good["TWILIO_AUTH_TOKEN"] + '" x'),
        ("TWILIO_AUTH_TOKEN", "   "),
        ("TWILIO_AUTH_TOKEN", good["TWILIO_AUTH_TOKEN"] + "\n"),
    ]:
        with pytest.raises(ConfigError, match=name):
            load_settings({**twilio, **good, name: bad}, env_file=None)
    with pytest.raises(ConfigError, match="PARLEY_RATE_LIMIT"):
        load_settings({"PARLEY_RATE_LIMIT": "-1"}, env_file=None)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("PARLEY_PORT", "8_000"),  # Python's int() reads these: the README's whole numbers do not
        ("PARLEY_PORT", "\uff18\uff10\uff10\uff10"),  # full-width digits
        ("PARLEY_PORT", "8e3"),
        ("PARLEY_RATE_LIMIT", "1_0"),
        ("PARLEY_RATE_LIMIT", "nan"),
        ("PARLEY_RATE_LIMIT", "1e3"),
        ("PARLEY_LLM_TIMEOUT_SECONDS", "inf"),
        ("PARLEY_WEBHOOK_RETRY_SCHEDULE", "\uff15,10"),
        ("PARLEY_WEBHOOK_RETRY_SCHEDULE", "5,1_0"),
        ("PARLEY_ALLOW_PRIVATE_URLS", " "),  # only spaces is refused everywhere
        ("PARLEY_DATABASE", "   "),
        ("PARLEY_DATABASE", " data/parley.db"),  # would make a new, empty database under a directory " "
        ("PARLEY_DATABASE", "data/parley.db "),
        ("PARLEY_AGENTS_FILE", "data/agents.toml "),
        ("PARLEY_LLM_BASE_URL", "http://127.0.0.1:11434/v1#x"),
        ("PARLEY_AGENTS_FILE", " "),
        ("PARLEY_ALLOW_PRIVATE_URLS", "maybe"),
        ("PARLEY_DATABASE", ":memory:"),  # keeps nothing: every process would see its own empty database
        ("PARLEY_DATABASE", "file::memory:?cache=shared"),
        ("PARLEY_LLM_API_KEY", "sk-test\n"),  # a secret made from a file keeps its newline: every call would fail
        ("PARLEY_LLM_API_KEY", '"sk-test"'),
        ("PARLEY_LLM_MODEL", "qwen2.5:7b "),
    ],
)
def test_a_value_python_or_an_env_file_would_bend_is_refused_naming_the_variable(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=name) as refused:
        load_settings({name: bad}, env_file=None)
    assert "sk-test" not in str(refused.value)  # a key is never echoed


def test_settings_read_forgivingly_where_nothing_is_lost() -> None:
    settings = load_settings(
        {
            "PARLEY_PORT": " 8001 ",
            "PARLEY_RATE_LIMIT": "2.5",
            "PARLEY_LLM_TIMEOUT_SECONDS": ".5",
            "PARLEY_ALLOW_HTTP_URLS": "Yes",
            "PARLEY_LOG_FORMAT": "json ",
            "PARLEY_SMS_PROVIDER": " simulator",
            "PARLEY_PUBLIC_URL": "HTTPS://sms.example.com",
            "PARLEY_LLM_API_KEY": "sk-test",
        },
        env_file=None,
    )
    assert (settings.port, settings.rate_limit, settings.llm_timeout_seconds) == (8001, 2.5, 0.5)
    assert settings.allow_http_urls is True and (settings.log_format, settings.sms_provider) == ("json", "simulator")
    assert settings.public_url == "https://sms.example.com"


@pytest.mark.parametrize("token", ['"0123abcd0123abcd"', "0123abcd0123abcd'", "'tok'"])
def test_a_twilio_credential_with_quotes_an_env_file_kept_is_refused(token: str) -> None:
    twilio = {"PARLEY_SMS_PROVIDER": "twilio", "PARLEY_PUBLIC_URL": "https://parley.example.test"}
    with pytest.raises(ConfigError, match="TWILIO_AUTH_TOKEN") as refused:
        load_settings({**twilio, "TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": token}, env_file=None)
    assert token not in str(refused.value)


def test_dot_env_is_read_without_being_copied_into_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared .env's proxy or SDK variables (HTTP_PROXY, OPENAI_ORG_ID) must not change how Parley calls out:
    .env is read for Parley's settings and agents.toml's `env:` secrets only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    (tmp_path / ".env").write_text("HTTP_PROXY=http://127.0.0.1:9\nTOOL_FROM_DOTENV=whsec_x\nPARLEY_PORT=9100\n")
    settings = load_settings()
    assert settings.port == 9100
    assert "HTTP_PROXY" not in os.environ and "TOOL_FROM_DOTENV" not in os.environ
    assert settings.dotenv["TOOL_FROM_DOTENV"] == "whsec_x"


def test_settings_come_from_the_environment_and_dot_env(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PARLEY_PORT=9100\nPARLEY_LOG_FORMAT=json\n")
    settings = load_settings({"PARLEY_LOG_FORMAT": "console", "PARLEY_WEBHOOK_RETRY_SCHEDULE": "1,2"}, str(env_file))
    assert settings.port == 9100
    assert settings.log_format == "console"  # the environment wins over .env
    assert settings.webhook_retry_schedule == (1, 2)
    assert settings.public_url == "http://127.0.0.1:9100"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("PARLEY_DATABASE: /srv/parley.db\n", "line 1 is not NAME=value (it starts with PARLEY_DATABASE)"),
        (
            "PARLEY_PORT=9100\n\nTWILIO_AUTH_TOKEN='s3cr3t\n",
            "line 3 is not NAME=value (it starts with TWILIO_AUTH_TOKEN)",
        ),
        ("PARLEY_PORT=9100\n=s3cr3t\n", "line 2 is not NAME=value;"),
        ("TWILIO_AUTH_TOKEN=abc\ns3cr3t wrapped\n", "line 2 is not NAME=value;"),  # no word of it quoted
        # Read by python-dotenv, without a warning, as a name (`PARLEY_DATABASE:/srv/parley.db`) with no value: it
        # set nothing, and start-up went on with a new, empty database at the default path.
        ("PARLEY_DATABASE:/srv/parley.db\n", "line 1 is not NAME=value (it starts with PARLEY_DATABASE)"),
        (
            "PARLEY_PORT=9100\n\nexport PARLEY_DATABASE:'/srv/parley.db'  # moved\n",
            "line 3 is not NAME=value (it starts with PARLEY_DATABASE)",
        ),
    ],
)
def test_a_dot_env_line_that_is_not_name_equals_value_stops_start_up_naming_its_line(
    tmp_path: Path, content: str, problem: str
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_settings({}, str(env_file))
    assert problem in str(refused.value) and str(env_file) in str(refused.value)
    assert "s3cr3t" not in str(refused.value) and "/srv" not in str(refused.value)


def test_a_dot_env_in_utf8_is_read_with_or_without_a_byte_order_mark_and_any_other_encoding_is_refused(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / ".env"
    for text in ("PARLEY_PORT=9100\n", "\ufeffPARLEY_PORT=9100\n", "# caf\u00e9\nexport PARLEY_PORT='9100'  # x\nD\n"):
        env_file.write_text(text, encoding="utf-8")
        assert load_settings({}, str(env_file)).port == 9100
    env_file.write_bytes("# caf\u00e9\nPARLEY_PORT=9100\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"must be UTF-8 text \(byte 0xe9 at offset 5 is not\)"):
        load_settings({}, str(env_file))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1%eth0", "localhost", "parley-1.lan."])
def test_a_listen_host_is_an_ip_address_or_a_host_name(host: str) -> None:
    assert load_settings({"PARLEY_HOST": host}, env_file=None).host == host


@pytest.mark.parametrize("host", ["not a host!", "256.1.1.1", "10.0.0", "-lead.example", "a..b", "http://x", " "])
def test_a_malformed_listen_host_stops_start_up_naming_the_variable_or_the_flag(host: str) -> None:
    with pytest.raises(ConfigError, match="PARLEY_HOST"):
        load_settings({"PARLEY_HOST": host}, env_file=None)
    with pytest.raises(ConfigError, match="--host"):
        load_settings({"PARLEY_HOST": "127.0.0.1"}, env_file=None, host=host)


def test_the_default_public_url_brackets_an_ipv6_listen_address() -> None:
    assert load_settings({"PARLEY_HOST": "::1", "PARLEY_PORT": "9100"}, env_file=None).public_url == "http://[::1]:9100"


@pytest.mark.parametrize(
    ("raw", "public_url"),
    [
        ("https://sms.example.com", "https://sms.example.com"),
        ("https://sms.example.com/parley/", "https://sms.example.com/parley"),  # a proxy's path prefix
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("https://localhost", "https://localhost"),
    ],
)
def test_a_public_url_is_kept_without_its_trailing_slash(raw: str, public_url: str) -> None:
    assert load_settings({"PARLEY_PUBLIC_URL": raw}, env_file=None).public_url == public_url


@pytest.mark.parametrize(
    "raw",
    [
        "http://exa mple.com",
        "http://exa\tmple.com",
        "ftp://example.com",
        "sms.example.com",
        "https://",
        "http:///callbacks",
        "http://:8000",
        "https://example.com:99999",
        "https://example.com:port",
        "https://256.1.1.1",
        "https://example.com/?token=1",
        "https://example.com/#top",
    ],
)
def test_a_malformed_public_url_stops_start_up_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="PARLEY_PUBLIC_URL"):
        load_settings({"PARLEY_PUBLIC_URL": raw}, env_file=None)


@pytest.mark.parametrize("name", ["PARLEY_PUBLIC_URL", "TWILIO_API_BASE", "PARLEY_LLM_BASE_URL"])
def test_a_url_with_credentials_stops_start_up_without_echoing_them(name: str) -> None:
    with pytest.raises(ConfigError, match=name) as refused:
        load_settings({name: "https://user:hunter2@sms.example.com"}, env_file=None)
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError, match=name) as malformed:
        load_settings({name: "https://user:hunter2@sms example.com"}, env_file=None)
    assert "hunter2" not in str(malformed.value)


@pytest.mark.parametrize("raw", ["https://sms.example.com/cb?token=SECRETQ", "https://sms example.com/#SECRETQ"])
def test_a_refused_url_is_shown_without_its_query_or_fragment(raw: str) -> None:
    with pytest.raises(ConfigError, match="PARLEY_PUBLIC_URL") as refused:
        load_settings({"PARLEY_PUBLIC_URL": raw}, env_file=None)
    assert "SECRETQ" not in str(refused.value) and "not shown" in str(refused.value)


def test_a_malformed_base_url_stops_start_up_naming_the_variable() -> None:
    for name in ("TWILIO_API_BASE", "PARLEY_LLM_BASE_URL"):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: "http://exa mple.com"}, env_file=None)


def test_serve_flags_win_over_settings_and_never_replace_a_public_url_from_dot_env(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PARLEY_PORT=9100\n")
    settings = load_settings({}, str(env_file), host="0.0.0.0", port=9200)
    assert (settings.host, settings.port, settings.public_url) == ("0.0.0.0", 9200, "http://0.0.0.0:9200")
    env_file.write_text("PARLEY_PUBLIC_URL=https://sms.example.com/\n")
    settings = load_settings({}, str(env_file), host="0.0.0.0", port=9200)
    assert (settings.port, settings.public_url) == (9200, "https://sms.example.com")
    with pytest.raises(ConfigError, match="--port"):
        load_settings({}, None, port=0)


def test_cancelling_a_conversations_jobs_deletes_only_them_by_key(tmp_path: Path) -> None:
    from app.domain.lifecycle import CONVERSATION_JOBS
    from app.store import jobs

    conn = connect_sync(str(tmp_path / "jobs.db"))
    migrate(conn)
    for ref in ("c1", "c2"):
        for kind in (*CONVERSATION_JOBS, "webhook_endpoint"):
            jobs.schedule(conn, kind, ref, 1000)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    jobs.cancel(conn, "c1", CONVERSATION_JOBS)
    conn.set_trace_callback(None)
    left = sorted(tuple(row) for row in conn.execute("SELECT kind, ref FROM jobs"))
    assert left == sorted(
        [(k, "c2") for k in CONVERSATION_JOBS] + [("webhook_endpoint", "c1"), ("webhook_endpoint", "c2")]
    )
    # One delete, on the (kind, ref) key: with 100,000 open conversations a scan of `jobs` per close was the
    # whole cost of supersede and close.
    (delete,) = statements
    plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + delete))
    assert "SEARCH jobs USING INDEX" in plan and "SCAN" not in plan
    conn.close()


async def test_the_simulator_reports_every_send_in_order_in_bounded_batches() -> None:
    from app.providers.simulator import MAX_REPORTS_PER_HANDOVER, SimulatorProvider

    handovers: list[list[StatusReport]] = []

    async def sink(reports: Any) -> None:
        handovers.append(list(reports))
        await asyncio.sleep(0.005)  # a transaction's worth of time: more reports fall due meanwhile

    sim = SimulatorProvider(report_delay=0.005)
    await sim.start(sink)
    try:
        sends = 300  # 600 reports: more than two handovers' worth
        accepted = []
        for i in range(sends):
            request = SendRequest(
                message_id=f"m{i}",
                from_number="+15555550123",
                to_number="+15555550199",
                body="hi",
                status_callback_url="",
            )
            accepted.append(await sim.send(request))
        for _ in range(200):
            if sum(len(batch) for batch in handovers) == 2 * sends:
                break
            await asyncio.sleep(0.01)
        reports = [report for batch in handovers for report in batch]
        assert [(r.message_id, r.provider_status) for r in reports] == [
            (f"m{i}", step) for i in range(sends) for step in ("sent", "delivered")
        ]
        assert [r.provider_message_id for r in reports[::2]] == [a.provider_message_id for a in accepted]
        assert all(len(batch) <= MAX_REPORTS_PER_HANDOVER for batch in handovers)
        assert len(handovers) < sends  # due reports travel together, not one handover per message
    finally:
        await sim.close()


async def test_reports_still_on_their_way_when_the_server_stops_are_applied(tmp_path: Path) -> None:
    """The simulated carrier reports them at shutdown, early, instead of leaving their messages `queued` until the
    status check after the next start."""
    from tests.seed import SEED_CREATE

    async with start_harness(tmp_path, provider=SimulatorProvider(report_delay=60)) as h:
        created = await h.post("/v1/sms-conversations", SEED_CREATE)
        conversation_id = created.json()["data"]["conversationId"]
        assert h.rows("SELECT status FROM messages WHERE conversation_id = ?", conversation_id)[0][0] == "queued"
        database = h.settings.database
    conn = sqlite3.connect(database)
    status = conn.execute("SELECT status FROM messages WHERE conversation_id = ?", (conversation_id,)).fetchone()[0]
    kinds = [r[0] for r in conn.execute("SELECT provider_status FROM status_reports ORDER BY rowid")]
    conn.close()
    assert status == "delivered" and kinds == ["sent", "delivered"]


async def test_a_job_cut_off_by_the_stop_gives_its_lease_back(tmp_path: Path) -> None:
    """SPEC §7: in-flight work finishes or is released at shutdown (not only at the next start)."""
    from app.store import jobs as jobs_store

    started = asyncio.Event()

    async def hangs(job: Any) -> None:
        started.set()
        await asyncio.sleep(3600)

    async with start_harness(tmp_path) as h:
        h.ctx.scheduler.register("test_hangs", hangs)
        await h.ctx.db.write(lambda c: jobs_store.schedule(c, "test_hangs", "ref-1", 0))
        h.ctx.scheduler.wake()
        await asyncio.wait_for(started.wait(), 5)
        assert h.rows("SELECT lease_until FROM jobs WHERE kind = 'test_hangs'")[0][0] is not None
        await h.ctx.scheduler.stop(grace=0.05)
        assert h.rows("SELECT lease_until FROM jobs WHERE kind = 'test_hangs'")[0][0] is None


async def test_a_kind_whose_slots_are_all_busy_does_not_hold_up_other_kinds(tmp_path: Path) -> None:
    """Model calls hanging in an outage fill the assistant's slots; webhook deliveries, timers and other work must
    still run: each kind has its own slots. A full kind's due jobs wait, without the scheduler spinning on them."""
    from app.store import jobs as jobs_store

    release = asyncio.Event()
    ran = asyncio.Event()
    running: list[str] = []
    peak = 0

    async def slow(job: Any) -> None:
        nonlocal peak
        running.append(job.ref)
        peak = max(peak, len(running))
        await release.wait()
        running.remove(job.ref)

    async def fast(job: Any) -> None:
        ran.set()

    async with start_harness(tmp_path) as h:
        h.ctx.scheduler.register("test_slow", slow)  # the default: 32 at a time, as assistant turns
        h.ctx.scheduler.register("test_fast", fast)
        await h.ctx.db.write(lambda c: [jobs_store.schedule(c, "test_slow", f"s{i}", 0) for i in range(35)])
        h.ctx.scheduler.wake()
        await eventually(lambda: len(running) == 32)
        ticks = h.ctx.scheduler.ticks
        await h.ctx.db.write(lambda c: jobs_store.schedule(c, "test_fast", "f", 0))
        h.ctx.scheduler.wake()
        await asyncio.wait_for(ran.wait(), 5)  # not behind the 32 hanging jobs
        await asyncio.sleep(0.3)
        assert h.ctx.scheduler.ticks - ticks < 10  # three due jobs of a full kind: no busy loop
        assert len(h.rows("SELECT 1 FROM jobs WHERE kind = 'test_slow' AND lease_until IS NULL")) == 3
        release.set()
        await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE kind = 'test_slow'"))
        assert peak == 32


async def test_a_close_cut_off_by_a_forced_quit_still_ends_every_connection_thread(tmp_path: Path) -> None:
    """A second Ctrl-C makes uvicorn cancel the shutdown while the database closes: the connections' threads must
    still end, or they keep the process alive for ever."""
    database = Database(str(tmp_path / "parley.db"))
    await database.open()
    await database.write(lambda c: c.execute("INSERT INTO orgs (id, name, created_at) VALUES ('o', 'o', 0)"))
    threads = [conn._thread for conn in [*database._readers, database._checkpointer, database._writer] if conn]
    assert len(threads) >= 3 and all(thread.is_alive() for thread in threads)
    closing = asyncio.create_task(database.close())
    await asyncio.sleep(0)  # inside its first wait
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    await eventually(lambda: not any(thread.is_alive() for thread in threads))
    conn = sqlite3.connect(tmp_path / "parley.db")
    assert conn.execute("SELECT id FROM orgs").fetchall() == [("o",)]
    conn.close()


async def test_a_new_database_and_its_wal_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """The file holds webhook and tool signing secrets, phone numbers and message bodies: whatever the umask, a
    database Parley creates is 0600, and SQLite gives its WAL the same mode. An existing file keeps its mode."""
    made = tmp_path / "data" / "parley.db"
    database = Database(str(made))
    await database.open()
    try:
        await database.write(lambda c: c.execute("INSERT INTO orgs (id, name, created_at) VALUES ('o', 'o', 0)"))
        for path in (made, Path(f"{made}-wal")):
            assert path.stat().st_mode & 0o777 == 0o600, path
    finally:
        await database.close()

    kept = tmp_path / "kept.db"
    kept.touch(mode=0o640)
    kept.chmod(0o640)
    connect_sync(str(kept)).close()
    assert kept.stat().st_mode & 0o777 == 0o640
