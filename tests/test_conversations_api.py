"""The SMS conversation API through the real app and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from app.clock import FakeClock
from tests.conftest import Harness, start_harness
from tests.provider_doubles import SimulatorHolding
from tests.seed import SEED_CREATE
from tests.webhook_receiver import eventually


def seed(**changes: Any) -> dict[str, Any]:
    body = {**SEED_CREATE, **changes}
    return {k: v for k, v in body.items() if v is not None}


async def wait_for(predicate, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_seed_close_request_answers_200(harness: Harness) -> None:
    created = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]
    response = await harness.post(
        f"/v1/sms-conversations/{created['conversationId']}/close", {"reason": "customer_resolved"}
    )
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["conversationId"] == created["conversationId"]
    assert data["status"] == "closed"
    assert data["endReason"] == "customer_resolved"
    assert data["alreadyClosed"] is False
    assert data["endedAt"].endswith("Z")
    assert response.json()["meta"]["request_id"] == response.headers["x-request-id"]


async def test_close_without_body_uses_admin_closed_and_closing_twice_is_not_an_error(harness: Harness) -> None:
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    first = await harness.client.post(f"/v1/sms-conversations/{cid}/close", headers=harness.auth())
    assert first.status_code == 200
    assert first.json()["data"]["endReason"] == "admin_closed"
    again = await harness.post(f"/v1/sms-conversations/{cid}/close", {"reason": "other"})
    assert again.status_code == 200
    assert again.json()["data"]["alreadyClosed"] is True
    assert again.json()["data"]["endReason"] == "admin_closed"
    assert again.json()["data"]["endedAt"] == first.json()["data"]["endedAt"]
    closed_events = harness.rows(
        "SELECT COUNT(*) FROM events WHERE conversation_id = ? AND type = 'sms.conversation_closed'", cid
    )[0][0]
    assert closed_events == 1


@pytest.mark.parametrize("reason", [" ", "\u200b", "a\nb", "\x00", "left\u202eright"])
async def test_a_close_reason_that_is_blank_or_not_one_line_is_400_and_closes_nothing(
    harness: Harness, reason: str
) -> None:
    """It became `endReason` as given, in reads and in every `sms.conversation_closed`."""
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    refused = await harness.post(f"/v1/sms-conversations/{cid}/close", {"reason": reason})
    assert refused.status_code == 400, refused.text
    assert [d["field"] for d in refused.json()["error"]["details"]] == ["reason"]
    assert (await harness.get(f"/v1/sms-conversations/{cid}")).json()["data"]["status"] == "in_progress"
    fine = await harness.post(f"/v1/sms-conversations/{cid}/close", {"reason": "résolu – par téléphone"})
    assert fine.json()["data"]["endReason"] == "résolu – par téléphone"


async def test_null_in_an_optional_field_means_it_is_not_given(harness: Harness) -> None:
    """Clients generated from a schema send their unset optional fields as null."""
    nulls = {"agentId": None, "metadata": None, "inactivityTimeoutSeconds": None, "welcomeMessage": None}
    body = {**SEED_CREATE, **nulls, "welcomeMessage": SEED_CREATE["welcomeMessage"]}
    key = {"Idempotency-Key": "nulls-1"}
    created = await harness.post("/v1/sms-conversations", body, **key)
    assert created.status_code == 201, created.text
    cid = created.json()["data"]["conversationId"]
    # The same create without the nulls is the same request: its key replays instead of answering 422.
    repeat = await harness.post("/v1/sms-conversations", SEED_CREATE, **key)
    assert repeat.status_code == 201 and repeat.headers["idempotent-replayed"] == "true"
    assert repeat.json()["data"]["conversationId"] == cid
    conversation = (await harness.get(f"/v1/sms-conversations/{cid}")).json()["data"]
    assert conversation["metadata"] == {} and conversation["agentSlug"] == SEED_CREATE["agentSlug"]
    closed = await harness.post(f"/v1/sms-conversations/{cid}/close", {"reason": None})
    assert closed.status_code == 200 and closed.json()["data"]["endReason"] == "admin_closed"
    only_nulls = await harness.post(
        "/v1/sms-conversations", {**SEED_CREATE, "agentSlug": None, "agentId": None, "toNumber": "+15555550111"}
    )
    assert only_nulls.status_code == 400
    assert [d["field"] for d in only_nulls.json()["error"]["details"]] == ["agentSlug"]


async def test_create_persists_conversation_message_and_event(harness: Harness) -> None:
    body = seed(metadata={"crmId": "42", "priority": 2, "vip": True}, inactivityTimeoutSeconds=3600)
    cid = (await harness.post("/v1/sms-conversations", body)).json()["data"]["conversationId"]
    response = await harness.get(f"/v1/sms-conversations/{cid}")
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["status"] == "in_progress"
    assert data["agentSlug"] == "recall-sms"
    assert data["fromNumber"] == "+15555550123"
    assert data["toNumber"] == "+15555550199"
    assert data["dynamicVariables"] == SEED_CREATE["dynamicVariables"]
    assert data["metadata"] == {"crmId": "42", "priority": 2, "vip": True}
    assert data["messageCount"] == 1
    assert data["endedAt"] is None and data["supersededBy"] is None and data["assistantPaused"] is False
    messages = (await harness.get(f"/v1/sms-conversations/{cid}/messages")).json()["data"]
    assert len(messages) == 1
    assert messages[0]["content"] == SEED_CREATE["welcomeMessage"]
    assert messages[0]["direction"] == "outbound" and messages[0]["author"] == "agent"
    assert messages[0]["sequenceNumber"] == 1
    assert messages[0]["segments"] == 1 and messages[0]["encoding"] == "GSM-7"
    events = harness.rows("SELECT type, sequence, payload FROM events WHERE conversation_id = ?", cid)
    assert [(e["type"], e["sequence"]) for e in events][:1] == [("sms.message_sent", 1)]
    assert '"crmId":"42"' in events[0]["payload"]


async def test_simulator_reports_sent_then_delivered_through_the_status_path(harness: Harness) -> None:
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]

    def delivered() -> bool:
        return harness.rows("SELECT status FROM messages WHERE conversation_id = ?", cid)[0][0] == "delivered"

    await wait_for(delivered)
    updates = harness.rows(
        "SELECT payload FROM events WHERE conversation_id = ? AND type = 'sms.message_delivery_updated' ORDER BY pos",
        cid,
    )
    assert ['"status":"sent"' in u[0] for u in updates] == [True, False]
    assert '"status":"delivered"' in updates[1][0] and '"previousStatus":"sent"' in updates[1][0]
    message = (await harness.get(f"/v1/sms-conversations/{cid}/messages")).json()["data"][0]
    assert message["deliveredAt"] is not None


async def test_magic_number_accepted_then_failed_keeps_the_error_code(harness: Harness) -> None:
    cid = (await harness.post("/v1/sms-conversations", seed(toNumber="+15005550009"))).json()["data"]["conversationId"]

    def settled() -> bool:
        return harness.rows("SELECT status FROM messages WHERE conversation_id = ?", cid)[0][0] == "failed"

    await wait_for(settled)
    assert harness.rows("SELECT error_code FROM messages WHERE conversation_id = ?", cid)[0][0] == "30003"


async def test_invalid_magic_number_is_a_provider_error_and_closes_the_conversation(harness: Harness) -> None:
    response = await harness.post("/v1/sms-conversations", seed(toNumber="+15005550001"))
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "provider_error"
    assert error["providerCode"] == "21211"
    assert response.json()["meta"]["request_id"] == response.headers["x-request-id"]
    conversation = (await harness.get(f"/v1/sms-conversations/{error['conversationId']}")).json()["data"]
    assert conversation["status"] == "closed"
    assert conversation["endReason"] == "opening_message_failed"
    message = (await harness.get(f"/v1/sms-conversations/{error['conversationId']}/messages")).json()["data"][0]
    assert message["status"] == "failed" and message["errorCode"] == "21211"


async def test_a_failed_opening_supersedes_nothing(harness: Harness) -> None:
    first = (await harness.post("/v1/sms-conversations", seed(toNumber="+15005550001"))).json()
    assert first["error"]["code"] == "provider_error"
    ok = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    failed = await harness.post("/v1/sms-conversations", seed(fromNumber="+15005550001"))
    assert failed.status_code == 502
    assert (await harness.get(f"/v1/sms-conversations/{ok}")).json()["data"]["status"] == "in_progress"


async def test_new_conversation_supersedes_the_open_one_for_the_same_pair(harness: Harness) -> None:
    old = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    other_pair = (await harness.post("/v1/sms-conversations", seed(toNumber="+15555550100"))).json()["data"][
        "conversationId"
    ]
    new = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    old_data = (await harness.get(f"/v1/sms-conversations/{old}")).json()["data"]
    assert old_data["status"] == "closed"
    assert old_data["endReason"] == "superseded_by_new_conversation"
    assert old_data["supersededBy"] == new
    assert (await harness.get(f"/v1/sms-conversations/{new}")).json()["data"]["status"] == "in_progress"
    assert (await harness.get(f"/v1/sms-conversations/{other_pair}")).json()["data"]["status"] == "in_progress"
    closed = harness.rows(
        "SELECT payload FROM events WHERE conversation_id = ? AND type = 'sms.conversation_closed'", old
    )
    assert len(closed) == 1 and f'"supersededBy":"{new}"' in closed[0][0]


async def test_fifty_concurrent_creates_for_one_pair_leave_exactly_one_in_progress(harness: Harness) -> None:
    responses = await asyncio.gather(*(harness.post("/v1/sms-conversations", SEED_CREATE) for _ in range(50)))
    assert [r.status_code for r in responses] == [201] * 50
    rows = harness.rows(
        "SELECT status, COUNT(*) FROM conversations WHERE from_number = ? AND to_number = ? GROUP BY status",
        "+15555550123",
        "+15555550199",
    )
    counts = {row[0]: row[1] for row in rows}
    assert counts == {"in_progress": 1, "closed": 49}
    superseded = harness.rows("SELECT COUNT(*) FROM conversations WHERE end_reason = 'superseded_by_new_conversation'")[
        0
    ][0]
    assert superseded == 49


async def test_list_is_newest_first_filtered_and_paginated(harness: Harness) -> None:
    ids = []
    for i in range(5):
        body = seed(toNumber=f"+1555555020{i}")
        ids.append((await harness.post("/v1/sms-conversations", body)).json()["data"]["conversationId"])
    await harness.post(f"/v1/sms-conversations/{ids[0]}/close")
    page1 = (await harness.get("/v1/sms-conversations", limit=2)).json()
    assert [c["conversationId"] for c in page1["data"]] == [ids[4], ids[3]]
    page2 = (await harness.get("/v1/sms-conversations", limit=2, cursor=page1["meta"]["next_cursor"])).json()
    assert [c["conversationId"] for c in page2["data"]] == [ids[2], ids[1]]
    page3 = (await harness.get("/v1/sms-conversations", limit=2, cursor=page2["meta"]["next_cursor"])).json()
    assert [c["conversationId"] for c in page3["data"]] == [ids[0]]
    assert page3["meta"]["next_cursor"] is None
    for name, malformed in (("toNumber", "abc"), ("fromNumber", "+1"), ("toNumber", "15555550200")):
        refused = await harness.get("/v1/sms-conversations", **{name: malformed})  # was an empty page
        assert refused.status_code == 400
        assert [d["field"] for d in refused.json()["error"]["details"]] == [name]
    closed = (await harness.get("/v1/sms-conversations", status="closed")).json()["data"]
    assert [c["conversationId"] for c in closed] == [ids[0]]
    open_ = (await harness.get("/v1/sms-conversations", status="in_progress")).json()["data"]
    assert len(open_) == 4
    by_number = (await harness.get("/v1/sms-conversations", toNumber="+15555550202")).json()["data"]
    assert [c["conversationId"] for c in by_number] == [ids[2]]


async def test_operator_message_is_sent_as_is(harness: Harness) -> None:
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    response = await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": "A person here — hi!"})
    assert response.status_code == 201
    data = response.json()["data"]
    assert data["author"] == "operator" and data["content"] == "A person here — hi!"
    assert data["sequenceNumber"] == 2 and data["encoding"] == "UCS-2"
    assert data["providerMessageId"].startswith("SM")
    phone = (await harness.get("/v1/simulator/messages", number="+15555550199")).json()["data"]
    assert [m["body"] for m in phone] == [SEED_CREATE["welcomeMessage"], "A person here — hi!"]
    assert phone[1]["messageId"] == data["messageId"]
    await harness.post(f"/v1/sms-conversations/{cid}/close")
    closed = await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": "late"})
    assert closed.status_code == 409
    assert closed.json()["error"]["code"] == "conversation_closed"


async def test_simulated_inbound_is_routed_to_the_open_conversation(harness: Harness) -> None:
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    response = await harness.post(
        "/v1/simulator/inbound", {"from": "+15555550199", "to": "+15555550123", "body": "Is it free?"}
    )
    assert response.status_code == 201
    assert response.json()["data"]["conversationId"] == cid
    messages = (await harness.get(f"/v1/sms-conversations/{cid}/messages")).json()["data"]
    assert [(m["direction"], m["author"], m["status"]) for m in messages][-1] == ("inbound", "customer", "received")
    event = harness.rows("SELECT payload FROM events WHERE type = 'sms.message_received'")[0][0]
    assert '"routed":true' in event and '"content":"Is it free?"' in event
    # `sentAt` of an inbound message: when it reached Parley, in the event and the read alike (the read said null).
    assert messages[-1]["sentAt"] == messages[-1]["createdAt"] == json.loads(event)["data"]["sentAt"]


async def test_inbound_after_close_goes_to_the_latest_conversation_unrouted(harness: Harness, caplog: Any) -> None:
    caplog.set_level("INFO", logger="parley.inbound")
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    await harness.post(f"/v1/sms-conversations/{cid}/close")
    response = await harness.post(
        "/v1/simulator/inbound", {"from": "+15555550199", "to": "+15555550123", "body": "hello?"}
    )
    assert response.json()["data"]["conversationId"] == cid
    event = harness.rows("SELECT payload FROM events WHERE type = 'sms.message_received'")[0][0]
    assert '"routed":false' in event
    stranger = await harness.post(
        "/v1/simulator/inbound", {"from": "+15555550111", "to": "+15555550123", "body": "who is this"}
    )
    assert stranger.status_code == 201
    assert stranger.json()["data"]["conversationId"] is None
    unrouted = harness.rows("SELECT org_id, conversation_id FROM messages WHERE content = 'who is this'")
    assert [tuple(r) for r in unrouted] == [(None, None)]
    logged = [r.getMessage() for r in caplog.records if r.name == "parley.inbound"]
    assert logged == ["inbound SMS from ***0111 to ***0123 matched no conversation; stored unrouted"]
    assert "+15555550111" not in caplog.text and "who is this" not in caplog.text


async def test_custom_agent_number_and_opening_template(harness: Harness) -> None:
    agent = await harness.post(
        "/v1/agents",
        {
            "name": "Service desk",
            "phoneNumber": "+15555550777",
            "openingMessage": "Hi {{customerName}}, your {{car}} is ready.",
            "requiredVariables": ["customerName"],
        },
    )
    assert agent.status_code == 201
    agent_data = agent.json()["data"]
    assert agent_data["kind"] == "custom" and agent_data["slug"] is None
    assert agent_data["toolSecret"].startswith("whsec_")
    body = {
        "agentId": agent_data["agentId"],
        "toNumber": "+15555550199",
        "fromNumber": "+15555550123",
        "dynamicVariables": {"customerName": "Ada"},
    }
    cid = (await harness.post("/v1/sms-conversations", body)).json()["data"]["conversationId"]
    conversation = (await harness.get(f"/v1/sms-conversations/{cid}")).json()["data"]
    assert conversation["fromNumber"] == "+15555550777"  # the agent's number wins
    message = (await harness.get(f"/v1/sms-conversations/{cid}/messages")).json()["data"][0]
    assert message["content"] == "Hi Ada, your  is ready."
    listed = (await harness.get("/v1/agents")).json()["data"]
    assert {a["kind"] for a in listed} == {"managed", "custom"}
    assert all("toolSecret" not in a for a in listed)
    other_org = await harness.post("/v1/sms-conversations", body, org="globex")
    assert other_org.status_code == 404


async def test_an_opening_template_that_renders_past_1600_characters_is_refused_not_cut(harness: Harness) -> None:
    agent = (await harness.post("/v1/agents", {"name": "Long", "openingMessage": "{{a}} {{b}}"})).json()["data"]
    body = {"agentId": agent["agentId"], "toNumber": "+15555550199", "fromNumber": "+15555550123"}
    too_long = await harness.post(
        "/v1/sms-conversations", {**body, "dynamicVariables": {"a": "x" * 800, "b": "y" * 800}}
    )
    assert too_long.status_code == 400
    (detail,) = too_long.json()["error"]["details"]
    assert detail["field"] == "dynamicVariables" and "1601 characters" in detail["message"]
    assert (await harness.get("/v1/sms-conversations")).json()["data"] == []  # nothing was created
    fits = await harness.post("/v1/sms-conversations", {**body, "dynamicVariables": {"a": "x" * 800, "b": "y" * 799}})
    assert fits.status_code == 201
    message = (await harness.get(f"/v1/sms-conversations/{fits.json()['data']['conversationId']}/messages")).json()
    assert len(message["data"][0]["content"]) == 1600


@pytest.mark.parametrize(
    ("value", "problem"), [("\u200b", "must not be blank"), ("Ada\x00", "control characters"), ("\x1b[2J", "control")]
)
async def test_an_opening_that_renders_invisible_or_with_a_control_character_is_refused(
    harness: Harness, value: str, problem: str
) -> None:
    agent = (await harness.post("/v1/agents", {"name": "T", "openingMessage": "{{a}}"})).json()["data"]
    body = {"agentId": agent["agentId"], "toNumber": "+15555550199", "fromNumber": "+15555550123"}
    refused = await harness.post("/v1/sms-conversations", {**body, "dynamicVariables": {"a": value}})
    assert refused.status_code == 400
    (detail,) = refused.json()["error"]["details"]
    assert detail["field"] == "dynamicVariables" and problem in detail["message"]
    assert (await harness.get("/v1/sms-conversations")).json()["data"] == []
    lines = await harness.post("/v1/sms-conversations", {**body, "dynamicVariables": {"a": "Ada,\n\tsee you"}})
    assert lines.status_code == 201


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("\u200b", "blank"),
        ("\ufeff \u200d", "blank"),
        *[(invisible, "blank") for invisible in ("\ufe0f", "\u3164", "\u2800", "\u034f", "\u115f", "\u0301")],
        ("a\x00b", "control"),
        ("\x07", "control"),
        ("a\x85", "control"),
    ],
)
async def test_an_operator_message_that_shows_nothing_or_holds_a_control_character_is_400(
    harness: Harness, content: str, problem: str
) -> None:
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    refused = await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": content})
    assert refused.status_code == 400, refused.text
    (detail,) = refused.json()["error"]["details"]
    assert detail["field"] == "content" and problem in detail["message"]
    assert harness.rows("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", cid)[0][0] == 1
    fine = await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": "Tab\there,\r\nlines\f€"})
    assert fine.status_code == 201
    drawn = await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": "\u06dd"})  # end of ayah
    assert drawn.status_code == 201


@pytest.mark.parametrize("field", ["openingMessage", "helpMessage", "closingMessage", "inactivityWarningMessage"])
@pytest.mark.parametrize(("text", "problem"), [("Hi\x07", "control characters"), ("\u200b\ufe0f", "blank")])
async def test_an_agents_texts_follow_the_sms_text_rules_when_written(
    harness: Harness, field: str, text: str, problem: str
) -> None:
    """They were accepted and then sent as the HELP answer, the nudge or the closing message (and an opening
    template with one made the agent refuse every create, blaming the create's dynamicVariables)."""
    extra = {"inactivityWarningSeconds": 60} if field == "inactivityWarningMessage" else {}
    created = await harness.post("/v1/agents", {"name": "T", field: text, **extra})
    assert created.status_code == 400, created.text
    assert [(d["field"], problem in d["message"]) for d in created.json()["error"]["details"]] == [(field, True)]
    agent = (await harness.post("/v1/agents", {"name": "T", field: "Fine text", **extra})).json()["data"]
    patched = await harness.client.patch(f"/v1/agents/{agent['agentId']}", json={field: text}, headers=harness.auth())
    assert patched.status_code == 400, patched.text
    assert (await harness.get(f"/v1/agents/{agent['agentId']}")).json()["data"][field] == "Fine text"


async def test_an_agent_an_earlier_version_accepted_stays_editable(harness: Harness) -> None:
    """A text or number stored before the rules that now refuse it is not checked again by a PATCH of other fields
    (every PATCH answered 400 until it was changed); writing a new bad one is still refused."""
    agent = (await harness.post("/v1/agents", {"name": "Old", "closingMessage": "Bye"})).json()["data"]
    conn = sqlite3.connect(harness.settings.database)
    with conn:
        conn.execute(
            "UPDATE agents SET config = json_set(config, '$.closingMessage', ?, '$.phoneNumber', ?) WHERE id = ?",
            ("Bye\x07", "+15550000", agent["agentId"]),
        )
    conn.close()
    path = f"/v1/agents/{agent['agentId']}"
    renamed = await harness.client.patch(path, json={"name": "Renamed"}, headers=harness.auth())
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["data"]["closingMessage"], renamed.json()["data"]["phoneNumber"]) == ("Bye\x07", "+15550000")
    for change in ({"closingMessage": "Bye\x00"}, {"phoneNumber": "+15550001"}):
        refused = await harness.client.patch(path, json=change, headers=harness.auth())
        assert refused.status_code == 400, refused.text
        assert [d["field"] for d in refused.json()["error"]["details"]] == list(change)


