"""LoRA adapters loaded and unloaded while a model serves (``LLM.load_adapter``, ``Engine.add_adapter``):
the same tokens and log-probabilities as adapters given at load time, requests already running finish on
the weights they started with, and a refused adapter changes nothing."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, run_engine, save_hf, write_lora_adapter, write_tiny_chat_model

from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.engine import Engine, SamplingParams
from qwenkit.engine.sampling import SamplingParamsError
from qwenkit.errors import CheckpointError, QwenkitError
from qwenkit.finetune.adapter_io import AdapterNotFound
from qwenkit.generate import LLM
from qwenkit.model.served_adapters import (
    AdapterNameError,
    AdapterNotServable,
    AdapterNotServed,
    served_projections,
)

PROMPTS = [list(range(5, 16)), [7, 3], list(range(300, 306)), [9, 8, 1], list(range(40, 49))]
ROWS = [None, "a", "b", "a", "c"]  # the adapter each prompt runs through


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    # a chat checkpoint (LLM needs its tokenizer) whose every layer runs on the kernels
    path = tmp_path_factory.mktemp("runtime") / "m"
    shape = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    return write_tiny_chat_model(path, num_key_value_heads=2, **shape)


@pytest.fixture(scope="module")
def adapters(base_dir):
    root = base_dir.parent
    return {
        "a": write_lora_adapter(base_dir, root / "a", seed=1, r=4),
        # fewer modules than "a": loaded first, "a" then wraps modules "b" left alone
        "b": write_lora_adapter(base_dir, root / "b", seed=2, r=2, targets=("q_proj", "v_proj", "down_proj")),
        # a rank past the 16 the first adapters pad to: every projection's pairs grow
        "c": write_lora_adapter(base_dir, root / "c", seed=3, r=20, targets=("o_proj", "up_proj")),
    }


@pytest.fixture(autouse=True)
def _no_prepared_cache(monkeypatch):
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "off")


def params(adapter: str | None, max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, adapter=adapter)


def answers(llm: LLM, rows: list[str | None]) -> list[tuple[list[int], list]]:
    """Each prompt through its row's adapter, submitted together: (token ids, log-probabilities)."""
    with llm.driver.together():
        streams = [llm.submit(p, params(a)) for p, a in zip(PROMPTS, rows, strict=True)]
    for stream in streams:
        for _ in stream:
            pass
    return [(s.completion.token_ids, s.completion.logprobs) for s in streams]


def test_adapters_loaded_while_serving_answer_as_those_loaded_at_start(base_dir, adapters):
    """On the kernels' bf16 path (fused base, whole-layer decode calls): adapters loaded one by one into
    a model that served none, in an order where later ones wrap new modules and raise the rank, give the
    tokens and log-probabilities of the same adapters given at load time, batched with the base model."""
    with LLM.load(base_dir, dtype="bfloat16", progress=False, adapters=adapters) as at_start:
        expected = answers(at_start, ROWS)
    with LLM.load(base_dir, dtype="bfloat16", progress=False) as llm:
        assert llm.adapters == [] and llm.model.model.layers[1].decode_weights is not None
        base_only = answers(llm, [None] * len(PROMPTS))
        for name in ("b", "a", "c"):
            llm.load_adapter(name, adapters[name])
        assert llm.adapters == ["b", "a", "c"]
        assert answers(llm, ROWS) == expected
        assert base_only[0] == expected[0]
        assert all(base_only[i][0] != expected[i][0] for i in (1, 2, 3, 4))  # each adapter matters


@pytest.mark.parametrize("new", ["b", "c"])
def test_an_unloaded_adapters_slot_is_reused_without_its_weights(base_dir, adapters, new):
    """Unloading frees the slot; the adapter loaded next takes it, and where it adapts fewer modules than
    the one before, those modules' updates in that slot are zeros, not the old adapter's. "b" fits the
    rank held, so its pairs and kernel tiles are written in place; "c" raises it, so they are rebuilt."""
    with LLM.load(base_dir, dtype="bfloat16", progress=False, adapters={new: adapters[new]}) as only_new:
        expected = answers(only_new, [new] * len(PROMPTS))
    with LLM.load(base_dir, dtype="bfloat16", progress=False, adapters={"a": adapters["a"]}) as llm:
        llm.unload_adapter("a")
        assert llm.adapters == []
        with pytest.raises(SamplingParamsError, match=r"adapter 'a' is not served here \(served: none\)"):
            llm.submit([1, 2], params("a"))
        held = {n: p.tiles for n, p in served_projections(llm.model).items()}
        assert all(tiles is not None for tiles in held.values())  # the kernels' copy only
        llm.load_adapter(new, adapters[new])
        assert llm.model.adapters.names == [new]  # slot 1, a's before
        now = served_projections(llm.model)
        rebuilt = {n for n, tiles in held.items() if now[n].tiles[0] is not tiles[0]}
        raised = {n for n in held if n.endswith(("o_proj", "gate_up_silu.linear"))}  # c's rank 20
        assert rebuilt == (set() if new == "b" else raised) and len(raised) == 4
        assert answers(llm, [new] * len(PROMPTS)) == expected


