"""Periodic upkeep: reconcile outbound messages stuck in a non-terminal status, expire idempotency keys, forget the
rotated-away secrets that sign nothing any more, and (a job of its own) settle creates and sends whose outcome could
not be recorded."""

from __future__ import annotations

import logging
import sqlite3

from app.domain import conversations, messaging
from app.domain.context import Context
from app.domain.models import Message
from app.providers.base import ProviderUnavailable
from app.store import agents as agents_store
from app.store import conversations as store
from app.store import idempotency, jobs
from app.store import webhooks as webhooks_store
from app.store.jobs import Job

log = logging.getLogger("parley.housekeeping")

JOB = "housekeeping"
# Settling stalled creates and sends is a job of its own: a provider that cannot say about a stalled send is asked
# again after minutes (`messaging.RECOVERY_WAITS`), and the status look-ups and the key purge do not wait with it.
SWEEP_JOB = "stalled_sends"
INTERVAL_MS = 60_000
DAY_MS = 86_400_000
LOOKUP_FOR_MS = 3 * DAY_MS  # a status still not final this long after the send is as final as it will get
NO_MORE_LOOKUPS = 2**62  # an `updated_at` base no look-up ever comes due from


def next_lookup_base(message: Message, now_ms: int, after_ms: int) -> int:
    """When the wait for a message's next status look-up starts, after one that brought nothing new.

    The look-ups space out as the message ages: the next one comes `after_ms` or the message's age later,
    whichever is longer, at most a day (10 min, 20, 40, ... then daily), and none that would come once it
    is LOOKUP_FOR_MS old. Twilio leaves a message at `sent` for good when the carrier never reports delivery:
    asking every 10 minutes for ever would spend the account's request budget on such messages and add a
    stored report each time."""
    age = now_ms - (message.sent_at or message.created_at)
    wait = max(after_ms, min(age, DAY_MS))
    if age + wait > LOOKUP_FOR_MS:
        return NO_MORE_LOOKUPS
    return now_ms + wait - after_ms


def ensure_scheduled(conn: sqlite3.Connection, now_ms: int) -> None:
    jobs.schedule_earliest(conn, JOB, "global", now_ms + INTERVAL_MS)
    jobs.schedule_earliest(conn, SWEEP_JOB, "global", now_ms + INTERVAL_MS)


async def reconcile_stale_statuses(ctx: Context, limit: int = 200) -> int:
    """Ask the provider about messages still `queued`/`sent` past the configured age (see `next_lookup_base`)."""
    after_ms = ctx.settings.status_reconcile_after_seconds * 1000
    cutoff = ctx.clock.now_ms() - after_ms
    stale = await ctx.db.read(lambda c: store.unfinished_outbound(c, cutoff, limit))
    changed = 0
    for message in stale:
        try:
            report = await ctx.provider.fetch_status(message)
        except ProviderUnavailable as exc:
            log.warning("status look-up failed for a message; will retry: %s", exc)
            report = None
        except Exception:
            log.warning("status look-up failed for a message; will retry", exc_info=True)
            report = None
        applied = False
        if report is not None:
            applied = await messaging.record_reports(ctx, [report]) > 0
        if not applied:
            # Nothing new (or no answer): ask again later, and less often as the message ages, so a message the
            # provider cannot tell about never crowds out the others.
            base = next_lookup_base(message, ctx.clock.now_ms(), after_ms)
            await ctx.db.write(lambda c, m=message, b=base: store.defer_status_lookup(c, m.id, b))
        changed += int(applied)
    return changed


async def run(ctx: Context, job: Job) -> int:
    await reconcile_stale_statuses(ctx)
    now = ctx.clock.now_ms()
    await ctx.db.write(lambda c: idempotency.purge_expired(c, now), long=True)  # can be a day of keys
    # Every endpoint and agent row is read (an agent's whole config, to reach the column after it): a long write.
    await ctx.db.write(lambda c: _forget_expired_secrets(c, now), long=True)
    return now + INTERVAL_MS


def _forget_expired_secrets(conn: sqlite3.Connection, now_ms: int) -> None:
    """A secret rotated away signs beside the current one for 24 hours; after that it is not kept (a copy of the
    database, a backup, would otherwise hold every secret an endpoint or an agent ever had, up to 10 each)."""
    webhooks_store.forget_expired_secrets(conn, now_ms)
    agents_store.forget_expired_tool_secrets(conn, now_ms)


async def sweep(ctx: Context, job: Job) -> int:
    """The SWEEP_JOB: settle creates and sends whose outcome could not be written, every INTERVAL_MS."""
    await conversations.recover_stalled(ctx)  # the creates first: their openings are among the stalled messages
    await messaging.recover_stalled(ctx)
    return ctx.clock.now_ms() + INTERVAL_MS
