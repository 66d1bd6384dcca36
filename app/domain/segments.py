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
    """(encoding, segment count) of an SMS body."""
    encoding = encoding_of(text)
    if encoding == "GSM-7":
        # Extended characters take an escape and the character: two septets.
        units = len(text) + sum(map(text.count, GSM7_EXTENDED))
        single, multi = 160, 153
    else:
        # UCS-2 counts UTF-16 code units: characters outside the BMP take two.
        units = len(text.encode("utf-16-le")) // 2
        single, multi = 70, 67
    if units <= single:
        return encoding, 1
    return encoding, -(-units // multi)
