"""Webhook endpoints, their deliveries (one per event per endpoint) and the attempt log.

Deliveries are written by `queue_deliveries`, inside the transaction that appends the event. Each endpoint with
due work has one scheduler job (kind `webhook_endpoint`, ref = webhook id); its handler claims the
endpoint's due deliveries here, each with its own lease, so a crash loses nothing and the same event
never goes to the same endpoint twice at once.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from app.domain.ids import new_id
from app.domain.rotation import PreviousSecret, decode_previous, encode_previous
from app.store import jobs
from app.store.jobs import Job
from app.store.secrets import forget_expired, forget_expired_sql

ENDPOINT_JOB = "webhook_endpoint"
ALL_EVENTS = "*"

_encoder = msgspec.json.Encoder()
_events_decoder = msgspec.json.Decoder(list[str])


class Webhook(msgspec.Struct, kw_only=True):
    id: str
    org_id: str
    url: str
    events: list[str]
    is_active: bool
    secret: str
    previous_secrets: list[PreviousSecret]  # newest first
    disabled_reason: str | None
    failing_since: int | None
    last_success_at: int | None
    created_at: int
    updated_at: int


class Claimed(msgspec.Struct, kw_only=True):
    """A delivery leased for one attempt, with everything the attempt needs."""

    id: str
    webhook_id: str
    event_id: str
    event_type: str
    status: str
    attempt_count: int
    next_attempt_at: int | None
    lease_until: int
    payload: bytes
    url: str
    secret: str
    previous_secrets: list[PreviousSecret]  # as stored: `rotation.active_secrets` skips the expired ones


class Attempt(msgspec.Struct, kw_only=True):
    at: int
    status_code: int
    duration_ms: int
    error: str | None
    response_body: str | None


class Delivery(msgspec.Struct, kw_only=True):
    id: str
    webhook_id: str
    event_id: str
    event_type: str
    status: str
    attempt_count: int
    next_attempt_at: int | None
    lease_until: int | None
    created_at: int
    rowid: int
    attempts: list[Attempt] = []


WEBHOOK_COLUMNS = (
    "id, org_id, url, events, is_active, secret, previous_secrets, disabled_reason, failing_since, last_success_at,"
    " created_at, updated_at"
)
DELIVERY_COLUMNS = (
    "rowid, id, webhook_id, event_id, event_type, status, attempt_count, next_attempt_at, lease_until, created_at"
)
# A new pending delivery, due at once: (id, webhook_id, org_id, event_id, event_type, due, created, updated).
_INSERT_DELIVERY = (
    "INSERT INTO webhook_deliveries (id, webhook_id, org_id, event_id, event_type, status,"
    " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)"
)


def _webhook(row: sqlite3.Row | None) -> Webhook | None:
    if row is None:
        return None
    return Webhook(
        id=row["id"],
        org_id=row["org_id"],
        url=row["url"],
        events=_events_decoder.decode(row["events"]),
        is_active=bool(row["is_active"]),
        secret=row["secret"],
        previous_secrets=decode_previous(row["previous_secrets"]),
        disabled_reason=row["disabled_reason"],
        failing_since=row["failing_since"],
        last_success_at=row["last_success_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        webhook_id=row["webhook_id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        status=row["status"],
        attempt_count=row["attempt_count"],
        next_attempt_at=row["next_attempt_at"],
        lease_until=row["lease_until"],
        created_at=row["created_at"],
        rowid=row["rowid"],
    )


# --- endpoints ------------------------------------------------------------------------------------


def insert(conn: sqlite3.Connection, webhook: Webhook) -> None:
    conn.execute(
        f"INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            webhook.id,
            webhook.org_id,
            webhook.url,
            _encoder.encode(webhook.events).decode(),
            int(webhook.is_active),
            webhook.secret,
            encode_previous(webhook.previous_secrets),
            webhook.disabled_reason,
            webhook.failing_since,
            webhook.last_success_at,
            webhook.created_at,
            webhook.updated_at,
        ),
    )


def get(conn: sqlite3.Connection, webhook_id: str, org_id: str) -> Webhook | None:
    return _webhook(
        conn.execute(
            f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ? AND org_id = ?", (webhook_id, org_id)
        ).fetchone()
    )


def list_for_org(conn: sqlite3.Connection, org_id: str, *, after: tuple[int, str] | None, limit: int) -> list[Webhook]:
    sql = f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE org_id = ?"
    args: list[Any] = [org_id]
    if after is not None:
        sql += " AND (created_at, id) > (?, ?)"
        args.extend(after)
    sql += " ORDER BY created_at, id LIMIT ?"
    args.append(limit)
    return [w for w in map(_webhook, conn.execute(sql, args).fetchall()) if w is not None]


def update(conn: sqlite3.Connection, webhook_id: str, now_ms: int, **changes: Any) -> None:
    if "events" in changes:
        changes["events"] = _encoder.encode(changes["events"]).decode()
    if "is_active" in changes:
        changes["is_active"] = int(changes["is_active"])
    if "previous_secrets" in changes:
        changes["previous_secrets"] = encode_previous(changes["previous_secrets"])
    changes["updated_at"] = now_ms
    assignments = ", ".join(f"{column} = ?" for column in changes)
    conn.execute(f"UPDATE webhooks SET {assignments} WHERE id = ?", (*changes.values(), webhook_id))


def delete(conn: sqlite3.Connection, webhook_id: str) -> None:
    """Remove an endpoint with its deliveries and attempt log, and its scheduler job."""
    conn.execute("DELETE FROM jobs WHERE kind = ? AND ref = ?", (ENDPOINT_JOB, webhook_id))
    conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))


def disable(conn: sqlite3.Connection, webhook_id: str, reason: str | None, now_ms: int) -> int:
    """Deactivate an endpoint, and fail its pending deliveries (in a long write: that is its whole backlog)."""
    deactivate(conn, webhook_id, reason, now_ms)
    return fail_pending(conn, webhook_id, now_ms)


def deactivate(conn: sqlite3.Connection, webhook_id: str, reason: str | None, now_ms: int) -> None:
    """Stop an endpoint (point writes): nothing more is claimed for it, and its idle job goes."""
    conn.execute(
        "UPDATE webhooks SET is_active = 0, disabled_reason = ?, updated_at = ? WHERE id = ?",
        (reason, now_ms, webhook_id),
    )
    conn.execute("DELETE FROM jobs WHERE kind = ? AND ref = ? AND lease_until IS NULL", (ENDPOINT_JOB, webhook_id))


def fail_pending(conn: sqlite3.Connection, webhook_id: str, now_ms: int) -> int:
    """A deactivated endpoint's unleased pending deliveries become `failed` (recover re-queues them); a
    leased one fails when its lease is given back (`release`, `settle`)."""
    return conn.execute(
        # The pending-only index: an endpoint's whole delivery log is also indexed by `webhook_id` (for its list),
        # and without statistics SQLite would walk that instead.
        "UPDATE webhook_deliveries INDEXED BY webhook_deliveries_due"
        " SET status = 'failed', next_attempt_at = NULL, updated_at = ?"
        " WHERE webhook_id = ? AND status = 'pending' AND (lease_until IS NULL OR lease_until <= ?)",
        (now_ms, webhook_id, now_ms),
    ).rowcount


def fail_unsubscribed(conn: sqlite3.Connection, webhook_id: str, events: list[str], now_ms: int) -> int:
    """After a change of an endpoint's `events`: its unleased pending deliveries of a type it no longer subscribes
    to become `failed`, unsent (`recover` re-queues them once it subscribes again); a leased one fails when it is
    given back (`release`) instead of sent."""
    if ALL_EVENTS in events:
        return 0
    return conn.execute(
        "UPDATE webhook_deliveries INDEXED BY webhook_deliveries_due"  # as in `fail_pending`
        " SET status = 'failed', next_attempt_at = NULL, updated_at = ?"
        " WHERE webhook_id = ? AND status = 'pending' AND (lease_until IS NULL OR lease_until <= ?)"
        " AND event_type NOT IN (SELECT value FROM json_each(?))",
        (now_ms, webhook_id, now_ms, _encoder.encode(events).decode()),
    ).rowcount


class Target(msgspec.Struct, frozen=True):
    """Where an active endpoint's deliveries go now, what signs them, and which event types it wants."""

    url: str
    secret: str
    previous_secrets: list[PreviousSecret]
    events: list[str]

    def wants(self, event_type: str) -> bool:
        return ALL_EVENTS in self.events or event_type in self.events


