"""Webhook endpoints, their delivery log, single retries and recovery (SPEC §6). Snake_case, like PAM."""

from __future__ import annotations

import functools
from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.params import Parameter

from app.api import requests as rq
from app.api.schemas import ListMeta, Meta, errors, json_body
from app.clock import iso
from app.domain.errors import NotFound
from app.domain.ids import parse_uuid
from app.domain.types import StrictDecoder
from app.store import webhooks as store
from app.store.webhooks import Webhook
from app.webhooks import service
from app.webhooks.delivery import Dispatcher
from app.webhooks.service import CreateWebhook, RecoverWebhook, UpdateWebhook


class WebhookOut(msgspec.Struct, kw_only=True):
    id: str
    url: str
    events: list[str]
    is_active: bool
    created_at: str
    updated_at: str


class WebhookWithSecret(WebhookOut, kw_only=True):
    secret: str


class AttemptOut(msgspec.Struct, kw_only=True):
    at: str
    status_code: int
    duration_ms: int
    error: str | None
    response_body: str | None


class DeliveryOut(msgspec.Struct, kw_only=True):
    id: str
    event_id: str
    event: str
    status: str
    next_attempt_at: str | None
    attempts: list[AttemptOut]


class Requeued(msgspec.Struct):
    requeued: int


class WebhookEnvelope(msgspec.Struct):
    data: WebhookOut
    meta: Meta


class SecretEnvelope(msgspec.Struct):
    data: WebhookWithSecret
    meta: Meta


class WebhookList(msgspec.Struct):
    data: list[WebhookOut]
    meta: ListMeta


class DeliveryEnvelope(msgspec.Struct):
    data: DeliveryOut
    meta: Meta


class DeliveryList(msgspec.Struct):
    data: list[DeliveryOut]
    meta: ListMeta


class RequeuedEnvelope(msgspec.Struct):
    data: Requeued
    meta: Meta


recover_decoder = StrictDecoder(RecoverWebhook)


@functools.cache
def _decoders(allow_http_urls: bool) -> tuple[StrictDecoder, StrictDecoder]:
    """The create and update decoders; a body that fails to decode has its URL checked by this server's rules."""
    rules = functools.partial(service.raw_problems, allow_http_urls=allow_http_urls)
    return StrictDecoder(CreateWebhook, rules), StrictDecoder(UpdateWebhook, rules)


def webhook_out(w: Webhook) -> WebhookOut:
    return WebhookOut(
        id=w.id,
        url=w.url,
        events=w.events,
        is_active=w.is_active,
        created_at=iso(w.created_at) or "",
        updated_at=iso(w.updated_at) or "",
    )


def with_secret(w: Webhook) -> WebhookWithSecret:
    return WebhookWithSecret(**msgspec.structs.asdict(webhook_out(w)), secret=w.secret)


def delivery_out(d: store.Delivery) -> DeliveryOut:
    return DeliveryOut(
        id=d.id,
        event_id=d.event_id,
        event=d.event_type,
        status=d.status,
        next_attempt_at=iso(d.next_attempt_at) if d.status == "pending" else None,
        attempts=[
            AttemptOut(
                at=iso(a.at) or "",
                status_code=a.status_code,
                duration_ms=a.duration_ms,
                error=a.error,
                response_body=a.response_body,
            )
            for a in d.attempts
        ],
    )


def dispatcher(request: Request) -> Dispatcher:
    dispatcher = rq.context(request).webhooks
    assert dispatcher is not None, "the lifespan wires the webhook dispatcher"
    return dispatcher


