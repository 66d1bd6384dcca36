"""The assistant loop end to end: the real app, a scripted model and a tool server on loopback.

The model is called through the real `openai` client and the tool through the guarded `httpx2`
client; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from app.clock import FakeClock
from app.domain import assistant as assistant_module
from app.domain import messaging
from app.providers.base import ProviderRejected
from app.providers.simulator import SimulatorProvider
from tests.assistant_support import (
    CUSTOMER,
    OURS,
    VARIABLES,
    call_tool,
    make_agent,
    open_conversation,
    replies,
    running,
    settle,
    signers,
    text_in,
    webhook_tool,
)
from tests.conftest import Harness
from tests.fake_llm import FakeLLM, FakeToolServer, Step
from tests.provider_doubles import BreaksOnNth, ReportsFailureLater, SimulatorHolding
from tests.seed import SEED_CREATE
from tests.webhook_receiver import eventually


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def tool_server() -> Iterator[FakeToolServer]:
    with FakeToolServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
async def h(tmp_path: Path, llm: FakeLLM) -> AsyncIterator[Harness]:
    async with running(tmp_path, llm) as harness:
        yield harness


def events(h: Harness, conversation_id: str, *types: str) -> list[dict[str, Any]]:
    rows = h.rows("SELECT payload FROM events WHERE conversation_id = ? ORDER BY sequence", conversation_id)
    payloads = [json.loads(row["payload"]) for row in rows]
    return [p for p in payloads if not types or p["event"] in types]


# --- plain turns --------------------------------------------------------------------------------


async def test_a_customer_text_gets_one_model_reply_sent_as_an_agent_sms(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.reply("Great, Ada! Which day suits you?")

    await text_in(h, "Yes please")

    assert await eventually(lambda: replies(h, conversation_id)) == ["Great, Ada! Which day suits you?"]
    (request,) = llm.bodies
    assert request["model"] == "test-model"
    assert "tools" not in request  # the agent offers none
    assert request["messages"] == [
        {"role": "system", "content": "You text Ada for PAM Motors."},
        {"role": "assistant", "content": "Hi Ada, your recall repair is free. Want to book?"},
        {"role": "user", "content": "Yes please"},
    ]
    phone = (await h.get("/v1/simulator/messages", number=CUSTOMER)).json()["data"]
    assert phone[-1]["body"] == "Great, Ada! Which day suits you?"
    sent = events(h, conversation_id, "sms.message_sent")
    assert sent[-1]["data"]["author"] == "agent"


async def test_an_empty_model_answer_sends_nothing(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.reply("   ")
    await text_in(h, "ok")
    await llm.wait_for_requests(1)
    await settle()
    assert replies(h, conversation_id) == []


async def test_a_long_reply_is_cut_at_a_word_boundary(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h, maxReplyChars=20)
    conversation_id = await open_conversation(h, agent)
    llm.reply("The repair takes about two hours at the dealership.")
    await text_in(h, "How long?")
    assert await eventually(lambda: replies(h, conversation_id)) == ["The repair takes"]


@pytest.mark.parametrize("limit", [3, 4])
async def test_the_model_sees_the_opening_and_the_most_recent_messages_of_a_long_conversation(
    h: Harness, llm: FakeLLM, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """Past HISTORY_LIMIT messages, the model gets the opening (what the conversation is about) and the most recent
    HISTORY_LIMIT from a text of the customer's on; the ones between are left out. With 4, the window would start
    with a reply of the assistant's, which would follow the opening and be joined to it: one message it never sent
    (and the model would read its own question as left unanswered)."""
    monkeypatch.setattr(assistant_module, "HISTORY_LIMIT", limit)  # the production 400, shrunk for the test
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.reply("Which day suits you?").reply("Tuesday it is.").reply("See you then.")
    for count, text in enumerate(("Book me in", "Tuesday", "Thanks"), start=1):
        await text_in(h, text)
        await eventually(lambda n=count: len(replies(h, conversation_id)) == n)
    assert llm.bodies[1]["messages"][1:] == [  # four messages: all of them
        {"role": "assistant", "content": "Hi Ada, your recall repair is free. Want to book?"},
        {"role": "user", "content": "Book me in"},
        {"role": "assistant", "content": "Which day suits you?"},
        {"role": "user", "content": "Tuesday"},
    ]
    assert llm.bodies[2]["messages"] == [  # six: the opening, then the last ones from a customer text on
        {"role": "system", "content": "You text Ada for PAM Motors."},
        {"role": "assistant", "content": "Hi Ada, your recall repair is free. Want to book?"},
        {"role": "user", "content": "Tuesday"},
        {"role": "assistant", "content": "Tuesday it is."},
        {"role": "user", "content": "Thanks"},
    ]


# --- webhook tools ------------------------------------------------------------------------------


async def test_a_tool_call_reaches_the_tool_signed_and_its_result_reaches_the_model(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url + "/recalls")])
    conversation_id = await open_conversation(h, agent)
    tool_server.then(200, {"recallId": "24V-123", "status": "open", "repair": "free"})
    llm.call_tools(("lookup_recall", {"recallId": "24V-123"})).reply("Your recall 24V-123 is open; the fix is free.")

    await text_in(h, "Is my recall still open?")

    assert await eventually(lambda: replies(h, conversation_id)) == ["Your recall 24V-123 is open; the fix is free."]
    (call,) = tool_server.requests
    Webhook(agent["toolSecret"]).verify(call.body, call.headers)  # raises when the signature is wrong
    payload = call.json()
    assert call.path == "/recalls"
    assert payload["name"] == "lookup_recall"
    assert payload["arguments"] == {"recallId": "24V-123"}
    assert payload["dynamicVariables"] == VARIABLES
    assert payload["conversationId"] == conversation_id
    assert payload["agentId"] == agent["agentId"]
    assert payload["metadata"] == {"crmId": "c-1"}
    assert call.headers["webhook-id"] == payload["toolCallId"]

    first, second = llm.bodies
    assert [t["function"]["name"] for t in first["tools"]] == ["lookup_recall"]
    assistant_call, tool_result = second["messages"][-2:]
    assert assistant_call["role"] == "assistant"
    assert assistant_call["tool_calls"][0]["function"] == {
        "name": "lookup_recall",
        "arguments": '{"recallId": "24V-123"}',
    }
    assert tool_result["role"] == "tool"
    assert tool_result["tool_call_id"] == assistant_call["tool_calls"][0]["id"]
    assert json.loads(tool_result["content"]) == {"recallId": "24V-123", "status": "open", "repair": "free"}

    invocation, result = events(h, conversation_id, "sms.tool_call_invocation", "sms.tool_call_result")
    assert invocation["data"] == {
        "toolCallId": payload["toolCallId"],
        "name": "lookup_recall",
        "arguments": {"recallId": "24V-123"},
    }
    assert result["data"]["toolCallId"] == payload["toolCallId"]
    assert result["data"]["result"] == {"recallId": "24V-123", "status": "open", "repair": "free"}
    assert result["data"]["isError"] is False
    assert isinstance(result["data"]["durationMs"], int)
    assert invocation["sequence"] < result["sequence"]

    listed = (await h.get(f"/v1/sms-conversations/{conversation_id}/tool-calls")).json()
    (item,) = listed["data"]
    assert uuid.UUID(item["toolCallId"]).version == 4
    assert item["toolCallId"] == payload["toolCallId"]
    assert item["name"] == "lookup_recall"
    assert item["arguments"] == {"recallId": "24V-123"}
    assert item["result"]["status"] == "open"
    assert item["isError"] is False
    assert item["status"] == "completed"
    assert listed["meta"]["next_cursor"] is None
    one = (await h.get(f"/v1/sms-conversations/{conversation_id}/tool-calls", limit=1)).json()
    assert one["data"] == listed["data"] and one["meta"]["next_cursor"] is None  # a full last page


async def test_during_a_rotation_both_tool_secrets_sign(h: Harness, llm: FakeLLM, tool_server: FakeToolServer) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    rotated = (await h.post(f"/v1/agents/{agent['agentId']}/rotate-tool-secret")).json()["data"]
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("lookup_recall", {"recallId": "1"})).reply("done")
    await text_in(h, "check")
    await eventually(lambda: replies(h, conversation_id))
    (call,) = tool_server.requests
    Webhook(rotated["toolSecret"]).verify(call.body, call.headers)
    Webhook(agent["toolSecret"]).verify(call.body, call.headers)
    assert len(call.headers["webhook-signature"].split()) == 2


HOUR = 3600


async def rotate_tool_secret(h: Harness, agent_id: str) -> str:
    rotated = await h.post(f"/v1/agents/{agent_id}/rotate-tool-secret")
    assert rotated.status_code == 200, rotated.text
    return str(rotated.json()["data"]["toolSecret"])


async def test_every_tool_secret_rotated_away_within_a_day_keeps_signing(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    """Two rotations seconds apart (s0 -> s1 -> s2): a tool server still on s0 keeps verifying."""
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    s0 = agent["toolSecret"]
    s1 = await rotate_tool_secret(h, agent["agentId"])
    s2 = await rotate_tool_secret(h, agent["agentId"])
    conversation_id = await open_conversation(h, agent)
    call = await call_tool(h, llm, tool_server, conversation_id)
    assert signers(call, [s0, s1, s2]) == [s2, s1, s0]
    for secret in (s0, s1, s2):
        Webhook(secret).verify(call.body, call.headers)


async def test_a_rotated_tool_secret_stops_signing_24_hours_after_its_own_rotation(
    tmp_path: Path, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    clock = FakeClock()
    async with running(tmp_path, llm, clock=clock) as h:
        agent = await make_agent(h, tools=[webhook_tool(tool_server.url)], inactivityTimeoutSeconds=30 * 24 * HOUR)
        s0 = agent["toolSecret"]
        s1 = await rotate_tool_secret(h, agent["agentId"])
        await clock.advance(12 * HOUR)
        s2 = await rotate_tool_secret(h, agent["agentId"])
        conversation_id = await open_conversation(h, agent)
        secrets = [s0, s1, s2]
        assert signers(await call_tool(h, llm, tool_server, conversation_id), secrets) == [s2, s1, s0]
        # 24 h after the first rotation s0 stops signing; s1, rotated away 12 h later, still signs.
        await clock.advance(12 * HOUR + 0.001)
        assert signers(await call_tool(h, llm, tool_server, conversation_id), secrets) == [s2, s1]
        await clock.advance(12 * HOUR)
        assert signers(await call_tool(h, llm, tool_server, conversation_id), secrets) == [s2]


async def test_at_most_ten_rotated_tool_secrets_sign_the_oldest_are_dropped(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    secrets = [agent["toolSecret"]]
    for _ in range(12):
        secrets.append(await rotate_tool_secret(h, agent["agentId"]))
    newest_first = secrets[::-1]
    conversation_id = await open_conversation(h, agent)
    call = await call_tool(h, llm, tool_server, conversation_id)
    assert signers(call, secrets) == newest_first[:11]  # the current secret and the ten rotated away last
    (row,) = h.rows("SELECT previous_tool_secrets FROM agents WHERE id = ?", agent["agentId"])
    assert [p["secret"] for p in json.loads(row["previous_tool_secrets"])] == newest_first[1:11]


async def test_the_next_turn_sees_earlier_tool_calls_and_results_in_their_roles(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    conversation_id = await open_conversation(h, agent)
    tool_server.then(200, {"status": "open"})
    llm.call_tools(("lookup_recall", {"recallId": "24V-123"}), content="Let me check.").reply("It is open.")
    await text_in(h, "Is it open?")
    await eventually(lambda: replies(h, conversation_id))

    llm.reply("You're welcome!")
    await text_in(h, "Thanks")
    await eventually(lambda: len(replies(h, conversation_id)) == 2)

    messages = llm.bodies[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "assistant", "user", "assistant", "tool", "assistant", "user"]
    call_message, tool_message = messages[3], messages[4]
    assert call_message["content"] == "Let me check."
    (call,) = call_message["tool_calls"]
    assert call["type"] == "function"
    assert call["function"]["name"] == "lookup_recall"
    assert json.loads(call["function"]["arguments"]) == {"recallId": "24V-123"}
    assert tool_message["tool_call_id"] == call["id"]
    assert json.loads(tool_message["content"]) == {"status": "open"}
    assert messages[2]["content"] == "Is it open?"
    assert messages[5]["content"] == "It is open."
    assert messages[6]["content"] == "Thanks"


@pytest.mark.parametrize(
    ("script", "timeout", "expected_error"),
    [
        ({"status": 200, "raw": b"<html>not json</html>"}, 10.0, "not valid JSON"),
        ({"status": 200, "raw": b"{"}, 10.0, "not valid JSON"),
        ({"status": 200, "raw": b"[" * 7000 + b"]" * 7000}, 10.0, "not valid JSON"),  # deeper than recursion allows
        ({"status": 500, "body": {"detail": "db down"}}, 10.0, "HTTP 500"),
        ({"status": 302, "raw": b""}, 10.0, "HTTP 302"),
        ({"status": 200, "raw": b'"' + b"x" * 17000 + b'"'}, 10.0, "larger than 16 KiB"),
        ({"status": 200, "body": {"late": True}, "delay": 1.0}, 0.2, "did not answer within 0.2 seconds"),
    ],
    ids=["html", "truncated-json", "nested-too-deep", "http-500", "redirect", "oversized", "timeout"],
)
async def test_a_failing_tool_gives_the_model_an_error_result_not_a_crash(
    h: Harness,
    llm: FakeLLM,
    tool_server: FakeToolServer,
    script: dict[str, Any],
    timeout: float,
    expected_error: str,
) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url, timeoutSeconds=timeout)])
    conversation_id = await open_conversation(h, agent)
    tool_server.then(**script)
    llm.call_tools(("lookup_recall", {"recallId": "1"})).reply("Sorry, I can't look that up right now.")

    await text_in(h, "Check my recall")

    assert await eventually(lambda: replies(h, conversation_id)) == ["Sorry, I can't look that up right now."]
    tool_message = llm.bodies[1]["messages"][-1]
    assert tool_message["role"] == "tool"
    assert expected_error in json.loads(tool_message["content"])["error"]
    (result,) = events(h, conversation_id, "sms.tool_call_result")
    assert result["data"]["isError"] is True
    assert expected_error in result["data"]["result"]["error"]
    assert events(h, conversation_id, "sms.assistant_error") == []


async def test_a_stored_tool_url_the_client_cannot_call_is_an_error_result_not_a_failed_turn(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    """A URL stored before registration checked hosts as the HTTP client spells them (`☃.net` has no IDNA 2008
    form): the call fails before it leaves, and the model is told so; the turn goes on."""
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    conn = sqlite3.connect(h.settings.database)
    with conn:
        conn.execute(
            "UPDATE agents SET config = json_set(config, '$.tools[0].url', ?) WHERE id = ?",
            ("http://\u2603.net/hook", agent["agentId"]),
        )
    conn.close()
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("lookup_recall", {"recallId": "1"})).reply("Sorry, I can't look that up right now.")

    await text_in(h, "Check my recall")

    assert await eventually(lambda: replies(h, conversation_id)) == ["Sorry, I can't look that up right now."]
    (result,) = events(h, conversation_id, "sms.tool_call_result")
    assert result["data"]["isError"] is True
    assert "cannot be called" in result["data"]["result"]["error"]
    assert events(h, conversation_id, "sms.assistant_error") == []
    assert tool_server.requests == []


async def test_an_operator_answering_during_a_tool_call_stops_the_turns_further_calls(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    """Once a person answered the texts, the turn's reply is dropped, so its further tool calls (which can act in
    the world: a booking) and model rounds must not run either."""
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    conversation_id = await open_conversation(h, agent)
    tool_server.then(200, {"booked": "tue"}, delay=0.6)
    llm.call_tools(("lookup_recall", {"recallId": "1"}), ("lookup_recall", {"recallId": "2"}))

    await text_in(h, "Book both")
    await eventually(lambda: len(tool_server.requests) == 1)  # the first call is on the wire
    operator = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "I'll handle this."})
    assert operator.status_code == 201
    await eventually(lambda: events(h, conversation_id, "sms.tool_call_result"))
    await settle(0.5)

    assert len(tool_server.requests) == 1  # not the round's second call
    assert len(llm.bodies) == 1  # nor another round
    assert replies(h, conversation_id) == []
    assert len(events(h, conversation_id, "sms.tool_call_invocation")) == 1

    llm.reply("Anything else?")  # the next text is the assistant's again
    await text_in(h, "Thanks")
    assert await eventually(lambda: replies(h, conversation_id)) == ["Anything else?"]


async def test_a_hand_off_after_a_webhook_call_a_person_answered_during_still_pauses_the_assistant(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    """Only calls that act in the world stop once a person answered: the hand-off in the same round still happens,
    so the assistant does not answer the customer's next text in the person's place."""
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url), {"type": "handoff_to_human"}])
    conversation_id = await open_conversation(h, agent)
    tool_server.then(200, {"ok": True}, delay=0.6)
    llm.call_tools(("lookup_recall", {"recallId": "1"}), ("handoff_to_human", {"summary": "Wants a person"}))
    await text_in(h, "Check my recall, and I want a person")
    await eventually(lambda: len(tool_server.requests) == 1)
    answered = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
    assert answered.status_code == 201
    await eventually(lambda: events(h, conversation_id, "sms.handoff_requested"))
    await settle(0.3)
    assert len(llm.requests) == 1  # no round after the person's answer
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert conversation["assistantPaused"] is True
    await text_in(h, "Hello? I asked for a person")
    await settle(0.3)
    assert len(llm.requests) == 1 and replies(h, conversation_id) == []


@pytest.mark.parametrize("when", ["while the model thinks", "during an earlier webhook call"])
async def test_a_person_answering_before_the_rounds_webhook_call_skips_it_and_still_hands_off(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer, when: str
) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url), {"type": "handoff_to_human"}])
    conversation_id = await open_conversation(h, agent)
    tool_server.then(200, {"ok": True}, delay=0.6)
    calls = [("lookup_recall", {"recallId": "1"}), ("handoff_to_human", {"summary": "Wants a person"})]
    if when == "during an earlier webhook call":
        calls.insert(0, ("lookup_recall", {"recallId": "0"}))
    llm.call_tools(*calls, delay=0.6 if when == "while the model thinks" else 0.0)
    await text_in(h, "Check my recall, and I want a person")
    if when == "while the model thinks":
        await llm.wait_for_requests(1)
    else:
        await eventually(lambda: len(tool_server.requests) == 1)
    answered = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
    assert answered.status_code == 201
    await eventually(lambda: events(h, conversation_id, "sms.handoff_requested"))
    await settle(0.3)
    assert [r.json()["arguments"]["recallId"] for r in tool_server.requests] == (
        [] if when == "while the model thinks" else ["0"]
    )
    assert len(llm.requests) == 1
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert conversation["assistantPaused"] is True


async def test_an_operator_message_the_provider_refused_does_not_silence_the_turn(tmp_path: Path, llm: FakeLLM) -> None:
    """A refused operator message (502, stored `failed`) reached no one: the turn answering the customer still
    sends its reply."""
    refusing = BreaksOnNth(2, ProviderRejected("21610", "The recipient has unsubscribed"))  # the opening goes out
    async with running(tmp_path, llm, provider=refusing) as h:
        agent = await make_agent(h)
        conversation_id = await open_conversation(h, agent)
        llm.reply("Yes, the repair is free.", delay=0.6)
        await text_in(h, "Is it free?")
        await llm.wait_for_requests(1)
        refused = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
        assert refused.status_code == 502
        assert await eventually(lambda: replies(h, conversation_id)) == ["Yes, the repair is free."]


@pytest.mark.parametrize("how", ["reported failed", "refused"])
async def test_texts_a_turn_left_to_a_person_are_answered_when_the_persons_message_then_fails(
    tmp_path: Path, llm: FakeLLM, how: str
) -> None:
    """The turn looked while the person's message was still on its way (`queued`) and dropped its reply; that message
    then failed (the carrier reports it failed, or the provider refuses it): it answered nothing, so the customer's
    text is answered after all."""
    provider = ReportsFailureLater(2, refuse=how == "refused")  # the opening goes out; the operator's message fails
    async with running(tmp_path, llm, provider=provider) as h:
        agent = await make_agent(h)
        conversation_id = await open_conversation(h, agent)
        llm.reply("The dropped answer.", delay=0.4).reply("Yes, the repair is free.")
        await text_in(h, "Is it free?")
        await llm.wait_for_requests(1)
        posting = asyncio.create_task(
            h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
        )
        await asyncio.wait_for(provider.holding.wait(), 5)  # persisted `queued`, on its way
        await eventually(lambda: h.rows("SELECT COUNT(*) AS n FROM assistant_turns")[0]["n"] == 1)
        await settle(0.2)
        assert replies(h, conversation_id) == []  # the person's message stood for the reply

        if how == "refused":
            provider.release.set()
            assert (await posting).status_code == 502
        else:
            assert (await posting).status_code == 201
            await provider.report_failure()

        assert await eventually(lambda: replies(h, conversation_id)) == ["Yes, the repair is free."]
        assert len(llm.requests) == 2


async def test_a_persons_message_failing_while_the_turn_waits_for_more_texts_keeps_the_wait(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """The failure hands the texts back to the turn already waiting out its debounce: it still waits, and answers the
    burst with one reply, not the first text at once and the next one after."""
    provider = ReportsFailureLater(2)  # the opening goes out; the operator's message is taken, then fails
    async with running(tmp_path, llm, provider=provider) as h:
        agent = await make_agent(h, replyDebounceMs=1000)
        conversation_id = await open_conversation(h, agent)
        llm.reply("Yes, and it takes an hour.")
        await text_in(h, "Is it free?")
        sent = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
        assert sent.status_code == 201
        await provider.report_failure()
        await text_in(h, "And how long does it take?")

        assert await eventually(lambda: replies(h, conversation_id)) == ["Yes, and it takes an hour."]
        await settle(0.3)
        assert len(llm.requests) == 1
        texts = [m["content"] for m in llm.bodies[0]["messages"] if m["role"] == "user"]
        assert texts == ["Is it free?\nAnd how long does it take?"]  # one turn read both


async def test_a_persons_message_that_fails_with_nothing_left_unanswered_asks_the_model_nothing(
    tmp_path: Path, llm: FakeLLM
) -> None:
    provider = ReportsFailureLater(3)  # the opening and the assistant's reply go out; the operator's fails
    async with running(tmp_path, llm, provider=provider) as h:
        agent = await make_agent(h)
        conversation_id = await open_conversation(h, agent)
        llm.reply("Yes, the repair is free.")
        await text_in(h, "Is it free?")
        assert await eventually(lambda: replies(h, conversation_id)) == ["Yes, the repair is free."]
        sent = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "See you Tuesday."})
        assert sent.status_code == 201

        await provider.report_failure()
        await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE kind = 'assistant_turn'"))  # the turn has run

        assert len(llm.requests) == 1
        assert replies(h, conversation_id) == ["Yes, the repair is free."]


async def test_a_persons_message_failing_as_the_turn_stops_for_it_does_not_silence_the_text(
    tmp_path: Path, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    """Before its next model call the turn sees the person's message `queued`, while the report that it failed is
    being committed: the turn goes on and answers (its webhook call, skipped for the person, answered as not made),
    rather than being recorded as having answered the text with no reply, its end then closing the conversation
    with no goodbye."""
    provider = ReportsFailureLater(2)  # the opening goes out; the operator's message is taken, then fails
    async with running(tmp_path, llm, provider=provider) as h:
        agent = await make_agent(h, tools=[webhook_tool(tool_server.url), {"type": "end_conversation"}])
        conversation_id = await open_conversation(h, agent)
        llm.call_tools(("lookup_recall", {"recallId": "1"}), ("end_conversation", {"reason": "done"}), delay=0.6)
        llm.reply("Yes, the repair is free. Bye!")
        await text_in(h, "Is it free?")
        await llm.wait_for_requests(1)
        sent = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
        assert sent.status_code == 201
        reporting: list[asyncio.Task[None]] = []

        def report_with_the_end_stored(sql: str) -> None:
            # In the write that stores the round's last result, on the event loop: the report is the next write, which
            # the turn's look before its next model call does not see (it is not committed yet).
            if not reporting and sql.startswith("UPDATE tool_calls SET result"):
                reporting.append(asyncio.get_running_loop().create_task(provider.report_failure()))

        h.ctx.db.writer_connection.set_trace_callback(report_with_the_end_stored)
        try:
            await (await eventually(lambda: reporting))[0]
        finally:
            h.ctx.db.writer_connection.set_trace_callback(None)

        assert await eventually(lambda: replies(h, conversation_id)) == ["Yes, the repair is free. Bye!"]
        closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
        assert closed[0]["data"]["endReason"] == "agent_ended"
        assert tool_server.requests == []
        chat = llm.bodies[1]["messages"]  # every call the model asked for has its result, the skipped one too
        asked = [c["id"] for m in chat if m["role"] == "assistant" for c in m.get("tool_calls", [])]
        answered = [m["tool_call_id"] for m in chat if m["role"] == "tool"]
        assert sorted(answered) == sorted(asked) and len(asked) == 2


async def test_a_hand_off_turn_a_person_answered_leaves_its_texts_to_the_person_when_their_message_fails(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """The person took over while the model wrote the hand-off turn's reply (dropped), and their message then failed:
    the texts a hand-off turn had read are still the person's (README), so the resume answers none of them (the
    model would take the old request for a person as a new one, and hand off again)."""
    provider = ReportsFailureLater(2)  # the opening goes out; the operator's message is taken, then fails
    async with running(tmp_path, llm, provider=provider) as h:
        agent = await make_agent(h, tools=[{"type": "handoff_to_human"}])
        conversation_id = await open_conversation(h, agent)
        llm.call_tools(("handoff_to_human", {"summary": "Wants a person"})).reply("A person will text you.", delay=0.6)
        await text_in(h, "I want a person")
        await llm.wait_for_requests(2)  # handed off; the model is writing the reply
        sent = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Sam here."})
        assert sent.status_code == 201
        await eventually(lambda: h.rows("SELECT COUNT(*) AS n FROM assistant_turns")[0]["n"] == 1)
        await provider.report_failure()

        llm.reply("I'll get you a person.")
        assert (await h.post(f"/v1/sms-conversations/{conversation_id}/resume")).status_code == 200
        await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE kind = 'assistant_turn'"))

        assert len(llm.requests) == 2
        assert replies(h, conversation_id) == []


async def test_a_person_answering_while_the_model_is_retried_stops_the_retries(h: Harness, llm: FakeLLM) -> None:
    h.ctx.assistant.model.retry_delays = (0.5, 0.5)
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.fail(500, times=3)
    await text_in(h, "Hello?")
    await llm.wait_for_requests(1)
    answered = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
    assert answered.status_code == 201
    (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    assert error["data"]["attempts"] == 1  # reported (the model did fail), not tried again
    assert len(llm.requests) == 1


async def test_invalid_arguments_and_unknown_tools_are_error_results_without_calling_anything(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("lookup_recall", "{not json"), ("delete_everything", {})).reply("Hmm.")
    await text_in(h, "go")
    await eventually(lambda: replies(h, conversation_id))

    assert tool_server.requests == []
    tool_messages = [m for m in llm.bodies[1]["messages"] if m["role"] == "tool"]
    assert [json.loads(m["content"])["error"] for m in tool_messages] == [
        "the arguments are not valid JSON",
        "there is no tool named 'delete_everything'",
    ]
    listed = (await h.get(f"/v1/sms-conversations/{conversation_id}/tool-calls")).json()["data"]
    assert [item["arguments"] for item in listed] == ["{not json", {}]

    # The invalid arguments are replayed as `{}` so that strict servers keep accepting the history.
    llm.reply("ok")
    await text_in(h, "again")
    await eventually(lambda: len(replies(h, conversation_id)) == 2)
    replayed = [m for m in llm.bodies[-1]["messages"] if m.get("tool_calls")]
    assert replayed[0]["tool_calls"][0]["function"]["arguments"] == "{}"


async def test_arguments_nested_deeper_than_the_parser_goes_are_invalid_arguments_not_an_internal_error(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    """Arguments nested deeper than Python's recursion limit are arguments that are not valid JSON (an error result
    the model sees, no call), as the answer around them would be a bad response: not a turn that fails."""
    deep = '{"recallId": ' + "[" * 5000 + "]" * 5000 + "}"
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("lookup_recall", deep)).reply("Let me check that again.")
    await text_in(h, "go")

    assert await eventually(lambda: replies(h, conversation_id)) == ["Let me check that again."]
    assert tool_server.requests == []
    (result,) = [m for m in llm.bodies[1]["messages"] if m["role"] == "tool"]
    assert json.loads(result["content"])["error"] == "the arguments are not valid JSON"
    listed = (await h.get(f"/v1/sms-conversations/{conversation_id}/tool-calls")).json()["data"]
    assert [item["arguments"] for item in listed] == [deep]  # shown as the model wrote them
    llm.reply("ok")
    await text_in(h, "again")
    await eventually(lambda: len(replies(h, conversation_id)) == 2)
    replayed = [m for m in llm.bodies[-1]["messages"] if m.get("tool_calls")]
    assert replayed[0]["tool_calls"][0]["function"]["arguments"] == "{}"


async def test_the_tool_call_list_pages_with_its_own_cursors_only(h: Harness, llm: FakeLLM) -> None:
    """A tool-call cursor walks its conversation's tool calls in order; given to the messages of that same
    conversation it is a 400 naming `cursor` (it was read as a message position there)."""
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("nothing_here", {}), ("nor_here", {})).reply("Hmm.")
    await text_in(h, "go")
    await eventually(lambda: replies(h, conversation_id))
    path = f"/v1/sms-conversations/{conversation_id}/tool-calls"
    first = (await h.get(path, limit=1)).json()
    second = (await h.get(path, limit=1, cursor=first["meta"]["next_cursor"])).json()
    assert [item["name"] for item in first["data"] + second["data"]] == ["nothing_here", "nor_here"]
    assert second["meta"]["next_cursor"] is None
    foreign = await h.get(f"/v1/sms-conversations/{conversation_id}/messages", cursor=first["meta"]["next_cursor"])
    assert foreign.status_code == 400
    assert [detail["field"] for detail in foreign.json()["error"]["details"]] == ["cursor"]


async def test_a_turn_run_again_after_a_stop_goes_on_with_the_tool_rounds_it_had_used(
    tmp_path: Path, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    """At most `maxToolRounds` rounds a turn, also across a stop: the re-run does not start counting again."""
    async with running(tmp_path, llm) as h:
        agent = await make_agent(h, tools=[webhook_tool(tool_server.url)], maxToolRounds=1)
        conversation_id = await open_conversation(h, agent)
        llm.call_tools(("lookup_recall", {"recallId": "1"})).hang(2)
        await text_in(h, "Check my recall")
        await llm.wait_for_requests(2)  # the round is done; the model is asked for its words
        assert llm.bodies[1]["tool_choice"] == "none"
        await cut_off(h)
    llm.reply("Your recall is open.")
    calls = len(llm.requests)
    async with running(tmp_path, llm) as h:
        assert await eventually(lambda: replies(h, conversation_id)) == ["Your recall is open."]
        assert len(llm.requests) == calls + 1
        assert llm.bodies[-1]["tool_choice"] == "none"  # its one round is used: words only
        assert len(tool_server.requests) == 1


async def test_tool_rounds_stop_at_max_tool_rounds(h: Harness, llm: FakeLLM, tool_server: FakeToolServer) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)], maxToolRounds=2)
    conversation_id = await open_conversation(h, agent)
    for _ in range(3):
        llm.call_tools(("lookup_recall", {"recallId": "1"}))

    await text_in(h, "loop forever")

    await llm.wait_for_requests(3)
    await settle()
    assert len(llm.bodies) == 3
    assert len(tool_server.requests) == 2
    assert "tool_choice" not in llm.bodies[0]
    assert llm.bodies[2]["tool_choice"] == "none"
    assert replies(h, conversation_id) == []  # the last answer had no text: nothing is sent
    (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    assert error["data"]["error"] == "model_tool_rounds_exhausted"


async def test_text_the_model_writes_with_tool_calls_after_its_last_round_is_sent(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)], maxToolRounds=1)
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("lookup_recall", {"recallId": "1"}))
    llm.call_tools(("lookup_recall", {"recallId": "2"}), content="Your recall is open; the fix is free.")

    await text_in(h, "is it open?")

    assert await eventually(lambda: replies(h, conversation_id)) == ["Your recall is open; the fix is free."]
    assert len(tool_server.requests) == 1  # the call asked for after the last round is not made
    assert events(h, conversation_id, "sms.assistant_error") == []


# --- built-in tools -----------------------------------------------------------------------------


async def say_goodbye(h: Harness, llm: FakeLLM) -> str:
    """An agent with `end_conversation` in a new conversation; the customer says bye, and the model ends the
    conversation with "See you Tuesday!". Returns the conversation's id."""
    agent = await make_agent(h, tools=[{"type": "end_conversation"}])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("end_conversation", {"reason": "booked"})).reply("See you Tuesday!")
    await text_in(h, "Tuesday works, bye")
    return conversation_id


