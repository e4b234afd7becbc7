"""Runtime ``--quantize``: lm_head is quantized too, and a tied embedding reads the same packed codes."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf
from torch import nn

from qwenkit.checkpoint import load_model
from qwenkit.config import ModelConfig
from qwenkit.memory import weight_bytes
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.embedding import QuantizedEmbedding
from qwenkit.quant.rtn import quantize_weight_rtn


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return save_hf(hf_model("qwen2", tie_word_embeddings=True), tmp_path_factory.mktemp("tied") / "m")


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return save_hf(hf_model("qwen2", tie_word_embeddings=False), tmp_path_factory.mktemp("untied") / "m")


IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_tied_embedding_is_the_quantized_lm_head(tied_dir, quantize: str) -> None:
    model, _ = load_model(tied_dir, dtype="float32", quantize=quantize, progress=False)
    assert isinstance(model.lm_head, QuantizedLinear)
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and emb.source is model.lm_head
    # one copy: no float (vocab, hidden) tensor is left anywhere in the model
    assert not [n for n, t in model.state_dict().items() if t.is_floating_point() and t.shape == (512, 64)]
    ids = torch.tensor([0, 1, 31, 32, 63, 64, 100, 511, 32])
    want = model.lm_head.dequantize_packed(torch.float32)[ids]
    assert torch.equal(emb(ids), want)
    assert emb(IDS).shape == (2, 24, 64) and emb(IDS).dtype == torch.float32


@pytest.mark.parametrize(
    ("bits", "gs", "kernel"),
    [
        (8, -1, "cpu_int8pack"),
        (4, 32, "cpu_int4pack"),
        (8, 64, "cpu_int8_as_int4x2"),
        (4, 16, "dequant"),
        (8, 64, "dequant"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows_equal_dequantized_rows(bits: int, gs: int, kernel: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(192, 128) * 0.05
    layer = QuantizedLinear.from_int(quantize_weight_rtn(w, bits, gs, sym=False), kernel=kernel)
    emb = QuantizedEmbedding(layer, dtype)
    ids = torch.tensor([[5, 0, 191], [64, 127, 5]])
    assert torch.equal(emb(ids), layer.dequantize_packed(dtype)[ids])


def test_int8_logits_close_to_float_int4_coarser(tied_dir) -> None:
    ref, _ = load_model(tied_dir, dtype="float32", progress=False)
    with torch.no_grad():
        want = ref(IDS)
        errs = {}
        for q in ("int8", "int4"):
            model, _ = load_model(tied_dir, dtype="float32", quantize=q, progress=False)
            errs[q] = float((model(IDS) - want).norm() / want.norm())
    assert errs["int8"] < 0.02, errs  # bf16 activations in the int kernels dominate
    assert errs["int8"] < errs["int4"] < 0.3, errs


def test_untied_lm_head_quantized_embedding_float(untied_dir) -> None:
    model, _ = load_model(untied_dir, dtype="float32", quantize="int4", progress=False)
    assert isinstance(model.lm_head, QuantizedLinear)
    assert type(model.model.embed_tokens) is nn.Embedding


def test_engine_runs_bfloat16_quantized(tied_dir) -> None:
    from qwenkit.engine import Engine, SamplingParams

    model, _ = load_model(tied_dir, dtype="bfloat16", quantize="int4", progress=False)
    engine = Engine(model, max_batch_size=2)
    assert engine.dtype == torch.bfloat16
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    out = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.new_token_ids]
    assert len(out) == 4


QWEN25_05B = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
}


def test_memory_estimate_counts_tied_embedding_once() -> None:
    cfg = ModelConfig.from_hf(QWEN25_05B)
    bf16 = weight_bytes(cfg, torch.bfloat16)
    # int4 layers + one int8 copy of the tied head/embedding: ~35% of bf16 (llama.cpp likewise keeps its
    # output tensor at 6 bits); an int4 head would be 28%, at a large quality cost.
    head = cfg.vocab_size * cfg.hidden_size
    assert 0.33 * bf16 < weight_bytes(cfg, torch.bfloat16, "int4") < 0.37 * bf16
    assert weight_bytes(cfg, torch.bfloat16, "int4") < bf16 - head * 2 + head  # the head is stored once
    assert weight_bytes(cfg, torch.bfloat16, "int8") <= 0.55 * bf16
