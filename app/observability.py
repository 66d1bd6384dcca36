"""Logging: one line per event, JSON or console, with nothing sensitive in it."""

from __future__ import annotations

import logging
import re
import sys
import time

import msgspec

from app.clock import iso

_json = msgspec.json.Encoder(enc_hook=str)
# A run of 7-15 digits, with or without a `+`, standing on its own in a path (not a UUID's group): a phone number?
_PHONE_LIKE = re.compile(r"(?<![0-9A-Za-z-])\+?\d{7,15}(?![0-9A-Za-z-])")


def _mask(match: re.Match[str]) -> str:
    return "***" + match.group()[-4:]


def loggable_path(path: str) -> str:
    """A request path as logs show it: anything that may be a phone number masked to its last 4 digits, and
    control characters (a percent-encoded newline would forge a console log line) escaped."""
    path = _PHONE_LIKE.sub(_mask, path)
    return path if path.isprintable() else path.encode("unicode_escape").decode("ascii")


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
