"""``qwenkit profile [MODEL]``: tokens/s and peak memory per precision, as a markdown table.

Examples::

    qwenkit profile                                    # bundled SmolLM2: its Q4_1 codes, float32, ... int4
    qwenkit profile Qwen2.5-0.5B-Instruct --generate 512 --encode 2048 --precisions bfloat16,int4
    qwenkit profile Qwen2.5-0.5B-Instruct-GPTQ-Int4    # a quantized checkpoint: its own precision
    qwenkit profile Qwen2.5-7B-Instruct --device cuda --tensor-parallel 2   # per-rank memory on 2 GPUs
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from qwenkit.command_parser import CommandParser


def main(argv: list[str] | None = None) -> int:
    from qwenkit.cli.common import add_tensor_parallel_arg

    parser = CommandParser(
        prog="qwenkit profile",
        description="Generation speed and peak memory per precision (each measured in a fresh process).",
    )
    parser.add_argument(
        "model", nargs="?", help="model directory or .gguf file (default: the bundled SmolLM2)"
    )
    parser.add_argument(
        "--precisions",
        help="comma-separated: checkpoint (a GGUF's own precision), float32, bfloat16, float16, int8, int4 "
        "(default: float32,bfloat16,int8,int4, with checkpoint first for a GGUF; a GPTQ checkpoint "
        "runs as itself)",
    )
    parser.add_argument("--quantize", choices=["int8", "int4"], help="profile just this precision")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="activations for int8/int4 and quantized checkpoints; alone, the one precision to run",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--context", type=int, default=1, help="prompt tokens before generating (default 1)")
    parser.add_argument(
        "--generate", type=int, default=2048, help="tokens to generate (default 2048; 0 skips)"
    )
    parser.add_argument(
        "--encode", type=int, default=2048, help="prompt tokens to encode at once (default 2048; 0 skips)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long one precision may run before it is stopped (default 7200; 0: no limit)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_tensor_parallel_arg(parser)
    args = parser.parse_args(argv)

    from qwenkit.checkpoint import open_checkpoint
    from qwenkit.checkpoint.bare import refuse_embeddings_only
    from qwenkit.cli.common import SERVE_IT, check_tensor_parallel, resolve_model
    from qwenkit.config import ModelConfig
    from qwenkit.profile import CHECKPOINT, CHILD_TIMEOUT_S, markdown, parse_precisions, profile

    if args.timeout is not None and (not args.timeout >= 0 or args.timeout == float("inf")):
        parser.error(f"--timeout must be a number of seconds, 0 for no limit (got {args.timeout:g})")
    path = resolve_model(args.model)
    refuse_embeddings_only(path, SERVE_IT)  # before a child process loads it to fail
    if args.tensor_parallel != 1:  # 0 or less is refused here, not as a child's IndexError
        check_tensor_parallel(
            argparse.Namespace(model=str(path), tensor_parallel=args.tensor_parallel, device=args.device)
        )
    quantized = ModelConfig.from_hf(open_checkpoint(path).hf_config).quantization is not None
    if args.precisions is not None:  # "" is refused as empty, not taken as "all of them"
        text = args.precisions
    elif args.quantize:  # on a quantized checkpoint, refused below as --precisions would be (was ignored)
        text = args.quantize
    elif quantized:
        text = CHECKPOINT
    elif args.dtype != "auto":
        text = args.dtype
    elif path.suffix == ".gguf":
        text = f"{CHECKPOINT},float32,bfloat16,int8,int4"  # the file's own precision first
    else:
        text = "float32,bfloat16,int8,int4"
    precisions = parse_precisions(text, quantized)
    rows = profile(
        path,
        precisions,
        dtype=args.dtype,
        device=args.device,
        context=args.context,
        generate=args.generate,
        encode=args.encode,
        progress=True,
        tensor_parallel=args.tensor_parallel,
        timeout_s=CHILD_TIMEOUT_S if args.timeout is None else args.timeout or None,
    )
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"model: {path}\n")
    print(markdown(rows, args.context, args.generate, args.encode, args.device))
    return 0
