"""Twilio Programmable Messaging: outbound sends (never twice), status look-ups, and callback signatures.

Sending is the delicate part. Twilio's Messages API has no idempotency key, so a POST whose answer
never arrived (a read timeout, a dropped connection, a 5xx) may or may not have created a message.
Such a send is never repeated blindly: Parley first looks for it (`GET Messages.json?To=&From=`,
matching the body and a creation time after our first attempt) and resends only when Twilio has no
such message. Failures that prove nothing was created (connection refused, 429) are simply retried.
When Twilio stays unreachable so that the outcome cannot be learnt at all, the send ends in
`SendOutcomeUnknown` and is not retried: a missing SMS is recoverable, a duplicate is not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Container, Iterable
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx2

from app.config import Settings
from app.domain.models import Message
from app.providers.base import (
    OUTCOME_UNKNOWN,
    SEND_FAILED,
    ProviderRejected,
    ProviderUnavailable,
    SendAccepted,
    SendOutcomeUnknown,
    SendRequest,
    StatusReport,
    StatusSink,
)
from app.webhooks.retry import parse_retry_after

log = logging.getLogger("parley.twilio")

API_VERSION = "2010-04-01"
DEFAULT_TIMEOUT = httpx2.Timeout(connect=5.0, read=15.0, write=15.0, pool=5.0)
# httpx2's timeouts are per phase: an answer trickling in a byte at a time would never trip them. This bounds a
# whole REST call, as every other outbound call of Parley's is bounded.
DEFAULT_CALL_SECONDS = 30.0
# Waits before the 2nd, 3rd and 4th attempt (±20 % jitter); the last one also precedes the final look-up.
DEFAULT_BACKOFF = (0.5, 2.0, 5.0)
MAX_RETRY_AFTER = 10.0
# How far before our first attempt a message found by the look-up may have been created (clock skew).
CLOCK_SKEW_SECONDS = 60.0
LOOKUP_PAGE_SIZE = 50
CLAIMED_SIDS_KEPT = 10_000

# Parley's own codes, for failures that carry no Twilio code.
UNAVAILABLE = "provider_unavailable"

# Twilio's send-time error codes Parley expects (and their wording when Twilio's answer has none).
KNOWN_ERRORS = {
    "20003": "Twilio refused the credentials (check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN).",
    "21211": "The 'To' number is not a valid phone number.",
    "21212": "The 'From' number is not a valid phone number.",
    "21408": "Permission to send an SMS has not been enabled for the region of the 'To' number.",
    "21606": "The 'From' number is not a valid, SMS-capable number of this account.",
    "21610": "Attempt to send to an unsubscribed recipient.",
    "21611": "The 'From' number has exceeded its queue of messages.",
    "21612": "The 'To' number is not currently reachable via SMS.",
    "21614": "The 'To' number is not a valid mobile number.",
}
# Fields of a polled Message resource kept in the audit record (the body is already on the message).
POLL_FIELDS = (
    "sid",
    "status",
    "error_code",
    "error_message",
    "direction",
    "date_created",
    "date_sent",
    "date_updated",
    "num_segments",
    "price",
    "price_unit",
)


class TwilioUnavailable(ProviderUnavailable):
    """Twilio could not be asked (network failure, 5xx, unreadable answer)."""


# --- callback signatures (X-Twilio-Signature) ----------------------------------------------------


def compute_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's signature: base64 HMAC-SHA1, keyed by the auth token, of the full URL Twilio called
    followed by every POSTed parameter as name + value, sorted by name (then value)."""
    grouped: dict[str, set[str]] = {}
    for name, value in params:
        grouped.setdefault(name, set()).add(value)
    payload = url + "".join(name + value for name in sorted(grouped) for value in sorted(grouped[name]))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def url_variants(url: str) -> list[str]:
    """The URL as given and with its default port added or removed: Twilio signs either form."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    if parts.port is None:
        default = 443 if parts.scheme == "https" else 80
        other = parts._replace(netloc=f"{prefix}{host}:{default}")
    else:
        other = parts._replace(netloc=f"{prefix}{host}")
    return [url, urlunsplit(other)]


def signature_valid(auth_token: str, url: str, params: Iterable[tuple[str, str]], signature: str | None) -> bool:
    """True when `signature` is Twilio's for this URL and these POST parameters (constant-time)."""
    if not signature:
        return False
    pairs = list(params)
    given = signature.strip().encode()
    return any(
        hmac.compare_digest(compute_signature(auth_token, candidate, pairs).encode(), given)
        for candidate in url_variants(url)
    )


# --- pure helpers -----------------------------------------------------------------------------


