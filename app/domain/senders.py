"""Sender numbers: each belongs to the organization that first sends from it or gives it to a custom agent, so
a pair (our number, the customer's) never spans organizations: supersede, inbound routing and STOP stay
within the organization that owns the number.

A claim becomes permanent with the owner's first send the provider takes. Until then it lasts only while
something holds it: a claim made by a create the provider refused (or whose opening the model could not
write), or by a custom agent deleted or renumbered before any send from the number, is given back, so one
organization cannot keep another's number by naming it without ever sending from it (`sender_numbers.mark_sent`
and `sender_numbers.release_unused`)."""

from __future__ import annotations

import sqlite3

from app.domain.errors import ValidationFailed
from app.store import sender_numbers


def ensure_own(conn: sqlite3.Connection, org_id: str, number: str, now_ms: int, *, field: str) -> bool:
    """Take `number` for `org_id` if nobody has it yet; refuse it (400 on `field`) if another organization does.
    Return whether the organization has already sent from it (its claim is permanent)."""
    owner, sent = sender_numbers.claim(conn, number, org_id, now_ms)
    if owner != org_id:
        raise ValidationFailed.field(
            field, "is another organization's number (a number belongs to the first organization to send from it)"
        )
    return sent
