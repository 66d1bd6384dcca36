"""`make bench`: Parley against a bare Litestar endpoint, same load generator, same run.

Starts `parley serve` (one uvicorn worker, simulator, a fresh database in a temp dir, synchronous=FULL)
and bench/bare_app.py under uvicorn, both on 127.0.0.1, and drives each scenario with wrk at the same
concurrency, bare first then Parley, so drift in machine load hits both alike. Prints requests/s,
p50/p99 latency and Parley/bare ratios, then each server's CPU time and bytes written per request (from
/proc: steadier than throughput on a shared machine) and how busy its event loop's thread was, checks
every acknowledged create is in the database, and reads Parley's RSS from /proc. The assistant's and
webhooks' own benchmarks run afterwards when present.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BIN,
    ROOT,
    Server,
    call,
    create_key,
    ensure_wrk,
    free_port,
    load_average,
    machine,
    wrk,
)
from tests.seed import SEED_CREATE

TARGET_RATIO = 0.40
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 150.0


def row(name: str, bare: dict[str, Any], parley: dict[str, Any]) -> str:
    ratio = parley["rps"] / bare["rps"] if bare["rps"] else 0.0
    errors = parley["errors_status"] + parley["errors_timeout"] + parley["errors_connect"]
    return (
        f"{name:<28} {bare['rps']:>8.0f} {bare['p50_ms']:>7.2f} {bare['p99_ms']:>7.2f}"
        f" | {parley['rps']:>8.0f} {parley['p50_ms']:>7.2f} {parley['p99_ms']:>7.2f} {errors:>5}"
        f" | {ratio:>5.2f}"
    )


def write_path(server: Server) -> dict[str, float]:
    """Parley's write-path counters (parley_db_write_*) from its /metrics."""
    with urllib.request.urlopen(f"{server.base}/metrics", timeout=5) as r:
        text = r.read().decode()
    prefix = "parley_db_write_"
    return {
        name[len(prefix) :].removesuffix("_total"): float(value)
        for name, value in (line.split(" ", 1) for line in text.splitlines() if line.startswith(prefix))
    }


