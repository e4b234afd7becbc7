"""GGUF tokenizer metadata -> a ``tokenizers.Tokenizer`` and a ``tokenizer_config.json`` dict.

A GGUF carries no tokenizer.json, only llama.cpp's ``tokenizer.ggml.*`` keys: the vocabulary, the
merges, a type per token and the special ids. For byte-level BPE (``tokenizer.ggml.model == "gpt2"``,
what Qwen, Llama 3 and SmolLM use) we rebuild the same tokenizer transformers builds when it loads a
GGUF, so ids match ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``:

- BPE over the vocabulary and merges, no unk token, no normalizer, byte-level decoder; for Llama 3's
  pre-tokenizers a piece that is a whole token is taken whole, as llama.cpp and Llama 3's own
  tokenizer.json do (transformers' GGUF import merges it, so its ids differ there);
- a pre-tokenizer chosen by ``tokenizer.ggml.pre`` (the split regex the merges were learned with),
  SmolLM's with every number character split off first, as llama.cpp does, else GPT-2's byte-level regex;
- tokens typed CONTROL added as special tokens and USER_DEFINED ones as plain added tokens, so text
  like ``<|im_end|>`` stays one token instead of being cut into pieces.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (1 is NORMAL)

# Split regexes by ``tokenizer.ggml.pre``, written as the tokenizers of those models define them.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
}
# Llama 3's pre-tokenizers, which llama.cpp reads with two defaults of its own. The vocabulary (from
# tiktoken) holds words its merges do not build: a piece that is a whole token is taken as that token, as
# Llama 3's tokenizer.json does (ignore_merges). And text gets the BOS unless the file's
# tokenizer.ggml.add_bos_token says otherwise (some converters did not write it).
# The names llama.cpp reads so (Falcon3's llama-architecture files among them).
_LLAMA3_PRE = frozenset(
    {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"}
)
_SPLITS.update(dict.fromkeys(_LLAMA3_PRE, _LLAMA3_SPLIT))
# SmolLM's: every number character split off on its own before GPT-2's regex (llama.cpp's smollm regexes,
# the Digits(individual_digits) of SmolLM's own tokenizer.json), so " ½" is "Ġ" + "Â½", never "ĠÂ" + "½".
_DIGITS_FIRST_PRE = frozenset({"smollm"})
# Names llama.cpp reads with GPT-2's own regex, the fallback here (as for an older file that names none).
# Any other name (llama.cpp splits text its own way for each, and refuses a name it does not know) is
# refused rather than read with the wrong split.
_GPT2_PRE = frozenset({"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                       "a.x-4.0", "mellum", "modern-bert"})  # fmt: skip
KNOWN_PRE = frozenset(_SPLITS) | _DIGITS_FIRST_PRE | _GPT2_PRE


# Tokens llama.cpp ends a generation on wherever a vocabulary spells them so (llama-vocab.cpp), besides the
# file's eos, eot and eom ids: a Llama 3.x file names <|eot_id|> its eos, and its model also ends on
# <|eom_id|> and <|end_of_text|>, as the Hugging Face release's eos list says.
END_OF_GENERATION_TOKENS = frozenset(
    {
        "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<|return|>",
        "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>", "</s>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "[e~[",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek's, in full-width bars
    }
)  # fmt: skip
# llama.cpp also ends on the fill-in-the-middle pad, repository and file-separator tokens: the file's
# fim_*_token_id keys, else the tokens spelled so (Qwen2.5's <|fim_pad|>, <|repo_name|>, <|file_sep|>;
# SmolLM2's <reponame>).
FIM_END_TOKENS = {
    "fim_pad_token_id": frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}),
    "fim_rep_token_id": frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}),
    "fim_sep_token_id": frozenset({"<|file_sep|>"}),
}
_ENDING_SPELLINGS = END_OF_GENERATION_TOKENS.union(*FIM_END_TOKENS.values())


class TokenizerMetadataError(ValueError):
    """The file's tokenizer keys are missing or describe a tokenizer we cannot build."""


TEMPLATE_KEY = "tokenizer.chat_template"


