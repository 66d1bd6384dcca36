"""The application: wiring, lifespan (resources opened in order, closed in reverse) and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from app.api.agents import AgentController
from app.api.conversations import ConversationController
from app.api.edge import Edge
from app.api.errors import EXCEPTION_HANDLERS
from app.api.health import healthz, metrics, readyz
from app.api.keys import ApiKeyController
from app.api.schemas import REQUEST_SCHEMAS
from app.api.simulator import SimulatorController
from app.clock import Clock, SystemClock
from app.config import Settings
from app.domain import agent_registry, conversations, housekeeping, messaging
from app.domain.context import Context
from app.providers.base import Provider, StatusReport
from app.providers.simulator import SimulatorProvider
from app.scheduler import Scheduler
from app.store.db import Database

log = logging.getLogger("parley")

API_BODY_LIMIT = 1024 * 1024


def build_provider(settings: Settings) -> Provider:
    if settings.sms_provider == "simulator":
        return SimulatorProvider()
    raise RuntimeError(f"SMS provider {settings.sms_provider!r} is not available in this build")


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    provider: Provider | None = None,
) -> Edge:
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        db = Database(settings.database)
        await db.open()
        try:
            now = clock.now_ms()
            await db.write(lambda c: agent_registry.sync_managed(c, settings.agents_file, now))
            sms = provider or build_provider(settings)
            scheduler = Scheduler(db, clock)
            ctx = Context(db=db, clock=clock, provider=sms, settings=settings, scheduler=scheduler)
            app.state.ctx = ctx

            async def on_status(report: StatusReport) -> None:
                await db.write(lambda c: messaging.apply_report(c, report, sms.name, clock.now_ms()))

            async def run_housekeeping(job):  # type: ignore[no-untyped-def]
                return await housekeeping.run(ctx, job)

            scheduler.register(housekeeping.JOB, run_housekeeping)
            await conversations.recover_pending(ctx)
            await db.write(lambda c: housekeeping.ensure_scheduled(c, clock.now_ms()))
            await sms.start(on_status)
            await scheduler.start()
            try:
                yield
            finally:
                await scheduler.stop()
                await sms.close()
        finally:
            await db.close()

    openapi = OpenAPIConfig(
        title="Parley",
        version="0.1.0",
        description="Self-hosted AI SMS conversations, wire-compatible with the PAM SMS Conversations API.",
        path="/schema",
        render_plugins=[ScalarRenderPlugin()],
        components=Components(
            schemas=REQUEST_SCHEMAS,  # type: ignore[arg-type]
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")},
        ),
        security=[{"bearer": []}],
    )
    litestar_app = Litestar(
        route_handlers=[
            ConversationController,
            ApiKeyController,
            AgentController,
            *([SimulatorController] if settings.sms_provider == "simulator" else []),
            healthz,
            readyz,
            metrics,
        ],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=openapi,
        request_max_body_size=API_BODY_LIMIT,
        logging_config=None,
        debug=False,
    )
    edge = Edge(litestar_app, settings.rate_limit)
    litestar_app.state.edge = edge
    return edge
