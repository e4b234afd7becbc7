"""Convert Qwen v1's `qwen.tiktoken` into Hugging Face tokenizer files with the same ids.

The result is the Qwen1.5 layout (qwen_facts §6.5): vocab.json, merges.txt, tokenizer.json (NFC ->
Split(Qwen regex, isolated) + ByteLevel -> BPE, ByteLevel decoder) and tokenizer_config.json with the
ChatML template. Merges are rebuilt the llama.cpp way (§6.6): replay rank-BPE on each token's bytes,
stopping before any merge ranked at or above the token itself; the two parts left are its merge. That
gives one merge per multi-byte token, in rank order, so BPE reproduces tiktoken's ids exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from qwenkit.tokenizer.byte_level import bytes_to_piece
from qwenkit.tokenizer.chat_template import chatml_template
from qwenkit.tokenizer.errors import TokenizerError
from qwenkit.tokenizer.qwen_v1 import ENDOFTEXT, IM_END, IM_START, PAT_STR, SPECIAL_TOKENS, load_tiktoken_bpe


def _split(token: bytes, ranks: Mapping[bytes, int], max_rank: int) -> list[bytes]:
    """Rank-BPE over `token`'s bytes using only merges ranked below `max_rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One (left, right) merge per multi-byte token, ordered by the merged token's rank."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _split(token, ranks, rank)
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) cannot be built from one merge")
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer(
    ranks: Mapping[bytes, int], special_tokens: Mapping[str, int] = SPECIAL_TOKENS
) -> tuple[tokenizers.Tokenizer, dict[str, int], list[tuple[str, str]]]:
    """(tokenizers.Tokenizer, vocab, merges) for tiktoken `ranks`; specials added at their own ids."""
    vocab = {bytes_to_piece(token): rank for token, rank in ranks.items()}
    if len(vocab) != len(ranks) or sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError("tiktoken ranks must be the distinct ids 0..n-1")
    merges = [(bytes_to_piece(a), bytes_to_piece(b)) for a, b in bpe_merges(ranks)]
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, token_id in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        if token_id != tok.get_vocab_size(with_added_tokens=True):
            raise TokenizerError(f"special token {content} id {token_id} leaves a gap in the vocabulary")
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    return tok, vocab, merges


def tokenizer_config(
    special_tokens: Mapping[str, int] = SPECIAL_TOKENS, model_max_length: int = 32768
) -> dict:
    """tokenizer_config.json for the converted tokenizer: ChatML, eos <|im_end|>, pad <|endoftext|>."""
    added: dict[str, Any] = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for content, token_id in sorted(special_tokens.items(), key=lambda kv: kv[1])
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": chatml_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def convert_tiktoken(
    tiktoken_file: str | Path, out_dir: str | Path, *, model_max_length: int = 32768
) -> tokenizers.Tokenizer:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json for `qwen.tiktoken` into
    `out_dir` (created if needed); returns the built tokenizer."""
    ranks = load_tiktoken_bpe(tiktoken_file)
    tok, vocab, merges = build_tokenizer(ranks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = tokenizer_config(model_max_length=model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tok