async def test_end_conversation_closes_with_agent_ended_after_the_reply_is_sent(h: Harness, llm: FakeLLM) -> None:
    conversation_id = await say_goodbye(h, llm)

    closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
    assert closed[0]["data"]["endReason"] == "agent_ended"
    assert replies(h, conversation_id) == ["See you Tuesday!"]
    (reply_sent,) = [
        e for e in events(h, conversation_id, "sms.message_sent") if e["data"]["content"] == "See you Tuesday!"
    ]
    assert reply_sent["sequence"] < closed[0]["sequence"]
    offered = [t["function"]["name"] for t in llm.bodies[0]["tools"]]
    assert offered == ["end_conversation"]
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert (conversation["status"], conversation["endReason"]) == ("closed", "agent_ended")


async def cut_off(h: Harness) -> None:
    """Stop the scheduler without letting running turns finish: they are cut off where a crash would cut them."""
    await h.ctx.scheduler.stop(grace=0)


async def end_called_then_cut_off(tmp_path: Path, llm: FakeLLM) -> str:
    """A process whose turn called end_conversation and was cut off while the model wrote the goodbye; returns
    the conversation's id."""
    async with running(tmp_path, llm) as h:
        agent = await make_agent(h, tools=[{"type": "end_conversation"}])
        conversation_id = await open_conversation(h, agent)
        llm.call_tools(("end_conversation", {"reason": "booked"})).hang(2)
        await text_in(h, "Tuesday works, bye")
        await llm.wait_for_requests(2)  # the end is called; the model is writing the goodbye
        await cut_off(h)
    return conversation_id


