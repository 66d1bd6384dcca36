"""The /v1/webhooks resources: shapes, validation, the secret shown once, org isolation."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from app.clock import iso
from app.domain.events import EVENT_TYPES
from tests.conftest import Harness, start_harness
from tests.webhook_receiver import Receiver, emit, eventually, register

FIELDS = {"id", "url", "events", "is_active", "created_at", "updated_at"}
HOOK = "https://hooks.example.com/parley"


async def patch(h: Harness, path: str, body: object, org: str = "acme"):  # type: ignore[no-untyped-def]
    return await h.client.patch(path, json=body, headers=h.auth(org))


async def delete(h: Harness, path: str, org: str = "acme"):  # type: ignore[no-untyped-def]
    return await h.client.delete(path, headers=h.auth(org))


async def test_create_shows_the_secret_once(harness: Harness) -> None:
    response = await harness.post("/v1/webhooks", {"url": HOOK, "events": ["sms.message_sent", "contact.opt_out"]})
    assert response.status_code == 201
    data = response.json()["data"]
    assert set(data) == FIELDS | {"secret"}
    assert data["url"] == HOOK
    assert data["events"] == ["sms.message_sent", "contact.opt_out"]
    assert data["is_active"] is True
    assert data["created_at"] == data["updated_at"]
    assert data["secret"].startswith("whsec_")
    assert len(base64.b64decode(data["secret"].removeprefix("whsec_"), validate=True)) == 32
    assert "request_id" in response.json()["meta"]

    shown = (await harness.get(f"/v1/webhooks/{data['id']}")).json()["data"]
    assert set(shown) == FIELDS
    listed = (await harness.get("/v1/webhooks")).json()
    assert [set(item) for item in listed["data"]] == [FIELDS]
    assert listed["meta"]["next_cursor"] is None


async def test_every_catalogue_event_and_the_wildcard_are_accepted(harness: Harness) -> None:
    response = await harness.post("/v1/webhooks", {"url": HOOK, "events": list(EVENT_TYPES)})
    assert response.status_code == 201
    assert response.json()["data"]["events"] == list(EVENT_TYPES)
    wildcard = await harness.post("/v1/webhooks", {"url": HOOK, "events": ["*", "sms.message_sent"]})
    assert wildcard.json()["data"]["events"] == ["*"]
    deduped = await harness.post("/v1/webhooks", {"url": HOOK, "events": ["contact.opt_in", "contact.opt_in"]})
    assert deduped.json()["data"]["events"] == ["contact.opt_in"]


async def test_unknown_event_names_are_400(harness: Harness) -> None:
    for events, fields in (
        (["sms.message_snet"], ["events.0"]),
        (["sms.message_sent", "conversation.created"], ["events.1"]),
        ([], ["events"]),
        (["SMS.MESSAGE_SENT"], ["events.0"]),
    ):
        response = await harness.post("/v1/webhooks", {"url": HOOK, "events": events})
        assert response.status_code == 400, events
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert [d["field"] for d in error["details"]] == fields


async def test_every_problem_of_a_webhook_body_is_named(harness: Harness) -> None:
    """SPEC §1: one entry per problem. The URL's and the events' rules are reported with the type errors."""
    cases = [
        ({"url": "ftp://x", "events": ["sms.nope", "x.y"], "foo": 1}, ["foo", "events.0", "events.1", "url"]),
        ({"url": "ftp://x", "events": ["sms.nope"]}, ["events.0", "url"]),
        ({"url": HOOK, "events": ["sms.nope", "x.y"]}, ["events.0", "events.1"]),
    ]
    for body, fields in cases:
        response = await harness.post("/v1/webhooks", body)
        assert response.status_code == 400, body
        assert sorted(d["field"] for d in response.json()["error"]["details"]) == sorted(fields), body
    hook_id = (await harness.post("/v1/webhooks", {"url": HOOK, "events": ["*"]})).json()["data"]["id"]
    patched = await patch(harness, f"/v1/webhooks/{hook_id}", {"url": "ftp://x", "events": ["bad"], "is_active": "x"})
    assert patched.status_code == 400
    assert sorted(d["field"] for d in patched.json()["error"]["details"]) == ["events.0", "is_active", "url"]


@pytest.mark.parametrize(
    ("allow_http", "rule"), [(False, "must be an https URL"), (True, "must be an http or https URL")]
)
async def test_a_body_that_fails_to_decode_names_the_url_rule_this_server_applies(
    tmp_path: Path, allow_http: bool, rule: str
) -> None:
    """A body with a type error gets its URL checked beside it: by the server's own scheme rule, not the laxest."""
    async with start_harness(tmp_path, allow_http_urls=allow_http) as h:
        response = await h.post("/v1/webhooks", {"url": "ftp://x", "events": ["*"], "foo": 1})
        assert response.status_code == 400
        (url,) = [d for d in response.json()["error"]["details"] if d["field"] == "url"]
        assert url["message"] == rule
        hook_id = (await h.post("/v1/webhooks", {"url": HOOK, "events": ["*"]})).json()["data"]["id"]
        patched = await patch(h, f"/v1/webhooks/{hook_id}", {"url": "ftp://x", "is_active": "x"})
        (url,) = [d for d in patched.json()["error"]["details"] if d["field"] == "url"]
        assert url["message"] == rule


