"""The built-in simulator: accepts sends, reports `sent` then `delivered`, and honours Twilio's magic numbers."""

from __future__ import annotations

import asyncio
import logging
import secrets

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
REJECTED_FROM = {"+15005550001": ("21212", "The 'From' number is not a valid phone number.")}


def final_status(to_number: str) -> tuple[str, str | None]:
    """Where a simulated message ends: (Twilio status, error code)."""
    if to_number in FAILS_AFTER_ACCEPT:
        return "failed", FAILS_AFTER_ACCEPT[to_number]
    return "delivered", None


class SimulatorProvider:
    name = "simulator"
    confirms_opt_out = False

    def __init__(self, report_delay: float = 0.02) -> None:
        self._report_delay = report_delay
        self._on_status: StatusSink | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, on_status: StatusSink) -> None:
        self._on_status = on_status

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def send(self, request: SendRequest) -> SendAccepted:
        if rejected := REJECTED_FROM.get(request.from_number) or REJECTED_TO.get(request.to_number):
            raise ProviderRejected(*rejected)
        sid = "SM" + secrets.token_hex(16)
        task = asyncio.create_task(self._report(sid, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return SendAccepted(provider_message_id=sid, provider_status="queued")

    async def _report(self, sid: str, request: SendRequest) -> None:
        """`sent`, then the final status: handed over together, after the time a carrier would take."""
        status, error = final_status(request.to_number)
        await asyncio.sleep(2 * self._report_delay)
        if self._on_status is None:
            return
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
        try:
            await self._on_status(reports)
        except Exception:  # the reconciler will finish this message
            log.exception("simulated status report failed")

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
