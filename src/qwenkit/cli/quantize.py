"""``qwenkit quantize SRC OUT_DIR``: write an int4/int8 AutoGPTQ-format checkpoint (GPTQ or RTN).

Examples::

    qwenkit quantize Qwen2.5-0.5B-Instruct q4 --bits 4     # GPTQ, group 128, static act-order, pydoc text
    qwenkit quantize model.gguf q8 --bits 8 --group-size -1 --method rtn
    qwenkit quantize SRC q4 --calib my_text.txt --calib-samples 128 --seq-len 2048 --act-order none
"""

from __future__ import annotations

import argparse
import sys

from qwenkit.command_parser import CommandParser
from qwenkit.quant.group_size import READER_GROUP_SIZES
from qwenkit.quant.pipeline import DEFAULT_CALIB_SAMPLES, DEFAULT_DAMP, DEFAULT_SEQ_LEN

FALLBACK_SIZES = ", ".join(map(str, READER_GROUP_SIZES))


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="qwenkit quantize",
        description="Quantize a model's linear layers to int4/int8 and write an AutoGPTQ-format checkpoint "
        "(the layout Qwen's published Int4/Int8 models use, which AutoGPTQ-format readers take). "
        "Embeddings and lm_head stay float.",
    )
    parser.add_argument("src", help="float model directory or .gguf file")
    parser.add_argument("out_dir", help="directory to write (must not exist unless --overwrite)")
    parser.add_argument("--bits", type=int, default=4, help="4 or 8 (default 4)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="input columns sharing one scale/zero; -1 for one group per row (default 128). When it does "
        f"not divide a layer's input width, the largest of {FALLBACK_SIZES} below it that tiles every "
        "layer is used",
    )
    parser.add_argument(
        "--partial-groups",
        action="store_true",
        help="keep --group-size even where it leaves a short last group (qwenkit and AutoGPTQ read it; "
        "vLLM and GPTQModel's CPU kernel do not)",
    )
    parser.add_argument(
        "--method",
        default="gptq",
        help="gptq (calibrated, default) or rtn (round-to-nearest, no calibration)",
    )
    parser.add_argument(
        "--calib", help="UTF-8 text file to calibrate GPTQ on (default: CPython's pydoc topics)"
    )
    parser.add_argument(
        "--calib-samples",
        type=int,
        default=None,
        help=f"calibration windows (default {DEFAULT_CALIB_SAMPLES}; AutoGPTQ uses 128 on a GPU)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"tokens per calibration window (default {DEFAULT_SEQ_LEN}; AutoGPTQ uses 2048)",
    )
    parser.add_argument(
        "--act-order",
        default=None,
        metavar="{static,dynamic,none}",
        help="GPTQ column order. static (default for gptq): by decreasing activation size, groups kept in "
        "file order, stored as desc_act=false (every reader loads it); dynamic: groups formed in that "
        "order, desc_act=true (vLLM refuses it); none: file order",
    )
    parser.add_argument(
        "--no-act-order",
        dest="act_order",
        action="store_const",
        const="none",
        help="same as --act-order none",
    )
    parser.add_argument(
        "--sym",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symmetric grid (zero point in the middle, Qwen's published setting; default) "
        "or asymmetric (--no-sym)",
    )
    parser.add_argument(
        "--damp",
        type=float,
        default=None,
        help=f"GPTQ Hessian damping, fraction of its mean diagonal (default {DEFAULT_DAMP})",
    )
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where to run the calibration"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    gptq_only = {"--calib-samples": args.calib_samples, "--seq-len": args.seq_len, "--damp": args.damp}
    given = [flag for flag, value in gptq_only.items() if value is not None]
    if args.method == "rtn" and given:  # else the setting was read by nothing, and nothing said so
        print(
            f"note: GPTQ's settings ({', '.join(given)}) do nothing with --method rtn",
            file=sys.stderr,
        )

    from qwenkit.generate import tokenizer_for
    from qwenkit.quant.pipeline import quantize_checkpoint

    result = quantize_checkpoint(
        args.src,
        args.out_dir,
        bits=args.bits,
        group_size=args.group_size,
        method=args.method,
        tokenizer=lambda: tokenizer_for(args.src),  # read once the source is checked
        calib=args.calib,
        calib_samples=DEFAULT_CALIB_SAMPLES if args.calib_samples is None else args.calib_samples,
        seq_len=DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len,
        act_order=args.act_order,
        partial_groups=args.partial_groups,
        sym=args.sym,
        damp_percent=DEFAULT_DAMP if args.damp is None else args.damp,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
        report=lambda note: print(f"note: {note}", file=sys.stderr),
    )
    print(result.summary(), file=sys.stderr)
    return 0
