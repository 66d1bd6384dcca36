"""The assistant loop (SPEC §5): debounced turns that answer a conversation's inbound SMS through the model.

An inbound message to an open, unpaused conversation (re)schedules the conversation's `assistant_turn`
job at now + `replyDebounceMs`, so a burst of texts is answered by one turn that sees all of them. The
job lives in the database (a turn due at a restart still runs), and the scheduler never runs one job
twice at once, so turns of one conversation never overlap; a message that arrives while a turn runs
re-schedules the job, and the next turn answers it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.domain import compliance, lifecycle, messaging
from app.domain.agents import Agent
from app.domain.context import Context
from app.domain.errors import Conflict, NotFound, ProviderFailed, ValidationFailed
from app.domain.ids import new_id, parse_uuid
from app.domain.inbound import InboundResult, InboundSms
from app.domain.models import Conversation, Message
from app.domain.status import UNSENT
from app.domain.types import MAX_SMS_CHARS
from app.llm import prompt, tools
from app.llm.client import ChatModel, ModelError, ModelNotConfigured, ToolCallRequest
from app.store import agents as agents_store
from app.store import conversations as store
from app.store import events, jobs
from app.store import tool_calls as tool_calls_store
from app.store.jobs import Job
from app.store.tool_calls import ToolCall

log = logging.getLogger("parley.assistant")

TURN_JOB = lifecycle.TURN_JOB
# The most recent messages a turn sends the model, after the opening (always sent: what the conversation is about);
# SMS conversations rarely come close.
HISTORY_LIMIT = 400
# How soon a turn waiting for start-up to settle one of its conversation's SMS looks again.
RECOVERY_WAIT_MS = 1000


@dataclass
class Snapshot:
    """What a turn starts from, read in one go."""

    conversation: Conversation
    agent: Agent
    messages: list[Message]
    tool_calls: list[ToolCall]
    reply_positions: dict[str, int]
    answered_seq: int
    end_requested: bool  # an earlier run of this turn, cut off, had the model end the conversation
    end_recorded: bool  # ... and had recorded the reply that goes with it (the goodbye was sent, or on its way)
    rounds_made: int  # tool rounds earlier runs of this turn, cut off, made for the same texts

    @property
    def last_seq(self) -> int:
        return max((m.seq or 0 for m in self.messages), default=0)


def _person_answered(message: Message) -> bool:
    """An operator's message, unless it is known not to have reached the phone (as `store.operator_wrote_after`)."""
    return message.direction == "outbound" and message.author == "operator" and message.status not in UNSENT


def needs_reply(messages: list[Message], answered_seq: int) -> bool:
    """True when a customer message (other than a compliance keyword) is newer than both what the last
    completed turn had read and the last message a person (operator) sent."""
    operator = max((m.seq or 0 for m in messages if _person_answered(m)), default=0)
    read = max(answered_seq, operator)
    return any(
        m.direction == "inbound" and (m.seq or 0) > read and not compliance.answered_by_parley(m) for m in messages
    )


def _from_a_customer_text(messages: list[Message]) -> list[Message]:
    """A long conversation's most recent messages from the first text of the customer's the model is shown: those
    before it would follow the opening, and a reply of the assistant's there would be joined to it (`prompt.history`
    joins one side's consecutive texts), one message it never sent. They answer nothing still to be answered (every
    text of the customer's is after them), so `needs_reply` is the same. All of them when none is the customer's."""
    for index, message in enumerate(messages):
        if message.direction == "inbound" and not compliance.answered_by_parley(message):
            return messages[index:]
    return messages