def step_until(engine: Engine, rid, tokens: int, out: list[int]) -> None:
    while len(out) < tokens and engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                out += o.new_token_ids


def replace_adapter(engine: Engine, name: str, path) -> None:
    """What ``LLM.load_adapter(..., replace=True)`` runs between steps."""
    from qwenkit.checkpoint.loader import servable_adapter

    engine.add_adapter(name, servable_adapter(engine.model, name, path), replace=True)


def test_requests_running_on_a_replaced_or_unloaded_adapter_finish_on_its_weights(base_dir, adapters):
    """A request halfway through its answer on adapter "a" when "a" takes other weights (vLLM's
    ``load_inplace``) or is unloaded decodes on to the same tokens as if nothing had happened; requests
    after the replacement run on the new weights, and none reuses K/V cached under the old ones."""
    model, _ = load_model(
        base_dir, "bfloat16", progress=False, fast_kernels=True, adapters={"a": adapters["a"]}
    )
    prompt = list(range(60, 80))
    engine = Engine(model, max_batch_size=2, block_size=4)
    untouched = run_engine(engine, [prompt], params("a", 16))[0]

    rid = engine.add_request(prompt, params("a", 16))
    out: list[int] = []
    step_until(engine, rid, 6, out)
    replace_adapter(engine, "a", adapters["c"])
    step_until(engine, rid, 16, out)
    assert out == untouched

    c_model, _ = load_model(
        base_dir, "bfloat16", progress=False, fast_kernels=True, adapters={"a": adapters["c"]}
    )
    as_c = run_engine(Engine(c_model), [prompt], params("a", 16))[0]
    assert as_c != untouched
    rid = engine.add_request(prompt, params("a", 16))
    first: list[int] = []
    engine_outputs = engine.step()
    cached = next(o.num_cached_tokens for o in engine_outputs if o.request_id == rid)
    assert cached == 0  # the prompt was cached under the old weights of "a" only
    first += next(o.new_token_ids for o in engine_outputs if o.request_id == rid)
    step_until(engine, rid, 16, first)
    assert first == as_c

    rid = engine.add_request(prompt, params("a", 16))
    out = []
    step_until(engine, rid, 4, out)
    engine.remove_adapter("a")
    step_until(engine, rid, 16, out)
    assert out == as_c
    with pytest.raises(SamplingParamsError, match="adapter 'a' is not served here"):
        engine.add_request(prompt, params("a"))


