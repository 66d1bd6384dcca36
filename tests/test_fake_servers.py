"""The loopback fakes themselves: what a test leaves behind once it is over."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import httpx

from tests.fake_llm import FakeLLM


class _Recorder(logging.Handler):
    """The error records a logger emits."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _ask(url: str) -> None:
    """One chat-completions request whose answer the test does not wait for (the fake is stopped under it)."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json={"model": "m", "messages": []}, timeout=10)


def test_a_fake_stopped_during_a_scripted_delay_reports_nothing_once_its_thread_ends() -> None:
    """`stop` does not wait for the fake's thread, which ends after the test that stopped it, during the next
    one: the answer it cuts short must not show up there as an error with a traceback (uvicorn's "Exception in
    ASGI application"), in that test's captured output and `caplog` records."""
    llm = FakeLLM().start()
    # Listened to once the fake exists: creating one re-applies uvicorn's logging set-up, which drops handlers.
    recorder, logger = _Recorder(), logging.getLogger("uvicorn.error")
    logger.addHandler(recorder)
    try:
        llm.hang(30)
        client = threading.Thread(target=_ask, args=(llm.base_url + "/chat/completions",), daemon=True)
        client.start()
        deadline = time.monotonic() + 5
        while not llm.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert llm.requests, "the request did not reach the fake"
        llm.stop()
        llm._thread.join(timeout=5)  # what the next test would run beside
        assert not llm._thread.is_alive()
    finally:
        logger.removeHandler(recorder)
    assert [r.getMessage() for r in recorder.records] == []
