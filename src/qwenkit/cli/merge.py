"""``qwenkit merge MODEL ADAPTER OUT``: fold a LoRA adapter into the model and write a plain checkpoint."""

from __future__ import annotations

import sys

from qwenkit.command_parser import CommandParser
from qwenkit.finetune.merge import merge


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="qwenkit merge", description=__doc__)
    parser.add_argument("model", help="the float base model (directory or .gguf) the adapter was trained on")
    parser.add_argument("adapter", help="peft-format adapter directory")
    parser.add_argument("out", help="output model directory")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="stored dtype (default: the base model's config.json dtype; float32 where it names none)",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    r = merge(args.model, args.adapter, args.out, args.dtype, args.overwrite)
    print(f"wrote {args.out} ({r.dtype})", file=sys.stderr)
    print(f"  the adapter moves the probe's {r.outputs} by up to {r.effect:.3g}", file=sys.stderr)
    print(f"  merged vs adapter, float32: max |diff| {r.float32:.2e}", file=sys.stderr)
    if r.dtype != "float32":
        print(f"  merged vs adapter, as stored ({r.dtype}): max |diff| {r.stored:.2e}", file=sys.stderr)
    return 0
