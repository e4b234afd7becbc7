"""Arguments and helpers shared by the commands that load a model and sample from it."""

from __future__ import annotations

import argparse
import functools
import io
import sys
from pathlib import Path

from qwenkit.command_parser import int_at_least
from qwenkit.engine import SamplingParams
from qwenkit.errors import QwenkitError


class NotUTF8Error(QwenkitError, ValueError):
    """Text given to a command (an argument, standard input, a typed line) is not UTF-8."""


def utf8_text(text: str, what: str) -> str:
    """``text`` as given, refused where it came from bytes that are not UTF-8: Python hands those over as
    lone surrogates (argv; stdin in the C locale), which reached the tokenizer and ended in a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NotUTF8Error(f"{what} is not UTF-8 text (an invalid byte at position {e.start})") from None
    return text


def read_stdin(what: str = "standard input") -> str:
    """All of standard input as UTF-8 text."""
    stdin_keeps_bad_bytes()
    return utf8_text(sys.stdin.read(), what)


def stdin_keeps_bad_bytes() -> None:
    """Standard input decodes bytes that are not UTF-8 to surrogates, as in the C locale, so that
    ``utf8_text`` names their position. A strict stdin (a UTF-8 locale) raised UnicodeDecodeError from
    the read, with a position within its buffer, and lost the rest of that buffer: the lines after a
    bad one, for the chat."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")


def add_model_args(parser: argparse.ArgumentParser, optional_model: bool = True) -> None:
    if optional_model:
        parser.add_argument(
            "model", nargs="?", help="model directory or .gguf file (default: the bundled SmolLM2)"
        )
    else:
        parser.add_argument("model", help="model directory or .gguf file")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help=(
            "weights and activations (auto: bfloat16 on CUDA, on CPUs with native bf16 and where "
            "qwenkit's CPU kernels run, else float32)"
        ),
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument(
        "--quantize", choices=["int8", "int4"], help="weight-only round-to-nearest at load time"
    )
    parser.add_argument(
        "--gguf-dequantize",
        action="store_true",
        help="GGUF: decode quantized weights to --dtype floats at load (default: run them in the file's "
        "own precision: less memory, faster start)",
    )
    parser.add_argument(
        "--max-context",
        type=int_at_least(2, " tokens (a prompt token and one to generate)"),
        help="longest sequence to plan memory for (default: model's)",
    )
    parser.add_argument("--adapter", metavar="DIR", help="apply a peft-format LoRA adapter (not merged)")
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        default=None,
        help="on CUDA, run decode steps eagerly instead of replaying captured CUDA graphs",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Unset options stay None so the model's generation_config.json defaults apply."""
    g = parser.add_argument_group("sampling (defaults come from generation_config.json)")
    g.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        type=int,
        dest="max_tokens",
        help="(--max-tokens: the OpenAI name)",
    )
    g.add_argument("--temperature", type=float, help="0 for greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int, help="same seed, same output")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument(
        "--stop-token-id", type=int, action="append", dest="stop_token_ids", help="stop token id (repeatable)"
    )
    g.add_argument(
        "--include-stop-str-in-output", action="store_true", default=None, help="keep the stop string found"
    )
    g.add_argument("--ignore-eos", action="store_true", default=None, help="generate past end-of-sequence")
    g.add_argument("--min-tokens", type=int, help="no end-of-sequence, stop token or stop string before this")


# the single-valued sampling settings the command-line flags above set (the chat's :conf sets them too)
SAMPLING_FLAG_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


def sampling_overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {k: getattr(args, k) for k in SAMPLING_FLAG_KEYS}
    if args.stop:  # bytes that are not UTF-8 could never be matched: refused
        out["stop"] = tuple(utf8_text(stop, "--stop") for stop in args.stop)
    out["stop_token_ids"] = tuple(args.stop_token_ids) if args.stop_token_ids else None
    for key in ("include_stop_str_in_output", "ignore_eos", "min_tokens"):
        out[key] = getattr(args, key)
    return out


def resolve_model(arg: str | None) -> Path:
    """The model a command should load: the argument, or the bundled default model."""
    if arg:
        return Path(arg)
    from qwenkit.default_model import default_model_path

    return default_model_path()


