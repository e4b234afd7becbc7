"""LoRA math and peft interop: gradients equal autograd on the merged weight; QLoRA's equal LoRA's on the
dequantized base; adapters move between qwenkit and peft + transformers with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from factories import hf_model, lora_model, randomize_lora, save_hf, save_lora

from qwenkit.checkpoint import load_model
from qwenkit.errors import CheckpointError
from qwenkit.finetune.adapter_io import PREFIX, adapter_pairs
from qwenkit.finetune.lora import (
    LoRAConfig,
    adapters_disabled,
    apply_lora,
    dequantized_weight,
    lora_modules,
    merge_lora,
)
from qwenkit.model.served_adapters import LoRAProjection
from qwenkit.quant import QuantizedLinear, quantize_model_rtn

IDS = torch.tensor([[3, 17, 200, 5, 9, 41, 300, 7], [8, 1, 2, 99, 100, 4, 6, 250]])


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_hf(hf_model("qwen2", tie_word_embeddings=False), tmp_path_factory.mktemp("q2") / "m")


def hf_base(model_dir, dtype=torch.float32):
    """The transformers model of ``model_dir``, the base peft adapts."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def peft_lora(model_dir, **config):
    """peft's LoRA model (``peft.LoraConfig(**config)``) over the transformers base of ``model_dir``."""
    import peft

    return peft.get_peft_model(hf_base(model_dir), peft.LoraConfig(**config))


