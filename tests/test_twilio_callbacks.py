"""Parley in twilio mode: sends reach the fake Twilio API; signed callbacks are stored once, unsigned never."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import msgspec
import pytest
from twilio.request_validator import RequestValidator

from app.api.providers import EMPTY_TWIML
from app.clock import FakeClock
from app.domain import conversations, housekeeping, messaging
from app.domain.inbound import InboundResult, InboundSms
from app.providers.twilio import TwilioProvider
from app.store import conversations as conversation_store
from app.store import db as db_module
from tests.conftest import Harness, start_harness
from tests.fake_twilio import Action, FakeTwilio, running_fake
from tests.provider_doubles import HangingProvider
from tests.seed import SEED_CREATE
from tests.webhook_receiver import eventually

PUBLIC = "https://parley.example.test"
INBOUND = "/v1/providers/twilio/inbound"
STATUS = "/v1/providers/twilio/status"
CUSTOMER = SEED_CREATE["toNumber"]
OURS = SEED_CREATE["fromNumber"]


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilio]:
    with running_fake() as fake:
        yield fake


def twilio_harness(tmp_path: Path, fake: FakeTwilio, **overrides: Any) -> AbstractAsyncContextManager[Harness]:
    """`start_harness` with the Twilio provider pointed at the fake."""
    return start_harness(
        tmp_path,
        sms_provider="twilio",
        twilio_account_sid=fake.account_sid,
        twilio_auth_token=fake.auth_token,
        twilio_api_base=fake.base_url,
        public_url=PUBLIC,
        **overrides,
    )


@pytest.fixture
async def h(tmp_path: Path, fake_twilio: FakeTwilio) -> AsyncIterator[Harness]:
    async with twilio_harness(tmp_path, fake_twilio) as harness:
        yield harness


def signed_headers(token: str, url: str, params: dict[str, str]) -> dict[str, str]:
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": RequestValidator(token).compute_signature(url, params),
    }


async def callback(
    h: Harness,
    path: str,
    params: dict[str, str],
    *,
    token: str | None = None,
    signed_url: str | None = None,
    signed_params: dict[str, str] | None = None,
    signature: bool = True,
) -> Any:
    """POST a form callback as Twilio would, signed with the official RequestValidator."""
    headers = signed_headers(
        token or h.settings.twilio_auth_token,
        signed_url or PUBLIC + path,
        params if signed_params is None else signed_params,
    )
    if not signature:
        del headers["X-Twilio-Signature"]
    return await h.client.post(path, content=urlencode(params), headers=headers)


def inbound_params(sid: str = "SM" + "a" * 32, body: str = "Yes, Tuesday works", **extra: str) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "SmsSid": sid,
        "SmsMessageSid": sid,
        "AccountSid": "AC" + "0" * 31 + "1",
        "From": CUSTOMER,
        "To": OURS,
        "Body": body,
        "NumMedia": "0",
        "NumSegments": "1",
        "ApiVersion": "2010-04-01",
        **extra,
    }


def status_params(sid: str, status: str, **extra: str) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "SmsSid": sid,
        "MessageStatus": status,
        "SmsStatus": status,
        "AccountSid": "AC" + "0" * 31 + "1",
        "From": OURS,
        "To": CUSTOMER,
        "ApiVersion": "2010-04-01",
        **extra,
    }


async def open_conversation(h: Harness) -> tuple[str, str, str]:
    """Create the seed conversation; return (conversation id, our message id, Twilio's sid)."""
    response = await h.post("/v1/sms-conversations", SEED_CREATE)
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    (row,) = h.rows(
        "SELECT id FROM messages WHERE conversation_id = ? AND direction = 'outbound'", data["conversationId"]
    )
    return data["conversationId"], row["id"], data["providerMessageId"]


async def answered_under_a_foreign_lock(h: Harness, request: asyncio.Task[Any]) -> Any:
    """The answer to `request`, while another process holds the database's write lock (past the busy timeout the test
    shrank) as the request writes its outcome; the lock is then let go."""
    other = sqlite3.connect(h.settings.database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        return await request
    finally:
        other.execute("ROLLBACK")
        other.close()


def count(h: Harness, sql: str, *args: Any) -> int:
    return h.rows(f"SELECT COUNT(*) AS n FROM {sql}", *args)[0]["n"]


def event_types(h: Harness, conversation_id: str) -> list[str]:
    return [
        r["type"] for r in h.rows("SELECT type FROM events WHERE conversation_id = ? ORDER BY pos", conversation_id)
    ]


# --- outbound -----------------------------------------------------------------------------------


async def test_create_sends_exact_fields_to_twilio_with_basic_auth(h: Harness, fake_twilio: FakeTwilio) -> None:
    conversation_id, message_id, sid = await open_conversation(h)
    (sent,) = fake_twilio.sends()
    assert sent.authorized
    assert sent.path == f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json"
    assert sent.form == {
        "To": CUSTOMER,
        "From": OURS,
        "Body": SEED_CREATE["welcomeMessage"],
        "StatusCallback": f"{PUBLIC}/v1/providers/twilio/status?messageId={message_id}",
    }
    assert sid in fake_twilio.messages
    messages = (await h.get(f"/v1/sms-conversations/{conversation_id}/messages")).json()["data"]
    assert [(m["providerMessageId"], m["status"]) for m in messages] == [(sid, "queued")]


async def test_invalid_number_is_502_with_twilios_code_and_closes_the_conversation(
    h: Harness, fake_twilio: FakeTwilio
) -> None:
    response = await h.post("/v1/sms-conversations", {**SEED_CREATE, "toNumber": "+15005550001"})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "provider_error"
    assert error["providerCode"] == "21211"
    conversation = (await h.get(f"/v1/sms-conversations/{error['conversationId']}")).json()["data"]
    assert (conversation["status"], conversation["endReason"]) == ("closed", "opening_message_failed")
    messages = (await h.get(f"/v1/sms-conversations/{error['conversationId']}/messages")).json()["data"]
    assert [(m["status"], m["errorCode"]) for m in messages] == [("failed", "21211")]
    assert len(fake_twilio.sends()) == 1
    assert fake_twilio.messages == {}


async def test_a_send_answered_with_5xx_after_creation_is_not_sent_twice(
    tmp_path: Path, fake_twilio: FakeTwilio
) -> None:
    provider = TwilioProvider(
        fake_twilio.account_sid, fake_twilio.auth_token, fake_twilio.base_url, timeout=1.0, backoff=(0.01, 0.02)
    )
    fake_twilio.script("send", Action("create_then_status", status=502))
    async with twilio_harness(tmp_path, fake_twilio, provider=provider) as h:
        _, _, sid = await open_conversation(h)
        assert list(fake_twilio.messages) == [sid]
        assert fake_twilio.routes() == ["send", "list"]


# --- inbound ------------------------------------------------------------------------------------


async def test_inbound_is_answered_with_empty_twiml_and_stored_once_per_message_sid(h: Harness) -> None:
    conversation_id, _, _ = await open_conversation(h)
    for _ in range(3):
        response = await callback(h, INBOUND, inbound_params())
        assert response.status_code == 200
        assert response.content == EMPTY_TWIML == b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
        assert response.headers["content-type"].startswith("text/xml")
    rows = h.rows(
        "SELECT conversation_id, content, provider, provider_message_id FROM messages WHERE direction = 'inbound'"
    )
    assert [tuple(r) for r in rows] == [(conversation_id, "Yes, Tuesday works", "twilio", "SM" + "a" * 32)]
    assert event_types(h, conversation_id).count("sms.message_received") == 1

    await callback(h, INBOUND, inbound_params(sid="SM" + "b" * 32, body="And 3pm?"))
    assert count(h, "messages WHERE direction = 'inbound'") == 2


async def test_concurrent_duplicates_are_stored_once(h: Harness) -> None:
    await open_conversation(h)
    responses = await asyncio.gather(*[callback(h, INBOUND, inbound_params()) for _ in range(5)])
    assert {r.status_code for r in responses} == {200}
    assert count(h, "messages WHERE direction = 'inbound'") == 1


OTHER_URLS = [
    "http://127.0.0.1:8000/v1/providers/twilio/inbound",
    "https://parley.example.test/v1/providers/twilio/status",
    "https://evil.example.test/v1/providers/twilio/inbound",
    "https://parley.example.test/v1/providers/twilio/inbound?x=1",
]


@pytest.mark.parametrize(
    "tamper",
    ["missing", "other-token", "other-params", *[f"url:{u}" for u in OTHER_URLS]],
)
async def test_a_bad_inbound_signature_is_403_and_stores_nothing(h: Harness, tamper: str) -> None:
    await open_conversation(h)
    before = count(h, "events")
    params = inbound_params()
    kwargs: dict[str, Any] = {}
    if tamper == "missing":
        kwargs["signature"] = False
    elif tamper == "other-token":
        kwargs["token"] = "not-the-auth-token"
    elif tamper == "other-params":
        kwargs["signed_params"] = {**params, "Body": "something else"}
    else:
        kwargs["signed_url"] = tamper.removeprefix("url:")
    response = await callback(h, INBOUND, params, **kwargs)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert count(h, "messages WHERE direction = 'inbound'") == 0
    assert count(h, "events") == before


async def test_a_signature_over_the_default_port_form_is_accepted(h: Harness) -> None:
    response = await callback(h, INBOUND, inbound_params(), signed_url=f"https://parley.example.test:443{INBOUND}")
    assert response.status_code == 200
    assert count(h, "messages WHERE direction = 'inbound'") == 1  # unrouted: no conversation yet


async def test_opt_out_type_reaches_the_inbound_effects(h: Harness) -> None:
    seen: list[str | None] = []

    def effect(ctx: Any, conn: Any, result: InboundResult, sms: InboundSms, now_ms: int) -> None:
        seen.append(sms.provider_opt_out_type)

    h.ctx.inbound_effects.append(effect)
    await callback(h, INBOUND, inbound_params(body="STOP", OptOutType="STOP"))
    await callback(h, INBOUND, inbound_params(sid="SM" + "c" * 32, body="hello"))
    assert seen == ["STOP", None]
    assert h.ctx.provider.confirms_opt_out is False  # Parley confirms unless OptOutType says Twilio did


async def test_an_mms_keeps_its_attachments_on_the_message_and_in_its_event(h: Harness) -> None:
    conversation_id, _, _ = await open_conversation(h)
    media = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME"
    params = inbound_params(
        body="",
        NumMedia="3",
        MediaUrl0=media + "0",
        MediaContentType0="image/jpeg",
        MediaUrl1="javascript:alert(1)",  # not an http(s) URL: skipped
        MediaContentType1="image/png",
        MediaUrl2=media + "2",
        MediaContentType2="video/mp4",
    )
    assert (await callback(h, INBOUND, params)).status_code == 200
    (row,) = h.rows("SELECT content, media FROM messages WHERE direction = 'inbound'")
    expected = [{"url": media + "0", "contentType": "image/jpeg"}, {"url": media + "2", "contentType": "video/mp4"}]
    assert (row["content"], msgspec.json.decode(row["media"])) == ("", expected)
    events = h.rows(
        "SELECT payload FROM events WHERE type = 'sms.message_received' AND conversation_id = ?", conversation_id
    )
    (received,) = [msgspec.json.decode(e["payload"]) for e in events]
    assert received["data"]["media"] == expected


@pytest.mark.parametrize("num_media", ["0", "two", ""])
async def test_a_text_without_valid_attachments_has_no_media(h: Harness, num_media: str) -> None:
    await open_conversation(h)
    params = inbound_params(NumMedia=num_media, MediaUrl0="https://example.test/m0", MediaContentType0="image/jpeg")
    assert (await callback(h, INBOUND, params)).status_code == 200
    (row,) = h.rows("SELECT media FROM messages WHERE direction = 'inbound'")
    assert row["media"] is None
    (received,) = h.rows("SELECT payload FROM events WHERE type = 'sms.message_received'")
    assert "media" not in msgspec.json.decode(received["payload"])["data"]


async def test_an_answer_cut_off_is_not_taken_for_an_identical_one_twilio_already_has(
    tmp_path: Path, fake_twilio: FakeTwilio
) -> None:
    """A HELP was answered (Twilio holds that SMS), a second identical answer was committed and the process died
    before its POST: start-up's look-up must not take the first answer's SID for the second one."""
    async with twilio_harness(tmp_path, fake_twilio) as h:
        conversation_id, _, _ = await open_conversation(h)
        await callback(h, INBOUND, inbound_params(body="HELP"))
        (first,) = h.rows("SELECT provider_message_id, content FROM messages WHERE author = 'system'")
        assert first["provider_message_id"] is not None

        def queue(conn: sqlite3.Connection) -> None:
            conversation = conversation_store.get(conn, conversation_id)
            assert conversation is not None
            messaging.queue_system(h.ctx, conn, conversation, first["content"])

        await h.ctx.db.write(queue)  # committed with a second HELP; the process dies before the send
    sends = len(fake_twilio.sends())
    async with twilio_harness(tmp_path, fake_twilio) as h:
        settled = "SELECT status, error_code, provider_message_id FROM messages WHERE author = 'system' ORDER BY seq"
        rows = await eventually(
            lambda: [tuple(r) for r in h.rows(settled)] if tuple(h.rows(settled)[1]) != ("queued", None, None) else None
        )
        assert rows[0][2] == first["provider_message_id"]
        assert rows[1] == ("failed", "parley_interrupted", None)  # Twilio has no SMS of its own for it
        assert len(fake_twilio.sends()) == sends  # nothing sent again


async def test_recovery_never_takes_the_sid_of_an_identical_send_still_in_flight(
    h: Harness, fake_twilio: FakeTwilio
) -> None:
    """The background recovery looks up a cut-off text while the running process sends an identical one that Twilio
    has created but not yet answered: the look-up waits for that send, whose SID is then claimed."""
    conversation_id, _, _ = await open_conversation(h)

    def queue(conn: sqlite3.Connection) -> messaging.Outgoing:
        conversation = conversation_store.get(conn, conversation_id)
        assert conversation is not None
        return messaging.queue_system(h.ctx, conn, conversation, "Same text")

    cut = await h.ctx.db.write(queue)  # as if a crash cut it off before its POST
    live = await h.ctx.db.write(queue)  # this process's own identical text
    fake_twilio.script("send", Action("delay", seconds=1.0))  # Twilio creates it at once, answers late
    sending = asyncio.create_task(messaging.send_queued(h.ctx, live))
    await asyncio.sleep(0.3)
    await messaging.recover_unsent(h.ctx, [cut.message])  # what the start-up task does
    await sending
    rows = h.rows(
        "SELECT status, error_code, provider_message_id FROM messages WHERE content = 'Same text' ORDER BY seq"
    )
    assert len(fake_twilio.sends()) == 2  # the opening and the live text: the cut-off one never went out
    assert tuple(rows[0]) == ("failed", "parley_interrupted", None)
    assert rows[1]["provider_message_id"] is not None


async def test_a_keyword_twilio_recognised_is_stored_as_the_keyword_it_was_acted_on_as(h: Harness) -> None:
    await open_conversation(h)
    await callback(h, INBOUND, inbound_params(body="AIDE", OptOutType="HELP"))
    await callback(h, INBOUND, inbound_params(sid="SM" + "c" * 32, body="help"))
    await callback(h, INBOUND, inbound_params(sid="SM" + "d" * 32, body="hello"))
    rows = h.rows("SELECT content, keyword FROM messages WHERE direction = 'inbound' ORDER BY seq")
    assert [tuple(row) for row in rows] == [("AIDE", "help"), ("help", "help"), ("hello", None)]


@pytest.mark.parametrize("body", ["STOP", "HELP"])
async def test_twilio_is_answered_before_parleys_own_answer_is_sent(
    h: Harness, fake_twilio: FakeTwilio, body: str
) -> None:
    """The keyword's answer is committed with the inbound message, then handed to Twilio after the TwiML: a slow
    Twilio API cannot push the webhook past Twilio's 15 s budget."""
    await open_conversation(h)
    sends_when_answered: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                sends_when_answered.append(len(fake_twilio.sends()))
                answered = h.rows("SELECT status FROM messages WHERE author = 'system'")
                assert [row["status"] for row in answered] == ["queued"]  # committed before the answer
            await send(message)

        await h.edge(scope, receive, watch)

    params = inbound_params(body=body)
    headers = signed_headers(h.settings.twilio_auth_token, PUBLIC + INBOUND, params)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver.local") as client:
        response = await client.post(INBOUND, content=urlencode(params), headers=headers)
    assert response.status_code == 200
    assert sends_when_answered == [1]  # only the opening had gone out when Twilio was answered
    assert len(fake_twilio.sends()) == 2  # then Parley's answer went, in the same request's background task
    sent = h.rows("SELECT status, provider_message_id FROM messages WHERE author = 'system'")
    assert sent[0]["provider_message_id"] is not None


@pytest.mark.parametrize(("opt_out_type", "confirmations"), [("STOP", 0), (None, 1)])
async def test_parley_confirms_a_stop_only_when_twilio_did_not(
    h: Harness, fake_twilio: FakeTwilio, opt_out_type: str | None, confirmations: int
) -> None:
    conversation_id, _, _ = await open_conversation(h)
    extra = {"OptOutType": opt_out_type} if opt_out_type else {}
    response = await callback(h, INBOUND, inbound_params(body="STOP", **extra))
    assert response.status_code == 200
    assert len(fake_twilio.sends()) == 1 + confirmations  # the opening, plus Parley's own confirmation
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert (conversation["status"], conversation["endReason"]) == ("closed", "opted_out")
    assert count(h, "events WHERE type = 'contact.opt_out'") == 1


async def test_a_keyword_twilio_recognised_opts_the_pair_out(h: Harness, fake_twilio: FakeTwilio) -> None:
    """An Advanced Opt-Out keyword of the Messaging Service's own (not one of Parley's): Twilio has blocked the
    pair and answered, and says so with OptOutType."""
    conversation_id, _, _ = await open_conversation(h)
    response = await callback(h, INBOUND, inbound_params(body="Arret", OptOutType="STOP"))
    assert response.status_code == 200
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert (conversation["status"], conversation["endReason"]) == ("closed", "opted_out")
    (row,) = h.rows("SELECT payload FROM events WHERE type = 'contact.opt_out'")
    assert msgspec.json.decode(row["payload"])["data"]["keyword"] == "ARRET"
    assert count(h, "opt_outs") == 1
    assert len(fake_twilio.sends()) == 1  # the opening only: Twilio confirmed it


@pytest.mark.parametrize("body", ["\u200fSTOP", "Stop\u200b", "\ufeffstop"])
async def test_a_stop_with_a_character_that_shows_nothing_opts_the_pair_out(
    h: Harness, fake_twilio: FakeTwilio, body: str
) -> None:
    """The customer's screen shows STOP (a right-to-left keyboard's direction mark, a pasted zero-width space or a
    byte-order mark show nothing): the pair is listed and the model never answers, as for a bare STOP."""
    conversation_id, _, _ = await open_conversation(h)
    response = await callback(h, INBOUND, inbound_params(body=body))
    assert response.status_code == 200
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert (conversation["status"], conversation["endReason"]) == ("closed", "opted_out")
    assert [tuple(row) for row in h.rows("SELECT phone_number, keyword FROM opt_outs")] == [(CUSTOMER, "STOP")]
    assert count(h, "jobs WHERE kind = 'assistant_turn'") == 0
    create = await h.post("/v1/sms-conversations", SEED_CREATE)
    assert create.status_code == 409
    assert create.json()["error"]["code"] == "recipient_opted_out"


async def test_a_help_twilio_recognised_never_reaches_the_model(h: Harness, fake_twilio: FakeTwilio) -> None:
    conversation_id, _, _ = await open_conversation(h)
    response = await callback(h, INBOUND, inbound_params(body="Aide", OptOutType="HELP"))
    assert response.status_code == 200
    assert count(h, "jobs WHERE kind = 'assistant_turn'") == 0  # no turn for it
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert conversation["status"] == "in_progress"
    assert len(fake_twilio.sends()) == 1  # Twilio answered the HELP: Parley adds nothing


async def test_a_signed_inbound_without_message_sid_is_400(h: Harness) -> None:
    params = {k: v for k, v in inbound_params().items() if k not in {"MessageSid", "SmsSid", "SmsMessageSid"}}
    response = await callback(h, INBOUND, params)
    assert response.status_code == 400
    assert response.json()["error"]["details"] == [{"field": "MessageSid", "message": "is required"}]
    assert count(h, "messages") == 0


class MultiValuedForm(dict[str, str]):
    """Form parameters with a name given more than once, as the RequestValidator reads them (Flask's `getall`)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs

    def getall(self, name: str) -> list[str]:
        return [value for key, value in self.pairs if key == name]


async def test_a_signed_callback_with_a_parameter_given_twice_is_accepted(h: Harness) -> None:
    """Twilio may send a name more than once (its SDKs sign such forms; some of its webhooks do, and it adds
    parameters without notice): a signed one is Twilio's own, and a 400 would lose the text (Twilio does not
    retry it). The API's query rule (a repeated parameter is a 400) is not applied here."""
    pairs = [
        *inbound_params().items(),
        ("MessagingBinding.Address", "+15555550101"),
        ("MessagingBinding.Address", "+1"),
    ]
    validator = RequestValidator(h.settings.twilio_auth_token)
    for signed, status in ((dict(pairs), 403), (MultiValuedForm(pairs), 200)):  # both values are signed, and checked
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": validator.compute_signature(PUBLIC + INBOUND, signed),
        }
        response = await h.client.post(INBOUND, content=urlencode(pairs), headers=headers)
        assert response.status_code == status, response.text
    assert count(h, "messages WHERE direction = 'inbound'") == 1


