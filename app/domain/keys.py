"""API keys: created with a raw value shown once, stored as a SHA-256 hash."""

from __future__ import annotations

import sqlite3

import msgspec

from app.domain.errors import NotFound, Unauthorized
from app.domain.ids import hash_key, new_api_key, new_id, parse_uuid
from app.domain.ttl_cache import TtlCache
from app.store import orgs


class CreatedKey(msgspec.Struct, kw_only=True):
    id: str
    org_id: str
    name: str
    key: str
    key_prefix: str
    expires_at: int | None
    created_at: int


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the key, its organization and when the key expires (None: never)."""

    key_id: str
    org_id: str
    expires_at: int | None = None


def create_key(
    conn: sqlite3.Connection,
    org_id: str,
    name: str,
    expires_at: int | None,
    now_ms: int,
    *,
    test: bool = False,
) -> CreatedKey:
    raw = new_api_key("pk_test_" if test else "pk_live_")
    created = CreatedKey(
        id=new_id(),
        org_id=org_id,
        name=name,
        key=raw,
        key_prefix=raw[:12],
        expires_at=expires_at,
        created_at=now_ms,
    )
    orgs.insert_key(
        conn,
        key_id=created.id,
        org_id=org_id,
        name=name,
        key_hash=hash_key(raw),
        key_prefix=created.key_prefix,
        expires_at=expires_at,
        now_ms=now_ms,
    )
    return created


def well_formed(raw: str) -> bool:
    return raw.startswith(("pk_live_", "pk_test_")) and len(raw) <= 200


def lookup(conn: sqlite3.Connection, key_hash: str) -> Principal | None:
    """The live (unrevoked) key with this hash, whatever its expiry (`expired` says)."""
    row = orgs.key_by_hash(conn, key_hash)
    if row is None or row["revoked_at"] is not None:
        return None
    return Principal(key_id=row["id"], org_id=row["org_id"], expires_at=row["expires_at"])


def expired(principal: Principal, now_ms: int) -> bool:
    return principal.expires_at is not None and principal.expires_at <= now_ms


def authenticate(conn: sqlite3.Connection, raw: str, now_ms: int) -> Principal:
    """The principal of a raw key; Unauthorized for unknown, expired or revoked keys alike."""
    if not well_formed(raw):
        raise Unauthorized()
    principal = lookup(conn, hash_key(raw))
    if principal is None or expired(principal, now_ms):
        raise Unauthorized()
    return principal


class KeyCache(TtlCache[str, Principal]):
    """Recently verified keys by hash, so most requests skip the database.

    Revocation through the API drops the key at once (`forget`), so its very next request fails.
    A key revoked by another process (`parley keys revoke`) is noticed within `ttl_ms`. Expiry is
    checked against the cached expiry on every request.
    """

    def forget(self, key_id: str) -> None:
        self.discard(lambda principal: principal.key_id == key_id)


def revoke(conn: sqlite3.Connection, key_id: str, now_ms: int, org_id: str | None = None) -> sqlite3.Row:
    canonical = parse_uuid(key_id)
    row = orgs.get_key(conn, canonical, org_id) if canonical else None
    if row is None:
        raise NotFound("API key not found.")
    orgs.revoke_key(conn, row["id"], now_ms)
    updated = orgs.get_key(conn, row["id"])
    assert updated is not None
    return updated