def _load(conn: sqlite3.Connection, conversation_id: str) -> Snapshot | None:
    conversation = store.get(conn, conversation_id)
    if conversation is None or conversation.status != "in_progress":
        return None
    end_requested = store.end_requested(conn, conversation.id)
    end_recorded = end_requested and tool_calls_store.end_call_recorded(conn, conversation.id)
    handed_off_at: int | None = None
    if conversation.assistant_paused and not end_recorded:
        # Handed to a person, no turn runs, except a run of the turn that made the hand-off, cut off by a stop or a
        # crash before its reply: it still sends the reply (a person takes over), for the texts it had seen. (One
        # cut off after recording its goodbye, the model having also ended the conversation, just ends it.)
        handed_off_at = tool_calls_store.unanswered_handoff(conn, conversation.id)
        if handed_off_at is None:
            return None
    agent = agents_store.by_id_any(conn, conversation.agent_id)
    if agent is None:
        return None
    first = max(0, conversation.message_count - HISTORY_LIMIT)
    messages = store.messages_of(conn, conversation.id, after_seq=first, limit=HISTORY_LIMIT * 2)
    if handed_off_at is not None:
        messages = [m for m in messages if (m.seq or 0) <= handed_off_at]  # later texts are the person's to answer
    if first > 0:  # a long conversation: the window starts with a text of the customer's
        messages = _from_a_customer_text(messages)
    first_seq = min((m.seq or 0 for m in messages), default=0)
    last_seq = max((m.seq or 0 for m in messages), default=0)
    if first > 0:  # ... and follows the opening: the messages between the two are left out
        messages = [*store.messages_of(conn, conversation.id, after_seq=0, limit=1), *messages]
    return Snapshot(
        conversation=conversation,
        agent=agent,
        messages=messages,
        tool_calls=tool_calls_store.since_seq(conn, conversation.id, first_seq),
        reply_positions=tool_calls_store.reply_positions(conn, conversation.id, first_seq),
        answered_seq=tool_calls_store.answered_seq(conn, conversation.id),
        end_requested=end_requested,
        end_recorded=end_recorded,
        rounds_made=tool_calls_store.rounds_made(conn, conversation.id, last_seq),
    )


def _unique_call_ids(calls: list[ToolCallRequest]) -> list[ToolCallRequest]:
    """Keep the model's call ids (it may expect them back) unless missing or repeated within one answer."""
    seen: set[str] = set()
    out = []
    for call in calls:
        call_id = call.call_id
        if not call_id or call_id in seen:
            call_id = "call_" + uuid.uuid4().hex[:24]
        seen.add(call_id)
        out.append(ToolCallRequest(call_id=call_id, name=call.name, arguments=call.arguments))
    return out


def schedule_turn(ctx: Context, conn: sqlite3.Connection, result: InboundResult, sms: InboundSms, now_ms: int) -> None:
    """The inbound effect, in the transaction that stores the message (after the compliance filter's): (re)schedule
    the conversation's debounced turn."""
    if not result.routed or result.conversation is None or compliance.blocks_assistant(compliance.keyword_of(sms)):
        return None
    conversation = store.get(conn, result.conversation.id)
    if conversation is None or conversation.status != "in_progress" or conversation.assistant_paused:
        return None  # closed (e.g. by STOP), or handed to a person: stored and emitted, not answered
    agent = agents_store.by_id_any(conn, conversation.agent_id)
    debounce = agent.settings.reply_debounce_ms if agent is not None else 0
    jobs.schedule(conn, TURN_JOB, conversation.id, now_ms + debounce)
    return None


