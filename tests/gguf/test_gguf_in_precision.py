"""GGUF files run in their own precision: the bundled SmolLM2 (Q4_1 layers, Q8_0 token embedding) loads as
int4/int8 kernels with no float copy, and computes what its dequantized float load computes, within the
kernels' tolerance (bfloat16 activations and scales); greedy answers agree except where the float
model's top two logits are closer than that tolerance allows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from factories import hf_model, v1_state_dict
from torch import nn

from qwenkit.checkpoint import load_model
from qwenkit.engine.forward import ForwardCall, run_forward
from qwenkit.engine.kv_cache import PagedKVCache
from qwenkit.generate import tokenizer_for
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.embedding import QuantizedEmbedding
from qwenkit.quant.kernels import choose_kernel

# Max |logit difference| the int4/int8 CPU kernels may add on SmolLM2 (logits of magnitude ~30).
# Kernels with bfloat16 activations and scales (2^-8 relative): measured 0.60 over these prompts. Kernels
# that also round activations to int8 per block of 32 (the AVX-512 VNNI ones, as llama.cpp does):
# measured 1.83.
FLOAT_ACTIVATION_TOLERANCE, INT8_ACTIVATION_TOLERANCE = 1.0, 2.5
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Name three primary colors.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def in_precision(smollm_path):
    model, _ = load_model(smollm_path, dtype="float32", progress=False)
    return model


@pytest.fixture(scope="module")
def dequantized(smollm_path):
    model, _ = load_model(smollm_path, dtype="float32", progress=False, dequantize=True)
    return model


def test_layers_run_the_files_codes(in_precision, dequantized) -> None:
    layers = {n: m for n, m in in_precision.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 30 * 7 + 1  # every projection and the (tied) lm_head
    assert not [n for n, m in in_precision.named_modules() if type(m) is nn.Linear]
    assert {m.bits for n, m in layers.items() if n.startswith("model.layers.")} == {4}  # Q4_1
    assert in_precision.lm_head.bits == 8  # Q8_0
    # the head on the kernel a Q8_0 layer gets (int8 activations where the CPU kernels run, as llama.cpp)
    assert in_precision.lm_head.impl.key == choose_kernel(8, 32, 576, 49152, torch.device("cpu"))
    emb = in_precision.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and emb.source is in_precision.lm_head  # one copy, tied
    ids = torch.tensor([0, 1, 2, 100, 49151])
    # Q8_0 rows through the kernel's bfloat16 scales: within 2^-8 of the float rows
    want = dequantized.model.embed_tokens(ids)
    torch.testing.assert_close(emb(ids), want, rtol=2**-8, atol=1e-6)
    size = sum(b.numel() * b.element_size() for b in in_precision.buffers())
    size += sum(p.numel() * p.element_size() for p in in_precision.parameters())
    floats = sum(p.numel() * p.element_size() for p in dequantized.parameters())
    assert size < floats / 4  # float32: 513 MiB; codes: ~97 MiB


def test_memory_check_counts_the_codes(smollm, in_precision) -> None:
    size = sum(b.numel() * b.element_size() for b in in_precision.buffers())
    size += sum(p.numel() * p.element_size() for p in in_precision.parameters())
    estimate = smollm.runtime_bytes(4, keep_quantized=True)
    assert 0.8 * size < estimate < 1.3 * size
    assert smollm.runtime_bytes(4, keep_quantized=False) > 4 * estimate  # the float32 load it replaces


def cached_decoder(model: nn.Module, length: int) -> Callable[[list[int]], torch.Tensor]:
    """Feed a sequence's new tokens through ``model`` with a KV cache of ``length`` positions through the
    engine's forward call (a prompt in one chunk, then one token a step); returns the last logits."""
    cfg, block = model.config, 16
    blocks = -(-length // block)
    cache = PagedKVCache(
        cfg.num_hidden_layers, blocks, block, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu"
    )
    table, done = list(range(blocks)), 0

    def feed(ids: list[int]) -> torch.Tensor:
        nonlocal done
        n = len(ids)
        rows = ([(table, done)], []) if n == 1 else ([], [(table, done, n)])
        call = ForwardCall(ids, list(range(done, done + n)), None, [n - 1], *rows)
        with torch.no_grad():
            logits = run_forward(model, cache, call)
        done += n
        return logits[0]

    return feed


@pytest.mark.slow
def test_logits_and_greedy_answers_match_the_dequantized_model(smollm, in_precision, dequantized) -> None:
    tokenizer = tokenizer_for(smollm)
    worst, flips = 0.0, []
    for text in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        answers: dict[str, list[int]] = {"q": [], "f": []}
        feed_q = cached_decoder(in_precision, len(ids) + NEW_TOKENS)
        feed_f = cached_decoder(dequantized, len(ids) + NEW_TOKENS)
        q, f = feed_q(ids), feed_f(ids)
        for step in range(NEW_TOKENS):
            if step:
                q, f = feed_q(answers["q"][-1:]), feed_f(answers["f"][-1:])
            if answers["q"] == answers["f"]:  # same prefix: the logits must agree
                worst = max(worst, float((q - f).abs().max()))
                top2 = f.topk(2).values
                if int(q.argmax()) != int(f.argmax()):
                    flips.append((text, step, float(top2[0] - top2[1])))
            answers["q"].append(int(q.argmax()))
            answers["f"].append(int(f.argmax()))
    kernels = {m.impl.key for m in in_precision.modules() if isinstance(m, QuantizedLinear)}
    int8_rounded = kernels & {"avx512_int8", "avx512_int4"}  # kernels that round activations to int8
    tolerance = INT8_ACTIVATION_TOLERANCE if int8_rounded else FLOAT_ACTIVATION_TOLERANCE
    print(f"\nkernels {sorted(kernels)}; max |logit diff| {worst:.3f}; answers that differ: {len(flips)} of")
    print(f"{len(PROMPTS)} {flips}")
    assert worst <= tolerance
    for text, step, margin in flips:  # a flip only where the float model's top two are that close
        assert margin <= 2 * tolerance, (text, step, margin)


def test_dequantize_loads_floats(dequantized) -> None:
    assert type(dequantized.lm_head) is nn.Linear and type(dequantized.model.embed_tokens) is nn.Embedding
    assert dequantized.lm_head.weight is dequantized.model.embed_tokens.weight


V1 = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 2 * 160, "num_hidden_layers": 2,
      "num_attention_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
      "rope_theta": 10000.0}  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_row_permutation_and_fused_qkv_split_apply_to_codes(tmp_path, gguf_writer, arch) -> None:
    """llama's permuted q/k rows and Qwen v1's fused QKV are undone on the codes as on floats: every
    in-precision layer holds the dequantized model's weight (up to the kernels' bfloat16 scales)."""
    from gguf import GGMLQuantizationType as Q

    if arch == "llama":
        model = hf_model("llama")
        config, state = model.config.to_dict(), model.state_dict()
    else:
        config, state = V1 | {"intermediate_size": 160}, v1_state_dict(V1)
    path = gguf_writer(tmp_path / f"{arch}.gguf", arch, config, state, Q.Q8_0)
    q, _ = load_model(path, dtype="float32", progress=False)
    f, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    checked = 0
    for name, layer in q.named_modules():
        if isinstance(layer, QuantizedLinear):  # the untied embedding's codes are its "source" layer
            want = f.get_submodule(name.removesuffix(".source")).weight
            torch.testing.assert_close(layer.dequantize_packed(torch.float32), want, rtol=2**-8, atol=1e-6)
            checked += 1
    assert checked == 2 * 7 + 2  # projections, lm_head, token embedding
    ids = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(q(ids), f(ids), rtol=0.02, atol=0.02)


def test_profile_names_the_kernels_of_a_gguf_in_its_own_precision(tmp_path, gguf_writer) -> None:
    from gguf import GGMLQuantizationType as Q

    from qwenkit.profile import profile

    model = hf_model("qwen2", hidden_size=128, intermediate_size=256)  # untied: output.weight in the file
    path = gguf_writer(tmp_path / "q4.gguf", "qwen2", model.config.to_dict(), model.state_dict(), Q.Q4_0)
    own, floats = profile(path, ["checkpoint", "float32"], generate=4, encode=8)
    assert own.precision == "gguf Q4_0"
    # projections, lm_head and the token embedding's own codes (all Q4_0), each on a registered kernel:
    # the head and embedding on the one the projections run
    from qwenkit.quant.kernels import KERNELS

    assert sum(own.kernels.values()) == 2 * 7 + 2
    assert set(own.kernels) <= {k.description for k in KERNELS}
    assert len(own.kernels) == 1, own.kernels
    assert floats.kernels == {"dense F.linear (float32)": 2 * 7 + 1}  # --precisions float32: floats
    assert own.weight_bytes < floats.weight_bytes / 4
