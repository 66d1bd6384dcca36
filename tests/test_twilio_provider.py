"""TwilioProvider against the fake Twilio REST API: exact fields, error codes, retries that never send twice."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import msgspec
import pytest
from twilio.request_validator import RequestValidator

from app.api.app import build_provider
from app.config import ConfigError, Settings, load_settings
from app.domain.models import Message
from app.providers import twilio
from app.providers.base import ProviderRejected, SendOutcomeUnknown, SendRequest
from app.providers.twilio import TwilioProvider, body_matches
from tests.fake_twilio import Action, FakeTwilio, error_body, running_fake

FAST = (0.01, 0.02, 0.03)


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilio]:
    with running_fake() as fake:
        yield fake


def request(body: str = "Hi Ada, your recall appointment is ready.", to: str = "+15555550199") -> SendRequest:
    return SendRequest(
        message_id="7d9f3f2e-8c1a-4d4c-9a57-0b0f0a1c2d3e",
        from_number="+15555550123",
        to_number=to,
        body=body,
        status_callback_url="https://parley.example.test/v1/providers/twilio/status?messageId=7d9f3f2e-8c1a-4d4c-9a57-0b0f0a1c2d3e",
    )


def outbound(**changes: object) -> Message:
    """The stored message `request()` is the send of (queued, no SID yet), with `changes`."""
    sent = request()
    message = Message(
        id=sent.message_id,
        conversation_id=None,
        org_id=None,
        seq=None,
        direction="outbound",
        author="agent",
        from_number=sent.from_number,
        to_number=sent.to_number,
        content=sent.body,
        status="queued",
        provider="twilio",
        provider_message_id=None,
        error_code=None,
        encoding="GSM-7",
        segments=1,
        created_at=0,
        sent_at=None,
        delivered_at=None,
    )
    return msgspec.structs.replace(message, **changes)


async def started(provider: TwilioProvider) -> TwilioProvider:
    async def ignore(report: object) -> None:
        raise AssertionError("Twilio reports arrive over HTTP, not through the sink")

    await provider.start(ignore)
    return provider


@pytest.fixture
async def provider(fake_twilio: FakeTwilio) -> AsyncIterator[TwilioProvider]:
    p = TwilioProvider(
        fake_twilio.account_sid,
        fake_twilio.auth_token,
        fake_twilio.base_url,
        timeout=0.25,
        backoff=FAST,
        rng=random.Random(7),
    )
    await started(p)
    yield p
    await p.close()


async def test_send_posts_exactly_the_four_fields_with_basic_auth(
    provider: TwilioProvider, fake_twilio: FakeTwilio
) -> None:
    accepted = await provider.send(request())
    (sent,) = fake_twilio.sends()
    assert sent.authorized
    assert sent.path == f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json"
    assert sent.form == {
        "To": "+15555550199",
        "From": "+15555550123",
        "Body": "Hi Ada, your recall appointment is ready.",
        "StatusCallback": request().status_callback_url,
    }
    assert accepted.provider_message_id in fake_twilio.messages
    assert accepted.provider_status == "queued"


async def test_wrong_credentials_are_a_rejection_with_twilios_code(fake_twilio: FakeTwilio) -> None:
    p = await started(TwilioProvider(fake_twilio.account_sid, "not-the-token", fake_twilio.base_url, backoff=FAST))
    try:
        with pytest.raises(ProviderRejected) as caught:
            await p.send(request())
    finally:
        await p.close()
    assert caught.value.code == "20003"
    assert not fake_twilio.sends()[0].authorized
    assert fake_twilio.messages == {}


def test_twilio_api_key_settings_are_not_checked_in_simulator_mode() -> None:
    settings = load_settings({"TWILIO_API_KEY": "not-a-key"}, env_file=None)
    assert settings.sms_provider == "simulator"


async def test_an_api_key_authenticates_the_sends_in_the_accounts_url(fake_twilio: FakeTwilio) -> None:
    """Twilio's recommended production credentials: an API key (SK…) and its secret as the Basic-auth pair, the
    account SID still in the URL; the auth token stays for callback signatures only."""
    key = "SK" + "3" * 32
    fake_twilio.api_keys[key] = "key-secret"
    settings = Settings(
        sms_provider="twilio",
        twilio_account_sid=fake_twilio.account_sid,
        twilio_auth_token="the-token-is-not-used-for-sends",
        twilio_api_base=fake_twilio.base_url,
        twilio_api_key=key,
        twilio_api_secret="key-secret",
    )
    p = await started(TwilioProvider.from_settings(settings))
    try:
        accepted = await p.send(request())
    finally:
        await p.close()
    (sent,) = fake_twilio.sends()
    assert sent.authorized
    assert sent.path == f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json"
    assert accepted.provider_message_id in fake_twilio.messages


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"TWILIO_API_KEY": "SK" + "3" * 32}, "TWILIO_API_SECRET"),
        ({"TWILIO_API_SECRET": "s3cret-value"}, "TWILIO_API_KEY"),
        ({"TWILIO_API_KEY": "AC" + "3" * 32, "TWILIO_API_SECRET": "s3cret-value"}, "TWILIO_API_KEY"),
        ({"TWILIO_API_KEY": "SKxyz", "TWILIO_API_SECRET": "s3cret-value"}, "TWILIO_API_KEY"),
    ],
)
def test_an_api_key_needs_its_secret_and_the_sk_form(extra: dict[str, str], named: str) -> None:
    env = {**TWILIO_ENV, "PARLEY_PUBLIC_URL": "https://sms.example.com", **extra}
    with pytest.raises(ConfigError, match=named) as caught:
        load_settings(env, env_file=None)
    assert "s3cret-value" not in str(caught.value)


@pytest.mark.parametrize(
    ("to", "code"),
    [
        ("+15005550001", "21211"),
        ("+15005550002", "21612"),
        ("+15005550003", "21408"),
        ("+15005550004", "21610"),
        ("+15005550009", "21614"),
    ],
)
async def test_magic_numbers_map_to_twilio_error_codes(
    provider: TwilioProvider,
    fake_twilio: FakeTwilio,
    to: str,
    code: str,
) -> None:
    with pytest.raises(ProviderRejected) as caught:
        await provider.send(request(to=to))
    assert caught.value.code == code
    assert caught.value.message  # Twilio's own sentence
    assert len(fake_twilio.sends()) == 1  # a 4xx is final: no retry


async def test_an_error_without_json_keeps_the_http_status_as_code(
    provider: TwilioProvider, fake_twilio: FakeTwilio
) -> None:
    fake_twilio.script("send", Action("status", status=400, body={"unexpected": True}))
    with pytest.raises(ProviderRejected) as caught:
        await provider.send(request())
    assert caught.value.code == "http_400"


async def test_a_5xx_that_created_nothing_is_looked_up_then_resent_once(
    provider: TwilioProvider, fake_twilio: FakeTwilio
) -> None:
    fake_twilio.script("send", Action("status", status=503))
    accepted = await provider.send(request())
    assert fake_twilio.routes() == ["send", "list", "send"]
    assert list(fake_twilio.messages) == [accepted.provider_message_id]


@pytest.mark.parametrize(("code", "kept"), [(30003, "30003"), ("30007", "30007"), (None, None), ("", None)])
async def test_a_send_answer_that_already_failed_keeps_its_error_code(
    provider: TwilioProvider, fake_twilio: FakeTwilio, code: object, kept: str | None
) -> None:
    answer = {"sid": "SM" + "f" * 32, "status": "failed", "error_code": code}
    fake_twilio.script("send", Action("status", status=201, body=answer))
    accepted = await provider.send(request())
    assert (accepted.provider_message_id, accepted.provider_status, accepted.error_code) == (
        answer["sid"],
        "failed",
        kept,
    )


async def test_a_5xx_after_twilio_created_the_message_is_reconciled_not_resent(
    provider: TwilioProvider, fake_twilio: FakeTwilio
) -> None:
    fake_twilio.script("send", Action("create_then_status", status=500))
    accepted = await provider.send(request())
    assert fake_twilio.routes() == ["send", "list"]
    assert list(fake_twilio.messages) == [accepted.provider_message_id]
    lookup = fake_twilio.requests[1]
    assert lookup.query == {"To": "+15555550199", "From": "+15555550123", "PageSize": "50"}


async def test_a_timeout_after_the_request_reached_twilio_is_reconciled(
    provider: TwilioProvider, fake_twilio: FakeTwilio
) -> None:
    fake_twilio.script("send", Action("delay", seconds=0.6))
    accepted = await provider.send(request())
    assert len(fake_twilio.sends()) == 1
    assert list(fake_twilio.messages) == [accepted.provider_message_id]


async def test_a_dropped_connection_is_reconciled(provider: TwilioProvider, fake_twilio: FakeTwilio) -> None:
    fake_twilio.script("send", Action("drop"))
    accepted = await provider.send(request())
    assert fake_twilio.routes() == ["send", "list"]
    assert list(fake_twilio.messages) == [accepted.provider_message_id]


async def test_a_trial_accounts_prefixed_body_still_matches(provider: TwilioProvider, fake_twilio: FakeTwilio) -> None:
    fake_twilio.trial = True
    fake_twilio.script("send", Action("drop"))
    accepted = await provider.send(request())
    assert len(fake_twilio.sends()) == 1
    assert list(fake_twilio.messages) == [accepted.provider_message_id]


async def test_the_look_up_never_claims_an_earlier_identical_message(
    provider: TwilioProvider, fake_twilio: FakeTwilio
) -> None:
    first = await provider.send(request())
    fake_twilio.script("send", Action("drop"))
    second = await provider.send(request())
    assert second.provider_message_id != first.provider_message_id
    assert set(fake_twilio.messages) == {first.provider_message_id, second.provider_message_id}
    assert len(fake_twilio.sends()) == 2


async def test_after_a_restart_the_look_up_never_claims_an_identical_message_recorded_before_it(
    fake_twilio: FakeTwilio,
) -> None:
    """A new process has no memory of the SIDs the previous one took: the ids recorded in the database for the pair
    (handed over with the request) keep an identical text sent just before the restart from being taken for this
    one's, which would leave this one never sent."""
    before = await started(TwilioProvider(fake_twilio.account_sid, fake_twilio.auth_token, fake_twilio.base_url))
    first = await before.send(request())
    await before.close()
    after = await started(
        TwilioProvider(
            fake_twilio.account_sid, fake_twilio.auth_token, fake_twilio.base_url, backoff=FAST, rng=random.Random(7)
        )
    )
    try:
        recorded = {first.provider_message_id}

        async def recorded_ids() -> set[str]:
            return recorded

        fake_twilio.script("send", Action("status", status=503))  # nothing created: the look-up must find nothing

        second = await after.send(msgspec.structs.replace(request(), recorded=recorded_ids))

        assert second.provider_message_id != first.provider_message_id
        assert fake_twilio.routes()[-3:] == ["send", "list", "send"]
        assert set(fake_twilio.messages) == {first.provider_message_id, second.provider_message_id}
    finally:
        await after.close()


