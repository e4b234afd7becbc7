"""Which layers of a decode step go to one ``kernels.decode_layers`` call (``transformer._decode_runs``):
runs of consecutive layers with decode weights, made once per model and cache and kept while the layers'
weights and the cache's pools stay the same objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qwenkit.model import transformer
from qwenkit.model.attention import DecodePools


@pytest.fixture
def made(monkeypatch) -> list[tuple[list, list, list]]:
    """Records each run the library is asked to make (weights, K pools, V pools)."""
    calls: list[tuple[list, list, list]] = []

    def decode_run(weights, k, v):
        calls.append((list(weights), list(k), list(v)))
        return SimpleNamespace(layers=len(weights), weights=list(weights))

    monkeypatch.setattr(transformer.kernels, "decode_run", decode_run)
    return calls


def layers(n: int, without_weights=()) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            decode_weights=None if i in without_weights else f"w{i}",
            self_attn=SimpleNamespace(layer_idx=i),
            mlp=SimpleNamespace(routed_tokens=None),  # a MoE block counting tokens holds a tensor here
        )
        for i in range(n)
    ]


def pools(n: int) -> DecodePools:
    step = torch.zeros(1, dtype=torch.long)
    return DecodePools([f"k{i}" for i in range(n)], [f"v{i}" for i in range(n)], step, step[None], step)


def shape(runs) -> dict[int, list[str]]:
    return {start: run.weights for start, run in runs.items()}


def test_all_layers_on_the_kernels_are_one_run(made):
    runs = transformer._decode_runs(nn.Module(), layers(4), pools(4))
    assert shape(runs) == {0: ["w0", "w1", "w2", "w3"]}
    assert made == [(["w0", "w1", "w2", "w3"], ["k0", "k1", "k2", "k3"], ["v0", "v1", "v2", "v3"])]


def test_a_layer_without_weights_splits_the_runs(made):
    runs = transformer._decode_runs(nn.Module(), layers(5, without_weights={1}), pools(5))
    assert shape(runs) == {0: ["w0"], 2: ["w2", "w3", "w4"]}
    assert [k for _, k, _ in made] == [["k0"], ["k2", "k3", "k4"]]
    assert transformer._decode_runs(nn.Module(), layers(3, without_weights={0, 1, 2}), pools(3)) == {}


def test_a_moe_layer_counting_its_routed_tokens_splits_the_runs_while_it_counts(made):
    model, stack, cache = nn.Module(), layers(3), pools(3)
    stack[1].mlp.routed_tokens = torch.zeros(4)  # count_routed_tokens: its modules count
    assert shape(transformer._decode_runs(model, stack, cache)) == {0: ["w0"], 2: ["w2"]}
    stack[1].mlp.routed_tokens = None
    assert shape(transformer._decode_runs(model, stack, cache)) == {0: ["w0", "w1", "w2"]}


def test_runs_are_kept_while_weights_and_pools_are_the_same_objects(made):
    model, stack, cache = nn.Module(), layers(3), pools(3)
    first = transformer._decode_runs(model, stack, cache)
    step = torch.ones(1, dtype=torch.long)  # another step: new slots, gather and positions, the same pools
    again = transformer._decode_runs(model, stack, DecodePools(cache.k, cache.v, step, step[None], step))
    assert again is first and len(made) == 1
    other = pools(3)  # another cache (equal, but not the same lists)
    assert transformer._decode_runs(model, stack, other) is not first and len(made) == 2
    other.k[2] = "k2 again"  # a pool replaced in the cache's own list
    assert transformer._decode_runs(model, stack, other) is not first and len(made) == 3
    assert made[-1][1] == ["k0", "k1", "k2 again"]
    made.pop()
    stack[1].decode_weights = "w1 again"  # a layer's weights replaced
    runs = transformer._decode_runs(model, stack, other)
    assert shape(runs) == {0: ["w0", "w1 again", "w2"]} and len(made) == 3
    assert transformer._decode_runs(nn.Module(), stack, other) is not runs  # another model: its own


def test_only_routing_layers_are_looked_into_and_their_adapters_split_the_runs(made):
    """A dense layer's feed-forward has no routing state: a step that keeps the runs reads only its decode
    weights. A MoE layer whose routed experts serve an adapter of this step's tokens runs its
    modules for that step."""
    asked: list[str] = []

    class Dense:  # a feed-forward without routing state that records what it is asked for
        def __getattr__(self, name):
            asked.append(name)
            raise AttributeError(name)

    stack = layers(4)
    for i in (0, 1, 3):
        stack[i].mlp = Dense()
    stack[2].mlp.expert_adapters = (1,)  # layer 2 routes; its experts serve adapter slot 1
    model = nn.Module()
    model.adapters = SimpleNamespace(used=frozenset())
    cache = pools(4)
    first = transformer._decode_runs(model, stack, cache)
    assert shape(first) == {0: ["w0", "w1", "w2", "w3"]}
    asked.clear()
    assert transformer._decode_runs(model, stack, cache) is first
    assert asked == []  # a step keeping the runs did not look into the dense layers' feed-forwards
    model.adapters.used = frozenset({1})  # this step's tokens use adapter 1: layer 2 runs its modules
    assert shape(transformer._decode_runs(model, stack, cache)) == {0: ["w0", "w1"], 3: ["w3"]}
    model.adapters.used = frozenset({2})  # an adapter its experts do not serve
    assert shape(transformer._decode_runs(model, stack, cache)) == {0: ["w0", "w1", "w2", "w3"]}
