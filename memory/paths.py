"""File names as people and diffs see them.

A Linux file name is any bytes but NUL and `/`; Python hands undecodable bytes over as
surrogate escapes (`\\udcff` for the byte 0xff), and a name may hold a newline or a tab.
The store keeps such names exactly (see `memory.store`); here they are shown: escaped on
one line for people and logs (`display_path`), C-quoted in diff headers the way git
quotes them (`c_quote`), so that no name can break a line, a table or a diff.
"""

from __future__ import annotations

import os

_NAMED = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def display_path(path: str | os.PathLike) -> str:
    """`path` on one printable line: undecodable bytes as \\xNN, control characters escaped."""
    text = os.fspath(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def c_quote(name: str) -> str:
    """`name` as git writes it in diff headers: as it is, or in double quotes with C escapes
    (octal for undecodable bytes) when it holds a quote, a backslash or a control character."""
    if name.isprintable() and '"' not in name and "\\" not in name:
        return name
    out = []
    for char in name:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char in _NAMED:
            out.append(_NAMED[char])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\{code - 0xDC00:03o}")
        elif not char.isprintable():
            out.append("".join(f"\\{b:03o}" for b in char.encode("utf-8", "surrogatepass")))
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
