"""Table-driven tests of the pure decisions: status lattice, segments, templates, phone numbers."""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from datetime import datetime

import pytest

from app.clock import epoch_ms, iso
from app.domain import status
from app.domain.ids import EntropyPool, new_event_id, new_id, new_provider_id
from app.domain.phone import e164_problem, mask
from app.domain.segments import count_segments
from app.domain.templates import render
from app.observability import loggable_path

STATUSES = ["queued", "sent", "delivered", "undelivered", "failed"]


@pytest.mark.parametrize(("current", "incoming"), list(itertools.product(STATUSES, STATUSES)))
def test_lattice_moves_only_up_and_never_out_of_a_terminal_status(current: str, incoming: str) -> None:
    result = status.advance(current, incoming)
    if current in status.TERMINAL:
        assert result is None
    elif status.RANK[incoming] > status.RANK[current]:
        assert result == incoming
    else:
        assert result is None


@pytest.mark.parametrize(
    ("twilio", "canonical"),
    [
        ("accepted", "queued"),
        ("scheduled", "queued"),
        ("queued", "queued"),
        ("sending", "queued"),
        ("sent", "sent"),
        ("delivered", "delivered"),
        ("read", "delivered"),
        ("undelivered", "undelivered"),
        ("failed", "failed"),
        ("canceled", "failed"),
        ("DELIVERED", "delivered"),
        ("receiving", None),
        ("nonsense", None),
    ],
)
def test_provider_statuses_map_to_canonical_ones(twilio: str, canonical: str | None) -> None:
    assert status.canonical(twilio) == canonical


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("", "GSM-7", 1),
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # extension characters take two septets
        ("€" * 81, "GSM-7", 2),
        ("é" * 160, "GSM-7", 1),
        ("ê" * 70, "UCS-2", 1),
        ("ê" * 71, "UCS-2", 2),
        ("ê" * 134, "UCS-2", 2),
        ("ê" * 135, "UCS-2", 3),
        ("😀" * 35, "UCS-2", 1),  # outside the BMP: two UTF-16 units each
        ("😀" * 36, "UCS-2", 2),
        # A two-septet character or a surrogate pair is never split between two parts of a long SMS.
        ("a" * 152 + "€" + "a" * 152, "GSM-7", 3),
        ("a" * 151 + "€" + "a" * 153, "GSM-7", 2),
        ("€" * 1600, "GSM-7", 22),
        ("a" * 66 + "😀" + "a" * 66, "UCS-2", 3),
        ("a" * 65 + "😀" + "a" * 67, "UCS-2", 2),
        ("😀" * 1600, "UCS-2", 49),
        ("😀" * 34 + "ab", "UCS-2", 1),  # fits one part whole: no packing
    ],
)
def test_segment_counting(text: str, encoding: str, segments: int) -> None:
    assert count_segments(text) == (encoding, segments)


@pytest.mark.parametrize(
    ("template", "variables", "expected"),
    [
        ("Hi {{customerName}}", {"customerName": "Ada"}, "Hi Ada"),
        ("Hi {{ customerName }}!", {"customerName": "Ada"}, "Hi Ada!"),
        ("Hi {{missing}}.", {}, "Hi ."),
        ("{{a}}{{b}}", {"a": "1", "b": "2"}, "12"),
        ("{{not closed", {"not": "x"}, "{{not closed"),
        ("{{a}}", {"a": "{{b}}", "b": "no"}, "{{b}}"),
    ],
)
def test_templates_fill_placeholders(template: str, variables: dict[str, str], expected: str) -> None:
    assert render(template, variables) == expected


@pytest.mark.parametrize(
    ("number", "ok"),
    [
        ("+15555550199", True),  # fictional 555 numbers from the docs pass
        ("+15005550001", True),
        ("+447911123456", True),
        ("+4915112345678", True),
        ("15555550199", False),
        ("+05555550199", False),
        ("+1555", False),
        ("+1 555 555 0199", False),
        ("+1234567890123456", False),
        ("+999123456789", False),  # no such country code: not a possible number
        ("+390612345678", True),  # Italy keeps its leading 0 in E.164
        ("+4407700900123", False),  # the UK trunk 0 is not part of the number: +447700900123 is
        ("+49015112345678", False),
        ("", False),
    ],
)
def test_e164_numbers(number: str, ok: bool) -> None:
    assert (e164_problem(number) is None) is ok


