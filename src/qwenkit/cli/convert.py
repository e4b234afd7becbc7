"""``qwenkit convert SRC OUT --to qwen2|hf``: Qwen v1 -> Qwen1.5 layout, or GGUF -> Hugging Face."""

from __future__ import annotations

import argparse
from pathlib import Path

from qwenkit.command_parser import CommandParser
from qwenkit.errors import ConfigError

DTYPES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="qwenkit convert",
        description="Convert a Qwen v1 directory to the Qwen1.5 (qwen2) layout, or a .gguf file to a "
        "Hugging Face directory. The output is written under a temporary name and appears only when "
        "complete.",
    )
    parser.add_argument("src", help="Qwen v1 model directory, or a .gguf file")
    parser.add_argument("out", help="output directory (refused if it exists, unless --overwrite)")
    parser.add_argument(
        "--to",
        choices=["qwen2", "hf"],
        help="qwen2: Qwen v1 -> Qwen1.5 layout; hf: GGUF -> Hugging Face (default: from SRC)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weight dtype (default: keep the source's, which is bit-exact; GGUF: float32)",
    )
    parser.add_argument(
        "--shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="load source and output, compare logits and greedy tokens; fail on a mismatch",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (once the new one is done)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qwenkit.checkpoint.saver import parse_size

    shard_bytes = parse_size(args.shard_size)
    is_gguf = Path(args.src).suffix == ".gguf"
    to = args.to or ("hf" if is_gguf else "qwen2")
    if to == "hf":
        if not is_gguf:
            raise ConfigError(
                f"--to hf converts a .gguf file; {args.src} is not one (for a Qwen v1 directory: --to qwen2)"
            )
        if args.verify:
            raise ConfigError("--verify is available for --to qwen2 only")
        from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf

        out = convert_gguf_to_hf(
            args.src,
            args.out,
            dtype=args.dtype or "float32",
            overwrite=args.overwrite,
            shard_bytes=shard_bytes,
        )
        print(f"wrote {out} (Hugging Face layout)")
        return 0
    if is_gguf:
        raise ConfigError(f"{args.src} is a GGUF file; convert it with --to hf")

    from qwenkit.convert.v1_to_qwen2 import convert_v1_to_qwen2

    result = convert_v1_to_qwen2(
        args.src,
        args.out,
        dtype=args.dtype,
        shard_bytes=shard_bytes,
        overwrite=args.overwrite,
        verify=args.verify,
        progress=not args.no_progress,
    )
    print(
        f"wrote {result.out_dir} (Qwen1.5 / qwen2 layout): {result.tensors} tensors, "
        f"{result.bytes_written / 1e9:.2f} GB in {result.shards} shard(s), {result.torch_dtype}"
    )
    print(f"  other files: {', '.join(result.files)}")
    if result.dropped_zero_biases:
        print(
            f"  dropped {result.dropped_zero_biases} all-zero GPTQ bias tensor(s) "
            "on layers Qwen2 has no bias for"
        )
    for note in result.notes:
        print(f"note: {note}")
    v = result.verification
    if v is not None:
        print(f"verify: {v.summary()}")
        if v.long_context:
            print(f"verify: past the trained length: {v.long_context}")
        print(
            "verify: OK, the converted model computes the same function as its source"
            + (" (within the rounding of the new dtype)" if v.lossy else "")
        )
    return 0