async def test_a_create_sees_an_agent_changed_through_the_api_at_once(harness: Harness) -> None:
    """Creates keep the agents they name in a cache; a change through the API drops it at once."""
    created = (await harness.post("/v1/agents", {"name": "A", "openingMessage": "First {{x}}"})).json()["data"]
    aid = created["agentId"]
    body = {"agentId": aid, "toNumber": "+15555550199", "fromNumber": "+15555550123", "dynamicVariables": {"x": "1"}}

    async def opening() -> str:
        response = await harness.post("/v1/sms-conversations", body)
        assert response.status_code == 201, response.text
        cid = response.json()["data"]["conversationId"]
        return (await harness.get(f"/v1/sms-conversations/{cid}/messages")).json()["data"][0]["content"]

    assert await opening() == "First 1"
    patched = await harness.client.patch(
        f"/v1/agents/{aid.upper()}", headers=harness.auth(), json={"openingMessage": "Second {{x}}"}
    )
    assert patched.status_code == 200
    assert await opening() == "Second 1"
    assert (await harness.client.delete(f"/v1/agents/{aid.upper()}", headers=harness.auth())).status_code == 204
    gone = await harness.post("/v1/sms-conversations", body)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


async def test_a_managed_agent_retired_by_another_process_is_refused_after_the_cache_ttl(tmp_path: Path) -> None:
    clock = FakeClock()
    async with start_harness(tmp_path, clock=clock) as harness:
        body = {**SEED_CREATE, "toNumber": "+15555550188"}
        assert (await harness.post("/v1/sms-conversations", body)).status_code == 201
        conn = sqlite3.connect(harness.settings.database)
        conn.execute("UPDATE agents SET deleted_at = 1 WHERE slug = ?", (SEED_CREATE["agentSlug"],))
        conn.commit()  # as `parley agents sync` does, from its own process, for a slug no longer listed
        conn.close()
        ttl = harness.ctx.agents.ttl_ms / 1000
        await clock.advance(ttl / 2)
        body["toNumber"] = "+15555550189"
        assert (await harness.post("/v1/sms-conversations", body)).status_code == 201  # cached, within the TTL
        await clock.advance(ttl / 2)  # the TTL runs from the look-up, however often the cached agent is used
        body["toNumber"] = "+15555550190"
        retired = await harness.post("/v1/sms-conversations", body)
        assert retired.status_code == 404 and retired.json()["error"]["code"] == "not_found"


