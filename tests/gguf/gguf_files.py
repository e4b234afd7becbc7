"""Writing small GGUF files the way llama.cpp's converter lays them out (names, permutation, types)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES

from qwenkit.checkpoint.gguf_tokenizer import bytes_to_unicode

Q = gguf.GGMLQuantizationType
_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "qwen": gguf.MODEL_ARCH.QWEN, "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE,
         "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}  # fmt: skip


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
USER_DEFINED = ["<think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Three control tokens, the 256 byte tokens, the merge results, and one user-defined token."""
    tokens = [*SPECIALS, *bytes_to_unicode().values()]
    tokens += ["".join(m.split(" ")) for m in MERGES] + USER_DEFINED
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - len(USER_DEFINED)) + [4]
    return tokens, types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` for q/k rows, as its converter applies it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, Any]:
    """Array and raw_dtype to hand GGUFWriter.add_tensor. 1-D tensors stay F32, as llama.cpp keeps them."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1 or qtype == Q.F32:
        return w, None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype


def write_gguf(
    path: Path,
    arch: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    qtype: gguf.GGMLQuantizationType = Q.F16,
    *,
    tokenizer: bool = True,
    add_bos: bool = False,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """A GGUF file of ``state`` (Hugging Face names; Qwen v1 names for ``qwen``) with llama.cpp's names,
    from gguf-py's own tensor-name map, and llama.cpp's metadata keys. ``add_bos``: the file's
    tokenizer.ggml.add_bos_token (as Llama's GGUFs have it; Qwen's and SmolLM2's do not)."""
    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(_ARCH[arch], n_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_license("apache-2.0")
    w.add_block_count(n_layers)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    ffn = config["intermediate_size"]
    w.add_feed_forward_length(ffn * 2 if arch == "qwen" else ffn)  # v1's config convention
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    if config.get("head_dim"):
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
        w.add_rope_dimension_count(config["head_dim"])
    if tokenizer:
        tokens, types = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(MERGES)
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(add_bos)
        w.add_chat_template(CHAT_TEMPLATE)
    if extra is not None:
        extra(w)
    for hf, tensor in state.items():
        base, suffix = hf.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf
        data = tensor.detach().float().numpy()
        if arch == "llama" and gguf_name.endswith(("attn_q", "attn_k")):
            heads = (
                config["num_attention_heads"]
                if gguf_name.endswith("attn_q")
                else config["num_key_value_heads"]
            )
            data = llama_cpp_permute(data, heads)
        array, raw = encode(data, qtype)
        w.add_tensor(f"{gguf_name}.{suffix}", array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


QUANTIZED_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_quantized_qwen2(
    path: Path,
    model: torch.nn.Module,
    blocks_for: Callable[[str, torch.Tensor, int], tuple[np.ndarray, gguf.GGMLQuantizationType]],
    also: tuple[str, ...] = ("model.embed_tokens.weight",),
) -> tuple[Path, dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]]:
    """A Qwen2 GGUF of ``model`` whose projections (and the weights named in ``also``) are the raw blocks
    ``blocks_for(name, weight, index)`` makes (``index``: a seed, 0, 1, ... in file order); the rest
    (norms, biases, an untied head not in ``also``) F32, as llama.cpp writes them. Returns the path and
    the blocks by name."""
    state = {n: p.detach() for n, p in model.state_dict().items()}
    blocks: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    for name in list(state):
        part = name.split(".")[-2]
        if (part in QUANTIZED_PARTS and name.endswith(".weight")) or name in also:
            blocks[name] = blocks_for(name, state.pop(name), len(blocks))
    layers = model.config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)

    def extra(w: gguf.GGUFWriter) -> None:
        for name, (data, qtype) in blocks.items():
            w.add_tensor(f"{names.get_name(name.rsplit('.', 1)[0])}.weight", data, raw_dtype=qtype)

    config = model.config.to_dict()
    return write_gguf(path, "qwen2", config, state, gguf.GGMLQuantizationType.F32, extra=extra), blocks


def q6_k_blocks(out_f: int, in_f: int, seed: int) -> np.ndarray:
    """Random Q6_K super-blocks (ql 128, qh 64, 16 int8 scales, float16 d) with small scales."""
    _, size = GGML_QUANT_SIZES[Q.Q6_K]
    g = np.random.default_rng(seed)
    b = g.integers(0, 256, size=(out_f * in_f // 256, size), dtype=np.uint8)
    b[:, 192:208] = g.integers(-8, 9, size=(b.shape[0], 16)).astype(np.int8).view(np.uint8)
    b[:, 208:210] = (g.random((b.shape[0], 1)) * 2e-3).astype(np.float16).view(np.uint8)
    return b.reshape(out_f, -1)


def llama_cpp_rope_freqs(theta: float, head_dim: int, factor: float, low: float, high: float, original: int):
    """The rope_freqs.weight llama.cpp's converter writes for a llama3 rope_scaling: per frequency, the
    divisor of its Llama 3.1 scaling (1 for short wavelengths, factor for long ones, blended between)."""
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            blend = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - blend) / factor + blend))
    return np.array(divisors, np.float32)


def write_llama32_gguf(hf_dir: Path, path: Path, add_bos_key: bool = True) -> Path:
    """A Hugging Face Llama 3.2 Instruct-layout directory (``write_llama32_chat_model``) as llama.cpp's
    converter writes it: F32 tensors, the llama3 rope scaling as rope_freqs.weight, the byte-level BPE
    with pre-tokenizer ``llama-bpe``, its added tokens as control tokens, the tokenizer_config's eos
    (``<|eot_id|>``, the one eos a GGUF names), add_bos_token true (``add_bos_key`` False: no such key,
    as in files from converters that did not write it), the chat template."""
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    chat_template = json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    added = {t["id"]: t["content"] for t in tokenizer["added_tokens"]}
    tokens = [added.get(i, by_id.get(i)) for i in range(config["vocab_size"])]
    types = [3 if i in added else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    scaling = config["rope_scaling"]
    freqs = llama_cpp_rope_freqs(
        config["rope_theta"],
        config["head_dim"],
        scaling["factor"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
        scaling["original_max_position_embeddings"],
    )

    def llama3(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(added_id(added, "<|begin_of_text|>"))
        w.add_eos_token_id(added_id(added, "<|eot_id|>"))
        w.add_pad_token_id(added_id(added, "<|finetune_right_pad_id|>"))
        if add_bos_key:
            w.add_add_bos_token(True)
        w.add_chat_template(chat_template)
        w.add_tensor("rope_freqs.weight", freqs)

    state = load_file(str(hf_dir / "model.safetensors"))
    return write_gguf(path, "llama", config, state, Q.F32, tokenizer=False, extra=llama3)


def added_id(added: dict[int, str], text: str) -> int:
    (token_id,) = [i for i, t in added.items() if t == text]
    return token_id


RERANK_TEMPLATE = (  # llama.cpp's converter's "rerank" chat template (conversion/qwen.py, Qwen3Model)
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def write_qwen3_reranker_gguf(
    hf_dir: Path,
    path: Path,
    *,
    labels: tuple[str, ...] = ("yes", "no"),
    rows: tuple[str, ...] | None = None,
    qtype: gguf.GGMLQuantizationType = Q.F32,
    pooling: gguf.PoolingType = gguf.PoolingType.RANK,
) -> Path:
    """A Qwen3-Reranker directory (``write_tiny_chat_model``) as llama.cpp's converter writes it
    (conversion/qwen.py, Qwen3Model with is_rerank): pooling rank (or ``pooling``), classifier
    output_labels ``labels``, the named "rerank" chat template, and ``cls.output.weight``: the head's
    rows of the tokens ``rows`` (default: the labels; () writes no cls.output), the head being the
    embeddings where tied (then token_embd stays) and lm_head otherwise (then no output.weight is
    written). The Qwen3 vocabulary as its converter writes it: added special tokens (and those that
    look special) as control tokens, the others user-defined, the ids past the tokenizer as
    ``[PAD{i}]`` unused ones."""
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    chat_template = json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    added = {t["id"]: t for t in tokenizer["added_tokens"]}
    tokens, types = [], []
    for i in range(config["vocab_size"]):
        if i in added:
            text = added[i]["content"]
            special = added[i]["special"] or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(3 if special else 4)
        else:
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(1 if i in by_id else 5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    state = load_file(str(hf_dir / "model.safetensors"))
    tied = config.get("tie_word_embeddings", False)
    head = state["model.embed_tokens.weight"] if tied else state.pop("lm_head.weight")
    picked = labels if rows is None else rows

    def reranker(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(added_id({i: t["content"] for i, t in added.items()}, "<|im_end|>"))
        w.add_pad_token_id(added_id({i: t["content"] for i, t in added.items()}, "<|endoftext|>"))
        w.add_add_bos_token(False)
        w.add_pooling_type(pooling)
        w.add_classifier_output_labels(list(labels))
        w.add_chat_template(
            [{"name": "default", "template": chat_template}, {"name": "rerank", "template": RERANK_TEMPLATE}]
        )
        if picked:
            cls = torch.stack([head[tokens.index(t)] for t in picked]).float().numpy()
            array, raw = encode(cls, qtype)
            w.add_tensor("cls.output.weight", array, raw_dtype=raw)

    return write_gguf(path, "qwen3", config, state, qtype, tokenizer=False, extra=reranker)