def test_refused_adapters_change_nothing(base_dir, adapters, tmp_path):
    """Every refusal names its cause, and the model serves and answers as before it."""
    with LLM.load(base_dir, dtype="bfloat16", progress=False, adapters={"a": adapters["a"]}) as llm:
        before = answers(llm, ["a", None, "a", None, "a"])
        projections = {n: [t.clone() for t in p.pairs()] for n, p in served_projections(llm.model).items()}
        head = write_lora_adapter(base_dir, tmp_path / "head", seed=5, r=2, targets=("q_proj", "lm_head"))
        other = save_hf(hf_model("qwen2", hidden_size=32, intermediate_size=64), tmp_path / "other")
        wrong = write_lora_adapter(other, tmp_path / "wrong", seed=6, r=2, targets=("o_proj",))
        refusals = [
            (lambda: llm.load_adapter("h", head), AdapterNotServable, "adapter 'h' adapts lm_head"),
            (lambda: llm.load_adapter("w", wrong), CheckpointError, "adapter 'w' is for another model shape"),
            (
                lambda: llm.load_adapter("x", tmp_path / "none"),
                AdapterNotFound,
                "is not an adapter directory",
            ),
            (
                lambda: llm.load_adapter("a", adapters["b"]),
                AdapterNameError,
                "^adapter 'a' is already served$",
            ),
            (
                lambda: llm.load_adapter("b", adapters["b"], replace=True),
                AdapterNameError,
                "'b' is not served",
            ),
            # None used to be loaded into a slot that stays free (served under no name), '' served as ''
            (lambda: llm.load_adapter(None, adapters["b"]), AdapterNameError, "non-empty string, got None$"),
            (lambda: llm.load_adapter("", adapters["b"]), AdapterNameError, "non-empty string, got ''$"),
            # a KeyError whose message was only "'b'"
            (lambda: llm.unload_adapter("b"), AdapterNotServed, r"^adapter 'b' is not served \(served: a\)$"),
        ]
        for call, error, message in refusals:
            with pytest.raises(error, match=message) as raised:
                call()
            assert isinstance(raised.value, QwenkitError)
        with pytest.raises(AdapterNameError, match="non-empty string, got ''$"):  # at load: served as ''
            LLM.load(base_dir, dtype="float32", progress=False, adapters={"": adapters["b"]})
        assert issubclass(AdapterNameError, ValueError) and issubclass(
            AdapterNotServed, KeyError
        )  # as before
        assert llm.adapters == ["a"]
        for name, p in served_projections(llm.model).items():
            assert all(map(torch.equal, p.pairs(), projections[name]))
        assert answers(llm, ["a", None, "a", None, "a"]) == before
    # the one adapter of every request (--adapter) cannot be unloaded or replaced
    with LLM.load(base_dir, dtype="float32", progress=False, adapter=adapters["a"]) as one:
        for call in (
            lambda: one.unload_adapter("a"),
            lambda: one.load_adapter("a", adapters["c"], replace=True),
        ):
            with pytest.raises(ValueError, match="default of every request"):
                call()


def test_an_engine_on_the_static_decode_path_leaves_it_for_a_loaded_adapter(base_dir, adapters):
    """The static decode path (CUDA graphs; run eagerly here) has no side paths: an engine on it steps
    off it once an adapter is loaded, and answers as an engine of a model given the adapter at load."""
    from qwenkit.checkpoint.loader import servable_adapter

    model, _ = load_model(base_dir, "float32", progress=False)
    engine = Engine(model, cuda_graphs=True)
    assert engine.decode_graphs is not None
    rows = [params(None), params("a")]
    base = run_engine(engine, PROMPTS[:1], rows[0])
    engine.add_adapter("a", servable_adapter(model, "a", adapters["a"]))
    assert engine.decode_graphs is None
    at_start, _ = load_model(base_dir, "float32", progress=False, adapters={"a": adapters["a"]})
    both = run_engine(engine, PROMPTS[:2], rows)
    assert both == run_engine(Engine(at_start), PROMPTS[:2], rows) and both[0] == base[0]


def test_a_load_that_would_not_fit_is_refused_before_anything_changes(base_dir, adapters, monkeypatch):
    """The memory a new adapter takes (a slot in every projection, ranks raised) is checked against the
    free memory first; the estimate bounds what the load then takes, and is not far above it."""
    from qwenkit import memory
    from qwenkit.checkpoint.loader import servable_adapter
    from qwenkit.errors import OutOfMemoryError
    from qwenkit.model.served_adapters import added_bytes

    with LLM.load(base_dir, dtype="bfloat16", progress=False, adapters={"a": adapters["a"]}) as llm:

        def held() -> int:
            return sum(
                t.numel() * t.element_size()
                for p in served_projections(llm.model).values()
                for t in (*(p.tiles or ()), *((p.lora_at, p.lora_bt) if p.tiles is None else ()))
            )

        before = held()
        need = added_bytes(llm.model, "c", servable_adapter(llm.model, "c", adapters["c"]))
        monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
        with pytest.raises(OutOfMemoryError, match=r"not enough free RAM to serve adapter 'c' \(.*\): up to"):
            llm.load_adapter("c", adapters["c"])
        assert held() == before and llm.adapters == ["a"]
        monkeypatch.setattr(memory, "free_bytes", lambda device: need)
        llm.load_adapter("c", adapters["c"])
        # not far above: beyond what stays held, the rebuild's float32 copies of the old and new pairs
        assert before < held() <= before + need < before + 3 * (held() - before)


def held_bytes(model) -> int:
    return sum(
        t.numel() * t.element_size()
        for p in served_projections(model).values()
        for t in (*(p.tiles or ()), *((p.lora_at, p.lora_bt) if p.tiles is None else ()))
    )


