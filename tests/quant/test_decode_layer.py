"""A decode step's layers in one kernel call (``kernels.decode_layers``): the modules' results exactly.

The C++ layer runs the same ops in the same order with the same roundings as the module path, so a
decode step must give the very same logits and the very same K/V in the pool (bit for bit) with and
without it, for every kernel kind and for the families' variations (q/k/v bias, untied head, Qwen3's
q/k norms, Qwen v1's float32 RoPE). Layers with a part off the kernels keep the module path, and the
layers around them still run as one call per run of consecutive layers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from factories import hf_model, run_engine, save_hf, write_v1_checkpoint

from qwenkit import kernels
from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.engine import Engine, SamplingParams
from qwenkit.engine.forward import ForwardCall, run_forward
from qwenkit.engine.kv_cache import PagedKVCache
from qwenkit.model.adapter_bank import LoRAPair
from qwenkit.model.served_adapters import LoRAProjection, serve_adapters
from qwenkit.quant.fused import fuse_for_inference, plan_decode_layers

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built on this CPU")

BLOCK = 4
# five rows: Qwen3's 4 query heads make 20 rows of q-norm (torch's steps), its 2 KV heads 10 (the kernel)
PROMPTS = [list(range(5, 16)), [7], list(range(300, 306)), [9, 8], list(range(40, 49))]


def _load(path, quantize, monkeypatch):
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "off")
    model, _ = load_model(path, dtype="bfloat16", quantize=quantize, progress=False, fast_kernels=True)
    return model


TABLES = [[3 * i, 3 * i + 1, 3 * i + 2, 3 * i + 20, 3 * i + 21] for i in range(len(PROMPTS))]


# sixteen rows: a step of 9-16 rows runs as two groups side by side on two threads (decode_row_groups)
PROMPTS16 = [list(range(50 + 7 * i, 50 + 7 * i + 1 + i % 9)) for i in range(16)]
TABLES16 = [[5 * i + j for j in range(5)] for i in range(16)]


def _written_slots(decode_steps: int, prompts=PROMPTS, tables=TABLES) -> torch.Tensor:
    """The pool slots _steps writes: every position of every row, prompt and decoded tokens."""
    slots = [
        t[p // BLOCK] * BLOCK + p % BLOCK
        for t, pr in zip(tables, prompts, strict=True)
        for p in range(len(pr) + decode_steps)
    ]
    return torch.tensor(slots)


def _steps(
    model, decode_steps: int, prompts=PROMPTS, tables=TABLES, adapters: list[int] | None = None
) -> tuple[list[torch.Tensor], PagedKVCache]:
    """Prefill ``prompts`` (one chunk each), then greedy decode steps of all rows together; the logits of
    every decode step and the pool. ``adapters``: each row's served adapter slot."""
    cfg = model.config
    blocks = 1 + max(max(t) for t in tables)
    cache = PagedKVCache(
        cfg.num_hidden_layers, blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16, "cpu"
    )
    ids, positions, chunk_rows, index = [], [], [], []
    for table, prompt in zip(tables, prompts, strict=True):
        chunk_rows.append((table, 0, len(prompt)))
        ids += prompt
        positions += list(range(len(prompt)))
        index.append(len(ids) - 1)
    per_token = None if adapters is None else [a for a, p in zip(adapters, prompts, strict=True) for _ in p]
    with torch.no_grad():
        call = ForwardCall(ids, positions, None, index, [], chunk_rows, per_token)
        logits = run_forward(model, cache, call)
        lengths = [len(p) for p in prompts]
        out = []
        for _ in range(decode_steps):
            tokens = logits.argmax(-1).tolist()
            rows = [(t, n) for t, n in zip(tables, lengths, strict=True)]
            call = ForwardCall(tokens, lengths, None, list(range(len(tokens))), rows, [], adapters)
            logits = run_forward(model, cache, call)
            out.append(logits)
            lengths = [n + 1 for n in lengths]
    return out, cache


def _assert_kernel_path_equals_modules(model, decode_steps: int, adapters: list[int] | None = None) -> None:
    """Decode steps with every layer's decode_weights, then with none (the module path): the same logits
    and the same K/V in every written slot, bit for bit."""
    fused, fused_cache = _steps(model, decode_steps, adapters=adapters)
    for layer in model.model.layers:
        layer.decode_weights = None  # the module path
    plain, plain_cache = _steps(model, decode_steps, adapters=adapters)
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
    used = _written_slots(decode_steps)
    for k1, k2 in zip(fused_cache.k + fused_cache.v, plain_cache.k + plain_cache.v, strict=True):
        assert torch.equal(k1[used], k2[used])


