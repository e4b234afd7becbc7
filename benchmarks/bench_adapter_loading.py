"""What loading a LoRA adapter while serving costs (``LLM.load_adapter``, ``serve --allow-runtime-lora``):
the call's wall time, and how long it holds up the requests decoding meanwhile, beside peft's
``PeftModel.load_adapter`` into a loaded transformers model (the usual Python way to add an adapter to a
running model; it serves no requests, so it has no stall to compare).

The engine decodes ``--batch`` requests through the adapters served at start while the main thread
loads a new adapter, replaces it (vLLM's ``load_inplace``) and unloads it, ``--rounds`` times. A stall
is the longest gap between two tokens of a running request; the same requests decoded without any load
give the gap that is normal for the machine. Twice: with the adapters' slots grown as adapters come (the
default: the first load past the slots held rebuilds every projection's pairs) and held from the start
(``serve --max-loras``: every load writes one slot in place).

    .venv/bin/python benchmarks/bench_adapter_loading.py [--rank 16] [--served 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch
from bench_adapters import make_adapter  # benchmarks/, beside this script
from bench_vs_llamacpp import write_anchor
from shapes import QWEN25_05B

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM


def decode_gaps(llm: LLM, batch: int, tokens: int, adapters: list[str], during) -> list[float]:
    """Every gap (seconds) between two deltas of ``batch`` requests decoding together while ``during()``
    runs in this thread; the requests' first tokens (their prefill) are left out."""
    params = [
        SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, adapter=adapters[i % len(adapters)])
        for i in range(batch)
    ]
    with llm.driver.together():
        streams = [llm.submit([(7 * i + j) % 1000 + 10 for j in range(16)], p) for i, p in enumerate(params)]
    gaps: list[list[float]] = [[] for _ in streams]
    started = threading.Barrier(len(streams) + 1)

    def read(i: int) -> None:
        last = None
        for _ in streams[i]:
            now = time.perf_counter()
            if last is None:
                started.wait()
            else:
                gaps[i].append(now - last)
            last = now

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for r in readers:
        r.start()
    started.wait()  # every request is decoding
    during()
    for r in readers:
        r.join()
    return [g for each in gaps for g in each]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--served", type=int, default=4, help="adapters served from the start")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qwenkit/bench_vs_llamacpp")
    args = ap.parse_args()
    path = args.work / "qwen2.5-0.5b-random"
    if not (path / "config.json").exists():
        write_anchor(path, QWEN25_05B)
    root = args.work / f"adapters-0.5b-r{args.rank}"
    paths = [make_adapter(path, root / f"a{i}", args.rank, seed=i) for i in range(args.served + 2)]
    served = {f"a{i}": str(p) for i, p in enumerate(paths[: args.served])}
    new, newer = paths[args.served :]
    kinds = ("load", "replace (load_inplace)", "unload")
    calls: dict[str, dict[str, list[float]]] = {}

    def churn(llm: LLM, times: dict[str, list[float]]) -> None:
        def timed(kind: str, call) -> None:
            start = time.perf_counter()
            call()
            times[kind].append(time.perf_counter() - start)

        for _ in range(args.rounds):
            time.sleep(0.3)
            timed("load", lambda: llm.load_adapter("x", new))
            time.sleep(0.3)
            timed("replace (load_inplace)", lambda: llm.load_adapter("x", newer, replace=True))
            time.sleep(0.3)
            timed("unload", lambda: llm.unload_adapter("x"))
        time.sleep(0.3)

    tokens = 400  # enough to outlast the churn at this shape's speed on 2 cores
    gaps: dict[str, list[float]] = {}
    # slots grown as adapters come (the default), and held from the start (serve --max-loras): the served
    # adapters and "x", at the adapters' rank
    for mode, reserve in (("grown", None), ("held", args.served + 1)):
        llm = LLM.load(
            path,
            dtype="bfloat16",
            max_batch_size=args.batch,
            progress=False,
            adapters=served,
            max_loras=reserve,
            max_lora_rank=args.rank,
        )
        if reserve is None:
            gaps["no loads"] = decode_gaps(llm, args.batch, tokens, list(served), lambda: None)
        calls[mode] = times = {kind: [] for kind in kinds}
        gaps[mode] = decode_gaps(
            llm, args.batch, tokens, list(served), lambda llm=llm, times=times: churn(llm, times)
        )
        llm.close()

    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = peft.PeftModel.from_pretrained(model, paths[0], adapter_name="a0")
    peft_calls: dict[str, list[float]] = {"load": [], "unload": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        model.load_adapter(str(new), adapter_name="x")
        peft_calls["load"].append(time.perf_counter() - start)
        start = time.perf_counter()
        model.delete_adapter("x")
        peft_calls["unload"].append(time.perf_counter() - start)

    ms = lambda xs: f"{1000 * statistics.median(xs):.0f}"  # noqa: E731
    print(
        f"Qwen2.5-0.5B shape (bf16), LoRA rank {args.rank} on all 7 projections, {args.served} adapters "
        f"served, {args.batch} requests decoding; medians of {args.rounds} calls; "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| call | qwenkit, slots grown as adapters come (ms) | slots held from the start, --max-loras "
        "(ms) | peft `PeftModel` (ms) |"
    )
    print("|---|---:|---:|---:|")
    for kind in kinds:
        peer = {"load": ms(peft_calls["load"]), "unload": ms(peft_calls["unload"])}.get(kind, "-")
        print(f"| {kind} | {ms(calls['grown'][kind])} | {ms(calls['held'][kind])} | {peer} |")
    print()
    print("| gap between two tokens of a running request (ms) | median | 99th pct | longest |")
    print("|---|---:|---:|---:|")
    rows = {
        "no loads": "no loads",
        "grown": "loads, replaces, unloads meanwhile (slots grown)",
        "held": "the same, slots held from the start (--max-loras)",
    }
    for key, name in rows.items():
        g = sorted(gaps[key])
        p99 = g[int(0.99 * (len(g) - 1))]
        print(f"| {name} | {1000 * statistics.median(g):.0f} | {1000 * p99:.0f} | {1000 * g[-1]:.0f} |")


if __name__ == "__main__":
    main()
