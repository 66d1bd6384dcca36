"""SMS conversations: create (with supersede and idempotency), close and read."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import sqlite3
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.domain import lifecycle, messaging, senders
from app.domain.agents import Agent
from app.domain.context import Context
from app.domain.errors import (
    Conflict,
    FieldProblem,
    IdempotencyKeyReused,
    NotFound,
    ProviderFailed,
    ValidationFailed,
)
from app.domain.ids import new_id, new_request_id, parse_uuid
from app.domain.models import Conversation, Message
from app.domain.phone import e164_problem
from app.domain.templates import render
from app.domain.types import (
    BLANK_PROBLEM,
    CONTROL_PROBLEM,
    MAX_SMS_CHARS,
    SMS_CONTROL_CHARACTER,
    DynamicVariables,
    E164Number,
    Metadata,
    Reason,
    Slug,
    SmsBody,
    shows_nothing,
    sms_text_problem,
    whole,
)
from app.providers.base import OUTCOME_UNKNOWN, ProviderRejected, SendAccepted, SendOutcomeUnknown
from app.scheduler import IDLE_RECHECK_SECONDS
from app.store import agents as agents_store
from app.store import conversations as store
from app.store import idempotency, opt_outs, sender_numbers

log = logging.getLogger("parley.conversations")

IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000
# Start-up asks the provider about the openings of interrupted creates before the server takes requests (and
# housekeeping about stalled ones, below). Asked one after another, each bounded only by the provider's own timeouts
# (Twilio: 15 s for an answer that does not come), a provider that hangs held start-up that long per create. They are
# asked this many at a time, one the provider could not answer is asked again after each of these waits (seconds: a
# passing error does not decide it), and all of it within this many seconds of wall time: an opening still without
# an answer then is one the provider could not say about.
LOOKUPS_AT_ONCE = 8
LOOKUP_RETRY_WAITS = (1.0, 3.0)
LOOKUP_SECONDS = 20.0
UUID_PATTERN = whole(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}", "a UUID")


class CreateConversation(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v1/sms-conversations. Every optional field may also be `null`, which means not given (clients
    generated from a schema send their unset fields so): exactly one of agentSlug and agentId is given."""

    to_number: E164Number
    agent_slug: Slug | UnsetType | None = UNSET
    agent_id: Annotated[str, Meta(pattern=UUID_PATTERN)] | UnsetType | None = UNSET
    from_number: E164Number | None = None
    # Its text rules are checked after an Idempotency-Key's replay (`check_fields`, `check_agent_rules`): a retry
    # that an earlier version accepted replays its outcome, whatever rules came since.
    welcome_message: SmsBody | None = None
    dynamic_variables: DynamicVariables | None = {}
    metadata: Metadata | None = {}
    inactivity_timeout_seconds: Annotated[int, Meta(ge=60, le=2592000)] | None = None

    def __post_init__(self) -> None:
        # `null` is not given: the rest of the create (and the Idempotency-Key's request hash) sees one form.
        if self.agent_slug is None:
            self.agent_slug = UNSET
        if self.agent_id is None:
            self.agent_id = UNSET
        if self.dynamic_variables is None:
            self.dynamic_variables = {}
        if self.metadata is None:
            self.metadata = {}


