"""The compliance filter (SPEC §5): opt-out, opt-in and HELP keywords, handled before any assistant turn.

`match_keyword` is the pure decision (the whole body, trimmed, any case, inner whitespace collapsed);
`on_inbound` is the inbound effect that acts on it, in the transaction that stores the message. Opt-out and
HELP messages never reach the model.
"""

from __future__ import annotations

import logging
import sqlite3
import unicodedata
from enum import Enum

import msgspec

from app.domain import lifecycle, messaging
from app.domain.context import Context
from app.domain.events import EventScope
from app.domain.inbound import InboundResult, InboundSms
from app.domain.models import Conversation, Message
from app.domain.templates import render
from app.domain.types import MAX_SMS_CHARS, sendable_text, without_unseen
from app.store import agents as agents_store
from app.store import conversations as store
from app.store import events, opt_outs

log = logging.getLogger("parley.compliance")


class Action(Enum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    HELP = "help"


KEYWORDS: dict[str, Action] = {
    **dict.fromkeys(
        ("STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "OPT-OUT"),
        Action.OPT_OUT,
    ),
    **dict.fromkeys(("START", "UNSTOP", "YES"), Action.OPT_IN),
    **dict.fromkeys(("HELP", "INFO"), Action.HELP),
}

OPT_OUT_CONFIRMATION = (
    "You have been unsubscribed and will receive no more messages from this number. Reply START to resubscribe."
)
OPT_IN_CONFIRMATION = (
    "You have been resubscribed and may receive messages from this number again. Reply STOP to unsubscribe."
)
DEFAULT_HELP = "Reply STOP to unsubscribe. Msg&data rates may apply."


class Keyword(msgspec.Struct, frozen=True):
    action: Action
    keyword: str  # upper-cased, inner whitespace collapsed: "STOP ALL"


def _as_hyphen(char: str) -> str:
    """A dash a keyboard may put in OPT-OUT (a hyphen or non-breaking hyphen, an en dash, a minus sign) as "-"."""
    return "-" if unicodedata.category(char) == "Pd" or char == "\u2212" else char


def normalize(body: str) -> str:
    """The body as keywords are compared: compatibility-normalized, without the characters that show nothing (a
    phone's direction mark, a pasted zero-width space), any dash read as "-", trimmed, whitespace runs collapsed,
    upper-cased. "STOP" followed by a zero-width space looks like STOP on the customer's screen, and is STOP."""
    text = without_unseen(unicodedata.normalize("NFKC", body))
    return " ".join("".join(map(_as_hyphen, text)).split()).upper()


def match_keyword(body: str) -> Keyword | None:
    """The compliance keyword the whole body is, or None ("stop texting me" and "Stop. Thanks" are not)."""
    text = normalize(body)
    action = KEYWORDS.get(text)
    return Keyword(action, text) if action is not None else None


# What a provider says a message was, when it recognised a keyword itself (Twilio's `OptOutType`).
PROVIDER_ACTIONS: dict[str, Action] = {"STOP": Action.OPT_OUT, "START": Action.OPT_IN, "HELP": Action.HELP}


def keyword_of(sms: InboundSms) -> Keyword | None:
    """The compliance keyword an inbound SMS is: one of ours (`match_keyword`), else one the provider recognised.

    A Twilio Messaging Service with Advanced Opt-Out can be given keywords of its own (other languages:
    "ARRET"); it then blocks the pair and says so with `OptOutType`. Parley acts on that as on its own
    keywords, recording the body as the keyword, so that it neither keeps the conversation open nor has the
    model answer someone Twilio no longer delivers to."""
    if (keyword := match_keyword(sms.body)) is not None:
        return keyword
    action = PROVIDER_ACTIONS.get(sms.provider_opt_out_type or "")
    return Keyword(action, normalize(sms.body)) if action is not None else None


def blocks_assistant(keyword: Keyword | None) -> bool:
    """Opt-out and HELP keywords never reach the model. Opt-in words do: "YES" is also an ordinary answer,
    and it only acts as an opt-in for a pair that is on the opt-out list (which has no open conversation)."""
    return keyword is not None and keyword.action in (Action.OPT_OUT, Action.HELP)


def answered_by_parley(message: Message) -> bool:
    """A stored inbound message the model never answers: an opt-out or HELP keyword, as it was acted on when it
    arrived (a provider's own keyword included), or as its body reads for one stored before that was kept."""
    if message.keyword is not None:
        return message.keyword in (Action.OPT_OUT.value, Action.HELP.value)
    return blocks_assistant(match_keyword(message.content))


class Outcome(msgspec.Struct, kw_only=True):
    changed: bool
    conversation: Conversation | None = None  # the conversation a confirmation is filed under


def _open(conn: sqlite3.Connection, org_id: str, sms: InboundSms) -> Conversation | None:
    """The pair's open conversation as it is now: not necessarily the one the inbound was routed to in its own
    earlier transaction, which a create racing the keyword may have superseded since. (A create still sending
    its opening closes its conversation itself if it finds the pair listed: `conversations._opening_sent`.)"""
    found = store.open_for_pair(conn, sms.to_number, sms.from_number)
    return next((c for c in found if c.org_id == org_id), None)


def _contact_scope(org_id: str, open_conversation: Conversation | None) -> EventScope:
    if open_conversation is None:
        return EventScope(org_id=org_id)
    return open_conversation.scope


def apply_opt_out(
    conn: sqlite3.Connection, result: InboundResult, sms: InboundSms, keyword: Keyword, now_ms: int
) -> Outcome:
    """List the pair, close its open conversation with `opted_out`, emit `contact.opt_out` (one transaction)."""
    assert result.conversation is not None
    org_id = result.conversation.org_id
    open_conversation = _open(conn, org_id, sms)
    added = opt_outs.add(conn, org_id, sms.to_number, sms.from_number, keyword.keyword, now_ms)
    if not added and open_conversation is None:
        return Outcome(changed=False)
    data = {"phoneNumber": sms.from_number, "senderNumber": sms.to_number, "keyword": keyword.keyword}
    events.append(conn, "contact.opt_out", _contact_scope(org_id, open_conversation), data, now_ms)
    if open_conversation is not None:
        lifecycle.close(conn, open_conversation, reason="opted_out", now_ms=now_ms)
    return Outcome(changed=added, conversation=store.get(conn, (open_conversation or result.conversation).id))


def apply_opt_in(
    conn: sqlite3.Connection, result: InboundResult, sms: InboundSms, keyword: Keyword, now_ms: int
) -> Outcome:
    """Take the pair off the list and emit `contact.opt_in`; nothing at all when it was not listed."""
    assert result.conversation is not None
    org_id = result.conversation.org_id
    if not opt_outs.remove(conn, org_id, sms.to_number, sms.from_number):
        return Outcome(changed=False)
    data = {"phoneNumber": sms.from_number, "senderNumber": sms.to_number, "keyword": keyword.keyword}
    events.append(conn, "contact.opt_in", _contact_scope(org_id, _open(conn, org_id, sms)), data, now_ms)
    return Outcome(changed=True, conversation=result.conversation)


def _provider_answered(ctx: Context, sms: InboundSms) -> bool:
    """The provider has already replied to this keyword itself: it always does (`confirms_opt_out`), or it
    says it did this time (Twilio puts `OptOutType` on the callback when its opt-out handling answered)."""
    return ctx.provider.confirms_opt_out or sms.provider_opt_out_type is not None


def _help_text(conn: sqlite3.Connection, conversation: Conversation) -> str:
    agent = agents_store.by_id_any(conn, conversation.agent_id)
    if agent is not None and agent.settings.help_message:
        # Like other agent texts it may name the conversation's variables ({{dealershipName}}).
        text = sendable_text(render(agent.settings.help_message, conversation.dynamic_variables)).strip()
        if text and len(text) <= MAX_SMS_CHARS:  # rendered longer (long variables), a provider refuses it
            return text
    return DEFAULT_HELP


def on_inbound(
    ctx: Context, conn: sqlite3.Connection, result: InboundResult, sms: InboundSms, now_ms: int
) -> messaging.Outgoing | None:
    """The inbound effect: act on a compliance keyword, in the transaction that stores the message (runs before
    the assistant's). A confirmation or HELP answer is queued in it too, filed under the conversation the
    keyword concerns, and handed to the provider once committed."""
    keyword = keyword_of(sms)
    if keyword is None:
        return None
    store.set_keyword(conn, result.message.id, keyword.action.value)
    if result.conversation is None:
        # No conversation ever used this pair: no org to attribute it to; the message is stored unrouted.
        log.info("%s keyword from a pair with no conversation; stored unrouted", keyword.action.value)
        return None
    confirm = not _provider_answered(ctx, sms)
    text: str | None = None
    if keyword.action is Action.OPT_OUT:
        outcome = apply_opt_out(conn, result, sms, keyword, now_ms)
        log.info("opt-out in conversation %s", result.conversation.id)
        text = OPT_OUT_CONFIRMATION if outcome.changed else None
    elif keyword.action is Action.OPT_IN:
        outcome = apply_opt_in(conn, result, sms, keyword, now_ms)
        if outcome.changed:
            log.info("opt-in in conversation %s", result.conversation.id)
        text = OPT_IN_CONFIRMATION if outcome.changed else None
    else:
        # Answered whether or not the conversation is open (HELP is answered even for an opted-out pair), filed
        # under the pair's most recent conversation.
        outcome = Outcome(changed=False, conversation=result.conversation)
        text = _help_text(conn, result.conversation)
    if not confirm or text is None or outcome.conversation is None:
        return None
    return messaging.queue_system(ctx, conn, outcome.conversation, text)
