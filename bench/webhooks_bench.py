"""Webhook delivery throughput against the raw HTTP rate, printed as a ratio (not part of the tests).

A receiver in its own process answers 200 at once. First the app's own webhook client POSTs to it as
fast as it can (with the same concurrency the dispatcher allows per endpoint): the raw rate. Then the
real app delivers N events through the outbox (fan-out in the event's transaction, the scheduler, leases,
signing, the attempt log): the delivery rate. The ratio is the cost of durability and bookkeeping.

    .venv/bin/python bench/webhooks_bench.py [--events 2000] [--endpoints 1]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.api.app import create_app  # noqa: E402
from app.config import Settings  # noqa: E402
from app.domain.events import EventScope  # noqa: E402
from app.domain.keys import create_key  # noqa: E402
from app.store import events, orgs  # noqa: E402
from app.webhooks import service  # noqa: E402
from app.webhooks.delivery import PER_ENDPOINT_CONCURRENCY  # noqa: E402
from tests.lifespan import Lifespan  # noqa: E402

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def receiver_process(port_queue: Any) -> None:
    """A minimal keep-alive HTTP/1.1 server that answers every request with an empty 200."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def raw_rate(client: Any, url: str, count: int, concurrency: int) -> float:
    body = b'{"id":"evt_bench","event":"sms.message_sent","data":{}}'
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            response = await client.post(url, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 200

    await asyncio.gather(*(one() for _ in range(min(200, count))))  # warm the pool
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count / (time.perf_counter() - started)


async def delivery_rate(ctx: Any, url: str, count: int, endpoints: int) -> float:
    now = ctx.clock.now_ms()
    org_id = await ctx.db.write(lambda c: orgs.get_or_create_org(c, "bench", now))
    await ctx.db.write(lambda c: create_key(c, org_id, "bench", None, now))
    for _ in range(endpoints):
        await service.create(ctx, org_id, service.CreateWebhook(url=url, events=["*"]))
    scope = EventScope(org_id=org_id, metadata={"bench": True})

    def append_batch(conn: Any, size: int) -> None:
        for i in range(size):
            events.append(conn, "sms.message_sent", scope, {"n": i}, ctx.clock.now_ms())

    expected = count * endpoints
    started = time.perf_counter()
    for offset in range(0, count, 100):
        size = min(100, count - offset)
        await ctx.db.write(lambda c, size=size: append_batch(c, size))
    while True:
        done = await ctx.db.read(
            lambda c: c.execute("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'succeeded'").fetchone()[0]
        )
        if done >= expected:
            break
        await asyncio.sleep(0.01)
    return expected / (time.perf_counter() - started)


async def run(count: int, endpoints: int) -> None:
    queue: Any = multiprocessing.Queue()
    receiver = multiprocessing.Process(target=receiver_process, args=(queue,), daemon=True)
    receiver.start()
    port = queue.get(timeout=10)
    url = f"http://127.0.0.1:{port}/hook"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(
                database=str(Path(tmp) / "bench.db"),
                agents_file=str(ROOT / "data" / "agents.toml"),
                allow_private_urls=True,
                allow_http_urls=True,
            )
            app = create_app(settings)
            async with Lifespan(app):
                ctx = app.app.state.ctx
                client = ctx.webhooks.client
                concurrency = PER_ENDPOINT_CONCURRENCY * endpoints
                raw = await raw_rate(client, url, count * endpoints, concurrency)
                delivered = await delivery_rate(ctx, url, count, endpoints)
    finally:
        receiver.terminate()
        receiver.join()
    print(f"events: {count} x {endpoints} endpoint(s); concurrency {PER_ENDPOINT_CONCURRENCY} per endpoint")
    print(f"raw POSTs by the same httpx2 client: {raw:8.0f} /s")
    print(f"webhook deliveries (outbox, signed, logged): {delivered:8.0f} /s")
    print(f"ratio deliveries / raw: {delivered / raw:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--endpoints", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(run(args.events, args.endpoints))


if __name__ == "__main__":
    main()
