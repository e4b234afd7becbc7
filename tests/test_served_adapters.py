"""Served LoRA adapters (``model.served_adapters``): several adapters on one copy of the base weights, the
base kept fused and packed for the kernels, each request running through the adapter it names."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from factories import hf_model, run_engine, save_hf, write_lora_adapter

from qwenkit import kernels
from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.engine import Engine, SamplingParams
from qwenkit.engine.sampling import SamplingParamsError
from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.finetune.adapter_io import load_adapter
from qwenkit.finetune.lora import lora_modules
from qwenkit.model.served_adapters import AdapterNotServable, served_projections

IDS = torch.tensor([[3, 17, 101, 7, 250, 9, 44, 12]])
PROMPTS = [list(range(5, 16)), [7, 3], list(range(300, 306)), [9, 8, 1], list(range(40, 49)), [11] * 5]
ROWS = [None, "a", "b", "a", None, "b"]  # the adapter each prompt runs through


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "m"
    # an FFN width int4's groups divide, so every layer runs on the kernels
    return save_hf(hf_model("qwen2", num_hidden_layers=2, intermediate_size=256), path)


@pytest.fixture(scope="module")
def adapters(base_dir):
    root = base_dir.parent
    return {
        "a": write_lora_adapter(base_dir, root / "a", seed=1, r=4),
        "b": write_lora_adapter(base_dir, root / "b", seed=2, r=2, targets=("q_proj", "v_proj", "down_proj")),
    }


@pytest.fixture(autouse=True)
def _no_prepared_cache(monkeypatch):
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "off")


def wrapped_logits(base_dir, adapter, dtype="float32") -> torch.Tensor:
    """The adapter through finetune's LoRALinear layers (unfused, the training forward's form)."""
    model, _ = load_model(base_dir, dtype, progress=False)
    if adapter is not None:
        load_adapter(model, adapter)
    with torch.no_grad():
        return model(IDS).float()


def test_served_adapters_equal_finetunes_layers(base_dir, adapters):
    """float32, on torch's kernels: each token through its adapter gives the logits of that adapter on
    LoRALinear layers, and a token of the base model the base model's, exactly."""
    model, _ = load_model(base_dir, "float32", progress=False, adapters=adapters)
    assert model.adapters.names == ["a", "b"] and model.adapters.default == 0
    n = IDS.shape[1]
    with torch.no_grad():
        base = model(IDS, adapter_slots=[0] * n)
        assert torch.equal(base, model(IDS))  # no slots given: the default, here the base model
        assert torch.equal(base, wrapped_logits(base_dir, None))
        for slot, name in ((1, "a"), (2, "b")):
            ours, theirs = model(IDS, adapter_slots=[slot] * n), wrapped_logits(base_dir, adapters[name])
            assert (theirs - base).abs().max() > 0.05  # the adapter matters
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    # one adapter for every token (--adapter): the default
    one, _ = load_model(base_dir, "float32", progress=False, adapter=adapters["a"])
    assert one.adapters.default == 1 and len(served_projections(one)) == 2 * 7
    with torch.no_grad():
        torch.testing.assert_close(one(IDS), wrapped_logits(base_dir, adapters["a"]), rtol=0, atol=2e-5)


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built on this CPU")
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_fast_path_adapter_is_within_rounding_of_finetunes_layers(base_dir, adapters, quantize):
    """bf16 (or int4) on the kernels, q/k/v and gate/up fused: the served adapter's logits differ from
    LoRALinear's on the same base by rounding only, far less than the adapter moves them."""
    kwargs = dict(progress=False, quantize=quantize)
    served, _ = load_model(base_dir, "bfloat16", fast_kernels=True, adapter=adapters["a"], **kwargs)
    assert served.model.layers[0].self_attn.qkv_proj is not None  # the base stays fused
    assert served.model.layers[0].decode_weights is not None
    wrapped, _ = load_model(base_dir, "bfloat16", **kwargs)
    plain, _ = load_model(base_dir, "bfloat16", **kwargs)
    load_adapter(wrapped, adapters["a"])
    with torch.no_grad():
        ours, theirs, base = (m(IDS).float() for m in (served, wrapped, plain))
    effect = (theirs - base).abs().max()
    assert effect > 0.05
    assert (ours - theirs).abs().max() < effect / 10


