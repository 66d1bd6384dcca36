"""The canonical delivery-status lattice: a literal table of every pair, and a property test of
`messaging.apply_reports` over shuffled, duplicated provider callbacks against a real SQLite file."""

from __future__ import annotations

import itertools
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.domain import agent_registry, messaging, status
from app.domain.models import Conversation
from app.providers.base import SendAccepted, StatusReport
from app.store import conversations as store
from app.store import orgs
from app.store.db import connect_sync, write_sync
from app.store.migrate import migrate
from tests.conftest import ROOT

CANONICAL = ["queued", "sent", "delivered", "undelivered", "failed"]
_ = None  # "no change"

# EXPECTED[current][incoming]: what `status.advance` must answer, written out by hand.
EXPECTED: dict[str, dict[str, str | None]] = {
    "queued": {"queued": _, "sent": "sent", "delivered": "delivered", "undelivered": "undelivered", "failed": "failed"},
    "sent": {"queued": _, "sent": _, "delivered": "delivered", "undelivered": "undelivered", "failed": "failed"},
    "delivered": {"queued": _, "sent": _, "delivered": _, "undelivered": _, "failed": _},
    "undelivered": {"queued": _, "sent": _, "delivered": _, "undelivered": _, "failed": _},
    "failed": {"queued": _, "sent": _, "delivered": _, "undelivered": _, "failed": _},
}

# SPEC §4: Twilio's statuses and where they land; anything else is not a delivery status.
TWILIO = {
    "accepted": "queued",
    "scheduled": "queued",
    "queued": "queued",
    "sending": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "failed",
    "canceled": "failed",
}
NOT_DELIVERY = ["receiving", "received", "partially_delivered", "", "unknown"]
RANK = {"queued": 0, "sent": 1, "delivered": 2, "undelivered": 2, "failed": 2}
TERMINAL = {"delivered", "undelivered", "failed"}


@pytest.mark.parametrize(("current", "incoming"), list(itertools.product(CANONICAL, CANONICAL)))
def test_every_pair_of_canonical_statuses(current: str, incoming: str) -> None:
    assert status.advance(current, incoming) == EXPECTED[current][incoming]


def test_the_table_covers_every_pair() -> None:
    assert sorted(EXPECTED) == sorted(CANONICAL) == sorted(status.RANK)
    assert all(sorted(row) == sorted(CANONICAL) for row in EXPECTED.values())
    assert set(status.TERMINAL) == TERMINAL


@pytest.mark.parametrize(("provider_status", "canonical"), [*TWILIO.items(), *[(s, None) for s in NOT_DELIVERY]])
def test_twilio_statuses_map_to_canonical_ones(provider_status: str, canonical: str | None) -> None:
    assert status.canonical(provider_status) == canonical
    assert status.canonical(f"  {provider_status.upper()} ") == canonical


# --- property: apply_reports, one report at a time, over random callback sequences ------------------


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sqlite3.Connection, str, str]]:
    path = Path(tmp_path_factory.mktemp("lattice")) / "parley.db"
    conn = connect_sync(str(path))
    conn.execute("PRAGMA synchronous = OFF")  # a scratch database: durability is not under test
    migrate(conn)
    write_sync(conn, lambda c: agent_registry.sync_managed(c, str(ROOT / "data" / "agents.toml"), 0))
    org_id = write_sync(conn, lambda c: orgs.get_or_create_org(c, "lattice", 0))
    agent_id = conn.execute("SELECT id FROM agents WHERE slug = 'recall-sms'").fetchone()[0]
    yield conn, org_id, agent_id
    conn.close()


# Each conversation its own pair: a random suffix now and then named one twice, and the second could not open.
CUSTOMER_NUMBERS = itertools.count(1)


