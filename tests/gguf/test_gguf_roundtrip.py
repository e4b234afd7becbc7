"""Small models written as GGUF (llama.cpp's names and layout) read back to the original tensors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from factories import hf_model, v1_state_dict
from gguf.quants import dequantize, quantize
from gguf_files import CHAT_TEMPLATE, Q, llama_cpp_rope_freqs, tiny_vocab

from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.gguf import GGUFError, read_gguf
from qwenkit.checkpoint.gguf_config import llama3_from_rope_freqs
from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf

VOCAB = len(tiny_vocab()[0])


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _q8_0_bound(w: torch.Tensor) -> torch.Tensor:
    """Q8_0's worst error per element: half a step of its block scale (amax/127), plus the scale's f16
    rounding over 127 steps."""
    blocks = w.reshape(-1, 32)
    step = blocks.abs().amax(dim=1, keepdim=True) / 127
    return (step * (0.5 + 127 * 2.0**-11) + 1e-12).expand_as(blocks).reshape(w.shape)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=["f16", "q8_0"])
def test_gguf_qwen2_roundtrip(tmp_path, gguf_writer, qtype) -> None:
    model = hf_model("qwen2", vocab_size=VOCAB)
    original = _params(model)
    assert any(n.endswith("q_proj.bias") for n in original)
    path = gguf_writer(tmp_path / "tiny.gguf", "qwen2", model.config.to_dict(), original, qtype)
    ckpt = read_gguf(path)

    got = dict(ckpt.tensors())
    assert set(got) == set(original)
    for name, w in original.items():
        t = got[name]
        assert t.dtype == torch.float32 and t.shape == w.shape, name
        if w.ndim == 1:  # norms and biases stay F32 in a GGUF
            assert torch.equal(t, w), name
        elif qtype == Q.F16:
            assert torch.equal(t, w.half().float()), name
        else:
            assert (t - w).abs().le(_q8_0_bound(w)).all(), name
            exact = dequantize(quantize(w.numpy(), Q.Q8_0), Q.Q8_0)
            assert torch.equal(t, torch.from_numpy(exact)), name

    cfg = ckpt.hf_config
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    expected = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):  # fmt: skip
        assert cfg[key] == getattr(expected, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(expected.rms_norm_eps, rel=1e-6)  # stored as float32
    assert cfg["rope_theta"] == 10000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 2, 0)
    assert ckpt.license == "apache-2.0"
    assert ckpt.chat_template == CHAT_TEMPLATE

    # The loaded model computes the original's function: exactly its f16-rounded weights for F16,
    # within Q8_0's rounding for Q8_0.
    ours, _ = load_model(path, dtype="float32", progress=False)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        if qtype == Q.F16:
            model.load_state_dict({n: w.half().float() if w.ndim > 1 else w for n, w in original.items()})
            ref = model(ids).logits
        got_logits = ours(ids)
    tolerance = 1e-4 if qtype == Q.F16 else 2e-2 * ref.abs().max().item()
    assert (got_logits - ref).abs().max().item() < tolerance


def test_gguf_qwen2_matches_transformers_gguf_import(tmp_path, gguf_writer) -> None:
    """transformers reading our written file agrees with us on weights, config and tokenizer."""
    import transformers

    model = hf_model("qwen2", vocab_size=VOCAB)
    path = gguf_writer(tmp_path / "tiny.gguf", "qwen2", model.config.to_dict(), _params(model), Q.Q8_0)
    ckpt = read_gguf(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    params = dict(theirs.named_parameters())
    for name, t in ckpt.tensors():
        assert torch.equal(t, params[name]), name
    for key in (
        "vocab_size",
        "intermediate_size",
        "num_key_value_heads",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert ckpt.hf_config[key] == getattr(theirs.config, key), key

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the thin cat in a hat", " the<|im_end|>x <think> 12345 你好", "\n\n  a  "]:
        assert ckpt.tokenizer.encode(text).ids == hf_tok(text)["input_ids"], text
    assert ckpt.tokenizer_config["eos_token"] == hf_tok.eos_token == "<|im_end|>"
    assert ckpt.tokenizer_config["added_tokens_decoder"][str(VOCAB - 1)] == {
        "content": "<think>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": False,
    }  # fmt: skip


def test_gguf_qwen3_roundtrip(tmp_path, gguf_writer) -> None:
    """q/k norms map back, and head_dim (not hidden/heads for Qwen3) comes from the file."""
    model = hf_model("qwen3", vocab_size=VOCAB, tie_word_embeddings=True)
    original = _params(model)
    assert "lm_head.weight" not in original and "model.layers.0.self_attn.q_norm.weight" in original
    path = gguf_writer(tmp_path / "q3.gguf", "qwen3", model.config.to_dict(), original, Q.F32)
    ckpt = read_gguf(path)
    got = dict(ckpt.tensors())
    assert set(got) == set(original)
    assert all(torch.equal(got[n], w) for n, w in original.items())
    cfg = ckpt.hf_config
    assert (
        cfg["model_type"] == "qwen3"
        and cfg["head_dim"] == 32 != cfg["hidden_size"] // cfg["num_attention_heads"]
    )
    assert cfg["tie_word_embeddings"] is True and cfg["attention_bias"] is False


def test_gguf_llama_unpermutes_q_and_k(tmp_path, gguf_writer) -> None:
    """llama.cpp permutes llama's q/k rows (GQA: k by the kv-head count); reading undoes it exactly."""
    model = hf_model("llama", vocab_size=VOCAB)
    original = _params(model)
    path = gguf_writer(tmp_path / "llama.gguf", "llama", model.config.to_dict(), original, Q.F32)
    raw = gguf.GGUFReader(path)
    stored_q = next(t for t in raw.tensors if t.name == "blk.0.attn_q.weight").data
    assert not np.array_equal(stored_q, original["model.layers.0.self_attn.q_proj.weight"].numpy())
    got = dict(read_gguf(path).tensors())
    assert set(got) == set(original)
    for name, w in original.items():
        assert torch.equal(got[name], w), name


