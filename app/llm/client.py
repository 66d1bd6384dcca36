"""The model: chat completions through the `openai` SDK, against any OpenAI-compatible endpoint.

One client per process (its connection pool is reused), no SDK-level retries: `complete` retries
timeouts, connection failures and 408/409/429/5xx answers itself, with an injectable backoff, so a
caller sees either an answer or one `ModelError` after the last try.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import openai

from app.config import Settings

log = logging.getLogger("parley.llm")

DEFAULT_ATTEMPTS = 3
DEFAULT_RETRY_DELAYS = (1.0, 4.0)
RETRYABLE_STATUS = frozenset({408, 409, 429})


class ModelNotConfigured(Exception):
    """PARLEY_LLM_BASE_URL and/or a model name are missing; `missing` names the variables to set."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__("set " + " and ".join(missing))
        self.missing = missing


class ModelError(Exception):
    """The model could not answer; `code` is short and safe to log and to put in events."""

    def __init__(self, code: str, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.attempts = attempts


class ToolCallRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call as the model asked for it; `arguments` is the JSON text the model wrote."""

    call_id: str
    name: str
    arguments: str


class ModelAnswer(msgspec.Struct, frozen=True, kw_only=True):
    content: str | None
    tool_calls: list[ToolCallRequest] = []


def _attr(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


def _bad(what: str) -> ModelError:
    return ModelError("model_bad_response", f"the model's answer {what}", attempts=1)


_SCALARS = (str, bytes, int, float, bool, list, tuple)
TEXT_PARTS = {None, "text", "output_text"}


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or (as some OpenAI-compatible servers send it) a list of content parts, whose
    text parts are joined; None when there is none."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, _SCALARS):
                raise _bad("has a content part that is neither text nor an object")
            elif _attr(part, "type") in TEXT_PARTS and isinstance(text := _attr(part, "text"), str):
                texts.append(text)  # parts of other types (reasoning, an image, a refusal) are not texted
        return "".join(texts) if texts else None
    raise _bad("has a message content that is neither text nor a list of parts")


def _as_text(arguments: Any) -> str:
    """Arguments a server sent as an object, as JSON text; one nested deeper than Python writes is a bad response."""
    try:
        return json.dumps(arguments)
    except (ValueError, RecursionError):
        raise _bad("has tool call arguments that cannot be written as JSON") from None


def parse_answer(response: Any) -> ModelAnswer:
    """The first choice of a chat completion; ModelError("model_bad_response") when it has none, or when its shape
    is not a chat completion's (choices not a list, a message that is not an object)."""
    choices = _attr(response, "choices")
    if not choices:
        raise _bad("has no choices")
    if not isinstance(choices, list | tuple):
        raise _bad("has choices that are not a list")
    message = _attr(choices[0], "message")  # None from a choice that is not an object, too
    if message is None:
        raise _bad("has no message")
    if isinstance(message, _SCALARS):
        raise _bad("has a message that is not an object")
    content = _content_text(_attr(message, "content"))
    tool_calls = _attr(message, "tool_calls")
    if tool_calls is None:
        tool_calls = []
    elif not isinstance(tool_calls, list | tuple):  # an empty object too: not "no tool calls"
        raise _bad("has tool calls that are not a list")
    calls = []
    for index, call in enumerate(tool_calls):
        function = _attr(call, "function")
        name = _attr(function, "name")  # None when either is not an object
        if not isinstance(name, str) or not name:
            continue  # not a function call (e.g. a custom tool type this server never offers)
        arguments = _attr(function, "arguments")
        if arguments is None:
            arguments = "{}"
        elif not isinstance(arguments, str):
            arguments = _as_text(arguments)  # some servers send an object instead of JSON text
        calls.append(ToolCallRequest(call_id=str(_attr(call, "id") or f"call_{index}"), name=name, arguments=arguments))
    return ModelAnswer(content=content, tool_calls=calls)


def _read(raw: Any) -> Any:
    """The answer as the SDK reads it (a ChatCompletion, or the text of a body that does not say it is JSON, which
    `parse_answer` refuses). One that says it is JSON and cannot be read as JSON is a bad response: broken, not UTF-8,
    nested deeper than the parser goes, or with an integer longer than Python converts (a ValueError). Only the
    reading of the answer is covered: an error raised building or sending the request (a UnicodeEncodeError from a
    header value the HTTP client cannot encode, say) is not the model's answer, and is not reported as one."""
    try:
        return raw.parse()
    except (ValueError, RecursionError):
        raise _bad("is not readable JSON") from None


def _classify(exc: Exception) -> tuple[str, bool]:
    """(error code, whether another try may help)."""
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return "model_timeout", True
    if isinstance(exc, openai.APIConnectionError):
        return "model_unreachable", True
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return f"model_http_{status}", status >= 500 or status in RETRYABLE_STATUS
    if isinstance(exc, ModelError):
        return exc.code, True
    return "model_bad_response", True


class ChatModel:
    """The configured OpenAI-compatible endpoint; `retry_delays` and `sleep` are injectable for tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.attempts = attempts
        self.retry_delays = tuple(retry_delays)
        self.sleep = sleep
        self._client: openai.AsyncOpenAI | None = None
        if settings.llm_base_url:
            self._client = openai.AsyncOpenAI(
                base_url=settings.llm_base_url,
                api_key=settings.llm_api_key or "none",
                timeout=settings.llm_timeout_seconds,
                max_retries=0,
            )

    def model_for(self, agent_model: str | None) -> str | None:
        return agent_model or self.settings.llm_model

    def missing(self, agent_model: str | None) -> list[str]:
        """The environment variables that must be set before `agent_model` (or the default) can be called."""
        missing = []
        if self._client is None:
            missing.append("PARLEY_LLM_BASE_URL")
        if not self.model_for(agent_model):
            missing.append("PARLEY_LLM_MODEL")
        return missing

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def complete(
        self,
        *,
        model: str | None,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        temperature: float | None = None,
        attempts: int | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> ModelAnswer:
        """One chat completion, retried; raises ModelNotConfigured or ModelError. `wanted` is asked before each
        retry: once it says no (the turn was cancelled meanwhile: its conversation closed, or a person answered), the
        last failure is raised at once."""
        if missing := self.missing(model):
            raise ModelNotConfigured(missing)
        assert self._client is not None
        kwargs: dict[str, Any] = {"model": self.model_for(model), "messages": messages}
        if tools:
            kwargs["tools"] = tools
            if tool_choice is not None:
                kwargs["tool_choice"] = tool_choice
        if temperature is not None:
            kwargs["temperature"] = temperature
        tries = attempts or self.attempts
        for attempt in range(1, tries + 1):
            try:
                # The SDK's timeout bounds each read, not the answer: one that trickles in byte by byte would
                # hold the turn (and a create's opening) for as long as it likes.
                async with asyncio.timeout(self.settings.llm_timeout_seconds):
                    raw = await self._client.chat.completions.with_raw_response.create(**kwargs)
                return parse_answer(_read(raw))
            except (openai.OpenAIError, ModelError, TimeoutError) as exc:
                code, retryable = _classify(exc)
                log.warning("model call failed (attempt %d of %d): %s", attempt, tries, code)
                if not retryable or attempt == tries:
                    raise ModelError(code, _describe(code), attempts=attempt) from None
            delay = self.retry_delays[min(attempt - 1, len(self.retry_delays) - 1)] if self.retry_delays else 0
            await self.sleep(delay)
            if wanted is not None and not wanted():
                raise ModelError(code, _describe(code), attempts=attempt)
        raise AssertionError("unreachable")  # pragma: no cover


def _describe(code: str) -> str:
    if code == "model_timeout":
        return "The model did not answer in time."
    if code == "model_unreachable":
        return "The model endpoint could not be reached."
    if code.startswith("model_http_"):
        return f"The model endpoint answered HTTP {code.removeprefix('model_http_')}."
    return "The model's answer could not be understood."
