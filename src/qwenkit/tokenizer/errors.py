"""The tokenizer layer's one error type, so callers (and the CLI) can print it as a single line."""

from qwenkit.errors import QwenkitError


class TokenizerError(QwenkitError, ValueError):
    """Tokenizer files are missing or malformed, or a chat template failed to render."""
