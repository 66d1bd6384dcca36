"""The compliance filter: the keyword table (pure), and STOP / START / HELP handling through the real app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.clock import FakeClock
from app.domain import inbound
from app.domain.compliance import (
    DEFAULT_HELP,
    OPT_IN_CONFIRMATION,
    OPT_OUT_CONFIRMATION,
    Action,
    Keyword,
    blocks_assistant,
    keyword_of,
    match_keyword,
)
from app.domain.inbound import InboundSms
from app.providers.simulator import SimulatorProvider
from tests.assistant_support import (
    CUSTOMER,
    OURS,
    VARIABLES,
    make_agent,
    open_conversation,
    replies,
    running,
    settle,
    text_in,
)
from tests.conftest import Harness
from tests.fake_llm import FakeLLM
from tests.provider_doubles import BreaksOnNth, SimulatorHolding
from tests.seed import SEED_CREATE
from tests.webhook_receiver import eventually

OPT_OUT_WORDS = ["STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "OPT-OUT"]
OPT_IN_WORDS = ["START", "UNSTOP", "YES"]
HELP_WORDS = ["HELP", "INFO"]


def spellings(word: str) -> list[str]:
    """The keyword as customers type it: any case, surrounding whitespace, runs of inner spaces."""
    return [
        word,
        word.lower(),
        word.capitalize(),
        "".join(ch.lower() if i % 2 else ch for i, ch in enumerate(word)),
        f"  {word}  ",
        f"\n{word.lower()}\t",
        f"\u00a0{word}\r\n",
        word.replace(" ", "   "),
        word.replace(" ", "\t"),
    ]


KEYWORD_CASES = [
    (text, action, word)
    for words, action in ((OPT_OUT_WORDS, Action.OPT_OUT), (OPT_IN_WORDS, Action.OPT_IN), (HELP_WORDS, Action.HELP))
    for word in words
    for text in spellings(word)
]

NEAR_MISSES = [
    "stop texting me at work",
    "Stop. Thanks",
    "STOP!",
    "stop.",
    "please stop",
    "Stop it",
    "stopp",
    "S T O P",
    "STOP STOP",
    "opt out",  # only OPTOUT and OPT-OUT are keywords
    "OPT_OUT",
    "unsubscribe me",
    "cancel my appointment",
    "The End",
    "end?",
    "quit it",
    "yes please",
    "Yes!",
    "yeah",
    "start over",
    "help me",
    "info please",
    "HELP?",
    "",
    "   ",
    "STOP ALL NOW",
    "ALL STOP",
]


@pytest.mark.parametrize(("text", "action", "keyword"), KEYWORD_CASES)
def test_every_keyword_matches_in_any_case_and_spacing(text: str, action: Action, keyword: str) -> None:
    matched = match_keyword(text)
    assert matched is not None
    assert matched.action is action
    assert matched.keyword == keyword  # upper-cased, inner whitespace collapsed


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_do_not_match(text: str) -> None:
    assert match_keyword(text) is None


def test_full_width_letters_are_read_as_the_keyword() -> None:
    matched = match_keyword("ＳＴＯＰ")
    assert matched is not None and matched.keyword == "STOP"


# What a phone or a keyboard may add to a keyword without changing what the customer sees: a zero-width space or
# word joiner (copied text), a byte-order mark, the direction marks of a right-to-left keyboard, a soft hyphen, a
# stray control character, and dashes other than the ASCII hyphen.
UNSEEN_AND_DASHES = [
    ("STOP\u200b", "STOP"),
    ("\ufeffStop", "STOP"),
    ("\u200fSTOP", "STOP"),
    ("stop\u200e", "STOP"),
    ("ST\u00adOP", "STOP"),
    ("STOP\u2060", "STOP"),
    ("Stop\x00", "STOP"),
    ("\u200bSTOP\u200b ALL", "STOP ALL"),
    ("unsubscribe\u200c", "UNSUBSCRIBE"),
    ("OPT\u2010OUT", "OPT-OUT"),
    ("opt\u2011out", "OPT-OUT"),
    ("OPT\u2013OUT", "OPT-OUT"),
    ("OPT\u2212OUT", "OPT-OUT"),
    ("\u200fhelp", "HELP"),
]


@pytest.mark.parametrize(("text", "keyword"), UNSEEN_AND_DASHES)
def test_characters_that_show_nothing_and_other_dashes_leave_the_keyword_as_the_customer_sees_it(
    text: str, keyword: str
) -> None:
    matched = match_keyword(text)
    assert matched is not None
    assert matched.keyword == keyword


@pytest.mark.parametrize("text", ["ST\u041eP", "S\u200bT O P", "STOP\u200bPLEASE"])
def test_a_look_alike_letter_or_a_second_word_is_still_no_keyword(text: str) -> None:
    assert match_keyword(text) is None


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("STOP\ufe0f", "STOP"),  # an emoji keyboard's variation selector
        ("S\u034fTOP", "STOP"),  # the combining grapheme joiner
        ("stop\U000e0100", "STOP"),  # a supplementary variation selector
        ("STOP\u17b4", "STOP"),  # a Khmer inherent vowel: a mark Unicode also says to draw as nothing
        ("S\u17b5TOP", "STOP"),
        ("STOP\u3164", "STOP"),  # a Hangul filler: drawn blank, read as a space
        ("\u2800Stop\u2800all", "STOP ALL"),  # the blank Braille pattern, likewise
        ("OPT\ufe0f-OUT", "OPT-OUT"),
    ],
)
def test_a_mark_that_shows_nothing_or_a_letter_drawn_blank_leaves_the_keyword_as_the_customer_sees_it(
    text: str, keyword: str
) -> None:
    """What `shows_nothing` counts as invisible shows nothing beside a keyword either: the screen shows the keyword
    (a letter drawn blank shows as the space it looks like)."""
    matched = match_keyword(text)
    assert matched is not None
    assert matched.keyword == keyword


def test_a_letter_drawn_blank_inside_a_keyword_is_a_gap_as_on_the_screen() -> None:
    assert match_keyword("ST\u3164OP") is None  # the screen shows "ST OP"


@pytest.mark.parametrize(
    ("text", "blocked"),
    [("STOP", True), ("help", True), ("Info", True), ("yes", False), ("START", False), ("stop texting me", False)],
)
def test_only_opt_out_and_help_keywords_are_kept_from_the_model(text: str, blocked: bool) -> None:
    assert blocks_assistant(match_keyword(text)) is blocked


@pytest.mark.parametrize(
    ("body", "opt_out_type", "expected"),
    [
        ("ARRET", "STOP", Keyword(Action.OPT_OUT, "ARRET")),
        ("  aide  moi ", "HELP", Keyword(Action.HELP, "AIDE MOI")),
        ("reprendre", "START", Keyword(Action.OPT_IN, "REPRENDRE")),
        ("stop", "START", Keyword(Action.OPT_OUT, "STOP")),  # our own keyword decides first
        ("ARRET", None, None),
        ("ARRET", "SOMETHING", None),
    ],
)
def test_a_keyword_the_provider_recognised_is_acted_on_as_ours(
    body: str, opt_out_type: str | None, expected: Keyword | None
) -> None:
    sms = InboundSms(
        from_number="+15555550199",
        to_number="+15555550123",
        body=body,
        provider="twilio",
        provider_opt_out_type=opt_out_type,
    )
    assert keyword_of(sms) == expected


# --- through the app ----------------------------------------------------------------------------


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
async def h(tmp_path: Path, llm: FakeLLM) -> AsyncIterator[Harness]:
    async with running(tmp_path, llm) as harness:
        yield harness


def events_of(h: Harness, event_type: str) -> list[dict[str, Any]]:
    rows = h.rows("SELECT payload FROM events WHERE type = ? ORDER BY pos", event_type)
    return [json.loads(row["payload"]) for row in rows]


def system_texts(h: Harness) -> list[str]:
    rows = h.rows(
        "SELECT content FROM messages WHERE direction = 'outbound' AND author = 'system'"
        " AND provider_message_id IS NOT NULL ORDER BY created_at, rowid"
    )
    return [row["content"] for row in rows]


async def phone_bodies(h: Harness) -> list[str]:
    return [m["body"] for m in (await h.get("/v1/simulator/messages", number=CUSTOMER)).json()["data"]]


async def test_stop_opts_out_closes_the_conversation_and_confirms_once_without_the_model(
    h: Harness, llm: FakeLLM
) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)

    await text_in(h, "  Stop ")

    await eventually(lambda: system_texts(h))
    await settle()
    assert llm.bodies == []
    (row,) = h.rows("SELECT org_id, sender_number, phone_number, keyword FROM opt_outs")
    assert (row["sender_number"], row["phone_number"], row["keyword"]) == (OURS, CUSTOMER, "STOP")
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert (conversation["status"], conversation["endReason"]) == ("closed", "opted_out")
    (opt_out,) = events_of(h, "contact.opt_out")
    assert opt_out["conversationId"] == conversation_id
    assert opt_out["data"] == {"phoneNumber": CUSTOMER, "senderNumber": OURS, "keyword": "STOP"}
    assert system_texts(h) == [OPT_OUT_CONFIRMATION]
    assert (await phone_bodies(h))[-1] == OPT_OUT_CONFIRMATION

    # The list is enforced: no new conversation, no operator message, and no second confirmation.
    create = await h.post(
        "/v1/sms-conversations",
        {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS, "welcomeMessage": "Hi again"},
    )
    assert create.status_code == 409
    assert create.json()["error"]["code"] == "recipient_opted_out"
    written_by_model = await h.post(
        "/v1/sms-conversations", {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS}
    )
    assert written_by_model.status_code == 409
    assert llm.bodies == []  # refused before the model was asked for an opening
    await text_in(h, "STOP")
    await text_in(h, "unsubscribe")
    await settle()
    assert system_texts(h) == [OPT_OUT_CONFIRMATION]
    assert len(events_of(h, "contact.opt_out")) == 1


async def test_a_stop_that_crosses_a_create_on_its_pair_leaves_no_conversation_open(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """The create saved its conversation before the STOP listed the pair and was waiting for the provider to
    take its opening: the STOP closes it too, so it never starts, open, for an opted-out pair."""
    held = SimulatorHolding(2)  # the first conversation's opening goes out; the second create waits
    async with running(tmp_path, llm, provider=held) as h:
        agent = await make_agent(h)
        first = await open_conversation(h, agent)
        crossing = asyncio.create_task(open_conversation(h, agent, welcomeMessage="A second opening"))
        await asyncio.wait_for(held.holding.wait(), 5)

        await text_in(h, "STOP")
        held.release.set()
        second = await crossing

        for conversation_id in (first, second):
            conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
            assert (conversation["status"], conversation["endReason"]) == ("closed", "opted_out")
        (opt_out,) = events_of(h, "contact.opt_out")
        assert opt_out["conversationId"] == first
        assert h.rows("SELECT COUNT(*) AS n FROM conversations WHERE status != 'closed'")[0]["n"] == 0


def write_transactions(statements: list[str]) -> list[list[str]]:
    """Traced statements of the writer, cut into its transactions (BEGIN … COMMIT)."""
    out: list[list[str]] = []
    for statement in statements:
        if statement.startswith("BEGIN"):
            out.append([])
        elif out:
            out[-1].append(statement)
    return out


@pytest.mark.parametrize(("body", "effect"), [("STOP", "INSERT INTO opt_outs"), ("HELP", "INSERT INTO messages")])
async def test_a_keyword_is_acted_on_in_the_transaction_that_stores_it(h: Harness, body: str, effect: str) -> None:
    """A crash can keep an inbound message and lose its effect only if they commit apart: a STOP stored but never
    applied (the customer texted again), a HELP never answered."""
    agent = await make_agent(h, helpMessage="Text us at 555-0100.")
    await open_conversation(h, agent)
    statements: list[str] = []
    h.ctx.db.writer_connection.set_trace_callback(statements.append)
    try:
        await text_in(h, body)
    finally:
        h.ctx.db.writer_connection.set_trace_callback(None)
    (stored,) = [t for t in write_transactions(statements) if any("'received'" in s for s in t)]
    assert len([s for s in stored if s.startswith("INSERT INTO messages")]) == 2  # the text and Parley's answer
    assert any(s.startswith(effect) for s in stored), stored


async def test_an_ordinary_text_schedules_its_turn_in_the_transaction_that_stores_it(h: Harness) -> None:
    agent = await make_agent(h)
    await open_conversation(h, agent)
    statements: list[str] = []
    h.ctx.db.writer_connection.set_trace_callback(statements.append)
    try:
        await text_in(h, "Can I come Tuesday?")
    finally:
        h.ctx.db.writer_connection.set_trace_callback(None)
    (stored,) = [t for t in write_transactions(statements) if any("'received'" in s for s in t)]
    assert any("'assistant_turn'" in s and "jobs" in s for s in stored), stored


async def test_a_stop_whose_confirmation_was_cut_off_stays_applied_and_the_confirmation_is_settled(
    tmp_path: Path,
) -> None:
    """The process dies while the STOP confirmation is with the provider: the opt-out was committed with the STOP,
    and the next start-up settles the confirmation (the simulator never took it) instead of leaving it `queued`."""
    held = SimulatorHolding(2)  # the opening goes out; the confirmation waits
    async with running(tmp_path, None, provider=held) as first:
        agent = await make_agent(first, helpMessage="Help text.")
        conversation_id = await open_conversation(first, agent)
        stop = asyncio.create_task(text_in(first, "STOP"))
        await asyncio.wait_for(held.holding.wait(), 5)
        key = first.key()
        async with running(tmp_path, None) as second:  # another process on the same file
            second.keys["acme"] = key
            conversation = (await second.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
            assert (conversation["status"], conversation["endReason"]) == ("closed", "opted_out")
            assert len(second.rows("SELECT * FROM opt_outs")) == 1
            settled = "SELECT status, error_code FROM messages WHERE author = 'system' AND status != 'queued'"
            (confirmation,) = await eventually(lambda: second.rows(settled))  # just after start-up
            assert tuple(confirmation) == ("failed", "parley_interrupted")
            updates = [e["data"] for e in events_of(second, "sms.message_delivery_updated")]
            assert [(u["author"], u["status"], u["errorCode"]) for u in updates if u["author"] == "system"] == [
                ("system", "failed", "parley_interrupted")
            ]
        held.release.set()
        await stop


async def test_an_unexpected_failure_sending_the_confirmation_still_acknowledges_the_stop(tmp_path: Path) -> None:
    """The STOP and its opt-out are committed; the phone (or provider) that delivered it gets its 201, not a 500
    that would have it deliver the STOP again. The confirmation, which the simulator never took, fails."""
    async with running(tmp_path, None, provider=BreaksOnNth(2)) as h:
        agent = await make_agent(h)
        await open_conversation(h, agent)
        response = await h.post("/v1/simulator/inbound", {"from": CUSTOMER, "to": OURS, "body": "STOP"})
        assert response.status_code == 201, response.text
        assert len(h.rows("SELECT * FROM opt_outs")) == 1
        (confirmation,) = h.rows("SELECT status, error_code FROM messages WHERE author = 'system'")
        assert tuple(confirmation) == ("failed", "parley_send_failed")


async def test_stop_all_is_recorded_with_its_spaces_collapsed(h: Harness) -> None:
    agent = await make_agent(h)
    await open_conversation(h, agent)
    await text_in(h, "stop    all")
    (opt_out,) = await eventually(lambda: events_of(h, "contact.opt_out"))
    assert opt_out["data"]["keyword"] == "STOP ALL"


async def test_start_opts_back_in_and_conversations_can_start_again(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    await open_conversation(h, agent)
    await text_in(h, "STOP")
    await eventually(lambda: system_texts(h))

    await text_in(h, "start")

    (opt_in,) = await eventually(lambda: events_of(h, "contact.opt_in"))
    assert opt_in["conversationId"] is None  # the conversation was closed by the STOP
    assert opt_in["sequence"] is None
    assert opt_in["data"] == {"phoneNumber": CUSTOMER, "senderNumber": OURS, "keyword": "START"}
    assert h.rows("SELECT * FROM opt_outs") == []
    await eventually(lambda: system_texts(h) == [OPT_OUT_CONFIRMATION, OPT_IN_CONFIRMATION])
    assert llm.bodies == []
    await open_conversation(h, agent)


async def test_yes_in_an_open_conversation_is_an_ordinary_answer(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.reply("Great, which day?")
    await text_in(h, "Yes")
    assert await eventually(lambda: replies(h, conversation_id)) == ["Great, which day?"]
    assert events_of(h, "contact.opt_in") == []
    assert system_texts(h) == []


async def test_help_is_answered_with_the_agents_help_message_without_the_model(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h, helpMessage="{{dealershipName}} recall texts. Reply STOP to opt out.")
    conversation_id = await open_conversation(h, agent)

    await text_in(h, "HELP")

    assert await eventually(lambda: system_texts(h)) == ["PAM Motors recall texts. Reply STOP to opt out."]
    await settle()
    assert llm.bodies == []
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert conversation["status"] == "in_progress"
    messages = (await h.get(f"/v1/sms-conversations/{conversation_id}/messages")).json()["data"]
    assert [(m["direction"], m["author"]) for m in messages] == [
        ("outbound", "agent"),
        ("inbound", "customer"),
        ("outbound", "system"),
    ]

    llm.reply("Sure, what do you need?")
    await text_in(h, "I have a question")
    assert await eventually(lambda: replies(h, conversation_id)) == ["Sure, what do you need?"]


async def test_a_help_answer_is_sent_without_control_characters_and_never_blank(h: Harness) -> None:
    """A conversation's variables rendered into the agent's HELP text (or a text an earlier version stored) sent a
    NUL or an escape sequence, which carriers refuse or mangle; one with nothing visible left sends the default."""
    agent = await make_agent(h, helpMessage="{{dealershipName}} recall texts.")
    await open_conversation(h, agent, dynamicVariables={**VARIABLES, "dealershipName": "PAM\x00 Motors\x1b[0m"})
    await text_in(h, "HELP")
    assert await eventually(lambda: system_texts(h)) == ["PAM Motors recall texts."]
    blank = await make_agent(h, helpMessage="{{dealershipName}}")
    await open_conversation(h, blank, dynamicVariables={**VARIABLES, "dealershipName": "\u200b\x07"})
    await text_in(h, "HELP")
    await eventually(lambda: len(system_texts(h)) == 2)
    assert system_texts(h)[-1] == DEFAULT_HELP
    # Rendered past 1600 characters (a provider refuses it): the default answer, not no answer.
    long = await make_agent(h, helpMessage="{{dealershipName}} {{dealershipName}}")
    await open_conversation(h, long, dynamicVariables={**VARIABLES, "dealershipName": "x" * 1000})
    await text_in(h, "HELP")
    await eventually(lambda: len(system_texts(h)) == 3)
    assert system_texts(h)[-1] == DEFAULT_HELP


async def test_help_for_a_managed_agent_and_the_default_without_a_help_message(h: Harness) -> None:
    response = await h.post("/v1/sms-conversations", SEED_CREATE)
    assert response.status_code == 201
    await h.post(
        "/v1/simulator/inbound", {"from": SEED_CREATE["toNumber"], "to": SEED_CREATE["fromNumber"], "body": "info"}
    )
    await eventually(lambda: system_texts(h))
    assert system_texts(h) == [
        "Recall follow-up texts from your dealership. Reply STOP to opt out. Msg&data rates may apply."
    ]

    agent = await make_agent(h)
    await open_conversation(h, agent)
    await text_in(h, "help")
    await eventually(lambda: len(system_texts(h)) == 2)
    assert system_texts(h)[-1] == DEFAULT_HELP


async def test_stop_inside_the_debounce_window_cancels_the_pending_turn(tmp_path: Path, llm: FakeLLM) -> None:
    clock = FakeClock()
    async with running(tmp_path, llm, clock=clock) as h:
        agent = await make_agent(h, replyDebounceMs=1000)
        conversation_id = await open_conversation(h, agent)
        await text_in(h, "Who is this?")
        await clock.advance(0.2)
        await text_in(h, "STOP")
        await clock.advance(5)
        await settle()
        assert llm.bodies == []
        assert h.rows("SELECT * FROM jobs WHERE kind = 'assistant_turn'") == []
        assert replies(h, conversation_id) == []


async def test_a_keyword_with_no_open_conversation_is_attributed_to_the_pairs_latest_conversation(
    h: Harness,
) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    await h.post(f"/v1/sms-conversations/{conversation_id}/close")

    await text_in(h, "QUIT")

    (opt_out,) = await eventually(lambda: events_of(h, "contact.opt_out"))
    assert opt_out["conversationId"] is None
    assert opt_out["data"]["keyword"] == "QUIT"
    (row,) = h.rows("SELECT org_id FROM opt_outs")
    (org,) = h.rows("SELECT org_id FROM conversations WHERE id = ?", conversation_id)
    assert row["org_id"] == org["org_id"] == opt_out["clientOrgId"]
    # The confirmation is filed under the conversation the STOP was stored against.
    await eventually(lambda: system_texts(h))
    (confirmation,) = h.rows("SELECT conversation_id FROM messages WHERE author = 'system'")
    assert confirmation["conversation_id"] == conversation_id
    assert len(events_of(h, "sms.conversation_closed")) == 1  # only the admin close


async def test_a_keyword_from_a_pair_never_texted_is_stored_unrouted(h: Harness) -> None:
    response = await h.post("/v1/simulator/inbound", {"from": "+15555550177", "to": OURS, "body": "STOP"})
    assert response.status_code == 201
    assert response.json()["data"]["conversationId"] is None
    await settle()
    assert h.rows("SELECT * FROM opt_outs") == []
    assert h.rows("SELECT * FROM events") == []
    (stored,) = h.rows("SELECT conversation_id, org_id FROM messages")
    assert (stored["conversation_id"], stored["org_id"]) == (None, None)


class SelfConfirmingProvider(SimulatorProvider):
    """A provider that always answers STOP/START/HELP itself."""

    confirms_opt_out = True


@pytest.mark.parametrize(
    ("provider", "opt_out_type", "confirmations"),
    [
        (SimulatorProvider, None, 1),  # nobody answered: Parley confirms
        (SimulatorProvider, "STOP", 0),  # the callback says the provider answered (Twilio's OptOutType)
        (SelfConfirmingProvider, None, 0),  # the provider always answers
    ],
)
async def test_a_confirmation_is_sent_only_when_the_provider_sent_none(
    tmp_path: Path, provider: type[SimulatorProvider], opt_out_type: str | None, confirmations: int
) -> None:
    async with running(tmp_path, None, provider=provider()) as h:
        agent = await make_agent(h, helpMessage="Help text.")
        await open_conversation(h, agent)

        for body in ("stop", "help"):
            sms = inbound.InboundSms(
                from_number=CUSTOMER,
                to_number=OURS,
                body=body,
                provider="simulator",
                provider_opt_out_type=opt_out_type and body.upper(),
            )
            await inbound.receive(h.ctx, sms)

        assert len(events_of(h, "contact.opt_out")) == 1
        assert len(h.rows("SELECT * FROM opt_outs")) == 1
        await settle()
        assert len(system_texts(h)) == 2 * confirmations