@dataclass(frozen=True)
class GGUFVocab:
    """The ``tokenizer.*`` keys of a GGUF, read once."""

    model: str
    pre: str | None
    tokens: Sequence[str]
    token_types: Sequence[int]
    merges: Sequence[str]
    special_ids: Mapping[str, int]  # bos/eos/unk/pad -> id, only those the file states
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | list[dict[str, str]] | None  # one, or named ones in tokenizer_config's list form
    end_of_generation_ids: tuple[int, ...] = ()  # the file's eos first, then as llama.cpp finds them

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> GGUFVocab:
        """Collect the tokenizer keys; raise if there is no usable vocabulary."""
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerMetadataError("the file carries no tokenizer (no tokenizer.ggml.model)")
        if model != "gpt2":
            raise TokenizerMetadataError(
                f"tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') is"
            )
        tokens = metadata.get("tokenizer.ggml.tokens")
        merges = metadata.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise TokenizerMetadataError("a byte-level BPE tokenizer needs tokenizer.ggml.tokens and .merges")
        types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) < len(tokens):  # llama.cpp refuses a short list too; a longer one it reads
            raise TokenizerMetadataError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        for key, value in _out_of_range_ids(metadata, len(tokens)).items():
            print(
                f"qwenkit: tokenizer.ggml.{key} {value} is outside the vocabulary ({len(tokens)} tokens); "
                "ignored, as llama.cpp ignores it",
                file=sys.stderr,
            )
        stated = special_token_ids(metadata, len(tokens))
        names = {
            "bos": "bos_token_id",
            "eos": "eos_token_id",
            "unk": "unknown_token_id",
            "pad": "padding_token_id",
        }
        special_ids = {role: stated[key] for role, key in names.items() if key in stated}
        ends = [stated[key] for key in ("eos_token_id", "eot_token_id", "eom_token_id") if key in stated]
        # one pass over the vocabulary (150k tokens for Qwen, at every load) finds every spelling looked for
        spelled = [(i, t) for i, t in enumerate(tokens) if t in _ENDING_SPELLINGS]
        ends += [i for i, t in spelled if t in END_OF_GENERATION_TOKENS]
        for key, spellings in FIM_END_TOKENS.items():
            ends += [stated[key]] if key in stated else [i for i, t in spelled if t in spellings]
        pre = metadata.get("tokenizer.ggml.pre")
        if pre is not None and pre not in KNOWN_PRE:
            raise TokenizerMetadataError(
                f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) splits text in a way qwenkit does not know; "
                f"it reads {', '.join(sorted(KNOWN_PRE))}"
            )
        return cls(
            model=model,
            pre=pre,
            tokens=tokens,
            token_types=types[: len(tokens)],
            merges=merges,
            special_ids=special_ids,
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_PRE)),
            add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=chat_templates(metadata),
            end_of_generation_ids=_without_exceptions(tuple(dict.fromkeys(ends)), tokens),
        )


def chat_templates(metadata: Mapping[str, Any]) -> str | list[dict[str, str]] | None:
    """The file's chat templates: ``tokenizer.chat_template``, with the named ones gguf-py writes as
    ``tokenizer.chat_template.<name>`` (a model's "tool_use", which llama.cpp renders when tools are
    passed) in tokenizer_config.json's list form, the first named "default"."""
    default = metadata.get(TEMPLATE_KEY)
    named = [
        {"name": key.removeprefix(f"{TEMPLATE_KEY}."), "template": value}
        for key, value in metadata.items()
        if key.startswith(f"{TEMPLATE_KEY}.") and isinstance(value, str)
    ]
    if not named:
        return default
    return [{"name": "default", "template": default}, *named] if isinstance(default, str) else named


def _without_exceptions(ends: tuple[int, ...], tokens: Sequence[str]) -> tuple[int, ...]:
    """``ends`` less what llama.cpp takes back out of its list: <|end|> where a call (<|call|>, or
    <|calls|>: llama.cpp counts them alike) and <|return|> (gpt-oss) or <|flush|> (Solar Open) end too,
    which close a message there, not the generation; and </s> where <|tool_response> ends too (Gemma 4,
    whose </s> is ordinary text)."""
    spelled = {tokens[i]: i for i in ends}
    drop = set()
    calls = "<|call|>" in spelled or "<|calls|>" in spelled
    if "<|end|>" in spelled and calls and ("<|return|>" in spelled or "<|flush|>" in spelled):
        drop.add(spelled["<|end|>"])
    if "</s>" in spelled and "<|tool_response>" in spelled:
        drop.add(spelled["</s>"])
    return tuple(i for i in ends if i not in drop)


_SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id",
                    "eom_token_id", *FIM_END_TOKENS)  # fmt: skip


def _stated_ids(metadata: Mapping[str, Any]) -> dict[str, int]:
    """The ``tokenizer.ggml.*_token_id`` keys the file states, by key without the prefix."""
    return {
        key: int(metadata[f"tokenizer.ggml.{key}"])
        for key in _SPECIAL_ID_KEYS
        if metadata.get(f"tokenizer.ggml.{key}") is not None
    }