def test_gguf_llama_linear_rope_scaling_runs_as_its_source(tmp_path, gguf_writer) -> None:
    """llama.cpp writes linear rope scaling as rope.scaling.type/factor (positions times 1/factor, the
    same rotation as transformers' linear type); qwenkit refused the type."""
    model = hf_model("llama", vocab_size=VOCAB, rope_scaling={"rope_type": "linear", "factor": 4.0})

    def linear(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    config = model.config.to_dict()
    path = gguf_writer(tmp_path / "linear.gguf", "llama", config, _params(model), Q.F32, extra=linear)
    ours, cfg = load_model(path, dtype="float32", progress=False)
    assert cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 4.0
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids) - model(ids).logits).abs().max().item() < 1e-4


def test_gguf_llama3_rope_freqs_run_as_the_source_and_convert_back(tmp_path, gguf_writer) -> None:
    """A Llama 3.1/3.2 GGUF carries its rope scaling only as rope_freqs.weight; it was refused. Read back
    as the llama3 rope_scaling giving the same frequencies, it runs as the source transformers model past
    the original window, and a directory converted from it carries a config transformers reads."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 512
    model = hf_model(
        "llama", vocab_size=VOCAB, hidden_size=128, max_position_embeddings=1024, rope_scaling=dict(scaling)
    )
    freqs = llama_cpp_rope_freqs(10000.0, 32, 8.0, 1.0, 4.0, 512)
    assert ((freqs > 1) & (freqs < 8)).sum() == 2  # two frequencies in the blend: the fewest that fix it

    def rope_freqs(w: gguf.GGUFWriter) -> None:
        w.add_tensor("rope_freqs.weight", freqs)

    config = model.config.to_dict()
    path = gguf_writer(tmp_path / "l3.gguf", "llama", config, _params(model), Q.F32, extra=rope_freqs)
    ours, cfg = load_model(path, dtype="float32", progress=False)
    assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor, cfg.rope_scaling.low_freq_factor) == (
        "llama3",
        8.0,
        1.0,
    )
    assert (cfg.rope_scaling.high_freq_factor, cfg.rope_scaling.original_max_position_embeddings) == (
        4.0,
        512,
    )
    ids = torch.randint(0, VOCAB, (1, 700), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(ids) - model(ids).logits).abs().max().item() < 1e-4
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert {k: written[k] for k in scaling} == scaling
    assert "model.rope_freqs.weight" not in read_gguf(path).tensor_names()
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (converted(ids).logits - model(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("head_dim", "factor", "original"),
    [(64, 32.0, 8192), (128, 8.0, 8192), (128, 16.0, 4096)],
    ids=["llama-3.2-1b", "llama-3.1-8b", "other"],
)
def test_llama3_scaling_comes_back_exactly_from_real_sized_rope_freqs(head_dim, factor, original):
    """At Llama 3.x's own sizes (rope_theta 500000) the parameters come back exactly, as integers and the
    factors Meta's configs give."""
    freqs = llama_cpp_rope_freqs(500000.0, head_dim, factor, 1.0, 4.0, original)
    assert llama3_from_rope_freqs(freqs, 500000.0, head_dim) == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }
    assert llama3_from_rope_freqs(np.ones(head_dim // 2, np.float32), 500000.0, head_dim) is None


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ([1, 1, 1, 1, 1, 1, 1, 8, 8, 8, 8, 8, 8, 8, 8, 8], "needs two frequencies between"),
        ([1, 1, 1, 1, 1, 1, 2, 3, 4, 8, 8, 8, 8, 8, 8, 8], "does not follow Llama 3's rope scaling"),
        ([1, 1, 1, 1, 1, 1, 1, 1], "has 8 values; a head size of 32 needs 16"),
        ([1, 1, 1, 1, 1, 1, 1, 0.5, 8, 8, 8, 8, 8, 8, 8, 8], "values below 1"),
    ],
    ids=["no-band", "not-llama3", "wrong-size", "below-one"],
)
def test_gguf_rope_freqs_that_are_not_llama3_scaling_are_refused_by_name(
    tmp_path, gguf_writer, values, words
):
    model = hf_model("llama", vocab_size=VOCAB, hidden_size=128)

    def rope_freqs(w: gguf.GGUFWriter) -> None:
        w.add_tensor("rope_freqs.weight", np.array(values, np.float32))

    path = gguf_writer(
        tmp_path / "bad.gguf", "llama", model.config.to_dict(), _params(model), Q.F32, extra=rope_freqs
    )
    with pytest.raises(GGUFError, match="rope_freqs.weight") as e:
        load_model(path, dtype="float32", progress=False)
    assert words in str(e.value) and str(path) in str(e.value)


