"""Every error row of SPEC §1 this service answers, keys, and that bad input changes nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from app.api.edge import Edge
from app.clock import SystemClock
from tests.conftest import Harness, create_key, start_harness
from tests.seed import SEED_CREATE


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["meta"]["request_id"] == response.headers["x-request-id"]
    return body


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in SEED_CREATE.items() if k != key}


def with_raw(key: str, raw_json: str) -> bytes:
    """The seed's create body with `key` set to `raw_json`, written as is (JSON Python cannot produce)."""
    return json.dumps(without(key))[:-1].encode() + f', "{key}": {raw_json}}}'.encode()


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("malformed JSON", b'{"agentSlug": ', "body"),
    ("not an object", b"[1, 2]", "body"),
    ("empty body", b"", "body"),
    ("unknown field", {**SEED_CREATE, "colour": "red"}, "colour"),
    ("clientOrgId", {**SEED_CREATE, "clientOrgId": "org_1"}, "clientOrgId"),
    ("toNumber missing", without("toNumber"), "toNumber"),
    ("toNumber not E.164", {**SEED_CREATE, "toNumber": "555-0199"}, "toNumber"),
    ("toNumber impossible", {**SEED_CREATE, "toNumber": "+999123456789"}, "toNumber"),
    ("toNumber without its area code", {**SEED_CREATE, "toNumber": "+15550000"}, "toNumber"),
    ("toNumber with its trunk prefix", {**SEED_CREATE, "toNumber": "+4407700900123"}, "toNumber"),
    ("fromNumber with its trunk prefix", {**SEED_CREATE, "fromNumber": "+49015112345678"}, "fromNumber"),
    ("toNumber wrong type", {**SEED_CREATE, "toNumber": 15555550199}, "toNumber"),
    ("toNumber ends in a newline", {**SEED_CREATE, "toNumber": "+15555550199\n"}, "toNumber"),
    ("fromNumber ends in a newline", {**SEED_CREATE, "fromNumber": "+15555550123\n"}, "fromNumber"),
    ("not UTF-8 inside a field", b'{"agentSlug": "recall-sms", "toNumber": "\xc3"}', "body"),
    ("fromNumber malformed", {**SEED_CREATE, "fromNumber": "+1"}, "fromNumber"),
    ("both agents", {**SEED_CREATE, "agentId": str(uuid.uuid4())}, "agentSlug"),
    ("no agent", without("agentSlug"), "agentSlug"),
    ("agentId not a uuid", {**without("agentSlug"), "agentId": "recall"}, "agentId"),
    ("fromNumber missing for managed", without("fromNumber"), "fromNumber"),
    ("welcome missing for managed", without("welcomeMessage"), "welcomeMessage"),
    ("welcome blank", {**SEED_CREATE, "welcomeMessage": "   "}, "welcomeMessage"),
    ("welcome invisible", {**SEED_CREATE, "welcomeMessage": "\u200b\ufeff\u2060"}, "welcomeMessage"),
    ("welcome with a NUL", {**SEED_CREATE, "welcomeMessage": "Hi\x00there"}, "welcomeMessage"),
    ("welcome with a BEL", {**SEED_CREATE, "welcomeMessage": "Hi\x07"}, "welcomeMessage"),
    ("welcome too long", {**SEED_CREATE, "welcomeMessage": "x" * 1601}, "welcomeMessage"),
    ("variables not strings", {**SEED_CREATE, "dynamicVariables": {"customerName": 7}}, "dynamicVariables"),
    ("variable name", {**SEED_CREATE, "dynamicVariables": {"1bad": "x"}}, "dynamicVariables"),
    (
        "variable name ends in a newline",
        {**SEED_CREATE, "dynamicVariables": {**SEED_CREATE["dynamicVariables"], "ab\n": "x"}},
        "dynamicVariables.ab\n",
    ),
    (
        "required variable missing",
        {**SEED_CREATE, "dynamicVariables": {"customerName": "Ada", "dealershipName": "PAM"}},
        "dynamicVariables.recallId",
    ),
    (  # a placeholder with nothing in it is what requiredVariables exists to catch (SPEC §5)
        "required variable blank",
        {**SEED_CREATE, "dynamicVariables": {**SEED_CREATE["dynamicVariables"], "recallId": " \u200b"}},
        "dynamicVariables.recallId",
    ),
    ("timeout as string", {**SEED_CREATE, "inactivityTimeoutSeconds": "3600"}, "inactivityTimeoutSeconds"),
    ("timeout too small", {**SEED_CREATE, "inactivityTimeoutSeconds": 59}, "inactivityTimeoutSeconds"),
    ("metadata nested", {**SEED_CREATE, "metadata": {"a": {"b": 1}}}, "metadata"),
    ("metadata too many", {**SEED_CREATE, "metadata": {f"k{i}": i for i in range(21)}}, "metadata"),
    ("metadata integer beyond int64", {**SEED_CREATE, "metadata": {"big": 2**63}}, "metadata.big"),
    ("nested too deeply", b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
    # JSON numbers no float holds: msgspec fails them even without a type (they were a 500).
    ("number beyond a float", with_raw("inactivityTimeoutSeconds", "1e999"), "inactivityTimeoutSeconds"),
    ("number beyond a float in metadata", with_raw("metadata", '{"big": -1e400}'), "metadata"),
    ("number beyond a float in an unknown field", with_raw("colour", "1e999"), "colour"),
    ("cut off after a number beyond a float", b'{"agentSlug": 1e999, ', "body"),
    ("trailing data after a number beyond a float", b'{"agentSlug": 1e999} x', "body"),
    ("integer of 5000 digits", with_raw("inactivityTimeoutSeconds", "9" * 5000), "inactivityTimeoutSeconds"),
    ("lone surrogate after a number beyond a float", b'{"agentSlug": 1e999, "\\ud800": 1}', "body"),
    ("dotted key holding a number beyond a float", with_raw("a.b", "1e999"), "a.b"),
    (  # the later value wins, as in msgspec; the body is otherwise fine, so the number is what is named
        "number beyond a float under a repeated key",
        with_raw("agentSlug", '1e999, "agentSlug": "recall-sms"'),
        "agentSlug",
    ),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_create_bodies_are_400_with_the_field_named(
    harness: Harness, case: str, body: Any, field: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    if raw is None:
        response = await harness.post("/v1/sms-conversations", body)
    else:
        response = await harness.client.post(
            "/v1/sms-conversations", content=raw, headers=harness.auth(**{"Content-Type": "application/json"})
        )
    error = assert_error(response, 400, "validation_error")["error"]
    assert any(d["field"] == field or d["field"].startswith(field + ".") for d in error["details"]), error


async def test_numbers_out_of_range_are_named_with_every_other_problem(harness: Harness) -> None:
    body = (
        b'{"agentSlug": "recall-sms", "toNumber": "x", "inactivityTimeoutSeconds": 1e999,'
        b' "metadata": {"big": -1e400}, "colour": 1e999}'
    )
    response = await harness.client.post(
        "/v1/sms-conversations", content=body, headers=harness.auth(**{"Content-Type": "application/json"})
    )
    details = {d["field"]: d["message"] for d in assert_error(response, 400, "validation_error")["error"]["details"]}
    assert details["inactivityTimeoutSeconds"] == "is a number out of range"
    assert details["metadata.big"] == "is a number out of range"
    assert details["colour"] == "unknown field"  # what is wrong with a field that does not exist
    assert details["toNumber"].startswith("must be an E.164 number")


async def test_every_problem_of_a_body_is_reported_each_at_its_dotted_path(harness: Harness) -> None:
    body = {
        "agentSlug": "recall-sms",
        "toNumber": "x",
        "fromNumber": 7,
        "welcomeMessage": "z" * 1601,
        "dynamicVariables": {"customerName": "Ada", "recallId": 2, "1bad": "x"},
        "metadata": {"crmId": None},
        "colour": "red",
    }

    error = assert_error(await harness.post("/v1/sms-conversations", body), 400, "validation_error")["error"]

    fields = [detail["field"] for detail in error["details"]]
    assert fields == [
        "toNumber",
        "fromNumber",
        "welcomeMessage",
        "dynamicVariables.recallId",
        "dynamicVariables.1bad",
        "metadata.crmId",
        "colour",
    ]
    assert error["message"].count("; ") == len(fields) - 1
    assert error["details"][0]["message"] == "must be an E.164 number such as +15555550123"
    assert "regex" not in error["message"]
    assert harness.rows("SELECT COUNT(*) FROM conversations")[0][0] == 0


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, ["toNumber", "agentSlug"]),
        ({"toNumber": "x", "agentSlug": "recall-sms", "agentId": str(uuid.uuid4())}, ["toNumber", "agentSlug"]),
        (
            {"toNumber": "+15555550199", "agentId": "recall", "fromNumber": "+1000000", "welcomeMessage": 5},
            ["agentId", "welcomeMessage", "fromNumber"],
        ),
    ],
)
async def test_rules_a_type_cannot_express_are_reported_with_the_types_problems(
    harness: Harness, body: dict[str, Any], fields: list[str]
) -> None:
    """The agent choice, the agent id's form and a number's possibility join the problems of a body that failed
    to decode (SPEC §1: one entry per problem), not only those of a body that decoded."""
    error = assert_error(await harness.post("/v1/sms-conversations", body), 400, "validation_error")["error"]
    assert [detail["field"] for detail in error["details"]] == fields


