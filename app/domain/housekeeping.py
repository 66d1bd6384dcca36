"""Periodic upkeep: reconcile outbound messages stuck in a non-terminal status, expire idempotency keys."""

from __future__ import annotations

import logging
import sqlite3

from app.domain import messaging
from app.domain.context import Context
from app.store import conversations as store
from app.store import idempotency, jobs
from app.store.jobs import Job

log = logging.getLogger("parley.housekeeping")

JOB = "housekeeping"
INTERVAL_MS = 60_000


def ensure_scheduled(conn: sqlite3.Connection, now_ms: int) -> None:
    jobs.schedule_earliest(conn, JOB, "global", now_ms + INTERVAL_MS)


async def reconcile_stale_statuses(ctx: Context, limit: int = 200) -> int:
    """Ask the provider about messages still `queued`/`sent` past the configured age."""
    cutoff = ctx.clock.now_ms() - ctx.settings.status_reconcile_after_seconds * 1000
    stale = await ctx.db.read(lambda c: store.unfinished_outbound(c, cutoff, limit))
    changed = 0
    for message in stale:
        try:
            report = await ctx.provider.fetch_status(message)
        except Exception:
            log.warning("status look-up failed for a message; will retry", exc_info=True)
            report = None
        applied = False
        if report is not None:
            applied = await messaging.record_reports(ctx, [report]) > 0
        if not applied:
            # Nothing new (or no answer): ask again only once it has aged again, so a message the provider
            # cannot tell about never crowds out the others.
            await ctx.db.write(lambda c, m=message: store.touch_message(c, m.id, ctx.clock.now_ms()))
        changed += int(applied)
    return changed


async def run(ctx: Context, job: Job) -> int:
    await reconcile_stale_statuses(ctx)
    now = ctx.clock.now_ms()
    await ctx.db.write(lambda c: idempotency.purge_expired(c, now), long=True)  # can be a day of keys
    return now + INTERVAL_MS