async def test_a_json_callback_is_refused(h: Harness) -> None:
    body = msgspec.json.encode(inbound_params())
    unsigned = await h.client.post(INBOUND, content=body, headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 403
    headers = {
        "Content-Type": "application/json",
        **{
            "X-Twilio-Signature": signed_headers(h.settings.twilio_auth_token, PUBLIC + INBOUND, {})[
                "X-Twilio-Signature"
            ]
        },
    }
    signed = await h.client.post(INBOUND, content=body, headers=headers)
    assert signed.status_code == 415
    assert count(h, "messages") == 0


async def test_a_callback_over_64_kib_is_413_and_stores_nothing(h: Harness) -> None:
    params = inbound_params(body="x" * (64 * 1024))
    response = await callback(h, INBOUND, params)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert count(h, "messages") == 0


async def test_callbacks_need_no_api_key_but_the_api_still_does(h: Harness) -> None:
    assert (await h.client.post(INBOUND)).status_code == 403
    assert (await h.client.get("/v1/sms-conversations")).status_code == 401


async def test_callback_routes_exist_only_in_twilio_mode(tmp_path: Path) -> None:
    async with start_harness(tmp_path) as sim:
        response = await callback(sim, INBOUND, inbound_params(), token="x")
        assert response.status_code == 404


async def test_openapi_documents_the_callbacks_without_bearer_auth(h: Harness) -> None:
    schema = (await h.client.get("/schema/openapi.json")).json()
    for path in (INBOUND, STATUS):
        operation = schema["paths"][path]["post"]
        assert "application/x-www-form-urlencoded" in operation["requestBody"]["content"]
        assert operation["security"] == [{}]


# --- status callbacks -----------------------------------------------------------------------------


async def test_status_callbacks_follow_the_lattice_and_emit_once_per_real_change(h: Harness) -> None:
    conversation_id, message_id, sid = await open_conversation(h)
    url = f"{STATUS}?messageId={message_id}"
    sequence = ["sent", "sent", "queued", "delivered", "delivered", "undelivered", "read"]
    for provider_status in sequence:
        response = await callback(h, url, status_params(sid, provider_status))
        assert response.status_code == 204
    (message,) = h.rows("SELECT status, delivered_at, error_code FROM messages WHERE id = ?", message_id)
    assert message["status"] == "delivered" and message["delivered_at"] is not None
    reports = h.rows(
        "SELECT provider_status, applied, raw FROM status_reports WHERE message_id = ? ORDER BY id", message_id
    )
    assert [r["provider_status"] for r in reports] == sequence  # every raw callback is kept
    assert [r["applied"] for r in reports] == [1, 0, 0, 1, 0, 0, 0]
    assert msgspec.json.decode(reports[0]["raw"])["MessageSid"] == sid
    updates = h.rows(
        "SELECT payload FROM events WHERE conversation_id = ? AND type = 'sms.message_delivery_updated' ORDER BY pos",
        conversation_id,
    )
    data = [msgspec.json.decode(u["payload"])["data"] for u in updates]
    assert [(d["previousStatus"], d["status"]) for d in data] == [("queued", "sent"), ("sent", "delivered")]


async def test_a_failure_keeps_twilios_error_code(h: Harness) -> None:
    _, message_id, sid = await open_conversation(h)
    url = f"{STATUS}?messageId={message_id}"
    await callback(h, url, status_params(sid, "undelivered", ErrorCode="30003"))
    await callback(h, url, status_params(sid, "delivered"))  # terminal never changes
    (message,) = h.rows("SELECT status, error_code FROM messages WHERE id = ?", message_id)
    assert (message["status"], message["error_code"]) == ("undelivered", "30003")
    (update,) = h.rows("SELECT payload FROM events WHERE type = 'sms.message_delivery_updated'")
    assert msgspec.json.decode(update["payload"])["data"]["errorCode"] == "30003"


async def test_a_status_signature_for_another_message_id_fails(h: Harness) -> None:
    _, message_id, sid = await open_conversation(h)
    other = "00000000-0000-4000-8000-000000000000"
    response = await callback(
        h,
        f"{STATUS}?messageId={message_id}",
        status_params(sid, "delivered"),
        signed_url=f"{PUBLIC}{STATUS}?messageId={other}",
    )
    assert response.status_code == 403
    assert count(h, "status_reports") == 0
    assert h.rows("SELECT status FROM messages WHERE id = ?", message_id)[0]["status"] == "queued"


async def test_a_status_callback_without_message_id_is_matched_by_sid(h: Harness) -> None:
    _, message_id, sid = await open_conversation(h)
    assert (await callback(h, STATUS, status_params(sid, "sent"))).status_code == 204
    assert h.rows("SELECT status FROM messages WHERE id = ?", message_id)[0]["status"] == "sent"


async def test_a_status_callback_moves_the_message_its_url_names_even_under_another_sid(h: Harness) -> None:
    """The look-up after a lost answer may record the SID of an identical earlier text (one whose own send ended
    `provider_outcome_unknown`); Twilio's signed callbacks for the message's real SID name it in their URL, and move
    it."""
    _, message_id, _ = await open_conversation(h)
    real = "SM" + "f" * 32
    response = await callback(h, f"{STATUS}?messageId={message_id}", status_params(real, "delivered"))
    assert response.status_code == 204
    assert h.rows("SELECT status FROM messages WHERE id = ?", message_id)[0]["status"] == "delivered"
    (report,) = h.rows("SELECT message_id, applied FROM status_reports WHERE provider_message_id = ?", real)
    assert (report["message_id"], report["applied"]) == (message_id, 1)


async def test_a_status_callback_that_overtakes_the_send_answer_is_not_undone(
    tmp_path: Path, fake_twilio: FakeTwilio
) -> None:
    fake_twilio.script("send", Action("delay", seconds=0.3))
    async with twilio_harness(tmp_path, fake_twilio) as h:
        create = asyncio.create_task(h.post("/v1/sms-conversations", SEED_CREATE))
        for _ in range(200):
            if fake_twilio.messages:
                break
            await asyncio.sleep(0.005)
        (sid,) = fake_twilio.messages
        (row,) = h.rows("SELECT id FROM messages WHERE direction = 'outbound'")
        overtaking = await callback(h, f"{STATUS}?messageId={row['id']}", status_params(sid, "sent"))
        assert overtaking.status_code == 204
        assert (await create).status_code == 201
        (message,) = h.rows("SELECT status, provider_message_id FROM messages WHERE id = ?", row["id"])
        assert (message["status"], message["provider_message_id"]) == ("sent", sid)


async def test_stale_messages_are_reconciled_by_polling_twilio(tmp_path: Path, fake_twilio: FakeTwilio) -> None:
    clock = FakeClock()
    async with twilio_harness(tmp_path, fake_twilio, clock=clock, status_reconcile_after_seconds=5) as h:
        conversation_id, message_id, sid = await open_conversation(h)
        fake_twilio.set_status(sid, "delivered")
        assert await housekeeping.reconcile_stale_statuses(h.ctx) == 0  # not stale yet
        assert "fetch" not in fake_twilio.routes()
        await clock.advance(6)
        assert await housekeeping.reconcile_stale_statuses(h.ctx) == 1
        (fetch,) = [r for r in fake_twilio.requests if r.route == "fetch"]
        assert fetch.authorized and fetch.path.endswith(f"/Messages/{sid}.json")
        assert h.rows("SELECT status FROM messages WHERE id = ?", message_id)[0]["status"] == "delivered"
        (report,) = h.rows("SELECT provider_status, raw FROM status_reports WHERE message_id = ?", message_id)
        assert report["provider_status"] == "delivered"
        assert msgspec.json.decode(report["raw"])["source"] == "poll"
        assert event_types(h, conversation_id).count("sms.message_delivery_updated") == 1
        # The callback Twilio sends for the same status is then a duplicate.
        assert (
            await callback(h, f"{STATUS}?messageId={message_id}", status_params(sid, "delivered"))
        ).status_code == 204
        assert event_types(h, conversation_id).count("sms.message_delivery_updated") == 1
        assert count(h, "status_reports WHERE message_id = ?", message_id) == 2


async def test_a_failed_status_look_up_is_one_log_line_and_is_asked_again_later(
    tmp_path: Path, fake_twilio: FakeTwilio, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    async with twilio_harness(tmp_path, fake_twilio, clock=clock, status_reconcile_after_seconds=5) as h:
        _, message_id, sid = await open_conversation(h)
        await h.ctx.scheduler.stop()
        fake_twilio.script("fetch", Action("status", status=503))
        await clock.advance(6)
        with caplog.at_level(logging.WARNING, logger="parley.housekeeping"):
            assert await housekeeping.reconcile_stale_statuses(h.ctx) == 0
        (record,) = [r for r in caplog.records if "status look-up failed" in r.getMessage()]
        assert record.exc_info is None and "HTTP 503" in record.getMessage()
        fake_twilio.set_status(sid, "delivered")
        await clock.advance(3600)
        assert await housekeeping.reconcile_stale_statuses(h.ctx) == 1
        assert h.rows("SELECT status FROM messages WHERE id = ?", message_id)[0]["status"] == "delivered"


async def test_a_message_twilio_leaves_at_sent_is_looked_up_less_often_then_not_at_all(
    tmp_path: Path, fake_twilio: FakeTwilio
) -> None:
    """Twilio leaves a message at `sent` for good when the carrier never reports delivery: ten days of 30-minute
    housekeeping passes ask about it a handful of times, spaced out, and not at all after three days."""
    clock = FakeClock()
    async with twilio_harness(tmp_path, fake_twilio, clock=clock, status_reconcile_after_seconds=600) as h:
        conversation_id, message_id, sid = await open_conversation(h)
        fake_twilio.set_status(sid, "sent")
        await h.ctx.scheduler.stop()  # only the passes below look the message up
        asked_at: list[int] = []  # in 30-minute steps from the send
        for step in range(1, 10 * 48 + 1):
            before = fake_twilio.routes().count("fetch")
            await clock.advance(1800)
            await housekeeping.reconcile_stale_statuses(h.ctx)
            if fake_twilio.routes().count("fetch") > before:
                asked_at.append(step)
        assert 5 <= len(asked_at) <= 12, asked_at  # every pass (480) before
        gaps = [later - earlier for earlier, later in itertools.pairwise(asked_at)]
        assert gaps == sorted(gaps) and gaps[-1] <= 49, asked_at  # spaced out more and more, at most daily
        assert asked_at[-1] <= 3 * 48 + 1, asked_at  # and none once the message is three days old
        fetches = fake_twilio.routes().count("fetch")
        assert fetches == len(asked_at)
        assert count(h, "status_reports WHERE message_id = ? AND raw LIKE '%poll%'", message_id) == fetches
        # A late callback is still applied.
        updates = event_types(h, conversation_id).count("sms.message_delivery_updated")
        late = await callback(h, f"{STATUS}?messageId={message_id}", status_params(sid, "delivered"))
        assert late.status_code == 204
        assert h.rows("SELECT status FROM messages WHERE id = ?", message_id)[0]["status"] == "delivered"
        assert event_types(h, conversation_id).count("sms.message_delivery_updated") == updates + 1


# --- a crash while the opening SMS was on its way to Twilio -------------------------------------------


async def crash_mid_send(tmp_path: Path, key: str) -> str:
    """Leave the database as a kill during the opening's POST does: the conversation `pending`, its message
    `queued` with no Twilio sid. Returns the API key used."""
    return await crash_mid_sends(tmp_path, {key: CUSTOMER})


async def crash_mid_sends(tmp_path: Path, creates: dict[str, str]) -> str:
    """`crash_mid_send` for several creates at once, by Idempotency-Key: the number each one texts."""
    hanging = HangingProvider()
    async with start_harness(tmp_path, provider=hanging) as first:
        requests = [
            asyncio.create_task(
                first.post("/v1/sms-conversations", {**SEED_CREATE, "toNumber": to}, **{"Idempotency-Key": key})
            )
            for key, to in creates.items()
        ]
        await eventually(lambda: count(first, "conversations WHERE status = 'pending'") == len(creates))
        api_key = first.key()
    await asyncio.gather(*requests, return_exceptions=True)
    conn = sqlite3.connect(tmp_path / "parley.db")
    with conn:  # as a kill leaves it (the harness's own shutdown settled the send as failed)
        conn.execute("UPDATE conversations SET status = 'pending', ended_at = NULL, end_reason = NULL")
        conn.execute("UPDATE messages SET status = 'queued', error_code = NULL")
        conn.execute("UPDATE idempotency_keys SET state = 'running', outcome = NULL")
    conn.close()
    return api_key


async def test_an_opening_twilio_took_before_a_crash_is_kept_and_a_retry_sends_nothing_twice(
    tmp_path: Path, fake_twilio: FakeTwilio
) -> None:
    api_key = await crash_mid_send(tmp_path, "crash-sent")
    # The POST had reached Twilio: the message exists there, its answer died with the process.
    fake_twilio.create({"To": CUSTOMER, "From": OURS, "Body": SEED_CREATE["welcomeMessage"]})

    async with twilio_harness(tmp_path, fake_twilio) as h:
        h.keys["acme"] = api_key
        conversation = h.rows("SELECT id, status FROM conversations")[0]
        message = h.rows("SELECT provider_message_id, status FROM messages")[0]
        retry = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "crash-sent"})

    assert conversation["status"] == "in_progress"
    assert message["provider_message_id"] in fake_twilio.messages
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["data"]["conversationId"] == conversation["id"]
    assert retry.json()["data"]["providerMessageId"] == message["provider_message_id"]
    assert len(fake_twilio.messages) == 1 and fake_twilio.sends() == []  # never sent again