async def test_end_conversation_survives_its_turn_being_cut_off_before_the_reply(tmp_path: Path, llm: FakeLLM) -> None:
    conversation_id = await end_called_then_cut_off(tmp_path, llm)

    llm.reply("See you Tuesday!")
    async with running(tmp_path, llm) as h:
        closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
        assert closed[0]["data"]["endReason"] == "agent_ended"
        assert replies(h, conversation_id) == ["See you Tuesday!"]


async def test_end_conversation_survives_its_turn_being_cut_off_while_the_reply_is_sent(
    tmp_path: Path, llm: FakeLLM
) -> None:
    hanging = SimulatorHolding(2)  # the opening goes out; the goodbye never leaves
    async with running(tmp_path, llm, provider=hanging) as h:
        conversation_id = await say_goodbye(h, llm)
        await asyncio.wait_for(hanging.holding.wait(), 5)
        await cut_off(h)

    async with running(tmp_path, llm) as h:
        closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
        assert closed[0]["data"]["endReason"] == "agent_ended"
        assert len(llm.bodies) == 2  # the recorded turn is not run again: it is finished


async def test_an_end_whose_goodbye_was_recorded_is_carried_out_though_the_customer_texted_since(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """Cut off while sending the goodbye; the customer texted again before the restart, and the model now fails:
    the goodbye went (or was on its way), so the conversation ends as the model asked, without another turn."""
    hanging = SimulatorHolding(2)  # the opening goes out; the goodbye never leaves
    async with running(tmp_path, llm, provider=hanging) as h:
        conversation_id = await say_goodbye(h, llm)
        await asyncio.wait_for(hanging.holding.wait(), 5)
        await text_in(h, "oh, one more thing")
        await cut_off(h)

    llm.fail(500, times=5)
    async with running(tmp_path, llm) as h:
        closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
        assert closed[0]["data"]["endReason"] == "agent_ended"
        assert len(llm.bodies) == 2  # the recorded turn's two calls; none since


async def test_an_end_from_a_turn_cut_off_before_its_goodbye_waits_for_the_goodbye_even_in_the_same_millisecond(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """An earlier turn recorded its reply; the next called end_conversation at the same instant (a frozen clock)
    and was cut off before its goodbye. The re-run answers, then ends: the end is tied to its own turn, not to a
    time an earlier turn's record can match."""
    clock = FakeClock()
    async with running(tmp_path, llm, clock=clock) as h:
        agent = await make_agent(h, tools=[{"type": "end_conversation"}])
        conversation_id = await open_conversation(h, agent)
        llm.reply("Sure, Tuesday at 9?")
        await text_in(h, "can I book?")
        await eventually(lambda: replies(h, conversation_id) == ["Sure, Tuesday at 9?"])
        llm.call_tools(("end_conversation", {"reason": "done"})).hang(2)
        await text_in(h, "actually, never mind, bye")
        await llm.wait_for_requests(3)  # the end is called; the model is writing the goodbye
        await cut_off(h)

    llm.reply("Alright, bye!")
    async with running(tmp_path, llm, clock=clock) as h:
        closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
        assert closed[0]["data"]["endReason"] == "agent_ended"
        assert replies(h, conversation_id) == ["Sure, Tuesday at 9?", "Alright, bye!"]


async def test_an_end_carried_by_a_re_run_that_recorded_its_goodbye_survives_a_second_cut(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """The end was called in a run cut off before its goodbye; the re-run recorded the goodbye and was cut off
    sending it. The next start ends the conversation: it is the re-run's record that counts, not the first run's."""
    conversation_id = await end_called_then_cut_off(tmp_path, llm)

    hanging = SimulatorHolding(1)  # this process's first send, the goodbye, never leaves
    llm.reply("See you Tuesday!")
    async with running(tmp_path, llm, provider=hanging) as h:
        await asyncio.wait_for(hanging.holding.wait(), 5)
        await cut_off(h)

    async with running(tmp_path, llm) as h:
        closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
        assert closed[0]["data"]["endReason"] == "agent_ended"


async def test_an_end_asked_for_in_a_turn_the_model_then_fails_is_dropped(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h, tools=[{"type": "end_conversation"}])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("end_conversation", {})).fail(400)
    await text_in(h, "bye")
    await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    llm.reply("Still here if you need us.")
    await text_in(h, "actually, one more question")
    assert await eventually(lambda: replies(h, conversation_id)) == ["Still here if you need us."]
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert conversation["status"] == "in_progress"


async def test_a_goodbye_whose_send_fails_unexpectedly_is_failed_and_the_conversation_still_ends(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """The provider's send raises something no provider should (not a refusal): the goodbye is not left `queued`
    (the simulator did not take it: `parley_send_failed`), and the end the model asked for is carried out."""
    async with running(tmp_path, llm, provider=BreaksOnNth(2)) as h:
        conversation_id = await say_goodbye(h, llm)
        closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
        assert closed[0]["data"]["endReason"] == "agent_ended"
        (goodbye,) = h.rows("SELECT status, error_code FROM messages WHERE content = 'See you Tuesday!'")
        assert tuple(goodbye) == ("failed", "parley_send_failed")


async def test_an_end_asked_for_is_carried_out_when_the_turn_fails_after_recording_its_reply(
    tmp_path: Path, llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error once the turn is recorded (here injected into the reply's send): the goodbye was on its
    way, so the conversation closes as the model asked, and the error is reported."""

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unexpected")

    async with running(tmp_path, llm) as h:
        monkeypatch.setattr(assistant_module.messaging, "send_in_conversation", broken)
        conversation_id = await say_goodbye(h, llm)
        (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
        assert error["data"]["error"] == "internal_error"
        conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
        assert (conversation["status"], conversation["endReason"]) == ("closed", "agent_ended")


async def test_an_end_asked_for_in_a_turn_that_fails_is_dropped_when_an_operator_answered(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """The model called end_conversation, then failed before any reply was recorded; meanwhile a person answered:
    the conversation stays open (the person took over; the customer got no goodbye)."""
    async with running(tmp_path, llm) as h:
        agent = await make_agent(h, tools=[{"type": "end_conversation"}])
        conversation_id = await open_conversation(h, agent)
        llm.call_tools(("end_conversation", {})).fail(400, delay=0.6)
        await text_in(h, "bye")
        await llm.wait_for_requests(2)
        answered = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
        assert answered.status_code == 201, answered.text
        await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
        await settle()
        conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
        assert (conversation["status"], conversation["endReason"]) == ("in_progress", None)


class SlowToAsk(SimulatorProvider):
    """The simulator, with a start-up look-up that takes a while (as a real provider's HTTP call does)."""

    async def find_sent(self, message: Any, taken: Any = ()) -> Any:
        await asyncio.sleep(0.5)
        return None


async def test_a_turn_due_at_start_up_waits_until_its_cut_off_reply_is_settled(tmp_path: Path, llm: FakeLLM) -> None:
    """A turn recorded its reply and was cut off sending it; a text arrived meanwhile. At restart the due turn waits
    for the background recovery to settle that reply, so the model is not shown a reply the customer never got."""
    hanging = SimulatorHolding(2)  # the opening goes out; the reply never leaves
    async with running(tmp_path, llm, provider=hanging) as h:
        agent = await make_agent(h)
        conversation_id = await open_conversation(h, agent)
        llm.reply("Sure, what time works?")
        await text_in(h, "can I book?")
        await asyncio.wait_for(hanging.holding.wait(), 5)
        await text_in(h, "Tuesday?")  # arrives during the hung send: the turn is scheduled again
        await cut_off(h)

    llm.reply("Tuesday at 9?")
    async with running(tmp_path, llm, provider=SlowToAsk()) as h:
        assert await eventually(lambda: replies(h, conversation_id)) == ["Tuesday at 9?"]
        (row,) = h.rows("SELECT status, error_code FROM messages WHERE content = 'Sure, what time works?'")
        assert tuple(row) == ("failed", "parley_interrupted")
        shown = [m["content"] for m in llm.bodies[-1]["messages"]]
        assert not any("Sure, what time works?" in (c or "") for c in shown), shown


async def test_a_tool_call_cut_off_is_completed_as_interrupted_at_start_up(
    tmp_path: Path, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    async with running(tmp_path, llm) as h:
        agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
        conversation_id = await open_conversation(h, agent)
        tool_server.then(delay=2)
        llm.call_tools(("lookup_recall", {"recallId": "1"})).reply("done")
        await text_in(h, "check my recall")
        await tool_server.wait_for_requests(1)
        await cut_off(h)
        (call,) = (await h.get(f"/v1/sms-conversations/{conversation_id}/tool-calls")).json()["data"]
        assert call["status"] == "running"

    async with running(tmp_path, llm) as h:
        (call,) = (await h.get(f"/v1/sms-conversations/{conversation_id}/tool-calls")).json()["data"]
        assert (call["status"], call["isError"]) == ("completed", True)
        assert call["result"] == {"error": "the tool call was interrupted before it finished"}
        (result,) = events(h, conversation_id, "sms.tool_call_result")
        assert (result["data"]["toolCallId"], result["data"]["isError"]) == (call["toolCallId"], True)
        assert await eventually(lambda: replies(h, conversation_id)) == ["done"]  # the turn runs again
        assert len(tool_server.requests) == 1  # and does not call the tool again


async def test_no_tool_is_called_once_the_conversation_is_closed_mid_round(
    h: Harness, llm: FakeLLM, tool_server: FakeToolServer
) -> None:
    agent = await make_agent(h, tools=[webhook_tool(tool_server.url)])
    conversation_id = await open_conversation(h, agent)
    tool_server.then(delay=0.5)
    llm.call_tools(("lookup_recall", {"recallId": "1"}), ("lookup_recall", {"recallId": "2"}))
    await text_in(h, "check both")
    await tool_server.wait_for_requests(1)

    closed = await h.post(f"/v1/sms-conversations/{conversation_id}/close")
    assert closed.status_code == 200
    await eventually(lambda: events(h, conversation_id, "sms.tool_call_result"))
    await settle(0.3)

    assert len(tool_server.requests) == 1
    assert len(events(h, conversation_id, "sms.tool_call_invocation")) == 1
    assert replies(h, conversation_id) == []


async def test_built_ins_are_offered_only_when_listed(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h, tools=[{"type": "handoff_to_human"}])
    await open_conversation(h, agent)
    llm.call_tools(("end_conversation", {}))
    await text_in(h, "bye")
    await llm.wait_for_requests(2)
    assert [t["function"]["name"] for t in llm.bodies[0]["tools"]] == ["handoff_to_human"]
    tool_message = llm.bodies[1]["messages"][-1]
    assert "no tool named 'end_conversation'" in json.loads(tool_message["content"])["error"]


@pytest.mark.parametrize(("arguments", "summary"), [({}, ""), ({"summary": 5}, "5"), ({"summary": ["a"]}, '["a"]')])
async def test_a_handoff_without_a_text_summary_still_pauses_and_keeps_what_the_model_wrote(
    h: Harness, llm: FakeLLM, arguments: dict[str, Any], summary: str
) -> None:
    agent = await make_agent(h, tools=[{"type": "handoff_to_human"}])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("handoff_to_human", arguments)).reply("A person will text you.")
    await text_in(h, "Human please")
    (handoff,) = await eventually(lambda: events(h, conversation_id, "sms.handoff_requested"))
    assert handoff["data"]["summary"] == summary
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert conversation["assistantPaused"] is True


async def test_a_handoff_turn_cut_off_before_its_reply_sends_it_after_the_restart(tmp_path: Path, llm: FakeLLM) -> None:
    """The hand-off is committed with the tool's result, mid-turn: a stop while the model then writes the reply left
    the conversation paused, and a paused conversation's turn never ran again, so the customer who asked for a
    person heard nothing, and `resume` later answered that old request as a new one."""
    async with running(tmp_path, llm) as h:
        agent = await make_agent(h, tools=[{"type": "handoff_to_human"}])
        conversation_id = await open_conversation(h, agent)
        llm.call_tools(("handoff_to_human", {"summary": "Wants a person"})).hang(2)
        await text_in(h, "I want a person")
        await llm.wait_for_requests(2)  # handed off; the model is writing the reply
        await cut_off(h)
        await text_in(h, "Hello?")  # came while the server was stopping: the person's to answer

    llm.reply("A person will text you shortly.")
    async with running(tmp_path, llm) as h:
        assert await eventually(lambda: replies(h, conversation_id)) == ["A person will text you shortly."]
        # The re-run saw what the cut-off turn had seen, the hand-off included, and not the later text.
        assert llm.bodies[-1]["messages"][-3]["content"] == "I want a person"
        assert llm.bodies[-1]["messages"][-1]["role"] == "tool"
        conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
        assert conversation["assistantPaused"] is True
        assert len(events(h, conversation_id, "sms.handoff_requested")) == 1

        llm.reply("Back with you, Ada.")
        assert (await h.post(f"/v1/sms-conversations/{conversation_id}/resume")).status_code == 200
        await eventually(lambda: len(replies(h, conversation_id)) == 2)
        assert llm.bodies[-1]["messages"][-1] == {"role": "user", "content": "Hello?"}


async def test_a_re_run_hand_off_turn_a_person_has_answered_since_does_not_call_the_model(
    tmp_path: Path, llm: FakeLLM
) -> None:
    async with running(tmp_path, llm) as h:
        agent = await make_agent(h, tools=[{"type": "handoff_to_human"}])
        conversation_id = await open_conversation(h, agent)
        llm.call_tools(("handoff_to_human", {"summary": "Wants a person"})).hang(2)
        await text_in(h, "I want a person")
        await llm.wait_for_requests(2)
        await cut_off(h)
        answered = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "A person here."})
        assert answered.status_code == 201
    calls = len(llm.requests)
    async with running(tmp_path, llm) as h:
        await eventually(lambda: not h.rows("SELECT 1 FROM jobs WHERE kind = 'assistant_turn'"))
        assert len(llm.requests) == calls
        assert replies(h, conversation_id) == []
        assert events(h, conversation_id, "sms.assistant_error") == []


async def test_a_hand_off_turn_that_fails_afterwards_is_not_run_again_by_a_text_that_came_meanwhile(
    h: Harness, llm: FakeLLM
) -> None:
    """A failed turn is not retried (README), a hand-off turn neither, even when a text that arrived before the
    pause was committed left its job due; and after a resume the texts it had read are not answered again."""
    agent = await make_agent(h, tools=[{"type": "handoff_to_human"}])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("handoff_to_human", {"summary": "Wants a person"}), delay=0.6).fail(500, times=3)
    await text_in(h, "I want a person")
    await llm.wait_for_requests(1)
    await text_in(h, "Hello??")  # before the hand-off is committed: the turn's job is due again
    await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    await settle(0.5)
    assert len(llm.requests) == 4  # the hand-off, then three tries at the reply; no re-run
    assert len(events(h, conversation_id, "sms.assistant_error")) == 1
    assert replies(h, conversation_id) == []

    llm.reply("Back with you.")
    assert (await h.post(f"/v1/sms-conversations/{conversation_id}/resume")).status_code == 200
    await eventually(lambda: replies(h, conversation_id) == ["Back with you."])
    assert llm.bodies[-1]["messages"][-1] == {"role": "user", "content": "Hello??"}


async def test_a_failed_turn_that_handed_off_and_ended_leaves_the_conversation_open_and_paused(
    h: Harness, llm: FakeLLM
) -> None:
    """The model handed off and asked to end, then failed before any reply: the end is dropped with the reply
    (README), so the person who takes over can still write; the turn is over, not a goodbye."""
    agent = await make_agent(h, tools=[{"type": "end_conversation"}, {"type": "handoff_to_human"}])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("handoff_to_human", {"summary": "Wants a person"}), ("end_conversation", {"reason": "x"}))
    llm.fail(500, times=3)
    await text_in(h, "I want a person, not a bot")
    await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    await settle(0.3)
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert (conversation["status"], conversation["assistantPaused"]) == ("in_progress", True)
    answered = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Sam here."})
    assert answered.status_code == 201


async def test_a_resume_while_the_hand_off_turn_fails_does_not_answer_the_hand_off_texts_again(
    h: Harness, llm: FakeLLM
) -> None:
    h.ctx.assistant.model.retry_delays = (0.5, 0.5)
    agent = await make_agent(h, tools=[{"type": "handoff_to_human"}])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("handoff_to_human", {"summary": "Wants a person"})).fail(500, times=3)
    await text_in(h, "I want a person")
    await llm.wait_for_requests(2)
    assert (await h.post(f"/v1/sms-conversations/{conversation_id}/resume")).status_code == 200
    await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    await settle(0.5)
    assert len(llm.requests) == 4  # the hand-off and three tries; nothing answers "I want a person" again
    assert replies(h, conversation_id) == []


async def test_an_end_recorded_before_a_stop_in_a_paused_conversation_is_carried_out_at_restart(
    tmp_path: Path, llm: FakeLLM
) -> None:
    hanging = SimulatorHolding(2)  # the opening, then the goodbye, whose send never returns
    async with running(tmp_path, llm, provider=hanging) as h:
        agent = await make_agent(h, tools=[{"type": "end_conversation"}, {"type": "handoff_to_human"}])
        conversation_id = await open_conversation(h, agent)
        llm.call_tools(("handoff_to_human", {"summary": "x"}), ("end_conversation", {"reason": "x"}))
        llm.reply("A person will text you; bye")
        await text_in(h, "I want a person")
        await asyncio.wait_for(hanging.holding.wait(), 5)
        await cut_off(h)
    async with running(tmp_path, llm) as h:
        closed = await eventually(lambda: events(h, conversation_id, "sms.conversation_closed"))
        assert closed[0]["data"]["endReason"] == "agent_ended"


async def test_handoff_pauses_the_assistant_until_resume(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h, tools=[{"type": "handoff_to_human"}])
    conversation_id = await open_conversation(h, agent)
    llm.call_tools(("handoff_to_human", {"summary": "Wants a person about billing"})).reply(
        "I'll get a person to text you."
    )

    await text_in(h, "I want to talk to a human")

    (handoff,) = await eventually(lambda: events(h, conversation_id, "sms.handoff_requested"))
    assert handoff["data"]["summary"] == "Wants a person about billing"
    await eventually(lambda: replies(h, conversation_id) == ["I'll get a person to text you."])
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert conversation["assistantPaused"] is True

    await text_in(h, "Hello? Anyone?")
    await settle()
    assert len(llm.bodies) == 2  # stored and emitted, but no turn
    received = events(h, conversation_id, "sms.message_received")
    assert received[-1]["data"]["content"] == "Hello? Anyone?"

    llm.reply("Back with you, Ada. How can I help?")
    response = await h.post(f"/v1/sms-conversations/{conversation_id}/resume")
    assert response.status_code == 200
    assert response.json()["data"]["assistantPaused"] is False
    assert response.json()["data"]["conversationId"] == conversation_id
    # The message that came during the pause is answered once the assistant is back.
    await eventually(lambda: len(replies(h, conversation_id)) == 2)
    assert llm.bodies[-1]["messages"][-1] == {"role": "user", "content": "Hello? Anyone?"}

    llm.reply("Sure.")
    await text_in(h, "Can you book me?")
    await eventually(lambda: len(replies(h, conversation_id)) == 3)


async def test_resume_answers_404_for_unknown_or_foreign_and_409_when_closed(h: Harness) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    assert (await h.post(f"/v1/sms-conversations/{uuid.uuid4()}/resume")).status_code == 404
    assert (await h.post("/v1/sms-conversations/not-a-uuid/resume")).status_code == 404
    assert (await h.post(f"/v1/sms-conversations/{conversation_id}/resume", org="other")).status_code == 404
    assert (await h.get(f"/v1/sms-conversations/{conversation_id}/tool-calls", org="other")).status_code == 404
    not_paused = await h.post(f"/v1/sms-conversations/{conversation_id}/resume")
    assert not_paused.status_code == 200
    assert not_paused.json()["data"]["assistantPaused"] is False
    await h.post(f"/v1/sms-conversations/{conversation_id}/close")
    closed = await h.post(f"/v1/sms-conversations/{conversation_id}/resume")
    assert closed.status_code == 409
    assert closed.json()["error"]["code"] == "conversation_closed"


# --- debounce -----------------------------------------------------------------------------------


async def test_three_texts_100ms_apart_get_one_turn_that_sees_all_three(tmp_path: Path, llm: FakeLLM) -> None:
    clock = FakeClock()
    async with running(tmp_path, llm, clock=clock) as h:
        agent = await make_agent(h, replyDebounceMs=1000)
        conversation_id = await open_conversation(h, agent)
        llm.reply("Got all of that: Tuesday at 9 for the recall.")

        await text_in(h, "Hi")
        await clock.advance(0.1)
        await text_in(h, "Can I come Tuesday")
        await clock.advance(0.1)
        await text_in(h, "at 9?")
        await clock.advance(0.9)  # 1.0 s after the first text, 0.8 s after the last: still inside the window
        await settle()
        assert llm.bodies == []

        await clock.advance(0.3)
        await llm.wait_for_requests(1)
        await eventually(lambda: replies(h, conversation_id))
        await settle()
        (request,) = llm.bodies
        assert request["messages"][-1] == {"role": "user", "content": "Hi\nCan I come Tuesday\nat 9?"}
        assert replies(h, conversation_id) == ["Got all of that: Tuesday at 9 for the recall."]


async def test_a_text_during_a_running_turn_is_answered_by_the_next_turn_not_concurrently(
    h: Harness, llm: FakeLLM
) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.reply("first answer", delay=0.4).reply("second answer")

    await text_in(h, "one")
    await llm.wait_for_requests(1)
    await text_in(h, "two")  # arrives while the first turn waits for the model

    await eventually(lambda: len(replies(h, conversation_id)) == 2)
    first, second = llm.requests
    assert second.at >= first.at + 0.35  # the second request only started after the first answered
    assert llm.bodies[1]["messages"][-2:] == [
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "two"},
    ]


