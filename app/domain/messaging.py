"""Outbound messages (persist, send, record) and provider status reports on them."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec

from app.clock import iso
from app.domain import lifecycle, status
from app.domain.context import Context
from app.domain.errors import Conflict, NotFound, ProviderFailed
from app.domain.ids import new_id
from app.domain.models import Conversation, Message
from app.domain.segments import count_segments
from app.providers.base import (
    OUTCOME_UNKNOWN,
    SEND_FAILED,
    ProviderRejected,
    SendAccepted,
    SendOutcomeUnknown,
    SendRequest,
    StatusReport,
)
from app.store import conversations as store
from app.store import events, opt_outs, sender_numbers

log = logging.getLogger("parley.messaging")
_raw = msgspec.json.Encoder()

# Provider ids recorded this long before a message are not its own, for a look-up after its send's answer was lost
# (a provider's list may hold an identical text sent to the pair before: a HELP answered twice, a confirmation). Wide:
# an identical text may have waited at the provider's door (a lock, retries) well after its row was written.
LOOKUP_WINDOW_MS = 2 * 60 * 60 * 1000
# A message whose send a stop or crash cut off, which the provider says it never took.
INTERRUPTED = ProviderRejected("parley_interrupted", "the server stopped before the send completed")
# Start-up recovery asks a provider that could not say whether it took a message again after these waits
# (seconds), so a passing outage does not settle the message as `provider_outcome_unknown`.
RECOVERY_WAITS = (5.0, 30.0, 120.0)
# A send whose outcome could not be written (the write failed: a full disk, another process holding the database past
# the busy timeout) left its message `queued` with no provider id until a restart. Housekeeping settles one this old
# as start-up would. A send takes minutes at most (Twilio: four POSTs and, after each unanswered one, a look-up, each
# bounded at 30 s: about 4.3 minutes), but may wait behind identical sends and the wall clock may step: what keeps a
# send of this process from being settled underneath it is `ctx.sending`, not its age.
STALLED_AFTER_MS = 10 * 60_000


def new_outbound(
    conversation: Conversation, content: str, author: str, now_ms: int, provider: str, *, seq: int | None = None
) -> Message:
    """A queued outbound message; `seq` stays None until `insert_outbound` numbers it, unless known already."""
    encoding, segments = count_segments(content)
    return Message(
        id=new_id(),
        conversation_id=conversation.id,
        org_id=conversation.org_id,
        seq=seq,
        direction="outbound",
        author=author,
        from_number=conversation.from_number,
        to_number=conversation.to_number,
        content=content,
        status="queued",
        provider=provider,
        encoding=encoding,
        segments=segments,
        created_at=now_ms,
    )


def insert_outbound(conn: sqlite3.Connection, message: Message) -> Message:
    """Persist a queued outbound message with the conversation's next sequence number."""
    assert message.conversation_id is not None
    seq = store.next_message_seq(conn, message.conversation_id)
    stored = msgspec.structs.replace(message, seq=seq)
    store.insert_message(conn, stored)
    return stored


def message_data(message: Message, **extra: Any) -> dict[str, Any]:
    """The `data` of message events (PAM field names)."""
    data = {
        "messageId": message.id,
        "sequenceNumber": message.seq,
        "from": message.from_number,
        "to": message.to_number,
        "content": message.content,
        "direction": message.direction,
        "author": message.author,
        "sentAt": iso(message.sent_time),
        "providerMessageId": message.provider_message_id,
        "status": message.status,
        "segments": message.segments,
        "encoding": message.encoding,
    }
    if message.media:
        data["media"] = message.media  # an MMS's attachments (inbound only), [{"url", "contentType"}]
    data.update(extra)
    return data