async def test_an_opening_whose_fate_twilio_cannot_tell_after_a_crash_is_not_resent(
    tmp_path: Path, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversations, "LOOKUP_RETRY_WAITS", (0.01, 0.01))  # the production 1 s and 3 s, shrunk
    api_key = await crash_mid_send(tmp_path, "crash-unknown")
    fake_twilio.script("list", *[Action("status", status=503)] * 10)

    async with twilio_harness(tmp_path, fake_twilio) as h:
        h.keys["acme"] = api_key
        conversation = h.rows("SELECT status, end_reason FROM conversations")[0]
        message = h.rows("SELECT status, error_code FROM messages")[0]
        retry = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "crash-unknown"})

    assert tuple(conversation) == ("closed", "opening_message_failed")
    assert tuple(message) == ("failed", "provider_outcome_unknown")
    assert retry.status_code == 502, retry.text
    assert retry.json()["error"]["providerCode"] == "provider_outcome_unknown"
    assert fake_twilio.sends() == []
    assert fake_twilio.routes() == ["list"] * (len(conversations.LOOKUP_RETRY_WAITS) + 1)  # asked again, in vain


async def test_an_opening_twilio_took_is_kept_when_its_first_look_up_after_a_crash_fails(
    tmp_path: Path, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One 503 from Twilio's list at start-up does not decide the create: asked again a moment later, Twilio shows
    the opening it took, and the conversation goes on (it was closed as `provider_outcome_unknown`, its customer
    texted an opening by a conversation that no longer answered)."""
    monkeypatch.setattr(conversations, "LOOKUP_RETRY_WAITS", (0.05, 0.05))  # the production 1 s and 3 s, shrunk
    api_key = await crash_mid_send(tmp_path, "crash-blip")
    fake_twilio.create({"To": CUSTOMER, "From": OURS, "Body": SEED_CREATE["welcomeMessage"]})
    fake_twilio.script("list", Action("status", status=503))

    async with twilio_harness(tmp_path, fake_twilio) as h:
        h.keys["acme"] = api_key
        conversation = h.rows("SELECT status, end_reason FROM conversations")[0]
        retry = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "crash-blip"})

    assert tuple(conversation) == ("in_progress", None)
    assert retry.status_code == 201, retry.text
    assert fake_twilio.routes() == ["list", "list"] and fake_twilio.sends() == []


async def test_a_create_whose_outcome_could_not_be_written_is_settled_while_the_server_runs(
    tmp_path: Path, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twilio took the opening, but the write of the create's outcome failed (here another process held the database
    past the busy timeout; a full disk does the same): the create answered 500 and left its conversation `pending`
    and its key held, and only a restart settled them (a retry got 409 `idempotency_in_progress` for a day, an
    operator's message 409 `conversation_pending`). Housekeeping settles it once it is older than any create takes."""
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 200)  # the production 10 s, shrunk for the test
    clock = FakeClock(start_ms=int(time.time() * 1000))  # Twilio's list dates its messages by the wall clock
    fake_twilio.script("send", Action("delay", seconds=1.0))
    async with twilio_harness(tmp_path, fake_twilio, clock=clock) as h:
        create = asyncio.create_task(h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "stalled"}))
        await eventually(lambda: count(h, "conversations WHERE status = 'pending'") == 1)
        assert (await answered_under_a_foreign_lock(h, create)).status_code == 500
        (conversation_id,) = [row[0] for row in h.rows("SELECT id FROM conversations WHERE status = 'pending'")]
        early = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "stalled"})
        assert early.json()["error"]["code"] == "idempotency_in_progress"

        await clock.advance(messaging.STALLED_AFTER_MS / 1000 + 60)  # housekeeping's next pass
        await eventually(lambda: count(h, "conversations WHERE status = 'in_progress'") == 1)
        retry = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "stalled"})
        operator = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Still there?"})
        sent = event_types(h, conversation_id).count("sms.message_sent")

    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["data"]["providerMessageId"] in fake_twilio.messages
    assert operator.status_code == 201, operator.text
    assert sent == 2  # the opening's, emitted by the settling, and the operator message's
    assert [r.form["Body"] for r in fake_twilio.sends()] == [SEED_CREATE["welcomeMessage"], "Still there?"]


