"""Drive an ASGI app's lifespan in the caller's own event loop (tests and the in-process benchmarks)."""

from __future__ import annotations

import asyncio
from typing import Any


class Lifespan:
    """`async with Lifespan(app):` runs the app's start-up, then its shut-down (30 s for each at most)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _expect(self, kind: str) -> None:
        message = await asyncio.wait_for(self.outbox.get(), timeout=30)
        if message["type"] != kind:
            raise RuntimeError(f"lifespan: expected {kind}, got {message}")

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        await self._expect("lifespan.startup.complete")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self._expect("lifespan.shutdown.complete")
        assert self.task is not None
        await self.task
