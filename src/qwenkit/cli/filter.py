"""``qwenkit filter DATA OUT``: find sensitive information in training data; mask it or drop the example."""

from __future__ import annotations

import json
import sys

from qwenkit.cli.parser import CommandParser
from qwenkit.finetune.sensitive import filter_file, read_keywords


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="qwenkit filter", description=__doc__)
    parser.add_argument("data", help="JSONL (or .json list) training or preference data")
    parser.add_argument("out", help="filtered JSONL, written whole or not at all")
    parser.add_argument("--mode", default="mask", choices=["mask", "drop"])
    parser.add_argument("--keywords", help="file of extra words to find, one per line")
    parser.add_argument("--report", help="also write the full report (every finding) as JSON here")
    args = parser.parse_args(argv)
    report = filter_file(args.data, args.out, read_keywords(args.keywords), args.mode)
    for w in report.where:
        print(f"{w['where']} {w['field']} {w['kind']} [{w['start']}:{w['end']}]", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=2, ensure_ascii=False)
    return 0