async def test_agent_patch_rotate_and_delete(harness: Harness) -> None:
    created = (await harness.post("/v1/agents", {"name": "A", "openingMessage": "Hello"})).json()["data"]
    aid = created["agentId"]
    patched = await harness.client.patch(
        f"/v1/agents/{aid}", headers=harness.auth(), json={"name": "B", "maxReplyChars": 320}
    )
    assert patched.status_code == 200
    assert patched.json()["data"]["name"] == "B" and patched.json()["data"]["maxReplyChars"] == 320
    assert patched.json()["data"]["openingMessage"] == "Hello"
    bad = await harness.client.patch(f"/v1/agents/{aid}", headers=harness.auth(), json={"maxReplyChars": "x"})
    assert bad.status_code == 400
    rotated = await harness.post(f"/v1/agents/{aid}/rotate-tool-secret")
    assert rotated.status_code == 200
    assert rotated.json()["data"]["toolSecret"] != created["toolSecret"]
    managed = (await harness.get("/v1/agents")).json()["data"][0]
    assert (await harness.client.delete(f"/v1/agents/{managed['agentId']}", headers=harness.auth())).status_code == 404
    deleted = await harness.client.delete(f"/v1/agents/{aid}", headers=harness.auth())
    assert deleted.status_code == 204
    assert (await harness.get(f"/v1/agents/{aid}")).status_code == 404