async def test_a_turn_due_when_the_server_stops_runs_after_restart(tmp_path: Path, llm: FakeLLM) -> None:
    clock = FakeClock()
    async with running(tmp_path, llm, clock=clock) as h:
        agent = await make_agent(h, replyDebounceMs=5000)
        conversation_id = await open_conversation(h, agent)
        await text_in(h, "Are you there?")
        assert h.rows("SELECT kind FROM jobs WHERE ref = ? AND kind = 'assistant_turn'", conversation_id)
    assert llm.bodies == []

    restarted = FakeClock(start_ms=clock.now_ms())
    llm.reply("Yes, here!")
    async with running(tmp_path, llm, clock=restarted) as h:
        await restarted.advance(6)
        assert await eventually(lambda: replies(h, conversation_id)) == ["Yes, here!"]


# --- model failures -----------------------------------------------------------------------------


async def test_a_model_failing_with_500_yields_assistant_error_and_the_next_text_is_answered(
    h: Harness, llm: FakeLLM
) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.fail(500, times=3)

    await text_in(h, "Hello?")

    (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    assert error["data"]["error"] == "model_http_500"
    assert error["data"]["attempts"] == 3
    assert len(llm.bodies) == 3
    assert replies(h, conversation_id) == []
    conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
    assert conversation["status"] == "in_progress"

    llm.reply("Sorry for the wait! How can I help?")
    await text_in(h, "Hello again")
    assert await eventually(lambda: replies(h, conversation_id)) == ["Sorry for the wait! How can I help?"]
    assert llm.bodies[-1]["messages"][-1] == {"role": "user", "content": "Hello?\nHello again"}


async def test_closing_during_the_models_retries_cancels_the_turn_without_an_error_event(
    h: Harness, llm: FakeLLM
) -> None:
    h.ctx.assistant.model.retry_delays = (0.5, 0.5)
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.fail(500, times=3)
    await text_in(h, "Hello?")
    await llm.wait_for_requests(1)  # the first try failed; the turn waits before the next
    assert (await h.post(f"/v1/sms-conversations/{conversation_id}/close")).status_code == 200
    await settle(1.2)
    assert len(llm.bodies) == 1  # no retry for a closed conversation
    assert events(h, conversation_id, "sms.assistant_error") == []  # nothing after sms.conversation_closed


async def test_a_model_that_recovers_within_three_tries_answers_normally(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.fail(503, times=2).reply("Here now.")
    await text_in(h, "Hello?")
    assert await eventually(lambda: replies(h, conversation_id)) == ["Here now."]
    assert events(h, conversation_id, "sms.assistant_error") == []


async def test_a_client_error_from_the_model_is_not_retried(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.fail(400)
    await text_in(h, "Hello?")
    (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    assert (error["data"]["error"], error["data"]["attempts"]) == ("model_http_400", 1)
    assert len(llm.bodies) == 1


async def test_a_model_timing_out_yields_assistant_error_and_the_next_text_is_answered(
    tmp_path: Path, llm: FakeLLM
) -> None:
    async with running(tmp_path, llm, llm_timeout_seconds=0.2) as h:
        agent = await make_agent(h)
        conversation_id = await open_conversation(h, agent)
        llm.hang(1.0, times=3)

        await text_in(h, "Hello?")

        (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
        assert error["data"]["error"] == "model_timeout"
        assert error["data"]["attempts"] == 3
        assert replies(h, conversation_id) == []

        llm.reply("Back online.")
        await text_in(h, "Still there?")
        assert await eventually(lambda: replies(h, conversation_id)) == ["Back online."]


async def test_a_model_answer_trickling_in_past_the_timeout_is_a_model_timeout(tmp_path: Path, llm: FakeLLM) -> None:
    """The SDK's timeout bounds each read: an answer that keeps sending a byte at a time never trips it."""
    async with running(tmp_path, llm, llm_timeout_seconds=0.15) as h:
        agent = await make_agent(h)
        conversation_id = await open_conversation(h, agent)
        completion = llm._completion({"role": "assistant", "content": "dripped"}, "stop", "m")
        for _ in range(3):
            llm.respond_with(lambda body, c=completion: Step(200, c, drip=0.004))

        await text_in(h, "Hello?")

        (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"), timeout=10)
        assert (error["data"]["error"], error["data"]["attempts"]) == ("model_timeout", 3)
        assert replies(h, conversation_id) == []


# Answers labelled JSON that the SDK cannot read as JSON: broken, not UTF-8, nested deeper than the parser goes, or
# with an integer longer than Python converts (4300 digits).
UNREADABLE_ANSWERS = {
    "broken": b"{broken",
    "not_utf8": b'{"choices": [{"message": {"role": "assistant", "content": "\xff"}}]}',
    "too_deep": b'{"choices": [{"message": {"role": "assistant", "content": "hi"}}], "x": '
    + b"[" * 5000
    + b"]" * 5000
    + b"}",
    "huge_number": b'{"choices": [{"message": {"role": "assistant", "content": "hi"}}], "x": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("raw", UNREADABLE_ANSWERS.values(), ids=UNREADABLE_ANSWERS.keys())
async def test_an_answer_that_says_json_and_is_not_is_a_bad_response_and_retried(
    h: Harness, llm: FakeLLM, raw: bytes
) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    for _ in range(3):
        llm.respond_with(lambda body: Step(200, raw=raw))

    await text_in(h, "Hello?")

    (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
    assert (error["data"]["error"], error["data"]["attempts"]) == ("model_bad_response", 3)
    llm.reply("Back.")
    await text_in(h, "Still there?")
    assert await eventually(lambda: replies(h, conversation_id)) == ["Back."]


async def test_a_missing_model_configuration_is_reported_with_the_variables_to_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path, None) as h:
        agent = await make_agent(h)
        conversation_id = await open_conversation(h, agent)
        with caplog.at_level(logging.ERROR, logger="parley.assistant"):
            await text_in(h, "Hello?")
            (error,) = await eventually(lambda: events(h, conversation_id, "sms.assistant_error"))
        assert error["data"]["error"] == "model_not_configured"
        assert "PARLEY_LLM_BASE_URL and PARLEY_LLM_MODEL" in error["data"]["message"]
        assert any("PARLEY_LLM_BASE_URL and PARLEY_LLM_MODEL" in r.getMessage() for r in caplog.records)
        assert all("Hello?" not in r.getMessage() and CUSTOMER not in r.getMessage() for r in caplog.records)
        conversation = (await h.get(f"/v1/sms-conversations/{conversation_id}")).json()["data"]
        assert conversation["status"] == "in_progress"


async def test_an_operator_who_answers_while_the_model_thinks_keeps_the_agent_silent(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    conversation_id = await open_conversation(h, agent)
    llm.reply("The agent's answer.", delay=0.5)
    await text_in(h, "Is the part in stock?")
    await llm.wait_for_requests(1)

    operator = await h.post(f"/v1/sms-conversations/{conversation_id}/messages", {"content": "Yes, it is."})
    assert operator.status_code == 201, operator.text
    await eventually(lambda: h.rows("SELECT COUNT(*) AS n FROM assistant_turns")[0]["n"] == 1)
    await settle()

    assert replies(h, conversation_id) == []
    phone = (await h.get("/v1/simulator/messages", number=CUSTOMER)).json()["data"]
    assert "The agent's answer." not in [m["body"] for m in phone]


# --- LLM-written openings -----------------------------------------------------------------------


async def test_an_agent_without_opening_text_gets_a_model_written_first_sms(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    llm.reply("Hi Ada! PAM Motors here about your open recall. Can we book the free fix?")
    body = {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS, "dynamicVariables": VARIABLES}

    response = await h.post("/v1/sms-conversations", body)

    assert response.status_code == 201, response.text
    (request,) = llm.bodies
    roles = [m["role"] for m in request["messages"]]
    assert roles == ["system", "system"]
    assert request["messages"][0]["content"] == "You text Ada for PAM Motors."
    assert "first SMS" in request["messages"][1]["content"]
    assert "tools" not in request
    phone = (await h.get("/v1/simulator/messages", number=CUSTOMER)).json()["data"]
    assert phone[-1]["body"] == "Hi Ada! PAM Motors here about your open recall. Can we book the free fix?"


async def test_a_model_failure_while_writing_an_opening_is_a_502_naming_a_closed_conversation_and_nothing_is_sent(
    h: Harness, llm: FakeLLM
) -> None:
    agent = await make_agent(h)
    llm.fail(500)
    body = {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS}

    response = await h.post("/v1/sms-conversations", body)

    assert response.status_code == 502
    error = response.json()["error"]
    assert (error["code"], error["providerCode"]) == ("provider_error", "model_http_500")
    assert len(llm.bodies) == 1  # one chat completion, not retried inside the request
    closed = (await h.get(f"/v1/sms-conversations/{error['conversationId']}")).json()["data"]
    assert (closed["status"], closed["endReason"]) == ("closed", "opening_message_failed")
    assert (await h.get(f"/v1/sms-conversations/{error['conversationId']}/messages")).json()["data"] == []
    assert events(h, error["conversationId"], "sms.conversation_closed")
    assert (await h.get("/v1/simulator/messages", number=CUSTOMER)).json()["data"] == []


async def test_a_number_claimed_only_by_a_create_whose_opening_the_model_could_not_write_is_given_back(
    h: Harness, llm: FakeLLM
) -> None:
    agent = await make_agent(h)
    llm.fail(500)
    failed = await h.post(
        "/v1/sms-conversations", {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS}
    )
    assert failed.status_code == 502, failed.text

    other = await h.post("/v1/sms-conversations", {**SEED_CREATE, "fromNumber": OURS}, org="globex")

    assert other.status_code == 201, other.text


@pytest.mark.parametrize("raw", UNREADABLE_ANSWERS.values(), ids=UNREADABLE_ANSWERS.keys())
async def test_an_opening_answer_that_is_not_json_is_a_502_not_a_500(h: Harness, llm: FakeLLM, raw: bytes) -> None:
    agent = await make_agent(h)
    llm.respond_with(lambda body: Step(200, raw=raw))
    body = {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS, "dynamicVariables": VARIABLES}

    response = await h.post("/v1/sms-conversations", body)

    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert (error["code"], error["providerCode"]) == ("provider_error", "model_bad_response")


@pytest.mark.parametrize("model_answers", [True, False])
async def test_a_conversation_whose_opening_the_model_wrote_is_dated_when_it_is_written(
    tmp_path: Path, llm: FakeLLM, model_answers: bool
) -> None:
    """The model may take seconds: a conversation dated when the create began would be listed (newest first) behind
    conversations made meanwhile that a client has already seen, so it is dated when it is written."""
    clock = FakeClock()
    async with running(tmp_path, llm, clock=clock) as h:
        agent = await make_agent(h)
        if model_answers:
            llm.reply("Hi Ada, PAM Motors here.", delay=0.3)
        else:
            llm.fail(500, delay=0.3)
        body = {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS, "dynamicVariables": VARIABLES}
        slow = asyncio.create_task(h.post("/v1/sms-conversations", body))
        await llm.wait_for_requests(1)
        await clock.advance(20)
        quick_id = await open_conversation(h, agent, toNumber="+15555550177")
        await clock.advance(5)

        answer = await slow

        assert answer.status_code == (201 if model_answers else 502), answer.text
        slow_id = (answer.json().get("data") or answer.json()["error"])["conversationId"]
        listed = [c["conversationId"] for c in (await h.get("/v1/sms-conversations")).json()["data"]]
        assert listed[0] == slow_id  # newest: written after the quick one
        quick_at = (await h.get(f"/v1/sms-conversations/{quick_id}")).json()["data"]
        slow_at = (await h.get(f"/v1/sms-conversations/{slow_id}")).json()["data"]
        assert slow_at["createdAt"] > quick_at["createdAt"]


@pytest.mark.parametrize("clock_steps", [False, True], ids=["clock_still", "clock_steps_forward"])
async def test_a_keyed_create_repeated_while_the_model_writes_its_opening_is_409_in_progress(
    tmp_path: Path, llm: FakeLLM, clock_steps: bool
) -> None:
    """A repeat of a keyed create whose opening the model is still writing is 409 `idempotency_in_progress`, and the
    first create's 201 is replayed after: one opening written, one sent. Also when the wall clock steps 11 minutes
    forward meanwhile: to housekeeping the key looked like one a create that ended had failed to free, and it was
    freed; the client's retry then ran a second create and texted the customer a second opening (and the first
    create's outcome had no key to go to)."""
    clock = FakeClock()
    async with running(tmp_path, llm, clock=clock) as h:
        agent = await make_agent(h)
        llm.reply("Hi Ada, PAM Motors here.", delay=1.0)
        body = {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS, "dynamicVariables": VARIABLES}
        key = {"Idempotency-Key": "slow-opening"}
        first = asyncio.create_task(h.post("/v1/sms-conversations", body, **key))
        await llm.wait_for_requests(1)
        if clock_steps:
            await clock.advance(messaging.STALLED_AFTER_MS / 1000 + 60)  # the clock steps: housekeeping is due
            upkeep = "SELECT due_at, lease_until FROM jobs WHERE ref = 'global'"
            await eventually(lambda: all(r[1] is None and r[0] > clock.now_ms() for r in h.rows(upkeep)))
            assert not first.done()  # housekeeping ran while the model was still writing

        repeat = await h.post("/v1/sms-conversations", body, **key)
        created = await first
        replayed = await h.post("/v1/sms-conversations", body, **key)

    assert repeat.status_code == 409, repeat.text
    assert repeat.json()["error"]["code"] == "idempotency_in_progress"
    assert created.status_code == 201, created.text
    assert (replayed.status_code, replayed.content) == (201, created.content)
    assert len(llm.bodies) == 1  # the model wrote one opening, not one per request, and it was sent once
    assert h.rows("SELECT COUNT(*) AS n FROM conversations")[0]["n"] == 1


async def test_a_model_failure_under_an_idempotency_key_is_replayed_like_any_502(h: Harness, llm: FakeLLM) -> None:
    agent = await make_agent(h)
    body = {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS}
    key = {"Idempotency-Key": "model-failure"}
    llm.fail(500)
    failed = await h.post("/v1/sms-conversations", body, **key)
    assert failed.status_code == 502
    llm.reply("Hi, PAM Motors here.")

    repeated = await h.post("/v1/sms-conversations", body, **key)

    assert (repeated.status_code, repeated.content) == (502, failed.content)
    assert repeated.headers["idempotent-replayed"] == "true"
    assert len(llm.bodies) == 1


async def test_a_key_held_while_an_opted_out_recipient_is_refused_is_free_for_the_retry(
    h: Harness, llm: FakeLLM
) -> None:
    """A 4xx is not kept: the early claim is given back."""
    agent = await make_agent(h)
    body = {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS}
    key = {"Idempotency-Key": "opted-out-then-back"}
    await open_conversation(h, agent)
    await text_in(h, "STOP")
    refused = await h.post("/v1/sms-conversations", body, **key)
    assert refused.status_code == 409, refused.text
    await text_in(h, "START")
    llm.reply("Hi again from PAM Motors.")

    retried = await h.post("/v1/sms-conversations", body, **key)

    assert retried.status_code == 201, retried.text
    assert "idempotent-replayed" not in retried.headers


async def test_an_opening_needs_a_configured_model(tmp_path: Path) -> None:
    async with running(tmp_path, None) as h:
        agent = await make_agent(h)
        response = await h.post(
            "/v1/sms-conversations", {"agentId": agent["agentId"], "toNumber": CUSTOMER, "fromNumber": OURS}
        )
        assert response.status_code == 400
        assert response.json()["error"]["details"][0]["field"] == "welcomeMessage"
        assert "PARLEY_LLM_BASE_URL" in response.json()["error"]["message"]


# --- tool registration --------------------------------------------------------------------------


async def test_tool_urls_are_checked_by_the_outbound_url_guard_at_registration(tmp_path: Path) -> None:
    async with running(tmp_path, None, allow_private_urls=False, allow_http_urls=False) as h:
        for url, fragment in (
            ("http://tools.example.com/x", "https"),
            ("https://127.0.0.1/x", "non-public"),
            ("https://localhost/x", "non-public"),
            ("https://10.1.2.3/x", "non-public"),
        ):
            response = await h.post("/v1/agents", {"name": "a", "tools": [webhook_tool(url)]})
            assert response.status_code == 400, url
            detail = response.json()["error"]["details"][0]
            assert detail["field"] == "tools.0.url"
            assert fragment in detail["message"], (url, detail)
        ok = await h.post("/v1/agents", {"name": "a", "tools": [webhook_tool("https://93.184.215.14/x")]})
        assert ok.status_code == 201
        patched = await h.client.patch(
            f"/v1/agents/{ok.json()['data']['agentId']}",
            headers={**h.auth(), "Content-Type": "application/json"},
            content=json.dumps({"tools": [webhook_tool("https://192.168.0.1/x")]}),
        )
        assert patched.status_code == 400
        assert patched.json()["error"]["details"][0]["field"] == "tools.0.url"


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"type": "object", "properties": [1]}, "tools.0.parameters.properties"),
        ({"type": "object", "required": "recallId"}, "tools.0.parameters.required"),
        ({"type": "object", "properties": {"a": {"type": "wat"}}}, "tools.0.parameters.properties.a.type"),
        (
            {"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}},
            "tools.0.parameters.properties.a.minLength",
        ),
        ({"type": "array"}, "tools.0.parameters"),
        (
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}},
            "tools.0.parameters.properties.a.pattern",
        ),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "tools.0.parameters.properties.a.$ref"),
        # A property that happens to be called patternProperties is a schema like any other.
        (
            {"type": "object", "properties": {"patternProperties": {"type": "string", "pattern": "("}}},
            "tools.0.parameters.properties.patternProperties.pattern",
        ),
        (
            {"type": "object", "allOf": [{}], "properties": {"a": {"$ref": "#/allOf/%C2%B2"}}},
            "tools.0.parameters.properties.a.$ref",
        ),
        (
            {"type": "object", "allOf": [{}], "properties": {"a": {"$ref": "#/allOf/" + "9" * 5000}}},
            "tools.0.parameters.properties.a.$ref",
        ),
        ({"type": "object", "patternProperties": {"(": {}}}, "tools.0.parameters.patternProperties.("),
        ({"type": "object", "description": "x" * 16 * 1024}, "tools.0.parameters"),
    ],
)
async def test_a_webhook_tools_parameters_must_be_a_valid_json_schema(
    h: Harness, parameters: dict[str, Any], field: str
) -> None:
    """The model's server gets them as they are: one that validates tool schemas would refuse every turn."""
    response = await h.post(
        "/v1/agents", {"name": "a", "tools": [webhook_tool("http://127.0.0.1:9/", parameters=parameters)]}
    )
    assert response.status_code == 400
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]
    agent = (await h.post("/v1/agents", {"name": "a", "tools": [webhook_tool("http://127.0.0.1:9/")]})).json()["data"]
    patched = await h.client.patch(
        f"/v1/agents/{agent['agentId']}",
        headers=h.auth(),
        json={"tools": [webhook_tool("http://127.0.0.1:9/", parameters=parameters)]},
    )
    assert patched.status_code == 400
    assert [d["field"] for d in patched.json()["error"]["details"]] == [field]


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "patternProperties": {"^a": {}}, "properties": {"b": {"$ref": "#/patternProperties/%5Ea"}}},
        {"type": "object", "properties": {"f": {"type": "string", "default": {"pattern": "*.txt"}}}},  # data
        {"type": "object", "$defs": {"x": {"$anchor": "x", "type": "string"}}, "properties": {"a": {"$ref": "#x"}}},
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(?<year>\\d{4})-\\d{2}$"}}},
    ],
)
async def test_a_valid_tool_schema_is_accepted(h: Harness, parameters: dict[str, Any]) -> None:
    response = await h.post(
        "/v1/agents", {"name": "a", "tools": [webhook_tool("http://127.0.0.1:9/", parameters=parameters)]}
    )
    assert response.status_code == 201, response.json()


