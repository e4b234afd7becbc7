"""Loading: formats, memory check, and a clear error for every bad input."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from factories import hf_model, save_hf, write_v1_checkpoint
from safetensors.torch import load_file, save_file

from qwenkit.checkpoint import load_model
from qwenkit.config import ModelConfig
from qwenkit.engine import Engine, SamplingParams
from qwenkit.errors import CheckpointError, ConfigError, OutOfMemoryError
from qwenkit.memory import check_fits


@pytest.fixture()
def qwen2_dir(tmp_path):
    return save_hf(hf_model("qwen2"), tmp_path / "qwen2")


def rewrite(path, edit):
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_legacy_bin_and_sharded_safetensors_load_identically(tmp_path):
    hf = hf_model("qwen2")
    sharded = save_hf(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        a = load_model(sharded, dtype="float32")[0](ids)
        b = load_model(legacy, dtype="float32")[0](ids)
        ref = hf(ids).logits
    assert torch.equal(a, b) and (a - ref).abs().max() < 1e-4


def test_a_tied_config_over_a_trained_head_is_refused_and_a_copy_of_the_embeddings_loads(tmp_path):
    """A fine-tune that trained lm_head apart but left tie_word_embeddings=true: the head was dropped
    silently (logits 1.07 apart from transformers 5, which runs it untied). A .bin holding the tied pair
    (the same storage under both names) still loads, tied."""
    hf = hf_model("qwen2", tie_word_embeddings=True)
    path = save_hf(hf, tmp_path / "tied")
    sd = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in sd
    trained = sd["model.embed_tokens.weight"] + 0.01 * torch.randn_like(sd["model.embed_tokens.weight"])
    save_file({**sd, "lm_head.weight": trained}, str(path / "model.safetensors"))
    for quantize in (None, "int8"):  # rounded on load, the embeddings become the head's codes: the same
        with pytest.raises(
            CheckpointError, match="ties the output head .* lm_head.weight differs from model"
        ):
            load_model(path, dtype="float32", quantize=quantize)
    sharded = save_hf(hf, tmp_path / "sharded", max_shard_size="100KB")  # head and embeddings apart
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    embed_file = index["weight_map"]["model.embed_tokens.weight"]
    head_file = max(f for f in index["weight_map"].values() if f != embed_file)  # another shard, read later
    shard = load_file(sharded / head_file)
    save_file({**shard, "lm_head.weight": trained}, str(sharded / head_file), metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = head_file
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_model(sharded, dtype="float32")
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")  # lm_head.weight is embed_tokens.weight
    model, _ = load_model(path, dtype="float32")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_classifier_checkpoint_is_refused_naming_its_architecture(tmp_path):
    """A reward model or classifier (score head, no lm_head) was refused naming only 'score.weight'."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    transformers.Qwen2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "rm")
    assert str(e.value).endswith(
        "unexpected tensor 'score.weight' for a qwen2 model; config.json's architectures Qwen2For"
        "SequenceClassification is not a causal language model (qwenkit runs *ForCausalLM checkpoints)"
    )