def gguf_dequantize(args: argparse.Namespace, path: Path) -> bool:
    """``--gguf-dequantize``, refused for a model that is not a GGUF file (it would do nothing)."""
    if args.gguf_dequantize and path.suffix != ".gguf":
        from qwenkit.errors import ConfigError

        raise ConfigError(f"--gguf-dequantize applies to .gguf files; {path} is not one")
    return bool(args.gguf_dequantize)


SERVE_IT = "embed texts with `qwenkit embed`, or serve it (`qwenkit serve`) and ask POST /v1/embeddings"


def load_llm(args: argparse.Namespace, max_batch_size: int = 1, tensor_parallel=None, text: bool = True):
    """The model ``args`` name. ``text``: the command runs its text (chat, generate), so a checkpoint
    that computes embeddings only is refused before it loads; ``qwenkit embed`` passes False."""
    from qwenkit.checkpoint.bare import refuse_embeddings_only
    from qwenkit.generate import LLM

    path = resolve_model(args.model)
    if text:
        refuse_embeddings_only(path, SERVE_IT)
    llm = LLM.load(
        path,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        max_batch_size=max_batch_size,
        max_seq_len=args.max_context,
        progress=tensor_parallel is None or tensor_parallel.rank == 0,
        tensor_parallel=tensor_parallel,
        adapter=args.adapter,
        dequantize=gguf_dequantize(args, path),
        cuda_graphs=args.cuda_graphs,
    )
    warn_past_context(llm, "--max-context")
    return llm


def warn_past_context(llm, option: str) -> None:
    """A context asked past the model's own is allowed (it is the user's experiment) but said once: the
    positions past it were never trained, and answers that reach them may be poor."""
    own, asked = llm.model.config.max_context, llm.engine.max_seq_len
    if asked > own:
        print(
            f"warning: {option} {asked} is past the model's own context of {own} tokens; "
            f"positions past {own} were never trained and answers that reach them may be poor",
            file=sys.stderr,
        )


def add_tensor_parallel_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensor-parallel",
        "--tensor-parallel-size",  # vLLM's name, and its -tp, as a vLLM command line has them
        "-tp",
        dest="tensor_parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N processes on this machine (gloo on CPU, NCCL on GPU)",
    )


def wants_tensor_parallel(args: argparse.Namespace) -> bool:
    """``--tensor-parallel N`` above 1, or a launcher (torchrun, across machines) started this process
    as one rank of several: then ``args.tensor_parallel`` becomes its world size (a different N is an
    error)."""
    from qwenkit.distributed import launched_world
    from qwenkit.errors import ConfigError

    world = launched_world()
    if world > 1:
        if args.tensor_parallel not in (1, world):
            raise ConfigError(
                f"--tensor-parallel {args.tensor_parallel} does not match the {world} processes the launcher "
                "started (WORLD_SIZE); leave it out under torchrun"
            )
        args.tensor_parallel = world
    return args.tensor_parallel != 1


def launched_rank() -> int | None:
    """This process's RANK when a launcher started it as one of several, else None."""
    import os

    from qwenkit.distributed import launched_world

    return int(os.environ["RANK"]) if launched_world() > 1 else None


def check_tensor_parallel(args: argparse.Namespace) -> None:
    """Refuse a split the model cannot take, or more ranks than this machine has GPUs for, in one line,
    before any process starts."""
    from qwenkit.checkpoint import open_checkpoint
    from qwenkit.config import ModelConfig
    from qwenkit.distributed import local_config
    from qwenkit.distributed.group import local_gpu
    from qwenkit.distributed.launch import usable_cores

    source = open_checkpoint(resolve_model(args.model))
    local_config(ModelConfig.from_hf(source.hf_config), args.tensor_parallel)
    if args.device.startswith("cuda") and launched_rank() is None:  # torchrun: each machine its own
        local_gpu(args.tensor_parallel - 1, args.tensor_parallel)
    cores = usable_cores()
    if args.device == "cpu" and launched_rank() is None and args.tensor_parallel > cores:
        print(
            f"warning: --tensor-parallel {args.tensor_parallel} on {cores} CPU cores: the ranks share "
            "cores and will run slower than one process; it saves memory per process, not time",
            file=sys.stderr,
        )


