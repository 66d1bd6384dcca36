import sqlite3

from tests.conftest import Harness
from tests.seed import SEED_CREATE


async def test_seed_create_request_answers_201_with_the_exact_envelope(harness: Harness) -> None:
    response = await harness.post("/v1/sms-conversations", SEED_CREATE)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"data", "meta"}
    assert set(body["data"]) == {"conversationId", "providerMessageId", "status"}
    assert body["data"]["status"] == "in_progress"
    assert body["data"]["providerMessageId"].startswith("SM")
    assert body["meta"] == {"request_id": response.headers["x-request-id"]}


async def test_health_and_readiness_answer_get_and_head(harness: Harness) -> None:
    """Load balancers and uptime probes often send HEAD: it answers the GET's status with no body."""
    got = await harness.client.get("/healthz")
    assert got.json() == {"status": "ok"}
    alive = await harness.client.head("/healthz")
    assert (alive.status_code, alive.content) == (200, b"")
    assert alive.headers["content-length"] == got.headers["content-length"]  # as HTTP asks of a HEAD
    ready = await harness.client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "database": "ok", "scheduler": "ok"})
    assert (await harness.client.head("/readyz")).status_code == 200

    await harness.ctx.scheduler.stop()
    stopped = await harness.client.get("/readyz")
    assert stopped.status_code == 503
    error = stopped.json()["error"]  # the envelope of every non-2xx answer (SPEC §1)
    assert error["code"] == "service_unavailable" and "scheduler" in error["message"]
    assert error["details"] == [{"field": "scheduler", "message": "stopped"}]
    assert stopped.json()["meta"]["request_id"] == stopped.headers["x-request-id"]
    not_ready = await harness.client.head("/readyz")
    assert (not_ready.status_code, not_ready.content) == (503, b"")
    schema = (await harness.client.get("/schema/openapi.json")).json()["paths"]["/readyz"]
    assert {"200", "503"} <= set(schema["get"]["responses"]) and {"200", "503"} <= set(schema["head"]["responses"])


async def test_readiness_commits_a_write_to_the_database_file_and_fails_when_it_cannot(harness: Harness) -> None:
    """ "Database writable" means the file takes a commit (not a TEMP table outside it, which a full disk or a
    read-only file never fails)."""
    assert (await harness.client.get("/readyz")).status_code == 200
    other = sqlite3.connect(harness.settings.database)  # another connection: sees only what reached the file
    assert other.execute("SELECT count(*) FROM readiness").fetchone() == (1,)
    other.close()

    harness.ctx.db.writer_connection.execute("PRAGMA query_only = ON")  # the file refuses every write
    try:
        failing = await harness.client.get("/readyz")
        assert failing.status_code == 503
        assert failing.json()["error"]["details"] == [{"field": "database", "message": "failing"}]
    finally:
        harness.ctx.db.writer_connection.execute("PRAGMA query_only = OFF")
    assert (await harness.client.get("/readyz")).status_code == 200
