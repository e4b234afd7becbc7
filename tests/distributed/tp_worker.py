"""What each tensor-parallel rank runs in the tests (spawned processes import it by name)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from qwenkit.checkpoint import load_model
from qwenkit.distributed import TensorParallel
from qwenkit.errors import QwenkitError

PROMPT = torch.tensor([[3, 17, 250, 9, 401, 77, 5, 311], [42, 8, 199, 64, 1, 500, 23, 2]])


def weight_bytes_held(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters: what this process really holds."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def greedy(model: torch.nn.Module, tp: TensorParallel | None, steps: int) -> torch.Tensor:
    """Rank 0 picks each token and broadcasts it, so every rank runs the next step on the same ids."""
    ids = PROMPT.clone()
    for _ in range(steps):
        next_ids = model(ids)[:, -1].argmax(-1, keepdim=True)
        if tp is not None:
            dist.broadcast(next_ids, src=0, group=tp.group)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, PROMPT.shape[1] :]


def run_models(tp: TensorParallel, models: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for name, path in models.items():
        model, config = load_model(path, dtype="float32", tensor_parallel=tp, progress=False)
        with torch.no_grad():
            results[name] = {
                "logits": model(PROMPT),
                "tokens": greedy(model, tp, steps=6),
                "weight_bytes": weight_bytes_held(model),
                "kv_heads": config.num_key_value_heads,
            }
    torch.save(results, Path(out_dir) / f"rank{tp.rank}.pt")


def run_quantized(tp: TensorParallel, models: dict[str, str], quantize: str, out_dir: str) -> None:
    """As run_models, each model loaded with ``--quantize`` (each rank rounds its own shard)."""
    torch.set_num_threads(1)
    results = {}
    for name, path in models.items():
        model, _ = load_model(path, dtype="float32", quantize=quantize, tensor_parallel=tp, progress=False)
        with torch.no_grad():
            results[name] = {"logits": model(PROMPT), "tokens": greedy(model, tp, steps=6)}
    torch.save(results, Path(out_dir) / f"rank{tp.rank}.pt")


def run_with_adapter(tp: TensorParallel, path: str, adapter: str, out_dir: str) -> None:
    """The model with a LoRA adapter on top, each rank holding its slices of every pair."""
    torch.set_num_threads(1)
    model, _ = load_model(path, dtype="float32", adapter=adapter, tensor_parallel=tp, progress=False)
    with torch.no_grad():
        result = {"logits": model(PROMPT), "tokens": greedy(model, tp, steps=6)}
    torch.save(result, Path(out_dir) / f"rank{tp.rank}.pt")


# each forward's adapter slot per token of PROMPT's two rows: none, "a" for all, "a" and "b" side by side
SLOTS = {"base": [0] * 16, "a": [1] * 16, "a|b": [1] * 8 + [2] * 8}


def run_with_served_adapters(tp: TensorParallel, cases: dict[str, tuple[str, dict]], out_dir: str) -> None:
    """Each model with named adapters as side paths, each rank holding its slices of every pair: the
    logits of PROMPT with each of ``SLOTS``."""
    torch.set_num_threads(1)
    results = {}
    for name, (path, adapters) in cases.items():
        model, _ = load_model(path, dtype="float32", adapters=adapters, tensor_parallel=tp, progress=False)
        with torch.no_grad():
            results[name] = {k: model(PROMPT, adapter_slots=slots) for k, slots in SLOTS.items()}
    torch.save(results, Path(out_dir) / f"rank{tp.rank}.pt")


def load_expecting_error(tp: TensorParallel, paths: list[str], out_dir: str, die_rank: int) -> None:
    """Load rank-specific paths (to mismatch them on purpose); ``die_rank`` exits at once, unclean."""
    torch.set_num_threads(1)
    if tp.rank == die_rank:
        os._exit(3)
    try:
        load_model(paths[tp.rank], dtype="float32", tensor_parallel=tp, progress=False)
        message = "loaded"
    except QwenkitError as e:
        message = f"{type(e).__name__}: {e}"
    except RuntimeError as e:  # torch.distributed's own error when a peer is gone
        message = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    (Path(out_dir) / f"rank{tp.rank}.txt").write_text(message)
    if message != "loaded":
        raise SystemExit(2)


def raise_on_ranks(tp: TensorParallel, ranks: list[int], message: str) -> None:
    """Raise a QwenkitError on ``ranks`` (the others wait at a collective that then fails under them)."""
    from qwenkit.distributed.group import collective

    if tp.rank in ranks:
        raise QwenkitError(message)
    with collective("a barrier"):
        dist.barrier(group=tp.group)


def write_threads(tp: TensorParallel, out_dir: str) -> None:
    """Write the torch threads this rank was given."""
    (Path(out_dir) / f"rank{tp.rank}.txt").write_text(str(torch.get_num_threads()))


def interrupt_self(tp: TensorParallel, out_dir: str) -> None:
    """Send this rank the SIGINT a terminal's Ctrl-C sends every process of the group, then finish."""
    import signal
    import time

    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # a handler runs between bytecodes: it would have raised by now
    (Path(out_dir) / f"rank{tp.rank}.txt").write_text("finished")


def load_with_free_ram(tp: TensorParallel, path: str, free: int, out_dir: str) -> None:
    """Load with ``free`` bytes of RAM said to be free (the machine's own is far more); write what came."""
    import qwenkit.memory

    qwenkit.memory.free_bytes = lambda device: free
    try:
        load_model(path, dtype="float32", tensor_parallel=tp, progress=False, context=256)
        message = "loaded"
    except QwenkitError as e:
        message = f"{type(e).__name__}: {e}"
    (Path(out_dir) / f"rank{tp.rank}.txt").write_text(message)
