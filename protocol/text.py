"""Text from elsewhere (a reply, a card's name or description) shown on a terminal."""

from __future__ import annotations

import re

# Control characters other than newline and tab, C1 ones too: escape sequences set a
# terminal's title or clipboard and move its cursor, so text from the server or from a card
# shows each one written out instead.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with its control characters written out (`\\x1b`), so printing it is safe."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)
