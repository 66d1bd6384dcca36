"""A fake Twilio REST API on 127.0.0.1: Messages create/list/fetch, basic auth, magic numbers, scripts.

It answers the way Twilio does (JSON resources, RFC 2822 dates, `{"code", "message", "more_info",
"status"}` errors, the test-credential magic numbers) and records every request. Tests script the
next answers of a route to reproduce Twilio's failure modes: an error status without creating the
message, a message created but answered with a 5xx, answered too late, or never answered at all.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "/2010-04-01"
TRIAL_PREFIX = "Sent from your Twilio trial account - "

# Twilio's test credentials: these destination numbers fail at send time with these codes.
MAGIC_TO = {
    "+15005550001": (21211, "The 'To' number {to} is not a valid phone number."),
    "+15005550002": (21612, "The 'To' phone number: {to}, is not currently reachable using the 'From' phone number"),
    "+15005550003": (
        21408,
        "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: {to}.",
    ),
    "+15005550004": (21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (21614, "'To' number is not a valid mobile number"),
}
MAGIC_FROM = {
    "+15005550001": (21212, "The 'From' number {frm} is not a valid phone number."),
    "+15005550007": (21606, "The 'From' phone number provided is not a valid, message-capable Twilio phone number."),
    "+15005550008": (21611, "This 'From' number has exceeded the maximum number of queued messages"),
}


@dataclass
class Recorded:
    method: str
    path: str
    route: str
    query: dict[str, str]
    form: dict[str, str]
    authorized: bool


@dataclass
class Action:
    """One scripted answer. kind: `status` (answer `status` with `body`, create nothing),
    `create_then_status` (create, then answer `status`), `delay` (create, answer after `seconds`; for a list or a
    fetch, answer after `seconds`),
    `drop` (create, close the connection unanswered), `drop_before` (close without creating), `drip` (create,
    then send the answer's body one byte every `seconds`)."""

    kind: str
    status: int = 500
    body: dict[str, Any] | None = None
    seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def error_body(code: int, message: str, status: int) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


class FakeTwilio:
    def __init__(self, account_sid: str = "AC" + "0" * 31 + "1", auth_token: str = "test-auth-token") -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.api_keys: dict[str, str] = {}  # API key SID (SK…) -> secret, accepted beside the account's own pair
        self.trial = False
        self.requests: list[Recorded] = []
        self.messages: dict[str, dict[str, Any]] = {}
        self._scripts: dict[str, list[Action]] = {"send": [], "list": [], "fetch": []}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control --

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeTwilio:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def script(self, route: str, *actions: Action) -> None:
        """Queue answers for the next requests of `route` (`send`, `list` or `fetch`)."""
        with self._lock:
            self._scripts[route].extend(actions)

    def set_status(self, sid: str, status: str, error_code: int | None = None) -> None:
        with self._lock:
            message = self.messages[sid]
            message["status"] = status
            message["error_code"] = error_code
            message["date_updated"] = _now_rfc2822()
            if status in {"sent", "delivered", "undelivered", "failed"} and message["date_sent"] is None:
                message["date_sent"] = message["date_updated"]

    def sends(self) -> list[Recorded]:
        return [r for r in self.requests if r.route == "send"]

    def routes(self) -> list[str]:
        return [r.route for r in self.requests]

    # -- behaviour --

    def _next(self, route: str) -> Action | None:
        with self._lock:
            queue = self._scripts.get(route) or []
            return queue.pop(0) if queue else None

    def create(self, form: dict[str, str]) -> dict[str, Any]:
        sid = "SM" + secrets.token_hex(16)
        now = _now_rfc2822()
        body = form.get("Body", "")
        message = {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": TRIAL_PREFIX + body if self.trial else body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From"),
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": f"{API}/Accounts/{self.account_sid}/Messages/{sid}/Media.json"},
            "to": form.get("To"),
            "uri": f"{API}/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
        with self._lock:
            self.messages[sid] = message
        return message

    def send_error(self, form: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        to, frm = form.get("To", ""), form.get("From", "")
        if not to:
            return 400, error_body(21604, "A 'To' phone number is required.", 400)
        if not frm:
            return 400, error_body(21603, "A 'From' phone number is required.", 400)
        if not form.get("Body"):
            return 400, error_body(21602, "Message body is required.", 400)
        if frm in MAGIC_FROM:
            code, text = MAGIC_FROM[frm]
            return 400, error_body(code, text.format(frm=frm), 400)
        if to in MAGIC_TO:
            code, text = MAGIC_TO[to]
            return 400, error_body(code, text.format(to=to), 400)
        return None

    def listing(self, query: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            items = list(self.messages.values())
        items = [m for m in items if m["to"] == query.get("To", m["to"]) and m["from"] == query.get("From", m["from"])]
        items.reverse()  # newest first
        size = int(query.get("PageSize", "50"))
        page = items[:size]
        uri = f"{API}/Accounts/{self.account_sid}/Messages.json"
        return {
            "messages": page,
            "page": 0,
            "page_size": size,
            "start": 0,
            "end": max(len(page) - 1, 0),
            "first_page_uri": uri,
            "next_page_uri": None,
            "previous_page_uri": None,
            "uri": uri,
        }


def _now_rfc2822() -> str:
    return format_datetime(datetime.now(UTC).replace(microsecond=0))


class _Handler(BaseHTTPRequestHandler):
    fake: FakeTwilio
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _authorized(self) -> bool:
        pairs = [(self.fake.account_sid, self.fake.auth_token), *self.fake.api_keys.items()]
        accepted = {"Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() for user, password in pairs}
        return self.headers.get("Authorization", "") in accepted

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _drip(self, body: dict[str, Any], seconds: float) -> None:
        data = json.dumps(body).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(seconds)

    def _drop(self) -> None:
        self.close_connection = True
        self.connection.close()

    def _route(self, method: str, path: str) -> str:
        base = f"{API}/Accounts/{self.fake.account_sid}/Messages"
        if path == base + ".json":
            return "send" if method == "POST" else "list"
        if method == "GET" and path.startswith(base + "/") and path.endswith(".json"):
            return "fetch"
        return "unknown"

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        form = {k: v[-1] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
        route = self._route(method, parts.path)
        authorized = self._authorized()
        with self.fake._lock:
            self.fake.requests.append(Recorded(method, parts.path, route, query, form, authorized))
        if not authorized:
            self._json(401, error_body(20003, "Authenticate", 401), {"WWW-Authenticate": 'Basic realm="Twilio API"'})
            return
        if route == "unknown":
            self._json(404, error_body(20404, f"The requested resource {parts.path} was not found", 404))
            return
        action = self.fake._next(route)
        if action is not None and action.kind == "status":
            self._json(
                action.status, action.body or error_body(20500, "Internal Server Error", action.status), action.headers
            )
            return
        if action is not None and action.kind == "drop_before":
            self._drop()
            return
        if route == "send":
            if (error := self.fake.send_error(form)) is not None:
                self._json(*error)
                return
            message = self.fake.create(form)
            if action is None:
                self._json(201, message)
            elif action.kind == "create_then_status":
                self._json(action.status, action.body or error_body(20500, "Internal Server Error", action.status))
            elif action.kind == "delay":
                time.sleep(action.seconds)
                with contextlib.suppress(OSError):  # the client may have given up
                    self._json(201, message)
            elif action.kind == "drop":
                self._drop()
            elif action.kind == "drip":
                self._drip(message, action.seconds)
            return
        if action is not None and action.kind == "delay":  # a list or a fetch answered late (a send's is above)
            time.sleep(action.seconds)
        if route == "list":
            with contextlib.suppress(OSError):  # the client may have given up
                self._json(200, self.fake.listing(query))
            return
        sid = parts.path.rsplit("/", 1)[1].removesuffix(".json")
        with self.fake._lock:
            message = self.fake.messages.get(sid)
            snapshot = dict(message) if message else None
        if snapshot is None:
            self._json(404, error_body(20404, f"The requested resource {parts.path} was not found", 404))
        else:
            self._json(200, snapshot)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


@contextlib.contextmanager
def running_fake() -> Iterator[FakeTwilio]:
    """A started fake, stopped on exit (tests wrap it in a fixture)."""
    fake = FakeTwilio().start()
    try:
        yield fake
    finally:
        fake.stop()
