"""The network: knows nothing of tokens, text, engines or servers."""

from qwenkit.model.attention import AttentionInputs, KVCache
from qwenkit.model.transformer import Transformer

__all__ = ["AttentionInputs", "KVCache", "Transformer"]
