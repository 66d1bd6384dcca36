"""Sender numbers: each belongs to the organization that first sends from it or gives it to a custom agent, so
a pair (our number, the customer's) never spans organizations: supersede, inbound routing and STOP stay
within the organization that owns the number."""

from __future__ import annotations

import sqlite3

from app.domain.errors import ValidationFailed
from app.store import sender_numbers


def ensure_own(conn: sqlite3.Connection, org_id: str, number: str, now_ms: int, *, field: str) -> None:
    """Take `number` for `org_id` if nobody has it yet; refuse it (400 on `field`) if another organization does."""
    if sender_numbers.claim(conn, number, org_id, now_ms) != org_id:
        raise ValidationFailed.field(
            field, "is another organization's number (a number belongs to the first organization to send from it)"
        )
