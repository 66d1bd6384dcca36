"""Identifiers and secrets."""

from __future__ import annotations

import base64
import hashlib
import secrets
import string
import uuid

BASE62 = string.ascii_letters + string.digits


def new_id() -> str:
    return str(uuid.uuid4())


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(10)


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