def test_reserved_slots_take_adapters_in_place_and_answer_as_those_loaded_at_start(base_dir, adapters):
    """``max_loras``/``max_lora_rank`` (vLLM's flags): every attention and FFN projection holds zero
    pairs for the slots from the start, which change nothing the base model answers; adapters loaded
    later are written into those same tensors (no rebuild) and answer as adapters given at load."""
    from qwenkit.model.served_adapters import reservable_parts

    with LLM.load(base_dir, dtype="bfloat16", progress=False, adapters=adapters) as at_start:
        expected, base = answers(at_start, ROWS), answers(at_start, [None] * len(PROMPTS))
    with LLM.load(base_dir, dtype="bfloat16", progress=False, max_loras=3, max_lora_rank=32) as llm:
        projections = served_projections(llm.model)
        assert set(projections) == set(reservable_parts(llm.model)) and len(projections) == 8
        held = {n: (p.held, p.tiles[0].data_ptr(), p.tiles[1].data_ptr()) for n, p in projections.items()}
        fused = "model.layers.0.self_attn.qkv_proj"
        assert held[fused][0] == (3, 96) and held["model.layers.0.self_attn.o_proj"][0] == (3, 32)
        assert llm.model.model.layers[1].decode_weights is not None  # the whole-layer decode stays
        assert answers(llm, [None] * len(PROMPTS)) == base
        for name in ("b", "a", "c"):
            llm.load_adapter(name, adapters[name])
        now = served_projections(llm.model)
        assert {n: (p.held, p.tiles[0].data_ptr(), p.tiles[1].data_ptr()) for n, p in now.items()} == held
        assert answers(llm, ROWS) == expected


def test_past_the_reserved_slots_or_rank_a_load_is_refused_and_changes_nothing(base_dir, adapters, tmp_path):
    from qwenkit.model.adapter_bank import AdapterSlotsFull
    from qwenkit.model.served_adapters import AdapterRankTooHigh

    d = write_lora_adapter(base_dir, tmp_path / "d", seed=4, r=2)
    with LLM.load(base_dir, dtype="bfloat16", progress=False, max_loras=2, max_lora_rank=16) as llm:
        llm.load_adapter("a", adapters["a"])
        with pytest.raises(AdapterRankTooHigh, match=r"adapter 'c' has rank 20 .*above the 16 reserved"):
            llm.load_adapter("c", adapters["c"])
        llm.load_adapter("b", adapters["b"])
        before = answers(llm, [*ROWS[:3], "b", "a"])
        pairs = {n: [t.clone() for t in p.pairs()] for n, p in served_projections(llm.model).items()}
        with pytest.raises(AdapterSlotsFull, match=r"no free slot for adapter 'd': the 2 reserved"):
            llm.load_adapter("d", d)
        assert llm.adapters == ["a", "b"]
        for name, p in served_projections(llm.model).items():
            assert all(map(torch.equal, p.pairs(), pairs[name]))
        assert answers(llm, [*ROWS[:3], "b", "a"]) == before
        llm.load_adapter("a", d, replace=True)  # no request runs on it: its own slot takes the weights
        assert llm.model.adapters.names == ["a", "b"]
        llm.unload_adapter("b")
        llm.load_adapter("d", d)
        assert llm.adapters == ["a", "d"]
        rows = [None, "a", "d", "a", "d"]
        now = answers(llm, rows)
    with LLM.load(base_dir, dtype="bfloat16", progress=False, adapters={"a": d, "d": d}) as at_start:
        assert now == answers(at_start, rows)


def test_replacing_at_full_slots_waits_for_the_requests_on_the_old_weights(base_dir, adapters):
    """With every reserved slot taken, the new weights of a replaced adapter need its own slot, which a
    running request still uses: refused (nothing changes, the request finishes as it would have), and
    taken once that request has finished."""
    from qwenkit.model.adapter_bank import AdapterSlotsFull
    from qwenkit.model.served_adapters import reserve_adapters

    model, _ = load_model(
        base_dir, "bfloat16", progress=False, fast_kernels=True, adapters={"a": adapters["a"]}
    )
    reserve_adapters(model, 1, 16)  # plans the whole-layer decode calls again itself
    engine = Engine(model, max_batch_size=2)
    prompt = list(range(60, 80))
    untouched = run_engine(engine, [prompt], params("a", 12))[0]
    rid = engine.add_request(prompt, params("a", 12))
    out: list[int] = []
    step_until(engine, rid, 4, out)
    with pytest.raises(AdapterSlotsFull, match="running requests still use"):
        replace_adapter(engine, "a", adapters["b"])
    assert model.adapters.names == ["a"]
    step_until(engine, rid, 12, out)
    assert out == untouched and not engine.has_unfinished()
    replace_adapter(engine, "a", adapters["b"])
    b_model, _ = load_model(
        base_dir, "bfloat16", progress=False, fast_kernels=True, adapters={"a": adapters["b"]}
    )
    assert run_engine(engine, [prompt], params("a", 12)) == run_engine(
        Engine(b_model), [prompt], params("a", 12)
    )