@pytest.mark.parametrize(
    ("stored", "matches"),
    [
        ("see you then.", True),
        ("Sent from your Twilio trial account - see you then.", True),
        ("Great, see you then.", False),  # an earlier, different text that merely ends the same way
        ("Sent from your Twilio trial account - Great, see you then.", False),  # the same, on a trial account
        ("sent from your twilio trial account: see you then.", True),
        (None, False),
    ],
)
def test_a_listed_body_matches_the_text_sent_or_the_trial_notice_before_it(stored: object, matches: bool) -> None:
    assert body_matches(stored, "see you then.") is matches


async def test_concurrent_identical_sends_each_get_their_own_message(
    provider: TwilioProvider, fake_twilio: FakeTwilio
) -> None:
    fake_twilio.script("send", Action("drop"), Action("drop"))
    results = await asyncio.gather(provider.send(request()), provider.send(request()), provider.send(request()))
    sids = {r.provider_message_id for r in results}
    assert len(sids) == 3
    assert set(fake_twilio.messages) == sids


async def test_429_is_retried_without_a_look_up(provider: TwilioProvider, fake_twilio: FakeTwilio) -> None:
    fake_twilio.script("send", Action("status", status=429, body=error_body(20429, "Too Many Requests", 429)))
    await provider.send(request())
    assert fake_twilio.routes() == ["send", "send"]
    assert len(fake_twilio.messages) == 1


