"""Inactivity timeouts (SPEC §3.4) on a fake clock: warning, closing message, close, and push-back."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from app.clock import FakeClock, SystemClock
from app.domain import inactivity, messaging
from app.providers.base import ProviderRejected, SendAccepted, SendRequest, StatusReport
from app.providers.simulator import SimulatorProvider
from app.store import conversations as store
from app.store.db import connect_sync, write_sync
from tests.conftest import Harness, start_harness
from tests.provider_doubles import SimulatorHolding
from tests.seed import SEED_CREATE
from tests.webhook_receiver import eventually

WARNING = "Still there? This chat closes in 10 minutes."
CLOSING = "Closing this chat for now. Text us any time."
AGENT = {
    "name": "Quiet-aware agent",
    "systemPrompt": "You are terse.",
    "inactivityTimeoutSeconds": 3600,
    "inactivityWarningSeconds": 600,
    "inactivityWarningMessage": WARNING,
    "closingMessage": CLOSING,
}


class RejectingSimulator(SimulatorProvider):
    """The simulator, except that the carrier refuses messages with one given text."""

    def __init__(self, refuse: str) -> None:
        super().__init__()
        self.refuse = refuse

    async def send(self, request: SendRequest) -> SendAccepted:
        if request.body == self.refuse:
            raise ProviderRejected("30007", "Message filtered by the carrier")
        return await super().send(request)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def open_conversation(h: Harness, agent: dict[str, Any] | None = None, **extra: Any) -> str:
    if agent is None:
        body: dict[str, Any] = {**SEED_CREATE, **extra}
    else:
        created = await h.post("/v1/agents", agent)
        assert created.status_code == 201, created.text
        body = {
            "agentId": created.json()["data"]["agentId"],
            "toNumber": SEED_CREATE["toNumber"],
            "fromNumber": SEED_CREATE["fromNumber"],
            "welcomeMessage": "Hi! Reply any time.",
            **extra,
        }
    response = await h.post("/v1/sms-conversations", body)
    assert response.status_code == 201, response.text
    return response.json()["data"]["conversationId"]


def conversation(h: Harness, conversation_id: str) -> Any:
    return h.rows("SELECT * FROM conversations WHERE id = ?", conversation_id)[0]


def messages(h: Harness, conversation_id: str) -> list[tuple[str, str, str]]:
    rows = h.rows(
        "SELECT author, content, status FROM messages WHERE conversation_id = ? ORDER BY seq", conversation_id
    )
    return [(r["author"], r["content"], r["status"]) for r in rows]


async def advance(h: Harness, clock: FakeClock, seconds: float) -> None:
    await clock.advance(seconds)
    # Let the scheduler claim anything now due and finish it before the test looks.
    await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE due_at <= ? AND kind = 'inactivity'", clock.now_ms()))
    await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE lease_until IS NOT NULL AND kind = 'inactivity'"))


async def inbound(h: Harness, body: str) -> None:
    response = await h.post(
        "/v1/simulator/inbound", {"from": SEED_CREATE["toNumber"], "to": SEED_CREATE["fromNumber"], "body": body}
    )
    assert response.status_code == 201


def closed_events(h: Harness, conversation_id: str) -> list[Any]:
    return h.rows(
        "SELECT payload FROM events WHERE conversation_id = ? AND type = 'sms.conversation_closed'", conversation_id
    )


async def test_a_quiet_conversation_closes_after_its_timeout(tmp_path: Path, clock: FakeClock) -> None:
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, inactivityTimeoutSeconds=600)
        await advance(h, clock, 599)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        await advance(h, clock, 1)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        assert closed["ended_at"] == clock.now_ms()
        (event,) = closed_events(h, conversation_id)
        assert '"endReason":"inactivity_timeout"' in event["payload"]
        assert [author for author, _, _ in messages(h, conversation_id)] == ["agent"]  # no warning configured


async def test_the_warning_comes_first_and_the_closing_message_before_the_close(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, AGENT)
        await advance(h, clock, 2999)
        assert len(messages(h, conversation_id)) == 1
        await advance(h, clock, 1)
        await eventually(lambda: len(messages(h, conversation_id)) == 2)
        assert messages(h, conversation_id)[1][:2] == ("system", WARNING)
        # The nudge is a message too, but it does not push the deadline back.
        await advance(h, clock, 599)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        assert len(messages(h, conversation_id)) == 2
        await advance(h, clock, 1)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        assert [m[:2] for m in messages(h, conversation_id)] == [
            ("agent", "Hi! Reply any time."),
            ("system", WARNING),
            ("system", CLOSING),
        ]
        sent = h.rows(
            "SELECT pos FROM events WHERE conversation_id = ? AND type = 'sms.message_sent' ORDER BY pos",
            conversation_id,
        )
        (closed_event,) = h.rows(
            "SELECT pos FROM events WHERE conversation_id = ? AND type = 'sms.conversation_closed'", conversation_id
        )
        assert sent[-1]["pos"] < closed_event["pos"]  # the closing message went out before the close
        await advance(h, clock, 86_400)
        assert len(messages(h, conversation_id)) == 3


async def test_a_message_in_between_pushes_the_deadline_back(tmp_path: Path, clock: FakeClock) -> None:
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, inactivityTimeoutSeconds=600)
        await advance(h, clock, 500)
        await inbound(h, "Is the repair free?")
        await advance(h, clock, 599)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        operator = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Yes, it is."})
        assert operator.status_code == 201
        await advance(h, clock, 599)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        await advance(h, clock, 1)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        assert closed["ended_at"] == clock.now_ms()


async def test_a_conversation_timeout_no_longer_than_the_agents_warning_lead_closes_without_a_nudge(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with start_harness(tmp_path, clock=clock) as h:
        # The agent warns 600 s before its 3600 s close; this conversation closes after 600 s of quiet.
        conversation_id = await open_conversation(h, AGENT, inactivityTimeoutSeconds=600)
        await advance(h, clock, 599)
        assert len(messages(h, conversation_id)) == 1
        await advance(h, clock, 1)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        assert closed["ended_at"] == clock.now_ms()
        assert [m[:2] for m in messages(h, conversation_id)] == [("agent", "Hi! Reply any time."), ("system", CLOSING)]


async def test_an_agents_timeout_is_taken_by_each_conversation_when_it_is_created(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with start_harness(tmp_path, clock=clock) as h:
        created = await h.post("/v1/agents", {"name": "Timeout changes", "inactivityTimeoutSeconds": 3600})
        agent_id = created.json()["data"]["agentId"]
        body = {"agentId": agent_id, "fromNumber": SEED_CREATE["fromNumber"], "welcomeMessage": "Hi!"}
        before = await h.post("/v1/sms-conversations", {**body, "toNumber": "+15555550101"})
        changed = await h.client.patch(
            f"/v1/agents/{agent_id}", json={"inactivityTimeoutSeconds": 600}, headers=h.auth()
        )
        assert changed.status_code == 200, changed.text
        after = await h.post("/v1/sms-conversations", {**body, "toNumber": "+15555550102"})
        earlier, later = before.json()["data"]["conversationId"], after.json()["data"]["conversationId"]
        await advance(h, clock, 600)
        await eventually(lambda: conversation(h, later)["status"] == "closed")
        assert conversation(h, earlier)["status"] == "in_progress"  # it keeps the 3600 s it was created with
        await advance(h, clock, 3000)
        closed = await eventually(lambda: (c := conversation(h, earlier))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"


async def test_one_warning_per_quiet_period(tmp_path: Path, clock: FakeClock) -> None:
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, AGENT)
        await advance(h, clock, 3000)
        await eventually(lambda: len(messages(h, conversation_id)) == 2)
        await advance(h, clock, 300)
        await inbound(h, "sorry, busy")  # a new quiet period starts: deadline +3600 s, warning at +3000 s
        await advance(h, clock, 2999)
        assert [a for a, _, _ in messages(h, conversation_id)] == ["agent", "system", "customer"]
        await advance(h, clock, 1)
        await eventually(lambda: len(messages(h, conversation_id)) == 4)
        await advance(h, clock, 600)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        warnings = [m for m in messages(h, conversation_id) if m[1] == WARNING]
        assert len(warnings) == 2


async def test_a_rejected_closing_message_still_closes(tmp_path: Path, clock: FakeClock) -> None:
    async with start_harness(tmp_path, clock=clock, provider=RejectingSimulator(CLOSING)) as h:
        conversation_id = await open_conversation(h, AGENT)
        await advance(h, clock, 3000)
        await advance(h, clock, 600)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        assert messages(h, conversation_id)[-1] == ("system", CLOSING, "failed")


async def test_an_opted_out_recipient_gets_nothing_but_the_conversation_closes(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, AGENT)
        row = conversation(h, conversation_id)
        await h.ctx.db.write(
            lambda c: c.execute(
                "INSERT INTO opt_outs (org_id, sender_number, phone_number, keyword, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (row["org_id"], row["from_number"], row["to_number"], "STOP", clock.now_ms()),
            )
        )
        await advance(h, clock, 3000)
        await advance(h, clock, 600)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        assert [a for a, _, _ in messages(h, conversation_id)] == ["agent"]


async def test_a_conversation_closed_otherwise_has_no_timer_left(tmp_path: Path, clock: FakeClock) -> None:
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, AGENT)
        assert h.rows("SELECT 1 FROM jobs WHERE kind = 'inactivity' AND ref = ?", conversation_id)
        await h.post(f"/v1/sms-conversations/{conversation_id}/close", {})
        assert h.rows("SELECT 1 FROM jobs WHERE kind = 'inactivity' AND ref = ?", conversation_id) == []
        await advance(h, clock, 7200)
        assert conversation(h, conversation_id)["end_reason"] == "admin_closed"
        assert len(messages(h, conversation_id)) == 1


async def test_a_timer_cut_off_by_a_stop_runs_as_soon_as_the_server_is_back(tmp_path: Path) -> None:
    """A job still leased at start-up was interrupted: it runs when due, not when its lease would end."""
    async with start_harness(tmp_path) as h:
        conversation_id = await open_conversation(h, inactivityTimeoutSeconds=3600)
        key = h.key()
    # As a stop or crash leaves it: quiet for over an hour, the timer due, claimed a moment ago, lease minutes away.
    now = SystemClock().now_ms()
    conn = sqlite3.connect(tmp_path / "parley.db")
    with conn:
        conn.execute("UPDATE conversations SET last_activity_at = ? WHERE id = ?", (now - 3_700_000, conversation_id))
        conn.execute(
            "UPDATE jobs SET due_at = ?, payload = json_object('deadline', ?), lease_until = ?"
            " WHERE kind = 'inactivity' AND ref = ?",
            (now - 1000, now - 1000, now + 120_000, conversation_id),
        )
    conn.close()

    async with start_harness(tmp_path) as h:
        h.keys["acme"] = key
        await eventually(lambda: conversation(h, conversation_id)["status"] == "closed", timeout=3.0)
        assert conversation(h, conversation_id)["end_reason"] == "inactivity_timeout"


async def test_a_customer_who_writes_while_the_closing_message_is_on_its_way_keeps_the_conversation_open(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The provider takes its time with the closing message, and the customer writes meanwhile: that text starts
    a new quiet period (SPEC §3.4), so the conversation is not closed under them."""
    agent = {key: value for key, value in AGENT.items() if not key.startswith("inactivityWarning")}
    holding = SimulatorHolding(2)  # the opening goes out; the closing message waits at the provider
    async with start_harness(tmp_path, clock=clock, provider=holding) as h:
        conversation_id = await open_conversation(h, agent)
        await clock.advance(3600)
        await eventually(holding.holding.is_set)
        await inbound(h, "Wait, one more question")
        holding.release.set()
        # Delivered (the simulator reports after it took the text): the timer's run has finished with it.
        await eventually(lambda: messages(h, conversation_id)[-2] == ("system", CLOSING, "delivered") or None)
        await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE lease_until IS NOT NULL AND kind = 'inactivity'"))

        assert conversation(h, conversation_id)["status"] == "in_progress"
        await advance(h, clock, 3600)  # quiet for a whole timeout after the customer's text: now it closes
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"


