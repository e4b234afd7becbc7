"""The user's cache directories, worked out in one place.

A leaf like ``errors.py``: it imports nothing of qwenkit but the leaves ``errors`` and ``notes``, so every
layer (``kernels/`` included) may use it. ``cache_root()`` holds what qwenkit derives from checkpoints and
data (parsed GGUF headers, prepared models, benchmark wheels): ``$QWENKIT_CACHE``, else ``~/.cache/qwenkit``.
``home_cache()`` is the ``~/.cache`` under it, which the kernels' build cache also starts from.

Without ``HOME``, Python takes the home directory from the password database; a container run under an
arbitrary user id (``docker run --user 12345``, a Kubernetes ``runAsUser``) has no entry there, and
``Path.home()`` raises RuntimeError. Here that is :class:`NoCacheDirError`, one line naming the fix; a cache
that only makes starts faster asks :func:`cache_root_or_none` instead and runs without it, said once.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwenkit.errors import QwenkitError
from qwenkit.notes import say_once

ENV = "QWENKIT_CACHE"


class NoCacheDirError(QwenkitError, RuntimeError):
    """There is no home directory to put a cache under, and no variable names one."""


def home_cache(fix: str = ENV) -> Path:
    """``~/.cache``; NoCacheDirError (``fix``: the variable that would name a directory) without a home."""
    try:
        return Path.home() / ".cache"
    except RuntimeError:  # no HOME, and the user id has no entry in the password database
        uid = os.getuid() if hasattr(os, "getuid") else "?"
        raise NoCacheDirError(
            f"no cache directory: HOME is not set and user id {uid} has no home in the password "
            f"database; set HOME or {fix}"
        ) from None


def cache_root() -> Path:
    """``$QWENKIT_CACHE``, else ``~/.cache/qwenkit``; NoCacheDirError when neither can be known."""
    named = os.environ.get(ENV)
    return Path(named) if named else home_cache() / "qwenkit"


def cache_root_or_none() -> Path | None:
    """:func:`cache_root` for a cache that only makes starts faster: None without one (said once)."""
    try:
        return cache_root()
    except NoCacheDirError as e:
        say_once(f"{e}; running without the cache (slower starts)")
        return None
