"""Webhook delivery against a real receiver on 127.0.0.1 that verifies every request with `standardwebhooks`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.clock import FakeClock, iso
from app.config import DEFAULT_RETRY_SCHEDULE
from app.domain.events import EVENT_TYPES
from app.webhooks import retry
from app.webhooks.delivery import MAX_RESPONSE_BODY, PER_ENDPOINT_CONCURRENCY
from tests.conftest import Harness, query, start_harness
from tests.seed import SEED_CREATE
from tests.webhook_receiver import Received, Receiver, Reply, emit, eventually, register

HOUR = 3600


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def attempts_of(h: Harness, event_id: str) -> list[Any]:
    return h.rows(
        "SELECT a.* FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
        " WHERE d.event_id = ? ORDER BY a.id",
        event_id,
    )


def delivery_of(h: Harness, event_id: str) -> Any:
    return h.rows("SELECT * FROM webhook_deliveries WHERE event_id = ?", event_id)[0]


async def settled_attempts(h: Harness, event_id: str, count: int) -> list[Any]:
    """Wait until `count` attempts of the event are recorded and the delivery's lease is released."""
    return await eventually(
        lambda: (
            (rows := attempts_of(h, event_id))
            and len(rows) >= count
            and delivery_of(h, event_id)["lease_until"] is None
            and rows
        )
    )


def scripted(
    *statuses: int, then: int = 200, headers: dict[int, dict[str, str]] | None = None
) -> Callable[[Received], Reply]:
    """Answer the n-th request with statuses[n], and `then` after the script runs out."""

    def respond(record: Received) -> Reply:
        status = statuses[record.index] if record.index < len(statuses) else then
        return Reply(status=status, headers=(headers or {}).get(record.index, {}))

    return respond


