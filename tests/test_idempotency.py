"""Idempotency-Key on create: replay, reuse with another body, concurrency."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import msgspec

from app.clock import FakeClock
from app.domain import messaging
from app.domain.conversations import CreateConversation, request_hash
from tests.conftest import Harness, start_harness
from tests.seed import SEED_CREATE
from tests.webhook_receiver import eventually


async def test_same_key_same_body_replays_the_first_answer_without_a_second_sms(harness: Harness) -> None:
    first = await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "abc-1"})
    second = await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "abc-1"})
    assert first.status_code == second.status_code == 201
    assert second.content == first.content  # the original body, its request_id included
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert harness.rows("SELECT COUNT(*) FROM conversations")[0][0] == 1
    assert harness.rows("SELECT COUNT(*) FROM messages")[0][0] == 1


async def test_same_key_different_body_is_422(harness: Harness) -> None:
    await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "abc-2"})
    other = {**SEED_CREATE, "welcomeMessage": "Something else"}
    response = await harness.post("/v1/sms-conversations", other, **{"Idempotency-Key": "abc-2"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert response.json()["meta"]["request_id"] == response.headers["x-request-id"]


async def test_keys_are_scoped_to_the_org(harness: Harness) -> None:
    a = await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "shared"})
    b = await harness.post(
        "/v1/sms-conversations",
        {**SEED_CREATE, "fromNumber": "+15555550124"},  # globex's own number
        org="globex",
        **{"Idempotency-Key": "shared"},
    )
    assert a.status_code == b.status_code == 201
    assert a.json()["data"]["conversationId"] != b.json()["data"]["conversationId"]


async def test_a_provider_error_is_replayed_too(harness: Harness) -> None:
    body = {**SEED_CREATE, "toNumber": "+15005550001"}
    first = await harness.post("/v1/sms-conversations", body, **{"Idempotency-Key": "bad-number"})
    second = await harness.post("/v1/sms-conversations", body, **{"Idempotency-Key": "bad-number"})
    assert first.status_code == second.status_code == 502
    assert second.content == first.content
    assert harness.rows("SELECT COUNT(*) FROM conversations")[0][0] == 1


async def test_an_earlier_4xx_is_not_stored_so_a_corrected_retry_works(harness: Harness) -> None:
    wrong = {**SEED_CREATE, "toNumber": "not a number"}
    assert (await harness.post("/v1/sms-conversations", wrong, **{"Idempotency-Key": "fix-me"})).status_code == 400
    fixed = await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "fix-me"})
    assert fixed.status_code == 201


async def test_ten_concurrent_identical_keyed_requests_create_one_conversation(harness: Harness) -> None:
    responses = await asyncio.gather(
        *(harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "burst"}) for _ in range(10))
    )
    statuses = sorted(r.status_code for r in responses)
    assert 201 in statuses
    assert set(statuses) <= {201, 409}
    for response in responses:
        if response.status_code == 409:
            assert response.json()["error"]["code"] == "idempotency_in_progress"
    created = {r.json()["data"]["conversationId"] for r in responses if r.status_code == 201}
    assert len(created) == 1
    assert harness.rows("SELECT COUNT(*) FROM conversations")[0][0] == 1
    assert harness.rows("SELECT COUNT(*) FROM messages")[0][0] == 1


async def test_a_malformed_idempotency_key_is_a_validation_error(harness: Harness) -> None:
    response = await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "x" * 256})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "validation_error"
    assert harness.rows("SELECT COUNT(*) FROM conversations")[0][0] == 0


async def test_a_key_with_a_space_is_printable_ascii_and_replays(harness: Harness) -> None:
    first = await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "order 42"})
    again = await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "order 42"})
    assert (first.status_code, again.status_code) == (201, 201), first.text
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_key_held_for_a_conversation_never_created_is_freed_at_start_up(tmp_path: Path) -> None:
    """A crash while the model wrote an opening leaves the key claimed with no conversation behind it."""
    async with start_harness(tmp_path) as h:
        h.key()
    conn = sqlite3.connect(tmp_path / "parley.db")
    with conn:
        conn.execute(
            "INSERT INTO idempotency_keys (org_id, key, request_hash, state, conversation_id, created_at, expires_at)"
            " SELECT id, 'interrupted', 'x', 'running', ?, 0, ? FROM orgs WHERE name = 'acme'",
            (str(uuid.uuid4()), 2**62),
        )
    conn.close()

    async with start_harness(tmp_path) as h:
        response = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "interrupted"})

    assert response.status_code == 201, response.text
    assert "idempotent-replayed" not in response.headers


async def test_a_key_left_held_while_the_server_runs_is_freed_once_older_than_any_create(tmp_path: Path) -> None:
    """Freeing the key of a create that ended before its conversation was written (a model-written opening, then a
    4xx) can fail (the database locked past its timeout): housekeeping frees it once older than any create takes,
    so the client's retry is not answered 409 for a day; a key taken more recently stays held."""
    clock = FakeClock()
    async with start_harness(tmp_path, clock=clock) as h:
        h.key()  # the org
        org_id = h.rows("SELECT id FROM orgs WHERE name = 'acme'")[0][0]
        now = clock.now_ms()
        conn = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
        for key, taken_at in (("stuck", now), ("recent", now + messaging.STALLED_AFTER_MS)):
            conn.execute(
                "INSERT INTO idempotency_keys (org_id, key, request_hash, state, conversation_id, created_at,"
                " expires_at) VALUES (?, ?, 'x', 'running', ?, ?, ?)",
                (org_id, key, str(uuid.uuid4()), taken_at, 2**62),
            )
        conn.close()
        await clock.advance(messaging.STALLED_AFTER_MS / 1000 + 60)  # housekeeping's next passes

        await eventually(lambda: not h.rows("SELECT 1 FROM idempotency_keys WHERE key = 'stuck'"))
        retry = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "stuck"})
        recent = [row[0] for row in h.rows("SELECT state FROM idempotency_keys WHERE key = 'recent'")]

    assert retry.status_code == 201, retry.text
    assert recent == ["running"]