def randomize_peft(peft_model, seed: int) -> None:
    """Give every peft adapter a non-zero B, drawn after seeding torch's global generator."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def test_lora_forward_and_gradients_equal_merged_weight_reference():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 10, bias=True)
    model = torch.nn.Sequential()
    model.add_module("q_proj", layer)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj",), use_rslora=True)
    apply_lora(model, cfg)
    lora = model.q_proj
    randomize_lora(model, 1, 0.05)
    assert lora.scaling == 8 / 2  # rsLoRA: alpha / sqrt(r)
    x = torch.randn(3, 12)
    y = model(x)
    y.pow(2).sum().backward()

    # Reference: autograd through W + B @ A * s on independent leaf copies.
    a = lora.lora_A.weight.detach().clone().requires_grad_()
    b = lora.lora_B.weight.detach().clone().requires_grad_()
    w = layer.weight.detach() + b @ a * 4.0
    y_ref = torch.nn.functional.linear(x, w, layer.bias.detach())
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora.lora_A.weight.grad, a.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora.lora_B.weight.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None  # the base is frozen


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_gradients_equal_lora_on_dequantized_base(qwen2_dir, bits):
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0)
    quant, _ = load_model(qwen2_dir, "float32", progress=False)
    quantize_model_rtn(quant, bits=bits, group_size=32 if bits == 4 else -1)
    ref, _ = load_model(qwen2_dir, "float32", progress=False)
    with torch.no_grad():  # the float reference holds exactly what the quantized codes mean
        for name, m in quant.named_modules():
            if isinstance(m, QuantizedLinear):
                ref.get_submodule(name).weight.copy_(dequantized_weight(m, torch.float32))
    for model in (quant, ref):
        torch.manual_seed(0)
        apply_lora(model, cfg)
        randomize_lora(model, 1, 0.05)
        model.train()
    losses = []
    for model in (quant, ref):
        logits = model(IDS)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1)
        )
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    qm, rm = lora_modules(quant), lora_modules(ref)
    assert set(qm) == set(rm) and len(qm) == 14
    assert isinstance(qm["model.layers.0.self_attn.q_proj"].base_layer, QuantizedLinear)
    for name in qm:
        for part in ("lora_A", "lora_B"):
            g_q = getattr(qm[name], part).weight.grad
            g_r = getattr(rm[name], part).weight.grad
            assert g_q.abs().sum() > 0
            torch.testing.assert_close(g_q, g_r, rtol=1e-4, atol=1e-6)


def test_qwenkit_adapter_loads_in_peft_with_same_logits(qwen2_dir, tmp_path):
    import peft

    cfg = LoRAConfig(r=4, alpha=16, dropout=0.0, layers_to_transform=(1,))
    model = lora_model(qwen2_dir, cfg, seed=1)
    adapter = save_lora(model, tmp_path / "adapter", cfg, qwen2_dir)
    with torch.no_grad():
        ours = model(IDS)

    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["modules_to_save"] is None
    peft_model = peft.PeftModel.from_pretrained(hf_base(qwen2_dir), adapter).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # The adapter matters (a silently ignored adapter would also "match" the base), and only layer 1 has one.
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(IDS).logits - theirs).abs().max() > 1e-3
    assert all(".layers.1." in n for n in lora_modules(model))

    # --adapter through the loader gives the same logits; merging gives them too.
    loaded, _ = load_model(qwen2_dir, "float32", progress=False, adapter=adapter)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), ours, rtol=0, atol=1e-5)
        merged = merge_lora(loaded)
        assert not lora_modules(merged)
        torch.testing.assert_close(merged(IDS), ours, rtol=0, atol=1e-4)


def test_peft_adapter_loads_in_qwenkit_with_same_logits(qwen2_dir, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = peft_lora(qwen2_dir, r=8, lora_alpha=4, target_modules=targets, use_rslora=True)
    randomize_peft(peft_model, 3)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    with torch.no_grad():
        theirs = peft_model.eval()(IDS).logits
    model, _ = load_model(qwen2_dir, "float32", progress=False, adapter=tmp_path / "peft-adapter")
    assert len([m for m in model.modules() if isinstance(m, LoRAProjection)]) == 6  # served beside the base
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs, rtol=0, atol=1e-4)


def test_peft_adapters_alpha_pattern_with_alternatives_matches_peft(qwen2_dir, tmp_path):
    """peft matches a pattern key as ``(.*\\.)?(KEY)$``: a key ``q_proj|v_proj`` covers both modules (without
    the group, ``v_proj`` kept the default alpha and merge and --adapter scaled its update 4x too small)."""
    peft_model = peft_lora(
        qwen2_dir,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        alpha_pattern={"q_proj|v_proj": 32},
        rank_pattern={"q_proj|down_proj": 2},
    )
    v_proj = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert v_proj.scaling["default"] == 32 / 4  # peft's reading of the pattern
    randomize_peft(peft_model, 4)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    with torch.no_grad():
        theirs = peft_model.eval()(IDS).logits
    model, _ = load_model(qwen2_dir, "float32", progress=False, adapter=tmp_path / "peft-adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs, rtol=0, atol=1e-4)
    _, pairs, _ = adapter_pairs(model, tmp_path / "peft-adapter")
    assert pairs["model.layers.0.self_attn.v_proj"].scaling == 32 / 4
    assert pairs["model.layers.0.self_attn.q_proj"].scaling == 32 / 2
    assert pairs["model.layers.0.mlp.down_proj"].scaling == 8 / 2


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (
            dict(alora_invocation_tokens=[5, 9]),
            r"alora_invocation_tokens \(activated LoRA, applied only after",
        ),
        (dict(layer_replication=[[0, 1], [0, 1]]), r"layer_replication \(adapters on peft's copies of base"),
        (dict(use_dora=True), r"use_dora \(DoRA\) is not supported"),
        (dict(lora_bias=True), r"lora_bias \(a bias on lora_B\) is not supported"),
        (dict(bias="lora_only"), r"bias='lora_only' \(the base layers' biases trained with the adapter\)"),
        (dict(bias="all"), r"bias='all' \(the base layers' biases trained with the adapter\)"),
    ],
    ids=["alora", "layer_replication", "dora", "lora_bias", "bias_lora_only", "bias_all"],
)
def test_peft_variants_qwenkit_would_compute_otherwise_are_refused(qwen2_dir, tmp_path, variant, message):
    """peft runs these adapters differently from plain LoRA. aLoRA and layer_replication files hold only
    lora_A/lora_B, so they used to load and give other logits than peft's (0.29 and 0.70 apart here)."""
    peft_model = peft_lora(qwen2_dir, r=4, target_modules=["q_proj", "v_proj"], **variant)
    peft_model.save_pretrained(tmp_path / "adapter")
    for load in (
        lambda: load_model(qwen2_dir, "float32", progress=False, adapter=tmp_path / "adapter"),
        lambda: adapter_pairs(None, tmp_path / "adapter"),  # merge and served adapters read it here too
    ):
        with pytest.raises(CheckpointError, match=message + r".*; qwenkit applies plain LoRA$"):
            load()


