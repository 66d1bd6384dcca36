"""SMS segment counting: GSM-7 (160/153 characters a segment) or UCS-2 (70/67)."""

from __future__ import annotations

GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = set("^{}\\[~]|€\f")


GSM7 = frozenset(GSM7_BASIC | GSM7_EXTENDED)


def encoding_of(text: str) -> str:
    return "GSM-7" if GSM7.issuperset(text) else "UCS-2"


def count_segments(text: str) -> tuple[str, int]:
    """(encoding, segment count) of an SMS body. A character that takes two units (a GSM-7 extension character:
    an escape and the character; a UTF-16 surrogate pair) is never split between two parts of a long SMS, so
    where one would straddle a boundary the part ends early."""
    encoding = encoding_of(text)
    if encoding == "GSM-7":
        wide = sum(map(text.count, GSM7_EXTENDED))
        single, multi = 160, 153
    else:
        wide = len(text.encode("utf-16-le")) // 2 - len(text)
        single, multi = 70, 67
    units = len(text) + wide
    if units <= single:
        return encoding, 1
    if not wide:
        return encoding, -(-units // multi)
    return encoding, _packed(text, encoding, multi)


def _packed(text: str, encoding: str, size: int) -> int:
    """Parts of `size` units filled whole character by whole character."""
    parts, fill = 1, 0
    for char in text:
        width = 2 if (char in GSM7_EXTENDED if encoding == "GSM-7" else ord(char) > 0xFFFF) else 1
        if fill + width > size:
            parts, fill = parts + 1, 0
        fill += width
    return parts
