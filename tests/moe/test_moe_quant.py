"""Quantized MoE: experts int8/int4 with the router kept in float; `qwenkit quantize` output reloads
to exactly the model it quantized; experts no calibration token reaches still get quantized."""

from __future__ import annotations

import pytest
import torch
from moe_models import hf_moe_model

from qwenkit.checkpoint import load_model
from qwenkit.cli import main
from qwenkit.generate import tokenizer_for
from qwenkit.model.moe import MoEMLP, RouterLinear, count_routed_tokens
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.pipeline import MOE_READERS_NOTE, quantize_checkpoint

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "qwen2_moe"
    hf_moe_model("qwen2_moe-mixed").save_pretrained(path)
    return path


def _moe_blocks(model) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def test_runtime_quantize_experts_router_stays_float(moe_dir):
    ref, _ = load_model(moe_dir, dtype="float32", progress=False)
    errors = {}
    for precision in ("int8", "int4"):
        model, _ = load_model(moe_dir, dtype="float32", quantize=precision, progress=False)
        for block, ref_block in zip(_moe_blocks(model), _moe_blocks(ref), strict=True):
            assert isinstance(block.gate, RouterLinear)
            assert isinstance(block.shared_expert_gate, RouterLinear)
            assert torch.equal(block.gate.weight, ref_block.gate.weight)  # float, untouched
            assert torch.equal(block.shared_expert_gate.weight, ref_block.shared_expert_gate.weight)
            pairs = [*zip(block.experts, ref_block.experts, strict=True)]
            pairs.append((block.shared_expert, ref_block.shared_expert))
            for expert, ref_expert in pairs:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    q, w = getattr(expert, proj), getattr(ref_expert, proj).weight
                    assert isinstance(q, QuantizedLinear)
                    # every expert weight within half a step of its float value (RTN's rounding bound)
                    iw = q.to_int()
                    step = iw.scales.float()[iw.g_idx.long()].T
                    assert bool(((w - iw.dequantize()).abs() <= step / 2 + 1e-6).all())
        with torch.no_grad():
            a, b = model(IDS), ref(IDS)
        errors[precision] = float((a - b).norm() / b.norm())
        if precision == "int8":
            assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    # int8 close to float (its CPU kernels also run activations in bfloat16); int4 coarser.
    assert errors["int8"] < 0.02 and errors["int8"] < errors["int4"] < 0.15


@pytest.mark.slow
@pytest.mark.parametrize(("method", "bits"), [("gptq", 4), ("rtn", 8)])
def test_quantized_moe_checkpoint_reloads_exactly(moe_with_tokenizer, tmp_path, capsys, method, bits):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    if method == "rtn":  # the command line, then the library call it makes for the reference
        assert (
            main(["quantize", str(moe_with_tokenizer), str(out), "-q", "--bits", "8", "--method", "rtn"]) == 0
        )
        assert "int8" in capsys.readouterr().err
        out_ref = tmp_path / "again"
    else:
        out_ref = out
    ref = quantize_checkpoint(
        moe_with_tokenizer,
        out_ref,
        bits=bits,
        method=method,
        tokenizer=lambda: tokenizer_for(moe_with_tokenizer),
        calib=calib if method == "gptq" else None,
        calib_samples=4,
        seq_len=32,
        progress=False,
    )
    loaded, config = load_model(out, dtype="float32", progress=False)
    assert config.quantization["bits"] == bits and config.num_experts == 8
    blocks = _moe_blocks(loaded)
    assert len(blocks) == 3
    for block in blocks:
        assert isinstance(block.gate, RouterLinear) and block.gate.weight.dtype == torch.float32
        assert all(isinstance(e.down_proj, QuantizedLinear) for e in block.experts)
    ids = torch.randint(0, 151936, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref.model(ids))


def test_gptq_quantizes_experts_no_calibration_token_reached(tmp_path):
    from qwenkit.quant import GPTQConfig, gptq_quantize_model, quantize_weight_rtn

    hf_moe_model("qwen3_moe-top1-mixed").save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m", dtype="float32", progress=False)
    window = [[5, 9, 200]]  # 3 tokens, top-1: at most 3 of 8 experts per layer see anything
    with count_routed_tokens(model) as stats, torch.no_grad():
        model(torch.tensor(window))
    layer, counts = next(iter(stats.per_layer.items()))
    idle = counts.index(0)
    original = model.model.layers[layer].mlp.experts[idle].up_proj.weight.clone()
    config = GPTQConfig(bits=4, group_size=32, act_order="none")
    gptq_quantize_model(model, window, config, progress=False)
    q = model.model.layers[layer].mlp.experts[idle].up_proj
    assert isinstance(q, QuantizedLinear)
    expected = quantize_weight_rtn(original, 4, 32, True)
    assert torch.equal(q.to_int().dequantize(), expected.dequantize())


