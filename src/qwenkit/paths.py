"""Why a path given as an input file is not one, in words a user can act on.

A leaf like ``errors.py``: it imports nothing of qwenkit, so every layer may use it. ``Path.is_file()``
is False alike for a missing path, a named pipe, ``/dev/null`` and a loop of symbolic links, and the
readers said "does not exist" (or "no such file") for all of them, sending the user looking for a file
that is there.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def not_a_file(path: str | Path) -> str | None:
    """None when ``path`` is a regular file (or a link to one); else what it is, to follow the path in a
    sentence: "does not exist", "is a directory", "is a named pipe (FIFO), not a regular file", ...
    A path that cannot be examined for another reason (permission) gives None: reading it then raises
    the OSError that says so."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        if p.is_symlink():
            return f"is a symbolic link to {os.readlink(p)}, which does not exist"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"