@pytest.mark.parametrize("parameters", [{}, {"properties": {"recallId": {"type": "string"}}}])
async def test_a_tool_schema_without_a_type_reaches_the_model_with_type_object_written_out(
    h: Harness, llm: FakeLLM, parameters: dict[str, Any]
) -> None:
    """OpenAI refuses a tool whose schema leaves `type` out. Such a schema can only be an object's here: it is
    accepted, kept as registered, and sent to the model with `"type": "object"` written out."""
    agent = await make_agent(h, tools=[webhook_tool("http://127.0.0.1:9/", parameters=parameters)])
    assert agent["tools"][0]["parameters"] == parameters
    await open_conversation(h, agent)
    llm.reply("ok")
    await text_in(h, "hi")
    await llm.wait_for_requests(1)
    assert llm.bodies[0]["tools"][0]["function"]["parameters"] == {"type": "object", **parameters}


async def test_a_tool_schemas_regexes_are_checked_without_compiling_them(h: Harness) -> None:
    """Unicode classes repeated many times are valid (and common: `^.{1,100}$`), but compiling them takes megabytes
    each; checking their syntax takes nothing, so many of them in one schema are fine."""
    many = {
        "type": "object",
        "properties": {
            f"p{i}": {"type": "string", "pattern": f"^\\p{{L}}{{2,50}}\\w{{50000}}{i}$"} for i in range(200)
        },
    }
    response = await h.post(
        "/v1/agents", {"name": "a", "tools": [webhook_tool("http://127.0.0.1:9/", parameters=many)]}
    )
    assert response.status_code == 201