def record_accepted(
    conn: sqlite3.Connection,
    conversation: Conversation,
    message: Message,
    accepted: SendAccepted,
    now_ms: int,
    *,
    sequence: int | None = None,
) -> Message:
    """The provider took the message: store its id and emit `sms.message_sent` (with `sequence` when the
    caller already took the event's sequence number). An answer that already says more than `queued` (`sent`,
    or a failure with its code) is then a change of status like a report's: `sms.message_delivery_updated`."""
    # A status callback may overtake the send's own answer (it names our message id): never move back.
    base, sent_at = store.set_provider_id(conn, message.id, accepted.provider_message_id, now_ms, now_ms) or (
        "queued",
        now_ms,
    )
    sent = msgspec.structs.replace(
        message, provider_message_id=accepted.provider_message_id, status=base, sent_at=sent_at
    )
    events.append(conn, "sms.message_sent", conversation.scope, message_data(sent), now_ms, sequence=sequence)
    final = status.advance(base, status.canonical(accepted.provider_status) or "queued")
    if final is None:
        return sent
    step = _status_step(final, accepted.error_code, now_ms)
    store.update_message(conn, message.id, now_ms, **step)
    changed = msgspec.structs.replace(sent, **step)
    data = message_data(changed, previousStatus=base, errorCode=changed.error_code)
    events.append(conn, "sms.message_delivery_updated", conversation.scope, data, now_ms)
    lifecycle.note_status(conn, sent, final, now_ms)
    return changed


def _status_step(new_status: str, error_code: str | None, now_ms: int) -> dict[str, Any]:
    """The message's fields a move to `new_status` sets: when it was delivered, or a failure's error code."""
    step: dict[str, Any] = {"status": new_status}
    if new_status == "delivered":
        step["delivered_at"] = now_ms
    if new_status in {"undelivered", "failed"} and error_code:
        step["error_code"] = error_code
    return step


def record_rejected(
    conn: sqlite3.Connection,
    conversation: Conversation,
    message: Message,
    rejected: ProviderRejected,
    now_ms: int,
) -> Message:
    """The provider refused the message: it is `failed`, with the provider's code kept."""
    current = store.get_message(conn, message.id)
    if current is not None and current.status != "queued":
        return current  # already settled (e.g. by start-up recovery)
    failed = msgspec.structs.replace(message, status="failed", error_code=rejected.code)
    store.update_message(conn, message.id, now_ms, status="failed", error_code=rejected.code)
    events.append(
        conn,
        "sms.message_delivery_updated",
        conversation.scope,
        message_data(failed, previousStatus="queued", errorCode=rejected.code),
        now_ms,
    )
    lifecycle.note_status(conn, message, "failed", now_ms)
    return failed


def ensure_sendable(conn: sqlite3.Connection, conversation_id: str, org_id: str) -> Conversation:
    conversation = store.get(conn, conversation_id, org_id)
    if conversation is None:
        raise NotFound("Conversation not found.")
    lifecycle.ensure_in_progress(conversation, "The conversation is closed; no message can be sent in it.")
    if opt_outs.contains(conn, conversation.org_id, conversation.from_number, conversation.to_number):
        raise Conflict("recipient_opted_out", "The recipient has opted out of messages from this number.")
    return conversation


async def send_in_conversation(ctx: Context, conversation_id: str, org_id: str, content: str, author: str) -> Message:
    """Send one SMS in an in-progress conversation: persisted first, then handed to the provider."""

    def persist(conn: sqlite3.Connection) -> tuple[Conversation, Message]:
        conversation = ensure_sendable(conn, conversation_id, org_id)
        now = ctx.clock.now_ms()
        message = insert_outbound(conn, new_outbound(conversation, content, author, now, ctx.provider.name))
        return conversation, message

    conversation, message = await ctx.db.write(persist)
    return await hand_to_provider(ctx, conversation, message)


def recorded_for_pair(conn: sqlite3.Connection, message: Message) -> set[str]:
    """The provider ids recorded for the other outbound messages of `message`'s pair: none of them is its own."""
    return store.provider_ids_for_pair(conn, message, message.created_at - LOOKUP_WINDOW_MS)


def send_request(ctx: Context, message: Message) -> SendRequest:
    """What the provider is handed for a persisted message; its status callback names our message id."""

    async def recorded() -> set[str]:
        return await ctx.db.read(lambda c: recorded_for_pair(c, message))

    return SendRequest(
        message_id=message.id,
        from_number=message.from_number,
        to_number=message.to_number,
        body=message.content,
        status_callback_url=ctx.status_callback_url(message.id),
        recorded=recorded,
    )


@contextlib.contextmanager
def in_flight(ctx: Context, work_id: str) -> Iterator[None]:
    """For the block, `work_id` (a message's id, or a create's conversation's) is work of this process
    (`ctx.sending`): not one to settle as stalled."""
    ctx.sending.add(work_id)
    try:
        yield
    finally:
        ctx.sending.discard(work_id)


