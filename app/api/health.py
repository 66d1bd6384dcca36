"""Liveness, readiness and metrics."""

from __future__ import annotations

import sqlite3

from litestar import Request, Response, get, head

from app.api import requests as rq


@get("/healthz", tags=["Operations"], summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@head("/healthz", tags=["Operations"], summary="Alive (headers only, for probes that send HEAD)")
async def healthz_head() -> None:
    return None


@get("/readyz", tags=["Operations"], summary="Database writable and scheduler running")
async def readyz(request: Request) -> Response[dict[str, str]]:
    readiness = await _readiness(request)
    return Response(readiness, status_code=200 if readiness["status"] == "ready" else 503)


@head("/readyz", tags=["Operations"], summary="Readiness as a status code only (200 or 503), for probes that send HEAD")
async def readyz_head(request: Request) -> Response[None]:
    readiness = await _readiness(request)
    return Response(None, status_code=200 if readiness["status"] == "ready" else 503)


async def _readiness(request: Request) -> dict[str, str]:
    ctx = rq.context(request)
    now_ms = ctx.clock.now_ms()

    def probe(conn: sqlite3.Connection) -> None:  # committed to the database file's WAL, with fsync, like any write
        conn.execute(
            "INSERT INTO readiness (id, checked_at) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            (now_ms,),
        )

    try:
        await ctx.db.write(probe)
        database = "ok"
    except Exception:
        database = "failing"
    scheduler = "ok" if ctx.scheduler.running else "stopped"
    ready = database == "ok" and scheduler == "ok"
    return {"status": "ready" if ready else "not_ready", "database": database, "scheduler": scheduler}


@get("/metrics", tags=["Operations"], summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request) -> str:
    ctx = rq.context(request)
    edge = request.app.state.edge
    lines = ["# TYPE parley_http_requests_total counter"]
    for (method, status), count in sorted(edge.metrics.items()):
        lines.append(f'parley_http_requests_total{{method="{method}",status="{status}"}} {count}')

    def counts(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
        rows = conn.execute("SELECT status, COUNT(*) FROM conversations GROUP BY status").fetchall()
        jobs = conn.execute("SELECT kind, COUNT(*) FROM jobs GROUP BY kind").fetchall()
        return [("conversations", r[0], r[1]) for r in rows] + [("jobs", r[0], r[1]) for r in jobs]

    rows = await ctx.db.read(counts)
    for family, key in (("conversations", "status"), ("jobs", "kind")):  # each family's lines in one group
        lines.append(f"# TYPE parley_{family} gauge")
        lines.extend(f'parley_{family}{{{key}="{label}"}} {count}' for name, label, count in rows if name == family)
    write = ctx.db.stats
    for name, value, help_text in (
        ("batches_total", write.batches, "write transactions (group commits)"),
        ("jobs_total", write.jobs, "writes they carried"),
        ("run_seconds_total", write.run_seconds, "event loop time running the writes"),
        ("commit_seconds_total", write.commit_seconds, "time in COMMIT (WAL write and fsync)"),
        ("commit_wait_seconds_total", write.commit_wait_seconds, "from handing COMMIT over to the writers' answers"),
    ):
        lines.append(f"# HELP parley_db_write_{name} {help_text}")
        lines.append(f"# TYPE parley_db_write_{name} counter")
        lines.append(f"parley_db_write_{name} {value}")
    lines.append("# TYPE parley_scheduler_ticks_total counter")
    lines.append(f"parley_scheduler_ticks_total {ctx.scheduler.ticks}")
    return "\n".join(lines) + "\n"