def target(conn: sqlite3.Connection, webhook_id: str) -> Target | None:
    """The endpoint's current URL, secrets and subscriptions; None when it is disabled or deleted."""
    row = conn.execute(
        "SELECT url, secret, previous_secrets, events FROM webhooks WHERE id = ? AND is_active = 1", (webhook_id,)
    ).fetchone()
    if row is None:
        return None
    return Target(
        row["url"], row["secret"], decode_previous(row["previous_secrets"]), _events_decoder.decode(row["events"])
    )


def _subscribes(event_type: str) -> str:
    """SQL: whether the endpoint `w` subscribes to `event_type` (an SQL expression: a column, or `?`)."""
    return f"EXISTS (SELECT 1 FROM json_each(w.events) WHERE value IN ({event_type}, '{ALL_EVENTS}'))"


def subscribed(conn: sqlite3.Connection, webhook_id: str, event_type: str) -> bool:
    """Whether the endpoint (still) subscribes to `event_type`."""
    row = conn.execute(f"SELECT 1 FROM webhooks w WHERE w.id = ? AND {_subscribes('?')}", (webhook_id, event_type))
    return row.fetchone() is not None


def is_active(conn: sqlite3.Connection, webhook_id: str) -> bool | None:
    """Whether the endpoint is active; None when it no longer exists."""
    row = conn.execute("SELECT is_active FROM webhooks WHERE id = ?", (webhook_id,)).fetchone()
    return None if row is None else bool(row[0])


