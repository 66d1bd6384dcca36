"""Shared fixtures: a real app on a temporary SQLite file, driven through Litestar's test client."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app.api.app import create_app
from app.clock import Clock, SystemClock
from app.config import Settings
from app.domain import keys
from app.providers.base import Provider
from app.store import orgs
from app.store.db import connect_sync, write_sync
from app.store.migrate import migrate
from tests.lifespan import Lifespan

ROOT = Path(__file__).resolve().parents[1]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = {
        "database": str(tmp_path / "parley.db"),
        "agents_file": str(ROOT / "data" / "agents.toml"),
        "allow_private_urls": True,
        "allow_http_urls": True,
        "rate_limit": 10_000.0,
    }
    base.update(overrides)
    return Settings(**base)


def create_key(database: str, org: str, *, expires_at: int | None = None, name: str = "test") -> str:
    conn = connect_sync(database)
    try:
        migrate(conn)
        now = SystemClock().now_ms()
        return write_sync(
            conn,
            lambda c: keys.create_key(c, orgs.get_or_create_org(c, org, now), name, expires_at, now).key,
        )
    finally:
        conn.close()


def query(database: str, sql: str, *args: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _stays_on_this_machine(name: str | None) -> bool:
    """Whether looking `name` up asks no DNS server: none (a bind), localhost, a loopback or unspecified address."""
    if name is None or name.rstrip(".").lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing leaves 127.0.0.1 (README, "Tests"): a name other than localhost is not looked up (the query would go
    to a DNS server) but refused as a name that does not resolve is, and the test that asked fails."""
    asked: list[str] = []
    look_up = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if not _stays_on_this_machine(name):
            asked.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: the tests look up no name beyond this machine")
        return look_up(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not asked, f"looked up {sorted(set(asked))}: the tests send nothing beyond 127.0.0.1"


class Harness:
    """A running app, its client, its database path and a key per org."""

    def __init__(self, client: httpx.AsyncClient, settings: Settings, clock: Clock, edge: Any) -> None:
        self.client = client
        self.edge = edge
        self.settings = settings
        self.clock = clock
        self.keys: dict[str, str] = {}

    @property
    def ctx(self) -> Any:
        return self.edge.app.state.ctx

    def key(self, org: str = "acme") -> str:
        if org not in self.keys:
            self.keys[org] = create_key(self.settings.database, org)
        return self.keys[org]

    def auth(self, org: str = "acme", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(org)}", **extra}

    async def post(self, path: str, body: Any = None, org: str = "acme", **headers: str) -> Any:
        kwargs: dict[str, Any] = {"headers": self.auth(org, **headers)}
        if body is not None:
            kwargs["content"] = msgspec.json.encode(body)
            kwargs["headers"]["Content-Type"] = "application/json"
        return await self.client.post(path, **kwargs)

    async def get(self, path: str, org: str = "acme", **params: Any) -> Any:
        return await self.client.get(path, headers=self.auth(org), params=params or None)

    def rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return query(self.settings.database, sql, *args)


@contextlib.asynccontextmanager
async def start_harness(
    tmp_path: Path, *, clock: Clock | None = None, provider: Provider | None = None, **overrides: Any
) -> AsyncIterator[Harness]:
    """`async with start_harness(...) as h`: the real app (lifespan included) and a client that calls it in
    this event loop, shut down when the block ends, a failing assertion included (a bare async generator
    left to the garbage collector kept the app's threads alive, and a failed test hung the run at exit).

    Requests run concurrently for real (Litestar's AsyncTestClient runs each request to completion
    on a portal thread, which serializes them).
    """
    settings = make_settings(tmp_path, **overrides)
    clock = clock or SystemClock()
    app = create_app(settings, clock=clock, provider=provider)
    async with Lifespan(app):
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver.local") as client:
            yield Harness(client, settings, clock, app)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with start_harness(tmp_path) as h:
        yield h


# --- a real `parley serve` on a free loopback port -------------------------------------------------

PARLEY = str(Path(sys.executable).parent / "parley")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "TWILIO_"))}
    env.update(
        PARLEY_DATABASE=str(tmp_path / "data" / "parley.db"),
        PARLEY_AGENTS_FILE=str(ROOT / "data" / "agents.toml"),
    )
    env.update(extra)  # may override the defaults above
    return env


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PARLEY, *args], cwd=tmp_path, env=env_for(tmp_path, **env), capture_output=True, text=True, timeout=60
    )


def call(method: str, url: str, key: str | None = None, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def wait_until_ready(base: str, process: subprocess.Popen[Any], log: Path, timeout: float = 30.0) -> None:
    """Wait for a started `parley serve` to answer /readyz; kill it and show its log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if call("GET", base + "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError("parley serve did not become ready:\n" + log.read_text())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    port = free_port()
    process = subprocess.Popen(
        [PARLEY, "serve", "--dev", "--port", str(port)],
        cwd=tmp_path,
        env=env_for(tmp_path, PARLEY_RATE_LIMIT="100000", PARLEY_ALLOW_PRIVATE_URLS="1", PARLEY_ALLOW_HTTP_URLS="1"),
        # A file, not a pipe: a full pipe would block the server's logging.
        stdout=(tmp_path / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, process, tmp_path / "server.log")
    yield base, process, tmp_path
    if process.poll() is None:
        process.kill()
        process.wait()
