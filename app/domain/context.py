"""What services share: the database, the clock, the SMS provider, settings and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.clock import Clock
from app.config import Settings
from app.providers.base import Provider
from app.scheduler import Scheduler
from app.store.db import Database


@dataclass
class Context:
    db: Database
    clock: Clock
    provider: Provider
    settings: Settings
    scheduler: Scheduler
    extras: dict[str, object] = field(default_factory=dict)

    def status_callback_url(self, message_id: str) -> str:
        return f"{self.settings.public_url}/v1/providers/{self.provider.name}/status?messageId={message_id}"
