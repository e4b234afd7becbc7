"""``qwenkit finetune``: read and check data, load the model, plan memory, train, write OUT atomically.

While training, state lives in ``OUT.training/`` (``log.jsonl`` and ``checkpoints/step-N/``); OUT itself
appears only when training finished: the adapter (peft format) or the full model, ``log.jsonl``,
``loss.png``, ``training_args.json`` and ``data_report.json``. ``--resume`` continues from the newest
checkpoint in ``OUT.training/``.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qwenkit.checkpoint import load_model, open_checkpoint
from qwenkit.checkpoint.files import files_sha256
from qwenkit.checkpoint.loader import resolve_dtype
from qwenkit.checkpoint.output_dir import atomic_file, atomic_output_dir, check_out_dir, write_json
from qwenkit.config import ModelConfig
from qwenkit.errors import CheckpointError, ConfigError, QwenkitError
from qwenkit.finetune.adapter_io import adapter_state_dict, save_adapter
from qwenkit.finetune.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    state_dict_options,
)
from qwenkit.finetune.data import DataError, Record, read_records
from qwenkit.finetune.distributed import World, close_world, init_world, wrap
from qwenkit.finetune.encode import EncodeStats, encode_all, end_of_text_id, pack
from qwenkit.finetune.estimate import check_training_fits, estimate
from qwenkit.finetune.export import check_exportable, write_model_dir
from qwenkit.finetune.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    apply_lora,
    check_targets,
    lora_parameters,
    set_dropout,
    target_names,
)
from qwenkit.finetune.plot import plot_losses
from qwenkit.finetune.start_adapter import load_starting_adapter, starting_adapter
from qwenkit.finetune.trainer import TrainArgs, Trainer, enable_gradient_checkpointing, mixed_precision
from qwenkit.sigterm import Terminated, terminate_unwinds
from qwenkit.tokenizer.named_templates import save_named_templates


class TrainingDiverged(QwenkitError, FloatingPointError):
    """The loss became NaN or infinite: every later step would train on it and the result is garbage."""


def work_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.training"


def lora_config(args: TrainArgs, n_layers: int) -> LoRAConfig:
    layers = None
    if args.lora_layers is not None:
        if not 1 <= args.lora_layers <= n_layers:
            raise ConfigError(f"--lora-layers must be between 1 and {n_layers}, got {args.lora_layers}")
        layers = tuple(range(n_layers - args.lora_layers, n_layers))
    args.lora_r = LoRAConfig.r if args.lora_r is None else args.lora_r  # what training_args.json records
    args.lora_alpha = LoRAConfig.alpha if args.lora_alpha is None else args.lora_alpha
    return LoRAConfig(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout or 0.0,
        target_modules=tuple(args.target_modules) or DEFAULT_TARGETS,
        layers_to_transform=layers,
        use_rslora=args.use_rslora,
    )


def lora_dropout(names: list[str], asked: float | None, speak: bool) -> float:
    """The adapters' dropout: ``asked``, or by default 0.05, and 0 where the adapted modules ``names``
    include routed experts or a router.

    transformers 5 stacks a layer's experts into one parameter and makes the router a module of its own;
    peft adapts both as parameters, which it does only without dropout (it refuses to load such an adapter
    whose config says otherwise), so an adapter of them trained with dropout would not load there."""
    moe = any(".experts." in n or n.endswith(".mlp.gate") for n in names)
    if asked is None:
        return 0.0 if moe else 0.05
    if asked > 0 and moe and speak:
        print(
            f"note: --lora-dropout {asked} on routed experts or routers: transformers 5 with peft loads such "
            "an adapter only once its adapter_config.json says lora_dropout 0 (qwenkit loads it as is)",
            file=sys.stderr,
        )
    return asked


def router_aux_loss_coef(config: ModelConfig, asked: float | None) -> float:
    """The load-balancing loss weight: ``asked``, or the config's (0 unless it sets output_router_logits)."""
    if asked is None:
        return config.router_aux_loss_coef
    if asked < 0:
        raise ConfigError(f"--router-aux-loss-coef must not be negative, got {asked}")
    if asked and not config.num_experts:
        raise ConfigError(
            "--router-aux-loss-coef applies to mixture-of-experts models; this model has no experts"
        )
    return asked