def test_adapter_for_another_shape_is_refused(qwen2_dir, tmp_path):
    other = save_hf(hf_model("qwen2", hidden_size=32, intermediate_size=64), tmp_path / "other")
    cfg = LoRAConfig(r=2, alpha=2, dropout=0.0, target_modules=("q_proj",))
    save_lora(lora_model(other, cfg), tmp_path / "a", cfg, "other")
    with pytest.raises(CheckpointError, match=r"another model shape: model\.layers\.0\.self_attn\.q_proj"):
        load_model(qwen2_dir, "float32", progress=False, adapter=tmp_path / "a")
    # No prefix (as transformers' load_adapter writes) still loads; a non-LoRA tensor is refused.
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file(
        {k.removeprefix(PREFIX) + "x": v for k, v in sd.items()}, tmp_path / "a" / "adapter_model.safetensors"
    )
    with pytest.raises(CheckpointError, match="unexpected adapter tensor"):
        load_model(other, "float32", progress=False, adapter=tmp_path / "a")


def test_merge_command_output_equals_adapter_logits(qwen2_dir, tmp_path):
    from qwenkit.cli import main as cli_main

    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0)
    model = lora_model(qwen2_dir, cfg, seed=1)
    save_lora(model, tmp_path / "a", cfg, qwen2_dir)
    assert cli_main(["merge", str(qwen2_dir), str(tmp_path / "a"), str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged", "float32", progress=False)
    assert not lora_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), model(IDS), rtol=0, atol=1e-4)
    # bfloat16: the report's "as stored" figure is what the written weights give (computed in float32)
    from qwenkit.finetune.merge import PROBE, merge

    report = merge(qwen2_dir, tmp_path / "a", tmp_path / "bf16", dtype="bfloat16")
    stored, _ = load_model(tmp_path / "bf16", "float32", progress=False)
    import transformers

    # transformers 5 reads "dtype" (the source's float32) before "torch_dtype": both name the file's
    assert transformers.AutoConfig.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    with torch.no_grad():
        adapted = model(PROBE)
        want = float((stored(PROBE) - adapted).abs().max())
        with adapters_disabled(model):
            effect = float((model(PROBE) - adapted).abs().max())
    assert report.float32 < 1e-4 < report.stored and report.stored == pytest.approx(want, rel=1e-3)
    assert report.effect == pytest.approx(effect, rel=1e-5) and report.effect > 1e-2
    assert cli_main(["merge", str(qwen2_dir), str(tmp_path / "missing"), str(tmp_path / "m2")]) == 2
    assert not (tmp_path / "m2").exists()
    # OUT = the adapter's own directory with --overwrite once merged, then deleted the adapter
    a = str(tmp_path / "a")
    with pytest.raises(CheckpointError, match=f"^output {a} would replace the source {a}; choose another"):
        merge(qwen2_dir, a, a, overwrite=True)
    kept = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert kept == ["adapter_config.json", "adapter_model.safetensors"]


def test_generate_cli_with_adapter(tiny_chat_model, tmp_path, capsys):
    """--adapter on generate changes the output exactly as the adapter-applied model predicts."""
    from qwenkit.cli import main as cli_main

    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0)
    model = lora_model(tiny_chat_model, cfg, seed=5)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.mul_(40)
    save_lora(model, tmp_path / "a", cfg, tiny_chat_model)
    ids = [9707, 11, 1879]
    with torch.no_grad():
        expected = int(model(torch.tensor([ids]))[0, -1].argmax())
    args = ["generate", str(tiny_chat_model), "--prompt-ids", "9707,11,1879", "--max-new-tokens", "1"]
    args += ["--temperature", "0", "--json", "--dtype", "float32"]
    assert cli_main([*args, "--adapter", str(tmp_path / "a")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["output_token_ids"] == [expected]
    assert cli_main(args) == 0
    base_out = json.loads(capsys.readouterr().out)
    assert base_out["output_token_ids"] != [expected]


def test_qwen_v1_adapter_uses_v1_names_and_matches_the_v1_reference(tmp_path):
    """On a v1 checkpoint the adapter names v1's modules (fused c_attn, w1/w2, c_proj); applied by hand to
    the original v1 tensors, an independent v1 forward gives qwenkit's adapter-applied logits."""
    from factories import V1_TINY, v1_state_dict, write_v1_checkpoint
    from qwen_v1_reference import v1_logits
    from safetensors.torch import load_file

    src = write_v1_checkpoint(tmp_path / "v1")
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0)
    model = lora_model(src, cfg, seed=2)
    save_lora(model, tmp_path / "a", cfg, src)
    ids = torch.tensor([3, 17, 200, 5, 9, 41, 300, 7])
    with torch.no_grad():
        ours = model(ids[None])[0]

    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["target_modules"] == ["c_attn", "c_proj", "w1", "w2"]
    assert raw["rank_pattern"] == {"c_attn": 12} and raw["alpha_pattern"] == {"c_attn": 24.0}
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (12, 64)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 12)
    sd = v1_state_dict(V1_TINY)
    for key in tensors:
        if key.endswith("lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            scaling = 24.0 / 12 if module.endswith("c_attn") else 8 / 4
            sd[module + ".weight"] = sd[module + ".weight"] + b @ a * scaling
    torch.testing.assert_close(v1_logits(sd, V1_TINY, ids), ours, rtol=0, atol=1e-4)

    loaded, _ = load_model(src, "float32", progress=False, adapter=tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[None])[0], ours, rtol=0, atol=1e-5)


