"""The records services work with, as the store returns them."""

from __future__ import annotations

from typing import Any

import msgspec

from app.domain.events import EventScope

OPEN_STATUSES = ("pending", "in_progress")


class Media(msgspec.Struct, frozen=True, rename="camel"):
    """One attachment of an inbound MMS: where the provider keeps it, and its MIME type."""

    url: str
    content_type: str


class Conversation(msgspec.Struct, kw_only=True):
    id: str
    org_id: str
    agent_id: str
    status: str
    from_number: str
    to_number: str
    dynamic_variables: dict[str, str]
    metadata: dict[str, Any]
    inactivity_timeout_seconds: int
    created_at: int
    last_activity_at: int
    ended_at: int | None
    end_reason: str | None
    superseded_by: str | None
    assistant_paused: bool
    message_count: int

    @property
    def scope(self) -> EventScope:
        return EventScope(org_id=self.org_id, conversation_id=self.id, agent_id=self.agent_id, metadata=self.metadata)


class Message(msgspec.Struct, kw_only=True):
    id: str
    conversation_id: str | None
    org_id: str | None
    seq: int | None
    direction: str
    author: str
    from_number: str
    to_number: str
    content: str
    status: str
    provider: str
    encoding: str
    segments: int
    created_at: int
    provider_message_id: str | None = None
    error_code: str | None = None
    sent_at: int | None = None
    delivered_at: int | None = None
    keyword: str | None = None  # inbound: the compliance action it was acted on as (`compliance.Action` value)
    media: tuple[Media, ...] = ()  # inbound: an MMS's attachments

    @property
    def sent_time(self) -> int | None:
        """`sentAt` as events and reads show it: when the provider took an outbound message; an inbound one's
        when it reached Parley (providers do not say when the phone sent it)."""
        return self.sent_at if self.direction == "outbound" else self.created_at