def test_bin_with_arbitrary_objects_is_refused(tmp_path, qwen2_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (qwen2_dir / "model.safetensors").unlink()
    with open(qwen2_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(qwen2_dir)


def test_dtype_cast_bfloat16(qwen2_dir):
    model, _ = load_model(qwen2_dir, dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("built", [True, False])
def test_auto_dtype_on_the_cpu_is_bfloat16_where_it_runs_fast(monkeypatch, native, built):
    """'auto': bfloat16 on a CPU with native bf16, and for inference on qwenkit's kernels (which run
    bf16 products on AVX2 CPUs too); float32 for anything else on a CPU without native bf16."""
    from qwenkit import kernels
    from qwenkit.checkpoint import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(kernels, "available", lambda: built)
    assert loader.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    fast = loader.resolve_dtype("auto", "cpu", fast_kernels=True)
    assert fast == (torch.bfloat16 if native or built else torch.float32)
    assert loader.resolve_dtype("float32", "cpu", fast_kernels=True) == torch.float32


def test_inference_load_on_the_kernels_takes_bfloat16_for_auto(qwen2_dir):
    from qwenkit import kernels

    model, _ = load_model(qwen2_dir, progress=False, fast_kernels=True)
    want = torch.bfloat16 if kernels.available() else torch.float32
    native = load_model(qwen2_dir, progress=False)[0].model.norm.weight.dtype
    assert model.model.norm.weight.dtype == (torch.bfloat16 if native == torch.bfloat16 else want)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
            r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight",
        ),
        (
            lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)),
            "unexpected tensor 'model.layers.0.extra.weight'",
        ),
        (
            lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(3)),
            r"'model.norm.weight' has shape \(3,\), but config.json implies \(64,\)",
        ),
    ],
)
def test_bad_tensors_named(qwen2_dir, edit, message):
    rewrite(qwen2_dir, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(qwen2_dir)


def test_an_adapter_given_as_the_model_says_how_to_run_it(tmp_path, capsys):
    """`finetune` writes an adapter, not a model: passing it where a model goes names its base and the two
    ways to run it, instead of only saying that it has no config.json."""
    from qwenkit.cli import main

    (tmp_path / "out-lora").mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "/models/base", "r": 8}
    (tmp_path / "out-lora" / "adapter_config.json").write_text(json.dumps(config))
    adapter = tmp_path / "out-lora"
    want = (
        f"{adapter} is a LoRA adapter, not a model: run its base model (/models/base) with --adapter "
        f"{adapter}, or merge them first (qwenkit merge BASE ADAPTER OUT)"
    )
    with pytest.raises(CheckpointError) as e:
        load_model(adapter)
    assert str(e.value) == want
    assert main(["generate", str(adapter), "-p", "hi"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {want}"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="neither a model directory nor a .gguf file"):
        load_model(tmp_path / "x.txt")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", **{"vocab_size": 10}}))
    with pytest.raises(ConfigError, match="missing key 'hidden_size'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(tmp_path)


def test_no_weights(qwen2_dir):
    (qwen2_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_model(qwen2_dir)


def test_corrupt_safetensors(qwen2_dir):
    data = (qwen2_dir / "model.safetensors").read_bytes()
    (qwen2_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(qwen2_dir)


def test_unknown_model_type_and_unsupported_values():
    base = {
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2", **base})
    with pytest.raises(ConfigError, match="unsupported rope_scaling type 'longrope'"):
        ModelConfig.from_hf(
            {"model_type": "qwen2", **base, "rope_scaling": {"type": "longrope", "factor": 2}}
        )
    with pytest.raises(ConfigError, match="use_sliding_window=true makes layer.s. 0 sliding-window"):
        ModelConfig.from_hf(
            {"model_type": "qwen2", **base, "use_sliding_window": True, "max_window_layers": 0}
        )
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads 3"):
        ModelConfig.from_hf({"model_type": "qwen2", **base, "num_key_value_heads": 3})


def test_sharded_index_problems(tmp_path):
    path = write_v1_checkpoint(tmp_path / "v1", shards=2)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = "transformer.ln_f.weight"
    good = dict(index["weight_map"])
    other = next(f for f in set(good.values()) if f != good[moved])
    index["weight_map"][moved] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index maps it to|lacks tensor"):
        load_model(path)
    (path / other).unlink()
    with pytest.raises(CheckpointError, match=f"missing from .*: {other}"):
        load_model(path)


def test_v1_config_reading(tmp_path):
    path = write_v1_checkpoint(tmp_path / "v1", cfg={"rotary_emb_base": 1000000})
    cfg = ModelConfig.from_dir(path)
    assert (cfg.rope_theta, cfg.intermediate_size, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (
        1e6,
        160,
        True,
        False,
        False,
    )
    assert cfg.use_dynamic_ntk and cfg.use_logn_attn and cfg.max_position_embeddings == 32


def test_memory_check_refuses_with_both_numbers(qwen2_dir):
    cfg = ModelConfig.from_dir(qwen2_dir)
    with pytest.raises(OutOfMemoryError, match=r"need \d+\.\d+ GiB, but only 0\.00 GiB is free"):
        check_fits(cfg, torch.float32, "cpu", context=4096, batch=8, free=1000)
    assert check_fits(cfg, torch.float32, "cpu", context=128, free=10**9) > cfg.num_parameters * 4


def test_non_finite_logits_reported(qwen2_dir):
    rewrite(qwen2_dir, lambda sd: sd["model.norm.weight"].fill_(float("nan")))
    model, _ = load_model(qwen2_dir, dtype="float32")
    engine = Engine(model)
    engine.add_request([1, 2, 3], SamplingParams(temperature=0))
    (out,) = engine.step()  # the row fails with a reason; the engine itself keeps going
    assert out.finish_reason == "error" and "NaN/inf logits in float32" in out.error
    assert not engine.has_unfinished() and engine.blocks.usage == 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # int(2.7) once ran a 2-layer model, and bool("false") tied the embeddings of an untied model
        ("num_hidden_layers", 2.7, "config.json: num_hidden_layers must be a whole number, not 2.7"),
        ("hidden_size", "8", "config.json: hidden_size must be a whole number, not '8'"),
        ("vocab_size", True, "config.json: vocab_size must be a whole number, not True"),
        (
            "tie_word_embeddings",
            "false",
            "config.json: tie_word_embeddings must be true or false, not 'false'",
        ),
        ("use_dynamic_ntk", 1, "config.json: use_dynamic_ntk must be true or false, not 1"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_by_name(key, value, message):
    base = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1}
    family = "qwen" if key == "use_dynamic_ntk" else "qwen2"
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({"model_type": family, **base, "num_attention_heads": 2, key: value})
    assert str(e.value) == message
    assert ModelConfig.from_hf({"model_type": "qwen2", **base, "num_attention_heads": 2, "hidden_size": 8.0})


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weight_estimate_is_what_the_loaded_model_holds(tmp_path, quantize):
    """`info`, the memory check and fine-tuning's estimate use weight_bytes; it once left int4's group
    scales out (SmolLM2: 81.7 MiB estimated, 96.0 held). 192 inputs take groups of 64, 384 of 128."""
    from qwenkit.memory import weight_bytes

    path = save_hf(hf_model("qwen2", hidden_size=192, intermediate_size=384), tmp_path / "m")
    model, config = load_model(path, "bfloat16", quantize=quantize, progress=False)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    rope = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" in n or "rope" in n)
    assert weight_bytes(config, torch.bfloat16, quantize) == held - rope


def test_a_bin_holding_other_objects_is_one_line_naming_the_file(qwen2_dir):
    """torch's weights-only refusal is a page of advice with terminal escapes; the user sees one line."""
    (qwen2_dir / "model.safetensors").unlink()
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2), "step": object()}, qwen2_dir / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError) as e:
        load_model(qwen2_dir)
    assert str(e.value) == (
        f"{qwen2_dir / 'pytorch_model.bin'} could not be read as a weights-only PyTorch checkpoint: "
        "it is not a PyTorch file of tensors alone (Unsupported global: GLOBAL object was not an "
        "allowed global by default)"
    )


def test_a_directory_of_gguf_files_names_them(tmp_path, capsys):
    """A GGUF repository downloaded whole (Qwen/Qwen2.5-0.5B-Instruct-GGUF) is a directory without
    config.json: the error names its .gguf files, which are what qwenkit runs."""
    from qwenkit.cli import main

    for name in ("qwen2.5-0.5b-instruct-q8_0.gguf", "qwen2.5-0.5b-instruct-q4_k_m.gguf", "README.md"):
        (tmp_path / name).write_text("x")
    want = (
        f"{tmp_path} is not a model directory: it has no config.json; it holds GGUF files: pass one of them "
        f"({tmp_path / 'qwen2.5-0.5b-instruct-q4_k_m.gguf'}, {tmp_path / 'qwen2.5-0.5b-instruct-q8_0.gguf'})"
    )
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert str(e.value) == want
    assert main(["quantize", str(tmp_path), str(tmp_path.parent / "q"), "--method", "rtn"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {want}"]
