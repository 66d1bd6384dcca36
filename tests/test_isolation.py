"""Organization isolation, route by route from the app's own route table: a key of another organization can
neither read nor change anything of this one's, nor tell its resources apart from ones that do not exist."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from app.domain.assistant import TURN_JOB
from tests.conftest import Harness, start_harness
from tests.seed import SEED_CREATE
from tests.webhook_receiver import Receiver, eventually

OWNER, OTHER = "acme", "globex"
PARAM = re.compile(r"\{(\w+):\w+\}")
# What a request needs to pass its body checks, so that the answer depends on the resource alone.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/sms-conversations/{conversation_id}/messages"): {"content": "from the other org"},
    ("POST", "/v1/sms-conversations/{conversation_id}/close"): {"reason": "other_org"},
    ("PATCH", "/v1/agents/{agent_id}"): {"name": "taken over"},
    ("PATCH", "/v1/webhooks/{webhook_id}"): {"is_active": False, "events": ["sms.message_sent"]},
    ("POST", "/v1/webhooks/{webhook_id}/recover"): {
        "since": (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    },
}
HEADERS_THAT_SAY_SOMETHING = ("content-type", "allow", "www-authenticate", "retry-after", "idempotent-replayed")


def keyed_templates(h: Harness) -> list[tuple[str, str]]:
    """(method, path template) of every keyed /v1 route with a path parameter, from the app's route table."""
    found = []
    for route in h.edge.app.routes:
        template = PARAM.sub(r"{\1}", route.path)
        if template.startswith("/v1/") and not template.startswith("/v1/providers/") and PARAM.search(route.path):
            found += [(method, template) for method in sorted(route.methods) if method != "HEAD"]
    return found


def shape(response: httpx.Response) -> tuple[Any, ...]:
    """Everything an answer says, but its request id."""
    body: Any = response.content
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        body.get("meta", {}).pop("request_id", None)
    return response.status_code, {h: response.headers.get(h) for h in HEADERS_THAT_SAY_SOMETHING}, body


async def call(h: Harness, method: str, template: str, ids: dict[str, str], org: str) -> httpx.Response:
    path = template.format(**ids)
    body = BODIES.get((method, template))
    kwargs: dict[str, Any] = {"headers": h.auth(org)}
    if body is not None:
        kwargs["json"] = body
    return await h.client.request(method, path, **kwargs)