@dataclass
class Prepared:
    """A model ready to train: trainable parameters chosen, wrapped for the process group."""

    model: nn.Module
    base: nn.Module  # unwrapped
    params: list[nn.Parameter]
    trainable_names: list[str]
    lora: LoRAConfig | None
    tied: bool
    source: str = ""  # the model's resolved path: what a checkpoint must be resumed on
    source_files: str = ""  # files_sha256 of its files, sampled: the same path may hold other files later
    adapter_files: str = ""  # the same of the adapter training started from (--adapter), if any


def prepare_model(model_path: str | Path, args: TrainArgs, world: World, batch_tokens: int) -> Prepared:
    """Load, quantize (QLoRA), add adapters or unfreeze (full), check memory, wrap for DDP/FSDP."""
    if args.method not in ("lora", "qlora", "full"):
        raise ConfigError(f"unknown --method {args.method!r}; choose lora, qlora or full")
    if args.method == "full":
        check_exportable(model_path)
    if args.tensor_parallel > 1:
        check_tensor_parallel(model_path, args)
    start = None
    if args.adapter is not None:  # its config checked before the model loads
        n_layers = ModelConfig.from_hf(open_checkpoint(model_path).hf_config).num_hidden_layers
        start = starting_adapter(args, n_layers)
    dtype = resolve_dtype(args.dtype, args.device)
    compute = mixed_precision(args)  # full training in half precision keeps float32 masters
    if compute == torch.float16:
        raise ConfigError(
            f"--method full in float16 (--dtype {args.dtype}) needs loss scaling, which qwenkit does not do; "
            "use --dtype bfloat16 (float32 master weights, bfloat16 compute) or float32"
        )
    model, config = load_model(
        model_path,
        torch.float32 if compute else dtype,
        args.device,
        progress=world.is_main and args.progress,
        dequantize=True,
    )
    quant_bits = None
    if config.quantization and args.method != "full" and world.is_main:  # say what a quantized base means
        q = config.quantization
        ignored = (
            "; --qlora-bits does not apply"
            if args.method == "qlora" and q.get("bits") != args.qlora_bits
            else ""
        )
        print(
            f"note: {model_path} is already quantized ({q.get('bits')}-bit {q.get('quant_method')}): the "
            f"adapters train over its own integer weights (QLoRA){ignored}",
            file=sys.stderr,
        )
    if args.method == "qlora" and not config.quantization:
        from qwenkit.quant import quantize_model_rtn

        quant_bits = args.qlora_bits
        quantize_model_rtn(model, bits=quant_bits)  # decoder layers only; the head stays float, as QLoRA
    args.router_aux_loss_coef = router_aux_loss_coef(config, args.router_aux_loss_coef)
    lora = None
    if args.method == "full":
        model.requires_grad_(True)
        params = list(model.parameters())  # tied weights appear once
    else:
        lora = start or lora_config(args, config.num_hidden_layers)
        adapted = load_starting_adapter(model, args.adapter) if start else target_names(model, lora)
        lora.dropout = lora_dropout(adapted, args.lora_dropout, world.is_main)
        args.lora_dropout = lora.dropout  # what training_args.json records
        if start is None:
            if args.target_modules:
                check_targets(model, lora)
            torch.manual_seed(args.seed)  # the same initial adapter on every rank and every run
            apply_lora(model, lora)
        set_dropout(model, lora.dropout)  # a starting adapter's modules have none yet
        params = lora_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    mem = estimate(
        config,
        dtype,
        args.method,
        trainable,
        args.batch_size,
        batch_tokens,
        args.gradient_checkpointing,
        quant_bits,
        masters=compute is not None,
    )
    if world.is_main:
        print(f"memory estimate per process:\n{mem.table()}", file=sys.stderr)
    check_training_fits(mem, args.device)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    wrapped = wrap(model, world, args.strategy, compute)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP swaps in DTensors
    source = str(Path(model_path).resolve())
    files = files_sha256(Path(source), sample=1 << 20)
    adapter_files = files_sha256(Path(args.adapter), sample=1 << 20) if args.adapter else ""
    return Prepared(
        wrapped, model, params, names, lora, config.tie_word_embeddings, source, files, adapter_files
    )


