"""Sender numbers and the organization each belongs to: the first to send from a number owns it."""

from __future__ import annotations

import sqlite3


def claim(conn: sqlite3.Connection, number: str, org_id: str, now_ms: int) -> tuple[str, bool]:
    """Make `number` `org_id`'s unless an organization owns it already; return its owner and whether the owner has
    sent from it (one point read once the number has one)."""
    row = conn.execute("SELECT org_id, sent_at FROM sender_numbers WHERE number = ?", (number,)).fetchone()
    if row is not None:
        return row[0], row[1] is not None
    # An unowned number another organization still has a conversation open from (one several organizations
    # shared before migration 0010): not taken while it does, or this one's creates would supersede that one's
    # conversations and receive its customers' replies. (On the partial index of open conversations.)
    other = conn.execute(
        "SELECT org_id FROM conversations WHERE from_number = ? AND status = 'in_progress' AND org_id != ? LIMIT 1",
        (number, org_id),
    ).fetchone()
    if other is not None:
        return other[0], False
    conn.execute("INSERT INTO sender_numbers (number, org_id, created_at) VALUES (?, ?, ?)", (number, org_id, now_ms))
    return org_id, False


def mark_sent(conn: sqlite3.Connection, number: str, org_id: str, now_ms: int) -> None:
    """The owner sent from `number` (or may have: the provider could not say): its claim is for good. Only a claim
    the organization holds is marked; none is made here (a claim is made, with its checks, by `claim`)."""
    conn.execute(
        "UPDATE sender_numbers SET sent_at = ? WHERE number = ? AND org_id = ? AND sent_at IS NULL",
        (now_ms, number, org_id),
    )


# Far longer than a send takes: one Twilio send ~90 s at worst (its timeouts and a look-up after a lost answer), and
# identical texts to one customer queue behind each other's lock.
IN_FLIGHT_WINDOW_MS = 30 * 60_000


def release_unused(conn: sqlite3.Connection, number: str, org_id: str, now_ms: int) -> None:
    """Give back `org_id`'s claim on `number` when it never sent from it and nothing of its own holds it: no live
    custom agent has it as its number, and no message of its own from it is on its way to the provider (queued,
    not yet taken: a create in flight, even one whose conversation an operator closed meanwhile). A send in
    flight is recent: only the last IN_FLIGHT_WINDOW_MS of unfinished messages are read (a message still `queued`
    from before then was cut off by a stop, and start-up settles it), so the look-up does not grow with messages
    a carrier never reported on."""
    conn.execute(
        "DELETE FROM sender_numbers WHERE number = ?1 AND org_id = ?2 AND sent_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM agents WHERE org_id = ?2 AND kind = 'custom' AND deleted_at IS NULL"
        " AND json_extract(config, '$.phoneNumber') = ?1)"
        # On the unfinished-messages index, by its key (its condition spelled out so that SQLite uses it).
        " AND NOT EXISTS (SELECT 1 FROM messages WHERE status IN ('queued', 'sent') AND updated_at >= ?3"
        " AND status = 'queued' AND provider_message_id IS NULL AND direction = 'outbound' AND org_id = ?2"
        " AND from_number = ?1)",
        (number, org_id, now_ms - IN_FLIGHT_WINDOW_MS),
    )