def test_reserving_checks_memory_first_and_counts_the_adapters_served(base_dir, adapters, monkeypatch):
    """The memory the slots take is checked before anything is held, and bounds what is; adapters given
    at start count against the slots and the rank."""
    from qwenkit import memory
    from qwenkit.errors import ConfigError, OutOfMemoryError
    from qwenkit.model import served_adapters
    from qwenkit.model.served_adapters import reserved_bytes

    with LLM.load(base_dir, dtype="bfloat16", progress=False, max_loras=4, max_lora_rank=16) as llm:
        assert 0 < held_bytes(llm.model) <= reserved_bytes(llm.model, 4, 16) < 3 * held_bytes(llm.model)
    monkeypatch.setattr(served_adapters, "reserved_bytes", lambda *_: memory.free_bytes("cpu") + 1)
    with pytest.raises(OutOfMemoryError, match="not enough free RAM to reserve 4 adapter slots of rank 16"):
        LLM.load(base_dir, dtype="bfloat16", progress=False, max_loras=4, max_lora_rank=16)
    monkeypatch.undo()
    refusals = [
        (dict(adapters=adapters, max_loras=2), "3 adapters are served, more than --max-loras 2 holds: give"),
        (dict(adapters={"c": adapters["c"]}, max_loras=2), "adapter 'c' has rank 20, above --max-lora"),
        (dict(adapter=adapters["a"], max_loras=2), "not one every request runs"),
        (dict(max_loras=0), "must be at least 1, got 0 and 16"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ConfigError, match=message):
            LLM.load(base_dir, dtype="bfloat16", progress=False, **kwargs)


def test_reserved_paths_name_the_projections_holding_pairs(base_dir, adapters):
    """What tensor-parallel loading checks first: every module an adapter adapts must hold pairs already
    (there a projection wrapped later would add its update after its layer's all-reduce)."""
    from qwenkit.checkpoint.loader import servable_adapter
    from qwenkit.model.served_adapters import reserved_paths

    plain, _ = load_model(base_dir, "bfloat16", progress=False, fast_kernels=True)
    pairs = servable_adapter(plain, "a", adapters["a"])
    assert set(reserved_paths(plain, "a", pairs).values()) == {None}
    held, _ = load_model(base_dir, "bfloat16", progress=False, fast_kernels=True, reserve_adapters=(1, 8))
    paths = reserved_paths(held, "a", pairs)
    assert paths["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.qkv_proj"
    assert (
        paths["model.layers.1.mlp.down_proj"] == "model.layers.1.mlp.down_proj" and None not in paths.values()
    )


def test_a_model_running_its_adapter_inside_its_layers_serves_no_others(base_dir, adapters, tmp_path):
    """An adapter the side paths cannot serve (it adapts the output head) runs inside the layers
    (finetune's LoRALinear, a ``served_adapters.InLayerAdapter``): another is refused in one line, and
    the model answers as before."""
    from qwenkit.errors import ConfigError
    from qwenkit.finetune.lora import LoRALinear
    from qwenkit.model.served_adapters import InLayerAdapter, runs_adapter_inside

    head = write_lora_adapter(base_dir, tmp_path / "head", seed=5, r=2, targets=("q_proj", "lm_head"))
    with LLM.load(base_dir, dtype="bfloat16", progress=False, adapter=head) as llm:
        assert issubclass(LoRALinear, InLayerAdapter) and runs_adapter_inside(llm.model)
        before = answers(llm, [None] * len(PROMPTS))
        with pytest.raises(ConfigError, match=r"^this model runs its one adapter inside its layers \("):
            llm.load_adapter("a", adapters["a"])
        assert answers(llm, [None] * len(PROMPTS)) == before
