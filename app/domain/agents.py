"""Agents: managed ones from `data/agents.toml`, custom ones per organization."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from app.domain.errors import FieldProblem, ValidationFailed
from app.domain.phone import e164_problem
from app.domain.rotation import PreviousSecret, active_secrets
from app.domain.types import MAX_SMS_CHARS, E164Number, Name, VariableName, every_problem, sms_text_problem, whole
from app.webhooks.signing import SECRET_PREFIX, secret_key

ToolName = Annotated[str, Meta(pattern=whole(r"[A-Za-z0-9_-]{1,64}", "1 to 64 letters, digits, _ or -"))]
Prompt = Annotated[str, Meta(max_length=20000)]
SmsText = Annotated[str, Meta(min_length=1, max_length=MAX_SMS_CHARS)]


class WebhookTool(Struct, tag="webhook", tag_field="type", rename="camel", forbid_unknown_fields=True, kw_only=True):
    name: ToolName
    url: Annotated[str, Meta(min_length=8, max_length=2048)]
    description: Annotated[str, Meta(max_length=2000)] = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})
    timeout_seconds: Annotated[float, Meta(gt=0, le=60)] = 10.0


class EndConversationTool(Struct, tag="end_conversation", tag_field="type", forbid_unknown_fields=True):
    pass


class HandoffToHumanTool(Struct, tag="handoff_to_human", tag_field="type", forbid_unknown_fields=True):
    pass


Tool = WebhookTool | EndConversationTool | HandoffToHumanTool


class AgentSettings(Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Everything an agent is configured with (the fields of SPEC §5)."""

    name: Name
    system_prompt: Prompt = ""
    required_variables: Annotated[list[VariableName], Meta(max_length=50)] = []
    model: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    tools: Annotated[list[Tool], Meta(max_length=32)] = []
    max_tool_rounds: Annotated[int, Meta(ge=1, le=20)] = 5
    reply_debounce_ms: Annotated[int, Meta(ge=0, le=60000)] = 1500
    inactivity_timeout_seconds: Annotated[int, Meta(ge=60, le=2592000)] = 86400
    inactivity_warning_seconds: Annotated[int, Meta(ge=1, le=2592000)] | None = None
    inactivity_warning_message: SmsText | None = None
    closing_message: SmsText | None = None
    help_message: SmsText | None = None
    max_reply_chars: Annotated[int, Meta(ge=1, le=MAX_SMS_CHARS)] = 640
    phone_number: E164Number | None = None
    opening_message: SmsText | None = None

    @property
    def warning_lead_seconds(self) -> int | None:
        """How long before the inactivity deadline the warning goes out; None when there is no warning text."""
        return self.inactivity_warning_seconds if self.inactivity_warning_message else None