def test_each_request_runs_through_its_adapter_whatever_the_batch(base_dir, adapters):
    """Requests through two adapters and the base model decode together as each alone, as on a model
    loaded with only its adapter (or none): the same tokens and log-probabilities."""
    params = {
        name: SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2, adapter=name)
        for name in ("a", "b", None)
    }
    each = [params[name] for name in ROWS]
    model, _ = load_model(base_dir, "bfloat16", progress=False, fast_kernels=True, adapters=adapters)
    together = run_engine(Engine(model, max_batch_size=8), PROMPTS, each)
    alone = [
        run_engine(Engine(model, max_batch_size=1), [p], sp)[0] for p, sp in zip(PROMPTS, each, strict=True)
    ]
    assert together == alone
    singles = {}
    for name in ("a", "b", None):
        one, _ = load_model(
            base_dir, "bfloat16", progress=False, fast_kernels=True, adapter=adapters.get(name)
        )
        rows = [p for p, r in zip(PROMPTS, ROWS, strict=True) if r == name]
        singles[name] = run_engine(Engine(one, max_batch_size=8), rows, replace(params[name], adapter=None))
    for name, outputs in singles.items():
        assert outputs == [t for t, r in zip(together, ROWS, strict=True) if r == name]
    # the adapters matter: the same prompt through each gives other tokens
    prompt = PROMPTS[0]
    outs = [run_engine(Engine(model), [prompt], params[name])[0] for name in ("a", "b", None)]
    assert len({tuple(o) for o in outs}) == 3


def test_prefix_cache_is_kept_apart_per_adapter(base_dir, adapters):
    """An adapter's K/V are not the base model's: a prompt cached through one adapter is a cache miss for
    another, and a hit for the same."""
    model, _ = load_model(base_dir, "bfloat16", progress=False, fast_kernels=True, adapters=adapters)
    engine = Engine(model, max_batch_size=2, block_size=4)
    prompt = list(range(60, 80))

    def run(adapter):
        rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, adapter=adapter))
        tokens, cached = [], None
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid:
                    tokens += o.new_token_ids
                    cached = o.num_cached_tokens if cached is None else cached
        return tokens, cached

    first, cached = run("a")
    assert cached == 0
    base, cached = run(None)
    assert cached == 0
    again, cached = run("a")
    assert cached > 0 and again == first
    fresh = run_engine(Engine(model), [prompt], SamplingParams(temperature=0, max_tokens=4))[0]
    assert base == fresh != first