@pytest.mark.parametrize(
    ("family", "quantize"),
    [
        ("qwen2", None),
        ("qwen2", "int8"),
        ("qwen2", "int4"),
        ("llama", "int4"),
        ("qwen3", None),
        ("qwen3", "int8"),
        ("qwen", None),
    ],
)
def test_decode_layer_equals_modules(tmp_path, monkeypatch, family, quantize) -> None:
    if family == "qwen":  # v1: float32 RoPE, dynamic NTK (LogN: see the test below)
        path = write_v1_checkpoint(tmp_path / "m", {"use_logn_attn": False})
    else:
        # an FFN width int4's group of 128 divides, so every layer runs on qwenkit's kernels
        model = hf_model(family, tie_word_embeddings=family == "qwen2", intermediate_size=256)
        path = save_hf(model, tmp_path / "m")
    model = _load(path, quantize, monkeypatch)
    weights = [layer.decode_weights for layer in model.model.layers]
    assert all(w is not None for w in weights)
    calls = _count_layer_runs(monkeypatch)
    _assert_kernel_path_equals_modules(model, 6)
    assert calls == [len(weights)] * 6  # every decode step: all its layers in one kernel call


@pytest.mark.parametrize(("seq_length", "runs"), [(32, [2] * 6), (13, [2, 2])])
def test_qwen_v1_logn_keeps_the_kernels_within_its_trained_length(tmp_path, monkeypatch, seq_length, runs):
    """LogN scales only queries at or past v1's trained length (``seq_length``), so the steps before it
    run on the whole-layer kernels (Qwen-7B-Chat has LogN on: every short chat ran the modules) and a step
    reaching it runs the modules, with the modules' logits either way. PROMPTS' longest row is 11 tokens:
    with seq_length 13 its decode positions 11 and 12 fit, and 13 (the third step) does not."""
    model = _load(write_v1_checkpoint(tmp_path / "m", {"seq_length": seq_length}), None, monkeypatch)
    assert model.config.use_logn_attn
    assert all(layer.decode_weights is not None for layer in model.model.layers)
    calls = _count_layer_runs(monkeypatch)
    _assert_kernel_path_equals_modules(model, 6)
    assert calls == runs


def _count_layer_runs(monkeypatch) -> list[int]:
    """The number of layers of each ``kernels.decode_layers`` call from here on."""
    calls: list[int] = []
    run = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda x, r, *a: calls.append(r.layers) or run(x, r, *a))
    return calls


def test_a_layer_off_the_kernels_splits_the_step_into_runs(tmp_path, monkeypatch) -> None:
    path = save_hf(hf_model("qwen2", num_hidden_layers=4, intermediate_size=256), tmp_path / "m")
    model = _load(path, "int8", monkeypatch)
    model.model.layers[1].decode_weights = None  # as a layer with a part on torch's kernels
    calls = _count_layer_runs(monkeypatch)
    _assert_kernel_path_equals_modules(model, 3)
    assert calls == [1, 2] * 3  # layer 0, then (module path for layer 1) layers 2-3, each step