class Assistant:
    """Runs assistant turns and LLM-generated openings for one app; plugged in by the lifespan."""

    def __init__(self, ctx: Context, model: ChatModel) -> None:
        self.ctx = ctx
        self.model = model

    # --- turns ------------------------------------------------------------------------------------

    async def run_job(self, job: Job) -> int | None:
        """The scheduler's handler for `assistant_turn`: one turn; failures are reported, never retried blindly
        (a retry could repeat tool calls), and the next inbound message starts a fresh turn."""
        if job.ref in self.ctx.recovering:
            return self.ctx.clock.now_ms() + RECOVERY_WAIT_MS  # one of its SMS is still being settled
        try:
            await self.run_turn(job.ref)
        except Exception:
            log.exception("assistant turn failed in conversation %s", job.ref)
            await self._abandon(job.ref, "internal_error", "The assistant turn failed unexpectedly.", attempts=0)
        return None

    async def run_turn(self, conversation_id: str) -> None:
        ctx = self.ctx
        snapshot = await ctx.db.read(lambda c: _load(c, conversation_id))
        if snapshot is None:
            return
        if snapshot.end_recorded:
            # The turn that had the model end the conversation was cut off once its reply was recorded: the goodbye
            # went (or was on its way), so the conversation ends, also when the customer has texted since.
            await ctx.db.write(lambda c: _end(c, conversation_id, ctx.clock.now_ms()))
            return
        if not needs_reply(snapshot.messages, snapshot.answered_seq):
            if snapshot.end_requested:
                # Asked for in a turn cut off before its reply, and a person has answered since: dropped with it.
                await ctx.db.write(lambda c: store.set_end_requested(c, conversation_id, None))
            return
        conversation, agent = snapshot.conversation, snapshot.agent
        settings = agent.settings
        if missing := self.model.missing(settings.model):
            names = " and ".join(missing)
            log.error("the assistant is not configured: set %s (conversation %s gets no reply)", names, conversation.id)
            await self._abandon(
                conversation.id,
                "model_not_configured",
                f"No model is configured; set {names} on the server.",
                attempts=0,
            )
            return

        chat: list[dict[str, Any]] = []
        if system := prompt.system_prompt(settings, conversation.dynamic_variables):
            chat.append({"role": "system", "content": system})
        chat.extend(prompt.history(snapshot.messages, snapshot.tool_calls, snapshot.reply_positions))
        offered = tools.specs(settings)
        turn_id = new_id()
        seen = snapshot.last_seq

        def drop(conn: sqlite3.Connection) -> bool:
            """When a person answered these texts while the model was thinking, record the turn as over with its reply
            dropped (the person took over; an end the model asked for, in this run or one a stop cut off, is dropped
            with it) and return True. Recorded as `dropped`, so that should the person's message then fail to reach
            the phone, the texts are answered after all (`lifecycle.note_status`); not a turn that handed off: the
            texts it had read stay the person's (a resume does not answer them)."""
            if not store.operator_wrote_after(conn, conversation.id, seen):
                return False
            current = store.get(conn, conversation.id)
            handed_off = current is not None and current.assistant_paused
            now = ctx.clock.now_ms()
            tool_calls_store.record_turn(conn, turn_id, conversation.id, seen, now, dropped=not handed_off)
            store.set_end_requested(conn, conversation.id, None)
            return True

        def record(conn: sqlite3.Connection) -> tuple[bool, bool]:
            """Record the turn: (send the reply, then end the conversation); (False, False) when it is dropped."""
            if drop(conn):
                return False, False
            tool_calls_store.record_turn(conn, turn_id, conversation.id, seen, ctx.clock.now_ms())
            return True, store.end_requested(conn, conversation.id)

        rounds = snapshot.rounds_made  # a run after a stop goes on with the rounds the cut-off run used
        while True:
            # Before every model call, retries included: a closed conversation cancels the turn, and texts a person
            # answered meanwhile are theirs (the turn's reply would be dropped).
            if await self._stopped(conversation.id, seen, drop):
                return
            last_chance = rounds >= settings.max_tool_rounds
            try:
                answer = await self.model.complete(
                    model=settings.model,
                    messages=chat,
                    tools=offered or None,
                    tool_choice="none" if last_chance else None,
                    temperature=settings.temperature,
                    wanted=lambda: self._why_stop(conversation.id, seen) is None,
                )
            except (ModelError, ModelNotConfigured) as exc:
                # Reported (`_abandon`), also when a person answered meanwhile: the model did fail. Not once the
                # conversation is closed: closing cancelled the turn.
                code = exc.code if isinstance(exc, ModelError) else "model_not_configured"
                message = exc.message if isinstance(exc, ModelError) else str(exc)
                attempts = exc.attempts if isinstance(exc, ModelError) else 0
                log.warning("assistant turn abandoned in conversation %s: %s", conversation.id, code)
                await self._abandon(conversation.id, code, message, attempts=attempts)
                return
            if not answer.tool_calls or last_chance:
                break
            rounds += 1
            calls = _unique_call_ids(answer.tool_calls)
            chat.append(prompt.tool_call_message(answer.content, [(c.call_id, c.name, c.arguments) for c in calls]))
            for position, call in enumerate(calls):
                # Checked before every call: a webhook tool can act in the world (a booking), so none runs for a
                # conversation that was closed (or opted out), or whose texts a person answered, meanwhile. The
                # built-in tools still take effect once a person answered: a hand-off pauses the assistant (the
                # person is there), and an end is dropped with the reply.
                why = self._why_stop(conversation.id, seen)
                if why == "closed":
                    log.info("conversation %s closed during its assistant turn; no further calls", conversation.id)
                    return
                if why == "operator" and tools.kind_of(settings, call.name)[0] == "webhook":
                    # Not called: the turn stops before its next model call, unless the person's message fails
                    # meanwhile, when the model is told the call was not made (every call asked for needs a result).
                    chat.append(prompt.tool_result_message(call.call_id, prompt.NOT_CALLED_RESULT))
                    continue
                done = await self._run_tool(
                    snapshot, turn_id, call, round_=rounds, position=position, assistant_content=answer.content
                )
                chat.append(prompt.tool_result_message(done.call_id, done.result))

        reply = prompt.cut_reply(prompt.clean_reply(answer.content), settings.max_reply_chars)
        if answer.tool_calls and not reply:
            # Asked to answer in words after the last allowed round, the model still asked for tools only.
            log.warning("the model asked for tools after its last round in conversation %s; no reply", conversation.id)
            await self._abandon(
                conversation.id,
                "model_tool_rounds_exhausted",
                f"The model still asked for tools after {settings.max_tool_rounds} round(s) and wrote no reply.",
                attempts=1,
            )
            return
        # Recorded before the send: a crash in between loses this reply rather than sending it twice.
        answer_it, ends = await ctx.db.write(record)
        if not answer_it:
            log.info("an operator answered in conversation %s during its assistant turn; no reply", conversation.id)
            return
        sent_id: str | None = None
        if reply:
            try:
                sent = await messaging.send_in_conversation(ctx, conversation.id, conversation.org_id, reply, "agent")
            except Conflict as exc:  # closed or opted out while the model was thinking
                log.info("assistant reply in conversation %s not sent: %s", conversation.id, exc.code)
                return
            except ProviderFailed as exc:
                log.warning(
                    "provider rejected the assistant reply in conversation %s (code %s)",
                    conversation.id,
                    exc.provider_code,
                )
            else:
                sent_id = sent.id

        def finish(conn: sqlite3.Connection) -> None:
            if sent_id is not None:
                tool_calls_store.set_turn_reply(conn, turn_id, sent_id)
            if ends:
                _end(conn, conversation.id, ctx.clock.now_ms())

        if sent_id is not None or ends:
            await ctx.db.write(finish)

    async def _run_tool(
        self,
        snapshot: Snapshot,
        turn_id: str,
        call: ToolCallRequest,
        *,
        round_: int,
        position: int,
        assistant_content: str | None,
    ) -> ToolCall:
        """Persist the call and its invocation event, execute it, persist the result and its event."""
        ctx = self.ctx
        conversation, agent = snapshot.conversation, snapshot.agent
        kind, webhook = tools.kind_of(agent.settings, call.name)
        arguments, problem = tools.parse_arguments(call.arguments)
        record = ToolCall(
            id=new_id(),
            conversation_id=conversation.id,
            org_id=conversation.org_id,
            turn_id=turn_id,
            round=round_,
            position=position,
            call_id=call.call_id,
            after_seq=snapshot.last_seq,
            assistant_content=assistant_content,
            name=call.name,
            kind=kind,
            arguments=call.arguments,
            created_at=ctx.clock.now_ms(),
        )
        invocation = {
            "toolCallId": record.id,
            "name": call.name,
            "arguments": arguments if arguments is not None else call.arguments,
        }

        def invoke(conn: sqlite3.Connection) -> ToolCall:
            stored = tool_calls_store.insert(conn, record)
            events.append(conn, "sms.tool_call_invocation", conversation.scope, invocation, ctx.clock.now_ms())
            return stored

        record = await ctx.db.write(invoke)
        started = time.perf_counter()
        handoff_summary: str | None = None
        ends = False
        if problem is not None:
            outcome = tools.failure(problem)
        elif kind == "unknown":
            outcome = tools.failure(f"there is no tool named {call.name!r}")
        elif kind == tools.END_CONVERSATION:
            ends = True
            outcome = tools.ToolOutcome(result={"ok": True, "note": "The conversation ends after your reply is sent."})
        elif kind == tools.HANDOFF_TO_HUMAN:
            assert arguments is not None
            summary = arguments.get("summary")
            # The hand-off happens whatever the model wrote (a customer who asked for a person gets one); a summary
            # that is not text is kept as the JSON it was, not dropped.
            handoff_summary = summary if isinstance(summary, str) else "" if summary is None else json.dumps(summary)
            outcome = tools.ToolOutcome(
                # Stays in the history after a resume: it must not read as "never answer again".
                result={
                    "ok": True,
                    "note": "A person takes over; until they hand the conversation back, you are not asked to answer.",
                }
            )
        else:
            assert webhook is not None and arguments is not None
            body = tools.request_body(
                tool_call_id=record.id,
                name=call.name,
                arguments=arguments,
                conversation_id=conversation.id,
                agent_id=agent.id,
                dynamic_variables=conversation.dynamic_variables,
                metadata=conversation.metadata,
            )
            now = ctx.clock.now_ms()
            outcome = await tools.call_webhook(
                webhook,
                body,
                tool_call_id=record.id,
                secrets=agent.signing_secrets(now),
                timestamp=now // 1000,
                policy=ctx.settings,
            )
        duration_ms = round((time.perf_counter() - started) * 1000)
        result_text = outcome.text

        def complete(conn: sqlite3.Connection) -> None:
            now = ctx.clock.now_ms()
            tool_calls_store.complete(
                conn, record.id, result=result_text, is_error=outcome.is_error, duration_ms=duration_ms, now_ms=now
            )
            data = _result_data(record.id, call.name, outcome.result, outcome.is_error, duration_ms)
            events.append(conn, "sms.tool_call_result", conversation.scope, data, now)
            if ends:  # stored with the call: the turn ends the conversation by it, a run a stop cut off included
                store.set_end_requested(conn, conversation.id, now)
            if handoff_summary is not None:
                current = store.get(conn, conversation.id)
                if current is not None and current.status == "in_progress" and not current.assistant_paused:
                    store.set_paused(conn, conversation.id, True)
                    events.append(
                        conn,
                        "sms.handoff_requested",
                        conversation.scope,
                        {"toolCallId": record.id, "summary": handoff_summary},
                        now,
                    )

        await ctx.db.write(complete)
        if handoff_summary is not None:
            log.info("conversation %s handed off to a person", conversation.id)
        record.result, record.is_error, record.duration_ms = result_text, outcome.is_error, duration_ms
        return record

    def _why_stop(self, conversation_id: str, seen: int) -> str | None:
        """Why a turn that had read up to message `seen` stops: "closed" (closed, or opted out), "operator" (a person
        answered the texts it is working on), or None (it goes on)."""

        def look(conn: sqlite3.Connection) -> str | None:
            if store.get_open(conn, conversation_id) is None:
                return "closed"
            return "operator" if store.operator_wrote_after(conn, conversation_id, seen) else None

        return self.ctx.db.read_now(look)

    async def _stopped(self, conversation_id: str, seen: int, drop: Callable[[sqlite3.Connection], bool]) -> bool:
        """Whether the turn stops before its next model call (`_why_stop`). Stopped by a person's answer, the turn is
        recorded as one whose reply is dropped (`drop`, which looks again in its write: a person's message that
        failed since the look answered nothing, and the turn goes on)."""
        why = self._why_stop(conversation_id, seen)
        if why is None:
            return False
        if why == "operator" and not await self.ctx.db.write(drop):
            return False
        log.info("%s during the assistant turn of conversation %s; no further calls, no reply", why, conversation_id)
        return True

    async def _abandon(self, conversation_id: str, code: str, message: str, *, attempts: int) -> None:
        """The turn gives up: `sms.assistant_error` is emitted (not for a closed conversation: closing cancelled the
        turn). An end the model asked for is dropped with the reply when the turn failed before recording it (the
        conversation stays open); when it failed after (the goodbye was sent, or on its way), the end is carried out.
        A turn that handed off is then recorded as over, so neither a re-run nor a resume answers its texts."""

        def report(conn: sqlite3.Connection) -> None:
            conversation = store.get(conn, conversation_id)
            if conversation is None or conversation.status == "closed":
                return  # closing cancelled the turn (SPEC §3.2): nothing to report after `sms.conversation_closed`
            now_ms = self.ctx.clock.now_ms()
            data = {"error": code, "message": message, "attempts": attempts}
            events.append(conn, "sms.assistant_error", conversation.scope, data, now_ms)
            if store.end_requested(conn, conversation_id) and tool_calls_store.end_call_recorded(conn, conversation_id):
                _end(conn, conversation_id, now_ms)
                return
            store.set_end_requested(conn, conversation_id, None)
            # After the end is judged (this record is no goodbye): a turn that handed off and then failed is over (a
            # failed turn is not run again), and the texts it had read are the person's, not answered by the
            # assistant after a resume (also one that came while the turn was failing).
            if (handed_off_at := tool_calls_store.unanswered_handoff(conn, conversation_id)) is not None:
                tool_calls_store.record_turn(conn, new_id(), conversation_id, handed_off_at, now_ms)

        try:
            await self.ctx.db.write(report)
        except Exception:
            log.exception("could not record an assistant error for conversation %s", conversation_id)

    async def settle_interrupted_tool_calls(self) -> int:
        """At start-up, before any turn runs: a tool call still running was cut off by a stop or a crash.

        It is completed with the error the re-run turn gives the model in its place (`prompt.INTERRUPTED_RESULT`),
        and its `sms.tool_call_result` is emitted, so the API and webhook consumers see what the model sees;
        `durationMs` is the time from the invocation until then. Return how many there were."""
        ctx = self.ctx

        def settle(conn: sqlite3.Connection) -> int:
            now = ctx.clock.now_ms()
            interrupted = tool_calls_store.running(conn)
            for call in interrupted:
                duration_ms = max(0, now - call.created_at)
                tool_calls_store.complete(
                    conn, call.id, result=prompt.INTERRUPTED_RESULT, is_error=True, duration_ms=duration_ms, now_ms=now
                )
                if (conversation := store.get(conn, call.conversation_id)) is not None:
                    data = _result_data(call.id, call.name, json.loads(prompt.INTERRUPTED_RESULT), True, duration_ms)
                    events.append(conn, "sms.tool_call_result", conversation.scope, data, now)
            return len(interrupted)

        settled = await ctx.db.write(settle, long=True)
        if settled:
            log.warning("completed %d tool call(s) interrupted by a stop or crash as errors", settled)
        return settled

    # --- operator actions -------------------------------------------------------------------------

    async def resume(self, org_id: str, conversation_id: str) -> Conversation:
        """Give a handed-off conversation back to the assistant; messages that came meanwhile are answered."""
        canonical = parse_uuid(conversation_id)
        if canonical is None:
            raise NotFound("Conversation not found.")
        ctx = self.ctx

        def run(conn: sqlite3.Connection) -> Conversation:
            conversation = store.get(conn, canonical, org_id)
            if conversation is None:
                raise NotFound("Conversation not found.")
            lifecycle.ensure_in_progress(conversation, "The conversation is closed; it cannot be resumed.")
            if conversation.assistant_paused:
                store.set_paused(conn, conversation.id, False)
                # The turn itself decides whether anything is left unanswered.
                jobs.schedule(conn, TURN_JOB, conversation.id, ctx.clock.now_ms())
            resumed = store.get(conn, conversation.id)
            assert resumed is not None
            return resumed

        conversation = await ctx.db.write(run)
        ctx.scheduler.wake()
        return conversation

    # --- openings ---------------------------------------------------------------------------------

    async def generate_opening(self, agent: Agent, dynamic_variables: dict[str, str]) -> str:
        """The first SMS written by the model (one chat completion, no user message).

        A model that is not configured is the caller's 400 (give a welcomeMessage); a model that fails
        is a 502 `provider_error` (raised as ProviderFailed) whose `providerCode` says why (`model_timeout`,
        `model_http_500`, …). Nothing is sent in either case.
        """
        settings = agent.settings
        if missing := self.model.missing(settings.model):
            names = " and ".join(missing)
            log.error("LLM-generated openings need the model configured: set %s", names)
            raise ValidationFailed.field(
                "welcomeMessage",
                "is required: this agent has no opening template and the server has no model configured"
                f" to write one ({names} unset)",
            )
        try:
            answer = await self.model.complete(
                model=settings.model,
                messages=prompt.opening_messages(settings, dynamic_variables),
                temperature=settings.temperature,
                attempts=1,
            )
        except ModelError as exc:
            log.warning("the model could not write an opening message: %s", exc.code)
            raise ProviderFailed(f"The model could not write the opening message: {exc.message}", exc.code) from None
        text = prompt.cut_reply(prompt.clean_reply(answer.content), min(settings.max_reply_chars, MAX_SMS_CHARS))
        if not text:
            raise ProviderFailed("The model wrote an empty opening message.", "model_empty_reply")
        return text


def _result_data(tool_call_id: str, name: str, result: Any, is_error: bool, duration_ms: int) -> dict[str, Any]:
    """The data of `sms.tool_call_result`."""
    return {"toolCallId": tool_call_id, "name": name, "result": result, "isError": is_error, "durationMs": duration_ms}


def _end(conn: sqlite3.Connection, conversation_id: str, now_ms: int) -> None:
    if (conversation := store.get_open(conn, conversation_id)) is not None:
        lifecycle.close(conn, conversation, reason="agent_ended", now_ms=now_ms)