def error_code_text(value: Any) -> str | None:
    """Twilio error codes arrive as ints (REST) or strings (callbacks); keep them as strings."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def rejection_from(response: httpx2.Response) -> ProviderRejected:
    """Map Twilio's JSON error (`{"code": 21211, "message": …}`) into a ProviderRejected."""
    try:
        data = response.json()
    except ValueError:
        data = None
    code = message = None
    if isinstance(data, dict):
        code = error_code_text(data.get("code"))
        raw_message = data.get("message")
        message = raw_message.strip() if isinstance(raw_message, str) and raw_message.strip() else None
    code = code or f"http_{response.status_code}"
    message = message or KNOWN_ERRORS.get(code) or f"Twilio answered HTTP {response.status_code}."
    return ProviderRejected(code, message)


def parse_twilio_date(value: Any) -> float | None:
    """Twilio's RFC 2822 dates ("Thu, 30 Jul 2015 20:12:31 +0000") as epoch seconds."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


# Twilio's notice before every body a trial account sends ("Sent from your Twilio trial account - …"), and nothing else.
TRIAL_NOTICE = re.compile(r"sent from your twilio trial account\s*[-–—:]?\s*", re.IGNORECASE)


def body_matches(stored: Any, sent: str) -> bool:
    """Twilio's stored body is the text sent, or, on a trial account, that text right after Twilio's trial notice:
    not any text that merely ends the same way, on a trial account or not."""
    if not isinstance(stored, str):
        return False
    if stored == sent:
        return True
    return stored.endswith(sent) and TRIAL_NOTICE.fullmatch(stored[: len(stored) - len(sent)]) is not None


def pick_created(items: Iterable[Any], request: SendRequest, since: float, claimed: Container[str]) -> dict | None:
    """Among listed messages, the oldest one our send may have created and no other send has claimed."""
    candidates: list[tuple[float, str, dict]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        sid = item.get("sid")
        if not isinstance(sid, str) or sid in claimed:
            continue
        if not str(item.get("direction", "")).startswith("outbound"):
            continue
        if item.get("to") not in (None, request.to_number) or item.get("from") not in (None, request.from_number):
            continue
        if not body_matches(item.get("body"), request.body):
            continue
        created = parse_twilio_date(item.get("date_created"))
        if created is None or created < since:
            continue
        candidates.append((created, sid, item))
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


# --- the provider -----------------------------------------------------------------------------


class TwilioProvider:
    name = "twilio"
    # Twilio says it handled a keyword by putting `OptOutType` on the inbound callback (only for numbers in a
    # Messaging Service with Advanced Opt-Out); it reaches the compliance filter as
    # `InboundSms.provider_opt_out_type`. Without it Parley sends its own confirmation (SPEC §5).
    confirms_opt_out = False

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        api_base: str = "https://api.twilio.com",
        *,
        timeout: httpx2.Timeout | float = DEFAULT_TIMEOUT,
        call_seconds: float = DEFAULT_CALL_SECONDS,
        backoff: tuple[float, ...] = DEFAULT_BACKOFF,
        client: httpx2.AsyncClient | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        api_key: tuple[str, str] | None = None,
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError("Twilio needs an account SID and an auth token")
        self.account_sid = account_sid
        self._auth_token = auth_token
        # REST calls authenticate with an API key (SK…, secret) when one is given, else with the account's pair.
        self._credentials = api_key or (account_sid, auth_token)
        self._api_base = api_base.rstrip("/")
        self._timeout = timeout
        self._call_seconds = call_seconds
        self._backoff = tuple(backoff)
        self._client = client
        self._owns_client = client is None
        self._rng = rng or random.Random()
        self._wall_clock = wall_clock
        # The SIDs sends and look-ups of this process took, each with the id of the message it is: a look-up never takes
        # one for another message, and `find_sent` finds the one its own message's send took (a send whose outcome
        # could not be written: housekeeping asks about it while this process runs).
        self._claimed: OrderedDict[str, str] = OrderedDict()
        self._inflight: dict[tuple[str, str, str], tuple[asyncio.Lock, list[int]]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioProvider:
        # load_settings refuses twilio mode without both; the constructor says so for hand-built Settings.
        api_key = None
        if settings.twilio_api_key and settings.twilio_api_secret:
            api_key = (settings.twilio_api_key, settings.twilio_api_secret)
        return cls(
            settings.twilio_account_sid or "",
            settings.twilio_auth_token or "",
            settings.twilio_api_base,
            api_key=api_key,
        )

    @property
    def messages_url(self) -> str:
        return f"{self._account_url}/Messages.json"

    def message_url(self, sid: str) -> str:
        return f"{self._account_url}/Messages/{quote(sid, safe='')}.json"

    @property
    def _account_url(self) -> str:
        return f"{self._api_base}/{API_VERSION}/Accounts/{quote(self.account_sid, safe='')}"

    # -- lifecycle --

    async def start(self, on_status: StatusSink) -> None:
        # Status reports reach Parley over HTTP (app/api/providers.py) and by polling, not via a sink.
        if self._client is None:
            self._client = httpx2.AsyncClient(
                auth=httpx2.BasicAuth(*self._credentials),
                timeout=self._timeout,
                follow_redirects=False,
                headers={"Accept": "application/json", "User-Agent": "parley-twilio/0.1"},
            )

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx2.Response:
        """One REST call, bounded as a whole; running out is a `ReadTimeout` (a POST's outcome is then unknown)."""
        if self._client is None:
            raise RuntimeError("TwilioProvider.start() was not called")
        try:
            async with asyncio.timeout(self._call_seconds):
                return await self._client.request(method, url, **kwargs)
        except TimeoutError:
            raise httpx2.ReadTimeout(f"no whole answer within {self._call_seconds:g} s") from None

    # -- sending --

    async def send(self, request: SendRequest) -> SendAccepted:
        """Create the message on Twilio, at most once; raise ProviderRejected when Twilio refuses."""
        # Two sends of the same body on the same pair never overlap, so a look-up cannot mistake
        # one for the other (the claimed set tells apart the sequential ones).
        async with self._serialized(request):
            started = self._wall_clock()
            try:
                return await self._send(request, started)
            except ProviderRejected:
                raise
            except Exception as exc:
                # Unexpected (a bug, say, after Twilio created the message). Whether Twilio took it is looked up
                # here, while the lock keeps a look-up for an identical text from taking its SID, and answered as a
                # send's outcome (the caller's generic look-up after an unexpected failure is not needed again).
                log.error(
                    "a send failed unexpectedly (%s)", type(exc).__name__, extra={"message_id": request.message_id}
                )
                try:
                    found = await self._find_created(request, started)
                except TwilioUnavailable as unavailable:
                    raise SendOutcomeUnknown(
                        OUTCOME_UNKNOWN,
                        f"the send failed unexpectedly and Twilio could not say whether it took it ({unavailable})",
                    ) from None
                if found is None:
                    raise SEND_FAILED from None
                return self._accept(found, request.message_id)

    async def _send(self, request: SendRequest, started: float) -> SendAccepted:
        form = {
            "To": request.to_number,
            "From": request.from_number,
            "Body": request.body,
            "StatusCallback": request.status_callback_url,
        }
        unknown = False  # True while an earlier POST may have created the message
        failure = "no attempt made"
        wait_hint = 0.0
        for delay in (0.0, *self._backoff):
            if delay:
                await asyncio.sleep(max(self._jitter(delay), min(wait_hint, MAX_RETRY_AFTER)))
            wait_hint = 0.0
            if unknown:
                try:
                    found = await self._find_created(request, started)
                except TwilioUnavailable as exc:
                    failure = f"look-up failed: {exc}"
                    continue  # still unsure: never POST again while the first may exist
                if found is not None:
                    log.info("unconfirmed send found on Twilio", extra={"message_id": request.message_id})
                    return self._accept(found, request.message_id)
                unknown = False  # Twilio has no such message: sending again is safe
            try:
                response = await self._call("POST", self.messages_url, data=form)
            except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
                failure = f"could not connect: {type(exc).__name__}"
                continue  # the request never left: nothing was created
            except httpx2.TransportError as exc:
                failure = f"no answer: {type(exc).__name__}"
                unknown = True
                log.warning("Twilio send outcome unknown; will look it up", extra={"message_id": request.message_id})
                continue
            status = response.status_code
            if status in (200, 201):
                try:
                    data = response.json()
                    if not isinstance(data, dict) or not isinstance(data.get("sid"), str):
                        raise ValueError("no sid")
                except ValueError:
                    failure = "unreadable answer to a successful send"
                    unknown = True
                    continue
                return self._accept(data, request.message_id)
            if status == 429:
                failure = "rate limited (HTTP 429)"
                wait_hint = (
                    parse_retry_after(response.headers.get("retry-after"), round(self._wall_clock() * 1000)) or 0.0
                )
                continue  # a throttled request creates nothing
            if status >= 500:
                failure = f"HTTP {status}"
                unknown = True
                continue
            rejected = rejection_from(response)
            if status in (401, 403, 404):
                log.error("Twilio refused the send as misconfigured (code %s)", rejected.code)
            raise rejected
        if unknown:
            await asyncio.sleep(self._jitter(self._backoff[-1] if self._backoff else 0.0))
            try:
                found = await self._find_created(request, started)
            except TwilioUnavailable as exc:
                log.error(
                    "Twilio send outcome unknown after every retry; not resending",
                    extra={"message_id": request.message_id},
                )
                raise SendOutcomeUnknown(
                    OUTCOME_UNKNOWN,
                    f"Twilio could not confirm whether the message was sent ({failure}; {exc}); it was not resent.",
                ) from None
            if found is not None:
                return self._accept(found, request.message_id)
        raise ProviderRejected(UNAVAILABLE, f"Twilio could not take the message: {failure}.")

    async def _find_created(
        self, request: SendRequest, started: float, taken: Collection[str] = (), *, mine: str | None = None
    ) -> dict | None:
        """Look on Twilio for a message an unanswered POST of ours may have created (none of `taken`, nor one a send
        or look-up of this process claimed, unless it claimed it for the message `mine`)."""
        # No `DateSent` filter: a message that is still queued has no date_sent and would be missed.
        params = {"To": request.to_number, "From": request.from_number, "PageSize": str(LOOKUP_PAGE_SIZE)}
        try:
            response = await self._call("GET", self.messages_url, params=params)
        except httpx2.TransportError as exc:
            raise TwilioUnavailable(type(exc).__name__) from exc
        if response.status_code != 200:
            raise TwilioUnavailable(f"HTTP {response.status_code}")
        try:
            items = response.json()["messages"]
            if not isinstance(items, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise TwilioUnavailable("unreadable message list") from None
        if not taken and request.recorded is not None:
            try:
                taken = await request.recorded()
            except Exception as exc:  # cannot tell an earlier identical text from this one's: unsure
                raise TwilioUnavailable(f"the recorded messages could not be read ({type(exc).__name__})") from exc
        claimed: Container[str] = self._claimed
        if taken or mine is not None:
            claimed = {sid for sid, message_id in self._claimed.items() if message_id != mine} | set(taken)
        return pick_created(items, request, started - CLOCK_SKEW_SECONDS, claimed)

    def _accept(self, data: dict, message_id: str) -> SendAccepted:
        sid = data["sid"]
        self._claimed[sid] = message_id
        while len(self._claimed) > CLAIMED_SIDS_KEPT:
            self._claimed.popitem(last=False)
        status = data.get("status")
        return SendAccepted(
            provider_message_id=sid,
            provider_status=status if isinstance(status, str) else "queued",
            error_code=error_code_text(data.get("error_code")),
        )

    def _jitter(self, seconds: float) -> float:
        return seconds * self._rng.uniform(0.8, 1.2)

    @contextlib.asynccontextmanager
    async def _serialized(self, request: SendRequest) -> AsyncIterator[None]:
        """One at a time per (pair, body): the sends of one text to one number, and the look-ups for it."""
        key = (request.from_number, request.to_number, hashlib.sha256(request.body.encode()).hexdigest())
        lock, users = self._inflight.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._inflight.pop(key, None)

    async def find_sent(self, message: Message, taken: Collection[str] = ()) -> SendAccepted | None:
        """After a crash, or a send whose outcome could not be written: the message Twilio created for a send of ours
        whose answer was lost (the look-up a send makes after an unanswered POST), or None when Twilio has none;
        TwilioUnavailable when it cannot say."""
        request = SendRequest(
            message_id=message.id,
            from_number=message.from_number,
            to_number=message.to_number,
            body=message.content,
            status_callback_url="",
        )
        # Under the lock a send of the same body on the pair holds until it has claimed its SID: a send still in
        # flight (its SID not yet recorded anywhere) cannot be taken for this message.
        async with self._serialized(request):
            found = await self._find_created(request, message.created_at / 1000, taken, mine=message.id)
            return self._accept(found, message.id) if found is not None else None

    # -- status look-up --

    async def fetch_status(self, message: Message) -> StatusReport | None:
        """`GET Messages/{sid}.json`: Twilio's current word on one message (None when it has none)."""
        sid = message.provider_message_id
        if not sid:
            return None
        try:
            response = await self._call("GET", self.message_url(sid))
        except httpx2.TransportError as exc:
            raise TwilioUnavailable(f"status look-up failed: {type(exc).__name__}") from exc
        if response.status_code == 404:
            log.warning("Twilio does not know a message Parley sent", extra={"message_id": message.id})
            return None
        if response.status_code != 200:
            raise TwilioUnavailable(f"status look-up answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise TwilioUnavailable("unreadable status look-up") from None
        provider_status = data.get("status") if isinstance(data, dict) else None
        if not isinstance(provider_status, str):
            return None
        raw: dict[str, Any] = {"source": "poll"}
        raw.update({name: data[name] for name in POLL_FIELDS if name in data})
        return StatusReport(
            provider_message_id=sid,
            provider_status=provider_status,
            error_code=error_code_text(data.get("error_code")),
            message_id=message.id,
            raw=raw,
        )
