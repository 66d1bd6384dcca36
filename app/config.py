"""Settings from the environment (and a `.env` file in the working directory), validated once at start-up."""

from __future__ import annotations

import io
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
from dotenv import dotenv_values
from dotenv.parser import Binding, parse_stream

from app.hostnames import is_host_name

DEFAULT_RETRY_SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 36000)
MAX_RETRY_STEP_SECONDS = 30 * 86_400


class ConfigError(Exception):
    """A bad setting: the message is one line that names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database: str = "data/parley.db"
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = "http://127.0.0.1:8000"
    agents_file: str = "data/agents.toml"
    sms_provider: str = "simulator"
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    # An API key (SK…) and its secret authenticate the REST calls instead of the account's auth token, which still
    # checks Twilio's callback signatures.
    twilio_api_key: str | None = None
    twilio_api_secret: str | None = None
    twilio_api_base: str = "https://api.twilio.com"
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str | None = None
    llm_timeout_seconds: float = 30.0
    allow_private_urls: bool = False
    allow_http_urls: bool = False
    webhook_retry_schedule: tuple[int, ...] = DEFAULT_RETRY_SCHEDULE
    log_format: str = "console"
    rate_limit: float = 100.0
    status_reconcile_after_seconds: int = 600
    # What `.env` set, for agents.toml's `toolSecret = "env:NAME"` (the environment wins). Kept here, not copied
    # into os.environ: a shared .env's proxy or SDK variables must not change how Parley calls out.
    dotenv: dict[str, str] = {}

    @property
    def data_dir(self) -> Path:
        return Path(self.database).parent


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be 0 or 1 (true/false, yes/no and on/off are read too), got {raw!r}")


# Plain ASCII digits, as the README's "whole seconds" and "requests per second" mean: Python's int() and float()
# would also take `8_000`, full-width digits, `1e3`, `nan` and `inf`.
_WHOLE = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def _number(name: str, raw: str, kind: type, low: float, high: float) -> int | float:
    text = raw.strip()
    if not (_WHOLE if kind is int else _DECIMAL).fullmatch(text):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what} between {low} and {high}, got {raw!r}")
    value = kind(text)
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {raw!r}")
    return value


def _is_host(value: str) -> bool:
    """An IP address or a well-formed host name."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    # An all-numeric last label is a mistyped IP address.
    return is_host_name(value) and not value.rstrip(".").rsplit(".", 1)[-1].isdigit()


def _host(name: str, raw: str) -> str:
    """A listen host; whether it is one of this machine's, `serve` finds out."""
    value = raw.strip()
    if not _is_host(value):
        raise ConfigError(f"{name} must be an IP address or a host name, got {raw!r}")
    return value


