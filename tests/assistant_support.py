"""Helpers shared by the assistant's tests and the tests that drive a conversation through it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook

from tests.conftest import Harness, start_harness
from tests.fake_llm import FakeLLM, FakeToolServer, Recorded
from tests.webhook_receiver import eventually

OURS = "+15555550123"
CUSTOMER = "+15555550199"
VARIABLES = {"customerName": "Ada", "dealershipName": "PAM Motors"}


@asynccontextmanager
async def running(tmp_path: Path, llm: FakeLLM | None, **overrides: Any) -> AsyncIterator[Harness]:
    """The real app, pointed at the fake model (none: the model is not configured), with fast retries."""
    if llm is not None:
        overrides = {"llm_base_url": llm.base_url, "llm_model": "test-model", **overrides}
    async with start_harness(tmp_path, **overrides) as h:
        h.ctx.assistant.model.retry_delays = (0.01, 0.02)
        yield h


async def make_agent(h: Harness, **fields: Any) -> dict[str, Any]:
    body = {
        "name": "Test agent",
        "systemPrompt": "You text {{customerName}} for {{dealershipName}}.",
        "replyDebounceMs": 0,
        **fields,
    }
    response = await h.post("/v1/agents", body)
    assert response.status_code == 201, response.text
    return response.json()["data"]


async def open_conversation(h: Harness, agent: dict[str, Any], **fields: Any) -> str:
    body = {
        "agentId": agent["agentId"],
        "toNumber": CUSTOMER,
        "fromNumber": OURS,
        "welcomeMessage": "Hi Ada, your recall repair is free. Want to book?",
        "dynamicVariables": VARIABLES,
        "metadata": {"crmId": "c-1"},
        **fields,
    }
    response = await h.post("/v1/sms-conversations", body)
    assert response.status_code == 201, response.text
    return response.json()["data"]["conversationId"]


async def text_in(h: Harness, body: str) -> None:
    response = await h.post("/v1/simulator/inbound", {"from": CUSTOMER, "to": OURS, "body": body})
    assert response.status_code == 201, response.text


def replies(h: Harness, conversation_id: str) -> list[str]:
    """Agent-written SMS after the opening that the provider accepted, in order."""
    return [
        row["content"]
        for row in h.rows(
            "SELECT content FROM messages WHERE conversation_id = ? AND direction = 'outbound' AND author = 'agent'"
            " AND seq > 1 AND provider_message_id IS NOT NULL ORDER BY seq",
            conversation_id,
        )
    ]


async def settle(seconds: float = 0.15) -> None:
    """Let background work (scheduler, provider reports) run for a moment."""
    await asyncio.sleep(seconds)


def webhook_tool(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "webhook",
        "name": "lookup_recall",
        "description": "Look up a recall by id.",
        "parameters": {"type": "object", "properties": {"recallId": {"type": "string"}}, "required": ["recallId"]},
        "url": url,
        **extra,
    }


def signers(call: Recorded, secrets: list[str]) -> list[str | None]:
    """The secret behind each entry of the call's webhook-signature header, in header order (None: no match).

    Signatures are recomputed with the `standardwebhooks` library; its `verify` would also reject a fake
    clock's timestamp, which is far from the real time."""
    tool_call_id, timestamp = call.headers["webhook-id"], call.headers["webhook-timestamp"]
    at = datetime.fromtimestamp(int(timestamp), tz=UTC)
    expected = {Webhook(secret).sign(tool_call_id, at, call.body.decode()): secret for secret in secrets}
    return [expected.get(entry) for entry in call.headers["webhook-signature"].split()]


async def call_tool(h: Harness, llm: FakeLLM, tool_server: FakeToolServer, conversation_id: str) -> Recorded:
    """One customer text whose turn calls the webhook tool once; the request the tool server received."""
    seen = len(tool_server.requests)
    llm.call_tools(("lookup_recall", {"recallId": "1"})).reply("done")
    await text_in(h, "check")
    await eventually(lambda: len(replies(h, conversation_id)) > seen)
    return tool_server.requests[seen]
