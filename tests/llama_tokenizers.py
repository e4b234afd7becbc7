"""Llama checkpoints' tokenizers, whose models want a BOS, in the layouts they ship, built in the test run.

Llama-2: a SentencePiece-style BPE (byte fallback, "▁" for spaces) with ``"add_bos_token": true`` in
tokenizer_config.json. Llama-3: a byte-level BPE whose tokenizer.json post_processor prepends
``<|begin_of_text|>`` and whose tokenizer_config.json says nothing about BOS.
"""

from __future__ import annotations

import json
from pathlib import Path

from factories import hf_model, qwen3_tokenizer_dir
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
