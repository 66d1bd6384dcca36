"""A small time-bounded cache for rows that change rarely and are read on every request."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Entries live `ttl_ms`; a change made in this process drops what it affects at once (`discard`),
    one made by another process (a CLI command on the same database) is noticed within `ttl_ms`.
    Misses are not cached, so something new is found at once. Full at `max_entries`, it starts over."""

    def __init__(self, ttl_ms: int = 2000, max_entries: int = 10_000) -> None:
        self.ttl_ms = ttl_ms
        self.max_entries = max_entries
        self._entries: dict[K, tuple[V, int]] = {}
        self.generation = 0  # moves on every `discard`: see `put`

    def get(self, key: K, now_ms: int) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now_ms:
            return None
        return entry[0]

    def put(self, key: K, value: V, now_ms: int, *, read_at: int | None = None) -> None:
        """Keep `value`; with `read_at` (the `generation` when it was read), only if nothing was discarded since:
        a value read before a change, and put after the change dropped it, would bring it back."""
        if read_at is not None and read_at != self.generation:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (value, now_ms + self.ttl_ms)

    def discard(self, matches: Callable[[V], bool]) -> None:
        """Drop every entry whose value `matches`."""
        self.generation += 1
        for key, (value, _) in list(self._entries.items()):
            if matches(value):
                del self._entries[key]
