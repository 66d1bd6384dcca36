"""`make crash`: SIGKILL `parley serve` under write load, restart it, and prove nothing acknowledged was lost.

    .venv/bin/python bench/crash.py [--kills 100] [--workers 12]

Load: concurrent POST /v1/sms-conversations (new pairs, plus some on existing pairs so supersede runs)
and POST /v1/simulator/inbound (to the pairs of acknowledged conversations; some of them STOP), from one asyncio
client on 127.0.0.1. At each of `--kills` random moments, and only while at least one of those writes has been
outstanding for a while (sent, not answered), the server is SIGKILLed, `PRAGMA quick_check` is run on the
dead server's database, and the server is restarted on the same port and database.

Checked at the end (after a last restart and a graceful stop):
  - every acknowledged (2xx) create is in the database, not `pending`, with the acknowledged providerMessageId
    on its opening message and its `sms.message_sent` event;
  - every acknowledged inbound message is in the database, and every STOP in it (acknowledged or not) has its
    pair on the opt-out list (the opt-out commits with the message);
  - no outbound message is left `queued` with no provider id (start-up settles every send a kill cut off);
  - no conversation created before a restart was still `pending` once that restart was serving;
  - `PRAGMA integrity_check` is `ok`;
  - with webhooks in the build: a loopback receiver subscribed to every event received every event in the
    log (PARLEY_ALLOW_PRIVATE_URLS=1, PARLEY_ALLOW_HTTP_URLS=1, a short PARLEY_WEBHOOK_RETRY_SCHEDULE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HOST, Server, create_key, free_port, load_average, machine
from tests.seed import SEED_CREATE

OUR_NUMBER = SEED_CREATE["fromNumber"]


class Receiver:
    """A loopback webhook receiver that records every event id it is sent (and answers 200)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.deliveries = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    event_id = json.loads(body)["id"]
                except (ValueError, KeyError, TypeError):
                    event_id = None
                with receiver.lock:
                    receiver.deliveries += 1
                    if event_id:
                        receiver.ids.add(event_id)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class Load:
    base: str
    key: str
    creates: dict[str, str] = field(default_factory=dict)  # acknowledged conversation id -> providerMessageId
    pairs: list[str] = field(default_factory=list)  # customer numbers of acknowledged creates
    inbound: set[str] = field(default_factory=set)  # acknowledged inbound message ids
    stops: set[str] = field(default_factory=set)  # customer numbers whose STOP was acknowledged
    outstanding: dict[int, float] = field(default_factory=dict)  # request serial -> monotonic start
    sent = 0
    refused = 0
    interrupted = 0
    failed = 0
    serial = 0
    stopping = False

    def writes_in_flight(self, min_age: float) -> int:
        now = time.monotonic()
        return sum(1 for started in self.outstanding.values() if now - started >= min_age)


async def worker(load: Load, rng: random.Random, client: httpx.AsyncClient) -> None:
    headers = {"authorization": f"Bearer {load.key}"}
    while not load.stopping:
        roll = rng.random()
        if roll < 0.55 or not load.pairs:
            to = f"+1557{rng.randrange(10**7):07d}"
            kind, url, body = "create", "/v1/sms-conversations", {**SEED_CREATE, "toNumber": to}
        elif roll < 0.65:
            to = rng.choice(load.pairs)
            kind, url, body = "create", "/v1/sms-conversations", {**SEED_CREATE, "toNumber": to}
        else:
            frm = rng.choice(load.pairs)
            text = "STOP" if roll < 0.70 else "Tuesday?"
            kind, url, body = "inbound", "/v1/simulator/inbound", {"from": frm, "to": OUR_NUMBER, "body": text}
        load.serial += 1
        serial = load.serial
        load.outstanding[serial] = time.monotonic()
        load.sent += 1
        try:
            response = await client.post(load.base + url, json=body, headers=headers)
        except httpx.ConnectError:  # the server is down: nothing was sent
            load.refused += 1
            await asyncio.sleep(0.05)
            continue
        except httpx.HTTPError:  # sent, and the answer was lost with the server
            load.interrupted += 1
            await asyncio.sleep(0.05)
            continue
        finally:
            load.outstanding.pop(serial, None)
        if response.status_code // 100 != 2:
            load.failed += 1
            continue
        data = response.json()["data"]
        if kind == "create":
            load.creates[data["conversationId"]] = data["providerMessageId"]
            load.pairs.append(body["toNumber"])
        else:
            load.inbound.add(data["messageId"])
            if body["body"] == "STOP":
                load.stops.add(body["from"])
                if body["from"] in load.pairs:
                    load.pairs.remove(body["from"])  # creates to it are refused from now on