async def hand_to_provider(ctx: Context, conversation: Conversation, message: Message) -> Message:
    """Send a persisted, queued message; record its acceptance (`sms.message_sent`, and activity when the
    conversation is in progress) or its rejection, which raises ProviderFailed."""
    with in_flight(ctx, message.id):
        try:
            accepted = await provider_send(ctx, message)
        except ProviderRejected as exc:
            rejected = exc
            await ctx.db.write(lambda c: record_rejected(c, conversation, message, rejected, ctx.clock.now_ms()))
            raise ProviderFailed(rejected.message, rejected.code, conversation.id) from None

        sent = await ctx.db.write(lambda c: _record_sent(c, conversation, message, accepted, ctx.clock.now_ms()))
    ctx.scheduler.wake()
    return sent


def _record_sent(
    conn: sqlite3.Connection, conversation: Conversation, message: Message, accepted: SendAccepted, now_ms: int
) -> Message:
    """`record_accepted`, and activity (the inactivity timer restarts) when the conversation is in progress. A
    message Parley writes itself (`author: system`: an inactivity warning or closing message, a compliance
    confirmation) is not activity: the nudge must not push the close back, nor the closing message start a new
    quiet period (and a compliance reply answers an inbound text that already was)."""
    sent = record_accepted(conn, conversation, message, accepted, now_ms)
    if message.author != "system" and (current := store.get_open(conn, conversation.id)) is not None:
        lifecycle.note_activity(conn, current, now_ms)
    return sent


async def provider_send(ctx: Context, message: Message) -> SendAccepted:
    """`provider.send` for a persisted message, raising ProviderRejected when it is refused. An unexpected failure
    (a bug, an answer the adapter cannot read) does not leave the message `queued` for the life of the process:
    the provider is asked whether it took it, as after a crash, and a message it did not take fails with
    `parley_send_failed` (`provider_outcome_unknown` when it cannot say)."""
    try:
        return await ctx.provider.send(send_request(ctx, message))
    except ProviderRejected:
        raise
    except Exception as exc:
        log.error("the provider's send failed unexpectedly (message %s): %s", message.id, type(exc).__name__)
        accepted, unknown = await ask_provider(ctx, message)
        if accepted is not None:
            return accepted
        raise unknown or SEND_FAILED from None


async def ask_provider(ctx: Context, message: Message) -> tuple[SendAccepted | None, ProviderRejected | None]:
    """After a stop or crash cut off the send of `message`: (the provider's acceptance, None) when it took it,
    (None, None) when it certainly did not, (None, a `provider_outcome_unknown` rejection) when it cannot say."""

    def look(conn: sqlite3.Connection) -> tuple[Message | None, set[str]]:
        return store.get_message(conn, message.id), recorded_for_pair(conn, message)

    current, taken = await ctx.db.read(look)
    if current is not None and current.provider_message_id is not None:
        # A status report (it names our message id) recorded the provider's id meanwhile: it took the message.
        return SendAccepted(provider_message_id=current.provider_message_id, provider_status=current.status), None
    try:
        return await ctx.provider.find_sent(message, taken), None
    except Exception as exc:  # the provider could not be asked
        log.warning("could not learn whether the provider took an SMS (message %s): %s", message.id, type(exc).__name__)
        unknown = SendOutcomeUnknown(
            OUTCOME_UNKNOWN, "the send's outcome was lost, and the provider could not say whether it took the message"
        )
        return None, unknown