async def test_unreachable_twilio_is_unavailable_not_an_unknown_outcome() -> None:
    closed = FakeTwilio().start()
    base = closed.base_url
    closed.stop()
    p = await started(TwilioProvider("AC" + "1" * 32, "token", base, timeout=0.25, backoff=FAST))
    try:
        with pytest.raises(ProviderRejected) as caught:
            await p.send(request())
    finally:
        await p.close()
    assert caught.value.code == twilio.UNAVAILABLE
    assert not isinstance(caught.value, SendOutcomeUnknown)


async def test_an_outcome_that_stays_unknown_is_never_resent(provider: TwilioProvider, fake_twilio: FakeTwilio) -> None:
    fake_twilio.script("send", Action("drop"))
    fake_twilio.script("list", *[Action("status", status=500)] * 5)
    with pytest.raises(SendOutcomeUnknown) as caught:
        await provider.send(request())
    assert caught.value.code == twilio.OUTCOME_UNKNOWN
    assert len(fake_twilio.sends()) == 1
    assert fake_twilio.routes().count("list") == 4  # one look-up per retry slot and a final one


async def test_a_look_up_that_recovers_finds_the_message(provider: TwilioProvider, fake_twilio: FakeTwilio) -> None:
    fake_twilio.script("send", Action("drop"))
    fake_twilio.script("list", Action("status", status=502))
    accepted = await provider.send(request())
    assert fake_twilio.routes() == ["send", "list", "list"]
    assert list(fake_twilio.messages) == [accepted.provider_message_id]


