"""The built-in simulator: accepts sends, reports `sent` then `delivered`, and honours Twilio's magic numbers."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Collection

from app.domain.ids import new_provider_id
from app.domain.models import Message
from app.providers.base import ProviderRejected, SendAccepted, SendRequest, StatusReport, StatusSink

log = logging.getLogger("parley.simulator")

# Twilio's test credentials treat these destination numbers specially; so does the simulator.
REJECTED_TO = {
    "+15005550001": ("21211", "The 'To' number is not a valid phone number."),
    "+15005550002": ("21612", "The 'To' phone number is not currently reachable via SMS."),
    "+15005550003": ("21408", "Permission to send an SMS has not been enabled for the region."),
    "+15005550004": ("21610", "Attempt to send to unsubscribed recipient."),
}
FAILS_AFTER_ACCEPT = {"+15005550009": "30003"}
MAX_REPORTS_PER_HANDOVER = 256  # one transaction's worth, run on the event loop
REJECTED_FROM = {"+15005550001": ("21212", "The 'From' number is not a valid phone number.")}


def final_status(to_number: str) -> tuple[str, str | None]:
    """Where a simulated message ends: (Twilio status, error code)."""
    if to_number in FAILS_AFTER_ACCEPT:
        return "failed", FAILS_AFTER_ACCEPT[to_number]
    return "delivered", None


class SimulatorProvider:
    """Accepts every send at once and reports on it `2 * report_delay` seconds later, like a carrier.

    One carrier task holds the reports that are on their way, in the order they fall due (every send
    waits the same delay), and hands over all that are due together: under load that is one
    transaction for many messages' reports instead of a task, a timer and a transaction for each.
    """

    name = "simulator"
    confirms_opt_out = False

    def __init__(self, report_delay: float = 0.02) -> None:
        self._report_delay = report_delay
        self._on_status: StatusSink | None = None
        self._due: collections.deque[tuple[float, list[StatusReport]]] = collections.deque()
        self._arrived = asyncio.Event()
        self._carrier: asyncio.Task[None] | None = None
        self._handing: list[StatusReport] = []  # a batch being handed over (lost with the carrier if cut off)

    async def start(self, on_status: StatusSink) -> None:
        self._on_status = on_status

    async def close(self) -> None:
        if self._carrier is not None:
            self._carrier.cancel()
            await asyncio.gather(self._carrier, return_exceptions=True)
            self._carrier = None
        # Reports still on their way would go with the process, and their messages stay `queued` until the status
        # check: like a carrier, report them, early (a batch the stop cut off may be applied twice: harmless).
        if self._handing:
            self._due.appendleft((0.0, self._handing))
        while (batch := self._take(math.inf)) and await self._hand_over(batch):
            pass

    async def send(self, request: SendRequest) -> SendAccepted:
        if rejected := REJECTED_FROM.get(request.from_number) or REJECTED_TO.get(request.to_number):
            raise ProviderRejected(*rejected)
        sid = new_provider_id("SM")
        status, error = final_status(request.to_number)
        reports = [
            StatusReport(
                provider_message_id=sid,
                provider_status=step,
                error_code=code,
                message_id=request.message_id,
                raw={"MessageSid": sid, "MessageStatus": step, "ErrorCode": code},
            )
            for step, code in (("sent", None), (status, error))
        ]
        loop = asyncio.get_running_loop()
        self._due.append((loop.time() + 2 * self._report_delay, reports))
        self._arrived.set()
        if self._carrier is None:
            self._carrier = loop.create_task(self._carry(), name="simulator-carrier")
        return SendAccepted(provider_message_id=sid, provider_status="queued")

    async def _carry(self) -> None:
        """Hand over every report that is due, oldest first, a bounded batch at a time."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._due:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            wait = self._due[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._hand_over(self._take(loop.time()))

    def _take(self, now: float) -> list[StatusReport]:
        """The reports due by `now`, oldest first, a transaction's worth at most."""
        batch: list[StatusReport] = []
        while self._due and self._due[0][0] <= now and len(batch) < MAX_REPORTS_PER_HANDOVER:
            batch.extend(self._due.popleft()[1])
        return batch

    async def _hand_over(self, batch: list[StatusReport]) -> bool:
        """Report a batch through the status path; False when that failed (the status check finishes them)."""
        if self._on_status is None:
            return False
        self._handing = batch  # still set for `close` if the stop cancels the carrier meanwhile
        try:
            await self._on_status(batch)
            handed = True
        except Exception:
            log.exception("simulated status reports failed")
            handed = False
        self._handing = []
        return handed

    async def find_sent(self, message: Message, taken: Collection[str] = ()) -> SendAccepted | None:
        """The simulated carrier lives in this process: a send a crash cut off never reached anyone."""
        return None

    async def fetch_status(self, message: Message) -> StatusReport | None:
        if message.provider_message_id is None:
            return None
        status, error = final_status(message.to_number)
        return StatusReport(
            provider_message_id=message.provider_message_id,
            provider_status=status,
            error_code=error,
            message_id=message.id,
            raw={"MessageSid": message.provider_message_id, "MessageStatus": status, "source": "poll"},
        )
