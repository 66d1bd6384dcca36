"""The in-process scheduler: runs due jobs from the database, each claimed with a lease.

It sleeps until the next deadline or a wake-up, so an idle server costs nothing; a restart resumes
whatever was due or claimed (start-up frees the leases). Shutdown is two-phase: stop claiming, let
running work finish within a grace period, then cancel what is left, giving its lease back (it runs again
after a restart).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

from app.clock import Clock
from app.store import jobs as jobs_store
from app.store.db import Database
from app.store.jobs import Job

log = logging.getLogger("parley.scheduler")

# A handler returns None when the job is done, or the epoch-ms time at which to run it again.
Handler = Callable[[Job], Awaitable[int | None]]

IDLE_RECHECK_SECONDS = 60.0
# SIGTERM gives HTTP requests HTTP_DRAIN_SECONDS (uvicorn's graceful wait, while jobs keep running), then running
# jobs SHUTDOWN_GRACE_SECONDS more: the two waits follow each other, and together stay well inside 10 s.
HTTP_DRAIN_SECONDS = 5
SHUTDOWN_GRACE_SECONDS = 3.0


class Scheduler:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        lease_ms: int = 120_000,
        concurrency: int = 32,
        batch: int = 64,
    ) -> None:
        self.db = db
        self.clock = clock
        self.lease_ms = lease_ms
        self.batch = batch
        self.concurrency = concurrency
        self._handlers: dict[str, Handler] = {}
        # Each kind has its own slots: slow work of one kind (model calls in a model outage, slow webhook
        # endpoints) never holds up another kind's (webhook deliveries, inactivity timers, status look-ups).
        self._limits: dict[str, int] = {}
        self._busy: collections.Counter[str] = collections.Counter()
        self._wake = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.ticks = 0

    def register(self, kind: str, handler: Handler, *, concurrency: int | None = None) -> None:
        """Run `kind`'s due jobs with `handler`, at most `concurrency` (default: the scheduler's) at a time."""
        self._handlers[kind] = handler
        self._limits[kind] = concurrency or self.concurrency

    def is_full(self, kind: str) -> bool:
        """Whether every slot of `kind` is taken (a due job of that kind may be waiting for one)."""
        return self._busy[kind] >= self._limits.get(kind, self.concurrency)

    def _room(self) -> dict[str, int]:
        """Free slots per kind (a kind without a handler is claimed to be dropped, unbounded)."""
        return {kind: limit - self._busy[kind] for kind, limit in self._limits.items()}

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="parley-scheduler")

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping:
            self.ticks += 1
            try:
                await self.run_due()
                now = self.clock.now_ms()
                # A running job re-scheduled while it runs is not claimable until it ends (which wakes us).
                running = set(self._running)
                full = [kind for kind, free in self._room().items() if free <= 0]
                next_at = await self.db.read(
                    lambda c, now=now, running=running, full=full: jobs_store.next_wake(c, now, running, full)
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler pass failed")
                next_at = None
                await asyncio.sleep(1)
            delay = IDLE_RECHECK_SECONDS if next_at is None else (next_at - self.clock.now_ms()) / 1000
            if delay > 0:
                await self.clock.sleep(min(delay, IDLE_RECHECK_SECONDS), self._wake)
            self._wake.clear()

    async def run_due(self) -> int:
        """Claim and start every due job; return how many were started."""
        started = 0
        while not self._stopping:
            now = self.clock.now_ms()
            skip = set(self._running)
            room = self._room()
            claimed = await self.db.write(
                lambda c, now=now, skip=skip, room=room: jobs_store.claim(c, now, self.lease_ms, self.batch, skip, room)
            )
            for job in claimed:
                self._busy[job.kind] += 1
                task = asyncio.create_task(self._run(job), name=f"job-{job.kind}")
                self._running[job.id] = task
                started += 1
            if len(claimed) < self.batch:
                return started
        return started

    async def _run(self, job: Job) -> None:
        try:
            handler = self._handlers.get(job.kind)
            if handler is None:
                log.error("no handler for job kind %s; dropping it", job.kind)
                await self.db.write(lambda c: jobs_store.finish(c, job))
                return
            try:
                again = await handler(job)
            except asyncio.CancelledError:
                # Cut off by the stop: its lease is given back now (the job runs again after the next start;
                # another process on the file, `parley migrate` say, must not see it held meanwhile).
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.db.write(lambda c: jobs_store.retry_at(c, job, job.due_at)))
                raise
            except Exception:
                backoff = min(2 ** min(job.attempts, 12), 3600) * 1000
                log.exception("job %s failed (attempt %d); retrying in %ds", job.kind, job.attempts, backoff // 1000)
                await self.db.write(lambda c: jobs_store.retry_at(c, job, self.clock.now_ms() + backoff))
                return
            if again is None:
                await self.db.write(lambda c: jobs_store.finish(c, job))
            else:
                await self.db.write(lambda c: jobs_store.retry_at(c, job, again, reset_attempts=True))
                self.wake()
        finally:
            self._running.pop(job.id, None)
            self._busy[job.kind] -= 1
            self.wake()
