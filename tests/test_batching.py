"""Batching: a request's tokens do not depend on what else is in the batch (greedy and seeded)."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf
from factories import run_engine as run

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams, SamplingParamsError
from qwenkit.engine import engine as engine_module
from qwenkit.engine import forward as forward_module


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("m") / "qwen2")
    return load_model(path, dtype="float32")[0]


PROMPTS = [list(range(5, 12)), list(range(100, 140)), [7], list(range(300, 321))]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.7, seed=99, max_tokens=24, ignore_eos=True),  # top-p alone
        SamplingParams(
            temperature=1.0,
            min_p=0.05,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            seed=7,
            max_tokens=24,
            ignore_eos=True,
        ),
    ],
)
def test_batched_equals_alone(model, params):
    alone = [run(Engine(model, max_batch_size=1), [p], [params])[0] for p in PROMPTS]
    # Small prefill chunks force prompts to be split and to share steps with decoding rows.
    together = run(Engine(model, max_batch_size=4, prefill_chunk=8), PROMPTS, [params] * len(PROMPTS))
    assert together == alone
    # Fewer slots than requests: later requests join as earlier ones leave.
    queued = run(Engine(model, max_batch_size=2, prefill_chunk=16), PROMPTS, [params] * len(PROMPTS))
    assert queued == alone


def test_seed_reproducible_and_distinct(model):
    p = SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    a = run(Engine(model), [PROMPTS[1]], [p])[0]
    b = run(Engine(model), [PROMPTS[1]], [p])[0]
    c = run(
        Engine(model), [PROMPTS[1]], [SamplingParams(temperature=1.0, seed=6, max_tokens=16, ignore_eos=True)]
    )[0]
    assert a == b and a != c


def drain(engine: Engine) -> dict:
    """Step until idle; every request's tokens, finish reason and logprobs by id."""
    outs: dict = {}
    while engine.has_unfinished():
        for o in engine.step():
            got = outs.setdefault(o.request_id, {"ids": [], "finish": None, "logprobs": [], "prompt": None})
            got["ids"] += o.new_token_ids
            got["logprobs"] += o.logprobs
            got["finish"] = o.finish_reason
            got["prompt"] = o.prompt_logprobs or got["prompt"]
    return outs


def test_stop_tokens_and_abort_free_blocks(model):
    engine = Engine(model, max_batch_size=1)
    first = run(engine, [PROMPTS[0]], [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)])[0]
    stop_at = first[3]
    rid = engine.add_request(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop_at,))
    )
    got = drain(engine)[rid]
    assert got["ids"] == first[: first.index(stop_at) + 1] and got["finish"] == "stop"
    rid = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=100))
    engine.step()
    assert engine.blocks.usage > 0
    engine.abort(rid)
    assert engine.blocks.usage == 0  # freed at once
    (out,) = engine.step()  # the abort is reported, then the request is forgotten
    assert (out.request_id, out.finish_reason, out.new_token_ids) == (rid, "abort", [])
    assert not engine.has_unfinished() and engine.requests == {}


def test_caller_chosen_ids_and_duplicates(model):
    engine = Engine(model)
    assert engine.add_request([1, 2], SamplingParams(max_tokens=1), request_id="chat-1") == "chat-1"
    with pytest.raises(SamplingParamsError, match="already in use"):
        engine.add_request([1, 2], SamplingParams(max_tokens=1), request_id="chat-1")
    assert set(drain(engine)) == {"chat-1"} and engine.requests == {}


def test_logprobs_match_model(model):
    engine = Engine(model)
    rid = engine.add_request(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=1, logprobs=3, ignore_eos=True)
    )
    lp = drain(engine)[rid]["logprobs"][0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([PROMPTS[0]]))[0, -1], -1)
    assert lp.token_id == int(ref.argmax())
    assert abs(lp.logprob - ref.max().item()) < 1e-5
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()


def test_no_logprobs_unless_asked(model):
    engine = Engine(model)
    rid = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert drain(engine)[rid]["logprobs"] == []


@pytest.mark.parametrize("chunk", [4, 64])
def test_prompt_logprobs_match_model(model, chunk):
    prompt = PROMPTS[1]
    engine = Engine(model, prefill_chunk=chunk)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2))
    got = drain(engine)[rid]
    assert got["finish"] == "length" and got["ids"] == []
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0], -1)  # (T, V)
    lps = got["prompt"]
    assert len(lps) == len(prompt) and lps[0] is None
    for p in range(1, len(prompt)):
        assert lps[p].token_id == prompt[p]
        assert abs(lps[p].logprob - ref[p - 1, prompt[p]].item()) < 1e-4
        assert [t for t, _ in lps[p].top] == ref[p - 1].topk(2).indices.tolist()