def note_success(conn: sqlite3.Connection, webhook_id: str, now_ms: int) -> None:
    """Clear the failure clock; `last_success_at` is kept to the minute, so a busy endpoint's row stays put."""
    conn.execute(
        "UPDATE webhooks SET failing_since = NULL, last_success_at = ? WHERE id = ?"
        " AND (failing_since IS NOT NULL OR last_success_at IS NULL OR last_success_at < ?)",
        (now_ms, webhook_id, now_ms - 60_000),
    )


def note_failure(conn: sqlite3.Connection, webhook_id: str, now_ms: int) -> int | None:
    """Record a failed attempt; return since when the endpoint has been failing without a success."""
    row = conn.execute(
        "UPDATE webhooks SET failing_since = COALESCE(failing_since, ?) WHERE id = ? RETURNING failing_since",
        (now_ms, webhook_id),
    ).fetchone()
    return row[0] if row else None


# --- the outbox fan-out ---------------------------------------------------------------------------


def wake_endpoint(conn: sqlite3.Connection, webhook_id: str, due_at: int) -> None:
    """Make sure the endpoint's job runs no later than `due_at` (a running job re-checks when it ends)."""
    conn.execute(
        "INSERT INTO jobs (kind, ref, due_at) VALUES (?, ?, ?)"
        " ON CONFLICT (kind, ref) DO UPDATE SET due_at = MIN(due_at, excluded.due_at)",
        (ENDPOINT_JOB, webhook_id, due_at),
    )


def subscribers(conn: sqlite3.Connection, org_id: str, event_type: str) -> list[str]:
    """The org's active endpoints subscribed to `event_type` (ids)."""
    rows = conn.execute(
        "SELECT id FROM webhooks WHERE org_id = ? AND is_active = 1"
        " AND EXISTS (SELECT 1 FROM json_each(webhooks.events) WHERE value IN (?, ?))",
        (org_id, event_type, ALL_EVENTS),
    ).fetchall()
    return [webhook_id for (webhook_id,) in rows]


def queue_deliveries(
    conn: sqlite3.Connection, targets: list[str], org_id: str, event_id: str, event_type: str, now_ms: int
) -> int:
    """Queue one event for the endpoints `subscribers` named (same transaction as the event)."""
    for webhook_id in targets:
        conn.execute(_INSERT_DELIVERY, (new_id(), webhook_id, org_id, event_id, event_type, now_ms, now_ms, now_ms))
        wake_endpoint(conn, webhook_id, now_ms)
    if targets:
        jobs.wake(conn)
    return len(targets)


# --- claiming and recording -----------------------------------------------------------------------

_CLAIM_SELECT = (
    "SELECT d.id, d.webhook_id, d.event_id, d.event_type, d.status, d.attempt_count, d.next_attempt_at,"
    " e.payload, w.url, w.secret, w.previous_secrets"
    " FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id JOIN events e ON e.id = d.event_id"
)


