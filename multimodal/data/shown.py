"""How text that comes from files (image paths, records cells, DICOM headers, decoder errors) may appear
in a message or a log line.

Such text is written by whoever made the files: an escape sequence in a file name or a header value
would drive the terminal that shows the error, and a newline would forge a log line. And a full image
path may carry a patient's name in a folder above the image root, which the user already knows.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# C0 and C1 controls (ESC, CSI, BEL, newlines), DEL, and the Unicode line separators and bidi controls
# that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text) -> str:
    """`text` as one line that cannot drive a terminal: every control character as its escape."""
    text = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    return _CONTROL.sub(lambda m: _NAMED.get(m[0]) or _code(ord(m[0])), text)


def _code(n: int) -> str:
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def shown_path(path, root) -> str:
    """An image path as messages name it: relative to the image root (as a records cell writes it),
    never the full path; an absolute path outside the root by its file name alone (".../x.png"): the
    folders above it are where a patient's name would be."""
    p, root = Path(path), Path(root)
    if p.is_absolute():
        try:
            p = p.relative_to(root)
        except ValueError:
            try:
                p = p.resolve().relative_to(root.resolve())
            except (ValueError, OSError, RuntimeError):
                return printable(f".../{p.name}")
    return printable(p)