async def test_fetch_status_reads_the_message_resource(provider: TwilioProvider, fake_twilio: FakeTwilio) -> None:
    accepted = await provider.send(request())
    fake_twilio.set_status(accepted.provider_message_id, "undelivered", 30003)
    message = outbound(content="x", provider_message_id=accepted.provider_message_id, sent_at=0)
    report = await provider.fetch_status(message)
    assert report is not None
    assert (report.provider_status, report.error_code, report.message_id) == ("undelivered", "30003", message.id)
    assert report.raw["source"] == "poll" and "body" not in report.raw
    assert fake_twilio.requests[-1].path.endswith(f"/Messages/{accepted.provider_message_id}.json")
    assert fake_twilio.requests[-1].authorized

    assert await provider.fetch_status(_with_sid(message, "SM" + "0" * 32)) is None  # Twilio: 404
    assert await provider.fetch_status(_with_sid(message, None)) is None


def _with_sid(message: Message, sid: str | None) -> Message:
    return msgspec.structs.replace(message, provider_message_id=sid)


async def test_fetch_status_raises_when_twilio_fails(provider: TwilioProvider, fake_twilio: FakeTwilio) -> None:
    accepted = await provider.send(request())
    fake_twilio.script("fetch", Action("status", status=500))
    message = outbound(id="m", from_number="+1", to_number="+2", content="x", status="sent", sent_at=0)
    message = _with_sid(message, accepted.provider_message_id)
    with pytest.raises(twilio.TwilioUnavailable):
        await provider.fetch_status(message)


# --- signatures: ours must agree with Twilio's own library -------------------------------------

TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}


def test_signature_is_the_one_twilios_library_computes() -> None:
    assert twilio.compute_signature(TOKEN, URL, PARAMS.items()) == RequestValidator(TOKEN).compute_signature(
        URL, PARAMS
    )
    unicode_params = {"Body": "Ça va? 👍", "Empty": "", "A": "x&y=z"}
    assert twilio.compute_signature(TOKEN, URL, unicode_params.items()) == RequestValidator(TOKEN).compute_signature(
        URL, unicode_params
    )


@pytest.mark.parametrize(
    ("url", "params", "valid"),
    [
        (URL, PARAMS, True),
        ("https://mycompany.com:443/myapp.php?foo=1&bar=2", PARAMS, True),  # Twilio may sign either form
        ("https://mycompany.com/myapp.php?foo=1&bar=3", PARAMS, False),
        ("http://mycompany.com/myapp.php?foo=1&bar=2", PARAMS, False),
        (URL, {**PARAMS, "Digits": "1235"}, False),
        (URL, {**PARAMS, "Extra": ""}, False),
    ],
)
def test_signature_validation_agrees_with_request_validator(url: str, params: dict[str, str], valid: bool) -> None:
    signature = RequestValidator(TOKEN).compute_signature(URL, PARAMS)
    assert twilio.signature_valid(TOKEN, url, params.items(), signature) is valid
    assert RequestValidator(TOKEN).validate(url, params, signature) is valid


def test_missing_or_foreign_signatures_fail() -> None:
    assert not twilio.signature_valid(TOKEN, URL, PARAMS.items(), None)
    assert not twilio.signature_valid(TOKEN, URL, PARAMS.items(), "")
    other = RequestValidator("another-token").compute_signature(URL, PARAMS)
    assert not twilio.signature_valid(TOKEN, URL, PARAMS.items(), other)


# --- configuration ---------------------------------------------------------------------------------

TWILIO_ENV = {"PARLEY_SMS_PROVIDER": "twilio", "TWILIO_ACCOUNT_SID": "AC" + "2" * 32, "TWILIO_AUTH_TOKEN": "t"}


