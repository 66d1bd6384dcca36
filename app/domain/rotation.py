"""Signing-secret rotation, shared by webhook endpoints and agents' tool secrets: a secret rotated away keeps
signing, beside the current one, until 24 hours after its own rotation."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

ROTATION_OVERLAP_MS = 24 * 3_600_000
# Each rotation adds a signature to every request for a day; the cap bounds the header however often one rotates.
MAX_PREVIOUS_SECRETS = 10


class PreviousSecret(msgspec.Struct, kw_only=True):
    """A secret rotated away; it keeps signing, beside the current one, until `until` (ms)."""

    secret: str
    until: int


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[PreviousSecret])


def encode_previous(previous: list[PreviousSecret]) -> str:
    """The stored form: a JSON array of {"secret", "until"}, newest first."""
    return _encoder.encode(previous).decode()


def decode_previous(stored: str) -> list[PreviousSecret]:
    return _decoder.decode(stored)


def after_rotation(previous: list[PreviousSecret], retired: str, now_ms: int) -> list[PreviousSecret]:
    """The previous secrets once `retired` is rotated away at `now_ms`: it first, then those still in their
    overlap, newest first, at most MAX_PREVIOUS_SECRETS (the oldest beyond that are dropped)."""
    kept = [p for p in previous if now_ms < p.until]
    return [PreviousSecret(secret=retired, until=now_ms + ROTATION_OVERLAP_MS), *kept][:MAX_PREVIOUS_SECRETS]


def active_secrets(secret: str, previous: Iterable[PreviousSecret], now_ms: int) -> list[str]:
    """The current secret, then every secret rotated away whose overlap has not ended yet."""
    return [secret, *(p.secret for p in previous if now_ms < p.until)]