async def test_a_send_whose_outcome_could_not_be_written_is_settled_while_the_server_runs(
    tmp_path: Path, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's message Twilio took, whose outcome could not be written: the POST answered 500, and with no
    status callback the message stayed `queued` with no SID and no `sms.message_sent` until a restart. Housekeeping
    settles it as start-up would, once it is older than any send takes."""
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 200)  # the production 10 s, shrunk for the test
    clock = FakeClock(start_ms=int(time.time() * 1000))  # Twilio's list dates its messages by the wall clock
    async with twilio_harness(tmp_path, fake_twilio, clock=clock) as h:
        conversation_id, _, _ = await open_conversation(h)
        fake_twilio.script("send", Action("delay", seconds=1.0))
        path = f"/v1/sms-conversations/{conversation_id}/messages"
        send = asyncio.create_task(h.post(path, {"content": "Still there?"}))
        await eventually(lambda: count(h, "messages WHERE author = 'operator'") == 1)
        assert (await answered_under_a_foreign_lock(h, send)).status_code == 500
        operator = "SELECT id, status, provider_message_id FROM messages WHERE author = 'operator'"

        await clock.advance(messaging.STALLED_AFTER_MS / 1000 + 60)  # housekeeping's next pass
        (row,) = await eventually(lambda: [r for r in h.rows(operator) if r["provider_message_id"] is not None])
        events = [
            json.loads(r["payload"])["data"]["messageId"]
            for r in h.rows("SELECT payload FROM events WHERE type = 'sms.message_sent'")
        ]

    assert [r.form["Body"] for r in fake_twilio.sends()][1:] == ["Still there?"]  # sent once, not again
    assert row["provider_message_id"] in fake_twilio.messages
    assert row["status"] == "queued"  # as Twilio answered the look-up; its callbacks move it on
    assert events.count(row["id"]) == 1


async def test_a_slow_twilio_holds_start_up_once_not_once_per_interrupted_create(
    tmp_path: Path, fake_twilio: FakeTwilio
) -> None:
    """Eight creates cut off mid-send, and a Twilio that takes half a second over each look-up: start-up asks about
    them side by side (it took that long per create, the server answering nothing meanwhile). Each is settled as
    before: the ones Twilio took go on, the others are closed and their keys freed."""
    numbers = [f"+1555555{n:04d}" for n in range(8)]
    api_key = await crash_mid_sends(tmp_path, {number: number for number in numbers})
    taken = numbers[:4]
    for number in taken:
        fake_twilio.create({"To": number, "From": OURS, "Body": SEED_CREATE["welcomeMessage"]})
    fake_twilio.script("list", *[Action("delay", seconds=0.5)] * len(numbers))

    started = time.monotonic()
    async with twilio_harness(tmp_path, fake_twilio) as h:
        took = time.monotonic() - started
        h.keys["acme"] = api_key
        settled = dict(h.rows("SELECT to_number, status FROM conversations"))
        retry = await h.post(
            "/v1/sms-conversations", {**SEED_CREATE, "toNumber": numbers[-1]}, **{"Idempotency-Key": numbers[-1]}
        )

    assert took < 3.5, took  # one after another, at least 8 x 0.5 = 4 s (about 0.8 s side by side, 2 s under load)
    assert settled == {number: "in_progress" if number in taken else "closed" for number in numbers}
    assert retry.status_code == 201 and "idempotent-replayed" not in retry.headers  # its key was freed: it ran
    assert fake_twilio.routes().count("list") == len(numbers)


async def test_a_twilio_that_hangs_holds_start_up_for_its_bound_not_per_interrupted_create(
    tmp_path: Path, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twilio accepts the look-ups and never answers: each one would take the client's 15 s read timeout, one after
    another (two creates were already 30 s of start-up). Start-up gives them LOOKUP_SECONDS in all, and the
    openings still without an answer then are ones Twilio cannot say about: closed, their keys replaying the 502."""
    monkeypatch.setattr(conversations, "LOOKUP_SECONDS", 1.0)  # the production 20 s, shrunk for the test
    api_key = await crash_mid_sends(tmp_path, {"hang-1": CUSTOMER, "hang-2": "+15555550777"})
    fake_twilio.script("list", *[Action("delay", seconds=20.0)] * 2)

    started = time.monotonic()
    async with twilio_harness(tmp_path, fake_twilio) as h:
        took = time.monotonic() - started
        h.keys["acme"] = api_key
        settled = [tuple(row) for row in h.rows("SELECT status, end_reason FROM conversations")]
        errors = [row[0] for row in h.rows("SELECT error_code FROM messages")]
        retry = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "hang-1"})

    assert took < 5.0, took
    assert settled == [("closed", "opening_message_failed")] * 2
    assert errors == ["provider_outcome_unknown"] * 2
    assert retry.status_code == 502 and retry.json()["error"]["providerCode"] == "provider_outcome_unknown"
    assert fake_twilio.sends() == []


