"""The error types users see. Each carries a one-line message naming the problem; the CLI prints it."""


class QwenkitError(Exception):
    """Base of every error qwenkit reports to a user (printed as one line, no traceback)."""


class ConfigError(QwenkitError, ValueError):
    """config.json is missing, malformed, or asks for something qwenkit does not support."""


class CheckpointError(QwenkitError, ValueError):
    """Weights are missing, unexpected, mis-shaped, or the directory is not a checkpoint."""


class AdapterNotFound(CheckpointError):
    """No adapter at the path: no directory there, or one without an adapter config. Here, not in
    ``finetune/``, so the server can answer it without importing the side room."""


class OutOfMemoryError(QwenkitError, MemoryError):
    """The weights and KV cache would not fit in the memory that is free."""


class GenerationError(QwenkitError, RuntimeError):
    """A request failed while it ran (the engine reports why; other requests are unaffected)."""


class RankLostError(QwenkitError, RuntimeError):
    """A tensor-parallel collective failed: another rank died or stopped answering (the launcher, which
    watches the processes, names the rank)."""


class ModelClosedError(QwenkitError, RuntimeError):
    """A request (or an adapter change) reached a model after ``LLM.close``: load it again to use it."""


class NonFiniteLogitsError(GenerationError, FloatingPointError):
    """The model produced NaN or inf logits (fp16 overflow, a broken checkpoint)."""
