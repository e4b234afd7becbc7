"""``qwenkit embed MODEL TEXT...``: the embedding of each text (``LLM.embed``), as llama.cpp's
``llama-embedding`` prints them: a JSON line ``{"index": i, "embedding": [...]}`` a text, or with
``--format json`` one object shaped as OpenAI's (and llama.cpp's ``--embd-output-format json``) response.

Texts come from the arguments, or one a line from standard input (``-``) or a file (``--file``). The
texts are checked before the model loads (none, an empty one, bytes that are not UTF-8); the rest
(``--prompt-name``, ``--dimensions``, a text past the context, a pooling qwenkit does not run) by
``LLM.embed_iter`` before any text runs, so a refused run prints no vector. The texts run
``CHUNK_TEXTS`` at a time, each chunk's lines printed before the next runs, so a corpus of any length
holds one chunk's vectors (``--format json``, one object, holds them all).
"""

from __future__ import annotations

import json
import sys

from qwenkit import embedding
from qwenkit.cli.common import add_model_args, load_llm, stdin_keeps_bad_bytes, utf8_text
from qwenkit.command_parser import CommandParser, int_at_least
from qwenkit.errors import QwenkitError

CHUNK_TEXTS = 256  # texts computed, then printed, together (at least --batch-size)


class TextsError(QwenkitError, ValueError):
    """The texts to embed are missing or malformed."""


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="qwenkit embed",
        description="Print the embedding of each text (Qwen3-Embedding or any causal decoder).",
    )
    add_model_args(parser, optional_model=False)
    parser.add_argument(
        "texts", nargs="*", default=[], metavar="TEXT", help="texts to embed; '-' reads one a line from stdin"
    )
    parser.add_argument("--file", metavar="PATH", help="read the texts from this file, one a line")
    parser.add_argument(
        "--prompt-name",
        metavar="NAME",
        help="the checkpoint's sentence-transformers prompt to put before each text (Qwen3-Embedding: "
        "query); default: its default_prompt_name's, if it has one",
    )
    parser.add_argument(
        "--dimensions",
        type=int_at_least(1),
        metavar="N",
        help="keep the first N values, then normalize again (Matryoshka; at most the hidden size)",
    )
    parser.add_argument(
        "--format",
        choices=["jsonl", "json"],
        default="jsonl",
        help='jsonl: {"index", "embedding"} a line; json: one {"object": "list", "data": [...]} (OpenAI\'s)',
    )
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="texts computed together (each plans KV memory for --max-context tokens)",
    )
    # intermixed: `embed MODEL --dimensions 8 a b` and `embed MODEL a --dimensions 8 b` alike
    args = parser.parse_intermixed_args(argv)
    texts = read_texts(args.texts, args.file)
    llm = load_llm(args, max_batch_size=args.batch_size, text=False)  # an embedding model's bare decoder too
    try:  # the options by their flags first (LLM.embed names them as its arguments)
        embedding.check_dimensions(args.dimensions, llm.config.hidden_size, "--dimensions")
        embedding.prompt_prefix(llm.embedding_setup, args.prompt_name, "--prompt-name")
        vectors = llm.embed_iter(
            texts,
            prompt_name=args.prompt_name,
            dimensions=args.dimensions,
            chunk_size=max(CHUNK_TEXTS, args.batch_size),
        )
        if args.format == "json":  # one object: every vector is held until the last
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
            print(json.dumps({"object": "list", "data": data, "model": args.model}, ensure_ascii=False))
        else:  # a line as each chunk is computed: a corpus of any length holds one chunk's vectors
            for i, vector in enumerate(vectors):
                sys.stdout.write(json.dumps({"index": i, "embedding": vector}) + "\n")
    finally:
        llm.close()
    return 0


def read_texts(arguments: list[str], path: str | None) -> list[str]:
    """The texts, from the arguments, or one a line from standard input (``-``) or ``path``; each
    refused by name where it is empty or not UTF-8 (a final newline ends the last line, adding none)."""
    if arguments and path is not None:
        raise TextsError("give the texts as arguments or with --file, not both")
    if arguments == ["-"] or path == "-":
        stdin_keeps_bad_bytes()
        return _lines(sys.stdin.read(), "standard input")
    if path is not None:
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # universal newlines
            return _lines(f.read(), path)
    if "-" in arguments:
        raise TextsError("'-' (the texts from standard input) is given alone")
    if not arguments:
        raise TextsError("no texts to embed: give them as arguments, '-' (standard input) or --file")
    for n, text in enumerate(arguments, 1):
        utf8_text(text, f"TEXT {n}")
        if not text:
            raise TextsError(f"TEXT {n} is empty")
    return arguments


def _lines(content: str, source: str) -> list[str]:
    lines = content.split("\n")
    if content.endswith("\n"):
        lines.pop()
    if not lines or lines == [""]:
        raise TextsError(f"{source} holds no texts (one a line)")
    for n, line in enumerate(lines, 1):
        utf8_text(line, f"{source} line {n}")
        if not line:
            raise TextsError(f"{source} line {n} is empty (one text a line)")
    return lines