def quick_check(db: Path, full: bool = False) -> str:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()


def read_db(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    print(f"Machine: {machine()}; load average {load_average()}")
    work = Path(tempfile.mkdtemp(prefix="parley-crash-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    db = work / "parley.db"
    key = create_key(db)
    port = free_port()
    receiver = Receiver()
    extra = {
        "PARLEY_ALLOW_PRIVATE_URLS": "1",
        "PARLEY_ALLOW_HTTP_URLS": "1",
        "PARLEY_WEBHOOK_RETRY_SCHEDULE": "1,1,2,2,3,5,5,5",
        "PARLEY_LOG_FORMAT": "json",
    }
    server = Server.parley(work, port, **extra)
    await asyncio.to_thread(server.start)
    load = Load(base=server.base, key=key)

    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=args.workers)) as client:
        hooked = await client.post(
            f"{server.base}/v1/webhooks",
            json={"url": receiver.url, "events": ["*"]},
            headers={"authorization": f"Bearer {key}"},
        )
        webhooks = hooked.status_code == 201
        print(
            "webhooks:",
            "subscribed a loopback receiver to every event"
            if webhooks
            else f"not in this build ({hooked.status_code}); delivery check skipped",
        )
        tasks = [asyncio.create_task(worker(load, random.Random(rng.random()), client)) for _ in range(args.workers)]
        kills, skipped, at_kill, stale_pending = 0, 0, [], 0
        started = time.monotonic()
        try:
            while kills < args.kills:
                await asyncio.sleep(rng.uniform(args.min_gap, args.max_gap))
                # Wait (briefly) for a moment with a write provably outstanding: sent >= 2 ms ago, unanswered.
                deadline = time.monotonic() + 2.0
                while load.writes_in_flight(0.002) == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.0005)
                outstanding = load.writes_in_flight(0.002)
                if outstanding == 0:
                    skipped += 1
                    continue
                server.kill()
                kills += 1
                at_kill.append(outstanding)
                check = await asyncio.to_thread(quick_check, db)
                if check != "ok":
                    print(f"kill {kills}: quick_check says {check!r}")
                restarted_at = int(time.time() * 1000)
                await asyncio.to_thread(server.start)
                stale_pending += read_db(
                    db,
                    "SELECT COUNT(*) FROM conversations WHERE status = 'pending' AND created_at < ?",
                    (restarted_at - 1000,),
                )[0][0]
                if kills % 10 == 0:
                    print(
                        f"  {kills} kills, {len(load.creates)} creates and {len(load.inbound)} inbound acknowledged,"
                        f" {time.monotonic() - started:.0f} s",
                        flush=True,
                    )
        finally:
            load.stopping = True
            await asyncio.gather(*tasks, return_exceptions=True)

    # Settle: the last server delivers what is due, then stops gracefully.
    delivered_ok = True
    missing_events: list[str] = []
    if webhooks:
        org = read_db(db, "SELECT id FROM orgs WHERE name = 'bench'")[0][0]
        wait_until = time.monotonic() + args.settle
        while True:
            events = {r[0] for r in read_db(db, "SELECT id FROM events WHERE org_id = ?", (org,))}
            with receiver.lock:
                missing_events = sorted(events - receiver.ids)
            if not missing_events or time.monotonic() > wait_until:
                break
            await asyncio.sleep(0.5)
        delivered_ok = not missing_events
    server.stop()
    receiver.close()

    # The verdict, from the database file itself.
    conv_rows = dict(read_db(db, "SELECT id, status FROM conversations"))
    sent_ids = {
        r[0]: r[1]
        for r in read_db(
            db, "SELECT conversation_id, provider_message_id FROM messages WHERE direction = 'outbound' AND seq = 1"
        )
    }
    sent_events = {r[0] for r in read_db(db, "SELECT conversation_id FROM events WHERE type = 'sms.message_sent'")}
    message_ids = {r[0] for r in read_db(db, "SELECT id FROM messages WHERE direction = 'inbound'")}
    lost_creates = [cid for cid in load.creates if cid not in conv_rows]
    pending_acked = [cid for cid in load.creates if conv_rows.get(cid) == "pending"]
    wrong_sid = [cid for cid, sid in load.creates.items() if cid in conv_rows and sent_ids.get(cid) != sid]
    no_event = [cid for cid in load.creates if cid in conv_rows and cid not in sent_events]
    lost_inbound = [mid for mid in load.inbound if mid not in message_ids]
    pending_now = sum(1 for st in conv_rows.values() if st == "pending")
    recovered = read_db(db, "SELECT COUNT(*) FROM messages WHERE error_code = 'parley_interrupted' AND seq = 1")[0][0]
    settled = read_db(db, "SELECT COUNT(*) FROM messages WHERE error_code = 'parley_interrupted' AND seq > 1")[0][0]
    opted_out = {r[0] for r in read_db(db, "SELECT phone_number FROM opt_outs")}
    # Every STOP stored, acknowledged or not (a kill may have cut off its answer): its opt-out commits with it.
    stored_stops = {r[0] for r in read_db(db, "SELECT from_number FROM messages WHERE content = 'STOP'")}
    lost_stops = [number for number in stored_stops | load.stops if number not in opted_out]
    unsent = read_db(
        db,
        "SELECT COUNT(*) FROM messages WHERE direction = 'outbound' AND status = 'queued'"
        " AND provider_message_id IS NULL",
    )[0][0]
    unacked_committed = sum(1 for cid in conv_rows if cid not in load.creates)
    integrity = quick_check(db, full=True)
    losses = len(lost_creates) + len(lost_inbound) + len(lost_stops) + len(wrong_sid) + len(no_event)
    losses += len(missing_events)

    print()
    print(
        f"crash harness: {kills} SIGKILLs in {time.monotonic() - started:.0f} s ({skipped} moments skipped:"
        f" nothing outstanding), load average {load_average()}"
    )
    print(f"  writes outstanding at the kills: min {min(at_kill, default=0)}, total {sum(at_kill)}")
    print(
        f"  requests: {load.sent - load.refused} sent, {load.interrupted} cut off by a kill, {load.failed} non-2xx;"
        f" {load.refused} more refused while the server was down"
    )
    print(
        f"  acknowledged creates checked: {len(load.creates)}; lost {len(lost_creates)}, still pending"
        f" {len(pending_acked)}, wrong providerMessageId {len(wrong_sid)}, without sms.message_sent {len(no_event)}"
    )
    print(f"  acknowledged inbound messages checked: {len(load.inbound)}; lost {len(lost_inbound)}")
    print(
        f"  STOPs checked: {len(stored_stops | load.stops)} stored ({len(load.stops)} acknowledged);"
        f" without their opt-out {len(lost_stops)}"
    )
    print(
        f"  other outbound messages cut off by a kill and settled at restart: {settled};"
        f" left queued with no provider id: {unsent}"
    )
    print(
        f"  conversations interrupted mid-create and recovered at restart: {recovered};"
        f" committed but never acknowledged: {unacked_committed - recovered}"
    )
    print(f"  conversations pending after a restart: {stale_pending}; pending at the end: {pending_now}")
    if webhooks:
        print(
            f"  webhook events in the log: {len(events)}; delivered {len(events) - len(missing_events)}"
            f" ({receiver.deliveries} deliveries, {receiver.deliveries - len(receiver.ids)} repeats);"
            f" undelivered {len(missing_events)}"
        )
    print(f"  PRAGMA integrity_check: {integrity}")
    print(f"  LOSSES: {losses}")
    ok = losses == 0 and integrity == "ok" and not stale_pending and not pending_now and not pending_acked
    ok = ok and not unsent
    ok = ok and delivered_ok and kills >= args.kills
    if ok and args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
        print("crash harness: PASS")
    else:
        print("crash harness:", "PASS" if ok else "FAIL", f"(data kept in {work})")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--workers", type=int, default=12, help="concurrent client requests")
    parser.add_argument("--min-gap", type=float, default=0.1, help="least seconds of load between restart and kill")
    parser.add_argument("--max-gap", type=float, default=0.8)
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to wait for webhook deliveries")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", type=Path, help="work in this directory")
    args = parser.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