class CloseConversation(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    reason: Reason | None = "admin_closed"  # null: the default

    def __post_init__(self) -> None:
        if self.reason is None:
            self.reason = "admin_closed"


class CreateOutcome(msgspec.Struct, kw_only=True):
    """What a create ended in; stored for idempotent replay and rendered by the API."""

    status_code: int
    request_id: str
    conversation_id: str
    provider_message_id: str | None = None
    provider_code: str | None = None
    message: str | None = None


class CloseOutcome(msgspec.Struct, kw_only=True):
    conversation: Conversation
    already_closed: bool


_outcome_codec = msgspec.json.Decoder(CreateOutcome)
_encoder = msgspec.json.Encoder(order="sorted")


def request_hash(body: CreateConversation) -> str:
    return hashlib.sha256(_encoder.encode(body)).hexdigest()


def _given(value: object) -> bool:
    return value is not UNSET and value is not None


def field_problems(
    agent_slug: object, agent_id: object, to_number: object, from_number: object, welcome: object
) -> list[FieldProblem]:
    """The create's field rules a type cannot express, on decoded or raw values alike (a value of the wrong type
    is left to its type's own problem). A blank welcomeMessage is an agent-kind rule (SPEC §3.1: after the 404)."""
    problems: list[FieldProblem] = []
    if _given(agent_slug) == _given(agent_id):
        problems.append(FieldProblem("agentSlug", "give exactly one of agentSlug or agentId"))
    if isinstance(agent_id, str) and parse_uuid(agent_id) is None:
        problems.append(FieldProblem("agentId", "must be a UUID"))
    for name, number in (("toNumber", to_number), ("fromNumber", from_number)):
        if isinstance(number, str) and (problem := e164_problem(number)):
            problems.append(FieldProblem(name, problem))
    if isinstance(welcome, str) and SMS_CONTROL_CHARACTER.search(welcome):
        problems.append(FieldProblem("welcomeMessage", CONTROL_PROBLEM))
    return problems


def check_fields(body: CreateConversation) -> None:
    """Every problem of a decoded body at once (the rules a type cannot express that need no agent)."""
    problems = field_problems(body.agent_slug, body.agent_id, body.to_number, body.from_number, body.welcome_message)
    if problems:
        raise ValidationFailed.of(problems)


def raw_field_problems(raw: dict[str, Any]) -> list[FieldProblem]:
    """The same rules on a body that failed to decode, so that its 400 names these problems too."""
    return field_problems(
        raw.get("agentSlug"), raw.get("agentId"), raw.get("toNumber"), raw.get("fromNumber"), raw.get("welcomeMessage")
    )


def check_agent_rules(body: CreateConversation, agent: Agent) -> tuple[str, str | None]:
    """Agent-kind rules; return (sender number, opening text or None when the model must write it)."""
    settings = agent.settings
    sender = settings.phone_number if agent.kind == "custom" and settings.phone_number else body.from_number
    if sender is None:
        raise ValidationFailed.field("fromNumber", "is required for this agent (it has no number of its own)")
    welcome = body.welcome_message
    if welcome is not None and shows_nothing(welcome):
        raise ValidationFailed.field("welcomeMessage", BLANK_PROBLEM)
    if agent.kind == "managed" and welcome is None:
        raise ValidationFailed.field("welcomeMessage", "is required for managed agents")
    # A blank value renders its `{{name}}` as nothing: the case requiredVariables exists to catch (SPEC §5).
    given = body.dynamic_variables
    missing = [name for name in settings.required_variables if shows_nothing(given.get(name, ""))]
    if missing:
        problems = [
            FieldProblem(
                f"dynamicVariables.{name}",
                "is required by the agent" + (" and " + BLANK_PROBLEM if name in given else ""),
            )
            for name in missing
        ]
        raise ValidationFailed(
            "dynamicVariables is missing variables the agent requires, or has them blank: " + ", ".join(missing),
            problems,
        )
    if welcome is not None:
        return sender, welcome
    if settings.opening_message is not None:
        text = render(settings.opening_message, body.dynamic_variables)
        if problem := sms_text_problem(text):
            raise ValidationFailed.field("dynamicVariables", f"the agent's openingMessage, rendered, {problem}")
        if len(text) > MAX_SMS_CHARS:
            raise ValidationFailed.field(
                "dynamicVariables",
                f"the agent's openingMessage renders to {len(text)} characters, more than {MAX_SMS_CHARS}",
            )
        return sender, text
    return sender, None


async def resolve_agent(ctx: Context, body: CreateConversation, org_id: str) -> Agent:
    """The agent a create names, through `ctx.agents`: looked up on a miss only, so an entry lives its TTL
    from that look-up however often it is used (agent writes in this process drop it at once)."""
    key: tuple[str, ...]
    load: Callable[[sqlite3.Connection], Agent | None]
    if body.agent_slug is not UNSET:
        key = ("slug", body.agent_slug)
        load = functools.partial(agents_store.by_slug, slug=body.agent_slug)
    else:
        agent_id = parse_uuid(body.agent_id) or ""
        key = ("id", agent_id, org_id)
        load = functools.partial(agents_store.by_id, agent_id=agent_id, org_id=org_id)
    now_ms = ctx.clock.now_ms()
    agent = ctx.agents.get(key, now_ms)
    if agent is None:
        agent = ctx.db.read_now(load)
        if agent is None:
            raise NotFound("Agent not found.")
        ctx.agents.put(key, agent, now_ms)
    return agent


def _replay_or_raise(row: sqlite3.Row, digest: str, now_ms: int, *, same_only: bool = False) -> CreateOutcome | None:
    """The stored outcome of the same request (409 while it runs); 422 for another body, None if nothing is held
    (or, with `same_only`, if another body holds the key)."""
    if row is None or row["expires_at"] <= now_ms:
        return None
    if row["request_hash"] != digest:
        if same_only:
            return None
        raise IdempotencyKeyReused()
    if row["state"] == "running":
        raise Conflict("idempotency_in_progress", "A request with this Idempotency-Key is still running.")
    return _outcome_codec.decode(row["outcome"])


def _opening_sent(
    conn: sqlite3.Connection,
    conversation: Conversation,
    message: Message,
    accepted: SendAccepted,
    agent: Agent | None,
    now_ms: int,
    *,
    first_from_sender: bool = True,
) -> int | None:
    """The provider took the opening SMS: supersede the pair's other open conversation, start this one, record
    the send (and, when the organization may not have sent from this number before, that it now has) and arm
    the inactivity timer; return the timer's due time (None: it was closed while pending, or the customer opted
    out while the opening was on its way)."""
    if first_from_sender:
        sender_numbers.mark_sent(conn, conversation.from_number, conversation.org_id, now_ms)
    # In progress and active now; `sequence` is its `sms.message_sent`'s (None: closed while pending, and then it
    # supersedes nothing). Started first: the pair's one-open-conversation index refuses it only when another is
    # open, and only then are those looked up and superseded (a refused statement leaves the transaction as it was).
    try:
        sequence = store.start(conn, conversation.id, now_ms)
    except sqlite3.IntegrityError:
        for other in store.open_for_pair(conn, conversation.from_number, conversation.to_number):
            lifecycle.close(
                conn, other, reason="superseded_by_new_conversation", now_ms=now_ms, superseded_by=conversation.id
            )
        sequence = store.start(conn, conversation.id, now_ms)
    messaging.record_accepted(conn, conversation, message, accepted, now_ms, sequence=sequence)
    if sequence is None:
        return None
    if opt_outs.contains(conn, conversation.org_id, conversation.from_number, conversation.to_number):
        # A STOP came in after the create checked the list and before the provider took the opening (the two
        # crossed): the opening was already on its way, but the conversation does not stay open.
        lifecycle.close(conn, conversation, reason="opted_out", now_ms=now_ms)
        return None
    return lifecycle.arm_inactivity(conn, conversation, now_ms, agent)


def _opening_failed(
    conn: sqlite3.Connection, conversation: Conversation, message: Message | None, why: ProviderRejected, now_ms: int
) -> None:
    """The opening SMS did not go out, or cannot be known to have: its message (if written) fails with `why`, and
    the conversation closes as `opening_message_failed` (it already is, when an operator closed it meanwhile)."""
    if message is not None:
        messaging.record_rejected(conn, conversation, message, why, now_ms)
    lifecycle.close(conn, conversation, reason="opening_message_failed", now_ms=now_ms)
    if why.code == OUTCOME_UNKNOWN:  # it may have gone out from the number: the organization keeps it
        sender_numbers.mark_sent(conn, conversation.from_number, conversation.org_id, now_ms)
    else:  # certainly not sent: a number claimed only by this create is given back
        sender_numbers.release_unused(conn, conversation.from_number, conversation.org_id, now_ms)


def _record_unwritten(
    ctx: Context,
    conversation: Conversation,
    sender_field: str,
    idempotency_key: str | None,
    outcome: CreateOutcome,
    conn: sqlite3.Connection,
) -> None:
    """The model could not write the opening: the conversation is kept, closed, with no message."""
    now_ms = ctx.clock.now_ms()
    senders.ensure_own(conn, conversation.org_id, conversation.from_number, now_ms, field=sender_field)
    store.insert(
        conn, msgspec.structs.replace(conversation, message_count=0, created_at=now_ms, last_activity_at=now_ms)
    )
    lifecycle.close(conn, conversation, reason="opening_message_failed", now_ms=now_ms)
    sender_numbers.release_unused(conn, conversation.from_number, conversation.org_id, now_ms)
    _finish_idempotency(conn, conversation.org_id, idempotency_key, outcome)


def _finish_idempotency(conn: sqlite3.Connection, org_id: str, key: str | None, outcome: CreateOutcome) -> None:
    if key is not None:
        idempotency.finish(conn, org_id, key, msgspec.json.encode(outcome).decode())


class Replay(msgspec.Struct):
    outcome: CreateOutcome


def _claim(
    conn: sqlite3.Connection, org_id: str, key: str, digest: str, conversation_id: str, now_ms: int
) -> Replay | None:
    """Take the Idempotency-Key for this run (None), or answer from the run that holds it (a replay, 409, 422)."""
    if idempotency.claim(
        conn,
        org_id=org_id,
        key=key,
        request_hash=digest,
        conversation_id=conversation_id,
        now_ms=now_ms,
        expires_at=now_ms + IDEMPOTENCY_TTL_MS,
    ):
        return None
    replayed = _replay_or_raise(idempotency.get(conn, org_id, key), digest, now_ms)
    assert replayed is not None
    return Replay(replayed)


async def create(
    ctx: Context,
    org_id: str,
    body: CreateConversation,
    *,
    request_id: str,
    idempotency_key: str | None = None,
) -> tuple[CreateOutcome, bool]:
    """Create a conversation and send its opening SMS; return (outcome, replayed)."""
    conversation_id = new_id()
    # Work of this process from before it takes its key until its outcome is written: housekeeping neither frees the
    # key nor settles the create as stalled meanwhile, however old the clock makes it look (`ctx.sending`).
    with messaging.in_flight(ctx, conversation_id):
        return await _create(ctx, org_id, body, conversation_id, request_id=request_id, idempotency_key=idempotency_key)


async def _create(
    ctx: Context,
    org_id: str,
    body: CreateConversation,
    conversation_id: str,
    *,
    request_id: str,
    idempotency_key: str | None,
) -> tuple[CreateOutcome, bool]:
    digest = request_hash(body) if idempotency_key else ""
    if idempotency_key:
        row = ctx.db.read_now(lambda c: idempotency.get(c, org_id, idempotency_key))
        now = ctx.clock.now_ms()
        # The same request again: its outcome, even if a rule added since (an upgrade) would refuse its body now.
        if (replayed := _replay_or_raise(row, digest, now, same_only=True)) is not None:
            return replayed, True
        # Another body: its field rules first (a body no create accepts is a 400, not a 422 "reused").
        check_fields(body)
        _replay_or_raise(row, digest, now)
    else:
        check_fields(body)
    agent = await resolve_agent(ctx, body, org_id)
    sender, opening = check_agent_rules(body, agent)
    now = ctx.clock.now_ms()
    conversation = Conversation(
        id=conversation_id,
        org_id=org_id,
        agent_id=agent.id,
        status="pending",
        from_number=sender,
        to_number=body.to_number,
        dynamic_variables=dict(body.dynamic_variables),
        metadata=dict(body.metadata),
        inactivity_timeout_seconds=body.inactivity_timeout_seconds or agent.settings.inactivity_timeout_seconds,
        created_at=now,
        last_activity_at=now,
        ended_at=None,
        end_reason=None,
        superseded_by=None,
        assistant_paused=False,
        message_count=1,  # the opening message, inserted with it as seq 1
    )
    sender_field = "fromNumber" if sender == body.from_number else "agentId"
    claimed_early = False
    first_from_sender = True

    def persist(conn: sqlite3.Connection, message: Message) -> Replay | Message:
        nonlocal first_from_sender
        if idempotency_key and not claimed_early:
            replay = _claim(conn, org_id, idempotency_key, digest, conversation.id, ctx.clock.now_ms())
            if replay is not None:
                return replay
        first_from_sender = not senders.ensure_own(conn, org_id, sender, now, field=sender_field)
        # The opt-out list is checked (409) here, in the transaction that would create the conversation.
        if opt_outs.contains(conn, org_id, sender, body.to_number):
            raise Conflict("recipient_opted_out", "The recipient has opted out of messages from this number.")
        store.insert(conn, conversation)
        store.insert_message(conn, message)
        return message

    try:
        if opening is None:
            opener = ctx.generate_opening
            if opener is None:
                raise ValidationFailed.field(
                    "welcomeMessage",
                    "this agent has no opening template, so a welcomeMessage is required"
                    " (LLM-generated openings need the assistant, which is not configured)",
                )
            if idempotency_key:
                # The model takes seconds: hold the key while it writes, so a repeat meanwhile is answered 409.
                key = idempotency_key
                early = await ctx.db.write(
                    lambda c: _claim(c, org_id, key, digest, conversation.id, ctx.clock.now_ms())
                )
                if early is not None:
                    return early.outcome, True
                claimed_early = True
            # An opted-out recipient is refused before the model is asked to write (the transaction re-checks).
            if await ctx.db.read(lambda c: opt_outs.contains(c, org_id, sender, body.to_number)):
                raise Conflict("recipient_opted_out", "The recipient has opted out of messages from this number.")
            try:
                opening = await opener(agent, body.dynamic_variables)
            except ProviderFailed as exc:
                # The model could not write it: as when a provider refuses the SMS, the create ends in a closed
                # conversation that the 502 names (and that its Idempotency-Key replays).
                unwritten = CreateOutcome(
                    status_code=502,
                    request_id=request_id,
                    conversation_id=conversation.id,
                    provider_code=exc.provider_code,
                    message=exc.message,
                )
                await ctx.db.write(
                    functools.partial(_record_unwritten, ctx, conversation, sender_field, idempotency_key, unwritten)
                )
                return unwritten, False
            # The model took seconds: stamp the conversation now, as it is written, so that it does not appear in
            # the newest-first list behind conversations a client has already seen (persist reads both names).
            now = ctx.clock.now_ms()
            conversation = msgspec.structs.replace(conversation, created_at=now, last_activity_at=now)
        message = messaging.new_outbound(conversation, opening, "agent", now, ctx.provider.name, seq=1)
        persisted = await ctx.db.write(functools.partial(persist, message=message))
    except BaseException:
        if claimed_early:  # nothing was created: free the key for the client's retry (4xx answers are not kept)
            await asyncio.shield(ctx.db.write(lambda c: idempotency.release_running(c, conversation.id)))
        raise
    if isinstance(persisted, Replay):
        return persisted.outcome, True
    message = persisted

    try:
        accepted = await messaging.provider_send(ctx, message)
    except ProviderRejected as exc:
        rejected = exc
        outcome = CreateOutcome(
            status_code=502,
            request_id=request_id,
            conversation_id=conversation.id,
            provider_code=rejected.code,
            message=f"The SMS provider rejected the opening message: {rejected.message}",
        )

        def record_failure(conn: sqlite3.Connection) -> None:
            _opening_failed(conn, conversation, message, rejected, ctx.clock.now_ms())
            _finish_idempotency(conn, org_id, idempotency_key, outcome)

        await ctx.db.write(record_failure)
        return outcome, False

    outcome = CreateOutcome(
        status_code=201,
        request_id=request_id,
        conversation_id=conversation.id,
        provider_message_id=accepted.provider_message_id,
    )

    def record_success(conn: sqlite3.Connection) -> int | None:
        due = _opening_sent(
            conn, conversation, message, accepted, agent, ctx.clock.now_ms(), first_from_sender=first_from_sender
        )
        _finish_idempotency(conn, org_id, idempotency_key, outcome)
        return due

    due = await ctx.db.write(record_success)
    # The scheduler re-reads its next deadline at least every IDLE_RECHECK_SECONDS, so only a timer due
    # sooner than that (an early inactivity warning) needs a wake-up; each one costs a scheduler pass.
    if due is not None and due - ctx.clock.now_ms() < IDLE_RECHECK_SECONDS * 1000:
        ctx.scheduler.wake()
    return outcome, False


async def close(ctx: Context, org_id: str, conversation_id: str, reason: str) -> CloseOutcome:
    canonical_id = parse_uuid(conversation_id)
    if canonical_id is None:
        raise NotFound("Conversation not found.")

    def run(conn: sqlite3.Connection) -> CloseOutcome:
        conversation = store.get(conn, canonical_id, org_id)
        if conversation is None:
            raise NotFound("Conversation not found.")
        if conversation.status == "closed":
            return CloseOutcome(conversation=conversation, already_closed=True)
        lifecycle.close(conn, conversation, reason=reason, now_ms=ctx.clock.now_ms())
        closed = store.get(conn, canonical_id)
        assert closed is not None
        return CloseOutcome(conversation=closed, already_closed=False)

    return await ctx.db.write(run)


async def get(ctx: Context, org_id: str, conversation_id: str) -> Conversation:
    canonical_id = parse_uuid(conversation_id)
    conversation = None
    if canonical_id is not None:
        conversation = ctx.db.read_now(lambda c: store.get(c, canonical_id, org_id))
    if conversation is None:
        raise NotFound("Conversation not found.")
    return conversation


def _unsettled_opening(conn: sqlite3.Connection, conversation: Conversation) -> Message | None:
    """An interrupted create's opening SMS, whose outcome its create never recorded. A status report may have
    recorded the provider's id meanwhile (the provider took it: `messaging.ask_provider` answers so)."""
    for message in store.messages_of(conn, conversation.id, after_seq=0, limit=1):
        if message.direction == "outbound" and (message.status == "queued" or message.provider_message_id):
            return message
    return None


async def recover_interrupted(ctx: Context) -> int:
    """At start-up: a create was interrupted between persist and the send's outcome. Its conversation is still
    `pending`, or was closed meanwhile (an operator's close) with its Idempotency-Key still held.

    Its create never answered, so the client may retry it. The send may have been in flight, so the provider
    is asked whether it took the opening SMS. If it did, the conversation goes on as the create would have left
    it, and its Idempotency-Key replays a 201 (a retry sends nothing twice). If it did not, the conversation is
    closed as `opening_message_failed` and the key released, so the retry runs. If the provider cannot say, the
    conversation is closed and the key keeps a 502 `provider_outcome_unknown`: a missing SMS can be sent again,
    a duplicate cannot be taken back. The look-ups run side by side, a few at a time, each asked again a couple of
    times while the provider cannot say, and all within LOOKUP_SECONDS: a provider that hangs holds start-up for
    that long, not that long for every interrupted create.
    """
    stuck = await _settle_cut_off(ctx, None)
    await ctx.db.write(idempotency.release_orphaned)  # taken before a model-written opening that never got persisted
    if stuck:
        log.warning("recovered %d conversation(s) interrupted before their opening SMS was settled", stuck)
    return stuck


async def recover_stalled(ctx: Context) -> int:
    """While the server runs (housekeeping): a create whose outcome could not be written left its conversation
    `pending` (a retry got 409 `idempotency_in_progress`, an operator's message 409 `conversation_pending`, and the
    customer's replies reached no one) until the next start-up. One created more than `messaging.STALLED_AFTER_MS`
    ago is settled as start-up settles an interrupted one. So is a key taken that long ago for a model-written opening
    that was never persisted, whose release failed: it is freed for the client's retry. Neither is a create this
    process is still carrying out (`ctx.sending`): its age is no proof it stalled, the wall clock may have stepped
    forward."""
    before = ctx.clock.now_ms() - messaging.STALLED_AFTER_MS  # as old as a message that stalled so
    stuck = await _settle_cut_off(ctx, before)
    running = sorted(ctx.sending)  # a copy, read on the loop's thread
    freed = await ctx.db.write(lambda c: idempotency.release_orphaned(c, before, keep=running))
    if stuck or freed:
        log.warning("settled %d create(s) and freed %d key(s) whose outcome could not be recorded", stuck, freed)
    return stuck


async def _settle_cut_off(ctx: Context, created_before: int | None) -> int:
    """Ask the provider about the openings of `store.interrupted_creates` and settle each create by its answer."""
    stuck = await ctx.db.read(
        lambda c: [
            (conversation, _unsettled_opening(c, conversation))
            for conversation in store.interrupted_creates(c, created_before)
        ]
    )
    # Not a create this process is still carrying out (`ctx.sending`, read here on the loop's thread): its age is no
    # proof it stalled (the wall clock may have stepped forward), and its own outcome would be written over the one
    # settled here (a conversation closed under the 201 its client got, its `sms.message_sent` emitted twice).
    stuck = [(conversation, message) for conversation, message in stuck if conversation.id not in ctx.sending]
    answers = await _ask_about(ctx, [message for _, message in stuck if message is not None])
    for conversation, message in stuck:
        accepted, unknown = answers[message.id] if message is not None else (None, None)
        await ctx.db.write(functools.partial(_settle_interrupted, ctx, conversation, message, accepted, unknown))
    return len(stuck)


async def _ask_about(
    ctx: Context, openings: list[Message]
) -> dict[str, tuple[SendAccepted | None, ProviderRejected | None]]:
    """The provider's word on each interrupted opening, by message id (`messaging.ask_provider`'s answers), within
    LOOKUP_SECONDS of wall time (at start-up the server takes no request meanwhile). The look-ups end with it, also
    when it is cancelled (a stop): none is left asking a provider and a database the stop then closes."""
    slots = asyncio.Semaphore(LOOKUPS_AT_ONCE)
    asking = {message.id: asyncio.create_task(_ask_until_answered(ctx, message, slots)) for message in openings}
    try:
        if asking:
            await asyncio.wait(asking.values(), timeout=LOOKUP_SECONDS)
    finally:
        cut_off = [task for task in asking.values() if not task.done()]
        for task in cut_off:
            task.cancel()
        await asyncio.gather(*cut_off, return_exceptions=True)
    no_answer = SendOutcomeUnknown(
        OUTCOME_UNKNOWN, f"the provider did not say whether it took the message within {LOOKUP_SECONDS:g} s"
    )
    return {message_id: (None, no_answer) if task.cancelled() else task.result() for message_id, task in asking.items()}


async def _ask_until_answered(
    ctx: Context, message: Message, slots: asyncio.Semaphore
) -> tuple[SendAccepted | None, ProviderRejected | None]:
    """`messaging.ask_provider`, holding one of `slots` while it asks; a look-up the provider could not answer is
    made again after each of LOOKUP_RETRY_WAITS (the slot given back meanwhile), and the last answer stands."""
    for wait in LOOKUP_RETRY_WAITS:
        async with slots:
            accepted, unknown = await messaging.ask_provider(ctx, message)
        if unknown is None:
            return accepted, unknown
        await asyncio.sleep(wait)  # wall time, as the bound above: what start-up takes, not the clock's to fake
    async with slots:
        return await messaging.ask_provider(ctx, message)


def _settle_interrupted(
    ctx: Context,
    conversation: Conversation,
    message: Message | None,
    accepted: SendAccepted | None,
    unknown: ProviderRejected | None,
    conn: sqlite3.Connection,
) -> None:
    now_ms = ctx.clock.now_ms()
    if message is not None and accepted is not None:
        agent = agents_store.by_id_any(conn, conversation.agent_id)
        _opening_sent(conn, conversation, message, accepted, agent, now_ms)
        # The create's own answer was lost with the process: a new request id for the one a retry replays.
        outcome = CreateOutcome(
            status_code=201,
            request_id=new_request_id(),
            conversation_id=conversation.id,
            provider_message_id=accepted.provider_message_id,
        )
    else:
        rejected = unknown or messaging.INTERRUPTED
        _opening_failed(conn, conversation, message, rejected, now_ms)
        if unknown is None:
            idempotency.release_running(conn, conversation.id)
            return
        outcome = CreateOutcome(
            status_code=502,
            request_id=new_request_id(),
            conversation_id=conversation.id,
            provider_code=unknown.code,
            message=f"The SMS provider could not confirm the opening message: {unknown.message}",
        )
    idempotency.finish_running(conn, conversation.id, msgspec.json.encode(outcome).decode())
