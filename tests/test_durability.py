"""Online backup under write load, and a graceful SIGTERM with work in flight."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PARLEY, call, cli, env_for, free_port, wait_until_ready
from tests.fake_llm import FakeLLM
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


@pytest.mark.e2e
def test_sigterm_with_a_model_turn_and_a_model_written_opening_in_flight_exits_within_ten_seconds(
    tmp_path: Path,
) -> None:
    """Two kinds of slow work at once: an HTTP request waiting on the model (uvicorn's graceful wait) and an
    assistant turn waiting on it (the scheduler's grace). Their waits must not add up past 10 s."""
    with FakeLLM() as llm:
        llm.hang(30, times=5)
        port = free_port()
        log = tmp_path / "server.log"
        process = subprocess.Popen(
            [PARLEY, "serve", "--dev", "--port", str(port)],
            cwd=tmp_path,
            env=env_for(
                tmp_path,
                PARLEY_ALLOW_PRIVATE_URLS="1",
                PARLEY_ALLOW_HTTP_URLS="1",
                PARLEY_LLM_BASE_URL=llm.base_url,
                PARLEY_LLM_MODEL="test-model",
            ),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_ready(base, process, log)
            key = (tmp_path / "data" / "dev-api-key").read_text().strip()
            status, agent = call(
                "POST", f"{base}/v1/agents", key, {"name": "Slow", "systemPrompt": "Hi.", "replyDebounceMs": 0}
            )
            assert status == 201, agent
            opening = {"agentId": agent["data"]["agentId"], "toNumber": "+15555550199", "fromNumber": "+15555550123"}
            status, _ = call("POST", f"{base}/v1/sms-conversations", key, {**opening, "welcomeMessage": "Hi!"})
            assert status == 201
            status, _ = call(
                "POST", f"{base}/v1/simulator/inbound", key, {"from": "+15555550199", "to": "+15555550123", "body": "?"}
            )
            assert status == 201
            answers: list[Any] = []
            writer = threading.Thread(
                target=lambda: answers.append(
                    call("POST", f"{base}/v1/sms-conversations", key, {**opening, "toNumber": "+15555550198"})
                ),
                daemon=True,
            )
            writer.start()
            deadline = time.monotonic() + 15
            while len(llm.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(llm.requests) == 2, answers  # the turn and the opening are both waiting on the model

            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
            elapsed = time.monotonic() - started
            assert elapsed < 10, f"{elapsed:.1f} s\n" + log.read_text()[-3000:]
            writer.join(5)
            assert [status for status, _ in answers] == [503]  # the opening the model was still writing
            # Answered, so not logged as a crash (uvicorn's traceback for the cancellation it made).
            assert "Exception in ASGI application" not in log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
