"""Crash safety end to end: SIGKILL a real `parley serve` while deliveries are in flight, start it again."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PARLEY, call, env_for, free_port, wait_until_ready
from tests.seed import SEED_CREATE
from tests.webhook_receiver import Received, Receiver, Reply

pytestmark = pytest.mark.e2e


def environment(tmp_path: Path, port: int) -> dict[str, str]:
    return env_for(
        tmp_path,
        PARLEY_DATABASE=str(tmp_path / "parley.db"),
        PARLEY_PORT=str(port),
        PARLEY_ALLOW_PRIVATE_URLS="1",
        PARLEY_ALLOW_HTTP_URLS="1",
        PARLEY_WEBHOOK_RETRY_SCHEDULE="1,1,1,1,1,1,1,1",
        PARLEY_RATE_LIMIT="100000",
        PARLEY_LOG_FORMAT="json",
    )


def serve(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (tmp_path / "server.log").open("ab")
    process = subprocess.Popen([PARLEY, "serve"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_until_ready(f"http://127.0.0.1:{env['PARLEY_PORT']}", process, tmp_path / "server.log")
    return process


def rows(database: Path, sql: str, *args: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(database, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_mid_delivery_loses_nothing_and_leaves_no_lease(tmp_path: Path) -> None:
    port = free_port()
    env = environment(tmp_path, port)
    key = subprocess.run(
        [PARLEY, "keys", "create", "--org", "acme"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    base = f"http://127.0.0.1:{port}"
    slow = {"on": True}

    def respond(record: Received) -> Reply:
        return Reply(status=200, delay=1.0 if slow["on"] else 0.0)

    with Receiver(respond) as receiver:
        server = serve(tmp_path, env)
        try:
            status, created = call("POST", base + "/v1/webhooks", key, {"url": receiver.url, "events": ["*"]})
            assert status == 201, created
            receiver.secrets = [created["data"]["secret"]]
            for i in range(8):
                body = {**SEED_CREATE, "toNumber": f"+1555555{1000 + i}"}
                assert call("POST", base + "/v1/sms-conversations", key, body)[0] == 201
            # Deliveries are now in flight (the receiver holds each one for a second): kill the server.
            wait(lambda: len(receiver.snapshot()) >= 4, 10, "deliveries in flight")
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
        finally:
            if server.poll() is None:
                server.kill()
        database = tmp_path / "parley.db"
        leased = rows(database, "SELECT COUNT(*) AS n FROM webhook_deliveries WHERE lease_until IS NOT NULL")
        assert leased[0]["n"] > 0  # the kill really interrupted claimed deliveries
        received_before = len(receiver.snapshot())

        slow["on"] = False
        server = serve(tmp_path, env)
        try:

            def all_delivered() -> bool:
                events = {r["id"] for r in rows(database, "SELECT id FROM events")}
                succeeded = {
                    r["event_id"]
                    for r in rows(database, "SELECT event_id FROM webhook_deliveries WHERE status = 'succeeded'")
                }
                got = {r.webhook_id for r in receiver.snapshot()}
                return bool(events) and events <= got and events <= succeeded

            wait(all_delivered, 20, "every event to be delivered after the restart")
            assert len(receiver.snapshot()) > received_before
            assert all(r.verified for r in receiver.snapshot())
            wait(
                lambda: not rows(database, "SELECT 1 FROM webhook_deliveries WHERE lease_until IS NOT NULL"),
                5,
                "every lease to be released",
            )
            assert rows(database, "SELECT * FROM webhook_deliveries WHERE status != 'succeeded'") == []
            # The endpoint's job may be running at any instant (that is what its lease is for); it must not
            # stay claimed once there is nothing left to deliver.
            wait(
                lambda: (
                    not rows(database, "SELECT 1 FROM jobs WHERE kind = 'webhook_endpoint' AND lease_until IS NOT NULL")
                ),
                5,
                "the endpoint job's lease to be released",
            )
            # And a clean stop is quick.
            started = time.monotonic()
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=10)
            assert time.monotonic() - started < 10
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
