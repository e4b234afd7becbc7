"""``qwenkit filter DATA OUT``: find sensitive information in training data; mask it or drop the example."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from qwenkit.checkpoint.output_dir import atomic_file, check_writable
from qwenkit.command_parser import CommandParser
from qwenkit.errors import ConfigError
from qwenkit.finetune.sensitive import filter_file, read_keywords


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="qwenkit filter", description=__doc__)
    parser.add_argument("data", help="JSONL (or .json list) training or preference data")
    parser.add_argument("out", help="filtered JSONL, written whole or not at all")
    parser.add_argument("--mode", default="mask", choices=["mask", "drop"])
    parser.add_argument("--keywords", help="file of extra words to find, one per line")
    parser.add_argument("--report", help="also write the full report (every finding) as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT (or report)")
    args = parser.parse_args(argv)
    outputs = [Path(p) for p in (args.out, args.report) if p]
    check_outputs(Path(args.data), outputs, args.overwrite, Path(args.keywords) if args.keywords else None)
    report = filter_file(args.data, args.out, read_keywords(args.keywords), args.mode)
    for w in report.where:
        print(f"{w['where']} {w['field']} {w['kind']} [{w['start']}:{w['end']}]", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    if args.report:
        with atomic_file(args.report) as f:  # makes missing parent directories, as OUT's
            json.dump(report.to_json(), f, indent=2, ensure_ascii=False)
    return 0


def check_outputs(data: Path, outputs: list[Path], overwrite: bool, keywords: Path | None = None) -> None:
    """Before anything is read: OUT and the report must be new files (or --overwrite), writable, distinct,
    and never the data itself (the findings would be lost with it) nor the keyword file."""
    if len(outputs) == 2 and os.path.abspath(outputs[0]) == os.path.abspath(outputs[1]):
        raise ConfigError(f"OUT and --report are the same file {outputs[0]}; give the report its own name")
    for out, what in zip(outputs, ("the filtered data", "the report"), strict=False):
        if data.exists() and out.exists() and out.samefile(data):
            name = f"--report {out}" if what == "the report" else str(out)
            raise ConfigError(f"{name} is the input data; write {what} to another file")
        if keywords is not None and keywords.exists() and out.exists() and out.samefile(keywords):
            raise ConfigError(f"{out} is the --keywords file; write the output to another file")
        if out.is_dir():
            raise ConfigError(f"{out} is a directory; give a file name")
        if out.exists() and not overwrite:
            raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
        check_writable(out)
