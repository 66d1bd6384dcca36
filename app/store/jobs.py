"""Timed work for the scheduler: one row per (kind, ref), claimed with a lease."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

import msgspec


class Job(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    kind: str
    ref: str
    due_at: int
    lease_until: int
    attempts: int
    payload: str | None


# Called inside a write transaction (on whichever thread runs it: the event loop's for short writes, the writer's
# for long ones) when work becomes due now, so the scheduler wakes up; the scheduler claims through the same write
# queue, so it sees the work once this transaction has committed.
# Keyed by the writer connection's id: several apps (tests) may share a process.
_wakers: dict[int, Callable[[], None]] = {}
_wakers_lock = threading.Lock()


def register_waker(conn: sqlite3.Connection, wake: Callable[[], None]) -> None:
    with _wakers_lock:
        _wakers[id(conn)] = wake


def unregister_waker(conn: sqlite3.Connection) -> None:
    with _wakers_lock:
        _wakers.pop(id(conn), None)


def wake(conn: sqlite3.Connection) -> None:
    """Wake the scheduler of the app that writes through `conn` (none registered: nothing to do)."""
    waker = _wakers.get(id(conn))
    if waker is not None:
        waker()


def schedule(conn: sqlite3.Connection, kind: str, ref: str, due_at: int, payload: str | None = None) -> None:
    """Create or move the (kind, ref) job to `due_at`; a claimed one is released so it runs again then."""
    conn.execute(
        "INSERT INTO jobs (kind, ref, due_at, payload) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (kind, ref) DO UPDATE SET due_at = excluded.due_at, payload = excluded.payload,"
        " lease_until = NULL, attempts = 0",
        (kind, ref, due_at, payload),
    )


def schedule_earliest(conn: sqlite3.Connection, kind: str, ref: str, due_at: int, payload: str | None = None) -> None:
    """Like `schedule`, but never pushes an existing unclaimed job later."""
    conn.execute(
        "INSERT INTO jobs (kind, ref, due_at, payload) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (kind, ref) DO UPDATE SET due_at = MIN(due_at, excluded.due_at),"
        " payload = excluded.payload WHERE lease_until IS NULL",
        (kind, ref, due_at, payload),
    )


def run_soon(conn: sqlite3.Connection, kind: str, ref: str, now_ms: int) -> None:
    """Have the (kind, ref) job run: created due now; one already waiting keeps its time (an assistant turn's
    debounce still gathers a burst of texts); one claimed (running) is released, so that it runs again once it
    ends. The scheduler is woken."""
    conn.execute(
        "INSERT INTO jobs (kind, ref, due_at) VALUES (?, ?, ?)"
        " ON CONFLICT (kind, ref) DO UPDATE SET lease_until = NULL, attempts = 0",
        (kind, ref, now_ms),
    )
    wake(conn)


def release_leases(conn: sqlite3.Connection) -> int:
    """At start-up nothing of ours runs yet: a job still leased was cut off by a stop or a crash, and runs again
    as soon as it is due instead of when its lease would have run out (minutes)."""
    return conn.execute("UPDATE jobs SET lease_until = NULL WHERE lease_until IS NOT NULL").rowcount


def payload_of(conn: sqlite3.Connection, kind: str, ref: str) -> str | None:
    row = conn.execute("SELECT payload FROM jobs WHERE kind = ? AND ref = ?", (kind, ref)).fetchone()
    return row[0] if row else None


def cancel(conn: sqlite3.Connection, ref: str, kinds: tuple[str, ...]) -> None:
    """Delete `ref`'s jobs of these kinds (point look-ups on the (kind, ref) key)."""
    marks = ",".join("?" * len(kinds))
    conn.execute(f"DELETE FROM jobs WHERE kind IN ({marks}) AND ref = ?", (*kinds, ref))


def claim(
    conn: sqlite3.Connection,
    now_ms: int,
    lease_ms: int,
    limit: int,
    skip: set[int],
    room: Mapping[str, int] | None = None,
) -> list[Job]:
    """Lease up to `limit` due jobs, oldest first, none of `skip` (running here), and of a kind listed in `room`
    no more than its free slots: a kind with none left is not even read, so it cannot crowd out the others."""
    full = sorted(kind for kind, free in (room or {}).items() if free <= 0)
    rows = conn.execute(
        "SELECT id, kind FROM jobs WHERE due_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
        f"{_not_kinds(full)} ORDER BY due_at LIMIT ?",
        (now_ms, now_ms, *full, limit + len(skip)),
    ).fetchall()
    free = dict(room or {})
    ids = []
    for job_id, kind in rows:
        if job_id in skip or free.get(kind, 1) <= 0:
            continue
        if kind in free:
            free[kind] -= 1
        ids.append(job_id)
        if len(ids) == limit:
            break
    jobs = []
    for job_id in ids:
        row = conn.execute(
            "UPDATE jobs SET lease_until = ?, attempts = attempts + 1 WHERE id = ?"
            " RETURNING id, kind, ref, due_at, lease_until, attempts, payload",
            (now_ms + lease_ms, job_id),
        ).fetchone()
        jobs.append(Job(**{key: row[key] for key in row.keys()}))  # noqa: SIM118
    return jobs


def _not_kinds(kinds: Collection[str]) -> str:
    return f" AND kind NOT IN ({','.join('?' * len(kinds))})" if kinds else ""


def is_current(conn: sqlite3.Connection, job: Job) -> bool:
    """True while the claimed job has not been re-scheduled (or cancelled) since it was claimed."""
    row = conn.execute("SELECT 1 FROM jobs WHERE id = ? AND lease_until = ?", (job.id, job.lease_until)).fetchone()
    return row is not None


def finish(conn: sqlite3.Connection, job: Job) -> None:
    """Delete a job that ran, unless it was re-scheduled while it ran."""
    conn.execute("DELETE FROM jobs WHERE id = ? AND lease_until = ?", (job.id, job.lease_until))


def retry_at(conn: sqlite3.Connection, job: Job, due_at: int, *, reset_attempts: bool = False) -> None:
    conn.execute(
        "UPDATE jobs SET due_at = ?, lease_until = NULL, attempts = CASE WHEN ? THEN 0 ELSE attempts END"
        " WHERE id = ? AND lease_until = ?",
        (due_at, int(reset_attempts), job.id, job.lease_until),
    )


def next_wake(
    conn: sqlite3.Connection, now_ms: int, running: set[int] | None = None, full: Collection[str] = ()
) -> int | None:
    """When the earliest job not running here, and not of a kind in `full` (no free slot: a job ending wakes
    the scheduler), becomes claimable (its due time, or its lease's end).

    Two index walks (`jobs_due`, `jobs_leased`) that stop at their first row, not a scan of every job.
    """
    skip = _not_kinds(sorted(full))
    args: list[Any] = sorted(full)
    if running:
        skip += f" AND id NOT IN ({','.join('?' * len(running))})"
        args += list(running)
    due = conn.execute(
        f"SELECT due_at FROM jobs WHERE (lease_until IS NULL OR lease_until <= ?){skip} ORDER BY due_at LIMIT 1",
        [now_ms, *args],
    ).fetchone()
    lease = conn.execute(
        f"SELECT lease_until FROM jobs WHERE lease_until > ?{skip} ORDER BY lease_until LIMIT 1",
        [now_ms, *args],
    ).fetchone()
    candidates = [row[0] for row in (due, lease) if row is not None]
    return min(candidates) if candidates else None