def test_mask_keeps_the_last_four_digits() -> None:
    assert mask("+15555550199") == "***0199"


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/sms-conversations/+15555550199", "/v1/sms-conversations/+*******0199"),
        ("/v1/x/15555550188/messages", "/v1/x/*******0188/messages"),
        (
            "/v1/sms-conversations/0195c1d2-7a3b-7c4d-8e9f-012345678901",
            "/v1/sms-conversations/0195c1d2-7a3b-7c4d-8e9f-012345678901",
        ),
        (
            "/v1/zz\n17:05:00 INFO parley.access: request status=200",
            "/v1/zz\\n**:**:*0 INFO parley.access: request status=200",  # 9 digits: all but the last 4 hidden
        ),
        ("/v1/\r+15555550177", "/v1/\\r+*******0177"),
        ("/v1/sms-conversations/+15557771234abc", "/v1/sms-conversations/+*******1234abc"),
        ("/v1/sms-conversations/+1 555 777 1234", "/v1/sms-conversations/+* *** *** 1234"),
        ("/v1/sms-conversations/+1+555+777+1234", "/v1/sms-conversations/+*+***+***+1234"),
        ("/v1/x/(555)_777-1234/y", "/v1/x/(***)_***-1234/y"),
        ("/v1/x/+1/555/777/1234", "/v1/x/+*/***/***/1234"),  # split over segments
        ("/v1/x/%2B1%20555%20777%201234", "/v1/x/%*B*%*****%*****%**1234"),  # encoded twice
        ("/v1/x/\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668", "/v1/x/****\u0665\u0666\u0667\u0668"),
        ("/v1/agents/12345/rotate-tool-secret", "/v1/agents/12345/rotate-tool-secret"),  # too few digits
        (
            "/v1/webhooks/0195c1d2-7a3b-7c4d-8e9f-012345678901/deliveries",
            "/v1/webhooks/0195c1d2-7a3b-7c4d-8e9f-012345678901/deliveries",
        ),
    ],
)
def test_a_logged_path_masks_phone_numbers_and_escapes_control_characters(path: str, logged: str) -> None:
    assert loggable_path(path) == logged


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        # A leaked key revoked by the key itself, where its id belongs.
        ("/v1/api-keys/pk_live_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789AbCd/revoke", "/v1/api-keys/pk_live_***/revoke"),
        ("/v1/api-keys/pk_test_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN", "/v1/api-keys/pk_test_***"),
        ("/v1/agents/Bearer pk_live_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN", "/v1/agents/Bearer pk_live_***"),
        # A signing secret is base64: its `/` does not end it.
        ("/v1/webhooks/whsec_AGFEIyn7zfp6tl4U/gSqwVSPxdbILLRH9uc+tvxGu3o=/deliveries", "/v1/webhooks/whsec_***"),
        ("/v1/api-keys/pk_live_/revoke", "/v1/api-keys/pk_live_/revoke"),  # nothing after the prefix: nothing hidden
    ],
)
def test_a_logged_path_shows_a_key_or_signing_secret_in_it_by_its_kind_only(path: str, logged: str) -> None:
    assert loggable_path(path) == logged


def test_timestamps_are_rfc3339_with_milliseconds() -> None:
    assert iso(1775829600000) == "2026-04-10T14:00:00.000Z"
    assert iso(1775829600123) == "2026-04-10T14:00:00.123Z"
    assert epoch_ms(datetime.fromisoformat("2026-04-10T14:00:00.123Z")) == 1775829600123
    assert epoch_ms(datetime.fromisoformat("2026-04-10T16:00:00+02:00")) == 1775829600000
    with pytest.raises(ValueError):
        epoch_ms(datetime.fromisoformat("2026-04-10T14:00:00"))


def test_ids_are_version_4_uuids_and_never_repeat() -> None:
    made = [new_id() for _ in range(20_000)]  # several refills of the entropy pool
    assert len(set(made)) == len(made)
    parsed = [uuid.UUID(value) for value in made]
    assert {u.version for u in parsed} == {4} and {u.variant for u in parsed} == {uuid.RFC_4122}
    assert [str(u) for u in parsed] == made
    events = {new_event_id() for _ in range(5000)}
    assert len(events) == 5000 and all(len(e) == 4 + 24 for e in events)


def test_event_and_simulator_ids_grow_with_time_so_their_indexes_append() -> None:
    first_event, first_sid = new_event_id(), new_provider_id("SM")
    time.sleep(0.003)
    later_events = [new_event_id() for _ in range(100)]
    later_sids = [new_provider_id("SM") for _ in range(100)]
    assert all(first_event < e for e in later_events) and all(first_sid < s for s in later_sids)
    assert re.fullmatch(r"evt_[0-9a-f]{24}", first_event) and re.fullmatch(r"SM[0-9a-f]{32}", first_sid)
    assert len(set(later_events)) == 100 and len(set(later_sids)) == 100  # same millisecond: random tails


def test_a_forked_child_never_hands_out_bytes_of_the_parents_pool() -> None:
    pool = EntropyPool(size=4096)
    pool.take(16)  # the pool now holds unused bytes a naive fork would share
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write_end, pool.take(16))
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    child = os.read(read_end, 16)
    os.close(read_end)
    assert len(child) == 16 and child != pool.take(16)


def test_count_segments_charges_extended_gsm_characters_two_septets() -> None:
    assert count_segments("a" * 160) == ("GSM-7", 1)
    assert count_segments("a" * 159 + "€") == ("GSM-7", 2)  # 161 septets
    assert count_segments("[]" * 80) == ("GSM-7", 3)  # 320 septets: three 153-septet parts
    assert count_segments("a" * 160 + "é") == ("GSM-7", 2)  # é is in the basic set
    assert count_segments("a" * 70 + "😀") == ("UCS-2", 2)  # 72 UTF-16 units