def housekeeping_jobs(h: Harness, kind: str | None) -> list[Any]:
    """The periodic upkeep jobs (status look-ups and key purge, the sweep of stalled creates and sends), or one."""
    return [
        row
        for row in h.rows("SELECT kind, due_at, lease_until FROM jobs WHERE ref = 'global'")
        if kind in (None, row["kind"])
    ]


def housekeeping_passed(h: Harness, clock: FakeClock, kind: str | None = None) -> bool:
    """Whether every housekeeping pass ended since the clock last moved (each next one is due a minute after now)."""
    rows = housekeeping_jobs(h, kind)
    return bool(rows) and all(row["lease_until"] is None and row["due_at"] > clock.now_ms() for row in rows)


def housekeeping_began(h: Harness, clock: FakeClock) -> bool:
    """Whether every housekeeping pass is running, or ended, since the clock last moved."""
    rows = housekeeping_jobs(h, None)
    return bool(rows) and all(row["lease_until"] is not None or row["due_at"] > clock.now_ms() for row in rows)


async def answered_across_a_clock_step(h: Harness, clock: FakeClock, request: asyncio.Task[Any]) -> Any:
    """The wall clock steps past `messaging.STALLED_AFTER_MS` while `request` still waits for Twilio: housekeeping's
    passes begin before it is answered. Its answer, once the passes have ended."""
    await clock.advance(messaging.STALLED_AFTER_MS / 1000 + 60)  # the clock steps: housekeeping is due
    await eventually(lambda: housekeeping_began(h, clock))
    assert not request.done()  # the pass began while the request was still sending
    response = await request
    await eventually(lambda: housekeeping_passed(h, clock))
    return response