def sent_message(conn: sqlite3.Connection, org_id: str, agent_id: str) -> tuple[str, str, str]:
    """A fresh conversation whose opening SMS the provider accepted; return (conversation, message, sid)."""
    conversation = Conversation(
        id=str(uuid.uuid4()),
        org_id=org_id,
        agent_id=agent_id,
        status="in_progress",
        from_number="+15555550123",
        to_number=f"+1555{next(CUSTOMER_NUMBERS):07d}",
        dynamic_variables={},
        metadata={},
        inactivity_timeout_seconds=86400,
        created_at=0,
        last_activity_at=0,
        ended_at=None,
        end_reason=None,
        superseded_by=None,
        assistant_paused=False,
        message_count=0,
    )
    sid = "SM" + uuid.uuid4().hex

    def run(c: sqlite3.Connection) -> str:
        store.insert(c, conversation)
        message = messaging.insert_outbound(c, messaging.new_outbound(conversation, "Hi", "agent", 0, "twilio"))
        messaging.record_accepted(c, conversation, message, SendAccepted(provider_message_id=sid), 0)
        return message.id

    return conversation.id, write_sync(conn, run), sid


PROVIDER_STATUSES = [*TWILIO, "receiving", "partially_delivered"]


def real_changes(sequence: list[tuple[str, bool]]) -> int:
    """How many times the canonical status must move: first sightings that climb, until terminal."""
    current, seen, changes = "queued", set(), 0
    for provider_status, _ in sequence:
        if provider_status in seen:
            continue
        seen.add(provider_status)
        incoming = TWILIO.get(provider_status)
        if incoming is None or current in TERMINAL or RANK[incoming] <= RANK[current]:
            continue
        current, changes = incoming, changes + 1
    return changes


def callback(sid: str, message_id: str, provider_status: str, *, names_message: bool) -> StatusReport:
    """A Twilio status callback for `sid` (failures carry error 30003); its URL names our message id or not."""
    return StatusReport(
        provider_message_id=sid,
        provider_status=provider_status,
        error_code="30003" if TWILIO.get(provider_status) in {"undelivered", "failed"} else None,
        message_id=message_id if names_message else None,
        raw={"MessageSid": sid, "MessageStatus": provider_status},
    )


@st.composite
def callback_sequences(draw: st.DrawFn) -> list[tuple[str, bool]]:
    """Provider statuses with duplicates, in any order; each says whether its URL named our message id."""
    distinct = draw(st.lists(st.sampled_from(PROVIDER_STATUSES), min_size=1, max_size=8, unique=True))
    repeats = draw(st.lists(st.sampled_from(distinct), max_size=8))
    shuffled = draw(st.permutations(distinct + repeats))
    return [(s, draw(st.booleans())) for s in shuffled]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=callback_sequences())
def test_a_report_at_a_time_keeps_the_lattice_maximum_and_emits_once_per_real_change(
    db: tuple[sqlite3.Connection, str, str], sequence: list[tuple[str, bool]]
) -> None:
    conn, org_id, agent_id = db
    conversation_id, message_id, sid = sent_message(conn, org_id, agent_id)

    def current() -> str:
        return conn.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()[0]

    observed_changes: list[tuple[str, str]] = []
    for now, (provider_status, names_message) in enumerate(sequence, start=1):
        before = current()
        report = callback(sid, message_id, provider_status, names_message=names_message)
        changed = write_sync(conn, lambda c, r=report, t=now: messaging.apply_reports(c, [r], "twilio", t)) > 0
        after = current()
        assert changed == (after != before)
        if before in TERMINAL:
            assert after == before  # a terminal status never changes
        if after != before:
            assert RANK[after] > RANK[before]
            observed_changes.append((before, after))

    final = current()
    ranks = [RANK[TWILIO[s]] for s, _ in sequence if s in TWILIO]
    assert RANK[final] == max([0, *ranks])  # the lattice maximum
    first_seen = list(dict.fromkeys(s for s, _ in sequence))
    terminals = [TWILIO[s] for s in first_seen if TWILIO.get(s) in TERMINAL]
    if terminals:
        assert final == terminals[0]  # the first terminal status to arrive wins for good

    updates = [
        msgspec.json.decode(row[0])["data"]
        for row in conn.execute(
            "SELECT payload FROM events WHERE conversation_id = ? AND type = ? ORDER BY pos",
            (conversation_id, "sms.message_delivery_updated"),
        )
    ]
    assert [(u["previousStatus"], u["status"]) for u in updates] == observed_changes
    assert len(updates) == real_changes(sequence)  # one event per real change, none for the rest
    reports = conn.execute("SELECT COUNT(*) FROM status_reports WHERE provider_message_id = ?", (sid,)).fetchone()[0]
    assert reports == len(sequence)  # every raw callback is kept
    error = conn.execute("SELECT error_code FROM messages WHERE id = ?", (message_id,)).fetchone()[0]
    assert error == ("30003" if final in {"undelivered", "failed"} else None)