async def test_the_messages_list_pages_by_20_unless_a_limit_is_given(harness: Harness) -> None:
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    for n in range(24):
        sent = await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": f"note {n}"})
        assert sent.status_code == 201, sent.text

    first = (await harness.get(f"/v1/sms-conversations/{cid}/messages")).json()
    rest = (await harness.get(f"/v1/sms-conversations/{cid}/messages", cursor=first["meta"]["next_cursor"])).json()
    everything = (await harness.get(f"/v1/sms-conversations/{cid}/messages", limit=100)).json()

    assert [m["sequenceNumber"] for m in first["data"]] == list(range(1, 21))
    assert [m["sequenceNumber"] for m in rest["data"]] == list(range(21, 26))
    assert rest["meta"]["next_cursor"] is None
    assert len(everything["data"]) == 25


async def test_a_phone_number_in_a_request_path_is_masked_in_the_access_log(harness: Harness, caplog: Any) -> None:
    caplog.set_level("INFO", logger="parley.access")
    conversation_id = "0195c1d2-7a3b-7c4d-8e9f-012345678901"

    await harness.get("/v1/sms-conversations/+15555550199")
    await harness.get("/v1/sms-conversations/15555550188/messages")
    await harness.get(f"/v1/sms-conversations/{conversation_id}")

    paths = [r.path for r in caplog.records if r.name == "parley.access"]
    assert paths == [
        "/v1/sms-conversations/+*******0199",
        "/v1/sms-conversations/*******0188/messages",
        f"/v1/sms-conversations/{conversation_id}",
    ]
    assert "5555550199" not in caplog.text and "5555550188" not in caplog.text