async def test_every_event_type_arrives_and_verifies(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver() as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            await register(h, receiver)
            created = await h.post("/v1/sms-conversations", SEED_CREATE)
            assert created.status_code == 201
            conversation_id = created.json()["data"]["conversationId"]
            inbound = {"from": SEED_CREATE["toNumber"], "to": SEED_CREATE["fromNumber"], "body": "When can I come in?"}
            assert (await h.post("/v1/simulator/inbound", inbound)).status_code == 201
            assert (await h.post(f"/v1/sms-conversations/{conversation_id}/close", {})).status_code == 200
            produced = {row["type"] for row in h.rows("SELECT type FROM events")}
            for event_type in EVENT_TYPES:
                if event_type not in produced:
                    await emit(h, event_type)

            def all_delivered() -> list[Any] | None:
                stored = h.rows("SELECT id, type, payload FROM events ORDER BY pos")
                got = {r.webhook_id for r in receiver.snapshot()}
                return stored if {row["id"] for row in stored} <= got else None

            stored = await eventually(all_delivered)
            assert {row["type"] for row in stored} >= set(EVENT_TYPES)
            bodies = {r.webhook_id: r for r in receiver.snapshot()}
            for row in stored:
                record = bodies[row["id"]]
                assert record.verified, row["type"]
                assert record.body == row["payload"].encode()  # exactly the stored envelope
                assert record.json["event"] == row["type"]
                assert record.headers["content-type"] == "application/json"
            closed = next(r for r in bodies.values() if r.json["event"] == "sms.conversation_closed")
            assert closed.json["conversationId"] == conversation_id
            assert closed.json["sequence"] >= 1


async def test_a_failing_receiver_gets_the_event_with_the_same_webhook_id(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver(scripted(500, 503, 502)) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            await register(h, receiver)
            event_id = await emit(h)
            for n in (1, 2, 3):
                await settled_attempts(h, event_id, n)
                due = delivery_of(h, event_id)["next_attempt_at"]
                await clock.advance((due - clock.now_ms()) / 1000)
            await settled_attempts(h, event_id, 4)
            received = receiver.snapshot()
            assert [r.webhook_id for r in received] == [event_id] * 4
            assert all(r.verified for r in received)
            assert len({r.body for r in received}) == 1
            assert [a["status_code"] for a in attempts_of(h, event_id)] == [500, 503, 502, 200]
            assert delivery_of(h, event_id)["status"] == "succeeded"
            webhook = h.rows("SELECT failing_since, last_success_at FROM webhooks")[0]
            assert webhook["failing_since"] is None and webhook["last_success_at"] == clock.now_ms()


async def test_the_full_production_schedule_runs_on_a_fake_clock(tmp_path: Path, clock: FakeClock) -> None:
    """About 27.6 hours of retries in a few real seconds, each attempt within jitter of the schedule."""
    with Receiver(lambda _: Reply(status=500)) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            assert h.settings.webhook_retry_schedule == DEFAULT_RETRY_SCHEDULE
            await register(h, receiver)
            start = clock.now_ms()
            event_id = await emit(h)
            for n in range(1, len(DEFAULT_RETRY_SCHEDULE) + 1):
                await settled_attempts(h, event_id, n)
                due = delivery_of(h, event_id)["next_attempt_at"]
                # Nothing happens a second early...
                await clock.advance((due - clock.now_ms()) / 1000 - 1)
                await asyncio.sleep(0.05)
                assert len(receiver.snapshot()) == n
                # ... and the attempt comes when it is due.
                await clock.advance(1)
                await receiver.wait_count(n + 1)
            attempts = await settled_attempts(h, event_id, len(DEFAULT_RETRY_SCHEDULE) + 1)
            times = [a["at"] for a in attempts]
            assert times[0] == start
            for gap, scheduled in zip(
                [b - a for a, b in itertools.pairwise(times)], DEFAULT_RETRY_SCHEDULE, strict=True
            ):
                assert 0.8 * scheduled * 1000 <= gap <= 1.2 * scheduled * 1000
            total_hours = (times[-1] - start) / 3_600_000
            assert 0.8 * 27.58 <= total_hours <= 1.2 * 27.58
            delivery = delivery_of(h, event_id)
            assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None
            assert delivery["attempt_count"] == 8
            assert {r.webhook_id for r in receiver.snapshot()} == {event_id}
            assert all(r.verified for r in receiver.snapshot())
            # Exhausted: a day later nothing more is tried, and the job is gone.
            await clock.advance(24 * HOUR)
            await asyncio.sleep(0.05)
            assert len(receiver.snapshot()) == 8
            assert h.rows("SELECT * FROM jobs WHERE kind = 'webhook_endpoint'") == []


async def test_410_disables_the_endpoint(tmp_path: Path, clock: FakeClock) -> None:
    gate = threading.Event()

    def gone(_: Received) -> Reply:
        gate.wait(5)  # hold the first requests until every event is queued
        return Reply(status=410)

    with Receiver(gone) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver)
            ids = [await emit(h, n=i) for i in range(10)]
            gate.set()
            await eventually(
                lambda: all(
                    d["status"] == "failed" and d["lease_until"] is None for d in map(delivery_of, [h] * 10, ids)
                )
            )
            shown = (await h.get(f"/v1/webhooks/{webhook['id']}")).json()["data"]
            assert shown["is_active"] is False
            # Only what was already on the wire went out; what was queued or leased ahead failed unsent.
            assert len(receiver.snapshot()) <= PER_ENDPOINT_CONCURRENCY
            sent = len(receiver.snapshot())
            later = await emit(h)
            await clock.advance(HOUR)
            await asyncio.sleep(0.05)
            assert len(receiver.snapshot()) == sent
            assert h.rows("SELECT * FROM webhook_deliveries WHERE event_id = ?", later) == []
            assert h.rows("SELECT * FROM jobs WHERE kind = 'webhook_endpoint'") == []


async def test_retry_after_is_honoured_up_to_twice_the_scheduled_wait(tmp_path: Path, clock: FakeClock) -> None:
    headers = {0: {"Retry-After": "15"}, 1: {"Retry-After": "100000"}}
    with Receiver(scripted(503, 503, headers=headers)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(10, 100, 100)) as h:
            await register(h, receiver)
            event_id = await emit(h)
            for n in (1, 2):
                await settled_attempts(h, event_id, n)
                await clock.advance((delivery_of(h, event_id)["next_attempt_at"] - clock.now_ms()) / 1000)
            attempts = await settled_attempts(h, event_id, 3)
            times = [a["at"] for a in attempts]
            assert times[1] - times[0] == 15_000  # asked for 15 s; the schedule alone says 10 s ±20 %
            assert times[2] - times[1] == 200_000  # asked for ~28 h; capped at twice the 100 s step
            assert delivery_of(h, event_id)["status"] == "succeeded"


@pytest.mark.parametrize(
    ("first", "status"),
    [
        (Reply(status=200, delay=0.6), 0),  # no answer in time
        (Reply(status=500, body=b"slow", body_delay=0.6), 500),  # an answer whose body does not come in time
        (Reply(status=200, body=b"slow", body_delay=0.6), 200),  # a 2xx too: not received whole in time, no success
    ],
)
async def test_a_timeout_or_429_waits_at_least_a_minute(
    tmp_path: Path, clock: FakeClock, first: Reply, status: int
) -> None:
    def respond(record: Received) -> Reply:
        return first if record.index == 0 else Reply(status=429)

    with Receiver(respond) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(5, 5, 5)) as h:
            h.ctx.webhooks.timeout = 0.2  # the production 15 s, shrunk for the test
            await register(h, receiver)
            event_id = await emit(h)
            attempt = (await settled_attempts(h, event_id, 1))[0]
            assert attempt["status_code"] == status and "timed out" in attempt["error"]
            assert delivery_of(h, event_id)["next_attempt_at"] - attempt["at"] >= 60_000
            await clock.advance((delivery_of(h, event_id)["next_attempt_at"] - clock.now_ms()) / 1000)
            second = (await settled_attempts(h, event_id, 2))[1]
            assert second["status_code"] == 429
            assert delivery_of(h, event_id)["next_attempt_at"] - second["at"] >= 60_000
            assert receiver.snapshot()[0].webhook_id == receiver.snapshot()[1].webhook_id == event_id


@pytest.mark.parametrize("retry_after", ["9" * 5000, "9" * 400, "\u00b2"])
async def test_any_retry_after_an_endpoint_sends_gets_the_schedule_not_an_instant_loop(
    tmp_path: Path, clock: FakeClock, retry_after: str
) -> None:
    """Whatever the endpoint puts in `Retry-After` (digits no float holds, a digit int() refuses), the attempt is
    recorded and the next one waits its turn: it is not handed back due at once and sent again and again."""
    with Receiver(scripted(503, headers={0: {"Retry-After": retry_after}})) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(10, 100)) as h:
            await register(h, receiver)
            event_id = await emit(h)
            first = (await settled_attempts(h, event_id, 1))[0]
            await asyncio.sleep(0.3)
            assert len(receiver.snapshot()) == 1
            assert first["status_code"] == 503
            wait = delivery_of(h, event_id)["next_attempt_at"] - first["at"]
            assert 8_000 <= wait <= 20_000  # the 10 s step, at most twice it on the header's account