def conversations_in(db: Path, since_ms: int) -> list[tuple[str, str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT id, status FROM conversations WHERE created_at >= ? ORDER BY created_at", (since_ms,)
        ).fetchall()
    finally:
        conn.close()


def run_other(module: str, seconds: float, *args: str) -> str | None:
    """Run another helper's benchmark (python -m bench.NAME) when it is in the tree; echo and return its output."""
    if not (ROOT / "bench" / f"{module}.py").is_file():
        print(f"\n[{module}] not in the tree yet: skipped")
        return None
    print(f"\n[bench/{module}.py] (load {load_average()})", flush=True)
    try:
        out = subprocess.run(
            [str(BIN / "python"), "-m", f"bench.{module}", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(300, 30 * seconds),
        )
    except subprocess.TimeoutExpired:
        print(f"[{module}] timed out")
        return None
    text = out.stdout + (out.stderr if out.returncode else "")
    print("\n".join("  " + line for line in text.rstrip().splitlines()))
    return out.stdout


def _number_after(text: str, label: str) -> float | None:
    for line in text.splitlines():
        if line.strip().startswith(label):
            try:
                return float(line.strip()[len(label) :].split()[0])
            except (ValueError, IndexError):
                return None
    return None


async def _model_round_trips(count: int) -> list[float]:
    """The bare baseline of a turn: one chat completion to the same instant fake model, same client."""
    import openai

    from tests.fake_llm import FakeLLM

    times = []
    with FakeLLM(default_reply="Thanks, noted.") as llm:
        client = openai.AsyncOpenAI(base_url=llm.base_url, api_key="bench", max_retries=0)
        try:
            for _ in range(count):
                started = time.perf_counter()
                await client.chat.completions.create(
                    model="bench",
                    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                )
                times.append((time.perf_counter() - started) * 1000)
        finally:
            await client.close()
    return sorted(times)


def turnaround(seconds: float) -> None:
    out = run_other("turnaround_bench", seconds, "--seconds", str(seconds))
    if not out:
        return
    p50, p99 = _number_after(out, "turnaround p50"), _number_after(out, "turnaround p99")
    import asyncio

    sys.path.insert(0, str(ROOT))
    bare = asyncio.run(_model_round_trips(300))
    b50, b99 = bare[len(bare) // 2], bare[int(len(bare) * 0.99)]
    print(
        f"  bare baseline (the same openai client to the same instant model, one call at a time):"
        f" p50 {b50:.1f} ms, p99 {b99:.1f} ms"
    )
    if p50 and p99:
        print(f"  turnaround / bare: p50 {p50 / b50:.1f}x, p99 {p99 / b99:.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leave a core to the server)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-others", action="store_true", help="skip the turnaround and webhook benchmarks")
    args = parser.parse_args()
    ensure_wrk()

    results: dict[str, Any] = {"machine": machine(), "load_before": load_average(), "scenarios": {}}
    print(f"Machine: {results['machine']}; load average {results['load_before']}")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.seconds:.0f}s per run; Parley: 1 uvicorn worker,")
    print("simulator provider, fresh SQLite database (WAL, synchronous=FULL), rate limit off.\n")

    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        work = Path(tmp)
        db = work / "parley.db"
        key = create_key(db)
        parley = Server.parley(work, free_port()).start()
        bare = Server.bare(work, free_port()).start()
        common = {"connections": args.connections, "seconds": args.seconds, "threads": args.threads}
        benv = {"BENCH_KEY": key, "BENCH_THREADS": str(args.threads)}
        try:
            # Warm both (imports, first queries, page cache) before measuring.
            for server in (bare, parley):
                wrk(server.base, "create.lua", connections=8, seconds=2, env={**benv, "BENCH_RUN": "9"})

            status, created = call("POST", f"{parley.base}/v1/sms-conversations", key, SEED_CREATE)
            assert status == 201, (status, created)
            conversation_id = created["data"]["conversationId"]

            header = (
                f"{'scenario':<28} {'bare r/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
                f" | {'parley':>8} {'p50 ms':>7} {'p99 ms':>7} {'errs':>5} | ratio"
            )
            print(header)
            print("-" * len(header))

            def scenario(name: str, script: str, env: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
                b, b_cost = measured(bare, script, env)
                p, p_cost = measured(parley, script, env)
                results["scenarios"][name] = {
                    "bare": b,
                    "parley": p,
                    "ratio": p["rps"] / b["rps"],
                    "cost": {"bare": b_cost, "parley": p_cost},
                }
                print(row(name, b, p), flush=True)
                return b, p

            def measured(server: Server, script: str, env: dict[str, str]) -> tuple[dict[str, Any], dict[str, float]]:
                """One wrk run, with the server's CPU time (all threads, and the event loop's alone) and bytes
                written per answered request, its length, and for Parley its write path's counters over the run
                (from /metrics)."""
                cpu, loop_cpu, written = server.cpu_seconds(), server.main_thread_cpu_seconds(), server.bytes_written()
                writes = write_path(server) if server is parley else {}
                started = time.perf_counter()
                result = wrk(server.base, script, env={**benv, **env}, **common)
                wall = time.perf_counter() - started
                answered = max(result["requests"], 1)
                loop_cpu = server.main_thread_cpu_seconds() - loop_cpu
                cost = {
                    "cpu_ms": (server.cpu_seconds() - cpu) * 1000 / answered,
                    "loop_cpu_ms": loop_cpu * 1000 / answered,
                    "loop_busy": loop_cpu / wall,
                    "written_kb": (server.bytes_written() - written) / 1024 / answered,
                    "seconds": wall,
                }
                if writes:
                    after = write_path(server)
                    cost["writes"] = {name: after[name] - value for name, value in writes.items()}
                return result, cost

            since = int(time.time() * 1000)
            _, unique = scenario("create (unique pairs)", "create.lua", {"BENCH_PAIR": "unique", "BENCH_RUN": "1"})
            created_rows = conversations_in(db, since)
            since = int(time.time() * 1000)
            _, fixed = scenario("create (one pair, supersede)", "create.lua", {"BENCH_PAIR": "fixed"})
            fixed_rows = conversations_in(db, since)
            scenario("get one conversation", "get.lua", {"BENCH_PATH": f"/v1/sms-conversations/{conversation_id}"})
            scenario("get its messages", "get.lua", {"BENCH_PATH": f"/v1/sms-conversations/{conversation_id}/messages"})
            ids_file = work / "close-ids.txt"
            open_ids = [cid for cid, st in created_rows if st == "in_progress"]
            ids_file.write_text("\n".join(open_ids) + "\n")
            _, closed = scenario("close", "close.lua", {"BENCH_IDS": str(ids_file)})
            time.sleep(1.0)  # let the simulator's delivery reports settle before reading memory
            rss, peak = parley.rss_mb(), parley.peak_rss_mb()
        finally:
            parley.stop()
            bare.stop()

    # Every acknowledged create must be in the database (wrk counts responses; status >= 400 are errors).
    durable = len(created_rows) >= unique["ok"] and len(fixed_rows) >= fixed["ok"]
    in_progress_fixed = sum(1 for _, st in fixed_rows if st == "in_progress")
    create = results["scenarios"]["create (unique pairs)"]
    results.update(
        rss_mb=rss,
        peak_rss_mb=peak,
        load_after=load_average(),
        durable=durable,
        close_fresh=closed["requests"] - closed["wrapped"],
    )
    print()
    print("Server cost per request: CPU of every thread (/proc/PID/stat), of the event loop's thread alone and how")
    print("busy that thread was over the run (/proc/PID/task/PID/stat), bytes to storage (/proc/PID/io):")
    print(
        f"{'scenario':<28} {'bare CPU ms':>11} {'loop busy':>9} | {'parley CPU ms':>13} {'loop ms':>7}"
        f" {'loop busy':>9} {'KB written':>10}"
    )
    for name, measured_run in results["scenarios"].items():
        bare_cost, ours = measured_run["cost"]["bare"], measured_run["cost"]["parley"]
        print(
            f"{name:<28} {bare_cost['cpu_ms']:>11.3f} {bare_cost['loop_busy']:>9.0%} | {ours['cpu_ms']:>13.3f}"
            f" {ours['loop_cpu_ms']:>7.3f} {ours['loop_busy']:>9.0%} {ours['written_kb']:>10.1f}"
        )
    print()
    print("Parley's write path per run (from /metrics): each group commit runs its writes on the event loop,")
    print("then waits for COMMIT on the writer thread; the wait is COMMIT itself plus the thread hand-offs.")
    print(
        f"{'scenario':<28} {'commits/s':>9} {'writes/commit':>13} {'run ms':>7} {'COMMIT ms':>9}"
        f" {'hand-off ms':>11} {'cycle ms':>8}"
    )
    for name, measured_run in results["scenarios"].items():
        w, seconds = measured_run["cost"]["parley"].get("writes"), measured_run["cost"]["parley"]["seconds"]
        if not w or w["batches"] < seconds:  # reads: only the odd housekeeping write
            continue
        batches = w["batches"]
        run_ms, commit_ms = w["run_seconds"] * 1000 / batches, w["commit_seconds"] * 1000 / batches
        wait_ms = w["commit_wait_seconds"] * 1000 / batches
        print(
            f"{name:<28} {batches / seconds:>9.0f} {w['jobs'] / batches:>13.1f} {run_ms:>7.2f} {commit_ms:>9.2f}"
            f" {wait_ms - commit_ms:>11.2f} {run_ms + wait_ms:>8.2f}"
        )
    print()
    print(
        f"Acknowledged creates found in the database: unique {len(created_rows)}/{unique['ok']} rows/201s,"
        f" supersede {len(fixed_rows)}/{fixed['ok']} ({in_progress_fixed} left in_progress)"
    )
    print(f"Close: {closed['requests'] - closed['wrapped']} first closes, {closed['wrapped']} repeats (already closed)")
    print(f"Parley RSS after the run: {rss:.1f} MB (peak {peak:.1f} MB)")
    print(f"Load average after: {results['load_after']}")
    print()
    checks = [
        (f"create >= {TARGET_RATIO:.2f} x bare req/s", create["ratio"] >= TARGET_RATIO, f"{create['ratio']:.2f}"),
        (
            f"create p99 <= {TARGET_P99_MS:.0f} ms",
            create["parley"]["p99_ms"] <= TARGET_P99_MS,
            f"{create['parley']['p99_ms']:.1f} ms",
        ),
        (f"RSS < {TARGET_RSS_MB:.0f} MB", peak < TARGET_RSS_MB, f"{peak:.1f} MB peak"),
        ("every 201 durable", durable, "yes" if durable else "NO"),
    ]
    for name, ok, value in checks:
        print(f"  [{'PASS' if ok else 'MISS'}] {name}: {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.skip_others:
        turnaround(args.seconds)
        run_other("webhooks_bench", args.seconds)  # prints its own ratio against the raw HTTP rate
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