async def test_a_number_another_organization_sends_from_is_refused_and_its_conversation_untouched(
    harness: Harness,
) -> None:
    first = await harness.post("/v1/sms-conversations", SEED_CREATE)
    acme_conversation = first.json()["data"]["conversationId"]

    intruder = await harness.post("/v1/sms-conversations", SEED_CREATE, org="globex")

    assert intruder.status_code == 400, intruder.text
    assert [d["field"] for d in intruder.json()["error"]["details"]] == ["fromNumber"]
    kept = (await harness.get(f"/v1/sms-conversations/{acme_conversation}")).json()["data"]
    assert (kept["status"], kept["supersededBy"]) == ("in_progress", None)
    assert harness.rows("SELECT COUNT(*) FROM conversations")[0][0] == 1
    reply = await harness.post(
        "/v1/simulator/inbound", {"from": SEED_CREATE["toNumber"], "to": SEED_CREATE["fromNumber"], "body": "ok"}
    )
    assert reply.json()["data"]["conversationId"] == acme_conversation
    own = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": "+15555550124"}, org="globex")
    assert own.status_code == 201, own.text


async def test_a_number_claimed_only_by_a_refused_create_is_given_back(harness: Harness) -> None:
    """The provider refused globex's only send from the number: globex never sent from it, so it does not keep it."""
    number = "+15555550141"
    refused = await harness.post(
        "/v1/sms-conversations", {**SEED_CREATE, "fromNumber": number, "toNumber": "+15005550001"}, org="globex"
    )
    assert refused.status_code == 502, refused.text
    assert harness.rows("SELECT COUNT(*) FROM sender_numbers WHERE number = ?", number)[0][0] == 0

    taken = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": number})
    assert taken.status_code == 201, taken.text
    assert (
        await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": number}, org="globex")
    ).status_code == 400