def test_the_held_run_follows_each_engines_pools(tmp_path, monkeypatch) -> None:
    """The library holds a run's weights and K/V pools between steps. Two engines on one model, stepped
    in turn, still each write and read their own pools (a run is made again when the pools change),
    and one engine alone makes its run once, not once a step."""
    path = save_hf(hf_model("qwen2", intermediate_size=256), tmp_path / "m")
    model = _load(path, "int8", monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = PROMPTS[:2]
    alone = [run_engine(Engine(model, max_batch_size=1), [p], params)[0] for p in prompts]
    made: list[int] = []
    make = kernels.decode_run
    monkeypatch.setattr(kernels, "decode_run", lambda w, k, v: made.append(len(w)) or make(w, k, v))
    engines = [Engine(model, max_batch_size=1) for _ in prompts]
    for engine, prompt in zip(engines, prompts, strict=True):
        engine.add_request(prompt, params)
    outs: list[list[int]] = [[], []]
    while any(e.has_unfinished() for e in engines):
        for engine, out in zip(engines, outs, strict=True):
            for o in engine.step():
                out += o.new_token_ids
    assert outs == alone
    assert len(made) >= 7 * 2  # the pools changed at every step: a run each time
    made.clear()
    assert run_engine(engines[0], [prompts[1]], params)[0] == alone[1]
    assert made == [model.config.num_hidden_layers]  # 7 decode steps, one run


def test_decode_layer_keeps_batch_invariance(tmp_path, monkeypatch) -> None:
    path = save_hf(hf_model("qwen2", tie_word_embeddings=True, intermediate_size=256), tmp_path / "m")
    model = _load(path, "int4", monkeypatch)
    assert all(layer.decode_weights is not None for layer in model.model.layers)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [run_engine(Engine(model, max_batch_size=1), [p], params)[0] for p in PROMPTS]
    together = run_engine(Engine(model, max_batch_size=8), PROMPTS, params)
    assert together == alone


@pytest.mark.parametrize(
    ("family", "quantize"),
    [("qwen2", "int4")],  # an FFN of 144: no group of 32 to 128 tiles it, int4's down_proj on torch's kernel
)
def test_layers_not_wholly_on_the_kernels_keep_the_module_path(tmp_path, monkeypatch, family, quantize):
    path = save_hf(hf_model(family, intermediate_size=144), tmp_path / "m")
    model = _load(path, quantize, monkeypatch)
    assert all(layer.decode_weights is None for layer in model.model.layers)
    assert model.model.layers[0].self_attn.qkv_proj is not None  # fused projections still used


def test_decode_layer_rejects_bad_input(tmp_path, monkeypatch) -> None:
    path = save_hf(hf_model("qwen2"), tmp_path / "m")
    model = _load(path, None, monkeypatch)
    layer = model.model.layers[0]
    cfg = model.config
    pool = torch.zeros(8, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.bfloat16)
    x = torch.zeros(1, cfg.hidden_size, dtype=torch.bfloat16)
    cos = torch.ones(1, 1, cfg.head_dim, dtype=torch.bfloat16)
    one = torch.tensor([0])
    run = kernels.decode_run([layer.decode_weights], [pool], [pool])
    with pytest.raises(RuntimeError, match="slot 9 outside the pool"):
        kernels.decode_layers(x, run, torch.tensor([9]), one[None], one, cos, cos)
    with pytest.raises(RuntimeError, match="1..16 rows"):
        rows = torch.zeros(17, cfg.hidden_size, dtype=torch.bfloat16)
        kernels.decode_layers(rows, run, one, one[None], one, cos, cos)
    with pytest.raises(RuntimeError, match="per layer, 38 tensors, 36 ints, 5 floats and a K and a V pool"):
        kernels.decode_run([layer.decode_weights] * 2, [pool], [pool])
    with pytest.raises(RuntimeError, match="got 0 tensors"):
        kernels.decode_run([], [], [])


def test_decode_layer_takes_strided_slots(tmp_path, monkeypatch) -> None:
    path = save_hf(hf_model("qwen2"), tmp_path / "m")
    model = _load(path, None, monkeypatch)
    layer, cfg = model.model.layers[0], model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.hidden_size, generator=g).bfloat16()
    cos = torch.ones(1, 2, cfg.head_dim, dtype=torch.bfloat16)
    gather = torch.tensor([[0, 1, 2], [4, 5, 6]])
    positions = torch.tensor([2, 2])
    outs = []
    for slots in (torch.tensor([2, 6]), torch.tensor([2, 0, 6, 0])[::2]):  # the same slots, strided
        pool_k = torch.zeros(8, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.bfloat16)
        pool_v = torch.zeros_like(pool_k)
        run = kernels.decode_run([layer.decode_weights], [pool_k], [pool_v])
        y = kernels.decode_layers(x, run, slots, gather, positions, cos, cos)
        outs.append((y, pool_k, pool_v))
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    assert outs[0][1][[2, 6]].abs().sum() > 0  # the step's K went to its slots


