"""`qwenkit tokenize [MODEL_DIR] TEXT`: show the ids and pieces a model's tokenizer gives for a text, and the
text each token stands for (byte-level pieces such as `Ġthe` or `ä¸` are not what a reader expects).

The ids are what the model reads for the text as a prompt (`generate`, `/v1/completions`): with the BOS
its tokenizer adds (Llama's; Qwen's add none), as transformers' `tokenizer(text)`. `--no-bos`: without.
Special-token text is plain text, as in a chat's messages, unless `--allow-special` (as a raw prompt)."""

from __future__ import annotations

import json
import re
import sys

from qwenkit.cli.terminal import CONTROLS, escape_char
from qwenkit.command_parser import CommandParser
from qwenkit.errors import QwenkitError


def main(argv: list[str] | None = None) -> int:
    """Print `id<TAB>piece<TAB>"text"` a token (or the count, or a JSON id list); errors: one line, exit 2."""
    parser = CommandParser(prog="qwenkit tokenize", description=__doc__)
    parser.add_argument(
        "model_dir",
        nargs="?",
        help="model directory (tokenizer.json or qwen.tiktoken) or .gguf file (default: the bundled model)",
    )
    parser.add_argument("text", help="text to tokenize; '-' reads standard input")
    shape = parser.add_mutually_exclusive_group()  # both at once printed the count alone
    shape.add_argument("--count", action="store_true", help="print only the number of tokens")
    shape.add_argument("--json", action="store_true", help="print the ids as a JSON list")
    parser.add_argument(
        "--allow-special",
        action="store_true",
        help="parse special-token text (e.g. <|im_end|>) as tokens, as a raw prompt (generate) reads it; "
        "without: as plain text, as a chat's user text is read",
    )
    parser.add_argument(
        "--no-bos",
        action="store_true",
        help="the text's own ids only, without the BOS (or EOS) the tokenizer adds around a prompt",
    )
    # intermixed: `tokenize MODEL --count TEXT` took MODEL as the text and refused TEXT as unrecognized
    args = parser.parse_intermixed_args(argv)

    from qwenkit.cli.common import resolve_model
    from qwenkit.generate import tokenizer_for

    source = "standard input" if args.text == "-" else "TEXT"
    try:
        text = sys.stdin.read() if args.text == "-" else args.text
        text.encode("utf-8")  # undecodable bytes arrive as surrogates, which the tokenizer cannot take
    except UnicodeError as e:
        print(f"error: {source} is not UTF-8 text (an invalid byte at position {e.start})", file=sys.stderr)
        return 2
    try:
        tokenizer = tokenizer_for(resolve_model(args.model_dir))
        encode = tokenizer.encode if args.no_bos else tokenizer.encode_prompt
        ids = encode(text, allow_special=args.allow_special)
    except (QwenkitError, OSError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.count:
        print(len(ids))
    elif args.json:
        print(json.dumps(ids))
    else:
        for token_id in ids:
            print(f"{token_id}\t{tokenizer.id_to_piece(token_id)}\t{shown(tokenizer.token_bytes(token_id))}")
    return 0


def shown(text: bytes) -> str:
    """A token's bytes as a quoted line: UTF-8 as itself, a byte of a character split across tokens as
    \\xNN, and backslash, quote, newline, tab and carriage return escaped, so every token is one line.
    Other control characters (ESC, BEL, backspace, NUL, DEL, C1) and the Unicode line and paragraph
    separators are escaped too (\\xNN below 0x80, else \\uNNNN): printed raw, they acted on the
    terminal (colours, a bell, erased text) instead of showing what the token holds."""
    escaped = text.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace").replace('"', '\\"')
    return f'"{UNPRINTABLE.sub(lambda m: escape_char(m.group()), escaped)}"'


# the controls a terminal acts on, and tab, newline, U+2028 and U+2029, which would break the line
UNPRINTABLE = re.compile(f"[\t\n{CONTROLS}\u2028\u2029]")
