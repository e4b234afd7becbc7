"""Arguments of `qwenkit finetune` (also `torchrun -m qwenkit.finetune`), parsed here, run by `run`."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenkit.command_parser import CommandParser
from qwenkit.errors import ConfigError, QwenkitError
from qwenkit.paths import not_a_file

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def max_lr(beta1: float) -> float:
    """The largest --lr AdamW's first step (a step of --lr / (1 - beta1)) keeps in float32's range, rounded
    down to 3 significant digits, so the number an error names is itself accepted."""
    limit = FLOAT32_MAX * (1 - beta1)
    unit = 10 ** (math.floor(math.log10(limit)) - 2)
    return float(f"{math.floor(limit / unit) * unit:g}")


def add_training_args(parser: argparse.ArgumentParser, lr: float = 2e-4, preference: bool = False) -> None:
    """The options `finetune` and `dpo` share; ``preference``: `dpo`'s defaults where they differ."""
    parser.add_argument("model", help="model directory or .gguf file")
    parser.add_argument("data", help="training data: JSONL (messages / conversations / text) or a .json list")
    parser.add_argument("out", help="output directory (appears only when training finished)")
    parser.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    # transformers' TrainingArguments names and defaults; Qwen's own finetune scripts pass adam_beta2 0.95
    parser.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW's beta1 (default 0.9)")
    parser.add_argument(
        "--adam-beta2", type=float, default=0.999, help="AdamW's beta2 (default 0.999; Qwen's scripts: 0.95)"
    )
    parser.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW's epsilon (default 1e-8)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per process")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--max-len", type=int, default=1024, help="longer examples are truncated (counted)")
    parser.add_argument(
        "--packing",
        action="store_true",
        help="pack short examples into --max-len rows (each still attends only to itself)",
    )
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="start from this LoRA adapter (peft format) instead of a new one: its rank, alpha, targets and "
        "layers; " + ("the reference is then base + this adapter" if preference else "SFT continues from it"),
    )
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 32)")
    parser.add_argument(
        "--lora-dropout",
        type=float,
        # trl's DPOTrainer turns every dropout off (disable_dropout=True): with it on, the policy's
        # log-probabilities and so the implicit rewards are noisy samples, unlike the reference's
        default=0.0 if preference else None,
        help="dropout on the adapters' input (default "
        + (
            "0, as trl's DPO turns dropout off)"
            if preference
            else "0.05; 0 where targets include MoE experts or routers)"
        ),
    )
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rsLoRA)")
    parser.add_argument(
        "--target-modules", help="comma-separated layer names (default: q,k,v,o,gate,up,down projections)"
    )
    parser.add_argument("--lora-layers", type=int, help="adapt only the top N decoder layers")
    parser.add_argument("--qlora-bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--router-aux-loss-coef",
        type=float,
        metavar="C",
        help="mixture-of-experts models: add C x the load-balancing loss (default: the config's "
        "router_aux_loss_coef where it sets output_router_logits, else 0; Qwen's configs say 0.001)",
    )
    parser.add_argument("--eval-data", help="held-out data; its loss is logged")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (for --resume)")
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        metavar="N",
        help="keep the newest N checkpoints, deleting older ones (default 3; 0 keeps all)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT when done")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the model's dtype (LoRA adapters are float32); --method full in bfloat16 is mixed precision: "
        "float32 master weights, bfloat16 compute, a bfloat16 model written",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (via torchrun)")
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="T",
        help="split each replica over T processes (FSDP x tensor parallelism; --nproc defaults to T)",
    )
    parser.add_argument(
        "--strategy",
        choices=["ddp", "fsdp"],
        help="with several processes (default ddp; fsdp with --tensor-parallel)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_args(args: argparse.Namespace):
    from qwenkit.finetune.trainer import TrainArgs

    targets = (
        tuple(t.strip() for t in args.target_modules.split(",") if t.strip()) if args.target_modules else ()
    )
    return TrainArgs(
        method=args.method,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_len=args.max_len,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon,
        gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        eval_every=args.eval_every,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        packing=args.packing,
        qlora_bits=args.qlora_bits,
        strategy=args.strategy or ("fsdp" if args.tensor_parallel > 1 else "ddp"),
        tensor_parallel=args.tensor_parallel,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        lora_layers=args.lora_layers,
        use_rslora=args.rslora,
        progress=not args.no_progress,
        adapter=args.adapter,
        router_aux_loss_coef=args.router_aux_loss_coef,
    )


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse training settings no run can use, before anything loads (torch's optimizer raised a
    traceback for a negative rate; --epochs 0 wrote an untrained adapter; --max-steps 0 meant no limit)."""
    at_least_one = {
        "--epochs": args.epochs,
        "--max-steps": args.max_steps,
        "--batch-size": args.batch_size,
        "--grad-accum": args.grad_accum,
        "--lora-r": args.lora_r,
        "--lora-layers": args.lora_layers,
    }
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.max_len < 2:
        raise ConfigError(f"--max-len must be at least 2 (a token and the next), got {args.max_len}")
    for flag, value in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        if not 0 <= value < 1:  # also NaN; torch's AdamW raised a traceback
            raise ConfigError(f"{flag} must be in [0, 1), got {value}")
    if not (math.isfinite(args.adam_epsilon) and args.adam_epsilon > 0):
        raise ConfigError(f"--adam-epsilon must be a positive number, got {args.adam_epsilon}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    if args.lr > (most := max_lr(args.adam_beta1)):
        raise ConfigError(
            f"--lr must be at most {most:g} (AdamW's first step overflows float32), got {args.lr:g}"
        )
    if not 0 <= args.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    for flag, value in (
        ("--weight-decay", args.weight_decay),
        ("--max-grad-norm", args.max_grad_norm),
        ("--eval-every", args.eval_every),
        ("--save-every", args.save_every),
        ("--keep-checkpoints", args.keep_checkpoints),
        ("--router-aux-loss-coef", args.router_aux_loss_coef),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be 0 or more, got {value}")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ConfigError(f"--lora-alpha must be a positive number, got {args.lora_alpha}")
    if args.target_modules is not None and not args.target_modules.replace(",", "").strip():
        # once the default projections, silently: `--target-modules "$EMPTY"` trained what it did not name
        raise ConfigError(
            f"--target-modules names no layer (got {args.target_modules!r}); leave it out for the default"
        )
    if args.eval_every and not args.eval_data:  # once ignored: no held-out loss was ever logged
        raise ConfigError("--eval-every applies with --eval-data (the held-out data to evaluate)")
    if args.adapter is not None:
        from qwenkit.finetune.start_adapter import check_method

        check_method(args.method, args.adapter)


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse, once and before any process starts, input files every rank would refuse alike."""
    if not Path(args.model).exists():
        raise ConfigError(f"{args.model}: no such model directory or file")
    for path in (args.data, args.eval_data):
        why = None if path is None else not_a_file(path)
        if why is not None:
            raise ConfigError(f"{path}: no such file" if why == "does not exist" else f"{path} {why}")
    if args.adapter is not None:  # read_adapter's words
        from qwenkit.finetune.adapter_io import CONFIG_NAME

        if not (Path(args.adapter) / CONFIG_NAME).is_file():
            raise ConfigError(f"{args.adapter} is not an adapter directory: {CONFIG_NAME} not found")


def launch_ranks(module: str, argv: list[str], args: argparse.Namespace) -> int | None:
    """In the launching process of a run over several processes: refuse a bad split or missing input once,
    then run ``module`` on every rank and return the exit status. None where this process trains itself
    (one process, or a rank torchrun started)."""
    check_numbers(args)
    if "WORLD_SIZE" in os.environ:
        return None
    if args.tensor_parallel != 1:
        from qwenkit.finetune.run import check_tensor_parallel
        from qwenkit.finetune.tensor_parallel import check_processes

        if args.nproc == 1:
            args.nproc = args.tensor_parallel
        check_processes(args.nproc, args.tensor_parallel)
        check_tensor_parallel(args.model, train_args(args))
    if args.nproc == 1:
        return None
    check_inputs(args)
    return relaunch(module, argv, args.nproc, Path(args.out))


# Set by ``relaunch`` for its ranks: it names a rank that died itself, so the others need not.
LAUNCHED_ENV = "QWENKIT_NPROC_LAUNCHED"


def on_lost_rank(entry: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """``entry`` as a rank runs it: a collective that fails because another rank died (kill -9, the OOM
    killer) is not this rank's error, and once printed gloo's traceback from every survivor. It exits
    LOST_STATUS instead, with one line under a torchrun started by hand and none under ``--nproc``,
    whose launcher names the rank that died and where ``--resume`` continues."""

    def run(argv: list[str]) -> int:
        from qwenkit.distributed.group import failure_reason, lost_peer
        from qwenkit.distributed.launch import LOST_STATUS

        try:
            return entry(argv)
        except (QwenkitError, RuntimeError) as e:
            if not lost_peer(e):
                raise
            if os.environ.get(LAUNCHED_ENV) != "1":
                rank = os.environ.get("RANK", "0")
                line = f"error (rank {rank}): another rank died or stopped answering ({failure_reason(e)})\n"
                sys.stderr.flush()
                os.write(2, line.encode())  # one write: the ranks share the terminal
            raise SystemExit(LOST_STATUS) from None

    return run


def relaunch(module: str, argv: list[str], nproc: int, out: Path | None = None) -> int:
    """Run this command under torchrun with ``nproc`` local processes (gloo on CPU, NCCL on CUDA).

    torchrun's agent runs in this process, so a rank's failure comes back as its exit status and one line
    naming it (the rank has printed its own error), and Ctrl-C as 130, not as the agent's traceback.
    SIGTERM (a container stop) reaches this process alone; the agent ends the ranks, which may be blocked
    in collectives and say nothing, so this process says where ``--resume`` continues (``out``'s
    checkpoints) and exits 143, as one process does."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from qwenkit.distributed.launch import LOST_STATUS, describe_exit

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    rest, skip = [], False
    for a in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if not a.startswith("--nproc="):
            rest.append(a)
    # The machine's cores shared out (torchrun alone gives each process one thread, and says so).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED_ENV] = "1"  # the ranks' environment: this process names a rank that died
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # its own level: "Received 2 death signal, shutting down workers" on Ctrl-C
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", module, *rest])
    try:
        run(args)
    except SignalException as e:  # the agent stopped the ranks
        if e.sigval != signal.SIGTERM or out is None:  # Ctrl-C: rank 0 said where --resume continues
            return 130
        from qwenkit.finetune.run import resume_hint, work_dir

        print(f"stopped by SIGTERM; {resume_hint(work_dir(out))}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except ChildFailedError as e:
        rank, failure = _first_own_failure(e)
        if failure.exitcode > 0 and failure.exitcode != LOST_STATUS:
            return failure.exitcode  # the rank has said its own error
        how = (
            f"was stopped by {failure.signal_name()}"
            if failure.exitcode < 0
            else describe_exit(failure.exitcode)
        )
        hint = ""
        if out is not None:
            from qwenkit.finetune.run import resume_hint, work_dir

            hint = f"; {resume_hint(work_dir(out))}"
        print(f"error: rank {rank} {how}{hint}", file=sys.stderr)
        return 1
    return 0


def _first_own_failure(e: Any) -> tuple[int, Any]:
    """The first rank that failed in its own right, not one that only lost it: a rank that left because a
    collective failed (LOST_STATUS), or that torchrun's agent stopped with SIGTERM once another had
    failed, may have ended first or in the same second (the agent's timestamps are whole seconds)."""
    from qwenkit.distributed.launch import LOST_STATUS

    def after(rank: int) -> tuple[bool, int, int]:
        f = e.failures[rank]
        return f.exitcode in (LOST_STATUS, -signal.SIGTERM), f.timestamp, rank

    rank = min(e.failures, key=after)
    return rank, e.failures[rank]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = CommandParser(prog="qwenkit finetune", description="Supervised fine-tuning.")
    add_training_args(parser)
    parser.add_argument("--filter", action="store_true", help="mask sensitive data before training")
    parser.add_argument("--filter-keywords", help="keyword file for --filter (one per line)")
    args = parser.parse_args(argv)
    if args.filter_keywords and not args.filter:  # the data would train unfiltered, keywords and all
        raise ConfigError("--filter-keywords applies with --filter; pass both to mask sensitive data")
    if (launched := launch_ranks("qwenkit.finetune", argv, args)) is not None:
        return launched
    from qwenkit.finetune.run import finetune

    record_filter = None
    if args.filter:
        from qwenkit.checkpoint.output_dir import check_out_dir
        from qwenkit.finetune.sensitive import make_record_filter

        if args.filter_keywords:  # --overwrite replaces OUT, never an input inside it
            check_out_dir(Path(args.out), args.overwrite, Path(args.filter_keywords))

        record_filter = make_record_filter(args.filter_keywords)
    out = finetune(
        args.model,
        args.data,
        args.out,
        train_args(args),
        eval_path=args.eval_data,
        resume=args.resume,
        overwrite=args.overwrite,
        record_filter=record_filter,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out}", file=sys.stderr)
    return 0
