"""Pure parts of webhook delivery: Standard Webhooks signatures, the retry schedule, jitter, Retry-After."""

from __future__ import annotations

import base64
import math
import random
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.config import DEFAULT_RETRY_SCHEDULE
from app.domain.ids import new_signing_secret
from app.domain.rotation import (
    MAX_PREVIOUS_SECRETS,
    ROTATION_OVERLAP_MS,
    PreviousSecret,
    active_secrets,
    after_rotation,
)
from app.webhooks import retry, signing

BODY = b'{"id":"evt_1","event":"sms.message_sent","data":{"content":"h\xc3\xa9llo"}}'


def test_secrets_are_whsec_and_32_random_bytes() -> None:
    secret = new_signing_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert new_signing_secret() != secret


def test_signatures_verify_with_the_standardwebhooks_library() -> None:
    secret = new_signing_secret()
    now = int(time.time())
    headers = signing.headers([secret], "evt_1", now, BODY)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == str(now)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(BODY, headers)["id"] == "evt_1"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_signing_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY + b" ", headers)


def test_two_secrets_give_two_signatures_each_verifiable_alone() -> None:
    new, old = new_signing_secret(), new_signing_secret()
    now = int(time.time())
    headers = signing.headers([new, old], "evt_2", now, BODY)
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2
    for entry, secret, other in ((entries[0], new, old), (entries[1], old, new)):
        alone = {**headers, "webhook-signature": entry}
        Webhook(secret).verify(BODY, alone)
        with pytest.raises(WebhookVerificationError):
            Webhook(other).verify(BODY, alone)


@pytest.mark.parametrize(
    ("previous", "now", "expected"),
    [
        ([], 0, ["new"]),
        ([("old", 1_000)], 999, ["new", "old"]),
        ([("old", 1_000)], 1_000, ["new"]),
        ([("s1", 2_000), ("s0", 1_000)], 999, ["new", "s1", "s0"]),
        ([("s1", 2_000), ("s0", 1_000)], 1_000, ["new", "s1"]),
        ([("s1", 2_000), ("s0", 1_000)], 2_000, ["new"]),
    ],
)
def test_each_previous_secret_signs_only_during_its_own_overlap(
    previous: list[tuple[str, int]], now: int, expected: list[str]
) -> None:
    entries = [PreviousSecret(secret=secret, until=until) for secret, until in previous]
    assert active_secrets("new", entries, now) == expected


def test_a_rotation_keeps_every_secret_still_in_its_overlap_newest_first() -> None:
    day = ROTATION_OVERLAP_MS
    first = after_rotation([], "s0", 0)
    assert first == [PreviousSecret(secret="s0", until=day)]
    second = after_rotation(first, "s1", day // 2)
    assert second == [PreviousSecret(secret="s1", until=day // 2 + day), PreviousSecret(secret="s0", until=day)]
    # s0's overlap has ended by the third rotation: it is dropped, s1 stays.
    third = after_rotation(second, "s2", day)
    assert [p.secret for p in third] == ["s2", "s1"]


def test_a_rotation_keeps_at_most_ten_previous_secrets_dropping_the_oldest() -> None:
    previous: list[PreviousSecret] = []
    for n in range(MAX_PREVIOUS_SECRETS + 2):
        previous = after_rotation(previous, f"s{n}", n)
    assert MAX_PREVIOUS_SECRETS == 10
    assert [p.secret for p in previous] == [f"s{n}" for n in range(MAX_PREVIOUS_SECRETS + 1, 1, -1)]


def test_a_secret_that_is_not_base64_is_rejected() -> None:
    with pytest.raises(ValueError):
        signing.secret_key("whsec_not*base64")


class Fixed(random.Random):
    """An rng whose uniform() returns a chosen point of the range (0 = low end, 1 = high end)."""

    def __init__(self, point: float) -> None:
        super().__init__()
        self.point = point

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.point


@pytest.mark.parametrize(
    ("attempts", "point", "status", "timed_out", "retry_after", "expected_ms"),
    [
        (1, 0.5, 500, False, None, 5_000),  # first retry: 5 s
        (1, 0.0, 500, False, None, 4_000),  # -20 %
        (1, 1.0, 500, False, None, 6_000),  # +20 %
        (2, 0.5, 500, False, None, 300_000),  # 5 min
        (7, 0.5, 500, False, None, 36_000_000),  # the last 10 h
        (8, 0.5, 500, False, None, None),  # schedule exhausted: failed
        (1, 0.5, 0, True, None, 60_000),  # a timeout waits at least 60 s
        (1, 0.5, 429, False, None, 60_000),  # so does a 429
        (3, 0.5, 429, False, None, 1_800_000),  # unless the schedule is longer already
        (2, 0.5, 503, False, 500.0, 500_000),  # Retry-After above the schedule is honoured
        (2, 0.5, 503, False, 10_000.0, 600_000),  # ... up to twice the scheduled wait
        (2, 0.5, 503, False, 1.0, 300_000),  # a shorter Retry-After does not hurry us
        (1, 0.5, 429, False, 90.0, 60_000),  # 429 with Retry-After: capped at 2x5 s, then the 60 s floor
    ],
)
def test_next_delay(
    attempts: int,
    point: float,
    status: int,
    timed_out: bool,
    retry_after: float | None,
    expected_ms: int | None,
) -> None:
    delay = retry.next_delay_ms(
        attempts,
        DEFAULT_RETRY_SCHEDULE,
        status_code=status,
        timed_out=timed_out,
        retry_after=retry_after,
        rng=Fixed(point),
    )
    assert delay == expected_ms


def test_jitter_stays_within_twenty_percent() -> None:
    rng = random.Random(7)
    for attempts, scheduled in enumerate(DEFAULT_RETRY_SCHEDULE, start=1):
        delays = [
            retry.next_delay_ms(
                attempts, DEFAULT_RETRY_SCHEDULE, status_code=500, timed_out=False, retry_after=None, rng=rng
            )
            for _ in range(200)
        ]
        assert all(d is not None and 0.8 * scheduled * 1000 <= d <= 1.2 * scheduled * 1000 for d in delays)
        assert len(set(delays)) > 100  # actually random


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("-5", None),
        ("²", None),  # a digit to str.isdigit, not to int()
        ("9" * 400, math.inf),  # past what a float holds: longer than any cap
        ("9" * 5000, math.inf),  # past what int() reads by default
        ("Fri, 31 Dec 99999 23:59:59 GMT", None),
        (format_datetime(datetime.fromtimestamp(1_000_090, tz=UTC), usegmt=True), 90.0),
        (format_datetime(datetime.fromtimestamp(999_000, tz=UTC), usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert retry.parse_retry_after(value, 1_000_000_000) == expected


def test_an_endpoint_is_disabled_after_five_days_of_failure() -> None:
    day = 86_400_000
    assert not retry.should_disable(None, 10 * day)
    assert not retry.should_disable(0, 5 * day - 1)
    assert retry.should_disable(0, 5 * day)
