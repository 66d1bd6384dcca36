"""GET /v1/events: the org's log, oldest first, each item byte-for-byte what the webhooks received."""

from __future__ import annotations

import json

from tests.conftest import Harness
from tests.seed import SEED_CREATE
from tests.webhook_receiver import Receiver, emit, eventually, register


def items_bytes(raw: bytes) -> list[bytes]:
    """Split the `data` array of a response into each item's exact bytes (items are JSON objects)."""
    start = raw.index(b'"data":[') + len(b'"data":[')
    decoder = json.JSONDecoder()
    text = raw.decode()
    position = len(raw[:start].decode())
    out = []
    while text[position] != "]":
        _, end = decoder.raw_decode(text, position)
        out.append(text[position:end].encode())
        position = end + 1 if text[end] == "," else end
    return out


async def test_items_are_exactly_what_was_delivered(harness: Harness) -> None:
    with Receiver() as receiver:
        await register(harness, receiver)
        created = await harness.post("/v1/sms-conversations", SEED_CREATE)
        assert created.status_code == 201
        await emit(harness, "contact.opt_in")
        stored = await eventually(
            lambda: (
                (rows := harness.rows("SELECT id FROM events ORDER BY pos"))
                and {r["id"] for r in rows} <= {r.webhook_id for r in receiver.snapshot()}
                and rows
            )
        )
        response = await harness.get("/v1/events")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        items = items_bytes(response.content)
        assert [json.loads(i)["id"] for i in items] == [r["id"] for r in stored]  # oldest first
        delivered = {r.webhook_id: r.body for r in receiver.snapshot()}
        for item in items:
            assert item == delivered[json.loads(item)["id"]]


async def test_paging_with_after_and_next_cursor(harness: Harness) -> None:
    ids = [await emit(harness, n=i) for i in range(5)]
    first = (await harness.get("/v1/events", limit=2)).json()
    assert [e["id"] for e in first["data"]] == ids[:2]
    assert first["meta"]["next_cursor"] == ids[1]
    second = (await harness.get("/v1/events", limit=2, after=first["meta"]["next_cursor"])).json()
    assert [e["id"] for e in second["data"]] == ids[2:4]
    third = (await harness.get("/v1/events", limit=2, after=second["meta"]["next_cursor"])).json()
    assert [e["id"] for e in third["data"]] == ids[4:]
    assert third["meta"]["next_cursor"] is None
    caught_up = (await harness.get("/v1/events", after=ids[-1])).json()
    assert caught_up["data"] == [] and caught_up["meta"]["next_cursor"] is None
    later = await emit(harness)
    assert [e["id"] for e in (await harness.get("/v1/events", after=ids[-1])).json()["data"]] == [later]


async def test_filters_by_type_and_conversation(harness: Harness) -> None:
    created = await harness.post("/v1/sms-conversations", SEED_CREATE)
    conversation_id = created.json()["data"]["conversationId"]
    loose = await emit(harness, "contact.opt_out")
    sent = (await harness.get("/v1/events", type="sms.message_sent")).json()["data"]
    assert [e["event"] for e in sent] == ["sms.message_sent"]
    assert sent[0]["conversationId"] == conversation_id and sent[0]["sequence"] == 1
    opt_outs = (await harness.get("/v1/events", type="contact.opt_out")).json()["data"]
    assert [e["id"] for e in opt_outs] == [loose]
    assert opt_outs[0]["sequence"] is None and opt_outs[0]["conversationId"] is None
    mine = (await harness.get("/v1/events", conversationId=conversation_id)).json()["data"]
    assert mine and all(e["conversationId"] == conversation_id for e in mine)
    assert [e["sequence"] for e in mine] == list(range(1, len(mine) + 1))
    same = (await harness.get("/v1/events", conversationId=conversation_id.upper().replace("-", ""))).json()["data"]
    assert same == mine  # any spelling of the UUID
    refused = await harness.get("/v1/events", conversationId="nope")  # was an empty page, like a real id's
    assert refused.status_code == 400
    assert [d["field"] for d in refused.json()["error"]["details"]] == ["conversationId"]


async def test_bad_parameters_are_400(harness: Harness) -> None:
    await emit(harness)
    for params in ({"after": "evt_unknown"}, {"type": "sms.nope"}, {"limit": 0}, {"limit": 5000}):
        response = await harness.get("/v1/events", **params)
        assert response.status_code == 400, params
        assert response.json()["error"]["code"] == "validation_error"


async def test_the_log_is_per_org(harness: Harness) -> None:
    mine = await emit(harness, org="acme")
    theirs = await emit(harness, org="globex")
    assert [e["id"] for e in (await harness.get("/v1/events", org="acme")).json()["data"]] == [mine]
    assert [e["id"] for e in (await harness.get("/v1/events", org="globex")).json()["data"]] == [theirs]
    # Another org's event id is not a cursor here.
    response = await harness.get("/v1/events", org="acme", after=theirs)
    assert response.status_code == 400