class HoldingClosingRefusing(SimulatorProvider):
    """The simulator, except that the closing message (or `held`) waits for `release` and one other text is
    refused."""

    def __init__(self, refuse: str, held: str = CLOSING) -> None:
        super().__init__()
        self.refuse = refuse
        self.held = held
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, request: SendRequest) -> SendAccepted:
        if request.body == self.held:
            self.holding.set()
            await self.release.wait()
        if request.body == self.refuse:
            raise ProviderRejected("30007", "Message filtered by the carrier")
        return await super().send(request)


async def test_a_message_the_provider_refused_while_the_closing_message_was_on_its_way_does_not_keep_it_open(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A refused message was neither sent nor received (SPEC §3.4): the close goes ahead, as it would outside that
    window."""
    agent = {key: value for key, value in AGENT.items() if not key.startswith("inactivityWarning")}
    provider = HoldingClosingRefusing("Operator here")
    async with start_harness(tmp_path, clock=clock, provider=provider) as h:
        conversation_id = await open_conversation(h, agent)
        await clock.advance(3600)
        await eventually(provider.holding.is_set)
        refused = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Operator here"})
        assert refused.status_code == 502, refused.text

        provider.release.set()

        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"


@pytest.mark.parametrize(
    ("content", "answered", "due_after"),
    [("Operator here", 502, 3600), ("Operator speaking", 201, 3000 + 3600 - 600)],
)
async def test_the_nudge_keeps_the_deadline_unless_a_message_went_out_while_it_was_on_its_way(
    tmp_path: Path, clock: FakeClock, content: str, answered: int, due_after: int
) -> None:
    """A message sent while the inactivity warning is at the provider starts a new quiet period (its warning is then
    due); a message the provider refused was neither sent nor received, so the close stays where it was."""
    provider = HoldingClosingRefusing("Operator here", held=WARNING)
    async with start_harness(tmp_path, clock=clock, provider=provider) as h:
        conversation_id = await open_conversation(h, AGENT)
        start = clock.now_ms()
        await clock.advance(3000)  # the warning is due 600 s before the 3600 s deadline
        await eventually(provider.holding.is_set)
        response = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": content})
        assert response.status_code == answered, response.text
        provider.release.set()
        # Delivered: the simulator reports after the send's acceptance was recorded, when the warning run is over.
        await eventually(lambda: any(m[1] == WARNING and m[2] == "delivered" for m in messages(h, conversation_id)))
        await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE lease_until IS NOT NULL AND kind = 'inactivity'"))
        (job,) = h.rows("SELECT due_at FROM jobs WHERE kind = 'inactivity' AND ref = ?", conversation_id)
        assert (job["due_at"] - start) / 1000 == due_after


@pytest.mark.parametrize(("author", "rearmed"), [("system", False), ("operator", True), ("agent", True)])
async def test_a_message_parley_writes_itself_is_not_activity(
    tmp_path: Path, clock: FakeClock, author: str, rearmed: bool
) -> None:
    """Recording the nudge's send re-armed the warning timer (put back only by a later write): a crash between
    the two nudged the customer again and pushed the close back."""
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, AGENT)
        before = h.rows("SELECT due_at, payload FROM jobs WHERE kind = 'inactivity' AND ref = ?", conversation_id)
        await clock.advance(60)
        conn = connect_sync(h.settings.database)
        try:
            current = store.get(conn, conversation_id)
            assert current is not None

            def send(c: sqlite3.Connection) -> None:
                message = messaging.insert_outbound(c, messaging.new_outbound(current, "x", author, 0, "simulator"))
                accepted = SendAccepted(provider_message_id="SM" + "a" * 32)
                messaging._record_sent(c, current, message, accepted, clock.now_ms())

            write_sync(conn, send)
        finally:
            conn.close()
        after = h.rows("SELECT due_at, payload FROM jobs WHERE kind = 'inactivity' AND ref = ?", conversation_id)
        assert (tuple(after[0]) != tuple(before[0])) is rearmed


async def test_a_close_cut_off_after_its_closing_message_is_finished_without_sending_it_again(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A stop while the closing message was at the provider left the timer as it was: after the restart the job
    sent the closing message again (and a crash after the send re-armed a whole new quiet period)."""
    agent = {key: value for key, value in AGENT.items() if not key.startswith("inactivityWarning")}
    provider = HoldingClosingRefusing("never refused")
    async with start_harness(tmp_path, clock=clock, provider=provider) as h:
        conversation_id = await open_conversation(h, agent)
        key = h.key()
        await clock.advance(3600)
        await eventually(provider.holding.is_set)
        # The server stops here, the closing message still at the provider (never released).
    async with start_harness(tmp_path, clock=clock) as h:
        h.keys["acme"] = key
        await eventually(lambda: not h.ctx.recovering)  # start-up has settled the closing message the stop cut off
        await advance(h, clock, inactivity.FINISH_CLOSE_AFTER_MS / 1000)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        closings = [m for m in messages(h, conversation_id) if m[1] == CLOSING]
        assert len(closings) == 1  # not sent again; start-up settled the one the stop cut off
        await advance(h, clock, 7200)
        assert len([m for m in messages(h, conversation_id) if m[1] == CLOSING]) == 1


class HoldingTexts(SimulatorProvider):
    """The simulator, except that each of `texts` waits at the provider until its own release."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.holding = {text: asyncio.Event() for text in texts}
        self.release = {text: asyncio.Event() for text in texts}
        self.refuse: set[str] = set()  # released texts the carrier then refuses

    async def send(self, request: SendRequest) -> SendAccepted:
        if request.body in self.holding:
            self.holding[request.body].set()
            await self.release[request.body].wait()
        if request.body in self.refuse:
            raise ProviderRejected("30007", "Message filtered by the carrier")
        return await super().send(request)


async def closing_message_taken_before_the_operators(
    h: Harness, clock: FakeClock, provider: HoldingTexts
) -> tuple[str, asyncio.Task[Any]]:
    """A quiet conversation whose closing message is at the provider when an operator's message goes out; the
    closing message is then taken, the operator's still held. Returns the conversation and the operator's request."""
    agent = {key: value for key, value in AGENT.items() if not key.startswith("inactivityWarning")}
    conversation_id = await open_conversation(h, agent)
    await clock.advance(3600)
    await eventually(provider.holding[CLOSING].is_set)
    operator = asyncio.create_task(
        h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Operator here"})
    )
    await eventually(provider.holding["Operator here"].is_set)
    provider.release[CLOSING].set()
    await eventually(lambda: messages(h, conversation_id)[1][2] != "queued" or None)
    return conversation_id, operator


async def test_a_message_whose_send_outlasts_the_closing_messages_keeps_the_conversation_open(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Persisted while the closing message was at the provider but taken after it: the close went ahead (only the
    acceptance counted as activity), and the customer's answer to that message met a closed conversation."""
    provider = HoldingTexts(CLOSING, "Operator here")
    async with start_harness(tmp_path, clock=clock, provider=provider) as h:
        conversation_id, operator = await closing_message_taken_before_the_operators(h, clock, provider)
        await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE lease_until IS NOT NULL AND kind = 'inactivity'"))
        assert conversation(h, conversation_id)["status"] == "in_progress"
        provider.release["Operator here"].set()
        assert (await operator).status_code == 201
        await advance(h, clock, 3599)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        await advance(h, clock, 1)  # a whole quiet period after the operator's message
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"


async def operator_message_held_at_the_deadline(
    h: Harness, clock: FakeClock, provider: HoldingTexts
) -> tuple[str, asyncio.Task[Any]]:
    """A conversation whose operator message, sent 10 s before its close is due, is held at the provider."""
    agent = {key: value for key, value in AGENT.items() if not key.startswith("inactivityWarning")}
    conversation_id = await open_conversation(h, agent)
    await clock.advance(3590)
    operator = asyncio.create_task(
        h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Operator here"})
    )
    await eventually(provider.holding["Operator here"].is_set)
    return conversation_id, operator


async def test_a_close_due_while_a_message_is_on_its_way_waits_for_its_outcome(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Taken after the deadline, it is activity: no closing message in the meantime, a new quiet period after."""
    provider = HoldingTexts("Operator here")
    async with start_harness(tmp_path, clock=clock, provider=provider) as h:
        conversation_id, operator = await operator_message_held_at_the_deadline(h, clock, provider)
        await advance(h, clock, 10 + inactivity.SENDING_RECHECK_MS / 1000 * 3)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        assert [m[1] for m in messages(h, conversation_id)] == ["Hi! Reply any time.", "Operator here"]
        provider.release["Operator here"].set()
        assert (await operator).status_code == 201
        await advance(h, clock, 3599)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        await advance(h, clock, 1)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        assert [m[1] for m in messages(h, conversation_id)][-1] == CLOSING


async def test_a_closing_message_an_earlier_version_stored_is_sent_without_its_control_characters(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Stored before the text rules (which now refuse it when written), it was sent with its NUL."""
    agent = {key: value for key, value in AGENT.items() if not key.startswith("inactivityWarning")}
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, agent)
        conn = sqlite3.connect(h.settings.database)
        with conn:
            conn.execute("UPDATE agents SET config = json_set(config, '$.closingMessage', ?)", ("Bye\x00 now",))
        conn.close()
        await advance(h, clock, 3600)
        await eventually(lambda: conversation(h, conversation_id)["status"] == "closed")
        assert messages(h, conversation_id)[-1][:2] == ("system", "Bye now")


async def test_a_message_sent_after_the_closing_message_and_then_refused_lets_the_close_finish(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The close's run returned early while that message was on its way, and its job was deleted: refused (which
    re-arms nothing), it left the conversation open with no timer at all, for good."""
    provider = HoldingTexts(CLOSING, "Operator here")
    async with start_harness(tmp_path, clock=clock, provider=provider) as h:
        conversation_id, operator = await closing_message_taken_before_the_operators(h, clock, provider)
        for _ in range(3):  # the mark's own runs, while the operator's message is still on its way
            await advance(h, clock, inactivity.SENDING_RECHECK_MS / 1000)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        assert h.rows("SELECT 1 FROM jobs WHERE kind = 'inactivity' AND ref = ?", conversation_id)
        provider.refuse.add("Operator here")
        provider.release["Operator here"].set()
        assert (await operator).status_code == 502
        await advance(h, clock, inactivity.SENDING_RECHECK_MS / 1000)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        assert [m[1] for m in messages(h, conversation_id)].count(CLOSING) == 1


async def test_a_status_report_that_overtakes_a_sends_answer_is_activity(tmp_path: Path, clock: FakeClock) -> None:
    """The provider took the message (its report says so) but its answer had not come: the close went ahead at the
    deadline, as if nothing had been sent."""
    provider = HoldingTexts("Operator here")
    async with start_harness(tmp_path, clock=clock, provider=provider) as h:
        conversation_id, operator = await operator_message_held_at_the_deadline(h, clock, provider)
        (row,) = h.rows("SELECT id FROM messages WHERE content = 'Operator here'")
        report = StatusReport(provider_message_id="SM" + "b" * 32, provider_status="sent", message_id=row["id"])
        assert await messaging.record_reports(h.ctx, [report]) == 1
        await advance(h, clock, 30)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        assert [m[1] for m in messages(h, conversation_id)] == ["Hi! Reply any time.", "Operator here"]
        provider.release["Operator here"].set()
        await operator


async def test_a_close_waits_while_start_up_is_still_settling_a_message_of_the_conversation(
    tmp_path: Path, clock: FakeClock
) -> None:
    """After a longer outage the timer ran before start-up recovery had asked the provider about a message a crash
    cut off: the conversation closed at once, though the provider had taken that message within the timeout."""
    agent = {key: value for key, value in AGENT.items() if not key.startswith("inactivityWarning")}
    async with start_harness(tmp_path, clock=clock) as h:
        conversation_id = await open_conversation(h, agent)
        h.ctx.recovering.add(conversation_id)  # as start-up leaves it while it asks about a cut-off send
        await advance(h, clock, 3600 + 3 * inactivity.SENDING_RECHECK_MS / 1000)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        assert len(messages(h, conversation_id)) == 1
        h.ctx.recovering.discard(conversation_id)
        await advance(h, clock, inactivity.SENDING_RECHECK_MS / 1000)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"


async def test_a_message_stuck_on_its_way_after_the_closing_message_holds_the_close_ten_minutes_at_most(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A later message that never gets an answer (a bug, a failed recovery) kept the close looking again every 5 s
    for good, after the customer had the closing message."""
    provider = HoldingTexts(CLOSING, "Operator here")
    async with start_harness(tmp_path, clock=clock, provider=provider) as h:
        conversation_id, operator = await closing_message_taken_before_the_operators(h, clock, provider)
        await advance(h, clock, inactivity.SENDING_RECHECK_MS / 1000)
        assert conversation(h, conversation_id)["status"] == "in_progress"
        await advance(h, clock, inactivity.SENDING_FOR_AT_MOST_MS / 1000)
        closed = await eventually(lambda: (c := conversation(h, conversation_id))["status"] == "closed" and c)
        assert closed["end_reason"] == "inactivity_timeout"
        provider.release["Operator here"].set()
        await operator