async def test_a_failure_of_ours_while_sending_is_a_failed_attempt_on_the_schedule(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a stop: the delivery is not given back due at once (which sent it again at once, for ever)."""

    def broken(value: str | None, now_ms: int) -> float | None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(retry, "parse_retry_after", broken)
    with Receiver(scripted(503)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(10, 100)) as h:
            await register(h, receiver)
            event_id = await emit(h)
            (first,) = await settled_attempts(h, event_id, 1)
            await asyncio.sleep(0.3)
            assert len(receiver.snapshot()) == 1
            assert first["status_code"] == 0 and "internal error" in first["error"]
            assert delivery_of(h, event_id)["status"] == "pending"
            assert delivery_of(h, event_id)["next_attempt_at"] - first["at"] >= 8_000


def assert_each_signature_is_by(secrets: list[str], record: Any) -> None:
    """The delivery's `webhook-signature` holds one entry per secret, in this order, and each entry on its own
    verifies with its secret and with no other."""
    entries = record.signatures()
    assert len(entries) == len(secrets)
    for entry, signer in zip(entries, secrets, strict=True):
        alone = {**record.headers, "webhook-signature": entry}
        Webhook(signer).verify(record.body, alone)
        for other in set(secrets) - {signer}:
            with pytest.raises(WebhookVerificationError):
                Webhook(other).verify(record.body, alone)


async def test_rotation_sends_two_signatures_that_each_verify(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver() as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver)
            old = webhook["secret"]
            rotated = await h.post(f"/v1/webhooks/{webhook['id']}/rotate-secret")
            assert rotated.status_code == 200
            new = rotated.json()["data"]["secret"]
            assert new != old and new.startswith("whsec_")
            receiver.secrets = [new, old]
            await emit(h)
            (record,) = await receiver.wait_count(1)
            assert_each_signature_is_by([new, old], record)
            # After the 24 h overlap only the new secret signs.
            await clock.advance(24 * HOUR + 1)
            await emit(h)
            received = await receiver.wait_count(2)
            assert len(received[1].signatures()) == 1
            assert received[1].verified_by == [new]


async def rotate(h: Harness, webhook_id: str) -> str:
    rotated = await h.post(f"/v1/webhooks/{webhook_id}/rotate-secret")
    assert rotated.status_code == 200
    return str(rotated.json()["data"]["secret"])


async def test_every_secret_rotated_away_within_a_day_keeps_signing_until_its_own_overlap_ends(
    tmp_path: Path, clock: FakeClock
) -> None:
    with Receiver() as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver)
            s0 = webhook["secret"]
            s1 = await rotate(h, webhook["id"])
            await clock.advance(12 * HOUR)
            s2 = await rotate(h, webhook["id"])
            receiver.secrets = [s2, s1, s0]
            await emit(h)
            (record,) = await receiver.wait_count(1)
            assert record.verified_by == [s2, s1, s0]
            assert_each_signature_is_by([s2, s1, s0], record)
            # 24 h after the first rotation s0 stops signing; s1, rotated away 12 h later, still signs.
            await clock.advance(12 * HOUR + 1)
            await emit(h)
            received = await receiver.wait_count(2)
            assert len(received[1].signatures()) == 2
            assert received[1].verified_by == [s2, s1]
            await clock.advance(12 * HOUR)
            await emit(h)
            received = await receiver.wait_count(3)
            assert len(received[2].signatures()) == 1
            assert received[2].verified_by == [s2]


async def test_a_secret_rotated_away_is_not_kept_once_it_signs_nothing(tmp_path: Path, clock: FakeClock) -> None:
    """Housekeeping forgets each rotated-away secret, an endpoint's or an agent's tool secret, once its 24 h overlap
    has ended (a backup of the database would otherwise hold every secret ever rotated away); those still in their
    overlap stay, in their order."""

    def kept(h: Harness) -> tuple[list[str], list[str]]:
        (webhooks,) = h.rows("SELECT previous_secrets FROM webhooks")
        (agents,) = h.rows("SELECT previous_tool_secrets FROM agents WHERE kind = 'custom'")
        return [p["secret"] for p in json.loads(webhooks[0])], [p["secret"] for p in json.loads(agents[0])]

    with Receiver() as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver)
            agent = (await h.post("/v1/agents", {"name": "A", "systemPrompt": "Hi."})).json()["data"]
            secrets, tool_secrets = [webhook["secret"]], [agent["toolSecret"]]
            for wait in (12, 11, 0):  # rotated away at 0 h, 12 h and 23 h
                secrets.append(await rotate(h, webhook["id"]))
                rotated = await h.post(f"/v1/agents/{agent['agentId']}/rotate-tool-secret")
                tool_secrets.append(rotated.json()["data"]["toolSecret"])
                await clock.advance(wait * HOUR)
            assert kept(h) == (secrets[-2::-1], tool_secrets[-2::-1])

            await clock.advance(2 * HOUR)  # 25 h: the first rotated away ended its overlap, the other two did not
            await eventually(lambda: len(kept(h)[0]) == 2, timeout=5)
            assert kept(h) == (secrets[-2:0:-1], tool_secrets[-2:0:-1])
            await clock.advance(23 * HOUR)  # 48 h: every overlap has ended
            await eventually(lambda: kept(h) == ([], []), timeout=5)


async def test_at_most_ten_previous_secrets_sign_the_oldest_are_dropped(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver() as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver)
            secrets = [webhook["secret"]]
            for _ in range(12):
                await clock.advance(60)
                secrets.append(await rotate(h, webhook["id"]))
            newest_first = secrets[::-1]
            receiver.secrets = newest_first
            await emit(h)
            (record,) = await receiver.wait_count(1)
            assert len(record.signatures()) == 11
            assert record.verified_by == newest_first[:11]  # the current secret and the ten rotated away last
            stored = json.loads(h.rows("SELECT previous_secrets FROM webhooks")[0]["previous_secrets"])
            assert [p["secret"] for p in stored] == newest_first[1:11]


async def test_an_endpoint_failing_for_five_days_is_disabled(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver(lambda _: Reply(status=500)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(60,)) as h:
            webhook = await register(h, receiver)
            first = await emit(h)
            await settled_attempts(h, first, 1)
            await clock.advance(4 * 24 * HOUR)
            second = await emit(h)
            await settled_attempts(h, second, 1)
            assert (await h.get(f"/v1/webhooks/{webhook['id']}")).json()["data"]["is_active"] is True
            await clock.advance(24 * HOUR)
            third = await emit(h)
            await settled_attempts(h, third, 1)
            assert (await h.get(f"/v1/webhooks/{webhook['id']}")).json()["data"]["is_active"] is False
            assert h.rows("SELECT disabled_reason FROM webhooks")[0]["disabled_reason"] == "failing"
            assert delivery_of(h, third)["status"] == "failed"
            # Re-enabling starts the five-day clock again.
            patched = await h.client.patch(f"/v1/webhooks/{webhook['id']}", json={"is_active": True}, headers=h.auth())
            assert patched.json()["data"]["is_active"] is True
            assert h.rows("SELECT failing_since FROM webhooks")[0]["failing_since"] is None


async def test_a_slow_endpoint_does_not_starve_a_healthy_one(tmp_path: Path, clock: FakeClock) -> None:
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    def slow(record: Received) -> Reply:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            threading.Event().wait(0.3)
        finally:
            with lock:
                state["now"] -= 1
        return Reply(status=200)

    with Receiver(slow) as slow_receiver, Receiver() as fast_receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            await register(h, slow_receiver)
            await register(h, fast_receiver)
            events = [await emit(h, n=i) for i in range(16)]
            await fast_receiver.wait_count(16, timeout=2)
            assert len(slow_receiver.snapshot()) < 16  # the healthy endpoint did not wait for the slow one
            await slow_receiver.wait_count(16, timeout=5)
            assert state["max"] == PER_ENDPOINT_CONCURRENCY
            for receiver in (slow_receiver, fast_receiver):
                assert sorted(r.webhook_id for r in receiver.snapshot()) == sorted(events)  # once each
            await eventually(lambda: not h.rows("SELECT 1 FROM webhook_deliveries WHERE lease_until IS NOT NULL"))


async def test_slow_endpoints_with_backlogs_take_turns_with_the_others_for_the_slots(tmp_path: Path) -> None:
    """Every slot held by a slow endpoint working off its backlog: a newly due endpoint waits only until one gives
    its slot back at the end of its time slice, not until the backlogs are sent (here: 2 slots, 40 events each
    at 0.4 s a request on 4 lanes, ~4 s of backlog; slices of 0.3 s)."""
    from app.store.webhooks import ENDPOINT_JOB

    def slow(record: Received) -> Reply:
        threading.Event().wait(0.4)
        return Reply(status=200)

    with Receiver(slow) as first, Receiver(slow) as second, Receiver() as fast:
        async with start_harness(tmp_path) as h:
            h.ctx.scheduler.register(ENDPOINT_JOB, h.ctx.webhooks.run_endpoint, concurrency=2)
            h.ctx.webhooks.slice_seconds = 0.3
            for receiver in (first, second):
                await register(h, receiver)
            for i in range(40):
                await emit(h, n=i)
            await first.wait_count(1, timeout=3)
            await second.wait_count(1, timeout=3)
            await register(h, fast)
            started = time.monotonic()
            await emit(h, n=99)
            await fast.wait_count(1, timeout=3)
            assert time.monotonic() - started < 2.0  # the backlogs were far from sent
            assert len(first.snapshot()) < 41 and len(second.snapshot()) < 41
            await first.wait_count(41, timeout=15)
            await second.wait_count(41, timeout=15)
            for receiver in (first, second):  # once each, none lost in the hand-overs
                assert len({r.webhook_id for r in receiver.snapshot()}) == 41


async def change_endpoint(h: Harness, webhook_id: str, change: str, new_url: str) -> tuple[float, Any]:
    """Change the endpoint while its lanes are busy; return when it was acknowledged, and the answer's data."""
    path = f"/v1/webhooks/{webhook_id}"
    if change == "delete":
        response = await h.client.delete(path, headers=h.auth())
    elif change == "rotate":
        response = await h.post(f"{path}/rotate-secret")
    else:
        patch = {
            "disable": {"is_active": False},
            "move": {"url": new_url},
            "unsubscribe": {"events": ["sms.conversation_closed"]},  # `emit` sends sms.message_sent
        }[change]
        response = await h.client.patch(path, json=patch, headers=h.auth())
    assert response.status_code in (200, 204), response.text
    return time.time(), response.json()["data"] if response.content else None


@pytest.mark.parametrize("change", ["disable", "delete", "move", "rotate", "unsubscribe"])
async def test_deliveries_leased_ahead_follow_a_change_of_the_endpoint(
    tmp_path: Path, clock: FakeClock, change: str
) -> None:
    """Each lane leases the deliveries after the one on the wire: once the change is acknowledged, none of them
    goes to a disabled or deleted endpoint, to the old URL, or to an endpoint that no longer subscribes to its
    event type (a request already on the wire still lands)."""
    with Receiver(lambda _: Reply(status=200, delay=0.3)) as old, Receiver() as new:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, old)
            new.secrets = old.secrets
            events = [await emit(h, n=i) for i in range(16)]
            await old.wait_count(6)  # the second round is on the wire: every lane holds deliveries leased ahead
            acknowledged, data = await change_endpoint(h, webhook["id"], change, new.url)
            if change == "rotate":
                old.secrets = [data["secret"], *old.secrets]
            await asyncio.sleep(0.8)  # the requests on the wire land; the lanes would send what they leased
            late = [r for r in old.snapshot() if r.at > acknowledged + 0.1]
            if change == "rotate":
                await old.wait_count(16)
                late = [r for r in old.snapshot() if r.at > acknowledged + 0.1]
                assert late and all(data["secret"] in r.verified_by for r in late)  # signed with the new secret
            else:
                assert late == []
            if change == "move":
                await new.wait_count(16 - len(old.snapshot()))
                delivered = sorted(r.webhook_id for r in [*old.snapshot(), *new.snapshot()])
                assert delivered == sorted(events)  # each event once, the rest at the new URL
                assert all(r.verified for r in new.snapshot())
            await eventually(lambda: not h.rows("SELECT 1 FROM webhook_deliveries WHERE lease_until IS NOT NULL"))
            if change == "unsubscribe":  # what was not sent failed unsent (`recover` re-queues it once subscribed)
                sent = {r.webhook_id for r in old.snapshot()}
                assert {delivery_of(h, e)["status"] for e in events if e not in sent} == {"failed"}