@pytest.mark.slow
def test_quantize_notes_that_transformers_does_not_load_moe_gptq(moe_dir, tmp_path):
    """The README's readers table says transformers + optimum + GPTQModel load what `qwenkit quantize`
    writes; for a MoE they load it with every routed expert left at random (a warning, not an error), so
    the command says so. If transformers learns to load it, this fails and the note should go."""
    import transformers

    result = quantize_checkpoint(moe_dir, tmp_path / "out", bits=4, method="rtn", progress=False)
    assert [n for n in result.notes if n.startswith("transformers")] == [MOE_READERS_NOTE]
    dense = tmp_path / "dense"
    hf_moe_model("qwen2_moe-mixed", num_experts=0).save_pretrained(dense)
    assert MOE_READERS_NOTE not in quantize_checkpoint(dense, tmp_path / "d", bits=4, method="rtn").notes

    _, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, device_map="cpu", output_loading_info=True
    )
    # layers 1 and 3 are sparse: their stacked experts are not in the file, the per-expert ones not read
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.3.mlp.experts.down_proj"} <= set(
        info["missing_keys"]
    )
    assert "model.layers.1.mlp.experts.0.up_proj.qweight" in info["unexpected_keys"]


def test_a_gptq_file_with_a_quantized_router_loads_it_dequantized_into_the_float_router(moe_dir, tmp_path):
    """Some writers quantize the router too (AutoRound; GPTQModel versions whose MoE trees listed
    ``mlp.gate`` as a layer to quantize): ``mlp.gate.qweight/qzeros/scales/g_idx`` instead of a float
    ``mlp.gate.weight``. qwenkit keeps routers in float, so it loads the file's dequantized router, the
    function the writer meant; before, the load stopped at "unexpected tensor 'mlp.gate.g_idx'"."""
    from safetensors.torch import load_file, save_file

    from qwenkit.quant import pack_gptq, quantize_weight_rtn

    plain = tmp_path / "plain"
    quantize_checkpoint(moe_dir, plain, bits=4, method="rtn", group_size=32, progress=False)
    routed = tmp_path / "routed"
    routed.mkdir()
    for side in plain.iterdir():
        if side.suffix != ".safetensors":
            (routed / side.name).write_bytes(side.read_bytes())
    (shard,) = plain.glob("*.safetensors")
    tensors, dequantized = load_file(shard), {}
    for name in [n for n in tensors if n.endswith(".mlp.gate.weight")]:
        codes = quantize_weight_rtn(tensors.pop(name).float(), 4, 32, True)
        dequantized[name] = codes.dequantize()
        packed = pack_gptq(codes)
        if name.endswith("layers.3.mlp.gate.weight"):
            del packed["g_idx"]  # some writers omit it without act-order: rebuilt from the group size
        for kind, tensor in packed.items():
            tensors[name.removesuffix("weight") + kind] = tensor
    assert len(dequantized) == 2  # layers 1 and 3 are sparse
    save_file(tensors, routed / shard.name, metadata={"format": "pt"})

    model, _ = load_model(routed, dtype="float32", progress=False)
    ref, _ = load_model(plain, dtype="float32", progress=False)
    for name, weight in dequantized.items():
        router = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(router, RouterLinear) and torch.equal(router.weight, weight)
        ref.get_submodule(name.removesuffix(".weight")).weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(model(IDS), ref(IDS))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_shared_expert_is_held_quantized_in_the_bytes_info_counts(moe_dir, precision):
    """Qwen2-MoE's shared expert takes its codes and scales only (no float copy beside them), the bytes
    ``memory.weight_bytes`` (``qwenkit info``) counts for it: 64 x 96 here, 20,224 bytes at int8 and
    14,208 at int4 against 36,864 in bfloat16."""
    from qwenkit.memory import quantized_bytes

    model, config = load_model(moe_dir, dtype="bfloat16", quantize=precision, progress=False)
    h, width = config.hidden_size, config.shared_expert_intermediate_size
    want = quantized_bytes(2 * h * width, h, precision) + quantized_bytes(width * h, width, precision)
    assert want == {"int8": 20224, "int4": 14208}[precision]
    for block in _moe_blocks(model):
        tensors = {
            t.data_ptr(): t for t in [*block.shared_expert.parameters(), *block.shared_expert.buffers()]
        }
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == want
