"""The event catalogue and the PAM webhook envelope every event is delivered in."""

from __future__ import annotations

from typing import Any

import msgspec

from app.clock import iso

EVENT_TYPES = (
    "sms.message_sent",
    "sms.message_received",
    "sms.message_delivery_updated",
    "sms.tool_call_invocation",
    "sms.tool_call_result",
    "contact.opt_out",
    "contact.opt_in",
    "sms.conversation_closed",
    "sms.handoff_requested",
    "sms.assistant_error",
)

_encoder = msgspec.json.Encoder()


class EventScope(msgspec.Struct, frozen=True, kw_only=True):
    """Who an event is about: the org, and the conversation when there is one."""

    org_id: str
    conversation_id: str | None = None
    agent_id: str | None = None
    # Raw: the conversation's stored JSON, copied into the envelope as it is (no decode and re-encode).
    metadata: dict[str, Any] | msgspec.Raw = {}


def envelope(
    *,
    event_id: str,
    event_type: str,
    scope: EventScope,
    sequence: int | None,
    now_ms: int,
    data: dict[str, Any],
) -> bytes:
    """The exact bytes delivered to webhooks and returned by GET /v1/events."""
    return _encoder.encode(
        {
            "id": event_id,
            "event": event_type,
            "timestamp": iso(now_ms),
            "conversationId": scope.conversation_id,
            "agentId": scope.agent_id,
            "clientOrgId": scope.org_id,
            "channel": "sms",
            "sequence": sequence,
            "metadata": scope.metadata,
            "data": data,
        }
    )