async def test_a_queued_delivery_of_a_type_the_endpoint_unsubscribed_from_is_never_sent(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A `PATCH` of `events` applies to what is queued, as a change of URL does: a delivery waiting for its retry,
    or whose attempt fails after the change, fails unsent; the types the endpoint keeps still arrive."""
    with Receiver(lambda r: Reply(status=500, delay=0.3 if r.index == 1 else 0)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(60, 60)) as h:
            webhook = await register(h, receiver)
            waiting = await emit(h, "sms.message_sent")
            await settled_attempts(h, waiting, 1)
            on_the_wire = await emit(h, "sms.message_received")
            await receiver.wait_count(2)  # its attempt is under way (the receiver answers it 500 in 0.3 s)
            path = f"/v1/webhooks/{webhook['id']}"
            response = await h.client.patch(path, json={"events": ["sms.conversation_closed"]}, headers=h.auth())
            assert response.status_code == 200
            await settled_attempts(h, on_the_wire, 1)
            for event_id in (waiting, on_the_wire):
                delivery = delivery_of(h, event_id)
                assert (delivery["status"], delivery["next_attempt_at"]) == ("failed", None)
            kept = await emit(h, "sms.conversation_closed")
            await clock.advance(3 * 60)
            await receiver.wait_for(lambda seen: any(r.webhook_id == kept for r in seen))
            await asyncio.sleep(0.05)
            assert [r.webhook_id for r in receiver.snapshot()] == [waiting, on_the_wire, kept]


async def test_a_failed_replay_of_a_succeeded_delivery_leaves_it_succeeded(tmp_path: Path, clock: FakeClock) -> None:
    """A manual retry of a delivery that already succeeded, failing while the endpoint is disabled meanwhile, does
    not turn it `failed` (which `recover` would then send again)."""
    with Receiver(lambda r: Reply() if r.index == 0 else Reply(status=500, delay=0.3)) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)
            await settled_attempts(h, event_id, 1)
            delivery = delivery_of(h, event_id)
            assert delivery["status"] == "succeeded"
            replay = asyncio.create_task(h.post(f"/v1/webhooks/{webhook['id']}/deliveries/{delivery['id']}/retry"))
            await receiver.wait_count(2)
            path = f"/v1/webhooks/{webhook['id']}"
            assert (await h.client.patch(path, json={"is_active": False}, headers=h.auth())).status_code == 200
            response = await replay
            assert response.status_code == 200
            assert [a["status_code"] for a in response.json()["data"]["attempts"]] == [200, 500]
            assert response.json()["data"]["status"] == delivery_of(h, event_id)["status"] == "succeeded"


async def test_a_manual_retry_never_overlaps_an_attempt_in_flight(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver(lambda _: Reply(status=200, delay=0.5)) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)
            await receiver.wait_count(1)
            delivery = delivery_of(h, event_id)
            response = await h.post(f"/v1/webhooks/{webhook['id']}/deliveries/{delivery['id']}/retry")
            assert response.status_code == 409
            assert response.json()["error"]["code"] == "delivery_in_progress"
            await settled_attempts(h, event_id, 1)
            assert len(receiver.snapshot()) == 1


async def test_manual_retries_beyond_their_bounds_are_429_not_more_connections(tmp_path: Path) -> None:
    """Unbounded, manual retries to one slow endpoint took every connection of the pool, and another
    organization's healthy endpoint then timed out waiting for one. Bounds per endpoint and per organization
    answer 429; they never hold up another organization's retries, nor hide a 404."""
    from app.webhooks.delivery import MANUAL_PER_ENDPOINT, MANUAL_PER_ORG

    with Receiver(lambda _: Reply(status=200, delay=0.6)) as receiver:
        async with start_harness(tmp_path) as h:
            endpoints = [await register(h, receiver) for _ in range(MANUAL_PER_ORG // MANUAL_PER_ENDPOINT + 1)]
            theirs = await register(h, receiver, org="globex")
            h.ctx.webhooks.stop_claiming()  # only the manual retries below send anything
            ours = [await emit(h, n=i) for i in range(MANUAL_PER_ENDPOINT + 1)]
            other = await emit(h, org="globex")

            def retry(webhook: dict[str, Any], event_id: str, org: str = "acme") -> Any:
                sql = "SELECT id FROM webhook_deliveries WHERE webhook_id = ? AND event_id = ?"
                (row,) = h.rows(sql, webhook["id"], event_id)
                return h.post(f"/v1/webhooks/{webhook['id']}/deliveries/{row['id']}/retry", org=org)

            on_the_wire = [asyncio.create_task(retry(endpoints[0], e)) for e in ours[:MANUAL_PER_ENDPOINT]]
            await receiver.wait_count(MANUAL_PER_ENDPOINT)
            limited = await retry(endpoints[0], ours[-1])
            assert limited.status_code == 429, limited.text
            assert limited.json()["error"]["code"] == "rate_limited" and limited.headers["retry-after"] == "1"
            assert "endpoint" in limited.json()["error"]["message"]
            again = await retry(endpoints[0], ours[0])  # that one is on the wire: its 409 comes before any bound
            assert again.status_code == 409 and again.json()["error"]["code"] == "delivery_in_progress"
            assert [a.status_code for a in await asyncio.gather(*on_the_wire)] == [200] * MANUAL_PER_ENDPOINT

            # The organization's bound, while another organization's retry and a 404 are answered as usual.
            ours_everywhere = [retry(w, e) for w in endpoints for e in ours[:MANUAL_PER_ENDPOINT]]
            missing = h.post(f"/v1/webhooks/{endpoints[0]['id']}/deliveries/{uuid.uuid4()}/retry")
            answers = await asyncio.gather(*ours_everywhere, retry(theirs, other, org="globex"), missing)
            *mine, globex, not_found = answers
            assert sorted(a.status_code for a in mine).count(200) == MANUAL_PER_ORG, [a.text for a in mine]
            assert globex.status_code == 200 and not_found.status_code == 404


async def test_an_endpoint_keeps_its_slot_through_a_backlog_while_no_other_waits_for_one(tmp_path: Path) -> None:
    """Slices matter only while every endpoint slot is taken: otherwise ending a run would only idle the lanes
    until its slowest request is answered."""
    from app.domain.events import EventScope
    from app.store import events as event_store
    from app.store.webhooks import ENDPOINT_JOB

    with Receiver(lambda _: Reply(status=200, delay=0.02)) as receiver:
        async with start_harness(tmp_path) as h:
            await register(h, receiver)
            runs = 0
            run_endpoint = h.ctx.webhooks.run_endpoint

            async def counted(job: Any) -> int | None:
                nonlocal runs
                runs += 1
                return await run_endpoint(job)

            h.ctx.scheduler.register(ENDPOINT_JOB, counted)
            h.ctx.webhooks.slice_seconds = 0.05
            org_id = h.rows("SELECT id FROM orgs WHERE name = 'acme'")[0]["id"]
            scope = EventScope(org_id=org_id, metadata={})
            now = h.ctx.clock.now_ms()
            await h.ctx.db.write(
                lambda c: [event_store.append(c, "sms.message_sent", scope, {"n": i}, now) for i in range(60)]
            )
            h.ctx.scheduler.wake()
            await receiver.wait_count(60, timeout=10)  # ~0.3 s of backlog: six slices
            assert runs == 1


async def test_response_bodies_are_capped(tmp_path: Path, clock: FakeClock) -> None:
    big = ("é" * 15_000).encode()  # 30 000 bytes, and the cap falls inside a character
    with Receiver(lambda _: Reply(status=500, body=big)) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            await register(h, receiver)
            event_id = await emit(h)
            (attempt,) = await settled_attempts(h, event_id, 1)
            assert len(attempt["response_body"].encode()) <= MAX_RESPONSE_BODY
            assert attempt["response_body"] == "é" * (MAX_RESPONSE_BODY // 2)
            assert attempt["error"] == "HTTP 500"


async def test_a_2xx_whose_body_arrives_whole_but_cannot_be_decompressed_is_a_success(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The answer came whole and in time, only its body does not match its `Content-Encoding` (a receiver's
    misconfigured compression): the endpoint had the event and said 200. Not a failed attempt, to be sent again
    and counted toward disabling the endpoint; the attempt's error says what Parley could not read."""
    with Receiver(lambda _: Reply(status=200, headers={"Content-Encoding": "gzip"}, body=b"ok")) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)
            (attempt,) = await settled_attempts(h, event_id, 1)
            delivery = delivery_of(h, event_id)
            assert (delivery["status"], delivery["next_attempt_at"]) == ("succeeded", None)
            assert attempt["status_code"] == 200 and "could not be decoded" in attempt["error"]
            (endpoint,) = h.rows("SELECT failing_since FROM webhooks WHERE id = ?", webhook["id"])
            assert endpoint["failing_since"] is None
            await clock.advance(60)
            await asyncio.sleep(0.05)
            assert len(receiver.snapshot()) == 1


async def test_redirects_are_not_followed(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver() as target:
        with Receiver(lambda _: Reply(status=307, headers={"Location": target.url})) as receiver:
            async with start_harness(tmp_path, clock=clock) as h:
                await register(h, receiver)
                event_id = await emit(h)
                (attempt,) = await settled_attempts(h, event_id, 1)
                assert attempt["status_code"] == 307 and "redirect" in attempt["error"]
                assert delivery_of(h, event_id)["status"] == "pending"
        assert target.snapshot() == []


async def test_manual_retry_succeeds_a_failed_delivery(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver(scripted(500, 500)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(5,)) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)
            await settled_attempts(h, event_id, 1)
            await clock.advance(10)
            await settled_attempts(h, event_id, 2)
            delivery = delivery_of(h, event_id)
            assert delivery["status"] == "failed"
            response = await h.post(f"/v1/webhooks/{webhook['id']}/deliveries/{delivery['id']}/retry")
            assert response.status_code == 200
            data = response.json()["data"]
            assert data["status"] == "succeeded"
            assert [a["status_code"] for a in data["attempts"]] == [500, 500, 200]
            assert data["attempts"][-1]["at"] == iso(clock.now_ms())
            assert {r.webhook_id for r in receiver.snapshot()} == {event_id}


async def test_an_attempt_cut_off_by_a_stop_is_in_the_delivery_log(tmp_path: Path) -> None:
    """The endpoint may have received it: the log says so (status 0), and the delivery stays pending, its lease
    given back, for the next start (its schedule does not count the cut-off attempt)."""
    with Receiver(lambda _: Reply(status=200, delay=2.0)) as receiver:
        async with start_harness(tmp_path) as h:
            await register(h, receiver)
            event_id = await emit(h)
            await eventually(lambda: receiver.snapshot())  # on the wire: the receiver has it, no answer yet
            await h.ctx.scheduler.stop(grace=0)
            (attempt,) = attempts_of(h, event_id)
            assert attempt["status_code"] == 0 and attempt["error"].startswith("cut off by a stop")
            assert attempt["error"].endswith("tried again after the restart")
            delivery = delivery_of(h, event_id)
            assert (delivery["status"], delivery["attempt_count"], delivery["lease_until"]) == ("pending", 0, None)


async def test_a_manual_retry_of_a_failed_delivery_cut_off_by_a_stop_does_not_say_it_is_tried_again(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The log said "tried again after the restart" of a failed delivery, which a cut-off manual retry leaves failed."""
    with Receiver(lambda r: Reply(status=500) if r.index == 0 else Reply(status=200, delay=3.0)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=()) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)
            await settled_attempts(h, event_id, 1)
            delivery = delivery_of(h, event_id)
            assert delivery["status"] == "failed"
            path = f"/v1/webhooks/{webhook['id']}/deliveries/{delivery['id']}/retry"
            retry = asyncio.create_task(h.post(path))
            await eventually(lambda: len(receiver.snapshot()) == 2)  # on the wire, no answer yet
            retry.cancel()  # as uvicorn gives up on a request at the end of a stop's drain
            with contextlib.suppress(asyncio.CancelledError):
                await retry
            last = await eventually(lambda: (a := attempts_of(h, event_id)) and a[-1]["status_code"] == 0 and a[-1])
            assert last["error"].endswith("not tried again unless retried")
            assert delivery_of(h, event_id)["status"] == "failed"


async def test_a_manual_retry_sends_nothing_to_a_disabled_endpoint(tmp_path: Path, clock: FakeClock) -> None:
    """Disabled by a PATCH (or a 410): no request goes to it, a manual one neither (409, as `recover` answers)."""
    with Receiver(scripted(500)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=()) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)
            await settled_attempts(h, event_id, 1)
            delivery = delivery_of(h, event_id)
            disabled = await h.client.patch(
                f"/v1/webhooks/{webhook['id']}", json={"is_active": False}, headers=h.auth()
            )
            assert disabled.status_code == 200
            response = await h.post(f"/v1/webhooks/{webhook['id']}/deliveries/{delivery['id']}/retry")
            assert response.status_code == 409 and response.json()["error"]["code"] == "webhook_inactive"
            assert len(receiver.snapshot()) == 1
            assert len(attempts_of(h, event_id)) == 1


# What a crash leaves with a delivery still pending and leased (on the wire, or a manual retry): its endpoint
# disabled (or by a 410 whose backlog was not failed yet), or its event type dropped from the endpoint's `events`.
CUT_OFF_UNWANTED = {
    "disabled": "UPDATE webhooks SET is_active = 0, disabled_reason = 'gone' WHERE id = ?",
    "type_dropped": "UPDATE webhooks SET events = '[\"sms.conversation_closed\"]' WHERE id = ?",
}


@pytest.mark.parametrize("change", CUT_OFF_UNWANTED.values(), ids=CUT_OFF_UNWANTED.keys())
async def test_a_delivery_no_longer_wanted_that_a_crash_cut_off_is_failed_at_start_up(
    tmp_path: Path, clock: FakeClock, change: str
) -> None:
    """Nothing would finish such a `pending` row for hours, if ever (a disabled endpoint has no job; a dropped
    type's delivery waits for its retry to find it unwanted, its holder gone): start-up fails it, unsent."""
    with Receiver(scripted(500)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(3600,)) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)  # sms.message_sent
            await settled_attempts(h, event_id, 1)
            assert delivery_of(h, event_id)["status"] == "pending"
        conn = sqlite3.connect(tmp_path / "parley.db")
        with conn:
            conn.execute(change, (webhook["id"],))
            conn.execute("UPDATE webhook_deliveries SET lease_until = ?", (clock.now_ms() + 60_000,))
        conn.close()
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(3600,)) as h:
            delivery = delivery_of(h, event_id)
            assert (delivery["status"], delivery["next_attempt_at"], delivery["lease_until"]) == ("failed", None, None)
            await clock.advance(2 * HOUR)
            await asyncio.sleep(0.05)
            assert len(receiver.snapshot()) == 1


async def test_a_failed_manual_retry_does_not_re_enter_the_schedule(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver(lambda _: Reply(status=500)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(5,)) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)
            await settled_attempts(h, event_id, 1)
            await clock.advance(10)
            await settled_attempts(h, event_id, 2)
            delivery_id = delivery_of(h, event_id)["id"]
            response = await h.post(f"/v1/webhooks/{webhook['id']}/deliveries/{delivery_id}/retry")
            assert response.status_code == 200
            data = response.json()["data"]
            assert data["status"] == "failed" and data["next_attempt_at"] is None
            assert len(data["attempts"]) == 3
            await clock.advance(48 * HOUR)
            await asyncio.sleep(0.05)
            assert len(receiver.snapshot()) == 3


async def test_a_failed_manual_retry_keeps_a_pending_delivery_on_its_schedule(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver(scripted(500, 500)) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=(100,)) as h:
            webhook = await register(h, receiver)
            event_id = await emit(h)
            await settled_attempts(h, event_id, 1)
            before = delivery_of(h, event_id)
            response = await h.post(f"/v1/webhooks/{webhook['id']}/deliveries/{before['id']}/retry")
            data = response.json()["data"]
            assert data["status"] == "pending"
            assert data["next_attempt_at"] == iso(before["next_attempt_at"])
            await clock.advance((before["next_attempt_at"] - clock.now_ms()) / 1000)
            await settled_attempts(h, event_id, 3)
            assert delivery_of(h, event_id)["status"] == "succeeded"


async def test_a_recover_while_a_manual_retry_fails_stands(tmp_path: Path, clock: FakeClock) -> None:
    """`recover` answered `requeued: 1` for a failed delivery whose manual attempt was on the wire; that attempt's
    failure must not put the delivery back to `failed` (it wrote back the state it had leased)."""
    slow = threading.Event()

    def respond(record: Received) -> Reply:
        return Reply(status=500, delay=0.5 if slow.is_set() else 0.0)

    with Receiver(respond) as receiver:
        async with start_harness(tmp_path, clock=clock, webhook_retry_schedule=()) as h:
            webhook = await register(h, receiver)
            path = f"/v1/webhooks/{webhook['id']}"
            since = iso(clock.now_ms() - 60_000)
            event_id = await emit(h)
            await settled_attempts(h, event_id, 1)
            delivery_id = delivery_of(h, event_id)["id"]
            assert delivery_of(h, event_id)["status"] == "failed"
            slow.set()
            manual = asyncio.create_task(h.post(f"{path}/deliveries/{delivery_id}/retry"))
            await receiver.wait_count(2)  # the manual attempt is on the wire
            recovered = await h.post(f"{path}/recover", {"since": since})
            assert recovered.json()["data"] == {"requeued": 1}
            assert (await manual).json()["data"]["status"] == "pending"
            slow.clear()
            await receiver.wait_count(3)  # at once: re-queued due now, not when the manual attempt's lease would end
            await eventually(lambda: delivery_of(h, event_id)["lease_until"] is None and delivery_of(h, event_id))
            delivery = delivery_of(h, event_id)
            assert (delivery["status"], delivery["attempt_count"]) == ("failed", 1)  # the requeued schedule ran


async def test_recover_requeues_failed_and_missed_events(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver(scripted(410)) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            webhook = await register(h, receiver, events=["sms.message_sent"])
            path = f"/v1/webhooks/{webhook['id']}"
            since = iso(clock.now_ms() - 60_000)
            failed = await emit(h)
            await settled_attempts(h, failed, 1)
            missed = [await emit(h), await emit(h)]  # while the endpoint is disabled
            await emit(h, "sms.message_received")  # not subscribed: never recovered
            inactive = await h.post(f"{path}/recover", {"since": since})
            assert inactive.status_code == 409
            await h.client.patch(path, json={"is_active": True}, headers=h.auth())
            response = await h.post(f"{path}/recover", {"since": since})
            assert response.status_code == 200
            assert response.json()["data"] == {"requeued": 3}
            received = await receiver.wait_count(4)
            assert sorted(r.webhook_id for r in received[1:]) == sorted([failed, *missed])
            assert all(r.verified for r in received)
            await eventually(
                lambda: all(d["status"] == "succeeded" for d in h.rows("SELECT * FROM webhook_deliveries"))
            )
            again = await h.post(f"{path}/recover", {"since": since})
            assert again.json()["data"] == {"requeued": 0}


async def test_shutdown_lets_attempts_in_flight_finish_and_gives_back_the_rest(
    tmp_path: Path, clock: FakeClock
) -> None:
    with Receiver(lambda _: Reply(status=200, delay=0.4)) as receiver:
        async with start_harness(tmp_path, clock=clock) as h:
            await register(h, receiver)
            ids = [await emit(h, n=i) for i in range(12)]
            await receiver.wait_count(PER_ENDPOINT_CONCURRENCY)
            database = h.settings.database
        # Shut down: what was on the wire finished and was recorded; nothing stays leased.
        assert query(database, "SELECT * FROM webhook_deliveries WHERE lease_until IS NOT NULL") == []
        statuses = [r["status"] for r in query(database, "SELECT status FROM webhook_deliveries")]
        assert PER_ENDPOINT_CONCURRENCY <= statuses.count("succeeded") < len(ids)
        assert set(statuses) == {"succeeded", "pending"}
        assert len(receiver.snapshot()) == statuses.count("succeeded")
        async with start_harness(tmp_path, clock=clock) as h:
            await receiver.wait_for(lambda seen: {r.webhook_id for r in seen} == set(ids))
            await eventually(
                lambda: all(s["status"] == "succeeded" for s in h.rows("SELECT status FROM webhook_deliveries"))
            )
