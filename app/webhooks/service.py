"""Webhook endpoints (SPEC §6): registration, changes, secret rotation, and recovery of missed events."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from msgspec import UNSET, Meta, Struct, UnsetType

from app.clock import epoch_ms
from app.domain.context import Context
from app.domain.errors import Conflict, FieldProblem, NotFound, ValidationFailed
from app.domain.events import EVENT_TYPES
from app.domain.ids import new_id, new_signing_secret, parse_uuid
from app.domain.rotation import after_rotation
from app.store import webhooks as store
from app.store.webhooks import ALL_EVENTS, Webhook
from app.webhooks.guard import MAX_URL_LENGTH, check_url, check_url_async

RECOVER_WINDOW_MS = 14 * 86_400_000

Url = Annotated[str, Meta(min_length=1, max_length=MAX_URL_LENGTH)]
EventList = Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=len(EVENT_TYPES) + 1)]


class CreateWebhook(Struct, forbid_unknown_fields=True, kw_only=True):
    url: Url
    events: EventList


class UpdateWebhook(Struct, forbid_unknown_fields=True, kw_only=True):
    url: Url | UnsetType = UNSET
    events: EventList | UnsetType = UNSET
    is_active: bool | UnsetType = UNSET


class RecoverWebhook(Struct, forbid_unknown_fields=True, kw_only=True):
    since: datetime


def event_problems(events: list[str]) -> list[FieldProblem]:
    """Names checked against the catalogue, each unknown one at its own index."""
    if not events:
        return [FieldProblem("events", 'must list at least one event type, or "*"')]
    return [
        FieldProblem(f"events.{index}", f"unknown event type {name!r}")
        for index, name in enumerate(events)
        if name != ALL_EVENTS and name not in EVENT_TYPES
    ]


def normalize_events(events: list[str]) -> list[str]:
    """`*` subscribes to everything. Order kept, duplicates dropped."""
    if ALL_EVENTS in events:
        return [ALL_EVENTS]
    return list(dict.fromkeys(events))


@dataclass(frozen=True)
class _NoDns:
    """The URL rules that need no DNS: every address is left to the full check (`allow_private_urls`)."""

    allow_http_urls: bool
    allow_private_urls: bool = True


def raw_problems(raw: dict[str, Any], *, allow_http_urls: bool) -> list[FieldProblem]:
    """The events' and the URL's rules on a body that failed to decode, so that its 400 names these too (the URL's
    scheme as this server's `PARLEY_ALLOW_HTTP_URLS` has it)."""
    problems: list[FieldProblem] = []
    events = raw.get("events")
    if isinstance(events, list) and all(isinstance(name, str) for name in events):
        problems += event_problems(events)
    if isinstance(url := raw.get("url"), str):
        try:
            check_url(url, _NoDns(allow_http_urls))
        except ValidationFailed as exc:
            problems += exc.details or []
    return problems


async def _checked(events: list[str] | UnsetType, url: str | UnsetType, ctx: Context) -> tuple[list[str], str]:
    """Every problem of the events and the URL at once; their normalized forms (unchanged when UNSET)."""
    problems = event_problems(events) if events is not UNSET else []
    checked_url = ""
    if url is not UNSET:
        try:
            checked_url = await check_url_async(url, ctx.settings)
        except ValidationFailed as exc:
            problems += exc.details or []
    if problems:
        raise ValidationFailed.of(problems)
    return (normalize_events(events) if events is not UNSET else []), checked_url


def _load(conn: sqlite3.Connection, org_id: str, webhook_id: str) -> Webhook:
    canonical = parse_uuid(webhook_id)
    webhook = store.get(conn, canonical, org_id) if canonical else None
    if webhook is None:
        raise NotFound("Webhook not found.")
    return webhook


async def get(ctx: Context, org_id: str, webhook_id: str) -> Webhook:
    return await ctx.db.read(lambda c: _load(c, org_id, webhook_id))


async def create(ctx: Context, org_id: str, body: CreateWebhook) -> Webhook:
    events, url = await _checked(body.events, body.url, ctx)
    now = ctx.clock.now_ms()
    webhook = Webhook(
        id=new_id(),
        org_id=org_id,
        url=url,
        events=events,
        is_active=True,
        secret=new_signing_secret(),
        previous_secrets=[],
        disabled_reason=None,
        failing_since=None,
        last_success_at=None,
        created_at=now,
        updated_at=now,
    )
    await ctx.db.write(lambda c: store.insert(c, webhook))
    return webhook


async def update(ctx: Context, org_id: str, webhook_id: str, patch: UpdateWebhook) -> Webhook:
    changes: dict[str, object] = {}
    events, url = await _checked(patch.events, patch.url, ctx)
    if patch.events is not UNSET:
        changes["events"] = events
    if patch.url is not UNSET:
        changes["url"] = url

    def apply(conn: sqlite3.Connection) -> Webhook:
        webhook = _load(conn, org_id, webhook_id)
        now = ctx.clock.now_ms()
        if patch.is_active is False and webhook.is_active:
            store.disable(conn, webhook.id, None, now)
        elif patch.is_active is True and not webhook.is_active:
            # A fresh start: the five-day failure clock and the server's reason for disabling are reset.
            changes.update(is_active=True, disabled_reason=None, failing_since=None)
            store.wake_endpoint(conn, webhook.id, now)  # anything still pending goes out again
        store.update(conn, webhook.id, now, **changes)
        if "events" in changes:
            store.fail_unsubscribed(conn, webhook.id, events, now)  # only the types still subscribed stay queued
        updated = store.get(conn, webhook.id, org_id)
        assert updated is not None
        return updated

    updated = await ctx.db.write(apply, long=True)  # disabling (or unsubscribing) fails the pending backlog
    ctx.scheduler.wake()
    return updated


async def delete(ctx: Context, org_id: str, webhook_id: str) -> None:
    def apply(conn: sqlite3.Connection) -> None:
        store.delete(conn, _load(conn, org_id, webhook_id).id)

    await ctx.db.write(apply, long=True)  # cascades to every delivery and attempt of the endpoint


async def rotate_secret(ctx: Context, org_id: str, webhook_id: str) -> Webhook:
    """A new secret; the current one, like every other rotated away within the last 24 hours, keeps signing
    beside it until 24 hours after its own rotation."""

    def apply(conn: sqlite3.Connection) -> Webhook:
        webhook = _load(conn, org_id, webhook_id)
        now = ctx.clock.now_ms()
        store.update(
            conn,
            webhook.id,
            now,
            secret=new_signing_secret(),
            previous_secrets=after_rotation(webhook.previous_secrets, webhook.secret, now),
        )
        rotated = store.get(conn, webhook.id, org_id)
        assert rotated is not None
        return rotated

    return await ctx.db.write(apply)


async def recover(ctx: Context, org_id: str, webhook_id: str, body: RecoverWebhook) -> int:
    """Re-queue every subscribed event since `since` (at most 14 days back) that this endpoint has not had."""
    try:
        since = epoch_ms(body.since)
    except ValueError:
        raise ValidationFailed.field("since", "must be an RFC 3339 timestamp with a time zone") from None

    def apply(conn: sqlite3.Connection) -> int:
        webhook = _load(conn, org_id, webhook_id)
        now = ctx.clock.now_ms()
        if since < now - RECOVER_WINDOW_MS:
            raise ValidationFailed.field("since", "must be within the last 14 days")
        if not webhook.is_active:
            raise Conflict("webhook_inactive", "The webhook is disabled; enable it before recovering events.")
        return store.recover(conn, webhook, since, now)

    count = await ctx.db.write(apply, long=True)  # up to 14 days of events: off the event loop
    if count:
        ctx.scheduler.wake()
    return count