def _outcome(conn: sqlite3.Connection, conversation_id: str, message_id: str) -> tuple[object, ...]:
    """What a run of reports left behind, without the ids that differ from message to message."""
    row = conn.execute("SELECT status, error_code, delivered_at FROM messages WHERE id = ?", (message_id,)).fetchone()
    events = []
    for sequence, payload in conn.execute(
        "SELECT sequence, payload FROM events WHERE conversation_id = ? ORDER BY pos", (conversation_id,)
    ):
        data = msgspec.json.decode(payload)["data"]
        events.append((sequence, data.get("previousStatus"), data["status"], data.get("errorCode")))
    reports = conn.execute(
        "SELECT provider_status, applied, message_id IS NOT NULL FROM status_reports"
        " WHERE message_id = ? OR provider_message_id IN (SELECT provider_message_id FROM messages WHERE id = ?)"
        " ORDER BY id",
        (message_id, message_id),
    ).fetchall()
    return tuple(row), events, [tuple(r) for r in reports]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=callback_sequences())
def test_a_batch_of_reports_ends_exactly_as_the_same_reports_one_at_a_time(
    db: tuple[sqlite3.Connection, str, str], sequence: list[tuple[str, bool]]
) -> None:
    """`apply_reports` reads and writes a run of reports about one message once; nothing else may differ."""
    conn, org_id, agent_id = db
    one_by_one, batched = sent_message(conn, org_id, agent_id), sent_message(conn, org_id, agent_id)

    def reports_for(message_id: str, sid: str) -> list[StatusReport]:
        return [callback(sid, message_id, status, names_message=names) for status, names in sequence]

    conversation_id, message_id, sid = one_by_one
    singles = [
        write_sync(conn, lambda c, r=r: messaging.apply_reports(c, [r], "twilio", 7))
        for r in reports_for(message_id, sid)
    ]
    conversation_id_b, message_id_b, sid_b = batched
    changed = write_sync(conn, lambda c: messaging.apply_reports(c, reports_for(message_id_b, sid_b), "twilio", 7))

    assert changed == sum(singles)
    assert _outcome(conn, conversation_id_b, message_id_b) == _outcome(conn, conversation_id, message_id)


def test_a_report_that_came_before_its_message_was_known_is_applied_when_repeated(
    db: tuple[sqlite3.Connection, str, str],
) -> None:
    """A callback naming only a provider id that is not stored yet is kept but changes nothing; the same
    report, once the id is known, moves the message (a repeat is only ignored if it could not move it)."""
    conn, org_id, agent_id = db
    conversation_id, message_id, _ = sent_message(conn, org_id, agent_id)
    early_sid = "SM" + uuid.uuid4().hex

    def report() -> StatusReport:
        return StatusReport(provider_message_id=early_sid, provider_status="delivered", raw={"MessageSid": early_sid})

    assert write_sync(conn, lambda c: messaging.apply_reports(c, [report()], "twilio", 5)) == 0
    conn.execute("UPDATE messages SET provider_message_id = ? WHERE id = ?", (early_sid, message_id))
    assert write_sync(conn, lambda c: messaging.apply_reports(c, [report()], "twilio", 6)) == 1
    assert write_sync(conn, lambda c: messaging.apply_reports(c, [report()], "twilio", 7)) == 0

    assert store.get_message(conn, message_id).status == "delivered"  # type: ignore[union-attr]
    kept = conn.execute(
        "SELECT message_id IS NOT NULL, applied FROM status_reports WHERE provider_message_id = ? ORDER BY id",
        (early_sid,),
    ).fetchall()
    assert [tuple(row) for row in kept] == [(0, 0), (1, 1), (1, 0)]
    types = [row[0] for row in conn.execute("SELECT type FROM events WHERE conversation_id = ?", (conversation_id,))]
    assert types.count("sms.message_delivery_updated") == 1


