"""Providers that stand in for a real one where a test needs a send that never finishes, or fails unexpectedly."""

from __future__ import annotations

import asyncio
from typing import Any

from app.providers.base import ProviderRejected, SendAccepted, SendRequest, StatusReport, StatusSink
from app.providers.simulator import SimulatorProvider


class HangingProvider:
    """A provider whose send never completes, like a process killed mid-send."""

    name = "simulator"
    confirms_opt_out = False

    def __init__(self) -> None:
        self.called = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self, on_status: StatusSink) -> None:
        pass

    async def close(self) -> None:
        self.release.set()

    async def send(self, request: SendRequest) -> SendAccepted:
        self.called.set()
        await self.release.wait()
        raise ProviderRejected("30008", "gone")

    async def fetch_status(self, message: Any) -> StatusReport | None:
        return None

    async def find_sent(self, message: Any, taken: Any = ()) -> SendAccepted | None:
        return None


class SimulatorHolding(SimulatorProvider):
    """The simulator, except that its `nth` send waits for `release` (never set: a process killed while it waited
    for the provider)."""

    def __init__(self, nth: int) -> None:
        super().__init__()
        self.nth = nth
        self.sends = 0
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, request: SendRequest) -> SendAccepted:
        self.sends += 1
        if self.sends == self.nth:
            self.holding.set()
            await self.release.wait()
        return await super().send(request)


class BreaksOnNth(SimulatorProvider):
    """The simulator, except that its `nth` send fails: with an error no provider is meant to raise, or `error`
    (a refusal, say)."""

    def __init__(self, nth: int, error: Exception | None = None) -> None:
        super().__init__()
        self.nth = nth
        self.sends = 0
        self.error = error

    async def send(self, request: SendRequest) -> SendAccepted:
        self.sends += 1
        if self.sends == self.nth:
            raise self.error or RuntimeError("unexpected")
        return await super().send(request)


class ReportsFailureLater(SimulatorProvider):
    """The simulator, except that its `nth` send is taken (`queued`) and reported `failed` (30003) only when the
    test calls `report_failure`, through the provider's status path; or, with `refuse` set, that send waits
    for `release` and is then refused."""

    def __init__(self, nth: int, *, refuse: bool = False) -> None:
        super().__init__()
        self.nth = nth
        self.refuse = refuse
        self.sends = 0
        self.held: SendRequest | None = None
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, request: SendRequest) -> SendAccepted:
        self.sends += 1
        if self.sends != self.nth:
            return await super().send(request)
        self.held = request
        self.holding.set()
        if self.refuse:
            await self.release.wait()
            raise ProviderRejected("21610", "The recipient has unsubscribed")
        return SendAccepted(provider_message_id="SMheld", provider_status="queued")

    async def report_failure(self) -> None:
        assert self.held is not None and self._on_status is not None
        report = StatusReport(
            provider_message_id="SMheld",
            provider_status="failed",
            error_code="30003",
            message_id=self.held.message_id,
            raw={"MessageSid": "SMheld", "MessageStatus": "failed", "ErrorCode": "30003"},
        )
        await self._on_status([report])