class WebhookController(Controller):
    path = "/v1/webhooks"
    tags = ["Webhooks"]

    @post(
        "/",
        status_code=201,
        operation_class=json_body(CreateWebhook),
        responses=errors(413, 415),
        summary="Register a webhook endpoint (the secret is shown only here)",
    )
    async def create(self, request: Request) -> SecretEnvelope:
        body = await rq.read_json(request, _decoders(rq.context(request).settings.allow_http_urls)[0])
        webhook = await service.create(rq.context(request), rq.org_of(request), body)
        return SecretEnvelope(data=with_secret(webhook), meta=Meta(request_id=rq.request_id(request)))

    @get("/", summary="List webhook endpoints", responses=errors())
    async def list_webhooks(
        self,
        request: Request,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        cursor: str | None = None,
    ) -> WebhookList:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        scope = rq.cursor_scope("webhooks", org_id)
        after = rq.decode_cursor(cursor, scope, (int, str))
        items = await ctx.db.read(
            lambda c: store.list_for_org(c, org_id, after=after, limit=limit + 1)  # type: ignore[arg-type]
        )
        items, more = rq.page(items, limit)
        next_cursor = rq.encode_cursor(scope, items[-1].created_at, items[-1].id) if more else None
        return WebhookList(
            data=[webhook_out(w) for w in items],
            meta=ListMeta(request_id=rq.request_id(request), next_cursor=next_cursor),
        )

    @get("/{webhook_id:str}", summary="Read a webhook endpoint", responses=errors(404))
    async def get_webhook(self, request: Request, webhook_id: str) -> WebhookEnvelope:
        webhook = await service.get(rq.context(request), rq.org_of(request), webhook_id)
        return WebhookEnvelope(data=webhook_out(webhook), meta=Meta(request_id=rq.request_id(request)))

    @patch(
        "/{webhook_id:str}",
        operation_class=json_body(UpdateWebhook),
        responses=errors(404, 413, 415),
        summary="Change a webhook's url, events or is_active",
    )
    async def update(self, request: Request, webhook_id: str) -> WebhookEnvelope:
        body = await rq.read_json(request, _decoders(rq.context(request).settings.allow_http_urls)[1])
        webhook = await service.update(rq.context(request), rq.org_of(request), webhook_id, body)
        return WebhookEnvelope(data=webhook_out(webhook), meta=Meta(request_id=rq.request_id(request)))

    @delete("/{webhook_id:str}", status_code=204, responses=errors(404, 415), summary="Delete a webhook endpoint")
    async def delete_webhook(self, request: Request, webhook_id: str) -> None:
        await rq.no_body(request)
        await service.delete(rq.context(request), rq.org_of(request), webhook_id)

    @post(
        "/{webhook_id:str}/rotate-secret",
        status_code=200,
        responses=errors(404, 415),
        summary="Rotate the signing secret (the old one keeps signing, in addition, for 24 h)",
    )
    async def rotate_secret(self, request: Request, webhook_id: str) -> SecretEnvelope:
        await rq.no_body(request)
        webhook = await service.rotate_secret(rq.context(request), rq.org_of(request), webhook_id)
        return SecretEnvelope(data=with_secret(webhook), meta=Meta(request_id=rq.request_id(request)))

    @get(
        "/{webhook_id:str}/deliveries",
        summary="The endpoint's deliveries, newest first, with every attempt",
        responses=errors(404),
    )
    async def list_deliveries(
        self,
        request: Request,
        webhook_id: str,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        cursor: str | None = None,
        status: Literal["pending", "succeeded", "failed"] | None = None,
    ) -> DeliveryList:
        ctx = rq.context(request)
        webhook = await service.get(ctx, rq.org_of(request), webhook_id)
        scope = rq.cursor_scope("deliveries", webhook.id, status)
        before = rq.decode_cursor(cursor, scope, (int,))
        items = await ctx.db.read(
            lambda c: store.list_deliveries(
                c, webhook.id, before_rowid=before[0] if before else None, status=status, limit=limit + 1
            )
        )
        items, more = rq.page(items, limit)
        next_cursor = rq.encode_cursor(scope, items[-1].rowid) if more else None
        return DeliveryList(
            data=[delivery_out(d) for d in items],
            meta=ListMeta(request_id=rq.request_id(request), next_cursor=next_cursor),
        )

    @post(
        "/{webhook_id:str}/deliveries/{delivery_id:str}/retry",
        status_code=200,
        responses=errors(404, 409, 415, conflicts="delivery_in_progress, webhook_inactive"),
        summary="Attempt one delivery once, now (a failure does not re-enter the retry schedule)",
    )
    async def retry_delivery(self, request: Request, webhook_id: str, delivery_id: str) -> DeliveryEnvelope:
        await rq.no_body(request)
        webhook = await service.get(rq.context(request), rq.org_of(request), webhook_id)
        if parse_uuid(delivery_id) is None:
            raise NotFound("Delivery not found.")
        delivery = await dispatcher(request).retry_now(rq.org_of(request), webhook.id, str(parse_uuid(delivery_id)))
        return DeliveryEnvelope(data=delivery_out(delivery), meta=Meta(request_id=rq.request_id(request)))

    @post(
        "/{webhook_id:str}/recover",
        status_code=200,
        operation_class=json_body(RecoverWebhook),
        responses=errors(404, 409, 413, 415, conflicts="webhook_inactive"),
        summary="Re-queue every event since `since` (at most 14 days) that has not reached this endpoint",
    )
    async def recover(self, request: Request, webhook_id: str) -> RequeuedEnvelope:
        body = await rq.read_json(request, recover_decoder)
        count = await service.recover(rq.context(request), rq.org_of(request), webhook_id, body)
        return RequeuedEnvelope(data=Requeued(requeued=count), meta=Meta(request_id=rq.request_id(request)))