def test_bad_adapter_requests_and_loads_are_refused_clearly(base_dir, adapters, tmp_path):
    model, _ = load_model(base_dir, "float32", progress=False, adapters=adapters)
    engine = Engine(model)
    with pytest.raises(SamplingParamsError, match=r"adapter 'c' is not served here \(served: a, b\)"):
        engine.add_request([1, 2], SamplingParams(adapter="c"))
    plain, _ = load_model(base_dir, "float32", progress=False)
    with pytest.raises(
        SamplingParamsError, match="adapter 'a' was asked for, but this model serves no adapters"
    ):
        Engine(plain).add_request([1, 2], SamplingParams(adapter="a"))
    with pytest.raises(ConfigError, match="not both"):
        load_model(base_dir, "float32", progress=False, adapter=adapters["a"], adapters=adapters)
    # an adapter of the output head: refused by name where adapters are chosen per request...
    head = write_lora_adapter(base_dir, tmp_path / "head", seed=3, r=2, targets=("lm_head", "q_proj"))
    with pytest.raises(AdapterNotServable, match=r"adapter 'h' adapts lm_head; served adapters may adapt"):
        load_model(base_dir, "float32", progress=False, adapters={"h": head})
    # ...while as the one --adapter it runs on LoRALinear layers, as the training forward does
    one, _ = load_model(base_dir, "float32", progress=False, adapter=head)
    assert one.adapters is None and "lm_head" in lora_modules(one)
    with torch.no_grad():
        assert torch.equal(one(IDS), wrapped_logits(base_dir, head))
    # an adapter of another model's shape names the module and both shapes
    other = save_hf(hf_model("qwen2", hidden_size=32, intermediate_size=64), tmp_path / "other")
    wrong = write_lora_adapter(other, tmp_path / "wrong", seed=4, r=2, targets=("o_proj",))
    with pytest.raises(
        CheckpointError, match=r"adapter 'w' is for another model shape: model\.layers\.0\.self_attn\.o_proj"
    ):
        load_model(base_dir, "float32", progress=False, adapters={"w": wrong})


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built on this CPU")
def test_a_prepared_model_from_the_cache_takes_adapters_too(base_dir, adapters, monkeypatch):
    """The base model is cached packed (without adapters); a later load maps it back and serves the
    adapters beside it: the same logits as a load that packs afresh."""
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "on")
    kwargs = dict(progress=False, quantize="int4", fast_kernels=True, adapters=adapters)
    hits = []
    load = prepared_cache.load

    def counted(*args):
        model = load(*args)
        hits.append(model is not None)
        return model

    monkeypatch.setattr(prepared_cache, "load", counted)
    first, _ = load_model(base_dir, "bfloat16", **kwargs)  # packs, and stores the base
    again, _ = load_model(base_dir, "bfloat16", **kwargs)  # from the cache
    assert hits == [False, True]
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "off")
    fresh, _ = load_model(base_dir, "bfloat16", **kwargs)
    assert again.adapters.names == ["a", "b"]
    assert all(layer.decode_weights is not None for layer in again.model.layers)
    n = IDS.shape[1]
    with torch.no_grad():
        for slot in (0, 1, 2):
            logits = [m(IDS, adapter_slots=[slot] * n) for m in (first, again, fresh)]
            assert torch.equal(logits[0], logits[1]) and torch.equal(logits[1], logits[2])


def test_the_memory_check_counts_the_adapters(base_dir, adapters, monkeypatch):
    """Served adapters take memory (float32 pairs and their kernel tiles): a machine with just room for the
    base model is told so before anything loads."""
    from qwenkit import memory
    from qwenkit.config import ModelConfig
    from qwenkit.errors import OutOfMemoryError

    config = ModelConfig.from_hf(json.loads((base_dir / "config.json").read_text()))
    need = memory.check_fits(config, torch.float32, "cpu", 64, free=1 << 40)
    monkeypatch.setattr(memory, "free_bytes", lambda device: need + 1024)
    load_model(base_dir, "float32", progress=False, context=64)
    with pytest.raises(OutOfMemoryError, match="not enough free RAM"):
        load_model(base_dir, "float32", progress=False, context=64, adapters=adapters)


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built on this CPU")
def test_serving_plans_the_whole_layer_decode_calls_again(base_dir, adapters):
    """The model's own ``serve_adapters``/``reserve_adapters`` plan the whole-layer decode calls again
    (they hold the side paths' tiles, not the modules), so the engine and the loader need not reach into
    ``quant.fused`` after each: the plans are the tensors a fresh plan takes, the adapters' tiles included."""
    from qwenkit.finetune.adapter_io import adapter_pairs
    from qwenkit.model.served_adapters import reserve_adapters, serve_adapters
    from qwenkit.quant.fused import decode_layer_weights

    model, _ = load_model(base_dir, "bfloat16", progress=False, fast_kernels=True)
    stale = [layer.decode_weights for layer in model.model.layers]
    serve_adapters(model, {"a": adapter_pairs(model, adapters["a"])[1]})
    reserve_adapters(model, 3, 16)
    for layer, old in zip(model.model.layers, stale, strict=True):
        fresh = decode_layer_weights(layer)
        assert layer.decode_weights is not old
        got = [t.data_ptr() for t in layer.decode_weights.tensors]
        assert got == [t.data_ptr() for t in fresh.tensors]
        assert layer.decode_weights.ints == fresh.ints
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.held[0] == 3  # the reserved slots, whose tiles the plan holds
    assert qkv.tiles[0].data_ptr() in [t.data_ptr() for t in model.model.layers[0].decode_weights.tensors]