def _claimed(row: sqlite3.Row, lease_until: int) -> Claimed:
    return Claimed(
        id=row["id"],
        webhook_id=row["webhook_id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        status=row["status"],
        attempt_count=row["attempt_count"],
        next_attempt_at=row["next_attempt_at"],
        lease_until=lease_until,
        payload=row["payload"].encode(),
        url=row["url"],
        secret=row["secret"],
        previous_secrets=decode_previous(row["previous_secrets"]),
    )


def claim_due(conn: sqlite3.Connection, webhook_id: str, now_ms: int, limit: int, lease_ms: int) -> list[Claimed]:
    """Lease up to `limit` due, unleased deliveries of an active endpoint, oldest due first."""
    rows = conn.execute(
        _CLAIM_SELECT + " WHERE d.webhook_id = ? AND d.status = 'pending' AND d.next_attempt_at <= ?"
        " AND (d.lease_until IS NULL OR d.lease_until <= ?) AND w.is_active = 1"
        " ORDER BY d.next_attempt_at, d.rowid LIMIT ?",
        (webhook_id, now_ms, now_ms, limit),
    ).fetchall()
    lease_until = now_ms + lease_ms
    conn.executemany(
        "UPDATE webhook_deliveries SET lease_until = ? WHERE id = ?", [(lease_until, row["id"]) for row in rows]
    )
    return [_claimed(row, lease_until) for row in rows]


def claim_one(
    conn: sqlite3.Connection, webhook_id: str, delivery_id: str, now_ms: int, lease_ms: int
) -> Claimed | None:
    """Lease one delivery for a manual attempt; None when another attempt of it is in flight."""
    row = conn.execute(
        _CLAIM_SELECT + " WHERE d.id = ? AND d.webhook_id = ? AND (d.lease_until IS NULL OR d.lease_until <= ?)",
        (delivery_id, webhook_id, now_ms),
    ).fetchone()
    if row is None:
        return None
    lease_until = now_ms + lease_ms
    conn.execute("UPDATE webhook_deliveries SET lease_until = ? WHERE id = ?", (lease_until, delivery_id))
    return _claimed(row, lease_until)


def is_leased(conn: sqlite3.Connection, delivery_id: str, now_ms: int) -> bool:
    """Whether an attempt of the delivery is in flight (what makes `claim_one` answer None)."""
    row = conn.execute(
        "SELECT 1 FROM webhook_deliveries WHERE id = ? AND lease_until > ?", (delivery_id, now_ms)
    ).fetchone()
    return row is not None


def insert_attempt(conn: sqlite3.Connection, delivery_id: str, attempt: Attempt, *, manual: bool) -> None:
    conn.execute(
        "INSERT INTO webhook_attempts (delivery_id, at, status_code, duration_ms, error, response_body, manual)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            delivery_id,
            attempt.at,
            attempt.status_code,
            attempt.duration_ms,
            attempt.error,
            attempt.response_body,
            int(manual),
        ),
    )


def settle(
    conn: sqlite3.Connection,
    claimed: Claimed,
    *,
    status: str,
    attempt_count: int,
    next_attempt_at: int | None,
    now_ms: int,
) -> bool:
    """Set a leased delivery's state after an attempt and release its lease; False if the lease was lost."""
    updated = conn.execute(
        "UPDATE webhook_deliveries SET status = ?, attempt_count = ?, next_attempt_at = ?, lease_until = NULL,"
        " updated_at = ? WHERE id = ? AND lease_until = ?",
        (status, attempt_count, next_attempt_at, now_ms, claimed.id, claimed.lease_until),
    ).rowcount
    if updated and status == "pending" and next_attempt_at is not None:
        wake_endpoint(conn, claimed.webhook_id, next_attempt_at)
    return bool(updated)