def _edit_config(key, value):
    def edit(d):
        config = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**config, key: value}))

    return edit


def _legacy_bin(content: bytes):
    def edit(d):
        (d / "adapter_model.safetensors").unlink()
        (d / "adapter_model.bin").write_bytes(content)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: (d / "adapter_config.json").write_text("[1]"),
            "adapter_config.json: must hold a JSON object, not list",
        ),
        (
            _edit_config("r", "eight"),
            "adapter_config.json: field 'r' must be a positive whole number (got 'eight')",
        ),
        (_edit_config("r", 0), "adapter_config.json: field 'r' must be a positive whole number (got 0)"),
        (
            _edit_config("lora_alpha", None),
            "adapter_config.json: field 'lora_alpha' must be a number (got None)",
        ),
        (
            _legacy_bin(b"garbage\n"),
            "adapter_model.bin could not be read as a weights-only PyTorch checkpoint: "
            "it is not a PyTorch file of tensors alone (Unsupported operand 103)",
        ),
        # the config's rank is not the tensors' rank: peft refuses the pair (size mismatch); qwenkit once
        # merged it with alpha over the tensors' rank, a scaling the training never used
        (
            _edit_config("r", 8),
            "a: model.layers.0.self_attn.q_proj has lora_A of rank 4, but adapter_config.json gives it "
            "rank 8; the weights and the config are of different adapters",
        ),
    ],
    ids=["list", "r-text", "r-zero", "alpha-null", "bin-garbage", "rank-mismatch"],
)
def test_a_damaged_adapter_is_one_line_naming_the_file_and_merge_writes_nothing(
    qwen2_dir, tmp_path, capfd, edit, message
):
    """These tracebacked (AttributeError, ValueError, TypeError, torch's UnpicklingError page) or, for the
    rank, merged silently with another scaling than the adapter was trained with."""
    from qwenkit.cli import main as cli_main

    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    edit(save_lora(lora_model(qwen2_dir, cfg), tmp_path / "a", cfg, qwen2_dir))
    assert cli_main(["merge", str(qwen2_dir), str(tmp_path / "a"), str(tmp_path / "merged")]) == 2
    err = capfd.readouterr().err
    assert (
        err.endswith(message + "\n") and err.startswith(f"error: {tmp_path / 'a'}") and err.count("\n") == 1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_peft_refuses_an_adapter_whose_config_rank_is_not_its_tensors(qwen2_dir, tmp_path):
    """The reference for the rank-mismatch case above."""
    import peft

    peft_lora(qwen2_dir, r=4, target_modules=["q_proj"]).save_pretrained(tmp_path / "a")
    _edit_config("r", 8)(tmp_path / "a")
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(hf_base(qwen2_dir), tmp_path / "a")
    with pytest.raises(
        CheckpointError, match="has lora_A of rank 4, but adapter_config.json gives it rank 8"
    ):
        load_model(qwen2_dir, "float32", progress=False, adapter=tmp_path / "a")


def test_bfloat16_base_with_adapter_equals_peft_logits_and_gradients(qwen2_dir, tmp_path):
    """On a bfloat16 base, peft keeps the adapter in float32 and adds its update to the base output in
    float32, rounding the sum once. qwenkit's training (and --adapter) forward does the same, so its logits
    equal peft's (before, the update was rounded to bfloat16 and then added: two roundings, 0.017 off peft
    on this model where peft is 0.009 from float32), and so do the adapters' gradients."""
    import peft

    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0)
    model = lora_model(qwen2_dir, cfg, seed=3, dtype="bfloat16")
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.mul_(4)  # an update of a size training reaches
    adapter = save_lora(model, tmp_path / "adapter", cfg, qwen2_dir)
    peft_model = peft.PeftModel.from_pretrained(
        hf_base(qwen2_dir, torch.bfloat16), adapter, is_trainable=True
    )
    theirs = peft_model(input_ids=IDS).logits
    assert next(p for n, p in peft_model.named_parameters() if "lora_A" in n).dtype == torch.float32
    model.train()
    ours = model(IDS)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=1e-3)
    ours.float().logsumexp(-1).sum().backward()
    theirs.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    for name, m in lora_modules(model).items():
        for side in ("lora_A", "lora_B"):
            want = grads[f"base_model.model.{name}.{side}.default.weight"]
            torch.testing.assert_close(getattr(m, side).weight.grad, want, rtol=1e-3, atol=1e-5)


