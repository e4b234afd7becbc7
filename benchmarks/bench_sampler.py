"""Per-step sampling cost: qwenkit's sampler beside transformers' logits processors, in one process.

A decode step turns (rows, vocabulary) logits into one token per row. This times that turn, penalties
included, for the sampling settings people use: greedy; Qwen2.5's chat defaults (temperature 0.7, top-k
20, top-p 0.8, repetition penalty 1.05 over a 1,000-token history); the bundled model's own (temperature
0.2, top-p 0.9); an OpenAI client's top-p alone (temperature 1.0, top-p 0.95); temperature alone. The
peer is what transformers' ``generate`` runs per step: its ``LogitsProcessorList`` of the same
processors, then softmax and ``torch.multinomial`` (argmax for greedy).

The logits are real: the bundled SmolLM2's rows for the positions of a chat prompt (49,152 tokens), and
the same rows with their tails extended to Qwen's 151,936 (values drawn from each row's lower half).
With ``--engine`` it also runs the bundled model's decode through the engine under greedy, Qwen's
defaults and top-p alone, to show the sampler's share of a step. Not a test: a measurement.

    .venv/bin/python benchmarks/bench_sampler.py [--rows 1,16] [--engine] [--threads 2] [--previous FILE]

``--previous FILE`` times an earlier ``sampler.py`` beside this one in the same process (for example
``git show b76be4c:src/qwenkit/engine/sampler.py > /tmp/previous_sampler.py``, the sampler before it
stopped sorting the vocabulary).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from qwenkit.checkpoint import load_model
from qwenkit.default_model import default_model_path
from qwenkit.engine import Engine, SamplingParams, sampler
from qwenkit.engine.request import Request
from qwenkit.engine.token_counts import TokenCounts
from qwenkit.generate import tokenizer_for

HISTORY = 1000  # tokens of prompt and output the repetition penalty looks at
SETTINGS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0),
    "Qwen2.5 defaults (T 0.7, top-k 20, top-p 0.8, rep 1.05)": SamplingParams(
        temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
    ),
    "bundled model's (T 0.2, top-p 0.9)": SamplingParams(temperature=0.2, top_p=0.9),
    "OpenAI-style top-p alone (T 1.0, top-p 0.95)": SamplingParams(temperature=1.0, top_p=0.95),
    "temperature alone (T 1.0)": SamplingParams(temperature=1.0),
}


def real_logits(rows: int) -> torch.Tensor:
    """(rows, 49152) float32 logits of the bundled model at the last positions of a chat prompt."""
    path = default_model_path()
    model, _ = load_model(path, dtype="float32", progress=False)
    tokenizer = tokenizer_for(path)
    text = "Explain in a few sentences how a rainbow forms, and why it is curved."
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].float()
    return logits[-rows:].contiguous()


def widen(logits: torch.Tensor, vocab: int, seed: int = 0) -> torch.Tensor:
    """Each row's tail extended to ``vocab`` tokens with values from the row's own lower half."""
    g = torch.Generator().manual_seed(seed)
    low = logits.sort(-1).values[:, : logits.shape[1] // 2]
    pick = torch.randint(0, low.shape[1], (logits.shape[0], vocab - logits.shape[1]), generator=g)
    return torch.cat([logits, low.gather(1, pick)], dim=1)


def qwenkit_step(
    logits: torch.Tensor, params: SamplingParams, history: list[list[int]], module: ModuleType = sampler
) -> Callable[[], None]:
    """One step of ``module``'s sampler (this checkout's, or ``--previous``'s) over the rows' logits."""
    counted = hasattr(module, "TokenCounts")  # before it, the seen tokens were a bool (V,) mask
    requests = []
    for i, ids in enumerate(history):
        r = Request(i, ids, params, generator=None if params.greedy else torch.Generator().manual_seed(i))
        if params.repetition_penalty != 1.0:
            r.seen = TokenCounts(ids) if counted else torch.zeros(logits.shape[1], dtype=torch.bool)
            if not counted:
                r.seen[torch.tensor(ids)] = True
        requests.append(r)

    def run() -> None:
        x = logits.clone()
        if params.repetition_penalty != 1.0:
            x = module.apply_penalties(x, requests)
        module.sample(x, requests)

    return run


def load_sampler(path: Path) -> ModuleType:
    """A sampler module from a file, e.g. ``git show REV:src/qwenkit/engine/sampler.py > FILE``."""
    spec = importlib.util.spec_from_file_location("previous_sampler", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load a sampler module from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def transformers_step(
    logits: torch.Tensor, params: SamplingParams, history: list[list[int]]
) -> Callable[[], None]:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.greedy:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    input_ids = torch.tensor(history)

    def run() -> None:
        x = processors(input_ids, logits.clone())
        if params.greedy:
            x.argmax(-1)
        else:
            torch.multinomial(x.softmax(-1), 1)

    return run


def ms_per_call(fn: Callable[[], None], calls: int = 30) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def engine_rate(model: torch.nn.Module, batch: int, params: SamplingParams, tokens: int) -> float:
    engine = Engine(model, max_batch_size=batch)
    for b in range(batch):
        p = SamplingParams(**{**vars(params), "max_tokens": tokens, "ignore_eos": True, "seed": b})
        engine.add_request([(7 * b + i) % 1000 + 10 for i in range(16)], p)
    engine.step()
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--engine", action="store_true", help="also the bundled model's decode rate per setting")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request with --engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--previous", type=Path, help="an earlier sampler.py, timed beside this one")
    args = ap.parse_args()
    previous = load_sampler(args.previous) if args.previous else None
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    base = real_logits(max(rows))
    g = torch.Generator().manual_seed(1)
    print(f"ms per step (median of 30), {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}\n")
    before = " previous ms |" if previous else ""
    print(f"| vocabulary | setting | rows |{before} qwenkit ms | transformers ms | transformers / qwenkit |")
    print("|---|---|---:|" + "---:|" * (4 if previous else 3))
    for vocab in (base.shape[1], 151936):
        logits = base if vocab == base.shape[1] else widen(base, vocab)
        for name, params in SETTINGS.items():
            for r in rows:
                x = logits[:r].contiguous()
                history = torch.randint(0, vocab, (r, HISTORY), generator=g).tolist()
                ours = ms_per_call(qwenkit_step(x, params, history))
                theirs = ms_per_call(transformers_step(x, params, history))
                was = f" {ms_per_call(qwenkit_step(x, params, history, previous)):.3f} |" if previous else ""
                print(f"| {vocab:,} | {name} | {r} |{was} {ours:.3f} | {theirs:.3f} | {theirs / ours:.1f}x |")
    if not args.engine:
        return
    model, _ = load_model(default_model_path(), dtype="bfloat16", progress=False, fast_kernels=True)
    print(f"\nbundled model decode, tokens/s (aggregate), {args.tokens} tokens per request after 16\n")
    print("| setting | " + " | ".join(f"batch {b}" for b in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name in list(SETTINGS)[:4]:
        rates = [engine_rate(model, b, SETTINGS[name], args.tokens) for b in rows]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in rates) + " |")


if __name__ == "__main__":
    main()