def owner_state(h: Harness, org_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the owner has, in every per-organization table (webhook attempts through their deliveries)."""
    tables = {
        "conversations": "SELECT * FROM conversations WHERE org_id = ? ORDER BY id",
        "messages": "SELECT * FROM messages WHERE org_id = ? ORDER BY id",
        "events": "SELECT id, type, payload FROM events WHERE org_id = ? ORDER BY pos",
        "agents": "SELECT * FROM agents WHERE org_id = ? ORDER BY id",
        "api_keys": "SELECT * FROM api_keys WHERE org_id = ? ORDER BY id",
        "webhooks": "SELECT * FROM webhooks WHERE org_id = ? ORDER BY id",
        "webhook_deliveries": "SELECT * FROM webhook_deliveries WHERE org_id = ? ORDER BY id",
        "webhook_attempts": "SELECT a.* FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
        " WHERE d.org_id = ? ORDER BY a.id",
        "opt_outs": "SELECT * FROM opt_outs WHERE org_id = ? ORDER BY sender_number, phone_number",
        "idempotency_keys": "SELECT * FROM idempotency_keys WHERE org_id = ? ORDER BY key",
        "sender_numbers": "SELECT * FROM sender_numbers WHERE org_id = ? ORDER BY number",
        "tool_calls": "SELECT t.* FROM tool_calls t JOIN conversations c ON c.id = t.conversation_id"
        " WHERE c.org_id = ? ORDER BY t.pos",
    }
    return {name: [tuple(row) for row in h.rows(sql, org_id)] for name, sql in tables.items()}


async def seed_owner(h: Harness, receiver: Receiver) -> dict[str, str]:
    """One of everything for the owner: a conversation with messages in and out, an opted-out pair, a custom
    agent, a webhook with deliveries, a second key, an idempotency key. Returns their ids by path parameter."""
    hook = (await h.post("/v1/webhooks", {"url": receiver.url, "events": ["*"]})).json()["data"]
    receiver.secrets.append(hook["secret"])
    agent = (await h.post("/v1/agents", {"name": "Own agent", "openingMessage": "Hi"})).json()["data"]
    created = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "shared-key"})
    conversation_id = created.json()["data"]["conversationId"]
    assert (await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "x"})).status_code == 201
    inbound = {"from": SEED_CREATE["toNumber"], "to": SEED_CREATE["fromNumber"], "body": "Is it free?"}
    assert (await h.post("/v1/simulator/inbound", inbound)).json()["data"]["conversationId"] == conversation_id
    opted = {**SEED_CREATE, "toNumber": "+15555550188"}
    assert (await h.post("/v1/sms-conversations", opted)).status_code == 201
    stop = {"from": "+15555550188", "to": SEED_CREATE["fromNumber"], "body": "STOP"}
    assert (await h.post("/v1/simulator/inbound", stop)).status_code == 201
    key = (await h.post("/v1/api-keys", {"name": "second"})).json()["data"]
    # Quiet before the snapshot, asked in causal order (what makes events first, their deliveries last): the
    # assistant turn the text scheduled has run (no model here: it records an `sms.assistant_error`), every simulated
    # status report is in, and every delivery is made.
    await eventually(
        lambda: (
            h.rows("SELECT COUNT(*) FROM jobs WHERE kind = ?", TURN_JOB)[0][0] == 0
            and h.rows("SELECT COUNT(*) FROM messages WHERE status IN ('queued', 'sent')")[0][0] == 0
            and h.rows("SELECT COUNT(*) FROM webhook_deliveries WHERE status != 'succeeded'")[0][0] == 0
        )
    )
    deliveries = (await h.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["data"]
    return {
        "conversation_id": conversation_id,
        "agent_id": agent["agentId"],
        "webhook_id": hook["id"],
        "delivery_id": deliveries[0]["id"],
        "key_id": key["id"],
        "event_id": deliveries[0]["event_id"],
    }


async def test_every_keyed_route_answers_another_orgs_ids_as_it_answers_ids_that_do_not_exist(tmp_path: Path) -> None:
    """For each route with a path parameter (from the route table, so a new route is covered), another
    organization's key gets, for the owner's ids, exactly the answer it gets for made-up ids: same status, headers
    and body. And none of those requests changes a single row of the owner's."""
    with Receiver() as receiver:
        async with start_harness(tmp_path) as h:
            ids = await seed_owner(h, receiver)
            org_id = h.rows("SELECT id FROM orgs WHERE name = ?", OWNER)[0][0]
            before = owner_state(h, org_id)
            made_up = {name: str(uuid.uuid4()) for name in ids}
            templates = keyed_templates(h)
            assert len(templates) >= 20, templates  # the table was read: every keyed route with an id in its path
            for method, template in templates:
                foreign = await call(h, method, template, ids, OTHER)
                absent = await call(h, method, template, made_up, OTHER)
                assert shape(foreign) == shape(absent), (method, template, foreign.text, absent.text)
                if method != "OPTIONS":
                    assert foreign.status_code == 404, (method, template, foreign.text)
            # The other org's own endpoint, with the owner's delivery id: as a delivery that does not exist.
            theirs = (await h.post("/v1/webhooks", {"url": receiver.url, "events": ["*"]}, org=OTHER)).json()["data"]
            retry = "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry"
            foreign = await call(h, "POST", retry, {**ids, "webhook_id": theirs["id"]}, OTHER)
            absent = await call(h, "POST", retry, {**made_up, "webhook_id": theirs["id"]}, OTHER)
            assert foreign.status_code == 404 and shape(foreign) == shape(absent)
            after = owner_state(h, org_id)
            assert after == before, {k: (set(before[k]) ^ set(after[k])) for k in before if before[k] != after[k]}


async def test_another_orgs_lists_filters_and_creates_never_reach_the_owners_resources(tmp_path: Path) -> None:
    """The routes without an id in their path: lists filtered by the owner's ids or numbers are empty, an event id
    of the owner's is refused as an unknown one, a create naming the owner's agent is 404 as for an unknown agent,
    the owner's Idempotency-Key replays nothing, and a simulated text on the owner's pair reaches no conversation
    of the owner's (a STOP lists nothing). Nothing the other org is answered names an id of the owner's."""
    with Receiver() as receiver:
        async with start_harness(tmp_path) as h:
            ids = await seed_owner(h, receiver)
            org_id = h.rows("SELECT id FROM orgs WHERE name = ?", OWNER)[0][0]
            before = owner_state(h, org_id)
            customer, ours = SEED_CREATE["toNumber"], SEED_CREATE["fromNumber"]
            answers: list[httpx.Response] = []

            async def get(path: str, **params: str) -> Any:
                response = await h.get(path, org=OTHER, **params)
                answers.append(response)
                return response

            async def post(path: str, body: Any, **headers: str) -> Any:
                response = await h.post(path, body, org=OTHER, **headers)
                answers.append(response)
                return response

            for params in ({"agentId": ids["agent_id"]}, {"toNumber": customer}, {"fromNumber": ours}, {}):
                assert (await get("/v1/sms-conversations", **params)).json()["data"] == []
            assert (await get("/v1/events", conversationId=ids["conversation_id"])).json()["data"] == []
            assert (await get("/v1/events")).json()["data"] == []
            foreign_after = await get("/v1/events", after=ids["event_id"])
            absent_after = await get("/v1/events", after="evt_" + ids["event_id"][4:16] + "000000000000")
            assert foreign_after.status_code == 400 and shape(foreign_after) == shape(absent_after)
            assert (await get("/v1/simulator/messages", number=customer)).json()["data"] == []
            assert (await get("/v1/webhooks")).json()["data"] == []
            assert (await get("/v1/api-keys")).json()["data"] != []  # its own key only (checked below)
            agents = (await get("/v1/agents")).json()["data"]
            assert ids["agent_id"] not in {agent["agentId"] for agent in agents}

            to_agent = {"toNumber": "+15555550177", "fromNumber": "+15555550166", "welcomeMessage": "Hi"}
            foreign_agent = await post("/v1/sms-conversations", {**to_agent, "agentId": ids["agent_id"]})
            absent_agent = await post("/v1/sms-conversations", {**to_agent, "agentId": str(uuid.uuid4())})
            assert foreign_agent.status_code == 404 and shape(foreign_agent) == shape(absent_agent)
            own = {**SEED_CREATE, "fromNumber": "+15555550155"}
            replay = await post("/v1/sms-conversations", own, **{"Idempotency-Key": "shared-key"})
            assert replay.status_code == 201 and "idempotent-replayed" not in replay.headers
            assert replay.json()["data"]["conversationId"] != ids["conversation_id"]
            # The customer who opted out of the owner's number: the other org's own list is empty, so it texts them.
            assert (await post("/v1/sms-conversations", {**own, "toNumber": "+15555550188"})).status_code == 201
            for body in ("Hello?", "STOP", "START", "HELP"):
                text = await post("/v1/simulator/inbound", {"from": customer, "to": ours, "body": body})
                assert text.status_code == 201 and text.json()["data"]["conversationId"] is None

            await eventually(lambda: h.rows("SELECT COUNT(*) FROM messages WHERE status = 'queued'")[0][0] == 0)
            assert owner_state(h, org_id) == before
            owner_ids = set(ids.values()) | {
                row[0] for row in h.rows("SELECT id FROM messages WHERE org_id = ?", org_id)
            }
            owner_ids |= {row[0] for row in h.rows("SELECT id FROM events WHERE org_id = ?", org_id)}
            for response in answers:
                named = {found for found in owner_ids if found in response.text}
                assert not named, (str(response.url), named)


async def test_simulator_routes_exist_only_in_simulator_mode_and_callbacks_only_in_twilio_mode(tmp_path: Path) -> None:
    """What guards the simulator in production: in twilio mode its routes are not there (404 with a key, 401
    without, as any unknown /v1 path), and the Twilio callbacks are not there in simulator mode."""
    twilio = {"twilio_account_sid": "AC" + "0" * 32, "twilio_auth_token": "t", "public_url": "https://p.example"}
    async with start_harness(tmp_path / "twilio", sms_provider="twilio", **twilio) as h:
        inbound = {"from": SEED_CREATE["toNumber"], "to": SEED_CREATE["fromNumber"], "body": "hi"}
        assert (await h.post("/v1/simulator/inbound", inbound)).status_code == 404
        assert (await h.get("/v1/simulator/messages", number=SEED_CREATE["toNumber"])).status_code == 404
        assert (await h.client.post("/v1/simulator/inbound", json=inbound)).status_code == 401
        assert h.rows("SELECT COUNT(*) FROM messages")[0][0] == 0
        paths = (await h.client.get("/schema/openapi.json")).json()["paths"]
        assert not [path for path in paths if path.startswith("/v1/simulator")]
    async with start_harness(tmp_path / "simulator") as h:
        assert (await h.client.post("/v1/providers/twilio/inbound", data={"From": "+1"})).status_code == 404
