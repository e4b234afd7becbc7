"""The memory a container's limit leaves this process: its memory cgroup's limit less what it uses.

Inside a container /proc/meminfo is the node's: a pod limited to 7 GiB on a 256 GiB node read some 200
GiB free, so the load check passed a model its limit cannot hold and the kernel's OOM killer ended the
pod half-way through the load, with no message (a KV pool sized past the limit: later, under load).
Read the way ``MemAvailable`` counts: the page cache of files (``active_file`` + ``inactive_file``) can be
reclaimed, so it is room; anonymous memory and tmpfs are not. Every level from the process's own cgroup
up to the mount's root is read (a pod's limit sits one level above its container's), and the tightest
one wins. cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``) alike; standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# v1 writes "no limit" as the largest page-aligned 63-bit number; anything this large is no limit
_NO_LIMIT = 2**60


def cgroup_room(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes the memory cgroups this process runs in still let it allocate, or None where none limits
    it (no cgroup files, no limit, or files it cannot read)."""
    try:  # a cgroup's name is any bytes but "/": kept as the path's own (surrogateescape), not refused
        lines = os.fsdecode(proc_cgroup.read_bytes()).splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":  # cgroup v2, the unified hierarchy
            rooms += _rooms(root, path, "memory.max", "memory.current", ("active_file", "inactive_file"))
        elif "memory" in controllers.split(","):  # cgroup v1's memory controller
            files = ("total_active_file", "total_inactive_file")
            rooms += _rooms(root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes", files)
    return min(rooms) if rooms else None


def _rooms(mount: Path, path: str, limit_file: str, usage_file: str, file_keys: tuple[str, str]) -> list[int]:
    """Room at each limited level from ``path`` up to ``mount``. Where the process's path is not under
    the mount (a container that sees only its own cgroup, at the mount's root), the root alone is read."""
    levels = [mount]
    parts = [p for p in path.strip("/").split("/") if p]
    if ".." in parts:  # a cgroup namespace's view of a cgroup outside it ("/../../pod"): not under the mount
        parts = []
    for i in range(1, len(parts) + 1):
        levels.append(mount.joinpath(*parts[:i]))
    rooms = []
    for level in levels:
        room = _room(level, limit_file, usage_file, file_keys)
        if room is not None:
            rooms.append(room)
    return rooms


def _room(level: Path, limit_file: str, usage_file: str, file_keys: tuple[str, str]) -> int | None:
    try:
        limit_text = (level / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= _NO_LIMIT:
            return None
        usage = int((level / usage_file).read_text().strip())
        stat = dict(
            line.split(" ", 1) for line in (level / "memory.stat").read_text().splitlines() if " " in line
        )
        cache = sum(int(stat.get(key, "0")) for key in file_keys)
    except (OSError, ValueError):
        return None
    return max(int(limit_text) - max(usage - cache, 0), 0)
