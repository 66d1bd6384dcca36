"""The application: wiring, lifespan (resources opened in order, closed in reverse) and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from litestar import Litestar, Request, Response, Router
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.status_codes import HTTP_404_NOT_FOUND

from app.api.agents import AgentController
from app.api.assistant import AssistantController
from app.api.conversations import ConversationController
from app.api.edge import Edge
from app.api.errors import EXCEPTION_HANDLERS
from app.api.events import EventController
from app.api.health import healthz, healthz_head, metrics, readyz, readyz_head
from app.api.keys import ApiKeyController
from app.api.providers import TwilioCallbackController
from app.api.simulator import SimulatorController
from app.api.webhooks import WebhookController
from app.clock import Clock, SystemClock
from app.config import Settings
from app.domain import agent_registry, compliance, conversations, housekeeping, inactivity, lifecycle, messaging
from app.domain.assistant import TURN_JOB, Assistant, schedule_turn
from app.domain.context import Context
from app.domain.errors import FieldProblem, ValidationFailed
from app.llm.client import ChatModel
from app.providers.base import Provider, StatusReport
from app.providers.simulator import SimulatorProvider
from app.providers.twilio import TwilioProvider
from app.scheduler import Scheduler
from app.store import conversations as conversations_store
from app.store import jobs as jobs_store
from app.store import webhooks as webhook_store
from app.store.db import Database
from app.webhooks.delivery import ENDPOINT_SLOTS as WEBHOOK_ENDPOINT_SLOTS
from app.webhooks.delivery import MAX_CONNECTIONS as WEBHOOK_MAX_CONNECTIONS
from app.webhooks.delivery import TIMEOUT_SECONDS as WEBHOOK_TIMEOUT_SECONDS
from app.webhooks.delivery import Dispatcher
from app.webhooks.guard import guarded_client

log = logging.getLogger("parley")

API_BODY_LIMIT = 1024 * 1024


def build_provider(settings: Settings) -> Provider:
    if settings.sms_provider == "simulator":
        return SimulatorProvider()
    if settings.sms_provider == "twilio":
        # Its httpx2 client is opened by `start()` and closed by `close()`, both in the lifespan.
        return TwilioProvider.from_settings(settings)
    raise RuntimeError(f"SMS provider {settings.sms_provider!r} is not available in this build")


async def _no_html_404(response: Response) -> Response:
    if response.status_code == HTTP_404_NOT_FOUND:
        raise NotFoundException()
    return response


async def _cancel(task: asyncio.Task[object]) -> None:
    """Stop a background task at shutdown (what it had not done is found again at the next start-up)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    provider: Provider | None = None,
) -> Edge:
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Every resource registers its clean-up as soon as it exists; they run in reverse order.
        async with AsyncExitStack() as stack:
            db = Database(settings.database)
            await db.open()
            stack.push_async_callback(db.close)
            now = clock.now_ms()
            await db.write(
                lambda c: agent_registry.sync_managed(c, settings.agents_file, now, settings.dotenv), long=True
            )
            sms = provider or build_provider(settings)
            scheduler = Scheduler(db, clock)
            ctx = Context(db=db, clock=clock, provider=sms, settings=settings, scheduler=scheduler)
            app.state.ctx = ctx

            # Webhooks (an outbox drained per endpoint) and inactivity timeouts, on the one scheduler.
            webhook_client = guarded_client(settings, WEBHOOK_TIMEOUT_SECONDS, max_connections=WEBHOOK_MAX_CONNECTIONS)
            stack.push_async_callback(webhook_client.aclose)
            dispatcher = Dispatcher(
                db,
                clock,
                webhook_client,
                schedule=settings.webhook_retry_schedule,
                crowded=lambda: scheduler.is_full(webhook_store.ENDPOINT_JOB),
            )
            ctx.webhooks = dispatcher
            loop = asyncio.get_running_loop()
            writer = db.writer_connection
            jobs_store.register_waker(writer, lambda: loop.call_soon_threadsafe(scheduler.wake))
            stack.callback(jobs_store.unregister_waker, writer)
            await db.write(lambda c: webhook_store.recover_leases(c, clock.now_ms()), long=True)
            await db.write(jobs_store.release_leases, long=True)  # turns and timers cut off by a stop or crash

            # The assistant: compliance keywords first, then the debounced turn.
            model = ChatModel(settings)
            stack.push_async_callback(model.close)
            assistant = Assistant(ctx, model)
            ctx.assistant = assistant
            ctx.inbound_effects = [compliance.on_inbound, schedule_turn]
            ctx.generate_opening = assistant.generate_opening

            scheduler.register(housekeeping.JOB, lambda job: housekeeping.run(ctx, job))
            scheduler.register(housekeeping.SWEEP_JOB, lambda job: housekeeping.sweep(ctx, job), concurrency=1)
            scheduler.register(webhook_store.ENDPOINT_JOB, dispatcher.run_endpoint, concurrency=WEBHOOK_ENDPOINT_SLOTS)
            scheduler.register(lifecycle.INACTIVITY_JOB, lambda job: inactivity.run(ctx, job))
            scheduler.register(TURN_JOB, assistant.run_job)

            async def on_status(reports: Sequence[StatusReport]) -> None:
                await messaging.record_reports(ctx, reports)

            await sms.start(on_status)
            stack.push_async_callback(sms.close)
            # After the provider starts: an interrupted opening is looked up at the provider.
            await conversations.recover_interrupted(ctx)
            # Read before any request is served: every one of these was cut off, none is a send of this process.
            unsent = await db.read(conversations_store.unsent_outbound)
            ctx.recovering.update(m.conversation_id for m in unsent if m.conversation_id is not None)
            await assistant.settle_interrupted_tool_calls()
            await db.write(lambda c: housekeeping.ensure_scheduled(c, clock.now_ms()))
            await scheduler.start()
            stack.push_async_callback(scheduler.stop)
            recovery = asyncio.create_task(messaging.recover_unsent(ctx, unsent))
            stack.push_async_callback(_cancel, recovery)
            stack.callback(dispatcher.stop_claiming)
            yield

    openapi = OpenAPIConfig(
        # Litestar answers an unknown /schema/… path with an HTML page of its own: ours is the envelope.
        openapi_router=Router("/schema", route_handlers=[], include_in_schema=False, after_request=_no_html_404),
        title="Parley",
        version="0.1.0",
        description="Self-hosted AI SMS conversations, wire-compatible with the PAM SMS Conversations API.",
        path="/schema",
        render_plugins=[ScalarRenderPlugin()],
        components=Components(
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")},
        ),
    )
    keyed_routes = Router(
        path="/",
        route_handlers=[
            ConversationController,
            ApiKeyController,
            WebhookController,
            EventController,
            AgentController,
            AssistantController,
            *([SimulatorController] if settings.sms_provider == "simulator" else []),
        ],
        security=[{"bearer": []}],
        before_request=_query_rules,
    )
    litestar_app = Litestar(
        route_handlers=[
            keyed_routes,
            # Twilio's callbacks exist only in twilio mode (they need its auth token to verify).
            *([TwilioCallbackController] if settings.sms_provider == "twilio" else []),
            healthz,
            healthz_head,
            readyz,
            readyz_head,
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


async def _query_rules(request: Request) -> None:
    """`?type=a&type=b` is refused, not read as its last value (a client meaning "either" would get only one); a
    `limit` is written in digits."""
    if request.scope.get("query_string"):
        names = [name for name, _ in request.query_params.multi_items()]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise ValidationFailed.of([FieldProblem(name, "is given more than once") for name in repeated])
        # Litestar reads an int leniently (`1e1`, `10.0` as 10): a page size is written as digits, with no leading
        # zero (`05` got msgspec's "Expected `int`, got `str`"; `0` itself is left to the 1-100 bound).
        limit = request.query_params.get("limit")
        if limit is not None and not _digits(limit) and _reads_limit(request):
            raise ValidationFailed.of([FieldProblem("limit", "must be a whole number written in digits (1-100)")])


def _digits(value: str) -> bool:
    return value.isascii() and value.isdigit() and (value == "0" or value[0] != "0")


def _reads_limit(request: Request) -> bool:
    return "limit" in request.route_handler.parsed_fn_signature.parameters
