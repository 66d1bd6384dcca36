"""The edge of the service, in front of the router: request ids, authentication, rate limits, access logs.

It sits outside Litestar's routing so that an unknown `/v1` path is answered 401 without a valid
key (and 404 with one), and so that every response, framework errors included, carries
`X-Request-Id` and gets one access-log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import re
import time
from typing import Any

from litestar import Litestar
from litestar.types import Message, Receive, Scope, Send

from app.api.errors import error_bytes, request_id_of
from app.domain import keys
from app.domain.errors import Unauthorized
from app.domain.ids import new_request_id
from app.observability import loggable_path

log = logging.getLogger("parley.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class TokenBucket:
    """Per-key token buckets: `rate` tokens a second, bursts of twice that."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(2 * rate, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        """Take one token; return 0 when allowed, else the seconds until one is available."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


_heap_frozen = False


def _freezing_heap(send: Send) -> Send:
    """Once start-up is complete, move everything alive (modules, the app, its routes) out of the cyclic GC.

    Those objects live as long as the process, yet every full collection walks them all: under load that
    was a 50-80 ms pause several times a minute, the whole p99 tail of a create. Frozen objects are still
    freed by reference counting; only cycle detection skips them. Once per process (tests start many apps).
    """

    async def forward(message: Message) -> None:
        global _heap_frozen
        if message["type"] == "lifespan.startup.complete" and not _heap_frozen:
            _heap_frozen = True
            gc.collect()
            gc.freeze()
        await send(message)

    return forward


def needs_key(path: str) -> bool:
    """Whether a path needs an API key, judged as the router will see it (it collapses `//v1//x` to `/v1/x`)."""
    if "//" in path:
        path = re.sub("/{2,}", "/", path)
    return (path == "/v1" or path.startswith("/v1/")) and not path.startswith("/v1/providers/")


class Edge:
    def __init__(self, app: Litestar, rate_limit: float) -> None:
        self.app = app
        self.buckets = TokenBucket(rate_limit)
        self.key_cache = keys.KeyCache()
        self.metrics: dict[tuple[str, int], int] = {}
        self._allow: dict[str, str] | None = None

    def allow_header(self, path_template: str) -> str | None:
        """Every method a path supports (Litestar's own OPTIONS answer names only one route's)."""
        if self._allow is None:
            methods: dict[str, set[str]] = {}
            for route in self.app.routes:
                template = re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route.path)
                methods.setdefault(template, set()).update(getattr(route, "methods", ()))
            self._allow = {path: ", ".join(sorted(names)) for path, names in methods.items()}
        return self._allow.get(path_template)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send if scope["type"] != "lifespan" else _freezing_heap(send))
            return
        started = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        state: dict[str, Any] = scope.setdefault("state", {})  # type: ignore[typeddict-item]
        state["request_id"] = incoming if incoming and REQUEST_ID.fullmatch(incoming) else new_request_id()
        request_id = state["request_id"]
        status_holder = [0]  # the response's status, once it has started
        answered = [0.0]  # when its last body chunk went out (work after it, a background task, is not its duration)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                if scope.get("method") == "OPTIONS" and (allow := self.allow_header(scope.get("path_template", ""))):
                    headers = [(k, v) for k, v in headers if k.lower() != b"allow"] + [(b"allow", allow.encode())]
                message = {**message, "headers": headers}  # type: ignore[misc]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered[0] = time.perf_counter()  # handed to the server: a cancellation now cannot undo it

        try:
            path = scope["path"]
            if needs_key(path):
                rejection = await self._authenticate(scope, state)
                if rejection is not None:
                    await self._reject(send_with_id, *rejection, request_id)
                    return
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # The server is stopping and gave up on this request: answer in the envelope (uvicorn's own answer is
            # a plain-text 500 without X-Request-Id). A read is worth retrying (in a second); a write cut off
            # mid-way may have taken effect (an SMS may have gone out), so its answer invites no blind retry.
            if not status_holder[0]:
                read = scope.get("method") in ("GET", "HEAD", "OPTIONS")
                with contextlib.suppress(Exception):
                    await self._reject(
                        send_with_id,
                        503,
                        "service_unavailable",
                        "The server is shutting down; retry the request."
                        if read
                        else "The server is shutting down; the request may have taken effect: check before retrying"
                        " (a create retried with the same Idempotency-Key is safe).",
                        {"retry-after": "1"} if read else {},
                        request_id,
                    )
            if not answered[0]:
                raise
            # Answered (503 just now, or before work that followed the answer, such as a Twilio keyword's reply):
            # the cancellation has done its job, and uvicorn would log it as a crash with a traceback. What was cut
            # off is found again at the next start-up.
            log.warning("request cut off by shutdown after its answer", extra={"request_id": request_id})
        finally:
            duration_ms = ((answered[0] or time.perf_counter()) - started) * 1000
            status = status_holder[0] or 500
            method = scope.get("method", "GET")
            # Counted by a known method or OTHER: a label per method a client invents would grow without bound.
            key = (method if method in HTTP_METHODS else "OTHER", status)
            self.metrics[key] = self.metrics.get(key, 0) + 1
            # The path only (query strings can carry phone numbers), and numbers in it masked.
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": key[0],
                    "path": loggable_path(scope.get("path", "")),
                    "status": status,
                    "duration_ms": round(duration_ms, 2),
                },
            )

    async def _authenticate(self, scope: Scope, state: dict[str, Any]) -> tuple[int, str, str, dict] | None:
        ctx = self.app.state.ctx
        header = _header(scope, b"authorization") or ""
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            return 401, "unauthorized", Unauthorized().message, {}
        raw = raw.strip()
        if not keys.well_formed(raw):
            return 401, "unauthorized", Unauthorized().message, {}
        now_ms = ctx.clock.now_ms()
        key_hash = keys.hash_key(raw)
        principal = self.key_cache.get(key_hash, now_ms)
        if principal is None:
            read_at = self.key_cache.generation
            principal = await ctx.db.read(lambda c: keys.lookup(c, key_hash))
            if principal is None:
                return 401, "unauthorized", Unauthorized().message, {}
            # Not cached if a key was revoked meanwhile: this read may predate it (this request still passes, as
            # one that started before the revocation).
            self.key_cache.put(key_hash, principal, now_ms, read_at=read_at)
        if keys.expired(principal, now_ms):
            return 401, "unauthorized", Unauthorized().message, {}
        state["principal"] = principal
        wait = self.buckets.take(principal.key_id, time.monotonic())
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            return 429, "rate_limited", "Rate limit exceeded; retry later.", {"retry-after": str(retry_after)}
        return None

    @staticmethod
    async def _reject(send: Send, status: int, code: str, message: str, headers: dict, request_id: str) -> None:
        body = error_bytes(status, code, message, request_id)
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
        if status == 401:
            raw_headers.append((b"www-authenticate", b'Bearer realm="parley"'))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})


__all__ = ["Edge", "TokenBucket", "request_id_of"]
