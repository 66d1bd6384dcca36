"""What the model is sent: the rendered system prompt, the conversation as chat messages, and reply clean-up."""

from __future__ import annotations

import json
import re
from itertools import groupby
from typing import Any, TypeVar

from app.domain import compliance
from app.domain.agents import AgentSettings
from app.domain.models import Message
from app.domain.status import UNSENT
from app.domain.templates import render
from app.domain.types import sendable_text
from app.store.tool_calls import ToolCall

OPENING_INSTRUCTION = (
    "Write the first SMS of this conversation: the message that opens it. The customer has not written"
    " anything yet. Reply with the text of that SMS only: plain text, no quotation marks, no preamble,"
    " at most {limit} characters."
)
INTERRUPTED_RESULT = json.dumps({"error": "the tool call was interrupted before it finished"})
# What the model is told of a webhook call a turn skipped because a person answered the customer meanwhile, when that
# person's message then turned out not to reach the phone and the turn went on.
NOT_CALLED_RESULT = json.dumps({"error": "the tool was not called; call it again if it is still needed"})
_T = TypeVar("_T", bound=tuple[Any, ...])
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_OPEN = re.compile(r"<think>", re.IGNORECASE)


def system_prompt(settings: AgentSettings, variables: dict[str, str]) -> str:
    return render(settings.system_prompt, variables).strip()


def opening_messages(settings: AgentSettings, variables: dict[str, str]) -> list[dict[str, Any]]:
    """The opening request (SPEC §5): the rendered system prompt and a second system message, no user message."""
    messages = []
    if prompt := system_prompt(settings, variables):
        messages.append({"role": "system", "content": prompt})
    messages.append({"role": "system", "content": OPENING_INSTRUCTION.format(limit=settings.max_reply_chars)})
    return messages


def replayable_arguments(arguments: str) -> str:
    """Arguments as replayed in history: invalid JSON becomes `{}` (some servers reject it, which would wedge
    every later turn); the tool message that follows already tells the model the arguments were unusable."""
    try:
        json.loads(arguments)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's recursion limit
        return "{}"
    return arguments


def tool_call_message(content: str | None, calls: list[tuple[str, str, str]]) -> dict[str, Any]:
    """An assistant message asking for tool calls: (call id, name, arguments JSON) each."""
    return {
        "role": "assistant",
        "content": content or None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": replayable_arguments(args)}}
            for call_id, name, args in calls
        ],
    }


def tool_result_message(call_id: str, result: str | None) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": result if result is not None else INTERRUPTED_RESULT}


def history(
    messages: list[Message], tool_calls: list[ToolCall], reply_positions: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """The conversation as chat messages: outbound → assistant, inbound → user, and each earlier model
    answer that asked for tools as an assistant message with `tool_calls` followed by one `tool` message
    per call, placed right after the last message the model had seen when it asked. An assistant reply
    named in `reply_positions` (message id → last seq its turn had seen) follows its turn's tool calls,
    before any text that arrived while that turn ran.

    Consecutive plain messages of one role are joined (one line each): many chat templates of local
    models refuse two user messages in a row, and a burst of texts reads naturally as lines of one turn.

    Compliance keywords Parley answers itself (STOP, HELP) are left out: they are not the model's to answer.
    A message of Parley's own (`author: system`, say a HELP answer) sent after the customer's latest text is
    placed before the run of texts that ends with it, so that the history ends with what the model is to
    answer, not with an assistant message some servers would take as a start to continue.
    """
    positions = reply_positions or {}
    items: list[tuple[tuple[int, int, int], dict[str, Any] | list[ToolCall], str]] = []
    for message in messages:
        if _handled_by_parley(message):
            continue
        role = "assistant" if message.direction == "outbound" else "user"
        seq = message.seq or 0
        key = (positions[message.id], 2, seq) if message.id in positions else (seq, 0, 0)
        kind = "system" if message.author == "system" else role
        items.append((key, {"role": role, "content": _text_of(message)}, kind))
    for _, group in groupby(tool_calls, key=lambda call: (call.turn_id, call.round)):
        calls = list(group)
        items.append(((calls[0].after_seq, 1, calls[0].pos), calls, "tools"))
    items.sort(key=lambda item: item[0])
    items = _ending_with_the_customer(items)

    chat: list[dict[str, Any]] = []
    for _, item, _ in items:
        if isinstance(item, list):
            chat.append(tool_call_message(item[0].assistant_content, [(c.call_id, c.name, c.arguments) for c in item]))
            chat.extend(tool_result_message(c.call_id, c.result) for c in item)
            continue
        previous = chat[-1] if chat else None
        if previous is not None and previous["role"] == item["role"] and "tool_calls" not in previous:
            previous["content"] = f"{previous['content']}\n{item['content']}"
        else:
            chat.append(item)
    return chat


def _text_of(message: Message) -> str:
    """A message's text, and a note of any attachments an MMS carried: the model cannot see them, but should
    know they came (a picture sent without text is not an empty message)."""
    if not message.media:
        return message.content
    count = len(message.media)
    kinds = ", ".join(sorted({m.content_type for m in message.media}))
    note = f"[The customer sent {count} attachment{'s' if count > 1 else ''} ({kinds}), which you cannot see.]"
    return f"{message.content}\n{note}" if message.content.strip() else note


def _handled_by_parley(message: Message) -> bool:
    """Not shown to the model: an outbound SMS that never reached the phone, or an opt-out or HELP keyword."""
    if message.direction == "outbound":
        return message.status in UNSENT
    return compliance.answered_by_parley(message)


def _ending_with_the_customer(items: list[_T]) -> list[_T]:
    """Placed items (key, item, kind; kinds: user, assistant, system, tools), with the messages of Parley's own that
    end them (sent after everything else, say a HELP answer) moved before what the model is to go on from: the run
    of customer texts they follow, or the tool round (its calls and results, kept together) they follow."""
    first = len(items)
    while first > 0 and items[first - 1][2] == "system":
        first -= 1
    if first in (0, len(items)) or items[first - 1][2] not in ("user", "tools"):
        return items  # none at the end, or they follow an assistant reply: the history is answered
    start = first - 1
    while items[start][2] == "user" and start > 0 and items[start - 1][2] == "user":
        start -= 1
    return items[:start] + items[first:] + items[start:first]


def clean_reply(text: str | None) -> str:
    """The SMS text of a model answer: reasoning blocks some local models emit removed, control characters
    removed, whitespace trimmed ("" when nothing visible is left).

    Besides whole `<think>…</think>` blocks: reasoning before a lone `</think>` (chat templates that put the
    opening tag into the prompt, served without a reasoning parser), and reasoning after an opening tag that
    never closes (an answer cut off by the token limit), which leaves nothing to send."""
    if not text:
        return ""
    text = _THINKING.sub("", text)
    if (closing := _CLOSE.search(text)) is not None:
        text = text[closing.end() :]
    if (opening := _OPEN.search(text)) is not None:
        text = text[: opening.start()]
    return sendable_text(text).strip()


def cut_reply(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary (mid-word only when a single word is longer)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    if text[limit].isspace():
        return head.rstrip()
    boundary = max((i for i, ch in enumerate(head) if ch.isspace()), default=-1)
    if boundary <= 0:
        return head
    return head[:boundary].rstrip()