async def test_a_deleted_or_renumbered_agents_number_is_given_back_unless_it_was_sent_from(harness: Harness) -> None:
    agent = {"name": "Globex line", "systemPrompt": "Hi.", "openingMessage": "Hi there."}
    unused, renumbered, used = "+15555550142", "+15555550143", "+15555550144"
    first = (await harness.post("/v1/agents", {**agent, "phoneNumber": unused}, org="globex")).json()["data"]
    second = (await harness.post("/v1/agents", {**agent, "phoneNumber": renumbered}, org="globex")).json()["data"]
    third = (await harness.post("/v1/agents", {**agent, "phoneNumber": used}, org="globex")).json()["data"]
    sent = await harness.post(
        "/v1/sms-conversations", {"agentId": third["agentId"], "toNumber": "+15555550199"}, org="globex"
    )
    assert sent.status_code == 201, sent.text
    for number in (unused, renumbered, used):  # held by globex's agents: refused to acme
        refused = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": number})
        assert refused.status_code == 400, refused.text

    for agent_id in (first["agentId"], third["agentId"]):
        gone = await harness.client.delete(f"/v1/agents/{agent_id}", headers=harness.auth("globex"))
        assert gone.status_code == 204
    moved = await harness.client.patch(
        f"/v1/agents/{second['agentId']}", json={"phoneNumber": "+15555550145"}, headers=harness.auth("globex")
    )
    assert moved.status_code == 200, moved.text

    for number in (unused, renumbered):
        taken = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": number})
        assert taken.status_code == 201, taken.text
    kept = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": used})
    assert kept.status_code == 400, kept.text  # globex sent from it: its own for good