async def recover_unsent(ctx: Context, unsent: list[Message]) -> int:
    """After start-up: every outbound message other than an interrupted create's opening that a stop or crash cut
    off between persist and the send's outcome (a reply, an operator's message, a confirmation, a reminder), as
    `store.unsent_outbound` found them before the server took any request (so none is a send of this process).

    The provider is asked whether it took each: if so, it is recorded as sent; if not, it fails with
    `parley_interrupted`; if the provider cannot say, it is asked again after each of `RECOVERY_WAITS`, and then
    fails with `provider_outcome_unknown`. Nothing is sent again: the send may have reached the phone, and a
    duplicate SMS cannot be taken back. It runs in the background, one look-up after another, so a slow or
    unreachable provider does not hold up start-up; a conversation's turns wait until its messages are settled."""
    left = collections.Counter(m.conversation_id for m in unsent)
    settled = 0

    def done(message: Message) -> None:  # not on cancellation: the server is stopping, its turns wait
        left[message.conversation_id] -= 1
        if not left[message.conversation_id]:
            ctx.recovering.discard(message.conversation_id or "")

    for wait in (*RECOVERY_WAITS, None):
        unsure: list[Message] = []
        for message in unsent:
            try:
                accepted, unknown = await ask_provider(ctx, message)
                if unknown is not None and wait is not None:
                    unsure.append(message)  # asked again after the wait
                    continue
                await ctx.db.write(lambda c, m=message, a=accepted, u=unknown: _settle_unsent(ctx, c, m, a, u))
                settled += 1
            except Exception:  # left `queued`: the next start-up finds it again (its turns go on meanwhile)
                log.exception("could not settle an outbound message a stop or crash cut off (message %s)", message.id)
            done(message)
        if not unsure:
            break
        await ctx.clock.sleep(wait or 0)
        unsent = unsure
    if settled:
        log.warning("settled %d outbound message(s) whose send a stop or crash cut off", settled)
    return settled


async def recover_stalled(ctx: Context) -> int:
    """While the server runs (housekeeping): `recover_unsent` for the outbound messages persisted more than
    STALLED_AFTER_MS ago and still `queued` with no provider id (the write of the send's outcome failed). Not the
    opening of a create still unsettled (settling its create starts or closes its conversation:
    `conversations.recover_stalled`), nor a message of a conversation start-up is still settling, nor one this
    process is still sending (`ctx.sending`: its age is no proof, the wall clock may have stepped), by its id or, an
    opening, by its create's conversation's (closed while pending, with no key held, it is no longer told apart)."""
    before = ctx.clock.now_ms() - STALLED_AFTER_MS
    stalled = await ctx.db.read(lambda c: _stalled_sends(c, before))
    stalled = [message for message in stalled if not _busy(ctx, message)]  # after the read: on the loop's thread
    return await recover_unsent(ctx, stalled) if stalled else 0


def _busy(ctx: Context, message: Message) -> bool:
    """Whether `message` is in this process's hands: being sent (by itself, or as its create's opening:
    `ctx.sending`), or being settled by start-up (`ctx.recovering`)."""
    return (
        message.id in ctx.sending or message.conversation_id in ctx.sending or message.conversation_id in ctx.recovering
    )


def _stalled_sends(conn: sqlite3.Connection, before: int) -> list[Message]:
    """`store.unsent_outbound` persisted before `before`, but not the opening of a create still unsettled."""
    creates = {conversation.id for conversation in store.interrupted_creates(conn)}
    return [message for message in store.unsent_outbound(conn, before) if message.conversation_id not in creates]


def _settle_unsent(
    ctx: Context,
    conn: sqlite3.Connection,
    message: Message,
    accepted: SendAccepted | None,
    unknown: ProviderRejected | None,
) -> None:
    current = store.get_message(conn, message.id)
    if current is None:
        return
    if current.provider_message_id is not None:
        # A status report (it names our message id) recorded the provider's id while the provider's API could not
        # be asked: the provider took the message, which is recorded as sent now (its `sms.message_sent` has not
        # been emitted: the send's own answer died with the process).
        accepted, unknown = (
            SendAccepted(provider_message_id=current.provider_message_id, provider_status="queued"),
            None,
        )
    elif current.status != "queued":
        return
    conversation = store.get(conn, message.conversation_id) if message.conversation_id else None
    if conversation is None:
        return
    now_ms = ctx.clock.now_ms()
    if accepted is not None:
        _record_sent(conn, conversation, message, accepted, now_ms)
    else:
        record_rejected(conn, conversation, message, unknown or INTERRUPTED, now_ms)


class Outgoing(msgspec.Struct, frozen=True):
    """A persisted, queued SMS of Parley's own (`author: system`) and the conversation it is filed under."""

    conversation: Conversation
    message: Message


def queue_system(ctx: Context, conn: sqlite3.Connection, conversation: Conversation, content: str) -> Outgoing:
    """Persist a message Parley writes itself, filed under `conversation`, open or closed (an opt-out
    confirmation goes to just such a pair), for `send_queued` once committed."""
    message = new_outbound(conversation, content, "system", ctx.clock.now_ms(), ctx.provider.name)
    return Outgoing(conversation, insert_outbound(conn, message))


