"""``qwenkit generate``: continue a prompt, streaming text, then a one-line speed summary."""

from __future__ import annotations

import argparse
import json
import sys

from qwenkit.cli.common import (
    add_model_args,
    add_sampling_args,
    add_tensor_parallel_arg,
    load_llm,
    read_stdin,
    run_tensor_parallel,
    sampling_overrides,
    utf8_text,
    wants_tensor_parallel,
)
from qwenkit.cli.terminal import for_terminal, json_for_terminal
from qwenkit.command_parser import CommandParser
from qwenkit.errors import QwenkitError
from qwenkit.sigterm import terminate_unwinds


class PromptError(QwenkitError, ValueError):
    """The prompt arguments are missing or malformed."""


def parse_prompt_ids(text: str) -> list[int]:
    if not text.strip():
        raise PromptError("--prompt-ids is empty")
    try:  # every item an integer: "1,,2" is a slip, not the prompt 1,2
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise PromptError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="qwenkit generate", description="Continue a prompt.")
    add_model_args(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text ('-' reads stdin)")
    src.add_argument("--prompt-ids", help="prompt as token ids, e.g. 1,2,3")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument(
        "--logprobs", type=int, default=None, help="with --json: also report this many top alternatives"
    )
    parser.add_argument(
        "--router-stats",
        action="store_true",
        help="MoE models: also print how many prompt tokens each expert of each layer receives",
    )
    add_sampling_args(parser)
    add_tensor_parallel_arg(parser)
    args = parser.parse_args(argv)
    if args.logprobs is not None and not args.json:  # streamed text has no place for them: said, not dropped
        raise PromptError("--logprobs is reported in the --json output; add --json")
    if wants_tensor_parallel(args):
        if args.prompt == "-":
            args.prompt = read_stdin()  # read once here; the ranks cannot share stdin
        return run_tensor_parallel(args, rank_main)
    with terminate_unwinds():  # exit 143 as a container's PID 1 too (it never gets an unhandled SIGTERM)
        return run(args)


def rank_main(tp, args: argparse.Namespace) -> None:
    """One tensor-parallel rank: all run the same generation; only rank 0 writes anything."""
    import os

    import torch

    torch.manual_seed(args.rank_seed)
    if tp.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    run(args, tp)  # an error goes to the launcher, which says it once for all ranks
    sys.stdout.flush()


def run(args: argparse.Namespace, tp=None) -> int:
    prompt: str | list[int]
    if args.prompt_ids is not None:
        prompt = parse_prompt_ids(args.prompt_ids)
    else:
        prompt = read_stdin() if args.prompt == "-" else utf8_text(args.prompt, "the prompt")
        if not prompt:
            raise PromptError("the prompt is empty")
    llm = load_llm(args, tensor_parallel=tp)
    # --json reports every chosen token's log-probability, so it asks the engine for them.
    logprobs = args.logprobs if args.logprobs is not None else (0 if args.json else None)
    params = llm.default_params(**sampling_overrides(args), logprobs=logprobs)
    if args.router_stats:
        if not llm.config.num_experts:
            raise PromptError("--router-stats needs a mixture-of-experts model; this one is dense")
        stats = llm.router_stats(prompt)  # bad prompt ids raise here, before the heading is printed
        print("router statistics (prompt tokens per expert):", file=sys.stderr)
        print(stats.table(), file=sys.stderr)

    if args.json:
        c = llm.generate(prompt, params)[0]
        print(json_for_terminal(json.dumps(_as_json(c), ensure_ascii=False)))
        return 0
    for delta in llm.stream(prompt, params):
        sys.stdout.write(for_terminal(delta.text))
        sys.stdout.flush()
    c = delta.completion
    sys.stdout.write("\n")
    t = _timings(c)
    print(
        f"[{len(c.prompt_ids)} prompt tokens, {len(c.token_ids)} new tokens, "
        f"prefill {t['prefill_tokens_per_second']:.1f} tok/s, "
        f"decode {t['decode_tokens_per_second']:.1f} tok/s, "
        f"finish: {c.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _timings(c) -> dict[str, float]:
    decoded = max(len(c.token_ids) - 1, 0)
    return {
        "prefill_seconds": round(c.prefill_seconds, 4),
        "decode_seconds": round(c.decode_seconds, 4),
        "prefill_tokens_per_second": len(c.prompt_ids) / c.prefill_seconds if c.prefill_seconds else 0.0,
        "decode_tokens_per_second": decoded / c.decode_seconds if c.decode_seconds and decoded else 0.0,
    }


def _as_json(c) -> dict[str, object]:
    return {
        "prompt_token_ids": c.prompt_ids,
        "output_token_ids": c.token_ids,
        "text": c.text,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "logprobs": [lp.logprob for lp in c.logprobs],
        "top_logprobs": [[{"token_id": t, "logprob": v} for t, v in lp.top] for lp in c.logprobs if lp.top]
        or None,
        "timings": _timings(c),
    }
