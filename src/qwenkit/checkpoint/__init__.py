"""Checkpoints on disk: find files, read tensors lazily, map names, load into the model, save."""

from qwenkit.checkpoint.loader import load_model, open_checkpoint, resolve_dtype

__all__ = ["load_model", "open_checkpoint", "resolve_dtype"]
