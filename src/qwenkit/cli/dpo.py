"""``qwenkit dpo MODEL DATA OUT``: preference tuning (DPO and its variants) of an adapter or a whole model."""

from __future__ import annotations

import functools
import os
import sys

from qwenkit.command_parser import CommandParser
from qwenkit.errors import ConfigError
from qwenkit.finetune.command import add_training_args, launch_ranks, train_args
from qwenkit.finetune.dpo import LOSS_TYPES, check_loss


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = CommandParser(
        prog="qwenkit dpo",
        description="Preference tuning (DPO and its variants) on {prompt, chosen, rejected} pairs; the "
        "reference is the base without the adapter (base + the adapter with --adapter), or with --method "
        "full the model before training.",
    )
    add_training_args(parser, lr=5e-5, preference=True)
    parser.add_argument(
        "--beta",
        type=float,
        default=0.1,
        help="DPO's temperature; SimPO's reward scale; ORPO's odds-ratio weight (default 0.1)",
    )
    parser.add_argument(
        "--loss-type",
        default="sigmoid",
        choices=LOSS_TYPES,
        help="sigmoid (DPO, default), hinge (SLiC), ipo (length-normalized, as trl), robust (rDPO); "
        "without a reference: simpo (SimPO), orpo (ORPO)",
    )
    parser.add_argument(
        "--simpo-gamma",
        type=float,
        metavar="G",
        help="--loss-type simpo: the target reward margin (default 0.5, trl's default)",
    )
    parser.add_argument(
        "--sft-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="add W x the chosen replies' cross entropy (RPO with the DPO loss; LLaMA-Factory's pref_ftx)",
    )
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        metavar="E",
        help="--loss-type robust: the assumed share of flipped labels, in [0, 0.5)",
    )
    args = parser.parse_args(argv)
    check_loss(args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma, args.sft_weight)
    if args.packing:
        raise ConfigError(
            "--packing applies to finetune: a preference pair's two completions are scored apart"
        )
    if (launched := launch_ranks("qwenkit.cli.dpo", argv, args)) is not None:
        return launched
    from qwenkit.finetune.dpo import DPOTrainer
    from qwenkit.finetune.preference_data import load_pairs
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
        make_trainer=functools.partial(
            DPOTrainer,
            beta=args.beta,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            simpo_gamma=args.simpo_gamma,
            sft_weight=args.sft_weight,
        ),
        load_data=lambda tok, path: load_pairs(tok, path, targs.max_len),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # torchrun -m qwenkit.cli.dpo (what --nproc runs)
    from qwenkit.cli import run_command
    from qwenkit.finetune.command import on_lost_rank

    sys.exit(run_command(on_lost_rank(main), sys.argv[1:]))