def check_tensor_parallel(model_path: str | Path, args: TrainArgs) -> None:
    """Refuse, before loading any weight, a tensor-parallel split the model or the method cannot take."""
    from qwenkit.finetune.tensor_parallel import check_model

    if args.strategy != "fsdp":
        raise ConfigError(
            f"--tensor-parallel combines with --strategy fsdp (FSDP over the replicas), not {args.strategy}"
        )
    check_model(ModelConfig.from_hf(open_checkpoint(model_path).hf_config), args.tensor_parallel, args.method)


# ---- the run ------------------------------------------------------------------------------------------


def load_examples(
    tokenizer, path: str | Path, args: TrainArgs, record_filter: Callable[[list[Record]], list[Record]] | None
):
    records = read_records(path)
    if record_filter is not None:
        records = record_filter(records)
    stats = EncodeStats()
    examples = encode_all(tokenizer, records, args.max_len, stats)
    if not examples:
        raise DataError(f"{path}: no example has a labelled token within --max-len {args.max_len}")
    if args.packing:
        examples = pack(examples, args.max_len)
        stats.packed_rows = len(examples)
    return examples, stats


def examples_fingerprint(examples: Sequence[Any]) -> str:
    """A hash of the token ids of every example, in order: what a resumed run must see again."""
    import hashlib
    from array import array

    digest = hashlib.sha256()
    for e in examples:
        parts = (e.ids,) if hasattr(e, "ids") else (e.chosen_ids, e.rejected_ids)
        for ids in parts:
            digest.update(array("q", ids).tobytes())
            digest.update(b"|")
    return digest.hexdigest()


