"""Identifiers and secrets."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import string
import threading
import time
import uuid

BASE62 = string.ascii_letters + string.digits


class EntropyPool:
    """Bytes from the OS CSPRNG (`os.urandom`), read a few KiB at a time and handed out in order.

    A create takes about seven identifiers (conversation, message, request, provider and event ids);
    one `getrandom` syscall each was ~5 % of its CPU time. Each byte is handed out once; a forked child
    starts with an empty pool so parent and child never share bytes. Keys and secrets do not use it.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._discard)

    def _discard(self) -> None:
        self._buffer, self._offset = b"", 0

    def take(self, count: int) -> bytes:
        with self._lock:
            if self._offset + count > len(self._buffer):
                self._buffer, self._offset = os.urandom(max(self._size, count)), 0
            start = self._offset
            self._offset += count
            return self._buffer[start : self._offset]


_pool = EntropyPool()


def _time_ordered_hex(random_bytes: int) -> str:
    """12 hex digits of Unix milliseconds, then `random_bytes` random bytes in hex: sorts by creation time."""
    return f"{time.time_ns() // 1_000_000:012x}{_pool.take(random_bytes).hex()}"


def new_id() -> str:
    """A random (version 4) UUID."""
    return str(uuid.UUID(bytes=_pool.take(16), version=4))


def new_event_id() -> str:
    """`evt_` + 12 hex digits of Unix milliseconds + 12 random hex digits: time-ordered.

    Events are the busiest table (three rows a create) and their ids are a unique index; ids that
    grow with time append to it instead of dirtying a random page of it for every event.
    """
    return "evt_" + _time_ordered_hex(6)


def new_request_id() -> str:
    return "req_" + _pool.take(10).hex()


def new_provider_id(prefix: str) -> str:
    """A provider-style id (the simulator's `SM…` message SIDs): the prefix and 32 hex digits, time-ordered
    like event ids (12 of milliseconds, 20 random), so the provider-id indexes append too."""
    return prefix + _time_ordered_hex(10)


def new_api_key(prefix: str = "pk_live_") -> str:
    return prefix + "".join(secrets.choice(BASE62) for _ in range(40))


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_signing_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def parse_uuid(value: str) -> str | None:
    """The canonical form of a UUID string, or None when it is not one."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return None
