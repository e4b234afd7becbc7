"""Text from a model, shown on a terminal without the terminal acting on it.

A terminal does not show control characters, it obeys them: ESC starts sequences that recolour, move the
cursor, retitle the window or (OSC 52) write the clipboard, BEL rings, and backspace and carriage return
let later text hide what came before. A model, or a document injected into its prompt, can write any of
them. So on a terminal they are shown as escapes (``\\x1b``); into a pipe or a file the text goes byte for
byte (``qwenkit generate ... > out.txt`` keeps what the model wrote).
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

# C0 controls but tab and newline, DEL, and the C1 controls (U+009B is a whole CSI to some terminals).
# One character each: a sequence split across streamed pieces is escaped the same, piece by piece.
CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f"
ACTIVE = re.compile(f"[{CONTROLS}]")
NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_char(char: str) -> str:
    """One character as an escape: tab, newline and carriage return by name, else ``\\xNN`` below 0x80
    and ``\\uNNNN`` above (``\\x85`` is the lone byte 0x85 in ``qwenkit tokenize``, not U+0085)."""
    code = ord(char)
    return NAMED.get(char) or (f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """``text`` with every control character but tab and newline escaped."""
    return ACTIVE.sub(lambda m: escape_char(m.group()), text)


def for_terminal(text: str, stream: TextIO | None = None) -> str:
    """``text`` as it may be written to ``stream`` (standard output by default): controls escaped on a
    terminal, the text unchanged anywhere else."""
    stream = sys.stdout if stream is None else stream
    return escape_controls(text) if stream.isatty() else text


# What json.dumps(..., ensure_ascii=False) leaves raw of the controls: it escapes C0, not DEL or C1.
RAW_IN_JSON = re.compile("[\x7f-\x9f]")


def json_for_terminal(text: str, stream: TextIO | None = None) -> str:
    """JSON text (``json.dumps`` with ``ensure_ascii=False``) as it may be written to ``stream``: on a
    terminal DEL and the C1 controls become ``\\u`` escapes, which a JSON reader reads back as the same
    characters (they occur only inside strings); anywhere else the text is unchanged."""
    stream = sys.stdout if stream is None else stream
    return RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text) if stream.isatty() else text
