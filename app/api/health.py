"""Liveness, readiness and metrics."""

from __future__ import annotations

import sqlite3

from litestar import Request, Response, get, head
from litestar.openapi.datastructures import ResponseSpec

from app.api import requests as rq
from app.api.errors import error_bytes
from app.api.schemas import ErrorDetail, ErrorEnvelope

ALIVE = b'{"status":"ok"}'


@get("/healthz", tags=["Operations"], summary="Alive")
async def healthz() -> Response[dict[str, str]]:
    return Response(ALIVE, media_type="application/json")  # type: ignore[arg-type]


@head("/healthz", tags=["Operations"], summary="Alive (headers only, for probes that send HEAD)")
async def healthz_head() -> Response[None]:
    # The GET's answer: Litestar sends its headers (Content-Length included, as HTTP asks) and no body.
    return Response(ALIVE, media_type="application/json")  # type: ignore[arg-type]


@get(
    "/readyz",
    tags=["Operations"],
    summary="Database writable and scheduler running (503 in the error envelope, naming what fails)",
    responses={503: ResponseSpec(data_container=ErrorEnvelope, description="not ready", generate_examples=False)},
)
async def readyz(request: Request) -> Response[dict[str, str]]:
    return await _answer(request)


@head(
    "/readyz",
    tags=["Operations"],
    summary="Readiness as a status code only (200 or 503), for probes that send HEAD",
    responses={503: ResponseSpec(data_container=ErrorEnvelope, description="not ready", generate_examples=False)},
)
async def readyz_head(request: Request) -> Response[None]:
    return await _answer(request)  # type: ignore[return-value]


async def _answer(request: Request) -> Response[dict[str, str]]:
    readiness = await _readiness(request)
    if readiness["status"] == "ready":
        return Response(readiness)
    # Not ready is an error like any other non-2xx (SPEC §1): the envelope, with what fails in its details.
    failing = [
        ErrorDetail(field=part, message=readiness[part])
        for part in ("database", "scheduler")
        if readiness[part] != "ok"
    ]
    message = "Not ready: " + ", ".join(f"the {d.field} is {d.message}" for d in failing) + "."
    body = error_bytes(503, "service_unavailable", message, rq.request_id(request), details=failing)
    return Response(body, status_code=503, media_type="application/json")  # type: ignore[arg-type]


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