async def test_bodies_are_decoded_strictly(harness: Harness) -> None:
    cases = [
        {"url": HOOK},
        {"events": ["*"]},
        {"url": HOOK, "events": ["*"], "secret": "whsec_mine"},
        {"url": HOOK, "events": "sms.message_sent"},
        {"url": 7, "events": ["*"]},
        {"url": "ftp://hooks.example.com/", "events": ["*"]},
    ]
    for body in cases:
        response = await harness.post("/v1/webhooks", body)
        assert response.status_code == 400, body
    raw = await harness.client.post(
        "/v1/webhooks", content=b"url=x", headers=harness.auth(**{"Content-Type": "text/plain"})
    )
    assert raw.status_code == 415


async def test_patch_changes_url_events_and_is_active(harness: Harness) -> None:
    created = (await harness.post("/v1/webhooks", {"url": HOOK, "events": ["*"]})).json()["data"]
    path = f"/v1/webhooks/{created['id']}"
    response = await patch(harness, path, {"url": HOOK + "/v2", "events": ["contact.opt_in"]})
    assert response.status_code == 200
    data = response.json()["data"]
    assert set(data) == FIELDS
    assert (data["url"], data["events"], data["is_active"]) == (HOOK + "/v2", ["contact.opt_in"], True)
    assert (await patch(harness, path, {"is_active": False})).json()["data"]["is_active"] is False
    assert (await patch(harness, path, {"is_active": True})).json()["data"]["is_active"] is True
    for bad in ({"events": ["nope"]}, {"url": "ftp://x.example/"}, {"secret": "x"}, {"is_active": "yes"}):
        assert (await patch(harness, path, bad)).status_code == 400, bad
    assert (await harness.get(path)).json()["data"]["url"] == HOOK + "/v2"


async def test_rotate_secret_returns_a_new_secret_and_keeps_the_old_one_for_a_day(harness: Harness) -> None:
    created = (await harness.post("/v1/webhooks", {"url": HOOK, "events": ["*"]})).json()["data"]
    response = await harness.post(f"/v1/webhooks/{created['id']}/rotate-secret")
    assert response.status_code == 200
    data = response.json()["data"]
    assert set(data) == FIELDS | {"secret"}
    assert data["secret"] != created["secret"]
    row = harness.rows("SELECT secret, previous_secrets FROM webhooks")[0]
    (previous,) = json.loads(row["previous_secrets"])
    assert (row["secret"], previous["secret"]) == (data["secret"], created["secret"])
    assert previous["until"] - harness.clock.now_ms() > 23 * 3_600_000


async def test_delete_removes_the_endpoint_and_its_log(harness: Harness) -> None:
    with Receiver() as receiver:
        created = await register(harness, receiver)
        await emit(harness)
        await receiver.wait_count(1)
        await eventually(lambda: harness.rows("SELECT 1 FROM webhook_attempts"))
        response = await delete(harness, f"/v1/webhooks/{created['id']}")
        assert response.status_code == 204
        assert (await harness.get(f"/v1/webhooks/{created['id']}")).status_code == 404
        assert (await delete(harness, f"/v1/webhooks/{created['id']}")).status_code == 404
        assert harness.rows("SELECT * FROM webhook_deliveries") == []
        assert harness.rows("SELECT * FROM webhook_attempts") == []
        await emit(harness)
        assert harness.rows("SELECT * FROM webhook_deliveries") == []