def test_gguf_qwen_v1_splits_fused_qkv(tmp_path, gguf_writer) -> None:
    """Qwen v1 (arch "qwen") becomes a qwen2 checkpoint: c_attn split on dim 0, w2 is the gate."""
    cfg = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 2 * 160, "num_hidden_layers": 2,
           "num_attention_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0}  # fmt: skip
    v1 = v1_state_dict(cfg)
    path = gguf_writer(tmp_path / "v1.gguf", "qwen", cfg | {"intermediate_size": 160}, v1, Q.F32)
    ckpt = read_gguf(path)
    got = dict(ckpt.tensors())
    h = 64
    qkv_w, qkv_b = v1["transformer.h.1.attn.c_attn.weight"], v1["transformer.h.1.attn.c_attn.bias"]
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(got[f"model.layers.1.self_attn.{proj}.weight"], qkv_w[i * h : (i + 1) * h])
        assert torch.equal(got[f"model.layers.1.self_attn.{proj}.bias"], qkv_b[i * h : (i + 1) * h])
    assert torch.equal(got["model.layers.0.mlp.gate_proj.weight"], v1["transformer.h.0.mlp.w2.weight"])
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], v1["transformer.h.0.mlp.w1.weight"])
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight"], v1["transformer.h.0.mlp.c_proj.weight"])
    assert torch.equal(
        got["model.layers.0.self_attn.o_proj.weight"], v1["transformer.h.0.attn.c_proj.weight"]
    )
    assert torch.equal(got["lm_head.weight"], v1["lm_head.weight"])
    assert sorted(ckpt.tensor_names()) == sorted(got)
    c = ckpt.hf_config
    assert (c["model_type"], c["intermediate_size"], c["num_key_value_heads"]) == ("qwen2", 160, 4)
    assert c["tie_word_embeddings"] is False