async def test_a_create_still_sending_when_the_clock_steps_forward_is_not_settled_underneath_it(
    tmp_path: Path, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock steps 11 minutes forward (an NTP correction, a VM resumed) while a create waits for Twilio: by
    its age it looks to housekeeping like a create whose outcome could not be written. Settled underneath it, its
    look-up waited on the send's own lock past its budget: the conversation was closed and the key stored a 502, and
    then the create answered 201 and wrote its 201 over that, for a closed conversation whose opening was sent."""
    monkeypatch.setattr(conversations, "LOOKUP_SECONDS", 0.2)  # the production 20 s, shrunk for the test
    clock = FakeClock(start_ms=int(time.time() * 1000))  # Twilio's list dates its messages by the wall clock
    fake_twilio.script("send", Action("delay", seconds=1.5))
    async with twilio_harness(tmp_path, fake_twilio, clock=clock) as h:
        create = asyncio.create_task(h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "in-flight"}))
        await eventually(lambda: fake_twilio.routes() == ["send"])
        await clock.advance(messaging.STALLED_AFTER_MS / 1000 + 60)  # the clock steps: housekeeping is due
        await eventually(lambda: housekeeping_passed(h, clock))
        assert not create.done()  # the pass ran while the create was still sending
        response = await create
        conversation = tuple(h.rows("SELECT status, end_reason FROM conversations")[0])
        retry = await h.post("/v1/sms-conversations", SEED_CREATE, **{"Idempotency-Key": "in-flight"})
        sent = event_types(h, response.json()["data"]["conversationId"]).count("sms.message_sent")

    assert response.status_code == 201, response.text
    assert conversation == ("in_progress", None)
    assert retry.status_code == 201 and retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["data"]["providerMessageId"] == response.json()["data"]["providerMessageId"]
    assert sent == 1
    assert fake_twilio.routes().count("send") == 1 and "list" not in fake_twilio.routes()  # not asked about


async def test_a_send_still_in_flight_when_the_clock_steps_forward_is_recorded_once(
    tmp_path: Path, fake_twilio: FakeTwilio
) -> None:
    """The same step of the clock under an operator's message still waiting for Twilio: housekeeping took it for a
    send whose outcome could not be written, waited for the send's lock, found the SID the send had just claimed
    and recorded it as sent again, a second `sms.message_sent` (and webhook delivery) for one SMS."""
    clock = FakeClock(start_ms=int(time.time() * 1000))  # Twilio's list dates its messages by the wall clock
    async with twilio_harness(tmp_path, fake_twilio, clock=clock) as h:
        conversation_id, _, _ = await open_conversation(h)
        fake_twilio.script("send", Action("delay", seconds=1.0))
        send = asyncio.create_task(h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Hi?"}))
        await eventually(lambda: fake_twilio.routes() == ["send", "send"])
        response = await answered_across_a_clock_step(h, clock, send)
        sent = event_types(h, conversation_id).count("sms.message_sent")

    assert response.status_code == 201, response.text
    assert sent == 2  # the opening's and this message's, once each
    assert fake_twilio.routes().count("send") == 2 and "list" not in fake_twilio.routes()  # not asked about


async def test_a_stalled_send_twilio_cannot_say_about_does_not_hold_up_housekeeping(
    tmp_path: Path, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twilio's list fails while a send whose outcome could not be written is swept: it is asked again after 5 s,
    30 s and 2 min, and housekeeping's pass waited with it (no status look-up, no key purge, no other sweep for the
    2.5 minutes, and 15 s more a look-up for each stalled message when Twilio hangs). The sweep runs on its own."""
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 200)  # the production 10 s, shrunk for the test
    clock = FakeClock(start_ms=int(time.time() * 1000))  # Twilio's list dates its messages by the wall clock
    async with twilio_harness(tmp_path, fake_twilio, clock=clock) as h:
        conversation_id, _, _ = await open_conversation(h)
        fake_twilio.script("send", Action("delay", seconds=0.5))
        send = asyncio.create_task(h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Hi?"}))
        await eventually(lambda: count(h, "messages WHERE author = 'operator'") == 1)
        other = sqlite3.connect(h.settings.database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # held while Twilio answers and the send writes its outcome
        assert (await send).status_code == 500
        other.execute(
            "INSERT INTO idempotency_keys (org_id, key, request_hash, state, created_at, expires_at)"
            " VALUES ('acme', 'expired', '', 'done', 0, 1)"
        )
        other.execute("COMMIT")
        other.close()
        fake_twilio.script("list", *[Action("status", status=503)] * 4)

        await clock.advance(messaging.STALLED_AFTER_MS / 1000 + 60)  # housekeeping's next pass
        await eventually(lambda: housekeeping_passed(h, clock, housekeeping.JOB))
        purged = count(h, "idempotency_keys WHERE key = 'expired'") == 0
        failed = "messages WHERE author = 'operator' AND error_code = 'provider_outcome_unknown'"
        for _ in range(40):  # the sweep, on its own, asks again after each of its waits
            if count(h, failed):
                break
            await clock.advance(10)
            await asyncio.sleep(0.02)

    assert purged
    assert count(h, failed) == 1
    assert fake_twilio.routes().count("list") == len(messaging.RECOVERY_WAITS) + 1


async def test_an_opening_still_sending_when_its_conversation_is_closed_and_the_clock_steps_is_recorded_once(
    tmp_path: Path, fake_twilio: FakeTwilio
) -> None:
    """A create with no Idempotency-Key waits for Twilio, its conversation is closed meanwhile (an operator's close)
    and the wall clock steps 11 minutes forward. The create is registered as live work by its conversation's id, but
    its opening, no longer the opening of a `pending` conversation or of a held key, was taken by the sweep for a
    send whose outcome could not be written: recorded once by the sweep and once by the create (two
    `sms.message_sent` for one SMS), or failed underneath a send Twilio then took."""
    clock = FakeClock(start_ms=int(time.time() * 1000))  # Twilio's list dates its messages by the wall clock
    fake_twilio.script("send", Action("delay", seconds=1.5))
    async with twilio_harness(tmp_path, fake_twilio, clock=clock) as h:
        create = asyncio.create_task(h.post("/v1/sms-conversations", SEED_CREATE))
        await eventually(lambda: fake_twilio.routes() == ["send"])
        conversation_id = h.rows("SELECT id FROM conversations")[0][0]
        assert (await h.post(f"/v1/sms-conversations/{conversation_id}/close")).status_code == 200
        response = await answered_across_a_clock_step(h, clock, create)
        sent = event_types(h, conversation_id).count("sms.message_sent")
        opening = tuple(h.rows("SELECT status, error_code FROM messages")[0])

    assert response.status_code == 201, response.text
    assert sent == 1
    assert opening[1] is None, opening
    assert fake_twilio.routes().count("send") == 1 and "list" not in fake_twilio.routes()  # not asked about
