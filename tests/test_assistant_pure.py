"""Pure parts of the assistant: reply cutting, history building, tool specs and argument parsing."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from app.domain.agents import AgentSettings
from app.domain.assistant import needs_reply
from app.domain.errors import ValidationFailed
from app.domain.models import Media, Message
from app.llm import prompt, tools
from app.llm.client import ModelError, parse_answer
from app.store.tool_calls import ToolCall


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly ten", 11, "exactly ten"),
        ("hello world again", 11, "hello world"),  # the cut falls on a space
        ("hello world again", 13, "hello world"),  # mid-word: back to the last boundary
        ("hello   world", 7, "hello"),  # trailing spaces of the kept part dropped
        ("supercalifragilistic", 5, "super"),  # one word longer than the limit: cut inside it
        ("one two\nthree", 9, "one two"),
        ("", 5, ""),
    ],
)
def test_replies_are_cut_at_a_word_boundary(text: str, limit: int, expected: str) -> None:
    assert prompt.cut_reply(text, limit) == expected
    assert len(prompt.cut_reply(text, limit)) <= limit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ""),
        ("  Hi there \n", "Hi there"),
        ("<think>they want a time</think>\nTuesday at 9?", "Tuesday at 9?"),
        ("<THINK>\nmulti\nline\n</THINK>Ok", "Ok"),
        ("The user wants X, keep it short.\n</think>\n\nSure, your recall is free.", "Sure, your recall is free."),
        ("<think>I should not leak this reasoning", ""),
        ("Tuesday works. <think>they might also", "Tuesday works."),
        ("<think>a</think>Hi <think>b</think>there", "Hi there"),
        ("Tue\x00sday at 9?\x07", "Tuesday at 9?"),  # control characters: carriers refuse or mangle them
        ("\x1b[1mBold\x1b[0m text", "Bold text"),  # a terminal's escape sequences go whole
        ("\x1b]0;title\x07Hi \x1b(Bthere\x1b]8;;https://x.test\x1b\\link", "Hi therelink"),
        # A stray escape character goes alone: the text after it stays.
        ("Call \x1b555-0100", "Call 555-0100"),
        ("Call \x1b(555) 555-0100", "Call (555) 555-0100"),
        ("\x1b[38;5;208mOrange\x1b[0m and \x1b(0lines\x1b(B", "Orange and lines"),
        ("Price\x1b $5.00", "Price $5.00"),
        ("Booked!\x1b] You are on Tuesday", "Booked!] You are on Tuesday"),
        ("Line one\nline two", "Line one\nline two"),
        ("\u200b\ufeff", ""),  # nothing visible: no reply
    ],
)
def test_reasoning_blocks_and_whitespace_are_removed_from_replies(raw: str | None, expected: str) -> None:
    assert prompt.clean_reply(raw) == expected


def message(seq: int, direction: str, content: str, *, author: str | None = None, status: str = "delivered") -> Message:
    return Message(
        id=f"m{seq}",
        conversation_id="c",
        org_id="o",
        seq=seq,
        direction=direction,
        author=author or ("agent" if direction == "outbound" else "customer"),
        from_number="+1",
        to_number="+2",
        content=content,
        status=status if direction == "outbound" else "received",
        provider="simulator",
        provider_message_id=None,
        error_code=None,
        encoding="GSM-7",
        segments=1,
        created_at=seq,
        sent_at=None,
        delivered_at=None,
    )


def call(
    pos: int, after_seq: int, *, turn: str = "t1", round_: int = 1, result: str | None = '{"ok":true}', **kw: Any
) -> ToolCall:
    return ToolCall(
        pos=pos,
        id=f"tc{pos}",
        conversation_id="c",
        org_id="o",
        turn_id=turn,
        round=round_,
        position=kw.get("position", 0),
        call_id=f"call_{pos}",
        after_seq=after_seq,
        assistant_content=kw.get("content"),
        name=kw.get("name", "lookup"),
        kind="webhook",
        arguments=kw.get("arguments", '{"q": 1}'),
        result=result,
        created_at=0,
    )


def test_history_puts_tool_calls_after_the_message_the_model_had_seen_and_replies_after_them() -> None:
    messages = [
        message(1, "outbound", "Hi Ada"),
        message(2, "inbound", "Is it open?"),
        message(3, "inbound", "also, the price?"),  # arrived while the turn ran
        message(4, "outbound", "It is open and free."),  # that turn's reply
        message(5, "inbound", "Thanks"),
    ]
    calls = [
        call(1, 2, content="Checking.", position=0),
        call(2, 2, position=1, name="price"),
        call(3, 2, round_=2, result=None),  # interrupted before it finished
    ]

    chat = prompt.history(messages, calls, {"m4": 2})

    assert [m["role"] for m in chat] == [
        "assistant",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    assert chat[2] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "price", "arguments": '{"q": 1}'}},
        ],
    }
    assert [chat[3]["tool_call_id"], chat[4]["tool_call_id"]] == ["call_1", "call_2"]
    assert chat[5]["tool_calls"][0]["id"] == "call_3" and chat[5]["content"] is None
    assert json.loads(chat[6]["content"]) == {"error": "the tool call was interrupted before it finished"}
    assert chat[7] == {"role": "assistant", "content": "It is open and free."}
    assert chat[8] == {"role": "user", "content": "also, the price?\nThanks"}


def test_history_joins_bursts_and_leaves_out_sms_the_customer_never_got() -> None:
    messages = [
        message(1, "outbound", "Hi"),
        message(2, "outbound", "lost", status="failed"),
        message(3, "inbound", "a"),
        message(4, "inbound", "b"),
        message(5, "outbound", "Reply STOP to opt out.", author="system"),
        message(6, "outbound", "A person here.", author="operator"),
    ]
    assert prompt.history(messages, []) == [
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "Reply STOP to opt out.\nA person here."},
    ]


def test_invalid_tool_arguments_are_replayed_as_an_empty_object() -> None:
    chat = prompt.history([message(1, "inbound", "x")], [call(1, 1, arguments="{oops")])
    assert chat[1]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_an_opening_request_is_two_system_messages() -> None:
    settings = AgentSettings(name="a", system_prompt="You work for {{shop}}.", max_reply_chars=300)
    messages = prompt.opening_messages(settings, {"shop": "PAM"})
    assert [m["role"] for m in messages] == ["system", "system"]
    assert messages[0]["content"] == "You work for PAM."
    assert "300 characters" in messages[1]["content"]
    assert [m["role"] for m in prompt.opening_messages(AgentSettings(name="a"), {})] == ["system"]


@pytest.mark.parametrize(
    ("messages", "answered", "expected"),
    [
        ([message(1, "outbound", "Hi")], 0, False),
        ([message(1, "outbound", "Hi"), message(2, "inbound", "hey")], 0, True),
        ([message(1, "outbound", "Hi"), message(2, "inbound", "hey")], 2, False),
        # a text that arrived while the last turn ran has a lower seq than that turn's reply: still unanswered
        ([message(2, "inbound", "a"), message(3, "inbound", "b"), message(4, "outbound", "re: a")], 2, True),
        ([message(2, "inbound", "hey"), message(3, "outbound", "a person", author="operator")], 0, False),
        # a person's message on its way answers; one known not to have reached the phone does not
        (
            [message(2, "inbound", "hey"), message(3, "outbound", "a person", author="operator", status="queued")],
            0,
            False,
        ),
        (
            [message(2, "inbound", "hey"), message(3, "outbound", "a person", author="operator", status="failed")],
            0,
            True,
        ),
        (
            [message(2, "inbound", "hey"), message(3, "outbound", "a person", author="operator", status="undelivered")],
            0,
            True,
        ),
        ([message(2, "inbound", "HELP"), message(3, "outbound", "help text", author="system")], 0, False),
        ([message(2, "inbound", "hi"), message(3, "inbound", "HELP")], 0, True),
    ],
)
def test_a_turn_answers_only_customer_texts_no_one_has_read(
    messages: list[Message], answered: int, expected: bool
) -> None:
    assert needs_reply(messages, answered) is expected


def agent_settings(tools_: list[dict[str, Any]]) -> AgentSettings:
    return msgspec.convert({"name": "a", "tools": tools_}, AgentSettings)


WEBHOOK = {
    "type": "webhook",
    "name": "lookup",
    "description": "Look it up.",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    "url": "https://tools.example.com/lookup",
}


def test_specs_offer_webhook_tools_as_functions_and_built_ins_only_when_listed() -> None:
    offered = tools.specs(agent_settings([WEBHOOK, {"type": "handoff_to_human"}]))
    assert offered[0] == {
        "type": "function",
        "function": {"name": "lookup", "description": "Look it up.", "parameters": WEBHOOK["parameters"]},
    }
    assert offered[1]["function"]["name"] == "handoff_to_human"
    assert offered[1]["function"]["parameters"]["required"] == ["summary"]
    assert len(offered) == 2
    assert tools.specs(agent_settings([])) == []
    assert tools.kind_of(agent_settings([WEBHOOK]), "end_conversation") == ("unknown", None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', ({"a": 1}, None)),
        ("", ({}, None)),
        ("[1]", (None, "the arguments must be a JSON object")),
        ("{nope", (None, "the arguments are not valid JSON")),
    ],
)
def test_tool_arguments_must_be_a_json_object(text: str, expected: tuple[Any, Any]) -> None:
    assert tools.parse_arguments(text) == expected


def test_check_tools_reports_every_problem_by_field() -> None:
    settings = agent_settings(
        [
            {**WEBHOOK, "url": "http://tools.example.com/x"},
            {**WEBHOOK, "name": "handoff_to_human", "url": "https://10.0.0.1/x"},
        ]
    )
    with pytest.raises(ValidationFailed) as raised:
        tools.check_tools(settings.tools, tools.STRICT_URL_POLICY, resolve=lambda host, port: [])
    fields = [d.field for d in raised.value.details]
    assert fields == ["tools.0.url", "tools.1.name", "tools.1.url"]
    tools.check_tools(agent_settings([WEBHOOK]).tools, tools.STRICT_URL_POLICY, resolve=lambda host, port: [])


def test_model_answers_of_odd_shapes_are_read_or_refused() -> None:
    answer = parse_answer(
        {
            "choices": [
                {
                    "message": {
                        "content": None,
                        "tool_calls": [
                            {"id": "c1", "function": {"name": "lookup", "arguments": {"q": "x"}}},
                            {"function": {"name": "other"}},
                            {"id": "c3", "type": "custom", "custom": {"name": "x"}},
                        ],
                    }
                }
            ]
        }
    )
    assert [(c.call_id, c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [
        ("c1", "lookup", {"q": "x"}),
        ("call_1", "other", {}),
    ]
    with pytest.raises(ModelError):
        parse_answer({"choices": []})
    with pytest.raises(ModelError):
        parse_answer({"choices": [{"finish_reason": "stop"}]})
    # Content as a list of parts (some OpenAI-compatible servers): the text parts, joined.
    parts = [
        {"type": "text", "text": "Hello "},
        {"type": "reasoning", "text": "The customer wants..."},  # never texted to the customer
        {"type": "image_url", "image_url": {}},
        {"type": "text", "text": "!"},
    ]
    assert parse_answer({"choices": [{"message": {"content": parts}}]}).content == "Hello !"


@pytest.mark.parametrize(
    "answer",
    [
        {"choices": {"0": {"message": {"content": "hi"}}}},
        {"choices": 5},
        {"choices": ["hi"]},
        {"choices": [{"message": "hello there"}]},
        {"choices": [{"message": ["hello"]}]},
        {"choices": [{"message": {"content": 5}}]},
        {"choices": [{"message": {"content": {"text": "hi"}}}]},
        {"choices": [{"message": {"content": [5]}}]},
        {"choices": [{"message": {"content": "hi", "tool_calls": {"id": "c1"}}}]},
        {"choices": [{"message": {"content": "hi", "tool_calls": {}}}]},
    ],
)
def test_an_answer_not_shaped_like_a_chat_completion_is_a_bad_response_to_retry(answer: Any) -> None:
    """Not a crash of the turn (`internal_error` after one try), nor an empty reply that marks the text answered."""
    with pytest.raises(ModelError) as raised:
        parse_answer(answer)
    assert raised.value.code == "model_bad_response"


def test_a_help_answered_during_the_debounce_goes_before_the_text_the_model_answers() -> None:
    """A burst "question one" + "INFO": Parley answers the HELP itself; the model's history leaves the keyword out
    and ends with the customer's question, not with Parley's answer (some servers continue a trailing
    assistant message instead of answering)."""
    messages = [
        message(1, "outbound", "Hi Ada, your recall repair is free."),
        message(2, "inbound", "question one"),
        message(3, "inbound", "INFO"),
        message(4, "outbound", "Reply STOP to unsubscribe.", author="system"),
    ]
    assert prompt.history(messages, []) == [
        {"role": "assistant", "content": "Hi Ada, your recall repair is free.\nReply STOP to unsubscribe."},
        {"role": "user", "content": "question one"},
    ]


def test_a_message_of_parleys_own_before_the_customers_latest_text_keeps_its_place() -> None:
    messages = [
        message(1, "outbound", "Hi Ada."),
        message(2, "inbound", "ok"),
        message(3, "outbound", "Are you still there?", author="system"),
        message(4, "inbound", "yes, Tuesday"),
        message(5, "inbound", "  stop  "),
    ]
    assert prompt.history(messages, []) == [
        {"role": "assistant", "content": "Hi Ada."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Are you still there?"},
        {"role": "user", "content": "yes, Tuesday"},
    ]


def test_a_help_keyword_the_provider_recognised_is_never_handed_to_the_model() -> None:
    """Twilio answered "AIDE" itself (a Messaging Service keyword, `OptOutType=HELP`): Parley stored it as a HELP,
    so no turn answers it and no history shows it, though its body is not one of Parley's keywords."""
    aide = msgspec.structs.replace(message(4, "inbound", "AIDE"), keyword="help")
    messages = [message(1, "outbound", "Hi Ada."), message(2, "inbound", "ok"), message(3, "outbound", "Great!"), aide]
    assert needs_reply(messages, answered_seq=2) is False
    assert prompt.history(messages, []) == [
        {"role": "assistant", "content": "Hi Ada."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Great!"},
    ]
    yes = msgspec.structs.replace(message(5, "inbound", "Oui"), keyword="opt_in")  # an opt-in word is still a text
    assert needs_reply([*messages, yes], answered_seq=4) is True


def test_an_mms_reaches_the_model_as_a_note_of_what_it_cannot_see() -> None:
    photo = Media(url="https://api.twilio.com/m/ME0", content_type="image/jpeg")
    clip = Media(url="https://api.twilio.com/m/ME1", content_type="video/mp4")
    messages = [
        message(1, "outbound", "Hi Ada."),
        msgspec.structs.replace(message(2, "inbound", ""), media=(photo,)),
        msgspec.structs.replace(message(3, "inbound", "the dashboard light"), media=(photo, clip)),
    ]
    assert prompt.history(messages, [])[1] == {
        "role": "user",
        "content": "[The customer sent 1 attachment (image/jpeg), which you cannot see.]\n"
        "the dashboard light\n"
        "[The customer sent 2 attachments (image/jpeg, video/mp4), which you cannot see.]",
    }
    assert needs_reply(messages, answered_seq=1) is True


def test_the_history_ends_with_the_customer_also_when_a_text_came_during_the_last_turn() -> None:
    """The last turn's reply is placed after the text it answered, before one that arrived while it ran; a HELP
    answered since then still goes before that unanswered text."""
    messages = [
        message(1, "outbound", "Hi Ada."),
        message(2, "inbound", "can I book?"),
        message(3, "inbound", "Tuesday?"),  # arrived while the turn answering seq 2 ran
        message(4, "outbound", "Sure, what time?"),  # that turn's reply
        message(5, "inbound", "HELP"),
        message(6, "outbound", "Reply STOP to unsubscribe.", author="system"),
    ]
    assert needs_reply(messages, answered_seq=2) is True
    assert prompt.history(messages, [], {"m4": 2}) == [
        {"role": "assistant", "content": "Hi Ada."},
        {"role": "user", "content": "can I book?"},
        {"role": "assistant", "content": "Sure, what time?\nReply STOP to unsubscribe."},
        {"role": "user", "content": "Tuesday?"},
    ]


def test_a_help_answered_after_a_failed_tool_round_goes_before_that_round() -> None:
    """The last turn called a tool, then the model failed; a HELP came and was answered. The history goes on from
    the tool round (its calls and results together), not from Parley's answer."""
    messages = [
        message(1, "outbound", "Hi Ada."),
        message(2, "inbound", "is my recall open?"),
        message(3, "inbound", "HELP"),
        message(4, "outbound", "Reply STOP to unsubscribe.", author="system"),
    ]
    chat = prompt.history(messages, [call(1, 2)])
    assert [m["role"] for m in chat] == ["assistant", "user", "assistant", "assistant", "tool"]
    assert chat[2] == {"role": "assistant", "content": "Reply STOP to unsubscribe."}
    assert "tool_calls" in chat[3]