async def send_queued(ctx: Context, outgoing: Outgoing) -> Message | None:
    """Hand a queued message of Parley's own to the provider; a rejection is logged (and recorded), not raised."""
    try:
        return await hand_to_provider(ctx, outgoing.conversation, outgoing.message)
    except ProviderFailed as exc:
        log.warning(
            "provider rejected a system message in conversation %s (code %s)",
            outgoing.conversation.id,
            exc.provider_code,
        )
        return None


async def record_reports(ctx: Context, reports: Sequence[StatusReport]) -> int:
    """Apply provider status reports, in order, in one transaction; return how many changed a message."""
    return await ctx.db.write(lambda conn: apply_reports(conn, reports, ctx.provider.name, ctx.clock.now_ms()))


def apply_reports(conn: sqlite3.Connection, reports: Sequence[StatusReport], provider: str, now_ms: int) -> int:
    """Apply provider status reports in order; return how many changed their message's canonical status.

    Every report is kept. Duplicates (same provider id and status) and lower-rank or post-terminal
    reports change nothing and emit nothing. A run of reports about one message (a carrier's `sent`
    then `delivered`) reads the message once, writes its row once, stores its raw reports in one call,
    and takes the run's event sequence numbers in one statement; each real change still emits its own
    event.
    """
    return sum(
        _apply_run(conn, list(run), provider, now_ms)
        for _, run in itertools.groupby(reports, key=lambda r: (r.message_id, r.provider_message_id))
    )


def _reported_message(conn: sqlite3.Connection, report: StatusReport) -> Message | None:
    """The outbound message a report is about: by our id when the callback carries it, else the provider's.

    Our id wins even over a different provider id recorded for the message: the callback URL that names it is
    signed, and was given only to sends of this message, whereas the id recorded after a lost answer comes from
    a look-up that cannot always tell identical texts apart."""
    if report.message_id is not None:
        message = store.get_message(conn, report.message_id)
        if message is not None and message.direction == "outbound":
            return message
    return store.message_by_provider_id(conn, report.provider_message_id)


def _apply_run(conn: sqlite3.Connection, run: list[StatusReport], provider: str, now_ms: int) -> int:
    """Reports that all name the same message (same ids), in order.

    The lattice alone makes a repeated report harmless: a status, once seen, left the message at its
    rank or above, and only a strictly higher rank moves it. A report that arrived before its message
    could be found is applied when it comes again."""
    original = message = _reported_message(conn, run[0])
    changes: dict[str, Any] = {}
    updates: list[dict[str, Any]] = []  # each real change's event data, in order
    kept: list[tuple[Any, ...]] = []  # every raw report, for the audit table
    for report in run:
        incoming = status.canonical(report.provider_status)
        new_status = None
        if message is not None and incoming is not None:
            new_status = status.advance(message.status, incoming)
        kept.append(
            (
                message.id if message else None,
                provider,
                report.provider_message_id,
                report.provider_status,
                report.error_code,
                _raw.encode(report.raw).decode(),
                int(new_status is not None),
                now_ms,
            )
        )
        if message is None or new_status is None:
            continue
        step = _status_step(new_status, report.error_code, now_ms)
        if message.provider_message_id is None:
            # The report overtook the send's own answer: the provider took the message by now.
            step["provider_message_id"] = report.provider_message_id
            if message.sent_at is None:
                step["sent_at"] = now_ms
        changed = msgspec.structs.replace(message, **step)
        updates.append(message_data(changed, previousStatus=message.status, errorCode=changed.error_code))
        changes.update(step)
        message = changed
    store.insert_status_reports(conn, kept)
    if original is None or not updates:
        return 0
    store.update_message(conn, original.id, now_ms, **changes)
    if "provider_message_id" in changes and original.org_id is not None:
        # The report overtook the send's own answer: the provider took a message from this number, so its
        # organization's claim on it is for good (as recording the send would make it), and it is activity now.
        sender_numbers.mark_sent(conn, original.from_number, original.org_id, now_ms)
        current = store.get_open(conn, original.conversation_id) if original.conversation_id else None
        if current is not None and original.author != "system":
            lifecycle.note_activity(conn, current, now_ms)
    if original.conversation_id is not None:
        events.append_to_conversation(conn, "sms.message_delivery_updated", original.conversation_id, updates, now_ms)
        lifecycle.note_status(conn, original, message.status, now_ms)
    return len(updates)
