"""Batching, fuzzed: a request's result does not depend on what else runs beside it.

Seeded random mixes of 2-8 requests (shared prefixes for the prefix cache, prompts longer than a
prefill chunk and a KV block, copies of one prompt, greedy and seeded sampling with top-k/top-p/min-p,
penalties, logit bias, stop token ids, a stand-in grammar, logprobs and prompt logprobs, max_tokens 0
with prompt logprobs, served LoRA adapters) join one engine at staggered steps, some aborted mid-flight
(before their first step too), under engine settings drawn too (batch rows, prefill chunk, block size,
prefix caching, a KV pool small enough to preempt, the static decode step). Every request that finished
must equal the same request run alone on a fresh engine of the same settings: token ids and finish
reason exactly, log-probabilities within float tolerance, top alternatives by id. An aborted one's
tokens are a prefix of its lone run's. After every step each held KV block belongs to a request, and
after each run every block is back in the pool. Stop strings are the text layer's, applied to these
very ids.

float32 and, where the CPU kernels load, bfloat16 (whose kernels make a query's arithmetic its own
row's). A bf16 model is not fuzzed with the static decode step on the CPU: that step (CUDA graphs'
shapes, run eagerly) attends with SDPA, not the kernels, so its bits differ from an ordinary step's.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from factories import hf_model, save_hf, write_lora_adapter

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams, forward, sampler
from qwenkit.engine.constraint import bitmask_words

V = 512  # the factories' tiny vocabulary
LOGPROB_TOLERANCE = 1e-3
TIE = 1e-5  # log-probabilities this close may swap places among the top alternatives


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("fuzz") / "qwen2")


def draw_params(rng: random.Random, adapters: tuple[str, ...]) -> SamplingParams:
    kw: dict = dict(max_tokens=rng.choice([1, 2, 5, 9, 17, 30, 100]), ignore_eos=rng.random() < 0.7)
    if rng.random() < 0.5:
        kw["temperature"] = 0
    else:
        kw.update(temperature=rng.choice([0.5, 0.9, 1.3]), seed=rng.randrange(1000))
        if rng.random() < 0.3:
            kw["top_k"] = rng.choice([2, 5, 40])
        if rng.random() < 0.3:
            kw["top_p"] = rng.choice([0.5, 0.9])
        if rng.random() < 0.2:
            kw["min_p"] = 0.05
    if rng.random() < 0.2:
        kw["repetition_penalty"] = 1.3
    if rng.random() < 0.2:
        kw.update(presence_penalty=0.5, frequency_penalty=0.3)
    if rng.random() < 0.2:
        kw["logit_bias"] = {rng.randrange(V): 5.0, rng.randrange(V): -100.0}
    if rng.random() < 0.4:
        kw["logprobs"] = rng.choice([0, 1, 3, 5, 20])
    if rng.random() < 0.25:
        kw["prompt_logprobs"] = rng.choice([0, 2, 20])
        if rng.random() < 0.3:
            kw["max_tokens"] = 0
    if rng.random() < 0.15:
        kw["grammar"] = f"{rng.randrange(3)} {rng.randint(1, 12)}"  # a Residue
    if adapters and rng.random() < 0.7:
        kw["adapter"] = rng.choice(adapters)
    if rng.random() < 0.3:  # about one token in 13 stops: some requests end early, with "stop"
        kw["stop_token_ids"] = tuple(rng.randrange(V) for _ in range(40))
    return SamplingParams(**kw)


def draw_scenario(
    rng: random.Random, static_decode: bool, adapters: tuple[str, ...] = ()
) -> tuple[dict, list[dict]]:
    """Engine settings, and requests as dicts: prompt, params, the step it joins at, and the number of
    its steps after which it is aborted (None: never)."""
    settings = dict(
        max_batch_size=rng.randint(2, 6),
        prefill_chunk=rng.choice([4, 8, 16, 33, 512]),
        block_size=rng.choice([4, 8, 16]),
        prefix_caching=rng.random() < 0.8,
        cuda_graphs=static_decode and rng.random() < 0.3,
        max_seq_len=rng.choice([64, 96, 128]),
    )
    if rng.random() < 0.5:  # room for one or two sequences: preemption
        settings["kv_cache_tokens"] = int(rng.choice([1.0, rng.uniform(1, 2)]) * settings["max_seq_len"])
    prefixes = [[rng.randrange(V) for _ in range(rng.randint(1, 50))] for _ in range(2)]
    requests: list[dict] = []
    for _ in range(rng.randint(2, 8)):
        if requests and rng.random() < 0.15:  # a copy of an earlier one (n > 1)
            requests.append(dict(rng.choice(requests)))
            continue
        if rng.random() < 0.1:  # whole blocks, or up to the window's end
            prompt = (
                prefixes[0] * 3
                if rng.random() < 0.5
                else [rng.randrange(V) for _ in range(settings["max_seq_len"])]
            )
            prompt = prompt[: settings["block_size"] * rng.randint(1, 6)] if rng.random() < 0.5 else prompt
        elif rng.random() < 0.5:
            prefix = rng.choice(prefixes)
            prompt = prefix[: rng.randint(1, len(prefix))] + [
                rng.randrange(V) for _ in range(rng.randint(0, 20))
            ]
        else:
            prompt = [rng.randrange(V) for _ in range(rng.randint(1, 70))]
        requests.append(
            dict(
                prompt=prompt[: settings["max_seq_len"] - 1],
                params=draw_params(rng, adapters),
                at=rng.choice([0, 0, 0, 1, 3, 6, 10]),
                abort=rng.choice([None] * 6 + [0, 1, 2, 5, 9]),
            )
        )
    return settings, requests


class Residue:
    """A stand-in grammar (no grammar library): ``"r n"`` allows only token ids r mod 3, and is complete
    after n tokens."""

    def __init__(self, text: str) -> None:
        residue, self.left = map(int, text.split())
        bits = torch.zeros(bitmask_words(V) * 32, dtype=torch.long)
        bits[residue:V:3] = 1
        words = (bits.view(-1, 32) << torch.arange(32)).sum(1)  # (W,) as uint32 values
        self.mask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        self.residue = residue

    def fill_bitmask(self, row: torch.Tensor) -> None:
        row.copy_(self.mask)

    def accept(self, token: int) -> bool:
        self.left -= 1
        return token % 3 == self.residue

    @property
    def finished(self) -> bool:
        return self.left <= 0


def new_engine(model, settings: dict) -> Engine:
    engine = Engine(model, **settings)
    engine.grammar_compiler = Residue
    return engine


def run(engine: Engine, plan: list[dict]) -> dict[int, dict]:
    """Step until every request of ``plan`` has ended; each one's ids, logprobs, prompt logprobs and
    finish reason by its index."""
    got: dict[int, dict] = {}
    step = 0
    while len(got) < len(plan) or engine.has_unfinished():
        for i, r in enumerate(plan):
            if i not in got and r["at"] <= step:
                engine.add_request(r["prompt"], r["params"], request_id=i)
                got[i] = dict(ids=[], logprobs=[], prompt=None, finish=None, steps=0)
            if i in got and got[i]["finish"] is None and got[i]["steps"] == r["abort"]:
                engine.abort(i)
        for out in engine.step():
            g = got[out.request_id]
            assert g["finish"] is None, f"request {out.request_id} has an output after its last"
            g["ids"] += out.new_token_ids
            g["logprobs"] += out.logprobs
            g["finish"] = out.finish_reason
            if out.prompt_logprobs is not None:
                g["prompt"] = out.prompt_logprobs
        for g in got.values():
            g["steps"] += g["finish"] is None
        held = [b for r in engine.scheduler.running + list(engine.scheduler.waiting) for b in r.block_table]
        assert sum(engine.blocks.ref_counts) == len(held), "a KV block is held by no request"
        step += 1
        assert step < 2000, "the engine stopped making progress"
    assert_pool_whole(engine)
    return got


def assert_pool_whole(engine: Engine) -> None:
    blocks = engine.blocks
    assert blocks.num_free == blocks.num_blocks and not any(blocks.ref_counts), "KV blocks leaked"
    assert engine.requests == {} and not engine.scheduler.running and not engine.scheduler.waiting


def same_logprobs(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.token_id == b.token_id
        and abs(a.logprob - b.logprob) < LOGPROB_TOLERANCE
        and len(a.top) == len(b.top)
        # an alternative may trade places only with one as likely (float32 rounds by the step's shape)
        and all(
            abs(x - y) < (LOGPROB_TOLERANCE if s == t else TIE)
            for (s, x), (t, y) in zip(a.top, b.top, strict=True)
        )
    )


def differences(model, seed: int, static_decode: bool, adapters: tuple[str, ...] = ()) -> list[str]:
    """What differs between each request of scenario ``seed`` and the same request alone."""
    settings, plan = draw_scenario(random.Random(seed), static_decode, adapters)
    together = run(new_engine(model, settings), plan)
    found = []
    for i, r in enumerate(plan):
        alone = run(new_engine(model, settings), [dict(r, at=0, abort=None)])[0]
        got, where = together[i], f"seed {seed}, request {i}"
        n = len(got["ids"])
        if got["finish"] == "abort":
            if got["ids"] != alone["ids"][:n]:
                found.append(f"{where}: aborted after {got['ids']}, alone {alone['ids']}")
            continue
        if (got["ids"], got["finish"]) != (alone["ids"], alone["finish"]):
            found.append(f"{where}: {got['ids']} ({got['finish']}), alone {alone['ids']} ({alone['finish']})")
            continue
        if len(got["logprobs"]) != (n if r["params"].logprobs is not None else 0):
            found.append(f"{where}: {len(got['logprobs'])} logprobs for {n} tokens")
        for name in ("logprobs", "prompt"):
            mine, theirs = got[name] or [], alone[name] or []
            if len(mine) != len(theirs) or not all(map(same_logprobs, mine, theirs)):
                found.append(f"{where}: {name} differ: {mine} alone {theirs}")
        if r["params"].prompt_logprobs is not None and len(got["prompt"] or []) != len(r["prompt"]):
            found.append(f"{where}: {len(got['prompt'] or [])} prompt logprobs for {len(r['prompt'])} tokens")
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "adapters", "scenarios", "torch_sampler"),
    [
        ("float32", False, 120, False),
        ("bfloat16", False, 120, False),
        ("bfloat16", False, 60, True),  # the sampler's torch path, a GPU's (bf16 logits tie often)
        ("float32", True, 24, False),
    ],
    ids=["float32", "bfloat16", "bfloat16-torch-sampler", "float32-adapters"],
)
def test_a_request_does_not_depend_on_its_neighbours(
    checkpoint, monkeypatch, dtype, adapters, scenarios, torch_sampler
):
    if dtype == "bfloat16" and not kernels.available():
        pytest.skip("bf16 steps are batch-invariant only on the CPU kernels")
    if torch_sampler:
        monkeypatch.setattr(sampler, "on_kernels", lambda logits: False)
        monkeypatch.setattr(forward, "on_kernels", lambda logits: False)
    served = {}
    if adapters:  # two LoRA adapters served beside the base model; requests name one or none
        root = checkpoint.parent
        served = {
            "a": write_lora_adapter(checkpoint, root / "a", seed=1, r=4),
            "b": write_lora_adapter(checkpoint, root / "b", seed=2, r=2, targets=("q_proj", "v_proj")),
        }
    model = load_model(checkpoint, dtype=dtype, fast_kernels=dtype == "bfloat16", adapters=served or None)[0]
    start = time.perf_counter()
    found = [
        d for seed in range(scenarios) for d in differences(model, seed, dtype == "float32", tuple(served))
    ]
    kind = f"{dtype}{' with adapters' if adapters else ''}"
    print(f"{scenarios} {kind} scenarios in {time.perf_counter() - start:.1f} s")
    assert not found, "\n".join(found[:10])
