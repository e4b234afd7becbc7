"""Llama checkpoints' tokenizers, whose models want a BOS, in the layouts they ship, built in the test run.

Llama-2: a SentencePiece-style BPE (byte fallback, "▁" for spaces) with ``"add_bos_token": true`` in
tokenizer_config.json. Llama-3: a byte-level BPE whose tokenizer.json post_processor prepends
``<|begin_of_text|>`` and whose tokenizer_config.json says nothing about BOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from factories import hf_model, hf_model_from_config_json, qwen3_tokenizer_dir
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Meta's chat template of Llama 3.2 1B/3B Instruct (tokenizer_config.json), as data: tools rendered into
# the first user message as JSON, calls answered as bare {"name", "parameters"} JSON, "ipython" results.
LLAMA32_TEMPLATE = (Path(__file__).parent / "llama32_chat_template.jinja").read_text()
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "12345 héllo 世界"]


def write_llama2_tokenizer(path: Path, *, post_processor: bool = True) -> Path:
    """A Llama-2-layout tokenizer: <unk>/<s>/</s> at 0-2, byte fallback, add_bos_token true.

    ``post_processor``: tokenizer.json carries Llama-2's own ``<s> $A`` template (as published); without
    it only tokenizer_config.json's add_bos_token asks for the BOS.
    """
    specials = ["<unk>", "<s>", "</s>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = BpeTrainer(vocab_size=400, special_tokens=specials + bytes_, show_progress=False)
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # merges within words
    tok.train_from_iterator([*TEXTS, "a b c d e f g h i j k l m n o p", "Answer: A B C D"] * 5, trainer)
    tok.pre_tokenizer = None  # as Llama-2's tokenizer.json: the merges alone keep words apart
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {
            "__type": "AddedToken",
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": LLAMA2_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def write_llama3_tokenizer(path: Path) -> Path:
    """A Llama-3-layout tokenizer: byte-level BPE (Qwen3's vocabulary, for a real one) with Llama-3's
    special tokens and its tokenizer.json post_processor, ByteLevel then ``<|begin_of_text|> $A``."""
    tok = Tokenizer.from_file(str(qwen3_tokenizer_dir() / "tokenizer.json"))
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens([AddedToken(n, normalized=False, special=True) for n in names])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def write_tiny_llama(path: Path) -> Path:
    """A random tiny Llama model with the Llama-2-layout tokenizer: a checkpoint whose prompts need a BOS."""
    hf_model("llama").save_pretrained(path)  # 512 ids, past the tokenizer's
    return write_llama2_tokenizer(path)


# Llama 3's pre-tokenizer split (tokenizer.json), then byte-level without its own regex.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's special tokens at their ids; the rest of 128000-128255 are <|reserved_special_token_N|>.
LLAMA3_SPECIALS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
}
LLAMA32_EOS = [128001, 128008, 128009]  # config.json and generation_config.json of Llama 3.2 Instruct


def write_llama32_chat_model(path: Path) -> Path:
    """A tiny random Llama 3.2 Instruct-layout checkpoint: ``LlamaForCausalLM`` with llama3 rope scaling,
    tied embeddings, 128,256 ids and Llama 3.2's eos list; a byte-level BPE tokenizer.json with Llama 3's
    split regex and specials at their real ids (a small trained vocabulary padded to 128,000 regular ids),
    its ``<|begin_of_text|> $A`` post_processor; Meta's chat template; generation_config.json.

    The weights make a varied greedy reply (unit-scale rows for the trained tokens, small ones for the
    padding and specials), so a test can make one token likelier by copying another's row onto it."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Regex

    base = 128000
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    texts = [
        *TEXTS,
        "user assistant system",
        "What is the weather in Paris?",
        "Thought: Action: Final Answer:",
    ]
    trainer = BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts * 5, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    trained = len(vocab)
    # Padding words no merge makes ("Ġzqab"...): as in Llama 3's tokenizer.json (ignore_merges), a piece
    # that is a whole token is that token, so " zqab" is one id here, not letters merged.
    vocab |= {"Ġzq" + _letters(i - trained): i for i in range(trained, base)}
    data["model"]["ignore_merges"] = True
    names = {i: n for n, i in LLAMA3_SPECIALS.items()}
    data["added_tokens"] = [
        {
            "id": i,
            "content": names.get(i, f"<|reserved_special_token_{i - base}|>"),
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in range(base, base + 256)
    ]
    bos = "<|begin_of_text|>"
    data["post_processor"] = json.loads(
        processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, base)]
                ),
            ]
        ).__getstate__()
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(data))
    config = {
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]
        },
        "bos_token": bos,
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA32_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": base,
        "eos_token_id": LLAMA32_EOS,
        "head_dim": 64,  # as Llama 3.2 1B: three frequencies in the llama3 blend
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 131072,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vocab_size": base + 256,
    }
    hf_model_from_config_json(path, model_config)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    g = torch.Generator().manual_seed(1)
    for name, t in state.items():
        if "proj" in name:
            state[name] = torch.randn(t.shape, generator=g) * 0.3
    embed = torch.randn(state["model.embed_tokens.weight"].shape, generator=g)
    embed[trained:] *= 0.05
    state["model.embed_tokens.weight"] = embed
    save_file(state, str(weights), metadata={"format": "pt"})
    generation = {
        "bos_token_id": base,
        "eos_token_id": LLAMA32_EOS,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def _letters(n: int) -> str:
    """``n`` written in base 26 with the letters a-z (fixed width 4)."""
    out = ""
    for _ in range(4):
        n, r = divmod(n, 26)
        out = chr(ord("a") + r) + out
    return out