@pytest.mark.parametrize(
    "qtype",
    [Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K],
    ids=lambda q: q.name,
)
def test_gguf_decodes_each_supported_type(tmp_path, gguf_writer, qtype) -> None:
    """Every supported type decodes through gguf-py to the right shape and values, in HF names.

    Types gguf-py can encode are encoded from real weights; K-quants (decode-only in gguf-py) are
    random blocks, compared against gguf-py decoding the same bytes.
    """
    model = hf_model("qwen2", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    original = _params(model)
    rng = np.random.default_rng(0)
    raw: dict[str, np.ndarray] = {}

    def k_quant_blocks(writer: gguf.GGUFWriter) -> None:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        name = "blk.0.ffn_down.weight"
        rows, cols = original["model.layers.0.mlp.down_proj.weight"].shape
        # Bytes below 0x7C can never form an f16 exponent of all ones, so every scale is finite.
        data = rng.integers(0, 0x7C, size=(rows, cols // block * size), dtype=np.uint8)
        raw[name] = data
        writer.add_tensor(name, data, raw_dtype=qtype)

    k_quant = qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
    state = {n: w for n, w in original.items() if not (k_quant and n.endswith("down_proj.weight"))}
    path = gguf_writer(tmp_path / "t.gguf", "qwen2", model.config.to_dict(), state,
                       Q.F16 if k_quant else qtype, extra=k_quant_blocks if k_quant else None)  # fmt: skip
    ckpt = read_gguf(path)
    assert ckpt.tensor_types["blk.0.ffn_down.weight"] == qtype.name
    got = dict(ckpt.tensors())
    w = original["model.layers.0.mlp.down_proj.weight"]
    t = got["model.layers.0.mlp.down_proj.weight"]
    assert t.shape == w.shape and t.dtype == torch.float32
    if k_quant:
        assert torch.equal(t, torch.from_numpy(dequantize(raw["blk.0.ffn_down.weight"], qtype)))
    else:
        assert torch.equal(t, torch.from_numpy(dequantize(quantize(w.numpy(), qtype), qtype)))
        rel = (t - w).norm() / w.norm()
        assert rel < {Q.BF16: 0.005, Q.Q5_0: 0.05, Q.Q5_1: 0.05}.get(qtype, 0.12), rel


def test_gguf_yarn_betas_run_as_the_source_and_other_yarn_keys_are_refused(tmp_path, gguf_writer) -> None:
    """llama.cpp's converter writes a YaRN rope_scaling's beta_fast/beta_slow as rope.scaling.yarn_beta_*
    (the same correction range in ggml's rope); qwenkit ran the defaults 32/1 instead, logits 3e-3 off
    past the original window. Its attention and extrapolation factors mean something else to llama.cpp
    than to transformers: a value other than the default is refused by name, not run as a guess."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    yarn |= {"beta_fast": 8.0, "beta_slow": 2.0}
    model = hf_model("qwen2", vocab_size=VOCAB, rope_scaling=dict(yarn))

    def keys(**more: float):
        def add(w: gguf.GGUFWriter) -> None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(4.0)
            w.add_rope_scaling_orig_ctx_len(64)
            w.add_rope_scaling_yarn_beta_fast(8.0)
            w.add_rope_scaling_yarn_beta_slow(2.0)
            for name, value in more.items():
                w.add_float32(f"qwen2.rope.scaling.{name}", value)

        return add

    config = model.config.to_dict()
    path = gguf_writer(tmp_path / "y.gguf", "qwen2", config, _params(model), Q.F32, extra=keys())
    ours, cfg = load_model(path, dtype="float32", progress=False)
    assert (cfg.rope_scaling.beta_fast, cfg.rope_scaling.beta_slow) == (8.0, 2.0)
    ids = torch.randint(0, VOCAB, (1, 250), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (ours(ids) - model(ids).logits).abs().max().item() < 1e-4
    # the defaults llama.cpp itself would run say nothing new: read
    same = keys(yarn_attn_factor=1.0, yarn_ext_factor=1.0, yarn_log_multiplier=0.0)
    path = gguf_writer(tmp_path / "d.gguf", "qwen2", config, _params(model), Q.F32, extra=same)
    assert load_model(path, dtype="float32", progress=False)[1].rope_scaling == cfg.rope_scaling
    for name in ("yarn_attn_factor", "yarn_ext_factor", "yarn_log_multiplier", "attn_factor"):
        odd = keys(**{name: 0.5})
        path = gguf_writer(tmp_path / f"{name}.gguf", "qwen2", config, _params(model), Q.F32, extra=odd)
        with pytest.raises(GGUFError) as refused:
            load_model(path, dtype="float32", progress=False)
        assert str(refused.value) == (
            f"{path}: qwen2.rope.scaling.{name} is 0.5; qwenkit runs yarn RoPE scaling as transformers "
            "does, which has no such setting (remove the key or convert from the Hugging Face model)"
        )