def test_twilio_mode_needs_a_public_url_for_its_callbacks() -> None:
    with pytest.raises(ConfigError, match="PARLEY_PUBLIC_URL"):
        load_settings(TWILIO_ENV, env_file=None)
    settings = load_settings({**TWILIO_ENV, "PARLEY_PUBLIC_URL": "https://sms.example.com/"}, env_file=None)
    assert settings.public_url == "https://sms.example.com"
    assert settings.twilio_api_base == "https://api.twilio.com"


def test_twilio_mode_builds_the_twilio_provider() -> None:
    provider = build_provider(Settings(sms_provider="twilio", twilio_account_sid="AC1", twilio_auth_token="t"))
    assert isinstance(provider, TwilioProvider)
    assert provider.name == "twilio"
    assert provider.messages_url == "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json"


async def test_a_send_that_fails_unexpectedly_keeps_its_message_from_an_identical_look_up(
    provider: TwilioProvider, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug after Twilio created the message: the send finds its own message before it lets go of the text's
    lock, so a start-up look-up for an identical cut-off text waiting on that lock cannot take its SID."""
    accept = provider._accept
    failures = [RuntimeError("a bug reading the answer")]

    def accept_failing_once(data: dict, message_id: str) -> object:
        if failures:
            raise failures.pop()
        return accept(data, message_id)

    monkeypatch.setattr(provider, "_accept", accept_failing_once)
    sending = asyncio.create_task(provider.send(request()))
    await asyncio.sleep(0)  # the send holds the text's lock
    # An identical text an earlier process persisted a minute ago and a crash cut off.
    cut_off = outbound(id="5b2c0f4e-1d2a-4e3f-8a9b-0c1d2e3f4a5b", created_at=int(time.time() * 1000) - 60_000)
    looking = asyncio.create_task(provider.find_sent(cut_off))
    accepted = await sending
    assert list(fake_twilio.messages) == [accepted.provider_message_id]
    assert await looking is None


async def test_a_look_up_finds_the_message_its_own_send_took_and_no_other_message_does(
    provider: TwilioProvider, fake_twilio: FakeTwilio
) -> None:
    """Twilio took a send whose outcome could not be written (housekeeping then asks about it while the process runs):
    the look-up finds the SID that send claimed for the message (it found none, and the create was closed as never
    sent, its retry texting the customer twice); an identical text of another message still cannot take it."""
    accepted = await provider.send(request())
    found = await provider.find_sent(outbound(created_at=int(time.time() * 1000)))
    assert found is not None and found.provider_message_id == accepted.provider_message_id
    other = outbound(id="5b2c0f4e-1d2a-4e3f-8a9b-0c1d2e3f4a5b", created_at=int(time.time() * 1000))
    assert await provider.find_sent(other) is None
    assert fake_twilio.routes() == ["send", "list", "list"]


async def test_an_answer_trickling_in_is_cut_off_as_a_whole_and_the_send_looked_up(fake_twilio: FakeTwilio) -> None:
    """httpx2's timeouts are per phase: a byte every 0.1 s never trips a 0.25 s read timeout. The whole call is
    bounded, and a POST cut off that way may have created the message, so it is looked up, never sent again."""
    provider = TwilioProvider(
        fake_twilio.account_sid,
        fake_twilio.auth_token,
        fake_twilio.base_url,
        timeout=0.25,
        call_seconds=0.5,
        backoff=FAST,
        rng=random.Random(7),
    )
    await started(provider)
    try:
        fake_twilio.script("send", Action("drip", seconds=0.1))
        accepted = await asyncio.wait_for(provider.send(request()), 10)
    finally:
        await provider.close()
    assert list(fake_twilio.messages) == [accepted.provider_message_id]
    assert fake_twilio.routes() == ["send", "list"]


async def test_a_send_that_fails_unexpectedly_before_twilio_took_it_is_a_send_failure_after_one_look_up(
    provider: TwilioProvider, fake_twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter's own look-up answers the outcome, so the caller does not look a second time."""

    assert provider._client is not None
    real = provider._client.request

    async def post_fails(method: str, url: str, **kwargs: Any) -> httpx2.Response:
        if method == "POST":
            raise RuntimeError("a bug before the request left")
        return await real(method, url, **kwargs)

    monkeypatch.setattr(provider._client, "request", post_fails)
    with pytest.raises(ProviderRejected) as caught:
        await provider.send(request())
    assert caught.value.code == "parley_send_failed" and not isinstance(caught.value, SendOutcomeUnknown)
    assert fake_twilio.routes() == ["list"] and not fake_twilio.messages
