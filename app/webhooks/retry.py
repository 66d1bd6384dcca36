"""When to try a failed delivery again: the retry schedule, jitter, and the server's `Retry-After`."""

from __future__ import annotations

import math
import random
from email.utils import parsedate_to_datetime

JITTER = 0.2
SLOW_DOWN_FLOOR_SECONDS = 60  # after a timeout or a 429 the receiver is struggling: wait at least this long
RETRY_AFTER_CAP_FACTOR = 2  # `Retry-After` is honoured up to this many times the scheduled wait
DISABLE_AFTER_FAILING_MS = 5 * 86_400_000  # an endpoint failing this long without a success is disabled


def is_success(status_code: int) -> bool:
    return 200 <= status_code < 300


def parse_retry_after(value: str | None, now_ms: int) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date); None if absent or bad. Never
    raises: the value is the endpoint's to choose."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():  # str.isdigit alone admits digits int() refuses, such as "²"
        # More digits than any wait in seconds needs (a float overflows past ~309): longer than any cap anyway.
        return float(int(text)) if len(text) <= 15 else math.inf
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment is None or moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now_ms / 1000)


def next_delay_ms(
    attempts_made: int,
    schedule: tuple[int, ...],
    *,
    status_code: int,
    timed_out: bool,
    retry_after: float | None,
    rng: random.Random,
) -> int | None:
    """Delay before the next scheduled attempt after `attempts_made` failed ones, or None when exhausted.

    The k-th retry waits `schedule[k-1]` seconds ±20 %; at least 60 s after a timeout or a 429; and at
    least the receiver's `Retry-After`, but never more than twice the scheduled wait on its account.
    """
    if attempts_made < 1 or attempts_made > len(schedule):
        return None
    scheduled = float(schedule[attempts_made - 1])
    delay = scheduled * rng.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_FACTOR * scheduled))
    if timed_out or status_code == 429:
        delay = max(delay, SLOW_DOWN_FLOOR_SECONDS)
    return round(delay * 1000)


def should_disable(failing_since: int | None, now_ms: int) -> bool:
    """An endpoint that has failed without a single success for five days gets disabled."""
    return failing_since is not None and now_ms - failing_since >= DISABLE_AFTER_FAILING_MS