async def test_a_custom_agent_cannot_take_another_organizations_number(harness: Harness) -> None:
    assert (await harness.post("/v1/sms-conversations", SEED_CREATE)).status_code == 201
    agent = {"name": "Globex line", "systemPrompt": "Hi.", "phoneNumber": SEED_CREATE["fromNumber"]}

    refused = await harness.post("/v1/agents", agent, org="globex")
    assert refused.status_code == 400, refused.text
    assert [d["field"] for d in refused.json()["error"]["details"]] == ["phoneNumber"]

    created = await harness.post("/v1/agents", {**agent, "phoneNumber": "+15555550125"}, org="globex")
    assert created.status_code == 201, created.text
    taken = await harness.client.patch(
        f"/v1/agents/{created.json()['data']['agentId']}",
        json={"phoneNumber": SEED_CREATE["fromNumber"]},
        headers=harness.auth("globex"),
    )
    assert taken.status_code == 400, taken.text
    mine = await harness.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": "+15555550125"})
    assert mine.status_code == 400  # acme cannot send from globex's agent's number either


async def test_a_full_last_page_says_there_is_no_next_page(harness: Harness) -> None:
    """`next_cursor` is null on the last page even when it is full (SPEC §1: null at the end), on every list."""
    hook = (await harness.post("/v1/webhooks", {"url": "http://127.0.0.1:9/x", "events": ["*"]})).json()
    ids = [
        (await harness.post("/v1/sms-conversations", seed(toNumber=f"+1555555021{i}"))).json()["data"]["conversationId"]
        for i in range(2)
    ]
    # Every event is in: both openings reported delivered (later reports would add events and deliveries).
    await eventually(lambda: harness.rows("SELECT 1 FROM messages WHERE status = 'delivered'")[1:])
    agents = (await harness.get("/v1/agents")).json()["data"]
    events = (await harness.get("/v1/events", limit=100)).json()["data"]
    deliveries = (await harness.get(f"/v1/webhooks/{hook['data']['id']}/deliveries", limit=100)).json()["data"]
    assert len(events) >= 2 and len(deliveries) >= 2
    for path, count in [
        ("/v1/sms-conversations", 2),
        (f"/v1/sms-conversations/{ids[0]}/messages", 1),
        ("/v1/agents", len(agents)),
        ("/v1/webhooks", 1),
        ("/v1/events", len(events)),
        (f"/v1/webhooks/{hook['data']['id']}/deliveries", len(deliveries)),
        ("/v1/api-keys", 1),
    ]:
        full = (await harness.get(path, limit=count)).json()
        assert len(full["data"]) == count and full["meta"]["next_cursor"] is None, path
        if count > 1:  # one fewer than there are: a next page, holding the rest
            first = (await harness.get(path, limit=count - 1)).json()
            assert first["meta"]["next_cursor"] is not None, path


