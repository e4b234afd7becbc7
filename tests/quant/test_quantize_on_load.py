"""``--quantize`` rounds each layer as its weight arrives: the result is exactly the old load-then-quantize
model (bit-exact logits), and no float projection is left behind."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf
from torch import nn

from qwenkit.checkpoint import load_model, open_checkpoint
from qwenkit.quant import QuantizedLinear, on_load, quantize_for_runtime
from qwenkit.quant.embedding import QuantizedEmbedding

IDS = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path_factory):
    tied = request.param
    return save_hf(hf_model("qwen2", tie_word_embeddings=tied), tmp_path_factory.mktemp("m") / "qwen2")


@pytest.mark.parametrize(
    ("quantize", "dtype"), [("int8", "float32"), ("int4", "float32"), ("int4", "bfloat16")]
)
def test_quantized_on_load_equals_load_then_quantize(model_dir, quantize, dtype, monkeypatch) -> None:
    monkeypatch.setattr(on_load, "ROW_BLOCK_ELEMENTS", 64 * 100)  # several row blocks per matrix
    old, _ = load_model(model_dir, dtype=dtype, progress=False)
    quantize_for_runtime(old, quantize)
    new, config = load_model(model_dir, dtype=dtype, quantize=quantize, progress=False)

    kinds = {n: type(m) for n, m in new.named_modules()}
    assert kinds == {n: type(m) for n, m in old.named_modules()}
    assert not [n for n, m in new.named_modules() if type(m) is nn.Linear]
    assert isinstance(new.model.embed_tokens, QuantizedEmbedding) == config.tie_word_embeddings
    assert new.lm_head.bits == 8 and new.model.layers[0].mlp.up_proj.bits == int(quantize[-1])
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(new(IDS), old(IDS))


class Reversed:
    """A checkpoint that yields its tensors in reverse order: every weight before its bias."""

    def __init__(self, path) -> None:
        self.inner = open_checkpoint(path)
        self.path, self.hf_config = self.inner.path, self.inner.hf_config

    def tensors(self, keep_quantized: bool = False):
        return reversed(list(self.inner.tensors(keep_quantized)))

    @property
    def total_bytes(self) -> int:
        return self.inner.total_bytes


def test_bias_arriving_after_its_weight_lands_on_the_quantized_layer(model_dir) -> None:
    """qwen2's q/k/v biases reach the quantized layer whether they come before (safetensors' sorted
    order) or after their weight."""
    forward, _ = load_model(model_dir, dtype="float32", quantize="int8", progress=False)
    backward, _ = load_model(Reversed(model_dir), dtype="float32", quantize="int8", progress=False)
    ref = hf_model("qwen2").model.layers[1].self_attn.q_proj.bias.detach()
    for model in (forward, backward):
        q = model.model.layers[1].self_attn.q_proj
        assert isinstance(q, QuantizedLinear) and torch.equal(q.bias, ref)
    with torch.no_grad():
        assert torch.equal(forward(IDS), backward(IDS))


def test_released_pages_of_a_file_mapping_read_back_from_the_file(tmp_path) -> None:
    """release_pages only drops residency: a memory-mapped weight reads the same afterwards, and the
    bytes around a released range (shared pages included) are untouched."""
    import numpy as np

    from qwenkit.checkpoint.files import release_pages

    data = np.random.default_rng(0).standard_normal(3 * 4096, dtype=np.float32)
    path = tmp_path / "w.bin"
    data.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
    assert torch.equal(mapped, torch.from_numpy(data))  # every page touched
    middle = mapped[1000:9000]  # spans whole pages and parts of two more
    release_pages(middle.data_ptr(), middle.nbytes)
    assert torch.equal(mapped, torch.from_numpy(data))

    private = torch.arange(3 * 4096, dtype=torch.float32)  # anonymous memory: released pages read 0
    release_pages(private[1000:9000].data_ptr(), private[1000:9000].nbytes)
    outside = torch.cat([private[:1000], private[9000:]])  # whatever the pages, nothing outside changes
    assert torch.equal(outside, torch.cat([torch.arange(1000.0), torch.arange(9000.0, 3 * 4096)]))


def test_memory_check_sizes_the_quantized_model(model_dir, monkeypatch) -> None:
    """The check before loading counts what will be resident: the int4 model, not the float one."""
    from qwenkit.checkpoint import loader

    needs: list[int] = []
    real = loader.check_fits

    def spy(*args, **kwargs):
        needs.append(real(*args, **kwargs))
        return needs[-1]

    monkeypatch.setattr(loader, "check_fits", spy)
    load_model(model_dir, dtype="float32", progress=False)
    load_model(model_dir, dtype="float32", quantize="int4", progress=False)
    as_float, as_int4 = needs
    assert as_int4 < as_float * 0.6


@pytest.mark.parametrize(("bits", "world"), [(8, 2), (8, 4), (4, 2), (4, 4)])
def test_a_column_share_dequantizes_to_exactly_those_columns_of_the_whole(bits, world):
    """A tensor-parallel rank's row-parallel layer: the whole weight rounded, then split by input columns
    with its groups' scales (int8: one group a row; int4: groups of 128 over 512 inputs)."""
    torch.manual_seed(0)
    whole = on_load.round_in_row_blocks(torch.randn(48, 512), bits)
    full = whole.dequantize()
    cols = 512 // world
    parts = [on_load.column_share(whole, r * cols, (r + 1) * cols) for r in range(world)]
    assert torch.equal(torch.cat([p.dequantize() for p in parts], dim=1), full)
    assert all(p.in_features == 512 // world and p.qweight.is_contiguous() for p in parts)


def test_a_column_share_whose_groups_straddle_two_ranks_is_refused():
    """int4's groups of 128 over 384 inputs cut by 2 ranks (192 each): no whole groups, no share."""
    whole = on_load.round_in_row_blocks(torch.randn(32, 384), 4)
    assert whole.scales.shape[0] == 3 and on_load.column_share(whole, 0, 192) is None
    assert on_load.column_share(whole, 0, 128) is not None  # 3 ranks, 128 a rank: whole groups
