"""Online backup under write load, and a graceful SIGTERM with work in flight."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from typing import Any

import pytest

from tests.conftest import call, cli
from tests.seed import SEED_CREATE


def create_load(base: str, key: str, stop: threading.Event, acknowledged: list[str]) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        body = {**SEED_CREATE, "toNumber": f"+1555555{n % 10000:04d}"}
        try:
            status, answer = call("POST", base + "/v1/sms-conversations", key, body)
        except OSError:
            return
        if status == 201:
            acknowledged.append(answer["data"]["conversationId"])


@pytest.mark.e2e
def test_backup_under_write_load_restores_to_a_sound_database(server: Any) -> None:
    base, _, tmp_path = server
    key = (tmp_path / "data" / "dev-api-key").read_text().strip()
    stop = threading.Event()
    acknowledged: list[str] = []
    writers = [threading.Thread(target=create_load, args=(base, key, stop, acknowledged)) for _ in range(3)]
    for writer in writers:
        writer.start()
    try:
        time.sleep(0.5)
        before = len(acknowledged)
        target = tmp_path / "backup.db"
        result = cli(tmp_path, "backup", str(target))
        assert result.returncode == 0, result.stderr
        during = len(acknowledged)
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert during > before  # writes really ran while the backup was taken
    conn = sqlite3.connect(target)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in conn.execute("SELECT id FROM conversations")}
        assert set(acknowledged[:before]) <= stored  # everything acknowledged before it began is in it
        assert conn.execute("SELECT COUNT(*) FROM conversations WHERE status = 'pending'").fetchone()[0] <= 3
    finally:
        conn.close()


@pytest.mark.e2e
def test_sigterm_with_requests_in_flight_exits_within_ten_seconds_and_loses_nothing(server: Any) -> None:
    base, process, tmp_path = server
    key = (tmp_path / "data" / "dev-api-key").read_text().strip()
    stop = threading.Event()
    acknowledged: list[str] = []
    writers = [threading.Thread(target=create_load, args=(base, key, stop, acknowledged)) for _ in range(4)]
    for writer in writers:
        writer.start()
    time.sleep(0.5)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)
    elapsed = time.monotonic() - started
    stop.set()
    for writer in writers:
        writer.join()
    assert elapsed < 10
    assert acknowledged
    conn = sqlite3.connect(tmp_path / "data" / "parley.db")
    try:
        stored = {row[0] for row in conn.execute("SELECT id FROM conversations")}
        assert set(acknowledged) <= stored
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
