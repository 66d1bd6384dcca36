"""Scale check: Parley over 100,000 open conversations and 1,000,000 messages.

    .venv/bin/python bench/scale.py [--conversations 100000] [--messages-each 10] [--keep DIR]

Builds the database fast (`parley migrate`, `parley keys create`, `parley agents sync`, then direct
sqlite3 bulk inserts matching migrations/: conversations in_progress with unique pairs, their messages,
and each one's `inactivity` job, as the service itself would leave them), starts `parley serve` on it and
measures, all on 127.0.0.1:
  - GET /v1/sms-conversations/{id} and GET .../messages latency over random conversations (wrk, 1 and 4
    connections; target p99 < 5 ms);
  - the idle process's CPU over 30 s (target < 2 %);
  - that an inactivity deadline fires within 2 s: a conversation created with inactivityTimeoutSeconds=60
    must be closed with `inactivity_timeout` at most 2 s after lastActivityAt + 60 s.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BIN,
    Server,
    call,
    create_key,
    ensure_wrk,
    free_port,
    load_average,
    machine,
    parley_env,
    wrk,
)
from tests.seed import SEED_CREATE

OUR_NUMBER = "+15555550123"
DAY_MS = 86_400_000
DYNAMIC = '{"customerName":"Ada","dealershipName":"PAM Motors","recallId":"24V-123"}'
OUTBOUND = "Hi Ada, this is PAM Motors following up on your service recall. When would suit you for the repair?"
INBOUND = "Thanks, next Tuesday morning works for me if you have a slot."


def parley_cli(db: Path, *args: str) -> str:
    env = parley_env(db, 0)
    env.pop("PARLEY_PORT")
    out = subprocess.run([str(BIN / "parley"), *args], env=env, cwd=db.parent, check=True, capture_output=True)
    return out.stdout.decode()


def build(db: Path, conversations: int, per: int) -> tuple[str, list[str]]:
    """Create the database; return the bench org's key and a sample of conversation ids."""
    parley_cli(db, "migrate")
    key = create_key(db)
    parley_cli(db, "agents", "sync")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")  # a bulk load: durability comes from the final checkpoint
    org_id = conn.execute("SELECT id FROM orgs WHERE name = 'bench'").fetchone()[0]
    agent_id = conn.execute("SELECT id FROM agents WHERE slug = 'recall-sms'").fetchone()[0]
    now = int(time.time() * 1000)
    start = now - 3_600_000  # an hour of history; every deadline is a day after the last message
    ids: list[str] = []
    started = time.perf_counter()
    conn.execute("BEGIN")
    chunk = 5000
    for base in range(0, conversations, chunk):
        convs, msgs, jobs = [], [], []
        for i in range(base, min(base + chunk, conversations)):
            cid = str(uuid.uuid4())
            ids.append(cid)
            customer = f"+1556{i:07d}"
            created = start + i * 3_600_000 // conversations
            last = created + (per - 1) * 1000
            convs.append(
                (
                    cid,
                    org_id,
                    agent_id,
                    "in_progress",
                    OUR_NUMBER,
                    customer,
                    DYNAMIC,
                    "{}",
                    86400,
                    created,
                    last,
                    per,
                    per,
                    0,
                    i + 1,  # pos: conversations are numbered in creation order (migration 0007)
                )
            )
            for seq in range(1, per + 1):
                at = created + (seq - 1) * 1000
                if seq % 2:
                    msgs.append(
                        (
                            str(uuid.uuid4()),
                            cid,
                            org_id,
                            seq,
                            "outbound",
                            "agent",
                            OUR_NUMBER,
                            customer,
                            OUTBOUND,
                            "delivered",
                            "simulator",
                            "SM" + uuid.uuid4().hex,
                            None,
                            "GSM-7",
                            1,
                            at,
                            at,
                            at + 500,
                            at + 500,
                            i + 1,
                        )
                    )
                else:
                    msgs.append(
                        (
                            str(uuid.uuid4()),
                            cid,
                            org_id,
                            seq,
                            "inbound",
                            "customer",
                            customer,
                            OUR_NUMBER,
                            INBOUND,
                            "received",
                            "simulator",
                            None,
                            None,
                            "GSM-7",
                            1,
                            at,
                            None,
                            None,
                            at,
                            i + 1,
                        )
                    )
            jobs.append(("inactivity", cid, last + DAY_MS, f'{{"deadline":{last + DAY_MS},"warn":false}}'))
        conn.executemany(
            "INSERT INTO conversations (id, org_id, agent_id, status, from_number, to_number, dynamic_variables,"
            " metadata, inactivity_timeout_seconds, created_at, last_activity_at, message_count, last_message_seq,"
            " last_event_seq, pos) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            convs,
        )
        conn.executemany(
            "INSERT INTO messages (id, conversation_id, org_id, seq, direction, author, from_number, to_number,"
            " content, status, provider, provider_message_id, error_code, encoding, segments, created_at, sent_at,"
            " delivered_at, updated_at, conversation_pos)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            msgs,
        )
        conn.executemany("INSERT INTO jobs (kind, ref, due_at, payload) VALUES (?, ?, ?, ?)", jobs)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("conversations", "messages", "jobs")}
    conn.close()
    size = db.stat().st_size / 1e6
    print(
        f"built in {time.perf_counter() - started:.1f} s: {counts['conversations']} conversations,"
        f" {counts['messages']} messages, {counts['jobs']} jobs; {size:.0f} MB"
    )
    return key, ids


