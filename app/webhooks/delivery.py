"""Delivering the outbox: signed POSTs, the retry schedule, endpoint health, and manual retries.

Each endpoint with due deliveries has one scheduler job (`webhook_endpoint`). Its run drives up to
`per_endpoint` lanes, each with one request in flight, so a slow endpoint occupies one scheduler slot and a
handful of connections while healthy endpoints are served by their own jobs. Every delivery is leased
before it is sent and released when its attempt is recorded; a crash mid-attempt only means the event is
sent again (delivery is at least once), and one event never goes to one endpoint twice at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable

import httpx2
import msgspec

from app.clock import Clock
from app.domain import rotation
from app.domain.errors import Conflict, NotFound, RateLimited
from app.store import webhooks as store
from app.store.db import Database
from app.store.jobs import Job
from app.webhooks import retry, signing

log = logging.getLogger("parley.webhooks")

TIMEOUT_SECONDS = 15.0
MAX_RESPONSE_BODY = 20_000
PER_ENDPOINT_CONCURRENCY = 4
# Endpoints served at once (the scheduler's slots for endpoint jobs). While every slot is taken, an endpoint with
# a backlog gives its slot back after SLICE_SECONDS (once its requests on the wire are answered) and queues again
# behind the endpoints that waited, so 32 slow endpoints cannot keep the others waiting as long as their backlogs
# last. Manual retries run beside the lanes: at most MANUAL_PER_ENDPOINT per endpoint and MANUAL_PER_ORG per
# organization (more answer 429), and MANUAL_RETRIES on the wire in all (more wait their turn, their 15 s not yet
# started), so the pool always has a connection for every request the dispatcher starts.
ENDPOINT_SLOTS = 32
SLICE_SECONDS = 5.0
MANUAL_RETRIES = 16
MANUAL_PER_ENDPOINT = 2
MANUAL_PER_ORG = 4
MAX_CONNECTIONS = ENDPOINT_SLOTS * PER_ENDPOINT_CONCURRENCY + MANUAL_RETRIES
# A lane leases its next delivery while the current one is on the wire: a lease must outlast two attempts.
LEASE_MARGIN_MS = 45_000
USER_AGENT = "Parley-Webhooks/0.1"
# While some lanes are busy, how often an endpoint's run looks for new work to start idle lanes on.
REFILL_POLL_SECONDS = 0.25


class Outcome(msgspec.Struct, kw_only=True):
    """What one HTTP attempt produced."""

    at: int
    status_code: int  # 0 = no response
    duration_ms: int
    error: str | None
    response_body: str | None
    timed_out: bool = False
    retry_after: float | None = None
    undecodable: bool = False  # the body does not match its `Content-Encoding` (judged on its first bytes)

    @property
    def succeeded(self) -> bool:
        """A 2xx answer received whole: one whose body timed out or was cut off is a failed attempt; one whose body
        cannot be decompressed (the error says so) is not: the endpoint had the event and said so. Reading stops at
        the first bytes that do not decompress, as at the body cap, so whether the rest would have come is unknown."""
        return retry.is_success(self.status_code) and (self.error is None or self.undecodable)

    def attempt(self) -> store.Attempt:
        return store.Attempt(
            at=self.at,
            status_code=self.status_code,
            duration_ms=self.duration_ms,
            error=self.error,
            response_body=self.response_body,
        )


def _decode_body(raw: bytes) -> str | None:
    if not raw:
        return None
    # Cut at the byte cap first; "ignore" drops a split trailing character instead of growing the text.
    return raw[:MAX_RESPONSE_BODY].decode("utf-8", "ignore")


class Dispatcher:
    """Sends deliveries and records what happened; the scheduler calls `run_endpoint`."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        client: httpx2.AsyncClient,
        *,
        schedule: tuple[int, ...],
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        per_endpoint: int = PER_ENDPOINT_CONCURRENCY,
        timeout: float = TIMEOUT_SECONDS,
        slice_seconds: float = SLICE_SECONDS,
        crowded: Callable[[], bool] = lambda: True,
    ) -> None:
        self.db = db
        self.clock = clock
        self.client = client
        self.schedule = schedule
        self.rng = rng or random.Random()  # jitter, not security
        # The signature timestamp is wall time: receivers check it against their own clocks.
        self.wall_clock = wall_clock
        self.per_endpoint = per_endpoint
        self.timeout = timeout
        self.slice_seconds = slice_seconds
        self.crowded = crowded  # whether every endpoint slot is taken (another endpoint may be waiting for one)
        # Manual attempts under way (waiting for a turn, or on the wire), per endpoint and per organization.
        self._manual: collections.Counter[str] = collections.Counter()
        self._manual_turns = asyncio.Semaphore(MANUAL_RETRIES)
        self.lease_ms = int(timeout * 1000) + LEASE_MARGIN_MS
        self.claiming = True

    def stop_claiming(self) -> None:
        """Shutdown, first phase: attempts in flight finish, but no lane takes new work."""
        self.claiming = False

    # --- one HTTP attempt -----------------------------------------------------------------------------

    async def send(self, claimed: store.Claimed) -> Outcome:
        """POST the event's stored bytes, signed; never raises for an HTTP or network failure."""
        at = self.clock.now_ms()
        timestamp = int(self.wall_clock())
        secrets = rotation.active_secrets(claimed.secret, claimed.previous_secrets, self.clock.now_ms())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signing.headers(secrets, claimed.event_id, timestamp, claimed.payload),
        }
        started = time.perf_counter()
        status_code = 0
        error: str | None = None
        timed_out = undecodable = False
        retry_after_header: str | None = None
        body = bytearray()
        try:
            async with asyncio.timeout(self.timeout):
                async with self.client.stream("POST", claimed.url, content=claimed.payload, headers=headers) as resp:
                    status_code = resp.status_code
                    retry_after_header = resp.headers.get("retry-after")
                    async for chunk in resp.aiter_bytes():
                        body.extend(chunk[: MAX_RESPONSE_BODY - len(body)])
                        if len(body) >= MAX_RESPONSE_BODY:
                            break
        except (TimeoutError, httpx2.TimeoutException):
            timed_out = True  # before an answer or while its body trickled in: either way the endpoint struggles
            error = f"timed out after {self.timeout:g} s" if not status_code else "timed out reading the response body"
        except httpx2.DecodingError as exc:
            undecodable = True  # compressed other than its header says (read no further): no failure of delivery
            error = f"the response body could not be decoded ({type(exc).__name__}: {exc})"
        except httpx2.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except (httpx2.InvalidURL, httpx2.StreamError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        duration_ms = round((time.perf_counter() - started) * 1000)
        if status_code and not retry.is_success(status_code) and error is None:
            error = f"HTTP {status_code}"
        if 300 <= status_code < 400:
            error = f"HTTP {status_code}: redirects are not followed"
        return Outcome(
            at=at,
            status_code=status_code,
            duration_ms=duration_ms,
            error=error,
            response_body=_decode_body(bytes(body)),
            timed_out=timed_out,
            retry_after=retry.parse_retry_after(retry_after_header, self.clock.now_ms()),
            undecodable=undecodable,
        )

    # --- recording --------------------------------------------------------------------------------------

    def _record(
        self, conn: sqlite3.Connection, claimed: store.Claimed, outcome: Outcome, delay_ms: int | None, manual: bool
    ) -> bool:
        """Write the attempt and its consequences (one transaction of point writes); True when it deactivated
        the endpoint, whose backlog the caller then fails with `_fail_pending` (a long write)."""
        now = self.clock.now_ms()
        is_active = store.is_active(conn, claimed.webhook_id)
        if is_active is None:
            return False  # the endpoint was deleted meanwhile
        if manual and not outcome.succeeded:
            # A failed manual attempt leaves the delivery as it is (in its schedule, if it has one), or as a
            # `recover` that ran meanwhile left it.
            settled = store.release(conn, claimed)
        else:
            next_attempt_at = None
            if outcome.succeeded:
                status, attempts = "succeeded", claimed.attempt_count + (0 if manual else 1)
            elif delay_ms is None or not is_active or outcome.status_code == 410:
                status, attempts = "failed", claimed.attempt_count + 1
            else:
                status, attempts, next_attempt_at = "pending", claimed.attempt_count + 1, now + delay_ms
            if status == "pending" and not (
                is_active and store.subscribed(conn, claimed.webhook_id, claimed.event_type)
            ):
                # A disabled endpoint keeps nothing queued, nor one that no longer subscribes to the event's type.
                status, next_attempt_at = "failed", None
            settled = store.settle(
                conn, claimed, status=status, attempt_count=attempts, next_attempt_at=next_attempt_at, now_ms=now
            )
        if not settled:
            return False  # the lease was lost: the row is someone else's now
        store.insert_attempt(conn, claimed.id, outcome.attempt(), manual=manual)
        if outcome.succeeded:
            store.note_success(conn, claimed.webhook_id, now)
            return False
        failing_since = store.note_failure(conn, claimed.webhook_id, now)
        if is_active and outcome.status_code == 410:
            log.warning("webhook %s answered 410 Gone; disabling it", claimed.webhook_id)
            store.deactivate(conn, claimed.webhook_id, "gone", now)
            return True
        if is_active and retry.should_disable(failing_since, now):
            log.warning("webhook %s has failed without a success for 5 days; disabling it", claimed.webhook_id)
            store.deactivate(conn, claimed.webhook_id, "failing", now)
            return True
        return False

    async def _fail_pending(self, webhook_id: str) -> None:
        """After `_record` deactivated an endpoint: fail its queued backlog, off the event loop."""
        await self.db.write(lambda c: store.fail_pending(c, webhook_id, self.clock.now_ms()), long=True)

    def _delay(self, claimed: store.Claimed, outcome: Outcome, manual: bool) -> int | None:
        if outcome.succeeded or manual:
            return None
        return retry.next_delay_ms(
            claimed.attempt_count + 1,
            self.schedule,
            status_code=outcome.status_code,
            timed_out=outcome.timed_out,
            retry_after=outcome.retry_after,
            rng=self.rng,
        )

    async def _send_leased(self, claimed: store.Claimed, *, manual: bool = False) -> Outcome:
        """`send`, giving the lease back if the attempt is cancelled (shutdown) before it is recorded. The cut-off
        attempt is logged: the endpoint may have received it, and the delivery log says what it saw."""
        at, started = self.clock.now_ms(), time.perf_counter()
        try:
            return await self.send(claimed)
        except Exception as exc:
            # A failure of ours, not the endpoint's (`send` handles every HTTP and network one): record it as a
            # failed attempt, so the retry schedule applies (given back as it was, it would be tried again at once).
            log.error("webhook attempt failed unexpectedly (delivery %s): %s", claimed.id, type(exc).__name__)
            return Outcome(
                at=at,
                status_code=0,
                duration_ms=round((time.perf_counter() - started) * 1000),
                error=f"internal error in Parley while sending ({type(exc).__name__}); tried again on the schedule",
                response_body=None,
            )
        except BaseException:
            # A pending delivery stays in the schedule; a failed one a client retried by hand stays failed.
            after = "tried again after the restart" if claimed.status == "pending" else "not tried again unless retried"
            cut_off = store.Attempt(
                at=at,
                status_code=0,
                duration_ms=round((time.perf_counter() - started) * 1000),
                error=f"cut off by a stop before any answer (it may have arrived); {after}",
                response_body=None,
            )
            await self._release([claimed], cut_off=(cut_off, manual))
            raise

    async def _release(
        self, claimed: list[store.Claimed], *, cut_off: tuple[store.Attempt, bool] | None = None
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            for delivery in claimed:
                store.release(conn, delivery)
                if cut_off is not None:
                    store.insert_attempt(conn, delivery.id, cut_off[0], manual=cut_off[1])

        if claimed:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.db.write(run))

    async def attempt(self, claimed: store.Claimed, *, manual: bool = False) -> Outcome:
        """Send one leased delivery now and record the outcome (the lease is always given back)."""
        outcome = await self._send_leased(claimed, manual=manual)
        delay_ms = self._delay(claimed, outcome, manual)
        if await self.db.write(lambda c: self._record(c, claimed, outcome, delay_ms, manual)):
            await self._fail_pending(claimed.webhook_id)
        return outcome

    async def _stop_if_inactive(
        self, recorded: Awaitable[tuple[list[store.Claimed] | None, bool]], queue: deque[store.Claimed], webhook_id: str
    ) -> list[store.Claimed]:
        """Await a lane's record write; if the endpoint is no longer active, give back what the lane holds
        (and fail the backlog, when this very attempt deactivated it)."""
        claimed, deactivated = await recorded
        if deactivated:
            await self._fail_pending(webhook_id)
        if claimed is None:
            await self._release(list(queue))
            queue.clear()
            return []
        return claimed

    def _retarget(self, claimed: store.Claimed) -> store.Claimed | None:
        """A delivery leased ahead of its turn, as the endpoint is now: a URL changed or a secret rotated since
        applies, and a disabled or deleted endpoint, or one no longer subscribed to the event's type, gets nothing
        (None; the lease is the caller's to give back, which fails a delivery no longer wanted).

        A point read on the loop's own connection, just before the request: the lane leases two deliveries
        ahead, and without it those went to the old URL, or to an endpoint already switched off."""
        now = self.db.read_now(lambda c: store.target(c, claimed.webhook_id))
        if now is None or not now.wants(claimed.event_type):
            return None
        if (now.url, now.secret, now.previous_secrets) == (claimed.url, claimed.secret, claimed.previous_secrets):
            return claimed
        return msgspec.structs.replace(claimed, url=now.url, secret=now.secret, previous_secrets=now.previous_secrets)

    async def _lane(self, first: store.Claimed, going: Callable[[], bool]) -> None:
        """One of an endpoint's `per_endpoint` lanes: one request in flight at a time, back to back.

        The write that records an attempt also leases the lane's next-but-one delivery, and it runs while
        the next request is in flight, so a busy endpoint waits on the network, not on fsync.
        """
        queue: deque[store.Claimed] = deque([first])
        pending: asyncio.Task[list[store.Claimed]] | None = None
        try:
            while queue or pending is not None:
                if queue and not going():
                    # Shutting down, or the endpoint's slice is over: leased but not started goes back.
                    await self._release(list(queue))
                    queue.clear()
                    continue
                if not queue:
                    assert pending is not None
                    queue.extend(await pending)
                    pending = None
                    continue
                leased = queue.popleft()
                current = self._retarget(leased)
                if current is None:  # disabled, deleted or unsubscribed since it was leased: all goes back (`release`)
                    await self._release([leased, *queue])
                    queue.clear()
                    continue
                outcome = await self._send_leased(current)
                if pending is not None:
                    queue.extend(await pending)
                delay_ms = self._delay(current, outcome, manual=False)
                want = max(0, 2 - len(queue)) if going() else 0

                def record(
                    conn: sqlite3.Connection,
                    current: store.Claimed = current,
                    outcome: Outcome = outcome,
                    delay_ms: int | None = delay_ms,
                    want: int = want,
                ) -> tuple[list[store.Claimed] | None, bool]:
                    deactivated = self._record(conn, current, outcome, delay_ms, manual=False)
                    if not store.is_active(conn, current.webhook_id):
                        return None, deactivated  # disabled (a 410, or meanwhile): stop, even what is leased ahead
                    if not want:
                        return [], False
                    claimed = store.claim_due(conn, current.webhook_id, self.clock.now_ms(), want, self.lease_ms)
                    return claimed, False

                pending = asyncio.create_task(self._stop_if_inactive(self.db.write(record), queue, current.webhook_id))
        except BaseException:
            leftovers = list(queue)
            if pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None:
                leftovers.extend(pending.result())
            await self._release(leftovers)
            raise

    # --- the scheduler job ------------------------------------------------------------------------------

    async def run_endpoint(self, job: Job) -> int | None:
        """Deliver what is due for one endpoint, at most `per_endpoint` at a time; while every endpoint slot is
        taken (`crowded`), for at most `slice_seconds`, after which the job is due again now, behind the endpoints
        that waited for a slot meanwhile."""
        webhook_id = job.ref
        lanes: set[asyncio.Task[None]] = set()
        ends = time.monotonic() + self.slice_seconds

        def going() -> bool:
            return self.claiming and (time.monotonic() < ends or not self.crowded())

        try:
            while True:
                room = self.per_endpoint - len(lanes)
                if room > 0 and going():
                    now = self.clock.now_ms()
                    claimed = await self.db.write(
                        lambda c, now=now, room=room: store.claim_due(c, webhook_id, now, room, self.lease_ms)
                    )
                    for delivery in claimed:
                        lanes.add(asyncio.create_task(self._lane(delivery, going), name=f"webhook-{webhook_id}"))
                if not lanes:
                    break
                # Lanes pick up new work themselves; this only fills idle lanes while others are busy.
                done, lanes = await asyncio.wait(
                    lanes, timeout=REFILL_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if (exc := task.exception()) is not None:
                        log.error("a webhook delivery lane failed", exc_info=exc)
        except BaseException:
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            raise
        # The job row is re-armed (or deleted) here, atomically with "is there more?"; returning the time
        # only makes the scheduler look again (its own bookkeeping no longer matches the row, by design).
        sliced = self.claiming and not going()
        not_before = self.clock.now_ms() if sliced else None
        return await self.db.write(lambda c: store.finish_endpoint_job(c, job, not_before))

    # --- manual retry -----------------------------------------------------------------------------------

    async def retry_now(self, org_id: str, webhook_id: str, delivery_id: str) -> store.Delivery:
        """One immediate attempt of a delivery, outside its schedule; returns the delivery afterwards."""

        def check(conn: sqlite3.Connection) -> None:
            webhook = store.get(conn, webhook_id, org_id)
            if webhook is None or store.get_delivery(conn, webhook_id, delivery_id) is None:
                raise NotFound("Delivery not found.")
            if not webhook.is_active:  # disabled by a PATCH or a 410: no request goes there, a manual one neither
                raise Conflict("webhook_inactive", "The webhook is disabled; enable it before retrying a delivery.")

        in_progress = Conflict("delivery_in_progress", "An attempt of this delivery is in progress; try again shortly.")

        def claim(conn: sqlite3.Connection) -> store.Claimed:
            check(conn)
            claimed = store.claim_one(conn, webhook_id, delivery_id, self.clock.now_ms(), self.lease_ms)
            if claimed is None:
                raise in_progress
            return claimed

        def answerable(conn: sqlite3.Connection) -> None:  # a 404 or 409 is answered as such, before any bound
            check(conn)
            if store.is_leased(conn, delivery_id, self.clock.now_ms()):
                raise in_progress

        await self.db.read(answerable)
        endpoint, org = f"endpoint:{webhook_id}", f"org:{org_id}"
        if self._manual[endpoint] >= MANUAL_PER_ENDPOINT or self._manual[org] >= MANUAL_PER_ORG:
            # Unbounded, they would take every connection (and their waits count against other endpoints' 15 s).
            bound = "to this endpoint" if self._manual[endpoint] >= MANUAL_PER_ENDPOINT else "of this organization"
            raise RateLimited(message=f"Too many manual retries {bound} are in progress; retry shortly.")
        self._manual.update((endpoint, org))
        try:
            async with self._manual_turns:  # the lease, and the attempt's 15 s, start with the turn
                claimed = await self.db.write(claim)
                await self.attempt(claimed, manual=True)
        finally:
            self._manual.subtract((endpoint, org))
            self._manual += collections.Counter()  # drops the counts back at zero
        delivery = await self.db.read(lambda c: store.get_delivery(c, webhook_id, delivery_id))
        if delivery is None:
            raise NotFound("Delivery not found.")
        return delivery
