"""What services share: the database, the clock, the SMS provider, settings and the scheduler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.clock import Clock
from app.config import Settings
from app.domain.ttl_cache import TtlCache
from app.providers.base import Provider
from app.scheduler import Scheduler
from app.store.db import Database

if TYPE_CHECKING:
    from app.domain.agents import Agent
    from app.domain.assistant import Assistant
    from app.domain.inbound import InboundEffect
    from app.webhooks.delivery import Dispatcher

# Writes a conversation's first SMS with the model: (agent, dynamic variables) -> text.
OpeningWriter = Callable[["Agent", dict[str, str]], Awaitable[str]]


@dataclass
class Context:
    db: Database
    clock: Clock
    provider: Provider
    settings: Settings
    scheduler: Scheduler
    # Wired by the app's lifespan; each is absent in a bare Context (some tests).
    inbound_effects: list[InboundEffect] = field(default_factory=list)
    generate_opening: OpeningWriter | None = None
    assistant: Assistant | None = None
    webhooks: Dispatcher | None = None
    # The agents creates name, by ("slug", slug) or ("id", agent id, org id): every create reads one.
    agents: TtlCache[tuple[str, ...], Agent] = field(default_factory=TtlCache)
    # Conversations with an outbound SMS a stop or crash cut off, not yet settled by `messaging.recover_unsent`:
    # their turns wait, so the model is not shown a reply that may turn out never to have been sent.
    recovering: set[str] = field(default_factory=set)
    # The outbound messages this process is sending, and the conversations whose create it is carrying out, by id,
    # until the outcome is written (`messaging.in_flight`). Housekeeping's sweep of stalled sends and creates leaves
    # them alone however old they look: a wall clock that steps forward, a send queued behind identical ones at a
    # slow provider, or a model slow to write an opening makes live work look stalled.
    sending: set[str] = field(default_factory=set)

    def status_callback_url(self, message_id: str) -> str:
        return f"{self.settings.public_url}/v1/providers/{self.provider.name}/status?messageId={message_id}"