def _queued_message(conn: sqlite3.Connection, org_id: str, agent_id: str) -> tuple[Conversation, Any]:
    """A fresh conversation with one outbound message persisted and not yet answered by the provider."""
    conversation_id, _, _ = sent_message(conn, org_id, agent_id)
    conversation = store.get(conn, conversation_id)
    assert conversation is not None

    def persist(c: sqlite3.Connection) -> Any:
        return messaging.insert_outbound(c, messaging.new_outbound(conversation, "Again", "operator", 0, "twilio"))

    return conversation, write_sync(conn, persist)


def _events_of(conn: sqlite3.Connection, conversation_id: str, message_id: str) -> list[tuple[str, Any, Any, Any]]:
    rows = conn.execute(
        "SELECT type, payload FROM events WHERE conversation_id = ? ORDER BY sequence", (conversation_id,)
    ).fetchall()
    found = []
    for event_type, payload in rows:
        data = msgspec.json.decode(payload)["data"]
        if data.get("messageId") == message_id:
            found.append((event_type, data.get("previousStatus"), data["status"], data.get("errorCode")))
    return found


@pytest.mark.parametrize(
    ("answer", "code", "expected"),
    [
        ("sent", None, ("sent", None)),
        ("failed", "30003", ("failed", "30003")),
        ("undelivered", "30005", ("undelivered", "30005")),
        ("delivered", None, ("delivered", None)),
    ],
)
def test_a_send_answer_past_queued_is_a_change_of_status_with_its_event_and_code(
    db: tuple[sqlite3.Connection, str, str], answer: str, code: str | None, expected: tuple[str, str | None]
) -> None:
    """A provider whose send answer already says `sent`, or `failed` with a code: the status moved without its
    `sms.message_delivery_updated`, and the code was dropped (a later callback, after a terminal, changes nothing)."""
    conn, org_id, agent_id = db
    conversation, message = _queued_message(conn, org_id, agent_id)
    accepted = SendAccepted(provider_message_id="SM" + uuid.uuid4().hex, provider_status=answer, error_code=code)
    returned = write_sync(conn, lambda c: messaging.record_accepted(c, conversation, message, accepted, 5))
    stored = store.get_message(conn, message.id)
    assert stored is not None
    assert (stored.status, stored.error_code) == expected == (returned.status, returned.error_code)
    assert _events_of(conn, conversation.id, message.id) == [
        ("sms.message_sent", None, "queued", None),
        ("sms.message_delivery_updated", "queued", expected[0], expected[1]),
    ]


def test_a_report_that_overtook_the_send_answer_records_when_the_message_was_sent(
    db: tuple[sqlite3.Connection, str, str],
) -> None:
    """`sentAt` was set when the send's answer came, after a `delivered` that overtook it: sent after delivered."""
    conn, org_id, agent_id = db
    conversation, message = _queued_message(conn, org_id, agent_id)
    sid = "SM" + uuid.uuid4().hex
    early = [callback(sid, message.id, s, names_message=True) for s in ("sent", "delivered")]
    assert write_sync(conn, lambda c: messaging.apply_reports(c, early, "twilio", 10)) == 2
    accepted = SendAccepted(provider_message_id=sid)
    write_sync(conn, lambda c: messaging.record_accepted(c, conversation, message, accepted, 30))
    stored = store.get_message(conn, message.id)
    assert stored is not None
    assert (stored.status, stored.sent_at, stored.delivered_at) == ("delivered", 10, 10)
