"""Logging: one line per event, JSON or console, with nothing sensitive in it."""

from __future__ import annotations

import logging
import re
import sys
import time

import msgspec

from app.clock import iso

_json = msgspec.json.Encoder(enc_hook=str)
# Digits, possibly written the ways people write phone numbers (+1 555 777-1234, (555) 777.1234).
_DIGIT_RUN = re.compile(r"\+?\(?\d[\d ().-]*\d")
_NON_DIGIT = re.compile(r"\D")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _mask_run(match: re.Match[str]) -> str:
    """A run with 7 digits or more may be a phone number: only its last 4 digits are kept."""
    digits = _NON_DIGIT.sub("", match.group())
    return "***" + digits[-4:] if len(digits) >= 7 else match.group()


def _mask_segment(segment: str) -> str:
    return segment if _UUID.fullmatch(segment) else _DIGIT_RUN.sub(_mask_run, segment)


def loggable_path(path: str) -> str:
    """A request path as logs show it: anything that may be a phone number masked to its last 4 digits (in every
    segment but a UUID), and control characters (a percent-encoded newline would forge a log line) escaped."""
    path = "/".join(_mask_segment(segment) for segment in path.split("/"))
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