class AgentPatch(Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    name: Name | UnsetType = UNSET
    system_prompt: Prompt | UnsetType = UNSET
    required_variables: Annotated[list[VariableName], Meta(max_length=50)] | UnsetType = UNSET
    model: Annotated[str, Meta(min_length=1, max_length=255)] | UnsetType | None = UNSET
    temperature: Annotated[float, Meta(ge=0, le=2)] | UnsetType | None = UNSET
    tools: Annotated[list[Tool], Meta(max_length=32)] | UnsetType = UNSET
    max_tool_rounds: Annotated[int, Meta(ge=1, le=20)] | UnsetType = UNSET
    reply_debounce_ms: Annotated[int, Meta(ge=0, le=60000)] | UnsetType = UNSET
    inactivity_timeout_seconds: Annotated[int, Meta(ge=60, le=2592000)] | UnsetType = UNSET
    inactivity_warning_seconds: Annotated[int, Meta(ge=1, le=2592000)] | UnsetType | None = UNSET
    inactivity_warning_message: SmsText | UnsetType | None = UNSET
    closing_message: SmsText | UnsetType | None = UNSET
    help_message: SmsText | UnsetType | None = UNSET
    max_reply_chars: Annotated[int, Meta(ge=1, le=MAX_SMS_CHARS)] | UnsetType = UNSET
    phone_number: E164Number | UnsetType | None = UNSET
    opening_message: SmsText | UnsetType | None = UNSET


class ManagedAgentEntry(AgentSettings, kw_only=True):
    """One `[[agents]]` entry of agents.toml: the settings plus a slug and an optional tool secret."""

    slug: Annotated[
        str, Meta(pattern=whole(r"[a-z0-9][a-z0-9-]{0,254}", "lowercase letters, digits or -, not starting with -"))
    ]
    tool_secret: str | None = None


class AgentsFile(Struct, forbid_unknown_fields=True):
    agents: list[ManagedAgentEntry] = []


class Agent(Struct, kw_only=True):
    """An agent as stored."""

    id: str
    kind: str
    slug: str | None
    org_id: str | None
    settings: AgentSettings
    tool_secret: str
    previous_tool_secrets: list[PreviousSecret]  # newest first
    created_at: int
    updated_at: int

    def signing_secrets(self, now_ms: int) -> list[str]:
        """The tool secret, then every one rotated away whose 24 h overlap has not ended yet."""
        return active_secrets(self.tool_secret, self.previous_tool_secrets, now_ms)


settings_encoder = msgspec.json.Encoder()
settings_decoder = msgspec.json.Decoder(AgentSettings)


def check_settings(settings: AgentSettings, *, kind: str, stored: AgentSettings | None = None) -> None:
    """Rules a type cannot express. A number or text kept as `stored` (a PATCH of other fields) is not checked
    again: an agent an earlier version accepted stays editable, though rules added since would refuse it."""
    problems: list[FieldProblem] = []

    def new(field: str) -> Any:
        value = getattr(settings, field)
        return None if stored is not None and value == getattr(stored, field) else value

    if (number := new("phone_number")) is not None and (problem := e164_problem(number)):
        problems.append(FieldProblem("phoneNumber", problem))
    if kind == "managed" and (settings.phone_number or settings.opening_message):
        named = "phoneNumber" if settings.phone_number else "openingMessage"
        problems.append(FieldProblem(named, "managed agents have no number or opening template"))
    if (settings.inactivity_warning_seconds is None) != (settings.inactivity_warning_message is None):
        problems.append(
            FieldProblem("inactivityWarningSeconds", "set together with inactivityWarningMessage, or neither")
        )
    elif (
        settings.inactivity_warning_seconds is not None
        and settings.inactivity_warning_seconds >= settings.inactivity_timeout_seconds
    ):
        problems.append(FieldProblem("inactivityWarningSeconds", "must be less than inactivityTimeoutSeconds"))
    names = [tool.name for tool in settings.tools if isinstance(tool, WebhookTool)]
    if len(names) != len(set(names)):
        problems.append(FieldProblem("tools", "tool names must be unique"))
    kinds = [type(tool) for tool in settings.tools if not isinstance(tool, WebhookTool)]
    if len(kinds) != len(set(kinds)):
        problems.append(FieldProblem("tools", "a built-in tool is listed twice"))
    texts = {
        "inactivityWarningMessage": "inactivity_warning_message",
        "closingMessage": "closing_message",
        "helpMessage": "help_message",
        "openingMessage": "opening_message",
    }
    for name, field in texts.items():
        if (text := new(field)) is not None and (problem := sms_text_problem(text)):
            problems.append(FieldProblem(name, problem))
    if problems:
        raise ValidationFailed.of(problems)


def apply_patch(settings: AgentSettings, patch: AgentPatch) -> AgentSettings:
    merged = msgspec.to_builtins(settings)
    changes = {
        field.encode_name: msgspec.to_builtins(getattr(patch, field.name))
        for field in msgspec.inspect.type_info(AgentPatch).fields
        if getattr(patch, field.name) is not UNSET
    }
    merged.update(changes)
    try:
        return msgspec.convert(merged, AgentSettings, strict=True)
    except msgspec.ValidationError as exc:
        raise every_problem(merged, AgentSettings, exc) from None


def resolve_secret(value: str | None, *, slug: str, dotenv: Mapping[str, str] | None = None) -> str | None:
    """A managed agent's toolSecret: literal, or `env:VARIABLE` read from the environment, else from what `.env`
    set (`dotenv`); a `whsec_` secret (ValueError, never showing it, otherwise: every tool call of the agent would
    fail to sign)."""
    if value is None:
        return None
    secret, where = value, "toolSecret"
    if value.startswith("env:"):
        name = value[4:]
        secret, where = os.environ.get(name) or (dotenv or {}).get(name, ""), f"toolSecret (from {name})"
        if not secret:
            raise ValueError(f"agent {slug}: toolSecret names {name}, which is not set")
    try:
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError
        secret_key(secret)
    except ValueError:
        raise ValueError(
            f"agent {slug}: {where} must be whsec_ followed by base64 (such as `parley agents list --secrets` shows)"
        ) from None
    return secret


def load_agents_file(path: str | Path) -> list[ManagedAgentEntry]:
    """Parse and check agents.toml; ValueError with a readable message when it is wrong."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"agents file not found: {file}")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
        parsed = msgspec.convert(data, AgentsFile, strict=True)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"{file}: {exc}") from None
    if "agents" not in data:
        # An empty or cut-off file would retire every managed agent: that takes saying so (`agents = []`).
        raise ValueError(f"{file}: no [[agents]] entries (to retire every managed agent, write `agents = []`)")
    slugs = [entry.slug for entry in parsed.agents]
    if shared := sorted({slug for slug in slugs if slugs.count(slug) > 1}):
        raise ValueError(f"{file}: more than one agent has the slug {', '.join(map(repr, shared))}")
    for entry in parsed.agents:
        try:
            check_settings(entry, kind="managed")
        except ValidationFailed as exc:
            raise ValueError(f"{file}: agent {entry.slug}: {exc.message}") from None
    return parsed.agents


def settings_of(entry: ManagedAgentEntry) -> AgentSettings:
    data = msgspec.to_builtins(entry)
    data.pop("slug", None)
    data.pop("toolSecret", None)
    return msgspec.convert(data, AgentSettings)