def _out_of_range_ids(metadata: Mapping[str, Any], n_tokens: int) -> dict[str, int]:
    return {key: i for key, i in _stated_ids(metadata).items() if not 0 <= i < n_tokens}


def special_token_ids(metadata: Mapping[str, Any], n_tokens: int | None = None) -> dict[str, int]:
    """The file's special ids (``bos_token_id``, ``eos_token_id``, ...) that name a token of its vocabulary
    (``n_tokens`` long, by default the length of ``tokenizer.ggml.tokens``): llama.cpp warns about one past
    the end and ignores it, and so does qwenkit."""
    if n_tokens is None:
        n_tokens = len(metadata.get("tokenizer.ggml.tokens") or ())
    return {key: i for key, i in _stated_ids(metadata).items() if 0 <= i < n_tokens}


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are moved to U+0100 onward.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """The byte-level BPE tokenizer the vocabulary describes (see the module docstring)."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written outside the byte alphabet (rare; some converters store raw text) is respelled the
    # way transformers does, so lookups agree. One check over all tokens first: that is the common case,
    # and per-token checks took a third of this function's time at every start.
    if set("".join(vocab.tokens)) <= alphabet:
        index = dict(zip(vocab.tokens, range(len(vocab.tokens)), strict=True))
    else:
        index = {
            token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): i
            for i, token in enumerate(vocab.tokens)
        }
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    if (bad := next((i for i, m in enumerate(merges) if len(m) != 2), None)) is not None:
        raise TokenizerMetadataError(
            f"tokenizer.ggml.merges[{bad}] is {vocab.merges[bad]!r}, not two tokens split by a space"
        )
    try:
        model = BPE(vocab=index, merges=merges, dropout=None, continuing_subword_prefix="",
                    end_of_word_suffix="", fuse_unk=False,
                    ignore_merges=vocab.pre in _LLAMA3_PRE)  # fmt: skip
    except Exception as e:  # tokenizers raises a bare Exception ("Token `x` out of vocabulary")
        raise TokenizerMetadataError(f"tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}") from None
    tok = Tokenizer(model)
    split = _SPLITS.get(vocab.pre or "")
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif vocab.pre in _DIGITS_FIRST_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    # CONTROL tokens spelled in the byte alphabet are special; one that is not is a llama.cpp mislabel.
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(vocab.tokens, vocab.token_types, strict=True)
        if kind == CONTROL and set(t) <= alphabet
    ]
    tok.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(vocab.tokens, vocab.token_types, strict=True)
        if kind == USER_DEFINED and t in index
    ]
    tok.add_tokens(user)
    tok.post_processor = _post_processor(vocab)
    return tok


def _post_processor(vocab: GGUFVocab) -> processors.TemplateProcessing:
    """Add BOS/EOS around each sequence only where the file asks for it (Qwen and SmolLM do not)."""
    ids = vocab.special_ids
    bos = vocab.tokens[ids["bos"]] if vocab.add_bos_token and "bos" in ids else None
    eos = vocab.tokens[ids["eos"]] if vocab.add_eos_token and "eos" in ids else None

    def sequence(piece: str, type_id: int) -> list[str]:
        return [
            *([f"{bos}:{type_id}"] if bos else []),
            f"${piece}:{type_id}",
            *([f"{eos}:{type_id}"] if eos else []),
        ]

    specials = {token: ids[role] for role, token in (("bos", bos), ("eos", eos)) if token is not None}
    return processors.TemplateProcessing(
        single=sequence("A", 0),
        pair=sequence("A", 0) + sequence("B", 1),
        special_tokens=list(specials.items()),
    )


def build_tokenizer_config(
    vocab: GGUFVocab, tokenizer: Tokenizer, model_max_length: int | None
) -> dict[str, Any]:
    """A ``tokenizer_config.json`` dict: special tokens by text, the chat template, the added tokens."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as written, no rebuilding
        "add_bos_token": vocab.add_bos_token,
        "add_eos_token": vocab.add_eos_token,
        "clean_up_tokenization_spaces": False,
    }
    for role, token_id in vocab.special_ids.items():
        config[f"{role}_token"] = vocab.tokens[token_id]
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    config["added_tokens_decoder"] = {
        str(token_id): {
            "content": added.content,
            "lstrip": added.lstrip,
            "normalized": added.normalized,
            "rstrip": added.rstrip,
            "single_word": added.single_word,
            "special": added.special,
        }
        for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return config