def test_decode_layer_runs_q_k_v_of_different_kinds_as_three_products(tmp_path, monkeypatch) -> None:
    """q/k at int4 and v at int8 (as a GGUF file's Q4_K q/k beside a Q6_K v) do not fuse into one
    product; the layer still runs on the kernel, with the three products side by side, and equals
    the modules bit for bit."""
    path = save_hf(hf_model("qwen2", intermediate_size=256), tmp_path / "m")
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "off")
    model, _ = load_model(path, dtype="bfloat16", quantize="int4", progress=False, fast_kernels=False)
    int8, _ = load_model(path, dtype="bfloat16", quantize="int8", progress=False, fast_kernels=False)
    for layer, other in zip(model.model.layers, int8.model.layers, strict=True):
        layer.self_attn.v_proj = other.self_attn.v_proj
    fuse_for_inference(model)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj is None and {attn.q_proj.bits, attn.v_proj.bits} == {4, 8}
    assert all(layer.decode_weights is not None for layer in model.model.layers)
    _assert_kernel_path_equals_modules(model, 4)
    # served adapters on the three products: their updates stacked over q/k/v's outputs side by side
    _serve_adapters(model)
    assert type(attn.v_proj) is LoRAProjection
    _assert_kernel_path_equals_modules(model, 4, ADAPTER_ROWS)


# each row's served adapter: the base model, the first adapter or the second (PROMPTS' five rows)
ADAPTER_ROWS = [0, 1, 2, 1, 0]


def _serve_adapters(model) -> None:
    """Two random served adapters (every projection at rank 4; q, v and down at rank 3), then the layers'
    decode weights made again with their updates (as the loader does)."""
    g = torch.Generator().manual_seed(7)
    cfg = model.config
    kv = cfg.num_key_value_heads * cfg.head_dim
    shapes = {
        "self_attn.q_proj": (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim),
        "self_attn.k_proj": (cfg.hidden_size, kv),
        "self_attn.v_proj": (cfg.hidden_size, kv),
        "self_attn.o_proj": (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size),
        "mlp.gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }

    def pairs(rank: int, modules) -> dict[str, LoRAPair]:
        return {
            f"model.layers.{i}.{m}": LoRAPair(
                torch.randn(rank, shapes[m][0], generator=g) * 0.3,
                torch.randn(shapes[m][1], rank, generator=g) * 0.3,
                2.0 / rank,
            )
            for i in range(cfg.num_hidden_layers)
            for m in modules
        }

    serve_adapters(
        model,
        {"a": pairs(4, shapes), "b": pairs(3, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])},
    )
    plan_decode_layers(model)


@pytest.mark.parametrize(
    ("family", "quantize"), [("qwen2", None), ("qwen2", "int4"), ("qwen3", "int8"), ("llama", "int4")]
)
def test_decode_layer_with_served_adapters_equals_modules(tmp_path, monkeypatch, family, quantize) -> None:
    """Rows through different served adapters (and the base model) in one decode step: each layer is still
    one kernel call with the adapters' updates, bit for bit the modules' (``LoRAProjection``); a row of
    the base model gets exactly the logits it gets with no adapters loaded at all, and an adapter's rows
    differ from them."""
    model = hf_model(family, tie_word_embeddings=family == "qwen2", intermediate_size=256)
    path = save_hf(model, tmp_path / "m")
    base, _ = _steps(_load(path, quantize, monkeypatch), 4)
    model = _load(path, quantize, monkeypatch)
    _serve_adapters(model)
    assert all(layer.decode_weights is not None for layer in model.model.layers)
    adapted, _ = _steps(model, 4, adapters=ADAPTER_ROWS)
    first = adapted[0]
    for row, slot in enumerate(ADAPTER_ROWS):
        assert torch.equal(first[row], base[0][row]) == (slot == 0)
    calls = _count_layer_runs(monkeypatch)
    _assert_kernel_path_equals_modules(model, 4, ADAPTER_ROWS)
    assert calls == [model.config.num_hidden_layers] * 4


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's (and the kernels') thread count set to ``n`` within, the caller's again after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _row_groups(model, rows: int) -> int:
    """decode_row_groups for a run of all of ``model``'s layers (on small pools: the choice depends on
    the layers and the thread count only)."""
    cfg = model.config
    pool = torch.zeros(4, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.bfloat16)
    weights = [layer.decode_weights for layer in model.model.layers]
    return kernels.decode_row_groups(
        kernels.decode_run(weights, [pool] * len(weights), [pool] * len(weights)), rows
    )


