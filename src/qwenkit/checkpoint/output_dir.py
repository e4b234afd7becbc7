"""Write a model directory (or one file) so that a half-written one never looks complete.

Everything goes into a private temporary sibling; only a finished directory is renamed into place (an
existing one is moved aside first and deleted afterwards). Any failure — disk full, Ctrl-C, a failed
verification — removes the temporary directory. A process killed outright (SIGKILL, the OOM killer, a
lost machine) cannot clean up: its temporary directory names its process and machine, so the next run
for the same output removes it once that process is gone. One killed between moving the old output
aside and renaming the new one in leaves no output, the previous one only in ``.OUT.old-*``: the next
run then removes nothing and says where that is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from qwenkit.errors import CheckpointError
from qwenkit.sigterm import terminate_unwinds


def check_out_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an existing ``out`` without ``overwrite``, and any ``out`` that would replace ``source``."""
    if source is not None and source.exists():
        src_r, out_r = source.resolve(), out.resolve()
        if out_r == src_r or src_r.is_relative_to(out_r):
            raise CheckpointError(f"output {out} would replace the source {source}; choose another directory")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.exists() and os.path.ismount(out):  # renaming it aside would fail, after all the work
        raise CheckpointError(
            f"{out} is a mount point, which --overwrite cannot replace; write into a new directory inside it"
        )
    check_writable(out)


def nearest_existing(path: Path) -> Path:
    """The nearest existing ancestor of ``path``: where its missing parents will be made, so the
    filesystem (and permissions) it will be written on."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_writable(path: Path) -> None:
    """Refuse, before any work, a ``path`` that cannot be created: an ancestor that is a file, or a
    nearest existing directory this user may not write in, or one on a filesystem of no size such as
    /proc (the work would be lost at the end)."""
    parent = nearest_existing(path)
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {path}: no permission to write in {parent}")
    if shutil.disk_usage(parent).total == 0:
        raise CheckpointError(f"cannot write {path}: {parent} is on a filesystem that holds no files")


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block finishes without error."""
    # Absolute and normalized: "." or "sub/.." would put the temporary directory inside ``out`` itself
    # (``Path(".").parent`` is ".") and could not be renamed.
    out = Path(os.path.abspath(out))
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    aside = _left_aside(out)
    if aside is None:
        _remove_dead_staging(out)
    else:  # the user's only copy of the previous output: nothing is removed while it is there
        pid, previous = aside
        print(
            f"qwenkit: {out} is missing: a run (process {pid}) was killed while replacing it; "
            f"the previous output is in {previous}; nothing was removed",
            file=sys.stderr,
        )
    # named before it is made: a SIGTERM unwinding between mkdtemp's mkdir and the assignment of what it
    # returns (Python code, where a signal handler can raise) left the directory behind, unnamed
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}.{_host_tag()}.{secrets.token_hex(4)}"
    try:
        tmp.mkdir(mode=0o700)
        with terminate_unwinds():  # SIGTERM unwinds too, so the except below removes tmp
            yield tmp
            _publish_permissions(tmp)
            _replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, out)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _host_tag() -> str:
    """A short tag of this machine's name: a process id means nothing on another machine (or in another
    container) writing to the same shared directory."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _left_aside(out: Path) -> tuple[str, Path] | None:
    """Where a run on this machine, killed between moving ``out`` aside and renaming its new output in,
    left the previous ``out`` (with that run's process id), if ``out`` is missing and it did."""
    if out.exists() or out.is_symlink():
        return None
    pattern = re.compile(rf"\.{re.escape(out.name)}\.old-(\d{{1,9}})\.{_host_tag()}\.[^/]+")
    with contextlib.suppress(OSError):
        for aside in sorted(out.parent.iterdir()):
            m = pattern.fullmatch(aside.name)
            if m is not None and not _alive(int(m.group(1))) and (aside / out.name).is_dir():
                return m.group(1), aside / out.name
    return None


def _remove_dead_staging(out: Path) -> None:
    """Remove ``out``'s temporary directories left by runs on this machine whose process is gone (killed
    outright, so nothing unwound), saying so in one line each. A live process's directory, another
    machine's, or one without a process id in its name (from an older version) is left alone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.partial-(\d{{1,9}})\.{_host_tag()}\.[^/]+")
    with contextlib.suppress(OSError):  # an unreadable directory: the write itself will say so
        for staged in out.parent.iterdir():
            m = pattern.fullmatch(staged.name)
            if m is None or _alive(int(m.group(1))) or not staged.is_dir() or staged.is_symlink():
                continue
            shutil.rmtree(staged, ignore_errors=True)
            if not staged.exists():
                print(
                    f"qwenkit: removed {staged}, left by an interrupted run (process {m.group(1)})",
                    file=sys.stderr,
                )


@contextmanager
def atomic_file(path: str | Path) -> Iterator[TextIO]:
    """Yield a text file (UTF-8) that becomes ``path`` when the block finishes without error. A failure
    (disk full, Ctrl-C, SIGTERM) removes the temporary file and leaves ``path`` as it was, so a reader
    never takes half a file for the whole; a full disk is an error naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(name)
    try:
        with terminate_unwinds():  # SIGTERM unwinds too, so the except below removes tmp
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yield f
            tmp.chmod(0o666 & ~_umask())  # mkstemp's file is private (0600)
            tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _raise_if_disk_full(e: OSError, path: Path) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"disk full while writing {path} ({free / 1e9:.2f} GB free); the partial output was removed"
        ) from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _publish_permissions(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the result the permissions the umask allows. A
    directory inside it (``additional_chat_templates/``) keeps its search bit: at 0644 no other user,
    nor its owner unless root, could open the templates in it."""
    umask = _umask()
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        if not f.is_symlink():
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def _replace(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is moved aside first and deleted only afterwards."""
    if out.exists():
        # named by process and machine, as the temporary directory: if this process is killed before the
        # new one is in place, the next run finds the old one here and says so (``_left_aside``)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}.{_host_tag()}.", dir=out.parent))
        try:
            out.rename(old / out.name)
        except OSError:
            old.rmdir()  # still empty: the caller removes ``new``
            raise
        try:
            new.rename(out)
        except OSError:  # e.g. another run made ``out`` meanwhile: put the old one back, if its place is free
            with contextlib.suppress(OSError):
                (old / out.name).rename(out)
                old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)
