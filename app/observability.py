"""Logging: one line per event, JSON or console, with nothing sensitive in it."""

from __future__ import annotations

import logging
import re
import sys
import time

import msgspec

from app.clock import iso

_json = msgspec.json.Encoder(enc_hook=str)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PHONE_DIGITS = 7  # a path holding this many digits outside its UUIDs may hold a phone number
_DIGIT = re.compile(r"\d")
# A credential a client put in a path: an API key (base62) where its id belongs (`/v1/api-keys/pk_live_…/revoke`, a
# leaked key revoked by the key itself), a signing secret (base64, whose `/` does not end it).
_CREDENTIAL = re.compile(r"(pk_live_|pk_test_)[A-Za-z0-9]+|(whsec_)[A-Za-z0-9+/=]+")


def loggable_path(path: str) -> str:
    """A request path as logs show it. An API key or signing secret in it is shown by its kind only (`pk_live_***`).
    If its segments other than UUIDs (and `v1`) hold 7 digits or more, however they are written or split
    (`+1 555 777-1234`, `/+1/555/777/1234`, other scripts' digits), every one of those digits but the last 4 is
    masked with `*`; control characters (a percent-encoded newline would forge a log line) are escaped."""
    if "pk_" in path or "whsec_" in path:
        path = _CREDENTIAL.sub(lambda found: (found[1] or found[2]) + "***", path)
    if len(_DIGIT.findall(path)) >= _PHONE_DIGITS:  # most paths have fewer digits in all
        path = _masked(path)
    return path if path.isprintable() else path.encode("unicode_escape").decode("ascii")


def _masked(path: str) -> str:
    segments = path.split("/")
    open_ = [i for i, segment in enumerate(segments) if segment != "v1" and not _UUID.fullmatch(segment)]
    digits = sum(ch.isdecimal() for i in open_ for ch in segments[i])
    if digits >= _PHONE_DIGITS:
        hidden = digits - 4
        for i in open_:
            masked = []
            for ch in segments[i]:
                if ch.isdecimal() and hidden:
                    masked.append("*")
                    hidden -= 1
                else:
                    masked.append(ch)
            segments[i] = "".join(masked)
    return "/".join(segments)


STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": iso(int(record.created * 1000)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in STANDARD})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return _json.encode(data).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in STANDARD)
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.name}: "
        line += record.getMessage() + (f" {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(fmt: str, level: int = logging.INFO) -> None:
    # Parley's log lines never use the caller's file/line, thread or process names: skip collecting them
    # (the "Optimization" table of the logging HOWTO); the access log writes a line per request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries log full URLs and bodies at INFO; keep them quiet.
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