async def test_close_with_bytes_that_are_not_utf8_is_400(harness: Harness) -> None:
    created = await harness.post("/v1/sms-conversations", SEED_CREATE)
    cid = created.json()["data"]["conversationId"]
    response = await harness.client.post(
        f"/v1/sms-conversations/{cid}/close",
        content=b'{"reason": "\xff"}',
        headers=harness.auth(**{"Content-Type": "application/json"}),
    )
    error = assert_error(response, 400, "validation_error")["error"]
    assert error["details"] == [{"field": "body", "message": "not valid UTF-8"}]


async def test_bad_input_never_changes_stored_state(harness: Harness) -> None:
    await harness.post("/v1/sms-conversations", SEED_CREATE)
    before = [harness.rows(f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("conversations", "messages", "events")]
    for _, body, _ in BAD_BODIES:
        if isinstance(body, dict):
            await harness.post("/v1/sms-conversations", body)
    await harness.post("/v1/sms-conversations", {**SEED_CREATE, "agentSlug": "nope"})
    after = [harness.rows(f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("conversations", "messages", "events")]
    assert after[:2] == before[:2]
    assert harness.rows("SELECT COUNT(*) FROM conversations WHERE status = 'in_progress'")[0][0] == 1


async def test_unknown_agent_is_404(harness: Harness) -> None:
    assert_error(await harness.post("/v1/sms-conversations", {**SEED_CREATE, "agentSlug": "nope"}), 404, "not_found")
    body = {**without("agentSlug"), "agentId": str(uuid.uuid4())}
    assert_error(await harness.post("/v1/sms-conversations", body), 404, "not_found")


async def test_opted_out_pair_is_409_and_nothing_is_sent(harness: Harness) -> None:
    harness.key()
    org_id = harness.rows("SELECT org_id FROM api_keys")[0][0]
    conn = sqlite3.connect(harness.settings.database)
    conn.execute(
        "INSERT INTO opt_outs (org_id, sender_number, phone_number, keyword, created_at) VALUES (?, ?, ?, 'STOP', 0)",
        (org_id, "+15555550123", "+15555550199"),
    )
    conn.commit()
    conn.close()
    assert_error(await harness.post("/v1/sms-conversations", SEED_CREATE), 409, "recipient_opted_out")
    assert harness.rows("SELECT COUNT(*) FROM messages")[0][0] == 0


async def test_wrong_content_type_is_415(harness: Harness) -> None:
    response = await harness.client.post(
        "/v1/sms-conversations",
        content=b"agentSlug=recall-sms",
        headers=harness.auth(**{"Content-Type": "application/x-www-form-urlencoded"}),
    )
    assert_error(response, 415, "unsupported_media_type")


async def test_body_over_one_mebibyte_is_413(harness: Harness) -> None:
    big = b'{"welcomeMessage": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    response = await harness.client.post(
        "/v1/sms-conversations", content=big, headers=harness.auth(**{"Content-Type": "application/json"})
    )
    assert_error(response, 413, "payload_too_large")


async def test_unknown_route_is_401_without_a_key_and_404_with_one(harness: Harness) -> None:
    assert_error(await harness.client.get("/v1/nothing-here"), 401, "unauthorized")
    assert_error(await harness.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await harness.client.get("/not-v1"), 404, "not_found")
    for path in ("/schema/nosuch", "/schema/swagger", "/schema/openapi.yaml", "/schema/a/b"):
        assert_error(await harness.client.get(path), 404, "not_found")  # Litestar's own answer is an HTML page
    assert (await harness.client.get("/schema")).status_code == 200


async def test_wrong_method_is_405(harness: Harness) -> None:
    response = await harness.client.put("/v1/sms-conversations", headers=harness.auth())
    assert_error(response, 405, "method_not_allowed")


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer pk_live_doesnotexist00000000000000000000000", "Bearer x"],
)
async def test_missing_malformed_or_unknown_keys_are_401(harness: Harness, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = await harness.client.get("/v1/sms-conversations", headers=headers)
    body = assert_error(response, 401, "unauthorized")
    assert body["error"]["message"] == "Missing or invalid API key."


async def test_a_key_revoked_by_the_key_itself_is_not_written_to_the_access_log(harness: Harness, caplog: Any) -> None:
    """A client with a leaked key at hand may name it where its id belongs: the answer is 404, as for any unknown id,
    and the access log shows the path with the key's kind only (SPEC §10: keys are never logged)."""
    caplog.set_level("INFO", logger="parley.access")
    leaked = (await harness.post("/v1/api-keys", {"name": "leaked"})).json()["data"]["key"]

    assert_error(await harness.post(f"/v1/api-keys/{leaked}/revoke"), 404, "not_found")

    paths = [r.path for r in caplog.records if r.name == "parley.access"]
    assert paths[-1] == "/v1/api-keys/pk_live_***/revoke"
    # Every field of every record (`caplog.text` holds the messages only, and the path is a field of its own).
    assert not [vars(r) for r in caplog.records if leaked[8:] in str(vars(r))]


async def test_a_revoked_key_fails_on_its_very_next_request(harness: Harness) -> None:
    created = (await harness.post("/v1/api-keys", {"name": "ci", "expires_at": None})).json()["data"]
    assert created["key"].startswith("pk_live_") and len(created["key"]) >= 8 + 32
    assert created["key_prefix"] == created["key"][:12]
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert (await harness.client.get("/v1/sms-conversations", headers=headers)).status_code == 200
    revoked = await harness.post(f"/v1/api-keys/{created['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["data"]["revoked_at"] is not None
    assert_error(await harness.client.get("/v1/sms-conversations", headers=headers), 401, "unauthorized")
    listed = (await harness.get("/v1/api-keys")).json()["data"]
    assert all("key" not in item for item in listed)
    assert {item["id"] for item in listed} >= {created["id"]}
    stored = harness.rows("SELECT key_hash FROM api_keys WHERE id = ?", created["id"])[0][0]
    assert created["key"] not in stored and len(stored) == 64


async def test_the_key_list_pages_by_position_and_refuses_a_forged_cursor(harness: Harness) -> None:
    """Keys page on (created_at, id) like the other lists: a walk sees each key once, keys made during the walk
    come at its end, and a cursor that is not one the list gave (an old offset, a negative one) is a 400."""
    for name in ("one", "two", "three"):
        assert (await harness.post("/v1/api-keys", {"name": name, "expires_at": None})).status_code == 201
    seen: list[str] = []
    cursor = None
    while True:
        page = (await harness.get("/v1/api-keys", limit=1, **({"cursor": cursor} if cursor else {}))).json()
        seen += [item["id"] for item in page["data"]]
        if len(seen) == 2:
            assert (await harness.post("/v1/api-keys", {"name": "late", "expires_at": None})).status_code == 201
        if (cursor := page["meta"]["next_cursor"]) is None:
            break
    everything = [item["id"] for item in (await harness.get("/v1/api-keys", limit=100)).json()["data"]]
    assert seen == everything and len(everything) == 5  # the harness's own key, three, and the late one
    for forged in ("-1", "2", "-100"):
        cursor = base64.urlsafe_b64encode(forged.encode()).decode().rstrip("=")
        assert_error(await harness.get("/v1/api-keys", cursor=cursor), 400, "validation_error")


async def test_an_expired_key_is_401(harness: Harness) -> None:
    raw = create_key(harness.settings.database, "acme", expires_at=SystemClock().now_ms() - 1000)
    response = await harness.client.get("/v1/sms-conversations", headers={"Authorization": f"Bearer {raw}"})
    assert_error(response, 401, "unauthorized")


async def test_key_creation_rejects_bad_expiry(harness: Harness) -> None:
    assert_error(await harness.post("/v1/api-keys", {"name": "x", "expires_at": "tomorrow"}), 400, "validation_error")
    for name in ("evil\nfake-id pk_live_XXXX forged", "a\tb", "ends in a newline\n", "nel\x85", "ls\u2028x"):
        refused = assert_error(await harness.post("/v1/api-keys", {"name": name}), 400, "validation_error")
        assert [d["field"] for d in refused["error"]["details"]] == ["name"]
    assert_error(
        await harness.post("/v1/api-keys", {"name": "x", "expires_at": "2001-01-01T00:00:00Z"}), 400, "validation_error"
    )


async def test_an_expiring_key_cannot_make_a_key_that_outlives_it(harness: Harness) -> None:
    now = SystemClock().now_ms()
    expiring = create_key(harness.settings.database, "acme", expires_at=now + 3_600_000)
    headers = {"Authorization": f"Bearer {expiring}"}

    def iso_in(ms: int) -> str:
        return datetime.fromtimestamp((now + ms) / 1000, tz=UTC).isoformat()

    for expires_at in (None, iso_in(7_200_000)):
        response = await harness.client.post(
            "/v1/api-keys", json={"name": "x", "expires_at": expires_at}, headers=headers
        )
        error = assert_error(response, 400, "validation_error")["error"]
        assert [d["field"] for d in error["details"]] == ["expires_at"]
    shorter = await harness.client.post(
        "/v1/api-keys", json={"name": "x", "expires_at": iso_in(1_800_000)}, headers=headers
    )
    assert shorter.status_code == 201, shorter.text
    assert (await harness.post("/v1/api-keys", {"name": "forever", "expires_at": None})).status_code == 201


async def test_another_orgs_resources_are_404(harness: Harness) -> None:
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    for response in (
        await harness.get(f"/v1/sms-conversations/{cid}", org="globex"),
        await harness.get(f"/v1/sms-conversations/{cid}/messages", org="globex"),
        await harness.post(f"/v1/sms-conversations/{cid}/close", org="globex"),
        await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": "hi"}, org="globex"),
    ):
        assert_error(response, 404, "not_found")
    assert (await harness.get("/v1/sms-conversations", org="globex")).json()["data"] == []
    key_id = harness.rows("SELECT k.id FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE o.name = 'acme'")[0][0]
    assert_error(await harness.post(f"/v1/api-keys/{key_id}/revoke", org="globex"), 404, "not_found")
    assert (await harness.get(f"/v1/sms-conversations/{cid}")).json()["data"]["status"] == "in_progress"


@pytest.mark.parametrize("path", ["//v1/agents", "//v1/events", "///v1/api-keys", "//v1//sms-conversations"])
async def test_a_doubled_slash_does_not_skip_the_key_check(harness: Harness, path: str) -> None:
    """The router reads `//v1/agents` as `/v1/agents`: the key check must too."""

    def raw(path: str) -> httpx.URL:
        return httpx.URL("http://testserver.local/").copy_with(raw_path=path.encode())

    assert_error(await harness.client.get(raw(path)), 401, "unauthorized")
    body = {"url": "https://hooks.example.com/x", "events": ["*"]}
    assert_error(await harness.client.post(raw("//v1/webhooks"), json=body), 401, "unauthorized")
    assert harness.rows("SELECT COUNT(*) FROM webhooks")[0][0] == 0


async def test_malformed_ids_are_404(harness: Harness) -> None:
    assert_error(await harness.get("/v1/sms-conversations/not-a-uuid"), 404, "not_found")
    assert_error(await harness.post("/v1/sms-conversations/not-a-uuid/close"), 404, "not_found")
    assert_error(await harness.get(f"/v1/sms-conversations/{uuid.uuid4()}"), 404, "not_found")


async def test_query_parameter_errors_are_400(harness: Harness) -> None:
    assert_error(await harness.get("/v1/sms-conversations", limit=0), 400, "validation_error")
    assert_error(await harness.get("/v1/sms-conversations", limit=101), 400, "validation_error")
    assert_error(await harness.get("/v1/sms-conversations", limit="many"), 400, "validation_error")
    assert_error(await harness.get("/v1/sms-conversations", cursor="!!!"), 400, "validation_error")
    beyond_sqlite = base64.urlsafe_b64encode(b"9" * 30 + b"|x").decode().rstrip("=")
    assert_error(await harness.get("/v1/sms-conversations", cursor=beyond_sqlite), 400, "validation_error")
    assert_error(await harness.get("/v1/sms-conversations", status="open"), 400, "validation_error")


def cursor_with(issued: str, *parts: str) -> str:
    """A cursor carrying the list tag of `issued` (so that only `parts` can be wrong) and the given position."""
    tag = base64.urlsafe_b64decode(issued + "=" * (-len(issued) % 4)).decode().split("|")[0]
    return base64.urlsafe_b64encode("|".join([tag, *parts]).encode()).decode().rstrip("=")


async def test_a_cursor_pages_only_the_list_that_gave_it(harness: Harness) -> None:
    """A cursor is a place in one list: given to another route, another conversation or endpoint, another org's
    list, or the same list with other filters, it is a 400 naming `cursor` (it was read as a place there, and
    gave a wrong page), while on its own list it still pages."""
    hooks = [
        (await harness.post("/v1/webhooks", {"url": f"http://127.0.0.1:9/{n}", "events": ["*"]})).json()
        for n in range(2)
    ]
    hook_a, hook_b = (hook["data"]["id"] for hook in hooks)
    numbers = ["+15555550211", "+15555550212"]
    cid_a, cid_b = [
        (await harness.post("/v1/sms-conversations", {**SEED_CREATE, "toNumber": n})).json()["data"]["conversationId"]
        for n in numbers
    ]
    for cid in (cid_a, cid_b):
        assert (await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": "more"})).status_code == 201
    for name in ("one", "two"):
        assert (await harness.post("/v1/agents", {"name": name, "openingMessage": "Hi"})).status_code == 201
    for org in ("acme", "globex"):
        made = await harness.post("/v1/api-keys", {"name": "second", "expires_at": None}, org=org)
        assert made.status_code == 201

    async def first_cursor(path: str, org: str = "acme", **params: str) -> str:
        page = (await harness.get(path, org=org, limit=1, **params)).json()
        assert page["meta"]["next_cursor"] is not None, path
        return page["meta"]["next_cursor"]

    messages_a = await first_cursor(f"/v1/sms-conversations/{cid_a}/messages")
    every_conversation = await first_cursor("/v1/sms-conversations")
    open_ones = await first_cursor("/v1/sms-conversations", status="in_progress")
    agents = await first_cursor("/v1/agents")
    webhooks = await first_cursor("/v1/webhooks")
    keys = await first_cursor("/v1/api-keys")
    deliveries_a = await first_cursor(f"/v1/webhooks/{hook_a}/deliveries")
    globex_keys = await first_cursor("/v1/api-keys", org="globex")
    own = [
        (f"/v1/sms-conversations/{cid_a}/messages", {}, messages_a),
        ("/v1/sms-conversations", {}, every_conversation),
        ("/v1/sms-conversations", {"status": "in_progress"}, open_ones),
        ("/v1/agents", {}, agents),
        ("/v1/webhooks", {}, webhooks),
        ("/v1/api-keys", {}, keys),
        (f"/v1/webhooks/{hook_a}/deliveries", {}, deliveries_a),
    ]
    for path, params, cursor in own:
        page = await harness.get(path, cursor=cursor, **params)
        assert page.status_code == 200 and page.json()["data"], (path, page.text)
    foreign = [
        (f"/v1/sms-conversations/{cid_b}/messages", {}, messages_a),  # another conversation
        (f"/v1/sms-conversations/{cid_a}/tool-calls", {}, messages_a),  # another list of the same conversation
        (f"/v1/webhooks/{hook_a}/deliveries", {}, messages_a),
        (f"/v1/webhooks/{hook_b}/deliveries", {}, deliveries_a),  # another endpoint
        (f"/v1/webhooks/{hook_a}/deliveries", {"status": "pending"}, deliveries_a),  # a filter added
        ("/v1/sms-conversations", {"status": "closed"}, open_ones),  # another filter
        ("/v1/sms-conversations", {}, open_ones),  # the filter dropped
        ("/v1/sms-conversations", {"toNumber": numbers[0]}, every_conversation),
        ("/v1/sms-conversations", {}, agents),
        ("/v1/agents", {}, webhooks),
        ("/v1/api-keys", {}, webhooks),
        ("/v1/webhooks", {}, keys),
        ("/v1/api-keys", {}, globex_keys),  # another org's list
    ]
    for path, params, cursor in foreign:
        error = assert_error(await harness.get(path, cursor=cursor, **params), 400, "validation_error")
        assert [detail["field"] for detail in error["error"]["details"]] == ["cursor"], (path, params)


@pytest.mark.parametrize("text", ["+1", " 1", "1_0", "\u0661", "1\x0c", "-5", "01", "9" * 30])
async def test_a_cursor_in_a_form_this_api_never_writes_is_400(harness: Harness, text: str) -> None:
    """A cursor is read back only as written: `+1`, ` 1`, `1_0` or other digits were read by `int()` as positions."""
    cid = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    assert (await harness.post(f"/v1/sms-conversations/{cid}/messages", {"content": "a second"})).status_code == 201
    issued = (await harness.get(f"/v1/sms-conversations/{cid}/messages", limit=1)).json()["meta"]["next_cursor"]
    assert (await harness.get(f"/v1/sms-conversations/{cid}/messages", cursor=issued)).status_code == 200
    forged = cursor_with(issued, text)
    error = assert_error(
        await harness.get(f"/v1/sms-conversations/{cid}/messages", cursor=forged), 400, "validation_error"
    )
    assert [detail["field"] for detail in error["error"]["details"]] == ["cursor"]
    for altered in (issued + "!", issued + "=" * (-len(issued) % 4 or 4)):  # a stray character; padding added
        error = assert_error(
            await harness.get(f"/v1/sms-conversations/{cid}/messages", cursor=altered), 400, "validation_error"
        )
        assert error["error"]["details"][0]["field"] == "cursor"


async def test_a_blank_welcome_is_an_agent_kind_rule_after_the_404_and_the_missing_sender(harness: Harness) -> None:
    """SPEC §3.1's order of checks: a blank welcomeMessage comes after agent resolution and `fromNumber` missing."""
    unknown = {**SEED_CREATE, "agentSlug": None, "agentId": str(uuid.uuid4()), "welcomeMessage": "\u200b"}
    assert_error(await harness.post("/v1/sms-conversations", unknown), 404, "not_found")
    no_sender = {key: value for key, value in SEED_CREATE.items() if key != "fromNumber"}
    error = assert_error(
        await harness.post("/v1/sms-conversations", {**no_sender, "welcomeMessage": "  "}), 400, "validation_error"
    )
    assert [d["field"] for d in error["error"]["details"]] == ["fromNumber"]
    # A control character is a field rule: before the 404, and named with a body's other problems.
    control = assert_error(
        await harness.post("/v1/sms-conversations", {**unknown, "welcomeMessage": "Hi\x07"}), 400, "validation_error"
    )
    assert [d["field"] for d in control["error"]["details"]] == ["welcomeMessage"]
    undecodable = {**SEED_CREATE, "toNumber": 15555550199, "welcomeMessage": "Hi\x07"}
    both = assert_error(await harness.post("/v1/sms-conversations", undecodable), 400, "validation_error")
    assert {d["field"] for d in both["error"]["details"]} == {"toNumber", "welcomeMessage"}


@pytest.mark.parametrize("limit", ["1e1", "1E1", "10.0", "5e0", " 5", "+5", "0x10", "５", "05", "007"])
@pytest.mark.parametrize("path", ["/v1/sms-conversations", "/v1/events", "/v1/webhooks", "/v1/agents", "/v1/api-keys"])
async def test_a_limit_that_is_not_plain_digits_is_400(harness: Harness, path: str, limit: str) -> None:
    """`limit=1e1` was read as 10 (msgspec's lenient number reading): a page size is written as digits."""
    error = assert_error(await harness.get(path, limit=limit), 400, "validation_error")
    assert [detail["field"] for detail in error["error"]["details"]] == ["limit"]


async def test_limit_is_checked_only_where_a_route_reads_it(harness: Harness) -> None:
    """The simulator's phone list ignores `limit` (README): an odd one there is still ignored."""
    response = await harness.get("/v1/simulator/messages", number="+15557770199", limit="1e1")
    assert response.status_code == 200


async def test_a_bad_query_parameter_is_named_as_the_client_sent_it(harness: Harness) -> None:
    error = assert_error(await harness.get("/v1/sms-conversations", agentId="notuuid"), 400, "validation_error")
    assert [(d["field"], d["message"]) for d in error["error"]["details"]] == [("agentId", "must be a UUID")]
    newline = assert_error(
        await harness.get("/v1/sms-conversations", agentId=str(uuid.uuid4()) + "\n"), 400, "validation_error"
    )
    assert [detail["field"] for detail in newline["error"]["details"]] == ["agentId"]


async def test_a_missing_required_query_parameter_is_named_in_the_details(harness: Harness) -> None:
    error = assert_error(await harness.get("/v1/simulator/messages"), 400, "validation_error")
    assert [(d["field"], d["message"]) for d in error["error"]["details"]] == [("number", "is required")]
    assert "/v1/" not in error["error"]["message"]  # Litestar's own message names the path: not echoed


async def test_client_request_id_is_adopted_when_well_formed(harness: Harness) -> None:
    response = await harness.client.get(
        "/v1/sms-conversations", headers=harness.auth(**{"X-Request-Id": "trace:abc-1.2"})
    )
    assert response.headers["x-request-id"] == "trace:abc-1.2"
    assert response.json()["meta"]["request_id"] == "trace:abc-1.2"
    bad = await harness.client.get("/v1/sms-conversations", headers=harness.auth(**{"X-Request-Id": "has space"}))
    assert bad.headers["x-request-id"].startswith("req_")
    unauthenticated = await harness.client.get("/v1/sms-conversations", headers={"X-Request-Id": "r1"})
    assert unauthenticated.headers["x-request-id"] == "r1"
    assert unauthenticated.json()["meta"]["request_id"] == "r1"


async def test_rate_limit_is_429_with_retry_after(tmp_path: Any) -> None:
    async with start_harness(tmp_path, rate_limit=2.0) as h:
        statuses = [(await h.get("/v1/sms-conversations")).status_code for _ in range(6)]
        assert statuses[:4] == [200] * 4  # a burst of twice the rate
        limited = await h.get("/v1/sms-conversations")
        body = assert_error(limited, 429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1
        assert body["error"]["code"] == "rate_limited"
        assert (await h.client.get("/healthz")).status_code == 200  # health is never limited
        other = await h.get("/v1/sms-conversations", org="globex")  # limits are per key
        assert other.status_code == 200


async def test_an_unexpected_failure_is_500_internal_error_without_a_trace(harness: Harness) -> None:
    await harness.post("/v1/sms-conversations", SEED_CREATE)
    conn = sqlite3.connect(harness.settings.database)
    conn.execute("ALTER TABLE conversations RENAME TO conversations_gone")  # the database breaks under the app
    conn.commit()
    conn.close()
    response = await harness.get("/v1/sms-conversations")
    body = assert_error(response, 500, "internal_error")
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()
    assert set(body["error"]) == {"code", "message"}


async def test_options_lists_every_method_of_the_path(harness: Harness) -> None:
    response = await harness.client.options("/v1/agents", headers=harness.auth())
    assert response.status_code == 204
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
    one = await harness.client.options("/v1/agents/some-id", headers=harness.auth())
    assert set(one.headers["allow"].split(", ")) == {"GET", "PATCH", "DELETE", "OPTIONS"}


async def test_openapi_marks_keyed_routes_and_leaves_health_open(harness: Harness) -> None:
    schema = (await harness.client.get("/schema/openapi.json")).json()
    assert schema["paths"]["/v1/sms-conversations"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert "security" not in schema


async def test_openapi_documents_the_replay_header_and_each_routes_own_conflicts(harness: Harness) -> None:
    """The create's 201 said Litestar's "Document created, URL follows" with no headers, and every 409 listed the
    create's conflicts (the operator message's `conversation_closed` only among them)."""
    document = (await harness.client.get("/schema/openapi.json")).json()
    validate(document)  # a header without a schema made the whole document invalid
    paths = document["paths"]
    created = paths["/v1/sms-conversations"]["post"]["responses"]
    assert "Idempotent-Replayed" in created["201"]["headers"]
    assert "URL follows" not in created["201"]["description"]
    assert created["409"]["description"] == "conflict (idempotency_in_progress, recipient_opted_out)"
    message = paths["/v1/sms-conversations/{conversation_id}/messages"]["post"]["responses"]["409"]
    assert message["description"] == "conflict (conversation_closed, conversation_pending, recipient_opted_out)"
    resume = paths["/v1/sms-conversations/{conversation_id}/resume"]["post"]["responses"]["409"]
    assert resume["description"] == "conflict (conversation_closed, conversation_pending)"


def test_key_cache_expires_entries_and_forgets_revoked_keys() -> None:
    from app.domain.keys import KeyCache, Principal

    cache = KeyCache(ttl_ms=1000)
    record = Principal(key_id="k1", org_id="o1")
    cache.put("h1", record, now_ms=0)
    assert cache.get("h1", now_ms=999) == record
    assert cache.get("h1", now_ms=1000) is None  # re-read from the database after the TTL
    cache.put("h1", record, now_ms=2000)
    cache.forget("k1")
    assert cache.get("h1", now_ms=2001) is None


async def test_a_key_revoked_while_its_first_look_up_was_in_flight_is_not_cached_as_valid(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request read the key before the revocation committed and would cache it after the revocation dropped it:
    that request may pass (it started first), but the very next one must not."""
    from app.domain import keys

    created = (await harness.post("/v1/api-keys", {"name": "racing", "expires_at": None})).json()["data"]
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert (await harness.get("/v1/api-keys")).status_code == 200  # the harness's own key is cached
    real_lookup = keys.lookup
    reached, release = threading.Event(), threading.Event()

    def lookup_paused_after_reading(conn: sqlite3.Connection, key_hash: str) -> Any:
        principal = real_lookup(conn, key_hash)
        reached.set()
        release.wait(5)
        return principal

    monkeypatch.setattr(keys, "lookup", lookup_paused_after_reading)
    first = asyncio.create_task(harness.client.get("/v1/sms-conversations", headers=headers))
    await asyncio.to_thread(reached.wait, 5)
    monkeypatch.setattr(keys, "lookup", real_lookup)
    assert (await harness.post(f"/v1/api-keys/{created['id']}/revoke")).status_code == 200
    release.set()

    assert (await first).status_code == 200
    assert_error(await harness.client.get("/v1/sms-conversations", headers=headers), 401, "unauthorized")


async def test_a_key_revoked_by_another_process_is_refused_after_the_cache_ttl(harness: Harness) -> None:
    harness.edge.key_cache.ttl_ms = 0  # every cached entry is already past its TTL
    headers = harness.auth()
    assert (await harness.client.get("/v1/sms-conversations", headers=headers)).status_code == 200
    conn = sqlite3.connect(harness.settings.database)
    conn.execute("UPDATE api_keys SET revoked_at = 1")  # as `parley keys revoke` does from its own process
    conn.commit()
    conn.close()
    assert_error(await harness.client.get("/v1/sms-conversations", headers=headers), 401, "unauthorized")


async def cancelled_once(edge: Edge, send: Any, reached: asyncio.Event, method: str = "GET") -> asyncio.Task[None]:
    """A request through `edge`, cancelled (as uvicorn's shutdown does) once `reached` is set; returns its task."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": method, "path": "/healthz", "headers": [], "state": {}}
    request = asyncio.create_task(edge(scope, receive, send))  # type: ignore[arg-type]
    await reached.wait()
    request.cancel()
    return request


async def test_a_request_cancelled_while_its_last_chunk_is_still_being_written_is_not_counted_as_answered() -> None:
    """uvicorn waits for the transport to drain inside `send`: a cancellation there means nothing went out, so it
    must reach uvicorn."""
    blocked = asyncio.Event()

    async def answers(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    edge = Edge(answers, rate_limit=10)  # type: ignore[arg-type]

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            blocked.set()
            await asyncio.Event().wait()  # a paused transport: the body is never written

    request = await cancelled_once(edge, send, blocked)
    with pytest.raises(asyncio.CancelledError):
        await request


@pytest.mark.parametrize(("method", "says"), [("GET", "retry the request"), ("POST", "may have taken effect")])
async def test_a_request_cut_off_by_shutdown_is_answered_503_in_the_envelope(method: str, says: str) -> None:
    """uvicorn cancels requests still running when its graceful shutdown times out: such a request gets a 503 in
    the envelope, and ends there. A write cut off may have taken effect (an SMS may have gone out), so its answer
    does not invite a blind retry."""
    entered = asyncio.Event()

    async def never_answers(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await asyncio.Event().wait()

    edge = Edge(never_answers, rate_limit=10)  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    request = await cancelled_once(edge, send, entered, method)
    await request  # answered: the cancellation is not passed on for uvicorn to log as a crash
    assert not request.cancelled()

    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 503
    assert headers.get(b"retry-after") == (b"1" if method == "GET" else None)  # a write is not simply retried
    envelope = json.loads(body["body"])
    assert envelope["error"]["code"] == "service_unavailable"
    assert says in envelope["error"]["message"]
    assert envelope["meta"]["request_id"] == headers[b"x-request-id"].decode()


BODIES_AN_ACTION_REFUSES: list[tuple[dict[str, str], bytes, int, str]] = [
    ({"Content-Type": "text/plain"}, b"hello", 415, "unsupported_media_type"),
    ({"Content-Type": "application/json"}, b"{bad", 400, "validation_error"),
    ({"Content-Type": "application/json"}, b'{"bogus": 1}', 400, "validation_error"),
    ({"Content-Type": "application/json"}, b'{"clientOrgId": "other"}', 400, "validation_error"),
]


async def test_routes_without_a_body_refuse_one_and_change_nothing(harness: Harness) -> None:
    """Revoke, resume, rotations, deletes and a delivery's retry take no body: one that is not JSON is a 415, and
    malformed JSON or any field (`clientOrgId` among them) a 400, before anything is done."""
    key = (await harness.post("/v1/api-keys", {"name": "kept", "expires_at": None})).json()["data"]
    hook = (await harness.post("/v1/webhooks", {"url": "http://127.0.0.1:9/x", "events": ["*"]})).json()
    agent = (await harness.post("/v1/agents", {"name": "kept", "openingMessage": "Hi"})).json()["data"]
    secret = harness.rows("SELECT tool_secret FROM agents WHERE id = ?", agent["agentId"])[0][0]
    conversation = (await harness.post("/v1/sms-conversations", SEED_CREATE)).json()["data"]["conversationId"]
    hook_id, agent_id = hook["data"]["id"], agent["agentId"]
    actions = [
        ("POST", f"/v1/api-keys/{key['id']}/revoke"),
        ("POST", f"/v1/sms-conversations/{conversation}/resume"),
        ("POST", f"/v1/webhooks/{hook_id}/rotate-secret"),
        ("POST", f"/v1/webhooks/{hook_id}/deliveries/{uuid.uuid4()}/retry"),
        ("DELETE", f"/v1/webhooks/{hook_id}"),
        ("POST", f"/v1/agents/{agent_id}/rotate-tool-secret"),
        ("DELETE", f"/v1/agents/{agent_id}"),
    ]
    for method, path in actions:
        for headers, body, status, code in BODIES_AN_ACTION_REFUSES:
            response = await harness.client.request(method, path, content=body, headers=harness.auth(**headers))
            assert_error(response, status, code)
    assert harness.rows("SELECT revoked_at FROM api_keys WHERE id = ?", key["id"])[0][0] is None
    assert (await harness.get(f"/v1/webhooks/{hook_id}")).status_code == 200
    assert harness.rows("SELECT secret, previous_secrets FROM webhooks WHERE id = ?", hook_id)[0][:] == (
        hook["data"]["secret"],
        "[]",
    )
    assert harness.rows("SELECT tool_secret FROM agents WHERE id = ?", agent_id)[0][0] == secret
    # None at all, or an empty object, is the action.
    revoked = await harness.client.post(
        f"/v1/api-keys/{key['id']}/revoke", content=b"{}", headers=harness.auth(**{"Content-Type": "application/json"})
    )
    assert revoked.status_code == 200 and revoked.json()["data"]["revoked_at"] is not None
    assert (await harness.client.delete(f"/v1/agents/{agent_id}", headers=harness.auth())).status_code == 204


async def test_a_query_parameter_given_twice_is_refused_not_read_as_its_last_value(harness: Harness) -> None:
    """`?type=a&type=b` meant "either" to the client; reading only `b` would silently drop half of what it asked."""
    for path in (
        "/v1/events?type=sms.message_sent&type=sms.conversation_closed",
        "/v1/sms-conversations?limit=5&status=closed&limit=10",
    ):
        refused = await harness.get(path)
        body = assert_error(refused, 400, "validation_error")
        assert [d["field"] for d in body["error"]["details"]] == [path.split("?")[1].split("=")[0]]
    assert (await harness.get("/v1/events?type=sms.message_sent&limit=5")).status_code == 200
