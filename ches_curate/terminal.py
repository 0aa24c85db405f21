"""Text made safe to print: pair texts and user-supplied names are shown, never obeyed by the terminal.

A pair text with `\\x1b[2J` or `\\x1b]0;title\\x07` would clear the screen or retitle the
window if printed raw, and rich passes ESC through (it strips only a few C0 codes).
Every command routes such text through `printable` before printing it.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f"  # C0 except \t and \n, DEL, C1 (\x9b is a one-byte CSI)
    "\u202a-\u202e\u2066-\u2069"  # bidi embeddings, overrides and isolates: they reorder what follows
    "\ud800-\udfff]"  # lone surrogates, which cannot be encoded for the terminal at all
)


def printable(text: object) -> str:
    """`text` with control characters other than newline and tab written as visible escapes.

    `"\\x1b[31mred"` becomes the 11 characters `\\x1b[31mred`; code points above 0xff
    become `\\uXXXX`. Everything else, backslashes included, is left as it is.
    """
    return _UNSAFE.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