def release(conn: sqlite3.Connection, claimed: Claimed) -> bool:
    """Give back a lease, leaving the delivery as it is now (without an attempt, or after a failed manual one:
    a `recover` may have re-queued it meanwhile, which then stands); a pending delivery fails when its endpoint was
    disabled meanwhile or no longer subscribes to its type (a succeeded or failed one stays as it is). False if the
    lease was lost."""
    wanted = f"w.is_active AND {_subscribes('webhook_deliveries.event_type')}"
    unwanted = f"webhook_deliveries.status = 'pending' AND NOT ({wanted})"
    row = conn.execute(
        "UPDATE webhook_deliveries SET lease_until = NULL,"
        f" status = CASE WHEN {unwanted} THEN 'failed' ELSE status END,"
        f" next_attempt_at = CASE WHEN {unwanted} THEN NULL ELSE next_attempt_at END"
        " FROM webhooks w WHERE w.id = webhook_deliveries.webhook_id"
        " AND webhook_deliveries.id = ? AND webhook_deliveries.lease_until = ?"
        " RETURNING webhook_deliveries.status, webhook_deliveries.next_attempt_at",
        (claimed.id, claimed.lease_until),
    ).fetchone()
    if row is not None and row[0] == "pending" and row[1] is not None:
        wake_endpoint(conn, claimed.webhook_id, row[1])
        jobs.wake(conn)
    return row is not None


def next_due(conn: sqlite3.Connection, webhook_id: str) -> int | None:
    """When the endpoint next has a delivery to attempt (a leased one counts from its lease's end)."""
    row = conn.execute(
        "SELECT MIN(MAX(d.next_attempt_at, COALESCE(d.lease_until, 0)))"
        " FROM webhook_deliveries d INDEXED BY webhook_deliveries_due"  # as in `fail_pending`
        " JOIN webhooks w ON w.id = d.webhook_id AND w.is_active = 1"
        " WHERE d.webhook_id = ? AND d.status = 'pending'",
        (webhook_id,),
    ).fetchone()
    return row[0]


def finish_endpoint_job(conn: sqlite3.Connection, job: Job, not_before: int | None = None) -> int | None:
    """End an endpoint job's run atomically with the question "is there more?", so no wake-up is lost.

    Done here rather than through the handler's return value: a delivery fanned out between a read of
    `next_due` and the scheduler's own bookkeeping would otherwise wait for the next unrelated wake-up.
    Releasing the lease makes the scheduler's own finish a no-op. A run cut short by its time slice passes
    `not_before` (now): its backlog's oldest due time would put it ahead of the endpoints that waited for a slot.
    """
    due = next_due(conn, job.ref)
    if due is not None and not_before is not None:
        due = max(due, not_before)
    if due is None:
        conn.execute("DELETE FROM jobs WHERE id = ? AND lease_until = ?", (job.id, job.lease_until))
    else:
        conn.execute(
            "UPDATE jobs SET due_at = ?, lease_until = NULL, attempts = 0 WHERE id = ? AND lease_until = ?",
            (due, job.id, job.lease_until),
        )
    return due


def recover_leases(conn: sqlite3.Connection, now_ms: int) -> int:
    """At start-up nothing of ours can be in flight: free every delivery lease and make sure due work has its job
    (the jobs' own leases are freed by `jobs.release_leases`). A disabled endpoint keeps nothing queued: a crash
    can cut off its deliveries in flight when it was disabled, or its backlog between a 410 and `fail_pending`. Nor
    does one that no longer subscribes to a type: a delivery leased when its type was dropped (`fail_unsubscribed`
    leaves it to its holder) fails here, not at its next turn."""
    conn.execute(
        "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, updated_at = ?"
        " WHERE lease_until IS NOT NULL AND status = 'pending' AND NOT EXISTS (SELECT 1 FROM webhooks w"
        f" WHERE w.id = webhook_deliveries.webhook_id AND {_subscribes('webhook_deliveries.event_type')})",
        (now_ms,),
    )
    released = conn.execute("UPDATE webhook_deliveries SET lease_until = NULL WHERE lease_until IS NOT NULL").rowcount
    conn.execute(
        "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, updated_at = ?"
        " WHERE status = 'pending' AND webhook_id IN (SELECT id FROM webhooks WHERE is_active = 0)",
        (now_ms,),
    )
    conn.execute(
        "INSERT INTO jobs (kind, ref, due_at)"
        " SELECT ?, d.webhook_id, MIN(d.next_attempt_at) FROM webhook_deliveries d"
        " JOIN webhooks w ON w.id = d.webhook_id AND w.is_active = 1"
        " WHERE d.status = 'pending' GROUP BY d.webhook_id"
        " ON CONFLICT (kind, ref) DO UPDATE SET due_at = MIN(due_at, excluded.due_at)",
        (ENDPOINT_JOB,),
    )
    return released