async def test_a_tool_schemas_unknown_dollar_schema_or_remote_ref_is_refused_and_never_fetched(h: Harness) -> None:
    """Fetching either would be an outbound request no URL guard saw."""
    with FakeToolServer() as meta_server:
        parameters = {"$schema": meta_server.url + "/meta", "type": "object"}
        response = await h.post(
            "/v1/agents", {"name": "a", "tools": [webhook_tool("http://127.0.0.1:9/", parameters=parameters)]}
        )
        assert response.status_code == 400
        assert response.json()["error"]["details"][0]["field"] == "tools.0.parameters.$schema"
        elsewhere = {"type": "object", "properties": {"a": {"$ref": meta_server.url + "/a"}}}
        response = await h.post(
            "/v1/agents", {"name": "a", "tools": [webhook_tool("http://127.0.0.1:9/", parameters=elsewhere)]}
        )
        assert response.status_code == 400
        assert meta_server.requests == []
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"}
    accepted = await h.post(
        "/v1/agents", {"name": "a", "tools": [webhook_tool("http://127.0.0.1:9/", parameters=draft7)]}
    )
    assert accepted.status_code == 201


async def test_a_webhook_tool_may_not_take_a_built_in_name(h: Harness) -> None:
    response = await h.post(
        "/v1/agents", {"name": "a", "tools": [{**webhook_tool("http://127.0.0.1:9/"), "name": "end_conversation"}]}
    )
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["field"] == "tools.0.name"