async def test_another_orgs_webhook_is_404_everywhere(harness: Harness) -> None:
    with Receiver() as receiver:
        created = await register(harness, receiver, org="acme")
        await emit(harness, org="acme")
        await receiver.wait_count(1)
        delivery_id = (await harness.get(f"/v1/webhooks/{created['id']}/deliveries")).json()["data"][0]["id"]
        path = f"/v1/webhooks/{created['id']}"
        other = "globex"
        calls = [
            await harness.get(path, org=other),
            await patch(harness, path, {"is_active": False}, org=other),
            await harness.post(f"{path}/rotate-secret", org=other),
            await harness.get(f"{path}/deliveries", org=other),
            await harness.post(f"{path}/deliveries/{delivery_id}/retry", org=other),
            await harness.post(f"{path}/recover", {"since": iso(harness.clock.now_ms())}, org=other),
            await delete(harness, path, org=other),
        ]
        assert [c.status_code for c in calls] == [404] * len(calls)
        assert all(c.json()["error"]["code"] == "not_found" for c in calls)
        assert (await harness.get("/v1/webhooks", org=other)).json()["data"] == []
        # Events of one org never reach another org's endpoints.
        await emit(harness, org=other)
        assert len(harness.rows("SELECT * FROM webhook_deliveries")) == 1
        assert (await harness.get(path)).json()["data"]["is_active"] is True
    for bad_id in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
        assert (await harness.get(f"/v1/webhooks/{bad_id}")).status_code == 404


async def test_subscriptions_filter_what_is_queued(harness: Harness) -> None:
    with Receiver() as receiver:
        await register(harness, receiver, events=["contact.opt_out"])
        await emit(harness, "sms.message_sent")
        wanted = await emit(harness, "contact.opt_out")
        (record,) = await receiver.wait_count(1)
        assert record.webhook_id == wanted
        assert [r["event_id"] for r in harness.rows("SELECT event_id FROM webhook_deliveries")] == [wanted]


async def test_the_delivery_log_pages_newest_first(harness: Harness) -> None:
    with Receiver() as receiver:
        created = await register(harness, receiver)
        ids = [await emit(harness, n=i) for i in range(5)]
        await receiver.wait_count(5)
        path = f"/v1/webhooks/{created['id']}/deliveries"
        await eventually(lambda: len(harness.rows("SELECT 1 FROM webhook_attempts")) == 5)
        first = (await harness.get(path, limit=3)).json()
        assert [d["event_id"] for d in first["data"]] == ids[::-1][:3]
        item = first["data"][0]
        assert set(item) == {"id", "event_id", "event", "status", "next_attempt_at", "attempts"}
        assert item["status"] == "succeeded" and item["event"] == "sms.message_sent"
        assert item["next_attempt_at"] is None
        (attempt,) = item["attempts"]
        assert set(attempt) == {"at", "status_code", "duration_ms", "error", "response_body"}
        assert attempt["status_code"] == 200 and attempt["error"] is None
        second = (await harness.get(path, limit=3, cursor=first["meta"]["next_cursor"])).json()
        assert [d["event_id"] for d in second["data"]] == ids[::-1][3:]
        assert second["meta"]["next_cursor"] is None
        assert (await harness.get(path, status="failed")).json()["data"] == []
        assert (await harness.get(path, status="bogus")).status_code == 400
        assert (await harness.get(path, cursor="!!")).status_code == 400


async def test_retry_and_recover_validate_their_input(harness: Harness) -> None:
    created = (await harness.post("/v1/webhooks", {"url": HOOK, "events": ["*"]})).json()["data"]
    path = f"/v1/webhooks/{created['id']}"
    assert (await harness.post(f"{path}/deliveries/00000000-0000-0000-0000-000000000000/retry")).status_code == 404
    assert (await harness.post(f"{path}/deliveries/nope/retry")).status_code == 404
    now = harness.clock.now_ms()
    too_old = iso(now - 15 * 86_400_000)
    for body in ({"since": too_old}, {"since": "yesterday"}, {"since": "2026-01-01T00:00:00"}, {}):
        response = await harness.post(f"{path}/recover", body)
        assert response.status_code == 400, body
    ok = await harness.post(f"{path}/recover", {"since": iso(now - 13 * 86_400_000)})
    assert ok.status_code == 200
    assert ok.json()["data"] == {"requeued": 0}


async def test_recover_skips_events_from_before_the_endpoint_existed(harness: Harness) -> None:
    with Receiver() as receiver:
        since = iso(harness.clock.now_ms() - 1000)
        for i in range(3):
            await emit(harness, n=i)
        created = await register(harness, receiver)
        response = await harness.post(f"/v1/webhooks/{created['id']}/recover", {"since": since})
        assert response.json()["data"] == {"requeued": 0}
        assert harness.rows("SELECT * FROM webhook_deliveries") == []
        assert receiver.snapshot() == []