def test_peft_adapters_of_the_output_head_load_with_peft_s_logits(qwen2_dir, tmp_path):
    """peft saves a whole copy of the output head (or embedding) beside an adapter of it
    (save_embedding_layers); such adapters were refused as "unexpected adapter tensor
    'base_model.model.lm_head.base_layer.weight'", though --adapter runs an output-head adapter."""
    from safetensors.torch import load_file, save_file

    from qwenkit.model.served_adapters import AdapterNotServable

    peft_model = peft_lora(qwen2_dir, r=4, target_modules=["q_proj", "lm_head"])
    randomize_peft(peft_model, 5)
    adapter = tmp_path / "head"
    peft_model.save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    assert "base_model.model.lm_head.base_layer.weight" in load_file(weights)
    with torch.no_grad():
        theirs = peft_model.eval()(IDS).logits
        with peft_model.disable_adapter():
            effect = (peft_model(IDS).logits - theirs).abs().max()
    assert effect > 1e-3
    model, _ = load_model(qwen2_dir, "float32", progress=False, adapter=adapter)
    assert "lm_head" in lora_modules(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs, rtol=0, atol=1e-4)
    # on a quantized head (no float weight to compare the copy with) too, within int8's rounding
    int8, _ = load_model(qwen2_dir, "float32", progress=False, quantize="int8", adapter=adapter)
    assert isinstance(lora_modules(int8)["lm_head"].base_layer, QuantizedLinear)
    with torch.no_grad():
        assert (int8(IDS) - theirs).abs().max() < effect / 10
    # served adapters cannot adapt the output head: refused naming it
    with pytest.raises(AdapterNotServable, match="adapter 'h' adapts lm_head; served adapters may adapt"):
        load_model(qwen2_dir, "float32", progress=False, adapters={"h": adapter})

    # a copy that is not this model's weight (a resized or trained head) would run wrong: refused
    sd = load_file(weights)
    sd["base_model.model.lm_head.base_layer.weight"] = sd["base_model.model.lm_head.base_layer.weight"] * 1.5
    save_file(sd, weights, {"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"holds its own lm_head weights .*, which are not this model's"
    ):
        load_model(qwen2_dir, "float32", progress=False, adapter=adapter)


def test_peft_adapters_of_the_embedding_are_refused_naming_it(qwen2_dir, tmp_path):
    peft_model = peft_lora(qwen2_dir, r=4, target_modules=["q_proj", "embed_tokens"])
    peft_model.save_pretrained(tmp_path / "emb")
    message = (
        r"model\.embed_tokens has a LoRA on the embedding \(lora_embedding_A/B\), which qwenkit does not"
    )
    for served in (False, True):
        kwargs = {"adapters": {"e": tmp_path / "emb"}} if served else {"adapter": tmp_path / "emb"}
        with pytest.raises(CheckpointError, match=message):
            load_model(qwen2_dir, "float32", progress=False, **kwargs)


def test_merging_an_adapter_of_a_tied_output_head_leaves_the_embedding(tmp_path):
    """The head of a tied model is the embedding's weight: merging its update into that shared weight
    changed the embedding too, and merge wrote a model 100 logits away from the adapter's (exit 0)."""
    from safetensors.torch import load_file

    from qwenkit.cli import main as cli_main

    tied_dir = save_hf(hf_model("qwen2", tie_word_embeddings=True), tmp_path / "tied")
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "lm_head"))
    model = lora_model(tied_dir, cfg, seed=1)
    save_lora(model, tmp_path / "a", cfg, tied_dir)
    with torch.no_grad():
        ours = model(IDS)
    embedding = model.model.embed_tokens.weight.clone()
    assert cli_main(["merge", str(tied_dir), str(tmp_path / "a"), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    written = load_file(tmp_path / "merged" / "model.safetensors")
    assert torch.equal(written["model.embed_tokens.weight"], embedding)
    merged, _ = load_model(tmp_path / "merged", "float32", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_adapters_of_a_base_changed_at_init_are_refused_and_run_once_converted(
    qwen2_dir, tmp_path, init
):
    """PiSSA and OLoRA train against W - B0·A0, which peft rebuilds from the config while loading; applied
    to the model's own weights these adapters ran 0.09 (PiSSA) and 0.22 (OLoRA) logits off peft's, with no
    word. peft's conversion to a plain LoRA adapter runs with peft's logits."""
    targets = ["q_proj", "v_proj"]
    peft_model = peft_lora(qwen2_dir, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    peft_model.peft_config["default"].init_lora_weights = True  # peft's recipe: keep the initial adapter
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = init
    torch.manual_seed(4)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.3)
        theirs = peft_model.eval()(IDS).logits
    peft_model.save_pretrained(tmp_path / "trained")
    for load in (
        lambda: load_model(qwen2_dir, "float32", progress=False, adapter=tmp_path / "trained"),
        lambda: load_model(qwen2_dir, "float32", progress=False, adapters={"p": tmp_path / "trained"}),
    ):
        with pytest.raises(CheckpointError, match=f"init_lora_weights '{init}' trains against a base peft"):
            load()
    peft_model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    model, _ = load_model(qwen2_dir, "float32", progress=False, adapter=tmp_path / "converted")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs, rtol=0, atol=1e-4)


def test_a_lora_ga_adapter_is_refused_as_its_base_changed_at_init(qwen2_dir, tmp_path):
    """LoRA-GA also keeps W - scaling·B0·A0 as the base (peft's lora_ga_init)."""
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",))
    _edit_config("init_lora_weights", "lora_ga")(
        save_lora(lora_model(qwen2_dir, cfg), tmp_path / "a", cfg, qwen2_dir)
    )
    with pytest.raises(
        CheckpointError, match="init_lora_weights 'lora_ga' trains against a base peft changed"
    ):
        load_model(qwen2_dir, "float32", progress=False, adapter=tmp_path / "a")


def test_a_qalora_adapter_is_refused_naming_it(tiny_chat_model, tmp_path):
    """peft's QALoRA (use_qalora) averages the input in groups of qalora_group_size before lora_A, so its
    lora_A is narrower than the layer's input. It was refused as one "for another model shape", which
    sent the user looking for the wrong base model. Saved as peft saves one (peft builds it only on GPTQ
    layers), it is refused by name, in one line, by the real CLI."""
    from factories import write_lora_adapter
    from safetensors.torch import load_file, save_file

    adapter = write_lora_adapter(tiny_chat_model, tmp_path / "qalora", seed=3)
    group = 4
    weights = load_file(adapter / "adapter_model.safetensors")
    pooled = {k: v[:, ::group].contiguous() if ".lora_A." in k else v for k, v in weights.items()}
    save_file(pooled, adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config |= {"use_qalora": True, "qalora_group_size": group}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    args = ["generate", str(tiny_chat_model), "--adapter", str(adapter), "-p", "hi", "--max-new-tokens", "2"]
    r = subprocess.run([sys.executable, "-m", "qwenkit", *args], capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr == (
        f"error: {adapter / 'adapter_config.json'}: use_qalora (QALoRA, whose lora_A reads the input "
        "averaged in groups of qalora_group_size) is not supported; qwenkit applies plain LoRA\n"
    )