def finetune(
    model_path: str | Path,
    data_path: str | Path,
    out: str | Path,
    args: TrainArgs,
    eval_path: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    record_filter: Callable[[list[Record]], list[Record]] | None = None,
    make_trainer: Callable[..., Trainer] | None = None,
    load_data: Callable[..., tuple[Sequence[Any], Any]] | None = None,
) -> Path:
    """Train and write OUT; see the module docstring for the files. Returns OUT."""
    from qwenkit.checkpoint.bare import refuse_embeddings_only
    from qwenkit.generate import tokenizer_for

    out = Path(out)
    if resume and out.exists() and not work_dir(out).exists():
        raise CheckpointError(
            f"--resume: {out} holds a finished run, with nothing left to resume; pass --overwrite (without "
            "--resume) to train it again, or train into a new OUT"
        )
    for source in (model_path, data_path, eval_path, args.adapter):  # --overwrite replaces OUT, not an input
        if source is not None:
            check_out_dir(out, overwrite, Path(source))
    work = work_dir(out)
    if work.exists() and not resume:
        raise CheckpointError(f"{work} holds an unfinished run; pass --resume to continue it, or delete it")
    if resume:  # before loading: dpo would score every pair's reference first
        latest_checkpoint(work)
    if args.batch_size < 1 or args.grad_accum < 1 or args.max_len < 2:
        raise ConfigError("--batch-size and --grad-accum must be at least 1, --max-len at least 2")
    refuse_embeddings_only(model_path, "fine-tuning trains its next-token loss, which needs one")
    world = init_world(args.device, args.tensor_parallel)
    finished = False
    try:
        tokenizer = tokenizer_for(model_path)
        load_data = load_data or (lambda tok, p: load_examples(tok, p, args, record_filter))
        examples, stats = load_data(tokenizer, data_path)
        eval_examples = load_data(tokenizer, eval_path)[0] if eval_path else None
        longest = max(_length(e) for e in examples)
        prep = prepare_model(model_path, args, world, longest)
        trainer = (make_trainer or Trainer)(
            prep.model, examples, args, world, end_of_text_id(tokenizer), prep.params
        )
        trainer.before_training(eval_examples)
        history: list[dict] = []
        data_id = examples_fingerprint(examples)
        if resume:
            ckpt = latest_checkpoint(work)
            history = load_checkpoint(ckpt, trainer, prep, args, data_id)
            if trainer.step > trainer.total_steps:  # it would finish at once with more steps than asked
                rest = f"use the adapter the checkpoint holds ({ckpt})" if prep.lora else "train a new OUT"
                raise ConfigError(
                    f"--resume: {ckpt} is at step {trainer.step}, past the {trainer.total_steps} steps of "
                    f"this run (--max-steps, --epochs); ask for {trainer.step} or more, or {rest}"
                )
            if world.is_main:
                print(f"resuming from {ckpt} (step {trainer.step})", file=sys.stderr)
                # the steps logged past the checkpoint run again: the running log restarts from its own
                with atomic_file(work / "log.jsonl") as f:
                    f.writelines(json.dumps(h) + "\n" for h in history)
        if world.is_main:
            (work / "checkpoints").mkdir(parents=True, exist_ok=True)
            summary = (
                stats.summary()
                if hasattr(stats, "summary")
                else ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in stats.items())  # "4 pairs, 0 dropped"
            )
            print(f"data: {summary}", file=sys.stderr)
            if trainer.global_batch > len(examples):
                print(
                    f"warning: a step takes {trainer.global_batch} examples (--batch-size x --grad-accum x "
                    f"replicas) and there are {len(examples)}: each step sees some of them more than once",
                    file=sys.stderr,
                )
        try:
            # SIGTERM (kill, a container stop) unwinds one process as Ctrl-C does, to say where --resume
            # goes on; under torchrun it is left to end the ranks, which may be blocked in collectives
            with nullcontext() if world.distributed else terminate_unwinds():
                _loop(trainer, prep, args, world, work, history, eval_examples, data_id)
        except (KeyboardInterrupt, Terminated):
            with _second_ctrl_c_ignored():  # under --nproc the launcher passes Ctrl-C on to every rank
                if world.is_main:
                    print(f"\n{_interrupted(work, trainer.step)}", file=sys.stderr)
            raise
        _finish(model_path, out, overwrite, trainer, prep, args, world, history, stats, tokenizer)
        finished = True
    finally:
        close_world(world, failing=not finished)
    return out


def _length(e: Any) -> int:
    return len(e.ids) if hasattr(e, "ids") else max(len(e.chosen_ids), len(e.rejected_ids))


@contextmanager
def _second_ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored for the block. Under ``--nproc`` the first Ctrl-C reaches each rank from the terminal
    and torchrun's agent sends its own right after; arriving while rank 0 said where to resume, it cut
    that line off (CI, 2026-12-06). Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(work: Path, step: int) -> str:
    """What Ctrl-C (or SIGTERM) leaves: the step, and whether --resume has a checkpoint to continue from."""
    return f"interrupted at step {step}; {resume_hint(work)}"


def resume_hint(work: Path) -> str:
    """Where --resume continues from in ``work``, or that it has nothing to continue from."""
    try:
        return f"--resume continues from {latest_checkpoint(work)}"
    except CheckpointError:
        return "no checkpoint was saved (--save-every N keeps them for --resume)"


