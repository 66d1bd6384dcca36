"""What a host name may look like: one rule for the settings (listen host, configured URLs) and the outbound-URL
guard."""

from __future__ import annotations

import re

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def is_host_name(name: str) -> bool:
    """An RFC 1123 host name: dot-separated labels of 1-63 letters, digits or `-` (and `_`, which /etc/hosts
    tolerates), none starting or ending with `-`, at most 253 characters; one trailing dot allowed."""
    bare = name[:-1] if name.endswith(".") else name
    return 0 < len(bare) <= 253 and all(_LABEL.fullmatch(label) for label in bare.split("."))
