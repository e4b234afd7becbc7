"""The free RAM a load is checked against: /proc/meminfo's MemAvailable, read as psutil reads it (so a
start need not import psutil), and psutil's own figure wherever that line cannot be taken as it is."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from qwenkit.memory import available_ram, free_bytes

MiB = 1024**2


def meminfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(text)
    return path


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux's /proc/meminfo")
def test_this_machine_reports_what_psutil_reports() -> None:
    before = psutil.virtual_memory().available
    ours = free_bytes("cpu")
    after = psutil.virtual_memory().available
    # the same kernel figure, read a moment apart: other processes may move it a little meanwhile
    assert min(before, after) - 64 * MiB <= ours <= max(before, after) + 64 * MiB


def test_mem_available_is_read_in_bytes(tmp_path: Path) -> None:
    path = meminfo(tmp_path, "MemTotal:       24683828 kB\nMemFree:  1 kB\nMemAvailable:   21296944 kB\n")
    assert available_ram(path) == 21296944 * 1024


@pytest.mark.parametrize(
    "text",
    [
        "MemTotal:       24683828 kB\nMemFree:        1000 kB\n",  # a kernel before 3.14: no MemAvailable
        "MemTotal:       24683828 kB\nMemAvailable:   0 kB\n",  # psutil recomputes a 0
        "MemTotal:       1000 kB\nMemAvailable:   2000 kB\n",  # above the total: psutil corrects it
        "MemAvailable:   not a number kB\n",
    ],
)
def test_what_psutil_would_not_take_as_it_stands_goes_to_psutil(tmp_path: Path, text: str) -> None:
    got = available_ram(meminfo(tmp_path, text))
    assert abs(got - psutil.virtual_memory().available) <= 64 * MiB
    assert got not in (0, 1000 * 1024, 2000 * 1024)


def test_no_meminfo_file_goes_to_psutil(tmp_path: Path) -> None:
    got = available_ram(tmp_path / "absent")
    assert abs(got - psutil.virtual_memory().available) <= 64 * MiB
