"""Which layers of a decode step go to one ``kernels.decode_layers`` call (``transformer._decode_runs``):
runs of consecutive layers with decode weights and a pool, sharing the step's slots, gather and positions."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qwenkit.model.transformer import _decode_runs


class Cache:
    """Hands out a pool per layer: the same step tensors, except where a layer is given its own."""

    def __init__(self, none_for=(), own_gather_for=()) -> None:
        self.step = (torch.zeros(1), torch.zeros(1, 4), torch.zeros(1))
        self.none_for, self.own_gather_for = set(none_for), set(own_gather_for)

    def decode_pool(self, layer: int):
        if layer in self.none_for:
            return None
        slots, gather, positions = self.step
        if layer in self.own_gather_for:
            gather = gather.clone()
        return (f"k{layer}", f"v{layer}", slots, gather, positions)


def layers(n: int, without_weights=()) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            decode_weights=None if i in without_weights else f"w{i}", self_attn=SimpleNamespace(layer_idx=i)
        )
        for i in range(n)
    ]


def shape(runs) -> dict[int, list[str]]:
    return {start: weights for start, (weights, _) in runs.items()}


def test_all_layers_on_the_kernels_are_one_run():
    runs = _decode_runs(layers(4), Cache())
    assert shape(runs) == {0: ["w0", "w1", "w2", "w3"]}
    assert [p[0] for p in runs[0][1]] == ["k0", "k1", "k2", "k3"]


def test_a_layer_without_weights_or_pool_splits_the_runs():
    assert shape(_decode_runs(layers(5, without_weights={1}), Cache())) == {0: ["w0"], 2: ["w2", "w3", "w4"]}
    assert shape(_decode_runs(layers(5), Cache(none_for={3}))) == {0: ["w0", "w1", "w2"], 4: ["w4"]}
    assert _decode_runs(layers(3, without_weights={0, 1, 2}), Cache()) == {}


def test_a_pool_with_other_step_tensors_starts_a_new_run():
    assert shape(_decode_runs(layers(4), Cache(own_gather_for={2}))) == {
        0: ["w0", "w1"],
        2: ["w2"],
        3: ["w3"],
    }
