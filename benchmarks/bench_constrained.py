"""Decode speed with a JSON-schema constraint vs without, at batch 1 and 8, on the bundled model.

Both sides run in the same process on the same engine, with the same prompts, greedy, the same number of
requests; the constrained side compiles one llguidance matcher per request and masks its logits every
step. The figure is decode throughput (generated tokens / decode seconds, summed over a batch's wall
time) for both, the slowdown, and the share of the constrained run's wall time spent in the
constraint itself (masks and matcher updates, timed in place). Target: the constraint costs < 10%.

    .venv/bin/python benchmarks/bench_constrained.py [--model PATH] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import qwenkit.engine.engine as engine_module
from qwenkit.default_model import default_model_path
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.tools.grammar import GrammarConstraint, enable_grammars, json_schema_grammar

# Time spent on the constraint itself (computing masks, applying them, advancing matchers), measured
# inside the run: on a loaded machine this share is steadier than comparing two throughputs.
CONSTRAINT_SECONDS = [0.0]


def _timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            CONSTRAINT_SECONDS[0] += time.perf_counter() - start

    return wrapper


engine_module.apply_constraints = _timed(engine_module.apply_constraints)
GrammarConstraint.accept = _timed(GrammarConstraint.accept)

# Long enough that a batch keeps decoding for --tokens steps: a list of records.
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 20,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer"},
                    "city": {"type": "string"},
                    "role": {"enum": ["engineer", "teacher", "doctor", "artist"]},
                },
                "required": ["name", "age", "city", "role"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
PROMPT = "Write a JSON list of people with their name, age, city and role."


def run(llm: LLM, prompt: list[int], batch: int, params: SamplingParams) -> tuple[float, int]:
    """(seconds, tokens) for one batch, from submission to the last token."""
    start = time.perf_counter()
    completions = llm.generate([prompt] * batch, params)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for c in completions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM.load(args.model or default_model_path(), max_batch_size=8, progress=False)
    t = time.perf_counter()
    enable_grammars(llm)
    print(f"grammar compiler (token trie, once per tokenizer): {time.perf_counter() - t:.2f} s")
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    grammar = json_schema_grammar(SCHEMA)
    free = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    bound = SamplingParams(max_tokens=args.tokens, temperature=0, grammar=grammar)
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    head = f"{'batch':>5} {'free tok/s':>11} {'schema tok/s':>13} {'slowdown':>9} {'mask share':>11}"
    print(f"\n{head}  tokens (free/schema)")
    for batch in (1, 8):
        rates: dict[str, list[float]] = {"free": [], "bound": []}
        counts, shares = {}, []
        for _ in range(args.repeats):  # interleaved, so load on the machine hits both alike
            for name, params in (("free", free), ("bound", bound)):
                CONSTRAINT_SECONDS[0] = 0.0
                seconds, tokens = run(llm, prompt, batch, params)
                rates[name].append(tokens / seconds)
                counts[name] = tokens
                if name == "bound":
                    shares.append(CONSTRAINT_SECONDS[0] / seconds)
        free_rate, bound_rate = statistics.median(rates["free"]), statistics.median(rates["bound"])
        slowdown, share = 1 - bound_rate / free_rate, statistics.median(shares)
        row = f"{batch:>5} {free_rate:>11.1f} {bound_rate:>13.1f} {slowdown:>9.1%} {share:>11.1%}"
        print(f"{row}  {counts['free']}/{counts['bound']}")
    sample = llm.generate([prompt], bound)[0].text
    print(f"\nconstrained output (first 160 chars): {sample[:160]!r}")


if __name__ == "__main__":
    main()
