"""The tools an agent offers the model: webhook tools (signed HTTP calls) and the built-ins.

A webhook tool is called with a POST signed like a Standard Webhooks delivery with the agent's tool
secret(s), through the outbound-URL guard; whatever goes wrong (refused URL, timeout, non-2xx, a
body over 16 KiB or not JSON) becomes an error result the model sees, never an exception.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2
import jsonschema_rs
import msgspec

from app.domain.agents import (
    AgentSettings,
    EndConversationTool,
    HandoffToHumanTool,
    Tool,
    WebhookTool,
)
from app.domain.errors import FieldProblem, ValidationFailed
from app.webhooks import guard, signing

MAX_RESPONSE_BYTES = 16 * 1024
END_CONVERSATION = "end_conversation"
HANDOFF_TO_HUMAN = "handoff_to_human"
BUILTIN_NAMES = frozenset({END_CONVERSATION, HANDOFF_TO_HUMAN})

BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    END_CONVERSATION: {
        "type": "function",
        "function": {
            "name": END_CONVERSATION,
            "description": (
                "End the conversation once this reply is sent: when the customer's matter is settled, they"
                " decline, or they say goodbye. Still write your last reply as usual."
            ),
            "parameters": {
                "type": "object",
                "properties": {"reason": {"type": "string", "description": "Why the conversation ends."}},
            },
        },
    },
    HANDOFF_TO_HUMAN: {
        "type": "function",
        "function": {
            "name": HANDOFF_TO_HUMAN,
            "description": (
                "Hand the conversation to a person: when the customer asks for one, is upset, or needs something"
                " you cannot do. You stop answering until a person resumes you. Tell the customer briefly."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "summary": {"type": "string", "description": "A short summary for the person taking over."}
                },
                "required": ["summary"],
            },
        },
    },
}

_encoder = msgspec.json.Encoder()


class UrlPolicy(Protocol):
    allow_private_urls: bool
    allow_http_urls: bool


@dataclass(frozen=True)
class _Policy:
    allow_private_urls: bool = False
    allow_http_urls: bool = False


STRICT_URL_POLICY: UrlPolicy = _Policy()


class ToolOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a tool call produced; `result` is any JSON value (an `{"error": …}` object when is_error)."""

    result: Any
    is_error: bool = False

    @property
    def text(self) -> str:
        """The result as the `tool` message's content."""
        return _encoder.encode(self.result).decode()


def failure(message: str, **details: Any) -> ToolOutcome:
    return ToolOutcome(result={"error": message, **details}, is_error=True)


def specs(settings: AgentSettings) -> list[dict[str, Any]]:
    """The agent's tools as chat-completions function tools; built-ins only when listed."""
    out: list[dict[str, Any]] = []
    for tool in settings.tools:
        if isinstance(tool, WebhookTool):
            # A schema that leaves `type` out is one of an object here (`schema_problems`); OpenAI refuses a tool
            # schema without it, so it is sent written out.
            parameters = tool.parameters if "type" in tool.parameters else {"type": "object", **tool.parameters}
            function: dict[str, Any] = {"name": tool.name, "parameters": parameters}
            if tool.description:
                function["description"] = tool.description
            out.append({"type": "function", "function": function})
        elif isinstance(tool, EndConversationTool):
            out.append(BUILTIN_SPECS[END_CONVERSATION])
        elif isinstance(tool, HandoffToHumanTool):
            out.append(BUILTIN_SPECS[HANDOFF_TO_HUMAN])
    return out


def kind_of(settings: AgentSettings, name: str) -> tuple[str, WebhookTool | None]:
    """Which of the agent's tools `name` is: (kind, the webhook tool when it is one)."""
    for tool in settings.tools:
        if isinstance(tool, WebhookTool) and tool.name == name:
            return "webhook", tool
        if isinstance(tool, EndConversationTool) and name == END_CONVERSATION:
            return END_CONVERSATION, None
        if isinstance(tool, HandoffToHumanTool) and name == HANDOFF_TO_HUMAN:
            return HANDOFF_TO_HUMAN, None
    return "unknown", None


