"""SMS segment counting: GSM-7 (160/153 characters a segment) or UCS-2 (70/67)."""

from __future__ import annotations

GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = set("^{}\\[~]|€\f")


def encoding_of(text: str) -> str:
    return "GSM-7" if all(ch in GSM7_BASIC or ch in GSM7_EXTENDED for ch in text) else "UCS-2"


def count_segments(text: str) -> tuple[str, int]:
    """(encoding, segment count) of an SMS body."""
    encoding = encoding_of(text)
    if encoding == "GSM-7":
        units = sum(2 if ch in GSM7_EXTENDED else 1 for ch in text)
        single, multi = 160, 153
    else:
        # UCS-2 counts UTF-16 code units: characters outside the BMP take two.
        units = len(text.encode("utf-16-le")) // 2
        single, multi = 70, 67
    if units <= single:
        return encoding, 1
    return encoding, -(-units // multi)