def next_wake_cost(db: Path) -> float:
    """Milliseconds one scheduler `next_wake` query costs on this database (it runs once per scheduler pass)."""
    from app.store.jobs import next_wake

    conn = sqlite3.connect(db)
    now = int(time.time() * 1000)
    next_wake(conn, now)
    t = time.perf_counter()
    for _ in range(20):
        next_wake(conn, now)
    conn.close()
    return (time.perf_counter() - t) / 20 * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--messages-each", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each wrk run")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--timeout-seconds", type=int, default=60, help="inactivityTimeoutSeconds to test (>= 60)")
    parser.add_argument("--keep", type=Path, help="build into (or reuse) this directory instead of a temp dir")
    args = parser.parse_args()
    ensure_wrk()
    print(f"Machine: {machine()}; load average {load_average()}")

    tmp = None
    if args.keep:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="parley-scale-")
        work = Path(tmp.name)
    db = work / "parley.db"
    if db.exists() and (work / "bench-key").exists():
        key = (work / "bench-key").read_text().strip()
        conn = sqlite3.connect(db)
        ids = [r[0] for r in conn.execute("SELECT id FROM conversations WHERE status = 'in_progress' LIMIT 200000")]
        conn.close()
        print(f"reusing {db} ({len(ids)} open conversations)")
    else:
        key, ids = build(db, args.conversations, args.messages_each)
        (work / "bench-key").write_text(key + "\n")
    print(f"scheduler next_wake query on this database: {next_wake_cost(db):.2f} ms per pass")

    sample = random.Random(6).sample(ids, min(20_000, len(ids)))
    ids_file = work / "sample-ids.txt"
    ids_file.write_text("\n".join(sample) + "\n")
    server = Server.parley(work, free_port()).start(timeout=120)
    ok = True
    try:
        print(f"\nserver up, RSS {server.rss_mb():.1f} MB; load average {load_average()}")
        env = {"BENCH_KEY": key, "BENCH_IDS": str(ids_file)}
        wrk(server.base, "read_many.lua", connections=4, seconds=2, env={**env, "BENCH_SUFFIX": ""})  # warm
        print(f"{'read (random conversations)':<34} {'conns':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errs':>5}")
        for label, suffix in (("GET /v1/sms-conversations/{id}", ""), ("GET .../{id}/messages", "/messages")):
            for conns in (1, 4):
                r = wrk(
                    server.base,
                    "read_many.lua",
                    connections=conns,
                    seconds=args.seconds,
                    env={**env, "BENCH_SUFFIX": suffix},
                )
                errors = r["errors_status"] + r["errors_timeout"]
                print(f"{label:<34} {conns:>5} {r['rps']:>7.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {errors:>5}")
                if conns == 1 and (r["p99_ms"] >= 5.0 or errors):
                    ok = False

        # An inactivity deadline: created now, due timeout seconds later.
        body = {**SEED_CREATE, "toNumber": "+15575550100", "inactivityTimeoutSeconds": args.timeout_seconds}
        status, created = call("POST", f"{server.base}/v1/sms-conversations", key, body)
        assert status == 201, (status, created)
        cid = created["data"]["conversationId"]
        time.sleep(1.0)  # the simulator's delivery reports land within ~50 ms

        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        time.sleep(args.idle_seconds)
        cpu1, t1 = server.cpu_seconds(), time.monotonic()
        idle = (cpu1 - cpu0) / (t1 - t0) * 100
        print(f"\nidle CPU over {t1 - t0:.0f} s: {idle:.2f} % of one core ({(cpu1 - cpu0) * 1000:.0f} ms CPU)")
        ok &= idle < 2.0

        status, conv = call("GET", f"{server.base}/v1/sms-conversations/{cid}", key)
        deadline_ms = _ms(conv["data"]["lastActivityAt"]) + args.timeout_seconds * 1000
        while True:
            status, conv = call("GET", f"{server.base}/v1/sms-conversations/{cid}", key)
            if conv["data"]["status"] == "closed" or time.time() * 1000 > deadline_ms + 15_000:
                break
            time.sleep(0.05)
        data = conv["data"]
        if data["status"] == "closed":
            late = (_ms(data["endedAt"]) - deadline_ms) / 1000
            print(f"inactivity deadline: closed with {data['endReason']} {late:+.3f} s after its deadline")
            ok &= data["endReason"] == "inactivity_timeout" and 0 <= late <= 2.0
        else:
            print("inactivity deadline: NOT closed 15 s after its deadline")
            ok = False
        print(f"RSS after: {server.rss_mb():.1f} MB (peak {server.peak_rss_mb():.1f} MB); load {load_average()}")
    finally:
        server.stop()
        if tmp is not None:
            tmp.cleanup()
    print("\nscale checks:", "PASS" if ok else "MISS")
    return 0 if ok else 1


def _ms(text: str) -> int:
    from app.clock import epoch_ms

    return epoch_ms(datetime.fromisoformat(text))


if __name__ == "__main__":
    raise SystemExit(main())
