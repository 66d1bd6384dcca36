"""Phone numbers: E.164 syntax, checked with phonenumbers, and masking for logs."""

from __future__ import annotations

import functools
import re

import phonenumbers

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


@functools.lru_cache(maxsize=16384)
def e164_problem(value: str) -> str | None:
    """Why `value` is not an acceptable E.164 number, or None when it is.

    A *possible* number is enough: fictional 555 numbers from the docs must pass. One whose length fits only a
    number dialled within its area (`+15550000`: a NANP number missing its area code) is not: no SMS reaches it.
    Nor is one written with its national trunk prefix (`+4407700900123`): the carrier names that phone
    `+447700900123`, so its replies and its STOP would never match the number stored.
    """
    if not E164.fullmatch(value):
        return "must be an E.164 number such as +15555550123"
    try:
        parsed = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        return "is not a phone number"
    if phonenumbers.is_possible_number_with_reason(parsed) != phonenumbers.ValidationResult.IS_POSSIBLE:
        return "is not a possible phone number (too short, too long, or missing its area code)"
    if phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) != value:
        return (
            "is not in E.164 form: leave out the national prefix (such as the 0 of a UK number) after the country code"
        )
    return None


def mask(value: str | None) -> str | None:
    """Keep only the last four digits: +15555550123 -> ***0123."""
    if not value:
        return value
    return "***" + value[-4:]