def _loop(trainer, prep, args, world, work, history, eval_examples, data_id: str = "") -> None:
    if eval_examples and trainer.step == 0 and not any("eval_loss" in h for h in history):
        _log(
            history,
            world,
            work,
            {"step": 0, "eval_loss": trainer.evaluate(eval_examples), **trainer.eval_metrics},
        )
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.step,
        desc="training",
        disable=not (world.is_main and args.progress),
        dynamic_ncols=True,
    )
    with bar:
        while trainer.step < trainer.total_steps:
            lr = trainer.scheduler.get_last_lr()[0]
            r = trainer.train_step()
            if not math.isfinite(r.loss):  # the global loss: every rank stops alike
                raise TrainingDiverged(
                    f"the loss is {r.loss} at step {trainer.step} (lr {lr:.3g}): training diverged and "
                    f"nothing was written; lower --lr and start again (delete {work} first)"
                )
            record = {
                "step": trainer.step,
                "epoch": round(trainer.step / trainer.steps_per_epoch, 4),
                "loss": r.loss,
                "lr": lr,
                "grad_norm": r.grad_norm,
                "tokens": r.tokens,
                "tokens_per_second": r.tokens / r.seconds if r.seconds else 0.0,
                **r.extra,
            }
            last = trainer.step == trainer.total_steps
            if eval_examples and (last or (args.eval_every and trainer.step % args.eval_every == 0)):
                record["eval_loss"] = trainer.evaluate(eval_examples)
                record.update(trainer.eval_metrics)
            _log(history, world, work, record)
            bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_second']:.0f}")
            bar.update(1)
            if args.save_every and trainer.step % args.save_every == 0 and not last:
                save_checkpoint(
                    work / "checkpoints" / f"step-{trainer.step}",
                    trainer,
                    prep,
                    history,
                    args,
                    world,
                    data_id,
                )
                if world.is_main and args.keep_checkpoints:
                    prune_checkpoints(work, args.keep_checkpoints)


def save_training_templates(tokenizer: Any, out: Path) -> None:
    """The templates an adapter was trained with, beside it: one in chat_template.json (as ever); a model's
    named ones ("default", and "tool_use" that rows with tools rendered) as transformers 5 saves them,
    chat_template.jinja and additional_chat_templates/ (chat_template.json holds one template, and
    AutoProcessor refuses it beside additional_chat_templates/)."""
    if tokenizer.chat_templates:
        save_named_templates(tokenizer.chat_templates, out)
    elif tokenizer.chat_template:
        write_json(out / "chat_template.json", {"chat_template": tokenizer.chat_template})


def _log(history: list[dict], world: World, work: Path, record: dict) -> None:
    history.append(record)
    if world.is_main:
        with open(work / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _finish(model_path, out, overwrite, trainer, prep, args, world, history, stats, tokenizer) -> None:
    """Gather the result (collectives on every rank) and let rank 0 publish OUT in one rename."""
    if prep.lora:
        tensors = adapter_state_dict(prep.base)
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        tensors = get_model_state_dict(prep.model, options=state_dict_options(world))
    if world.is_main:
        with atomic_output_dir(out, overwrite) as tmp:
            if prep.lora:
                save_adapter(prep.base, tmp, prep.lora, str(Path(model_path).resolve()), tensors=tensors)
                save_training_templates(tokenizer, tmp)
            else:
                dtype = resolve_dtype(args.dtype, args.device)
                write_model_dir(model_path, tensors, tmp, dtype, prep.tied, "full fine-tuning with qwenkit")
            with open(tmp / "log.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(h) + "\n" for h in history)
            train = [(h["step"], h["loss"]) for h in history if "loss" in h]
            evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
            plot_losses(tmp / "loss.png", train, evals)
            write_json(
                tmp / "training_args.json",
                {"model": str(model_path), **args.to_json(), **trainer.run_settings()},
            )
            write_json(tmp / "data_report.json", stats if isinstance(stats, dict) else stats.__dict__)
        shutil.rmtree(work_dir(out), ignore_errors=True)
    world.barrier()