async def test_an_agents_name_may_hold_any_text_and_stays_readable(harness: Harness) -> None:
    """Only an API key's name is refused control characters (it is printed on one line of `keys list`); an agent's
    is read back from storage with the same type, so a rule there would break agents stored before it."""
    created = await harness.post("/v1/agents", {"name": "Sales\tteam\n", "openingMessage": "Hi"})
    assert created.status_code == 201
    agent_id = created.json()["data"]["agentId"]
    assert (await harness.get(f"/v1/agents/{agent_id}")).json()["data"]["name"] == "Sales\tteam\n"
    assert any(a["agentId"] == agent_id for a in (await harness.get("/v1/agents")).json()["data"])


async def test_sending_in_or_resuming_a_conversation_whose_opening_is_on_its_way_is_409_pending(tmp_path: Path) -> None:
    """It said `conversation_closed` ("the conversation is closed") of a conversation open a moment later."""
    holding = SimulatorHolding(1)
    async with start_harness(tmp_path, provider=holding) as h:
        create = asyncio.create_task(h.post("/v1/sms-conversations", SEED_CREATE))
        await asyncio.wait_for(holding.holding.wait(), 5)
        cid = h.rows("SELECT id FROM conversations WHERE status = 'pending'")[0][0]
        sent = await h.post(f"/v1/sms-conversations/{cid}/messages", {"content": "Hello?"})
        resumed = await h.post(f"/v1/sms-conversations/{cid}/resume")
        for response in (sent, resumed):
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "conversation_pending"
        assert h.rows("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", cid)[0][0] == 1
        holding.release.set()
        assert (await create).status_code == 201
        assert (await h.post(f"/v1/sms-conversations/{cid}/messages", {"content": "Hello?"})).status_code == 201
        await h.post(f"/v1/sms-conversations/{cid}/close")
        closed = await h.post(f"/v1/sms-conversations/{cid}/messages", {"content": "Hello?"})
        assert (closed.status_code, closed.json()["error"]["code"]) == (409, "conversation_closed")
