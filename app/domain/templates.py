"""`{{name}}` templates filled from a conversation's dynamic variables."""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render(template: str, variables: dict[str, str]) -> str:
    """Fill every `{{name}}`; a placeholder without a value renders as an empty string."""
    return PLACEHOLDER.sub(lambda match: variables.get(match.group(1), ""), template)
