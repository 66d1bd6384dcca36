"""Time, injected: the system clock in production, a fake one that tests move by hand."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...

    async def sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Sleep for `seconds` of this clock's time, or until `wake` is set."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        if wake is None:
            await asyncio.sleep(max(seconds, 0))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=max(seconds, 0))


class FakeClock:
    """A clock that only moves when told to; sleepers wake when it passes their deadline."""

    def __init__(self, start_ms: int = 1_775_829_600_000) -> None:
        self._now = start_ms
        self._moved = asyncio.Condition()

    def now_ms(self) -> int:
        return self._now

    async def advance(self, seconds: float) -> None:
        self._now += round(seconds * 1000)
        async with self._moved:
            self._moved.notify_all()
        # Let woken sleepers run before the caller moves on.
        for _ in range(5):
            await asyncio.sleep(0)

    async def sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        deadline = self._now + round(max(seconds, 0) * 1000)

        async def until_deadline() -> None:
            async with self._moved:
                await self._moved.wait_for(lambda: self._now >= deadline)

        waiters = [asyncio.ensure_future(until_deadline())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


_second_prefixes: dict[int, str] = {}


def iso(ms: int | None) -> str | None:
    """RFC 3339 UTC with milliseconds, e.g. 2026-04-10T14:00:00.000Z.

    Every event and message carries several timestamps, mostly within the same second: the
    formatted second is memoised (a few thousand entries at most) and only the milliseconds vary.
    """
    if ms is None:
        return None
    second, milli = divmod(ms, 1000)
    prefix = _second_prefixes.get(second)
    if prefix is None:
        if len(_second_prefixes) >= 4096:
            _second_prefixes.clear()
        prefix = _second_prefixes[second] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    return f"{prefix}{milli:03d}Z"


def epoch_ms(moment: datetime) -> int:
    """A timestamp from a request body (decoded from RFC 3339) in epoch milliseconds; ValueError when it has
    no time zone, which RFC 3339 requires and JSON decoders let through."""
    if moment.tzinfo is None:
        raise ValueError("timestamp needs a time zone")
    return round(moment.timestamp() * 1000)