@pytest.mark.parametrize(
    ("family", "served"), [("qwen2", False), ("qwen3", False), ("llama", False), ("qwen2", True)]
)
def test_a_step_of_sixteen_rows_in_two_row_groups_equals_the_modules(tmp_path, monkeypatch, family, served):
    """On two threads a 16-row decode step of small int4 layers goes through the layers as two groups of
    8 rows side by side (each group's ops on its own thread); the logits and K/V stay bit for bit the
    modules', and those of the same step on one thread (every op in one piece). ``served``: the rows run
    through two served adapters and the base model, each group with its own rows' adapters."""
    model = hf_model(family, tie_word_embeddings=family == "qwen2", intermediate_size=256)
    model = _load(save_hf(model, tmp_path / "m"), "int4", monkeypatch)
    adapters = None
    if served:
        _serve_adapters(model)
        adapters = [(i * 7) % 3 for i in range(16)]
    with _threads(2):
        assert [_row_groups(model, m) for m in (1, 8, 9, 16)] == [1, 1, 2, 2]
        grouped, grouped_cache = _steps(model, 4, PROMPTS16, TABLES16, adapters)
    with _threads(1):
        assert _row_groups(model, 16) == 1
        whole, whole_cache = _steps(model, 4, PROMPTS16, TABLES16, adapters)
    weights = [layer.decode_weights for layer in model.model.layers]
    for layer in model.model.layers:
        layer.decode_weights = None  # the module path
    plain, plain_cache = _steps(model, 4, PROMPTS16, TABLES16, adapters)
    for layer, w in zip(model.model.layers, weights, strict=True):
        layer.decode_weights = w
    used = _written_slots(4, PROMPTS16, TABLES16)
    for other, other_cache in ((whole, whole_cache), (plain, plain_cache)):
        assert all(torch.equal(a, b) for a, b in zip(grouped, other, strict=True))
        pools = zip(grouped_cache.k + grouped_cache.v, other_cache.k + other_cache.v, strict=True)
        assert all(torch.equal(a[used], b[used]) for a, b in pools)


@pytest.mark.parametrize(
    ("quantize", "sizes"),
    [
        ("int8", {}),
        (None, {}),
        ("int4", {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 1}),
    ],
)
def test_int8_bf16_and_larger_layers_keep_the_rows_together(tmp_path, monkeypatch, quantize, sizes):
    """Row groups only for small int4 layers: int8 and bf16 layers, and int4 ones of 12.6M multiply-adds
    a row (Qwen3-0.6B's width), ran slower split (each thread reads every weight)."""
    model = hf_model("qwen2", **{"intermediate_size": 256, **sizes})
    model = _load(save_hf(model, tmp_path / "m"), quantize, monkeypatch)
    with _threads(2):
        assert _row_groups(model, 16) == 1


def test_row_groups_decode_in_the_engines_driver_thread_as_alone(tmp_path, monkeypatch) -> None:
    """Sixteen requests decoding together give each one's tokens alone, with the engine stepped in the
    calling thread (OpenMP's threads) and in another thread, as ``chat`` and ``serve`` step it (the
    kernels' own workers), both under inference mode, which the second group's thread must take over."""
    path = save_hf(hf_model("qwen2", tie_word_embeddings=True, intermediate_size=256), tmp_path / "m")
    model = _load(path, "int4", monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = [run_engine(Engine(model, max_batch_size=1), [p], params)[0] for p in PROMPTS16]
    with _threads(2):
        assert _row_groups(model, 16) == 2
        together = run_engine(Engine(model, max_batch_size=16), PROMPTS16, params)
        in_thread: list[list[list[int]]] = []
        driver = threading.Thread(
            target=lambda: in_thread.append(run_engine(Engine(model, max_batch_size=16), PROMPTS16, params))
        )
        driver.start()
        driver.join()
    assert together == alone
    assert in_thread == [alone]


def test_an_error_in_the_second_row_group_reaches_the_caller(tmp_path, monkeypatch) -> None:
    """A bad slot in a row of the second group (run on the other thread) raises in the caller, with the
    message decode_layer gives for it."""
    model = _load(save_hf(hf_model("qwen2", intermediate_size=256), tmp_path / "m"), "int4", monkeypatch)
    cfg, layer = model.config, model.model.layers[0]
    pool = torch.zeros(32, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.bfloat16)
    run = kernels.decode_run([layer.decode_weights], [pool], [pool.clone()])
    x = torch.zeros(16, cfg.hidden_size, dtype=torch.bfloat16)
    slots = torch.arange(16)
    slots[12] = 99
    cos = torch.ones(1, 16, cfg.head_dim, dtype=torch.bfloat16)
    with _threads(2):
        assert kernels.decode_row_groups(run, 16) == 2
        with pytest.raises(RuntimeError, match="slot 99 outside the pool"):
            kernels.decode_layers(
                x, run, slots, torch.arange(16)[:, None], torch.zeros(16, dtype=torch.long), cos, cos
            )
