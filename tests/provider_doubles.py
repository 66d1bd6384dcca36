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
