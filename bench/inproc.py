"""Creates without sockets: the real app called through ASGI in-process, to separate the write path from HTTP.

    .venv/bin/python bench/inproc.py [--creates 6000] [--clients 32] [--runs 3]

`make bench` measures Parley over HTTP, where uvicorn and h11 cost ~0.11 ms of CPU per request and
the shared machine moves throughput by ±10 % from run to run. Here the same app (Edge, Litestar, the
domain code, the database with group commit, the simulator) is driven by `--clients` concurrent
callers in its own event loop, with no socket, HTTP parser or load generator. It prints creates per
second, CPU per create (the whole process and the event loop's thread), and the write path's
counters over the run: group commits per second, writes per commit, and per commit the time running
the writes on the loop, COMMIT itself (WAL write and fsync), and the wait for it; and how much of the
run the event loop sat idle, in all and while writes were queued behind a commit in flight. What is
left at these numbers is the ceiling the database's write path puts on a create, whatever HTTP costs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import selectors
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.api.app import create_app
from app.config import Settings
from app.observability import configure_logging
from bench.common import AGENTS_FILE, create_key, load_average, machine
from tests.lifespan import Lifespan
from tests.seed import SEED_CREATE


async def create(app: Any, key: str, to_number: str) -> None:
    body = msgspec.json.encode({**SEED_CREATE, "toNumber": to_number})
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/sms-conversations",
        "raw_path": b"/v1/sms-conversations",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {},
    }
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [201]:
        raise RuntimeError(f"create answered {status}")


class IdleProbe(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The event loop's selector, timing each wait for I/O: the loop is idle exactly while it blocks here.

    An idle wait while writes are queued is a wait for the commit in flight: the writer task would
    otherwise be running them. `db` is set once the app is up."""

    def __init__(self) -> None:
        super().__init__()
        self.db: Any = None
        self.idle = 0.0
        self.idle_queued = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout == 0:
            return super().select(timeout)
        queued = self.db is not None and self.db.queued_writes > 0
        started = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            waited = time.perf_counter() - started
            self.idle += waited
            if queued:
                self.idle_queued += waited


async def run(creates: int, clients: int, runs: int, probe: IdleProbe) -> None:
    configure_logging("json")
    logging.getLogger().handlers[0].stream = open(os.devnull, "w")  # noqa: SIM115 - the access log, discarded
    with tempfile.TemporaryDirectory(prefix="parley-inproc-") as tmp:
        database = Path(tmp) / "parley.db"
        key = create_key(database)
        settings = Settings(database=str(database), agents_file=str(AGENTS_FILE), rate_limit=1e9)
        app = create_app(settings)
        async with Lifespan(app):
            db = app.app.state.ctx.db
            probe.db = db

            async def client(number: int, count: int, tag: int) -> None:
                for i in range(count):
                    await create(app, key, f"+1555{tag}{number:02d}{i:04d}")

            await asyncio.gather(*(client(c, 100, 9) for c in range(clients)))  # warm up
            per_client = creates // clients
            for attempt in range(runs):
                await asyncio.sleep(0.5)  # let the simulator's reports settle
                before = dataclasses.replace(db.stats)
                idle, idle_queued = probe.idle, probe.idle_queued
                started, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()
                await asyncio.gather(*(client(c, per_client, attempt) for c in range(clients)))
                wall = time.perf_counter() - started
                cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
                idle, idle_queued = probe.idle - idle, probe.idle_queued - idle_queued
                done = per_client * clients
                after = db.stats
                commits = after.batches - before.batches
                print(
                    f"run {attempt + 1}: {done / wall:,.0f} creates/s; CPU per create {1000 * cpu / done:.3f} ms"
                    f" (event loop {1000 * loop_cpu / done:.3f} ms, busy {100 * loop_cpu / wall:.0f} %)"
                )
                print(
                    f"       {commits / wall:.0f} commits/s, {(after.jobs - before.jobs) / commits:.1f} writes per"
                    f" commit; per commit: writes {1000 * (after.run_seconds - before.run_seconds) / commits:.2f} ms,"
                    f" COMMIT {1000 * (after.commit_seconds - before.commit_seconds) / commits:.2f} ms, waited"
                    f" {1000 * (after.commit_wait_seconds - before.commit_wait_seconds) / commits:.2f} ms",
                )
                print(
                    f"       event loop idle {100 * idle / wall:.0f} % of the run, {100 * idle_queued / wall:.0f} %"
                    f" with writes queued behind a commit ({1000 * idle_queued / commits:.2f} ms per commit)",
                    flush=True,
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", type=int, default=6000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"Machine: {machine()}; load average {load_average()}")
    print(f"{args.clients} concurrent callers, {args.creates} creates per run, in-process (no sockets)")
    probe = IdleProbe()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(probe)) as runner:
        runner.run(run(args.creates, args.clients, args.runs, probe))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