def parse_arguments(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """The model's arguments as an object, or (None, why not)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's recursion limit
        return None, "the arguments are not valid JSON"
    if not isinstance(value, dict):
        return None, "the arguments must be a JSON object"
    return value, None


# Meta-schemas are built in; an empty registry refuses to fetch any other (a `$schema` or `$ref` naming a URL is
# refused, never retrieved: a fetch would be an outbound request the URL guard never saw).
_NO_RETRIEVAL = jsonschema_rs.Registry([])
MAX_PARAMETERS_BYTES = 16 * 1024  # a tool's JSON Schema, as JSON
# ECMA-262 syntax, checked without compiling (compiling `\w{50000}` took 7 MiB; many such took gigabytes).
_REGEX = jsonschema_rs.validator_for({"type": "string", "format": "regex"}, validate_formats=True)


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas (2020-12 and earlier drafts);
# anything else (`default`, `enum`, `const`, `examples`, unknown keywords) is data, never looked into.
_SCHEMA = {
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "additionalProperties",
    "additionalItems",
    "unevaluatedItems",
    "unevaluatedProperties",
    "items",
}
_SCHEMAS = {"allOf", "anyOf", "oneOf", "prefixItems", "items"}
_NAMED_SCHEMAS = {"properties", "$defs", "definitions", "dependentSchemas", "dependencies", "patternProperties"}


def _walk(node: Any, path: str, found: list[tuple[str, str, str]]) -> None:
    """Collect a schema's regexes, `$ref`s and anchors as (kind, path, text), by keyword, not by key name."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        at = f"{path}.{key}"
        if key == "pattern" and isinstance(value, str):
            found.append(("regex", at, value))
        elif key == "$ref" and isinstance(value, str):
            found.append(("ref", at, value))
        elif key == "$anchor" and isinstance(value, str):
            found.append(("anchor", at, value))
        elif key == "$id" and isinstance(value, str) and value.startswith("#"):  # a draft-7 anchor
            found.append(("anchor", at, value[1:]))
        elif key in _NAMED_SCHEMAS and isinstance(value, dict):
            for name, item in value.items():
                if key == "patternProperties":
                    found.append(("regex", f"{at}.{name}", name))
                _walk(item, f"{at}.{name}", found)
        elif key in _SCHEMAS and isinstance(value, list):
            for index, item in enumerate(value):
                _walk(item, f"{at}.{index}", found)
        elif key in _SCHEMA:
            _walk(value, at, found)


_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


def _resolves(root: dict[str, Any], ref: str, anchors: set[str]) -> bool:
    """A `$ref` within the schema: `#`, a JSON pointer `#/…`, or an anchor `#name` an `$anchor` (or draft-7 `$id`)
    declares. Anything else would be fetched from elsewhere, which a tool schema has no business doing."""
    if not ref.startswith("#"):
        return False
    if ref == "#" or ref.startswith("#/"):
        node: Any = root
        for token in ref[2:].split("/") if ref != "#" else []:
            token = urllib.parse.unquote(token).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and _INDEX.fullmatch(token) and int(token) < len(node):
                node = node[int(token)]
            else:
                return False
        return True
    return ref[1:] in anchors


def schema_problems(parameters: dict[str, Any], field: str) -> list[FieldProblem]:
    """A webhook tool's `parameters`: a valid JSON Schema of type object (its meta-schema, every regex valid
    ECMA-262 syntax, checked without compiling it, every `$ref` within the schema). The model's server gets it as
    is, and one that refuses it would fail every turn of the agent. Nothing is compiled or fetched."""
    if parameters.get("type", "object") != "object":
        return [FieldProblem(field, "must be a JSON Schema of type object")]
    if len(msgspec.json.encode(parameters)) > MAX_PARAMETERS_BYTES:
        return [FieldProblem(field, f"must be at most {MAX_PARAMETERS_BYTES} bytes as JSON")]
    try:
        jsonschema_rs.meta.validate(parameters, registry=_NO_RETRIEVAL)
        found: list[tuple[str, str, str]] = []
        _walk(parameters, field, found)
    except jsonschema_rs.ReferencingError:
        return [FieldProblem(f"{field}.$schema", "must name a JSON Schema draft (4, 6, 7, 2019-09 or 2020-12)")]
    except jsonschema_rs.ValidationError as exc:
        where = ".".join(str(part) for part in exc.instance_path)
        return [FieldProblem(f"{field}.{where}" if where else field, f"is not valid JSON Schema: {exc.message}")]
    except (ValueError, RecursionError):  # "Recursion limit reached"
        return [FieldProblem(field, "is nested too deeply")]
    anchors = {text for kind, _, text in found if kind == "anchor"}
    return [
        FieldProblem(at, "is not a valid regular expression")
        if kind == "regex"
        else FieldProblem(at, "must point inside the schema (#, #/a/json/pointer or #anchor) to something there")
        for kind, at, text in found
        if (kind == "regex" and not _REGEX.is_valid(text))
        or (kind == "ref" and not _resolves(parameters, text, anchors))
    ]


def check_tools(tools: list[Tool], policy: UrlPolicy, *, resolve: guard.Resolver | None = None) -> None:
    """Registration-time rules for an agent's tools, checked before anything is written (off the event loop by
    the API): no webhook tool may take a built-in's name, its `parameters` must be a valid JSON Schema, and its
    URL must pass the outbound-URL guard (its DNS look-ups, all together, within `guard.RESOLVE_SECONDS`). Raises
    ValidationFailed naming `tools.N.…`."""
    problems: list[FieldProblem] = []
    resolve = resolve or guard.resolver_within()  # one time limit for every tool's look-up, not one each
    for index, tool in enumerate(tools):
        if not isinstance(tool, WebhookTool):
            continue
        if tool.name in BUILTIN_NAMES:
            problems.append(FieldProblem(f"tools.{index}.name", f"{tool.name} is the name of a built-in tool"))
        problems += schema_problems(tool.parameters, f"tools.{index}.parameters")
        try:
            guard.check_url(tool.url, policy, resolve=resolve)
        except ValidationFailed as exc:
            for detail in exc.details or [FieldProblem("url", exc.message)]:
                problems.append(FieldProblem(f"tools.{index}.url", detail.message))
    if problems:
        raise ValidationFailed.of(problems)


def request_body(
    *,
    tool_call_id: str,
    name: str,
    arguments: dict[str, Any],
    conversation_id: str,
    agent_id: str,
    dynamic_variables: dict[str, str],
    metadata: dict[str, Any],
) -> bytes:
    return _encoder.encode(
        {
            "toolCallId": tool_call_id,
            "name": name,
            "arguments": arguments,
            "conversationId": conversation_id,
            "agentId": agent_id,
            "dynamicVariables": dynamic_variables,
            "metadata": metadata,
        }
    )


async def _read_capped(response: httpx2.Response, limit: int) -> bytes | None:
    """The body, or None as soon as it passes `limit` bytes (the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def call_webhook(
    tool: WebhookTool,
    body: bytes,
    *,
    tool_call_id: str,
    secrets: list[str],
    timestamp: int,
    policy: guard.GuardSettings,
) -> ToolOutcome:
    """POST the signed call to the tool's URL and turn whatever happens into a ToolOutcome."""
    headers = {
        "content-type": "application/json",
        "user-agent": "Parley",
        "webhook-id": tool_call_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signing.signature_header(secrets, tool_call_id, timestamp, body),
    }
    seconds = tool.timeout_seconds
    try:
        # httpx2's timeout is per phase; the tool's timeout bounds the whole call, slow drips included.
        async with (
            asyncio.timeout(seconds),
            guard.guarded_client(policy, seconds) as client,
            client.stream("POST", tool.url, content=body, headers=headers) as response,
        ):
            status = response.status_code
            raw = await _read_capped(response, MAX_RESPONSE_BYTES)
    except (TimeoutError, httpx2.TimeoutException):
        return failure(f"the tool did not answer within {seconds:g} seconds")
    except guard.BlockedAddress:
        return failure("the tool's URL points to an address Parley may not call")
    except httpx2.HTTPError as exc:
        if isinstance(exc.__cause__, guard.BlockedAddress):
            return failure("the tool's URL points to an address Parley may not call")
        return failure(f"the tool could not be reached ({type(exc).__name__})")
    except (httpx2.InvalidURL, httpx2.StreamError, OSError, ValueError) as exc:  # as the webhook dispatcher
        return failure(f"the tool's URL cannot be called ({type(exc).__name__})")
    if raw is None:
        return failure(f"the tool's response is larger than {MAX_RESPONSE_BYTES // 1024} KiB")
    parsed: Any = None
    valid_json = True
    if raw.strip():
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's recursion limit
            valid_json = False
    if not 200 <= status < 300:
        details: dict[str, Any] = {"status": status}
        if valid_json and parsed is not None:
            details["response"] = parsed
        return failure(f"the tool answered HTTP {status}", **details)
    if not valid_json:
        return failure("the tool's response is not valid JSON")
    return ToolOutcome(result=parsed)
