"""MoE GGUF files (llama.cpp's stacked experts ffn_*_exps, router ffn_gate_inp, shared expert *_shexp)
load to the logits of the same weights in transformers, and convert to a checkpoint transformers loads."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from factories import run_engine
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize
from gguf_files import Q, tiny_vocab, write_gguf
from moe_models import hf_moe_model
from safetensors.torch import load_file, save_file

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.gguf import GGUFError, read_gguf
from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf
from qwenkit.engine import Engine, SamplingParams
from qwenkit.quant import QuantizedLinear

VOCAB = len(tiny_vocab()[0])
ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _stacked(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> llama.cpp's layout: experts stacked, the shared gate 1-D."""
    out = {n: t for n, t in sd.items() if ".mlp.experts." not in n}
    for i in range(config.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts = [sd[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(config.num_experts)]
            out[f"model.layers.{i}.mlp.experts.{proj}.weight"] = torch.stack(parts)  # (E, rows, cols)
        gate = f"model.layers.{i}.mlp.shared_expert_gate.weight"
        if gate in out:
            out[gate] = out[gate][0]  # (hidden,), as quantized llama.cpp files hold it
    return out


def _rounded(sd: dict[str, torch.Tensor], qtype) -> dict[str, torch.Tensor]:
    """What the GGUF stores: 1-D tensors (and the shared gate, written 1-D) exact, the rest rounded to
    F16 or to ``qtype``'s blocks."""

    def rounded(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 1 or name.endswith("shared_expert_gate.weight"):
            return t
        if qtype == Q.F16:
            return t.half().float()
        return torch.from_numpy(dequantize(quantize(t.numpy(), qtype), qtype))

    return {n: rounded(n, t) for n, t in sd.items()}


def _write(tmp_path, variant: str, qtype):
    hf = hf_moe_model(variant, vocab_size=VOCAB)
    cfg = hf.config
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")

    def moe_keys(w) -> None:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if variant.startswith("qwen2_moe"):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)

    arch = ARCH[variant.split("-")[0]]
    path = write_gguf(tmp_path / "moe.gguf", arch, cfg.to_dict(), _stacked(sd, cfg), qtype, extra=moe_keys)
    # transformers running exactly the weights the file holds
    ref_dir = tmp_path / "rounded"
    ref_dir.mkdir()
    (ref_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(_rounded(sd, qtype), str(ref_dir / "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    return path, ref


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=["f16", "q8_0"])
@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe"])
def test_moe_gguf_loads_to_the_same_logits(tmp_path, variant, qtype):
    path, ref = _write(tmp_path, variant, qtype)
    ckpt = read_gguf(path)
    cfg = ckpt.hf_config
    assert cfg["model_type"] == variant and cfg["num_experts"] == 8
    assert cfg["num_experts_per_tok"] == ref.config.num_experts_per_tok
    assert cfg["norm_topk_prob"] == ref.config.norm_topk_prob and cfg["mlp_only_layers"] == []
    assert cfg["moe_intermediate_size"] == 32
    if variant == "qwen2_moe":
        assert cfg["shared_expert_intermediate_size"] == 96
    names = ckpt.tensor_names()
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in names
    assert names == [n for n, _ in ckpt.tensors()]

    model, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    with torch.no_grad():
        ours, theirs = model(IDS), ref(IDS).logits
    # F16: the same function exactly; Q8_0: exactly what its rounded weights compute.
    assert (ours - theirs).abs().max().item() < 1e-4
    # In the file's precision, attention and the experts run on the integer kernels (test below).
    own, _ = load_model(path, dtype="float32", progress=False)
    with torch.no_grad():
        got = own(IDS)
    assert (got - theirs).abs().max().item() < 2e-2 * theirs.abs().max().item()


def _expert_products(model: torch.nn.Module, float_model: torch.nn.Module, layer: int, expert: int):
    """[(layer, the float weight it stands for)] of a routed expert: gate and up as the one product a
    fast load fuses them into (separate where qwenkit's kernels do not run), and down."""
    mlp = model.model.layers[layer].mlp.experts[expert]
    want = float_model.model.layers[layer].mlp.experts[expert]
    if mlp.gate_up_silu is not None:
        gate_up = [(mlp.gate_up_silu.linear, torch.cat([want.gate_proj.weight, want.up_proj.weight]))]
    else:
        gate_up = [(mlp.gate_proj, want.gate_proj.weight), (mlp.up_proj, want.up_proj.weight)]
    return [*gate_up, (mlp.down_proj, want.down_proj.weight)]


def _model_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _experts_bytes(model: torch.nn.Module) -> int:
    return sum(_model_bytes(layer.mlp.experts) for layer in model.model.layers)


# bits a weight's code takes in memory at most (Q5 and Q6_K: 5 and 6 where their kernels run, else 8)
HELD_BITS = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 8, Q.Q4_K: 4, Q.Q6_K: 8}


def _random_k_blocks(qtype, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random K-quant super-blocks of a stacked (experts, rows, cols) weight: any bytes are valid codes
    and 6-bit or int8 sub-scales; d (and Q4_K's dmin) small finite float16 values."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    heads = {Q.Q4_K: (0, 2), Q.Q6_K: (208, 1)}[qtype]  # where d (and dmin) start, how many
    g = np.random.default_rng(seed)
    n_blocks = math.prod(shape) // block
    b = g.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == Q.Q6_K:
        b[:, 192:208] = g.integers(-8, 9, size=(n_blocks, 16)).astype(np.int8).view(np.uint8)
    start, n = heads
    d = (g.random((n_blocks, n)) * 2e-3).astype(np.float16)
    b[:, start : start + 2 * n] = d.view(np.uint8)
    return b.reshape(*shape[:-1], -1)


def _write_k_experts(tmp_path, variant: str, qtype):
    """A MoE GGUF whose routed experts are random ``qtype`` (K-quant) blocks, every other matrix Q8_0
    (gguf-py cannot quantize to the K types)."""
    hf = hf_moe_model(variant, vocab_size=VOCAB, hidden_size=256, moe_intermediate_size=256)
    cfg = hf.config
    hf.save_pretrained(tmp_path / "hf")
    state = _stacked(load_file(tmp_path / "hf" / "model.safetensors"), cfg)
    experts = {n: state.pop(n) for n in list(state) if ".mlp.experts." in n}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, cfg.num_hidden_layers)

    def extra(w) -> None:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if variant == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        for i, (name, weight) in enumerate(experts.items()):
            blocks = _random_k_blocks(qtype, tuple(weight.shape), seed=i)
            w.add_tensor(f"{names.get_name(name.rsplit('.', 1)[0])}.weight", blocks, raw_dtype=qtype)

    return write_gguf(tmp_path / "moe.gguf", ARCH[variant], cfg.to_dict(), state, Q.Q8_0, extra=extra)


@pytest.mark.parametrize(
    "qtype",
    # Q4_K and Q6_K (super-blocks of 256 inputs): a Q4_K_M file's expert gate/up and down
    [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q6_K],
    ids=lambda q: q.name.lower(),
)
@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe"])
def test_moe_gguf_experts_run_in_the_files_precision(tmp_path, variant, qtype):
    """llama.cpp's stacked experts load as one integer-kernel layer per expert, from the file's codes:
    each expert computes what its dequantized float weights compute (within the kernels' rounding of
    activations to int8), the model what its float load computes, at the codes' memory."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        path = _write_k_experts(tmp_path, variant, qtype)
    else:
        path, _ = _write(tmp_path, variant, qtype)
    own, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    floats, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    cfg = own.config
    assert not [n for n, m in own.named_modules() if ".experts." in n and type(m) is torch.nn.Linear]
    # on qwenkit's kernels, the kernel a dense layer of this block type gets (attention's, where the file
    # holds it alike); on the plain path torch's kernels, chosen by shape
    kernel = type(_expert_products(own, floats, 0, 0)[0][0].impl)
    if qtype not in (Q.Q4_K, Q.Q6_K) and kernels.available():
        assert kernel is type(own.model.layers[0].self_attn.qkv_proj.impl)
    g = torch.Generator().manual_seed(1)
    for layer in range(cfg.num_hidden_layers):
        for expert in range(cfg.num_experts):
            for got_layer, weight in _expert_products(own, floats, layer, expert):
                assert isinstance(got_layer, QuantizedLinear)
                assert type(got_layer.impl) is kernel or not kernels.available()
                x = torch.randn(5, weight.shape[1], generator=g).bfloat16()
                want = x.float() @ weight.T
                err = (got_layer(x).float() - want).abs().max() / want.abs().max()
                assert err < 0.03, (layer, expert, err.item())  # another expert's weights: ~1.4
    if qtype not in (Q.Q4_K, Q.Q6_K):  # (random K blocks make weights whose routing flips at a rounding)
        with torch.no_grad():
            got, want = own(IDS).float(), floats(IDS)
        assert (got - want).abs().max() < 0.05 * want.abs().max()
    # the memory check before loading counts the codes (Q5 at 8 bits: an upper bound), not floats
    ckpt = read_gguf(path)
    assert ckpt.runtime_bytes(2, keep_quantized=True) < 0.75 * ckpt.runtime_bytes(2, keep_quantized=False)
    if kernels.available():  # (the plain path keeps a byte a code for shapes torch's int4 kernel refuses)
        assert _model_bytes(own) < 1.3 * ckpt.runtime_bytes(2, keep_quantized=True)
        weights = sum(p.numel() for layer in floats.model.layers for p in layer.mlp.experts.parameters())
        # the codes, and a float scale and shift per group of 32 at most (bfloat16: 2 bytes a weight)
        assert _experts_bytes(own) <= weights * (HELD_BITS[qtype] / 8 + 0.25)


@pytest.mark.skipif(
    not kernels.available(),
    reason="qwenkit's CPU kernels compute every row on its own; torch's int4 kernel (plain path) does not",
)
def test_moe_gguf_in_precision_batched_equals_alone(tmp_path):
    """Through the engine, a request's tokens do not depend on what else its step routes through the
    experts' integer kernels."""
    path, _ = _write(tmp_path, "qwen3_moe", Q.Q4_0)
    model, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [list(range(5, 12)), list(range(100, 140)), [7], list(range(200, 221))]
    alone = [run_engine(Engine(model, max_batch_size=1), [p], [params])[0] for p in prompts]
    together = run_engine(Engine(model, max_batch_size=4, prefill_chunk=8), prompts, [params] * len(prompts))
    assert together == alone


@pytest.mark.slow
def test_convert_moe_gguf_to_hf_loads_in_transformers(tmp_path):
    path, ref = _write(tmp_path, "qwen2_moe", Q.Q8_0)
    out = convert_gguf_to_hf(path, tmp_path / "converted")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["num_experts"] == 8
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert (theirs(IDS).logits - ref(IDS).logits).abs().max().item() < 1e-4
    ours, _ = load_model(out, dtype="float32", progress=False)
    with torch.no_grad():
        assert (ours(IDS) - ref(IDS).logits).abs().max().item() < 1e-4


def test_moe_gguf_expert_count_mismatch_is_one_line(tmp_path):
    hf = hf_moe_model("qwen3_moe", vocab_size=VOCAB)
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")

    def wrong(w) -> None:
        w.add_expert_count(6)
        w.add_expert_used_count(2)

    path = write_gguf(
        tmp_path / "bad.gguf", "qwen3moe", hf.config.to_dict(), _stacked(sd, hf.config), extra=wrong
    )
    with pytest.raises(GGUFError, match=r"expert_count 6 disagrees with blk.0.ffn_up_exps \(8 experts\)"):
        read_gguf(path)


@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe"])
def test_moe_gguf_layer_without_its_router_names_the_router(tmp_path, variant):
    """A layer with experts but no ffn_gate_inp was taken as dense, and the load then called its first
    expert (qwen3moe) or its shared expert (qwen2moe) an unexpected tensor of "a dense layer in
    config.json"; the router is what is missing."""
    from qwenkit.errors import QwenkitError

    hf = hf_moe_model(variant, vocab_size=VOCAB)
    hf.save_pretrained(tmp_path / "hf")
    sd = _stacked(load_file(tmp_path / "hf" / "model.safetensors"), hf.config)
    del sd["model.layers.1.mlp.gate.weight"]

    def moe_keys(w) -> None:
        w.add_expert_count(hf.config.num_experts)
        w.add_expert_used_count(hf.config.num_experts_per_tok)

    path = write_gguf(tmp_path / "bad.gguf", ARCH[variant], hf.config.to_dict(), sd, extra=moe_keys)
    assert read_gguf(path).hf_config["mlp_only_layers"] == []
    with pytest.raises(QwenkitError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.gate\.weight$"):
        load_model(path, dtype="float32", progress=False)
