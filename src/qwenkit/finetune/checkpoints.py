"""Training checkpoints: ``OUT.training/checkpoints/step-N/`` holds the trainable weights, optimizer,
scheduler, step and log, gathered whole (any process count resumes), and, for LoRA, a usable adapter.
``--resume`` takes the newest complete one and refuses one made by another run (options, data, model
files, starting adapter)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwenkit.checkpoint.output_dir import atomic_output_dir
from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.finetune.adapter_io import adapter_state_dict, save_adapter
from qwenkit.finetune.distributed import World
from qwenkit.finetune.trainer import TrainArgs, Trainer

if TYPE_CHECKING:
    from qwenkit.finetune.run import Prepared

STATE_FILE = "trainer_state.pt"


def state_dict_options(world: World):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=world.distributed, strict=False)


def save_checkpoint(
    path: Path,
    trainer: Trainer,
    prep: Prepared,
    history: list[dict],
    args: TrainArgs,
    world: World,
    data_id: str = "",
) -> None:
    """Trainable weights, optimizer, scheduler, step and log, gathered whole (any process count resumes)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(prep.model, trainer.optimizer, options=state_dict_options(world))
    adapter = adapter_state_dict(prep.base) if prep.lora else None  # a collective under FSDP
    if world.is_main:
        keep = set(prep.trainable_names)
        state = {
            "model": {k: v for k, v in msd.items() if k in keep},
            "optimizer": osd,
            "scheduler": trainer.scheduler.state_dict(),
            "step": trainer.step,
            "history": history,
            "args": args.to_json(),
            "settings": trainer.run_settings(),
            "data": data_id,
            "base_model": prep.source,
            "base_model_files": prep.source_files,
            "adapter_files": prep.adapter_files,
        }
        with atomic_output_dir(path, overwrite=True) as tmp:
            _torch_save(state, tmp / STATE_FILE)
            if prep.lora:  # every checkpoint is also a usable adapter
                save_adapter(prep.base, tmp, prep.lora, "", tensors=adapter)
    world.barrier()


class _WriteErrors:
    """A file whose failed write (a full disk) is remembered: torch.save's writer swallows the OSError and
    raises an ``unexpected pos`` RuntimeError, which ``atomic_output_dir`` cannot tell from a bug."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save``; a write the disk refused raises its OSError (so a full disk is named as one)."""
    with open(path, "wb") as f:
        writer = _WriteErrors(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def _is_step(name: str) -> bool:
    number = name.removeprefix("step-")
    return number.isascii() and number.isdigit()


def _checkpoints(work: Path) -> list[Path]:
    """The complete checkpoints in ``work``, oldest first. Only ``step-N`` counts: a copy a user made
    beside them (``step-100.bak``) is neither resumed from nor pruned."""
    steps = sorted(
        (int(p.name.removeprefix("step-")), p)
        for p in (work / "checkpoints").glob("step-*")
        if _is_step(p.name) and (p / STATE_FILE).is_file()
    )
    return [p for _, p in steps]


def latest_checkpoint(work: Path) -> Path:
    found = _checkpoints(work)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {work / 'checkpoints'}")
    return found[-1]


def prune_checkpoints(work: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (--resume takes the newest)."""
    for path in _checkpoints(work)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path, trainer: Trainer, prep: Prepared, args: TrainArgs, data_id: str = ""
) -> list[dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    saved, now = state["args"], args.to_json()
    defaults = TrainArgs().to_json()  # a key an older checkpoint lacks: the run had no option for it yet
    for key in TrainArgs.RESUME_KEYS:
        was = saved.get(key, defaults[key])
        if was != now.get(key):
            raise ConfigError(f"--resume: {key} was {was!r} in {path}, now {now.get(key)!r}")
    for key, value in state.get("settings", {}).items():  # older checkpoints have none
        if trainer.run_settings().get(key) != value:
            what = "global_batch (--batch-size x --grad-accum x replicas)" if key == "global_batch" else key
            raise ConfigError(
                f"--resume: {what} was {value!r} in {path}, now {trainer.run_settings().get(key)!r}"
            )
    if state.get("data") and data_id and state["data"] != data_id:  # older checkpoints have none
        raise ConfigError(
            f"--resume: the training examples differ from those of the run in {path} (another data file, "
            "filter or --max-len), so it would not see the same batches; train into a new OUT"
        )
    if state.get("base_model") and prep.source and state["base_model"] != prep.source:  # older: none
        raise ConfigError(
            f"--resume: the run in {path} trained {state['base_model']}, not {prep.source}; resume it on "
            "that model, or train into a new OUT"
        )
    if state.get("base_model_files") and prep.source_files and state["base_model_files"] != prep.source_files:
        raise ConfigError(
            f"--resume: the files of {prep.source} changed since the run in {path} started (another "
            "download or version of the model?); resume on the files it trained, or train into a new OUT"
        )
    if state.get("adapter_files") and prep.adapter_files and state["adapter_files"] != prep.adapter_files:
        raise ConfigError(  # DPO's reference is base + that adapter: other weights, another reference
            f"--resume: the adapter {args.adapter} changed since the run in {path} started; resume from "
            "the adapter it started from, or train into a new OUT"
        )
    try:
        set_state_dict(
            prep.model,
            trainer.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    except RuntimeError as e:  # another model's shapes: torch lists every tensor, with a traceback
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise CheckpointError(f"--resume: {path} does not fit this model: {first}") from None
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step = int(state["step"])
    note = split_note(saved, trainer, prep)
    if note and trainer.world.is_main:
        print(note, file=sys.stderr)
    return list(state["history"])


def split_note(saved: dict[str, Any], trainer: Trainer, prep: Prepared) -> str | None:
    """A resume that splits the global batch otherwise (--batch-size x --grad-accum x replicas) takes the
    same batches, but LoRA dropout draws one mask per micro-batch: the run leaves the uninterrupted one."""
    dropout = prep.lora.dropout if prep.lora else 0.0
    was = (saved.get("batch_size"), saved.get("grad_accum"))
    now = (trainer.args.batch_size, trainer.args.grad_accum)
    if not dropout or None in was or was == now:
        return None
    replicas = trainer.global_batch // (was[0] * was[1])
    return (
        f"note: --resume splits the global batch of {trainer.global_batch} as --batch-size {now[0]} x "
        f"--grad-accum {now[1]} x {trainer.world.dp_size} replica(s), the checkpoint's run as {was[0]} x "
        f"{was[1]} x {replicas}: the same batches, but LoRA dropout ({dropout:g}) draws its masks per "
        "micro-batch, so from here on the weights differ from an uninterrupted run's (resume in the same "
        "split to continue it exactly)"
    )