def listen_address(host: str, port: int) -> str:
    """`host:port` as a URL names it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url(name: str, raw: str, *, base: bool = False) -> str:
    """An http(s) URL with a well-formed host and port; a `base` one (paths are appended to it) has neither
    query nor fragment."""
    value = raw.strip().rstrip("/")
    scheme, colon, rest = value.partition(":")
    if colon and scheme.lower() in {"http", "https"}:
        value = scheme.lower() + colon + rest  # schemes are case-insensitive; Parley writes them lower-case
    try:
        parts = urlsplit(value)
        _ = parts.port  # a ValueError when the port is not a number from 0 to 65535
    except ValueError:
        parts = None
    if (
        parts is None
        or not value.startswith(("http://", "https://"))
        or any(c.isspace() or not c.isprintable() for c in value)  # urlsplit silently drops tabs and newlines
        or not parts.hostname
        or not _is_host(parts.hostname)
        or (base and (parts.query or parts.fragment or value.endswith(("?", "#"))))
    ):
        kind = "an http(s) URL with no query or fragment" if base else "an http(s) URL"
        raise ConfigError(f"{name} must be {kind}, got {_shown(raw)}")
    if parts.username is not None or parts.password is not None:
        # Never echoed: the value holds a password. (Twilio signs the URL without it; keys go in their variables.)
        raise ConfigError(f"{name} must not contain credentials (user:password@)")
    return value


def _shown(raw: str) -> str:
    """A bad URL as an error line shows it: never its credentials, nor its query or fragment (a token may be
    there)."""
    if "@" in raw:
        return "a value with user:password@ in it (not shown)"
    head = re.split(r"[?#]", raw, maxsplit=1)[0]
    return repr(head) + (" and a query or fragment (not shown)" if head != raw else "")


def _schedule(name: str, raw: str) -> tuple[int, ...]:
    parts = [part.strip() for part in raw.split(",")]
    if not all(_WHOLE.fullmatch(part) for part in parts):
        raise ConfigError(f"{name} must be comma-separated whole seconds, got {raw!r}")
    steps = tuple(int(part) for part in parts)
    if any(step > MAX_RETRY_STEP_SECONDS for step in steps):
        raise ConfigError(f"{name} steps must be at most {MAX_RETRY_STEP_SECONDS} seconds (30 days), got {raw!r}")
    return steps


def _choice(name: str, raw: str, choices: tuple[str, str]) -> str:
    """One of two words, spaces around it ignored."""
    if (value := raw.strip()) not in choices:
        raise ConfigError(f"{name} must be {choices[0]} or {choices[1]}, got {raw!r}")
    return value


def _one_word(name: str, value: str | None) -> None:
    """A credential as an env file can mangle it (a trailing space or newline, quotes kept literally by Docker's
    --env-file or systemd's EnvironmentFile): refused, without showing it."""
    if value and not re.fullmatch(r"[!#-&(-~]+", value):  # visible ASCII but the two quotes
        raise ConfigError(f"{name} must be one word of visible ASCII characters (no spaces, quotes or line breaks)")


def _twilio_credentials(settings: Settings) -> None:
    """Credentials as an env file mangles them (a trailing space or newline, a quote, a pasted URL) fail every send
    and every callback signature: refused at start-up. Only the shape is checked (Twilio-compatible services use
    other id formats): one token of visible characters, and an account id that fits in a URL path segment."""
    for name, value in (
        ("TWILIO_ACCOUNT_SID", settings.twilio_account_sid),
        ("TWILIO_AUTH_TOKEN", settings.twilio_auth_token),
        ("TWILIO_API_SECRET", settings.twilio_api_secret),
    ):
        _one_word(name, value)
    if settings.twilio_account_sid and not re.fullmatch(r"[A-Za-z0-9_-]+", settings.twilio_account_sid):
        raise ConfigError(
            "TWILIO_ACCOUNT_SID must be an account id (letters, digits, - and _), such as AC followed by 32 hex digits"
        )


# The variable a bad line meant to set, when it reads as an attempt at one (a name, then `=` or `:`): a line that does
# not (the second line of a value wrapped without quotes, say) may be part of a secret, and is not quoted at all.
_LEADING_NAME = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*[:=]")


def _sets_nothing(binding: Binding) -> bool:
    """A line python-dotenv could not parse (it skipped it, with a warning), or one it read, without a warning, as a
    name given no value though the name holds a `:`: `NAME:value`, YAML's spelling, which sets nothing. (A bare
    `NAME` is python-dotenv's "declared, no value" and stays allowed.)"""
    return binding.error or (binding.value is None and ":" in (binding.key or ""))


def _env_file(path: str | None) -> dict[str, str]:
    """What a `.env` file sets, read whole or not at all: a file that is not UTF-8 text, or a line that is not
    `NAME=value` (`_sets_nothing`), stops start-up with one line naming the file, the line and its variable (never
    its value). Such a line used to leave its variable at the default: for PARLEY_DATABASE, a new, empty
    database."""
    if not path or not Path(path).is_file():
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} must be UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} is not)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror})") from None
    for binding in parse_stream(io.StringIO(text)):
        if _sets_nothing(binding):
            statement = binding.original.string
            # A statement's text starts with the blank lines before it, which its line number counts from.
            line = binding.original.line + statement[: len(statement) - len(statement.lstrip())].count("\n")
            named = _LEADING_NAME.match(statement)
            what = f" (it starts with {named.group(1)})" if named else ""
            raise ConfigError(f"{path} line {line} is not NAME=value{what}; its value is not shown")
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: str | None = ".env",
    *,
    host: str | None = None,
    port: int | str | None = None,
) -> Settings:
    """Read settings: `parley serve --host/--port` win over the process environment, which wins over `.env`.

    Raise ConfigError on a bad value.
    """
    values = _env_file(env_file)
    dotenv = dict(values)
    values.update(os.environ if environ is None else environ)

    def get(name: str) -> str | None:
        raw = values.get(name)
        if raw and not raw.strip():  # a stray space in an env file, not a choice
            raise ConfigError(f"{name} is only spaces (leave it empty, or unset, for the default)")
        return raw or None  # empty: unset, the default

    kwargs: dict[str, object] = {"dotenv": dotenv}
    for name in ("PARLEY_DATABASE", "PARLEY_AGENTS_FILE"):
        if (raw := get(name)) is not None and raw != raw.strip():
            # A path may hold spaces, but one that starts or ends with them is an env file's stray space: it would
            # silently make a new, empty database (or miss the agents file) beside the intended one.
            raise ConfigError(f"{name} must not start or end with spaces, got {raw!r}")
    if (raw := get("PARLEY_DATABASE")) is not None:
        if raw == ":memory:" or raw.startswith("file:"):
            raise ConfigError(f"PARLEY_DATABASE must be a file path (an in-memory database keeps nothing), got {raw!r}")
        kwargs["database"] = raw
    if host is not None:
        kwargs["host"] = _host("--host", host)
    elif (raw := get("PARLEY_HOST")) is not None:
        kwargs["host"] = _host("PARLEY_HOST", raw)
    if port is not None:
        kwargs["port"] = _number("--port", str(port), int, 1, 65535)
    elif (raw := get("PARLEY_PORT")) is not None:
        kwargs["port"] = _number("PARLEY_PORT", raw, int, 1, 65535)
    if (raw := get("PARLEY_AGENTS_FILE")) is not None:
        kwargs["agents_file"] = raw
    if (raw := get("PARLEY_SMS_PROVIDER")) is not None:
        kwargs["sms_provider"] = _choice("PARLEY_SMS_PROVIDER", raw, ("simulator", "twilio"))
    for name, field in (
        ("TWILIO_ACCOUNT_SID", "twilio_account_sid"),
        ("TWILIO_AUTH_TOKEN", "twilio_auth_token"),
        ("TWILIO_API_KEY", "twilio_api_key"),
        ("TWILIO_API_SECRET", "twilio_api_secret"),
    ):
        if (raw := get(name)) is not None:
            kwargs[field] = raw
    if (raw := get("TWILIO_API_BASE")) is not None:
        kwargs["twilio_api_base"] = _url("TWILIO_API_BASE", raw, base=True)
    if (raw := get("PARLEY_LLM_BASE_URL")) is not None:
        kwargs["llm_base_url"] = _url("PARLEY_LLM_BASE_URL", raw)
        if "#" in kwargs["llm_base_url"]:  # type: ignore[operator]
            raise ConfigError("PARLEY_LLM_BASE_URL must not have a fragment (#…): the SDK appends paths to it")
    if (raw := get("PARLEY_LLM_API_KEY")) is not None:
        _one_word("PARLEY_LLM_API_KEY", raw)  # a trailing newline (a secret made from a file) fails every call
        kwargs["llm_api_key"] = raw
    if (raw := get("PARLEY_LLM_MODEL")) is not None:
        if raw != raw.strip() or not raw.isprintable():
            raise ConfigError(f"PARLEY_LLM_MODEL must be a model name without surrounding spaces, got {raw!r}")
        kwargs["llm_model"] = raw
    if (raw := get("PARLEY_LLM_TIMEOUT_SECONDS")) is not None:
        kwargs["llm_timeout_seconds"] = _number("PARLEY_LLM_TIMEOUT_SECONDS", raw, float, 0.1, 600)
    if (raw := get("PARLEY_ALLOW_PRIVATE_URLS")) is not None:
        kwargs["allow_private_urls"] = _bool("PARLEY_ALLOW_PRIVATE_URLS", raw)
    if (raw := get("PARLEY_ALLOW_HTTP_URLS")) is not None:
        kwargs["allow_http_urls"] = _bool("PARLEY_ALLOW_HTTP_URLS", raw)
    if (raw := get("PARLEY_WEBHOOK_RETRY_SCHEDULE")) is not None:
        kwargs["webhook_retry_schedule"] = _schedule("PARLEY_WEBHOOK_RETRY_SCHEDULE", raw)
    if (raw := get("PARLEY_LOG_FORMAT")) is not None:
        kwargs["log_format"] = _choice("PARLEY_LOG_FORMAT", raw, ("json", "console"))
    if (raw := get("PARLEY_RATE_LIMIT")) is not None:
        kwargs["rate_limit"] = _number("PARLEY_RATE_LIMIT", raw, float, 0.001, 1_000_000)
    if (raw := get("PARLEY_STATUS_RECONCILE_AFTER_SECONDS")) is not None:
        kwargs["status_reconcile_after_seconds"] = _number(
            "PARLEY_STATUS_RECONCILE_AFTER_SECONDS", raw, int, 1, 30 * 86400
        )
    if (raw := get("PARLEY_PUBLIC_URL")) is not None:
        kwargs["public_url"] = _url("PARLEY_PUBLIC_URL", raw, base=True)
    else:
        kwargs["public_url"] = (
            f"http://{listen_address(str(kwargs.get('host', '127.0.0.1')), int(kwargs.get('port', 8000)))}"
        )
    settings = Settings(**kwargs)
    if settings.sms_provider == "twilio" and not (settings.twilio_account_sid and settings.twilio_auth_token):
        missing = "TWILIO_ACCOUNT_SID" if not settings.twilio_account_sid else "TWILIO_AUTH_TOKEN"
        raise ConfigError(f"{missing} must be set when PARLEY_SMS_PROVIDER=twilio")
    twilio = settings.sms_provider == "twilio"
    if twilio:
        _twilio_credentials(settings)
    if twilio and bool(settings.twilio_api_key) != bool(settings.twilio_api_secret):
        missing = "TWILIO_API_SECRET" if settings.twilio_api_key else "TWILIO_API_KEY"
        raise ConfigError(f"{missing} must be set too when the other of TWILIO_API_KEY and TWILIO_API_SECRET is")
    if twilio and settings.twilio_api_key and not re.fullmatch(r"SK[0-9a-fA-F]{32}", settings.twilio_api_key):
        raise ConfigError("TWILIO_API_KEY must be an API key SID (SK followed by 32 hex digits)")
    if settings.sms_provider == "twilio" and get("PARLEY_PUBLIC_URL") is None:
        # Twilio calls back on this URL and signs over it; a local default would silently lose callbacks.
        raise ConfigError("PARLEY_PUBLIC_URL must be set when PARLEY_SMS_PROVIDER=twilio")
    return settings
