"""``qwenkit dpo MODEL DATA OUT``: preference tuning (DPO) of a LoRA/QLoRA adapter."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from qwenkit.errors import ConfigError
from qwenkit.finetune.command import add_training_args, launch_ranks, train_args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="qwenkit dpo",
        description="DPO on {prompt, chosen, rejected} pairs; the reference is the base without the adapter.",
    )
    add_training_args(parser, lr=5e-5)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature (default 0.1)")
    args = parser.parse_args(argv)
    if args.method == "full":
        raise ConfigError("qwenkit dpo trains an adapter (--method lora or qlora): the base is the reference")
    if (launched := launch_ranks("qwenkit.cli.dpo", argv, args)) is not None:
        return launched
    from qwenkit.finetune.dpo import DPOTrainer, load_pairs
    from qwenkit.finetune.run import finetune

    targs = train_args(args)
    out = finetune(
        args.model,
        args.data,
        args.out,
        targs,
        eval_path=args.eval_data,
        resume=args.resume,
        overwrite=args.overwrite,
        make_trainer=functools.partial(DPOTrainer, beta=args.beta),
        load_data=lambda tok, path: load_pairs(tok, path, targs.max_len),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # torchrun -m qwenkit.cli.dpo (what --nproc runs)
    from qwenkit.cli import run_command

    sys.exit(run_command(main, sys.argv[1:]))