def lead_tensor_parallel(args: argparse.Namespace, body, load=None, server: bool = False) -> int:
    """Run ``body(llm)`` here as rank 0 of ``--tensor-parallel N`` (this process keeps the terminal and
    receives the signals), with N - 1 spawned ranks that replay each of its forwards on their shards
    (``engine.lockstep``). ``load(args, tp)`` loads a rank's LLM (every rank the same way, so their KV
    pools match; default ``load_llm``). When another rank dies, a ``server`` gets SIGTERM (it drains
    and exits instead of waiting for its next request to fail); anything else (a chat waiting at its
    prompt) is ended at once with the one-line error."""
    import os
    import signal
    import sys

    from qwenkit.distributed.launch import RankFailedError, lead_ranks
    from qwenkit.sigterm import unwinding

    check_tensor_parallel(args)
    load = load or _load_llm

    def lead(tp) -> int:
        from qwenkit.engine.lockstep import Lockstep

        llm = load(args, tp)
        lockstep = Lockstep()
        lockstep.lead(llm.engine)
        try:
            return body(llm)
        finally:
            llm.close()
            lockstep.stop()

    def rank_failed(error: RankFailedError) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        if server and handler not in (signal.SIG_DFL, None) and not unwinding():
            os.kill(os.getpid(), signal.SIGTERM)  # the server is up (its handler is in): drain, exit
            return
        sys.stdout.flush()  # the answer streamed so far, then the line
        print(f"error: {error}", file=sys.stderr, flush=True)
        os._exit(2)  # now: the main thread may be blocked reading the terminal or in a collective

    if launched_rank() is not None:
        return _launched(args, lead, lambda tp: follow_tensor_parallel(tp, args, load))
    return lead_ranks(
        lead,
        follow_tensor_parallel,
        args.tensor_parallel,
        (args, load),
        device=args.device,
        on_follower_failed=rank_failed,
    )


def _launched(args: argparse.Namespace, lead, follow) -> int:
    """This rank of a group a launcher started (torchrun: every rank on its own, on any machine): rank 0
    leads, the others follow; the launcher watches the processes (it stops the others when one dies)."""
    import torch.distributed as dist

    from qwenkit.distributed import init_tensor_parallel

    tp = init_tensor_parallel(device=args.device)
    try:
        if tp.rank == 0:
            return lead(tp)
        follow(tp)
        return 0
    finally:
        dist.destroy_process_group()


def _load_llm(args: argparse.Namespace, tp):
    return load_llm(args, tensor_parallel=tp)


def follow_tensor_parallel(tp, args: argparse.Namespace, load) -> None:
    """A rank other than 0: load this shard and replay rank 0's forwards until it stops."""
    import os
    import signal
    import sys

    from qwenkit.engine.lockstep import Lockstep

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank; rank 0 decides
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    llm = load(args, tp)  # a load error goes to the launcher, which says it once for all ranks
    Lockstep().follow(llm.engine, tp)


def run_tensor_parallel(args: argparse.Namespace, rank_main) -> int:
    """Check the split here (one clear line, nothing started), then run ``rank_main(tp, args)`` in N
    processes. A rank's error (a QwenkitError it raises) is this command's one line, said once."""
    import random

    from qwenkit.distributed.launch import run_ranks

    check_tensor_parallel(args)
    args.rank_seed = random.SystemRandom().randrange(2**31)  # one random state for every rank
    if launched_rank() is not None:  # started by torchrun: this rank alone, rank 0's seed for all
        every_rank = functools.partial(_seeded, rank_main, args=args)
        return _launched(args, every_rank, every_rank)
    run_ranks(rank_main, args.tensor_parallel, (args,), device=args.device)
    return 0


def _seeded(rank_main, tp, *, args: argparse.Namespace) -> int:
    """``rank_main(tp, args)`` with rank 0's random seed on every rank (sampling must agree)."""
    import torch.distributed as dist

    seed = [args.rank_seed]
    dist.broadcast_object_list(seed, src=0)
    args.rank_seed = seed[0]
    rank_main(tp, args)
    return 0


__all__ = [
    "SAMPLING_FLAG_KEYS",
    "NotUTF8Error",
    "SamplingParams",
    "add_model_args",
    "add_sampling_args",
    "add_tensor_parallel_arg",
    "check_tensor_parallel",
    "follow_tensor_parallel",
    "gguf_dequantize",
    "lead_tensor_parallel",
    "load_llm",
    "read_stdin",
    "resolve_model",
    "run_tensor_parallel",
    "sampling_overrides",
    "stdin_keeps_bad_bytes",
    "utf8_text",
]