def test_window_edge_rows_batched_with_long_chunks(model):
    """A row near the end of the window shares steps with a long prompt chunk (the old padded batch
    asked the cache for more than the window here and stuck)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [list(range(1, 40)), list(range(50, 80)), [3, 4]]
    alone = [run(Engine(model, max_batch_size=1, max_seq_len=48), [p], [params])[0] for p in prompts]
    engine = Engine(model, max_batch_size=3, max_seq_len=48, prefill_chunk=32)
    together = run(engine, prompts, [params] * 3)
    assert together == alone and [len(t) for t in together] == [9, 18, 40]


def test_unseeded_sampling_leaves_the_global_rng_alone(model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(Engine(model), [PROMPTS[0]], [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)])
    assert torch.equal(torch.rand(3), expected)


def test_tiny_temperature_is_greedy(model):
    greedy = run(Engine(model), [PROMPTS[2]], [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)])
    tiny = run(Engine(model), [PROMPTS[2]], [SamplingParams(temperature=1e-9, max_tokens=8, ignore_eos=True)])
    assert tiny == greedy


def test_one_bad_row_fails_alone(model):
    """A row whose logits are not finite fails with a reason; the rest of the batch is untouched."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = run(Engine(model), [PROMPTS[0]], [params])[0]
    engine = Engine(model)
    good = engine.add_request(PROMPTS[0], params)
    bad = engine.add_request(PROMPTS[3], params)
    head = model.lm_head

    class PoisonRow(torch.nn.Module):  # NaN logits for the row whose hidden state is the bad request's
        def forward(self, x):
            out = head(x)
            return torch.where((x[:, :1] == x[-1:, :1]) & (x.shape[0] > 1), float("nan"), out)

    model.lm_head = PoisonRow()
    try:
        first = engine.step()
    finally:
        model.lm_head = head
    by_id = {o.request_id: o for o in first}
    assert by_id[bad].finish_reason == "error" and "NaN/inf" in by_id[bad].error
    rest = drain(engine)
    assert by_id[good].new_token_ids + rest[good]["ids"] == alone


@pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels")
def test_bf16_logits_sample_as_their_float32_widening(tmp_path, monkeypatch):
    """On the CPU kernels the sampler reads a bf16 model's logits as the head gives them (no float32
    copy of the step's logits); every kind of request gets what it got from the widened logits."""
    path = save_hf(hf_model("qwen2"), tmp_path / "qwen2")
    bf16 = load_model(path, dtype="bfloat16", fast_kernels=True)[0]
    mixed = [
        SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.7, seed=99, max_tokens=12, ignore_eos=True),  # top-p alone
        SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(
            temperature=0.7, repetition_penalty=1.3, seed=7, max_tokens=12, logprobs=2, ignore_eos=True
        ),
    ]
    prompts = [*PROMPTS, list(range(40, 52))]
    seen: list[torch.dtype] = []
    real_finite_rows = engine_module.finite_rows
    monkeypatch.setattr(engine_module, "finite_rows", lambda x: seen.append(x.dtype) or real_finite_rows(x))

    def outputs() -> list[dict]:
        engine = Engine(bf16, max_batch_size=8)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, mixed, strict=True)]
        got = drain(engine)
        return [got[i] for i in ids]

    direct = outputs()
    assert set(seen) == {torch.bfloat16}
    monkeypatch.setattr(forward_module, "on_kernels", lambda logits: False)  # widened first, as before
    seen.clear()
    widened = outputs()
    assert set(seen) == {torch.float32}
    assert direct == widened
    assert all(len(r["ids"]) == 12 for r in direct) and len(direct[0]["logprobs"]) == 12


@pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels")
def test_bf16_prompt_logprobs_do_not_depend_on_how_prompts_are_cut(tmp_path_factory, monkeypatch):
    """On the kernels' bfloat16 path a query's attention depends only on its position and keys: a
    prompt's log-probabilities are the same bits whether it ran whole and alone, or cut into small chunks
    sharing steps with other prompts (torch's SDPA differed here, by up to 0.45 nats on the bundled
    model, which made a server's letter scores differ from a local run's)."""
    path = save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("bf16") / "qwen2")
    model = load_model(path, dtype="bfloat16", fast_kernels=True)[0]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def prompt_logprobs(chunk: int, prompts: list[list[int]]) -> list[list[float]]:
        engine = Engine(model, max_batch_size=4, prefill_chunk=chunk)
        ids = [engine.add_request(p, params) for p in prompts]
        got = drain(engine)
        return [[lp.logprob for lp in got[i]["prompt"][1:]] for i in ids]

    whole = [prompt_logprobs(512, [p])[0] for p in PROMPTS]
    assert prompt_logprobs(8, PROMPTS) == whole
    assert prompt_logprobs(5, PROMPTS[::-1]) == whole[::-1]
    from qwenkit.engine import kv_cache

    monkeypatch.setattr(kv_cache, "PARTIALS_BYTES", 1)  # one query a kernel call: the same bits again
    assert prompt_logprobs(512, PROMPTS) == whole
