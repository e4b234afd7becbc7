"""The user's cache directory for files qwenkit derives from checkpoints (parsed headers, packed models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$QWENKIT_CACHE``, else ``~/.cache/qwenkit``."""
    return Path(os.environ.get("QWENKIT_CACHE") or Path.home() / ".cache" / "qwenkit")
