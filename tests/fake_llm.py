"""Real loopback servers for the assistant's tests: a scripted OpenAI-compatible model and a tool server.

Each is a plain ASGI app served by uvicorn on 127.0.0.1 in its own thread (with its own event loop),
so a scripted delay never stalls the app under test, and Parley reaches it through its real HTTP
clients (the `openai` SDK, the guarded `httpx2` client). Every request is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn


@dataclass
class Step:
    """One scripted answer: a status, a JSON (or raw) body, and an optional delay before it."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    delay: float = 0.0
    drip: float = 0.0  # the body one byte at a time, this many seconds apart


Responder = Callable[[dict[str, Any]], Step]


class _QuietCancellation(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for a fake's answer cut short by `stop` (a scripted delay
    cancelled as the thread ends): the thread ends after its test, and the traceback would land in the captured
    output and the `caplog` records of the next test. A fake's own failures are still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


logging.getLogger("uvicorn.error").addFilter(_QuietCancellation())


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)


class LoopbackServer:
    """An ASGI app on 127.0.0.1:<free port>, run by uvicorn in a daemon thread."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that name the protocol,
        # and without it the response body waited behind its headers for the client's delayed ACK (~40 ms
        # on every call over a kept-alive connection).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("loopback server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Ask the server to stop, without waiting for its scripted delays or for uvicorn's shutdown (which
        sleeps 0.1 s at each tick and again before closing): a test is over, its answers are not needed, and
        two fakes joined one after the other at every test's end added up to seconds. The daemon thread ends
        on its own; uvicorn closes the listening socket."""
        self._server.should_exit = self._server.force_exit = True

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[Recorded]:
        """Wait (in real time) until at least `count` requests arrived; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} request(s), got {len(self.requests)}")
            await asyncio.sleep(0.01)
        return list(self.requests)

    def answer(self, request: Recorded) -> Step:  # pragma: no cover - overridden
        return Step(404, {"error": "not found"})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request = Recorded(path=scope["path"], headers=headers, body=b"".join(chunks))
        self.requests.append(request)
        step = self.answer(request)
        if step.delay:
            await asyncio.sleep(step.delay)
        payload = step.raw if step.raw is not None else json.dumps(step.body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": step.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        if step.drip:
            for index in range(len(payload)):
                await send({"type": "http.response.body", "body": payload[index : index + 1], "more_body": True})
                await asyncio.sleep(step.drip)
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.body", "body": payload})


class FakeLLM(LoopbackServer):
    """A scripted OpenAI-compatible chat-completions endpoint at `<url>/v1/chat/completions`.

    Queue answers with `reply`, `call_tools`, `fail` or `respond_with`; with the queue empty it
    answers `default_reply`.
    """

    def __init__(self, default_reply: str = "Thanks, noted.") -> None:
        super().__init__()
        self.default_reply = default_reply
        self._script: deque[Step | Responder] = deque()
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The JSON body of every chat-completions request, in arrival order."""
        return [r.json() for r in self.requests if r.path.endswith("/chat/completions")]

    def _completion(self, message: dict[str, Any], finish_reason: str, model: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    def reply(self, text: str | None, *, delay: float = 0.0) -> FakeLLM:
        message = {"role": "assistant", "content": text}
        self._script.append(
            lambda body: Step(200, self._completion(message, "stop", body.get("model", "")), delay=delay)
        )
        return self

    def call_tools(self, *calls: tuple[str, Any], content: str | None = None, delay: float = 0.0) -> FakeLLM:
        """One answer asking for tool calls: (name, arguments) pairs; arguments dicts are JSON-encoded."""

        def build(body: dict[str, Any]) -> Step:
            tool_calls = [
                {
                    "id": f"call_{next(self._ids)}",
                    "type": "function",
                    "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)},
                }
                for name, args in calls
            ]
            message = {"role": "assistant", "content": content, "tool_calls": tool_calls}
            return Step(200, self._completion(message, "tool_calls", body.get("model", "")), delay=delay)

        self._script.append(build)
        return self

    def fail(self, status: int = 500, *, times: int = 1, delay: float = 0.0) -> FakeLLM:
        for _ in range(times):
            self._script.append(
                Step(status, {"error": {"message": "scripted failure", "type": "server_error"}}, delay=delay)
            )
        return self

    def hang(self, seconds: float, *, times: int = 1) -> FakeLLM:
        """Answers that arrive only after `seconds` (longer than the client's timeout)."""
        for _ in range(times):
            self._script.append(
                lambda body, s=seconds: Step(
                    200, self._completion({"role": "assistant", "content": "late"}, "stop", ""), delay=s
                )
            )
        return self

    def respond_with(self, responder: Responder) -> FakeLLM:
        self._script.append(responder)
        return self

    def answer(self, request: Recorded) -> Step:
        if not request.path.endswith("/chat/completions"):
            return Step(404, {"error": {"message": "not found"}})
        body = request.json()
        item: Step | Responder
        item = (
            self._script.popleft()
            if self._script
            else (
                lambda b: Step(
                    200,
                    self._completion({"role": "assistant", "content": self.default_reply}, "stop", b.get("model", "")),
                )
            )
        )
        return item if isinstance(item, Step) else item(body)


class FakeToolServer(LoopbackServer):
    """A webhook-tool endpoint: records each call and answers from a script (default 200 {"ok": true})."""

    def __init__(self) -> None:
        super().__init__()
        self._script: deque[Step] = deque()

    def then(
        self, status: int = 200, body: Any = None, *, raw: bytes | None = None, delay: float = 0.0
    ) -> FakeToolServer:
        self._script.append(Step(status, body, raw=raw, delay=delay))
        return self

    def answer(self, request: Recorded) -> Step:
        return self._script.popleft() if self._script else Step(200, {"ok": True})
