"""A real webhook receiver on 127.0.0.1 that verifies every request with the `standardwebhooks` package.

It runs a threaded HTTP/1.1 server (keep-alive, so it behaves like a real endpoint to a pooled client),
records every request, and answers each one with what its `respond` function decides: a status, headers,
a body and an optional delay (to play a slow endpoint).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    body_delay: float = 0.0  # after the status line and headers, before the body


@dataclass
class Received:
    index: int
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified_by: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return bool(self.verified_by)

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def signatures(self) -> list[str]:
        return self.headers.get("webhook-signature", "").split()


Respond = Callable[[Received], Reply]


def verifies(secret: str, headers: dict[str, str], body: bytes) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


class Receiver:
    """`with Receiver() as r:` serves on a free loopback port; `r.url` is the endpoint to register."""

    def __init__(self, respond: Respond | None = None, path: str = "/hook") -> None:
        self.respond: Respond = respond or (lambda _: Reply())
        self.path = path
        self.secrets: list[str] = []
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            record = Received(index=len(self.received), path=handler.path, headers=headers, body=body, at=time.time())
            record.verified_by = [s for s in self.secrets if verifies(s, headers, body)]
            self.received.append(record)
        try:
            reply = self.respond(record)
        except Exception as exc:  # a broken test responder should show up as a 500, not a hang
            reply = Reply(status=500, body=repr(exc).encode())
        if reply.delay:
            time.sleep(reply.delay)
        try:
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(reply.body)))
            handler.end_headers()
            if reply.body_delay:
                handler.wfile.flush()
                time.sleep(reply.body_delay)
            handler.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver._handle(self)

            def do_GET(self) -> None:
                receiver._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- reading what arrived ---------------------------------------------------------------------------

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def by_event(self) -> dict[str, list[Received]]:
        out: dict[str, list[Received]] = {}
        for record in self.snapshot():
            out.setdefault(record.webhook_id, []).append(record)
        return out

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 5.0) -> list[Received]:
        """Poll (in real time) until `predicate(received)` holds; fail the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.snapshot()
            if predicate(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver: condition not met after {timeout}s; got {len(seen)} requests")
            await asyncio.sleep(0.01)

    async def wait_count(self, count: int, timeout: float = 5.0) -> list[Received]:
        return await self.wait_for(lambda seen: len(seen) >= count, timeout)


# --- helpers for tests that drive the app against a receiver ------------------------------------------


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll `check()` (in real time) until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met after {timeout}s (last value {value!r})")
        await asyncio.sleep(0.01)


async def register(h: Any, receiver: Receiver, events: list[str] | None = None, org: str = "acme") -> dict[str, Any]:
    """Register `receiver` as a webhook of `org` and teach it the secret; return the created resource."""
    response = await h.post("/v1/webhooks", {"url": receiver.url, "events": events or ["*"]}, org=org)
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    receiver.secrets = [data["secret"], *receiver.secrets]
    return data


async def emit(h: Any, event_type: str = "sms.message_sent", org: str = "acme", **data: Any) -> str:
    """Append one event to `org`'s outbox through the real `events.append` (no conversation)."""
    from app.domain.events import EventScope
    from app.store import events

    h.key(org)  # make sure the org exists
    org_id = h.rows("SELECT id FROM orgs WHERE name = ?", org)[0]["id"]
    scope = EventScope(org_id=org_id, metadata={"source": "test"})
    return await h.ctx.db.write(
        lambda c: events.append(c, event_type, scope, {"n": data.get("n", 0), **data}, h.ctx.clock.now_ms())
    )
