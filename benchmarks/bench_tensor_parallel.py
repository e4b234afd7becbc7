"""Tensor parallelism on CPU: decode tokens/s and memory per rank for TP=1 (one process, the peer) and
TP=2 (two processes, gloo), on the same random Qwen2-architecture checkpoint, in one run.

Two TP=2 rows: "replicated", where each rank runs the same engine on the same requests (greedy), so the
ranks stay in lockstep (what `generate` does), and "led", where rank 0's engine alone schedules and
samples and sends each forward to rank 1, which replays it (what `serve` and `chat` do). Rank 0's
figures are reported. On a 2-core machine the two ranks share the cores with each other, so TP=2 cannot
be faster here: what it shows is that the split computes the same tokens with half the weights per rank.

    .venv/bin/python benchmarks/bench_tensor_parallel.py [--layers 8] [--tokens 64] [--batch 1]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import psutil
import torch

from qwenkit.checkpoint import load_model
from qwenkit.distributed import TensorParallel
from qwenkit.distributed.launch import run_ranks
from qwenkit.engine import Engine, SamplingParams
from qwenkit.engine.lockstep import Lockstep
from qwenkit.memory import format_bytes


def write_checkpoint(path: Path, layers: int) -> Path:
    """A random Qwen2 model (hidden 1024, 16 heads / 4 kv heads, FFN 2816, vocab 32000)."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def measure(
    tp: TensorParallel | None, path: str, tokens: int, batch: int, out: str, threads: int, led: bool = False
) -> None:
    torch.set_num_threads(threads)
    rss_before = psutil.Process().memory_info().rss
    model, _ = load_model(path, dtype="float32", tensor_parallel=tp, progress=False)
    gc.collect()
    rss = psutil.Process().memory_info().rss - rss_before  # after loading: weights (+ mapped file pages)
    weights = sum(
        {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values()
    )
    engine = Engine(model, max_batch_size=batch, max_seq_len=256)
    lockstep = Lockstep() if led else None
    if lockstep is not None and tp.rank != 0:
        lockstep.follow(engine, tp)  # replays rank 0's forwards until it stops
        rss_run = psutil.Process().memory_info().rss - rss_before
        result = {"rate": None, "weights": weights, "rss": rss, "rss_run": rss_run, "ids": None}
        torch.save(result, Path(out) / f"r{tp.rank}.pt")
        return
    if lockstep is not None:
        lockstep.lead(engine)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for b in range(batch):
        engine.add_request([(31 * b + 7 * i) % 30000 + 10 for i in range(32)], params)
    engine.step()  # prefill
    start, produced, ids = time.perf_counter(), 0, []
    while engine.has_unfinished():
        outs = engine.step()
        produced += sum(len(o.new_token_ids) for o in outs)
        ids += [t for o in outs for t in o.new_token_ids]
    rate = produced / (time.perf_counter() - start)
    if lockstep is not None:
        lockstep.stop()
    rank = tp.rank if tp else 0
    rss_run = psutil.Process().memory_info().rss - rss_before  # mapped weight pages are touched by now
    result = {"rate": rate, "weights": weights, "rss": rss, "rss_run": rss_run, "ids": ids}
    torch.save(result, Path(out) / f"r{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_checkpoint(Path(tmp) / "model", args.layers))
        rows = []
        # (ranks, torch threads per rank): TP=1 with every core and with one, TP=2 with one each
        for world, threads, led in (
            (1, psutil.cpu_count(logical=False) or 1, False),
            (1, 1, False),
            (2, 1, False),
            (2, 1, True),
        ):
            out = Path(tmp) / f"tp{world}-{threads}-{led}"
            out.mkdir()
            fn = _single if world == 1 else measure
            run_ranks(fn, world, (path, args.tokens, args.batch, str(out), threads, led), timeout_s=900)
            rows.append((world, threads, led, [torch.load(out / f"r{r}.pt") for r in range(world)]))
    cores = psutil.cpu_count(logical=False)
    print(f"cores: {cores} physical; {args.layers} layers, float32, batch {args.batch}, {args.tokens} tokens")
    print(
        "| TP | engines | threads per rank | decode tok/s | weights per rank | RSS per rank after load"
        " | RSS per rank after decode | same tokens as TP=1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    reference = rows[0][3][0]["ids"]
    for world, threads, led, ranks in rows:
        r0 = ranks[0]
        engines = "one" if world == 1 else ("led by rank 0" if led else "replicated")
        same = "yes" if all(r["ids"] in (reference, None) for r in ranks) else "NO"
        rss = " / ".join(format_bytes(r["rss"]) for r in ranks)
        rss_run = " / ".join(format_bytes(r["rss_run"]) for r in ranks)
        weights = format_bytes(r0["weights"])
        row = (
            f"| {world} | {engines} | {threads} | {r0['rate']:.1f} | {weights} | {rss} | {rss_run} | {same} |"
        )
        print(row)


def _single(
    tp: TensorParallel, path: str, tokens: int, batch: int, out: str, threads: int, led: bool
) -> None:
    """TP=1: the plain single-process load (no sharding, no collectives), in its own process too."""
    measure(None, path, tokens, batch, out, threads)


if __name__ == "__main__":
    main()
