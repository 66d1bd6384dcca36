"""Twilio's callbacks (SPEC §8): inbound messages and delivery-status reports.

These routes take no API key (the Edge lets /v1/providers/ through); a request is Twilio's only
when its `X-Twilio-Signature` verifies over `PARLEY_PUBLIC_URL` + path + query string and every
POSTed parameter. Anything else is answered 403 before a single row is written. Twilio is answered
only after the callback is committed: it retries an unanswered callback just once. An inbound message's
answer of Parley's own (a STOP confirmation, a HELP reply), committed with it, is handed to Twilio after the
TwiML is sent, so a slow send cannot push the webhook past Twilio's 15 s budget.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import msgspec
from litestar import Controller, Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation

from app.api import requests as rq
from app.api.schemas import ErrorEnvelope, request_body
from app.domain import inbound, messaging
from app.domain.errors import FieldProblem, Forbidden, UnsupportedMediaType, ValidationFailed
from app.domain.ids import parse_uuid
from app.domain.models import Media
from app.providers import twilio
from app.providers.base import StatusReport

CALLBACK_BODY_LIMIT = 64 * 1024
EMPTY_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
FORM = "application/x-www-form-urlencoded"


class TwilioInboundForm(msgspec.Struct, kw_only=True):
    """The parameters Parley reads from Twilio's inbound-message request (others are kept raw)."""

    message_sid: str = msgspec.field(name="MessageSid")
    account_sid: str = msgspec.field(name="AccountSid")
    from_: str = msgspec.field(name="From")
    to: str = msgspec.field(name="To")
    body: str = msgspec.field(default="", name="Body")
    opt_out_type: str | None = msgspec.field(default=None, name="OptOutType")
    num_media: str = msgspec.field(default="0", name="NumMedia")
    media_url_0: str | None = msgspec.field(default=None, name="MediaUrl0")
    media_content_type_0: str | None = msgspec.field(default=None, name="MediaContentType0")


# Twilio sends at most 10 attachments with one MMS (`MediaUrl0` … `MediaUrl9`).
MAX_MEDIA = 10


def media_of(params: dict[str, str]) -> tuple[Media, ...]:
    """An inbound MMS's attachments: `MediaUrlN` with its `MediaContentTypeN`, for N below `NumMedia` (at most
    10). An attachment without an http(s) URL is skipped; a missing or malformed count means none."""
    try:
        count = min(int(params.get("NumMedia", "0")), MAX_MEDIA)
    except ValueError:
        return ()
    found = []
    for n in range(count):
        url = params.get(f"MediaUrl{n}", "")
        if url.startswith(("https://", "http://")):
            content_type = params.get(f"MediaContentType{n}", "") or "application/octet-stream"
            found.append(Media(url=url, content_type=content_type))
    return tuple(found)


class TwilioStatusForm(msgspec.Struct, kw_only=True):
    """The parameters Parley reads from Twilio's status callback (others are kept raw)."""

    message_sid: str = msgspec.field(name="MessageSid")
    message_status: str = msgspec.field(name="MessageStatus")
    account_sid: str = msgspec.field(name="AccountSid")
    error_code: str | None = msgspec.field(default=None, name="ErrorCode")


def form_body(struct: type) -> type[Operation]:
    """An Operation class that documents `struct` as a form-encoded request body."""
    return request_body(struct, media_type=FORM)


def callback_errors() -> dict[int, ResponseSpec]:
    descriptions = {
        400: "validation_error (a required Twilio parameter is missing)",
        403: "forbidden (X-Twilio-Signature missing or wrong)",
        413: "payload_too_large (body over 64 KiB)",
        415: "unsupported_media_type (not form-encoded)",
    }
    return {
        code: ResponseSpec(data_container=ErrorEnvelope, description=text, generate_examples=False)
        for code, text in descriptions.items()
    }


async def verified_params(request: Request) -> dict[str, str]:
    """The POSTed parameters, once the signature over URL and parameters has verified; else 403."""
    ctx = rq.context(request)
    raw = await request.body()  # 413 past the route's limit
    media = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    pairs: list[tuple[str, str]] | None = []
    if raw and media == FORM:
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, ValueError):
            pairs = None  # cannot be what Twilio signed
    query = request.scope.get("query_string", b"").decode("latin-1")
    url = ctx.settings.public_url + request.scope["path"] + (f"?{query}" if query else "")
    token = ctx.settings.twilio_auth_token or ""
    signature = request.headers.get("x-twilio-signature")
    if pairs is None or not token or not twilio.signature_valid(token, url, pairs, signature):
        raise Forbidden("The X-Twilio-Signature header is missing or does not match this request.")
    if raw and media != FORM:
        raise UnsupportedMediaType(f"Twilio callbacks are sent as {FORM}.")
    return dict(pairs)


def require(params: dict[str, str], *names: str) -> list[str]:
    """The first present value for each name (Twilio's `Sms*` aliases come second); 400 when absent."""
    values: list[str] = []
    problems: list[FieldProblem] = []
    for name in names:
        aliases = (name, name.replace("Message", "Sms", 1)) if name.startswith("Message") else (name,)
        value = next((params[a].strip() for a in aliases if params.get(a, "").strip()), "")
        if not value:
            problems.append(FieldProblem(name, "is required"))
        values.append(value)
    if problems:
        raise ValidationFailed.of(problems)
    return values


class TwilioCallbackController(Controller):
    path = "/v1/providers/twilio"
    tags = ["Provider callbacks"]

    @post(
        "/inbound",
        status_code=200,
        summary="Twilio inbound-message webhook (signed by Twilio)",
        description=(
            "Answered with empty TwiML once the message and its effects are stored; repeated MessageSids are stored"
            " once."
        ),
        request_max_body_size=CALLBACK_BODY_LIMIT,
        security=[{}],
        operation_class=form_body(TwilioInboundForm),
        responses=callback_errors(),
        media_type="text/xml",
    )
    async def inbound(self, request: Request) -> Response[bytes]:
        params = await verified_params(request)
        sid, from_number, to_number = require(params, "MessageSid", "From", "To")
        opt_out_type = params.get("OptOutType", "").strip().upper() or None
        sms = inbound.InboundSms(
            from_number=from_number,
            to_number=to_number,
            body=params.get("Body", ""),
            provider="twilio",
            provider_message_id=sid,
            raw=params,
            provider_opt_out_type=opt_out_type,
            media=media_of(params),
        )
        ctx = rq.context(request)
        accepted = await inbound.accept(ctx, sms)
        later = BackgroundTask(inbound.send_replies, ctx, accepted.replies) if accepted.replies else None
        return Response(content=EMPTY_TWIML, status_code=200, media_type="text/xml", background=later)

    @post(
        "/status",
        status_code=204,
        summary="Twilio status callback (signed by Twilio; the URL names Parley's messageId)",
        description="Every callback is kept; the canonical status only moves up the lattice.",
        request_max_body_size=CALLBACK_BODY_LIMIT,
        security=[{}],
        operation_class=form_body(TwilioStatusForm),
        responses=callback_errors(),
    )
    async def status(self, request: Request) -> None:
        params = await verified_params(request)
        sid, provider_status = require(params, "MessageSid", "MessageStatus")
        ctx = rq.context(request)
        report = StatusReport(
            provider_message_id=sid,
            provider_status=provider_status,
            error_code=twilio.error_code_text(params.get("ErrorCode")),
            message_id=parse_uuid(request.query_params.get("messageId") or ""),
            raw=params,
        )
        await messaging.record_reports(ctx, [report])
