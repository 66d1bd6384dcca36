"""Profile one Parley route under wrk load with py-spy (investigation aid, not part of `make bench`).

    .venv/bin/pip install py-spy        # once; not a project dependency
    .venv/bin/python bench/profile.py [--scenario create|get|close] [--seconds 10]

Prints the busiest functions by self and inclusive time, per thread (the event loop vs the SQLite
writer/reader threads), and leaves the collapsed stacks (flamegraph input) in the temp dir it names.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, Server, call, create_key, free_port, load_average, wrk
from tests.seed import SEED_CREATE


def summarize(raw: Path, top: int) -> None:
    self_by: collections.Counter[str] = collections.Counter()
    incl_by: collections.Counter[str] = collections.Counter()
    per_thread: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        total += count
        per_thread[thread.split(" ")[0] + " " + (thread.split('"')[1] if '"' in thread else thread)] += count
        names = [f.split(" (")[0] + " (" + f.split("(")[-1].split(":")[0].split("/")[-1] + ")" for f in frames[1:]]
        if names:
            self_by[names[-1]] += count
        for name in set(names):
            incl_by[name] += count
    print(f"{total} samples")
    print("\nby thread:")
    for name, count in per_thread.most_common():
        print(f"  {100 * count / total:5.1f}%  {name}")
    print(f"\ntop {top} by self time:")
    for name, count in self_by.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {name}")
    print(f"\ntop {top} by inclusive time:")
    for name, count in incl_by.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {name}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=["create", "get", "close"], default="create")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is missing: .venv/bin/pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="parley-profile-"))
    key = create_key(work / "parley.db")
    server = Server.parley(work, free_port()).start()
    try:
        status, created = call("POST", f"{server.base}/v1/sms-conversations", key, SEED_CREATE)
        assert status == 201
        cid = created["data"]["conversationId"]
        env = {"BENCH_KEY": key, "BENCH_PAIR": "unique", "BENCH_RUN": "1"}
        script = {"create": "create.lua", "get": "get.lua", "close": "close.lua"}[args.scenario]
        if args.scenario == "get":
            env["BENCH_PATH"] = f"/v1/sms-conversations/{cid}"
        if args.scenario == "close":
            wrk(server.base, "create.lua", seconds=args.seconds + 4, env={**env, "BENCH_RUN": "2"})
            import sqlite3

            conn = sqlite3.connect(work / "parley.db")
            ids = [r[0] for r in conn.execute("SELECT id FROM conversations WHERE status = 'in_progress'")]
            conn.close()
            (work / "ids.txt").write_text("\n".join(ids) + "\n")
            env["BENCH_IDS"] = str(work / "ids.txt")
        wrk(server.base, script, seconds=2, env={**env, "BENCH_RUN": "3"})  # warm up
        raw = work / "stacks.txt"
        result: dict = {}
        load = threading.Thread(
            target=lambda: result.update(wrk(server.base, script, seconds=args.seconds + 2, env=env))
        )
        load.start()
        subprocess.run(
            [
                spy,
                "record",
                "-p",
                str(server.pid),
                "-d",
                str(args.seconds),
                "-r",
                "250",
                "--threads",
                "--format",
                "raw",
                "-o",
                str(raw),
                *(["--gil"] if args.gil else []),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        load.join()
        print(
            f"{args.scenario}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
            f" under py-spy (load {load_average()})"
        )
        summarize(raw, args.top)
        print(f"\ncollapsed stacks: {raw}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