async def test_a_body_no_create_accepts_is_400_even_under_a_used_key(harness: Harness) -> None:
    """Both agentSlug and agentId (a rule checked after decoding) under a stored key answered 422 "reused"."""
    assert (await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "k-400"})).status_code == 201
    both = {**SEED_CREATE, "agentId": str(uuid.uuid4())}
    response = await harness.post("/v1/sms-conversations", both, **{"Idempotency-Key": "k-400"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["details"][0]["field"] == "agentSlug"
    replay = await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "k-400"})
    assert replay.headers["idempotent-replayed"] == "true"


async def test_two_idempotency_key_headers_are_400_and_nothing_is_created(harness: Harness) -> None:
    """The first was used silently; a proxy folding them into "a, b" would make another key, and a second SMS."""
    headers = [*harness.auth().items(), ("Idempotency-Key", "dup-a"), ("Idempotency-Key", "dup-b")]
    response = await harness.client.post("/v1/sms-conversations", json=SEED_CREATE, headers=headers)
    assert response.status_code == 400, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == ["Idempotency-Key"]
    assert harness.rows("SELECT COUNT(*) FROM conversations")[0][0] == 0
    same_twice = [*harness.auth().items(), ("Idempotency-Key", "dup-a"), ("Idempotency-Key", "dup-a")]
    assert (await harness.client.post("/v1/sms-conversations", json=SEED_CREATE, headers=same_twice)).status_code == 400


async def test_a_retry_an_earlier_version_accepted_replays_though_a_rule_added_since_refuses_its_body(
    harness: Harness,
) -> None:
    """Across an upgrade, a retried create whose SMS went out answered 400 (its welcome has a BEL, its number is
    missing its area code) instead of replaying its 201: the client, told it failed, could send it again."""
    assert (await harness.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "old"})).status_code == 201
    old_body = {**SEED_CREATE, "welcomeMessage": "Hi\x07", "toNumber": "+15550001"}
    digest = request_hash(msgspec.json.decode(msgspec.json.encode(old_body), type=CreateConversation))
    conn = sqlite3.connect(harness.settings.database)
    with conn:  # as the earlier version stored it, which took that body
        conn.execute("UPDATE idempotency_keys SET request_hash = ? WHERE key = 'old'", (digest,))
    conn.close()
    replay = await harness.post("/v1/sms-conversations", old_body, **{"Idempotency-Key": "old"})
    assert (replay.status_code, replay.headers.get("idempotent-replayed")) == (201, "true"), replay.text
    fresh = await harness.post("/v1/sms-conversations", old_body, **{"Idempotency-Key": "new"})
    assert fresh.status_code == 400
    assert {d["field"] for d in fresh.json()["error"]["details"]} == {"toNumber", "welcomeMessage"}
    welcome_only = await harness.post(
        "/v1/sms-conversations", {**old_body, "toNumber": "+15555550111"}, **{"Idempotency-Key": "new"}
    )
    assert [d["field"] for d in welcome_only.json()["error"]["details"]] == ["welcomeMessage"]
    # Another body under the used key: its own rules first (it answered 422 "reused" for the welcome's BEL).
    other = await harness.post(
        "/v1/sms-conversations", {**old_body, "toNumber": "+15555550111"}, **{"Idempotency-Key": "old"}
    )
    assert (other.status_code, [d["field"] for d in other.json()["error"]["details"]]) == (400, ["welcomeMessage"])
    assert harness.rows("SELECT COUNT(*) FROM conversations")[0][0] == 1
