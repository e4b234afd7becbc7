"""Tokenizers: encode/decode, special and stop tokens, chat templates, streaming detokenization.

Qwen v1 uses `qwen.tiktoken` through tiktoken; everything later uses `tokenizer.json` through the
`tokenizers` library. Both sit behind the same `Tokenizer` interface.
"""

from qwenkit.tokenizer.base import Tokenizer
from qwenkit.tokenizer.chat_template import chatml_template
from qwenkit.tokenizer.chatml import STOP_WORDS_IDS, encode_chatml, make_context
from qwenkit.tokenizer.errors import TokenizerError
from qwenkit.tokenizer.hf import HFTokenizer
from qwenkit.tokenizer.loader import load_tokenizer
from qwenkit.tokenizer.qwen_v1 import QwenV1Tokenizer
from qwenkit.tokenizer.streaming import StreamingDetokenizer

__all__ = [
    "STOP_WORDS_IDS",
    "HFTokenizer",
    "QwenV1Tokenizer",
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "chatml_template",
    "encode_chatml",
    "load_tokenizer",
    "make_context",
]
