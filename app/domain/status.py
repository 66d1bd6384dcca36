"""The canonical delivery-status lattice and the mapping from provider statuses into it."""

from __future__ import annotations

RANK = {"queued": 0, "sent": 1, "delivered": 2, "undelivered": 2, "failed": 2}
TERMINAL = frozenset({"delivered", "undelivered", "failed"})
# Outbound statuses of a message known not to have reached the phone: the model's history leaves such messages out,
# and an operator's is no answer to the customer.
UNSENT = frozenset({"failed", "undelivered"})

TWILIO_TO_CANONICAL = {
    "accepted": "queued",
    "scheduled": "queued",
    "queued": "queued",
    "sending": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "failed",
    "canceled": "failed",
}


def canonical(provider_status: str) -> str | None:
    """The canonical status for a provider (Twilio-vocabulary) status; None when unknown."""
    return TWILIO_TO_CANONICAL.get(provider_status.strip().lower())


def advance(current: str, incoming: str) -> str | None:
    """The new status when `incoming` may replace `current`, else None.

    Only a strictly higher rank moves a message; a terminal status never changes again.
    """
    if current in TERMINAL:
        return None
    if RANK[incoming] > RANK[current]:
        return incoming
    return None