# --- the attempt log and recovery -----------------------------------------------------------------


def get_delivery(conn: sqlite3.Connection, webhook_id: str, delivery_id: str) -> Delivery | None:
    row = conn.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ? AND webhook_id = ?",
        (delivery_id, webhook_id),
    ).fetchone()
    if row is None:
        return None
    delivery = _delivery(row)
    delivery.attempts = attempts_of(conn, [delivery.id]).get(delivery.id, [])
    return delivery


def list_deliveries(
    conn: sqlite3.Connection,
    webhook_id: str,
    *,
    before_rowid: int | None,
    status: str | None,
    limit: int,
) -> list[Delivery]:
    """An endpoint's deliveries, newest first, each with its attempts (oldest first)."""
    sql = f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = ?"
    args: list[Any] = [webhook_id]
    if before_rowid is not None:
        sql += " AND rowid < ?"
        args.append(before_rowid)
    if status is not None:
        sql += " AND status = ?"
        args.append(status)
    sql += " ORDER BY rowid DESC LIMIT ?"
    args.append(limit)
    deliveries = [_delivery(row) for row in conn.execute(sql, args).fetchall()]
    attempts = attempts_of(conn, [d.id for d in deliveries])
    for delivery in deliveries:
        delivery.attempts = attempts.get(delivery.id, [])
    return deliveries


def attempts_of(conn: sqlite3.Connection, delivery_ids: list[str]) -> dict[str, list[Attempt]]:
    if not delivery_ids:
        return {}
    marks = ",".join("?" * len(delivery_ids))
    rows = conn.execute(
        "SELECT delivery_id, at, status_code, duration_ms, error, response_body FROM webhook_attempts"
        f" WHERE delivery_id IN ({marks}) ORDER BY id",
        delivery_ids,
    ).fetchall()
    out: dict[str, list[Attempt]] = {}
    for row in rows:
        out.setdefault(row["delivery_id"], []).append(
            Attempt(
                at=row["at"],
                status_code=row["status_code"],
                duration_ms=row["duration_ms"],
                error=row["error"],
                response_body=row["response_body"],
            )
        )
    return out


def recover(conn: sqlite3.Connection, webhook: Webhook, since_ms: int, now_ms: int) -> int:
    """Re-queue, from `since_ms`, every subscribed event that has not reached this endpoint successfully.

    Failed deliveries start the retry schedule again; events that never got a delivery (the endpoint was
    disabled, or was created after them) get one. Pending and succeeded deliveries are left alone.
    """
    events_json = _encoder.encode(webhook.events).decode()
    subscribed = "EXISTS (SELECT 1 FROM json_each(?) WHERE value IN (e.type, '*'))"
    requeued = conn.execute(
        "UPDATE webhook_deliveries SET status = 'pending', attempt_count = 0, next_attempt_at = ?, updated_at = ?"
        " WHERE webhook_id = ? AND status = 'failed' AND event_id IN"
        f" (SELECT e.id FROM events e WHERE e.org_id = ? AND e.created_at >= ? AND {subscribed})",
        (now_ms, now_ms, webhook.id, webhook.org_id, since_ms, events_json),
    ).rowcount
    missing = conn.execute(
        "SELECT e.id, e.type FROM events e WHERE e.org_id = ? AND e.created_at >= ? AND e.created_at >= ?"
        f" AND {subscribed}"
        " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = ? AND d.event_id = e.id)"
        " ORDER BY e.pos",
        (webhook.org_id, since_ms, webhook.created_at, events_json, webhook.id),
    ).fetchall()
    conn.executemany(
        _INSERT_DELIVERY,
        [(new_id(), webhook.id, webhook.org_id, row["id"], row["type"], now_ms, now_ms, now_ms) for row in missing],
    )
    total = requeued + len(missing)
    if total:
        wake_endpoint(conn, webhook.id, now_ms)
        jobs.wake(conn)
    return total


_FORGET_EXPIRED = forget_expired_sql("webhooks", "previous_secrets")


def forget_expired_secrets(conn: sqlite3.Connection, now_ms: int) -> int:
    """Drop the rotated-away signing secrets whose 24 h overlap has ended; return how many endpoints had one."""
    return forget_expired(conn, _FORGET_EXPIRED, now_ms)
