"""The free RAM a load is checked against: /proc/meminfo's MemAvailable, read as psutil reads it (so a
start need not import psutil), and psutil's own figure wherever that line cannot be taken as it is; in a
container, what its memory cgroup's limit leaves, where that is less."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
import torch

from qwenkit.cgroup_memory import cgroup_room
from qwenkit.config import ModelConfig
from qwenkit.errors import OutOfMemoryError
from qwenkit.memory import available_ram, check_fits, free_bytes

MiB = 1024**2


def meminfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(text)
    return path


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux's /proc/meminfo")
def test_this_machine_reports_what_psutil_reports() -> None:
    room = cgroup_room()  # a container's limit (in CI, say) may leave less than the host's figure
    before = min(psutil.virtual_memory().available, room or 2**63)
    ours = free_bytes("cpu")
    after = min(psutil.virtual_memory().available, room or 2**63)
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


# A node of 256 GiB with 200 GiB available, as /proc/meminfo shows it inside any container on it.
NODE = "MemTotal:       268435456 kB\nMemAvailable:   209715200 kB\n"
GiB = 1024**3


def cgroup_files(level: Path, limit: str, usage: int, active_file: int, inactive_file: int, v1: bool = False):
    level.mkdir(parents=True, exist_ok=True)
    prefix = "total_" if v1 else ""
    (level / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(limit + "\n")
    (level / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{usage}\n")
    (level / "memory.stat").write_text(
        f"anon {usage // 2}\n{prefix}active_file {active_file}\n{prefix}inactive_file {inactive_file}\n"
    )


def test_a_containers_memory_limit_is_what_is_free_not_the_nodes_ram(tmp_path: Path) -> None:
    """A pod limited to 7 GiB (cgroup v2, its own cgroup at the mount's root) using 1 GiB, half of it
    the page cache of files read: 6.5 GiB are free, not the node's 200 (the load check used to pass a
    model the limit cannot hold, and the OOM killer ended the load without a word)."""
    root = tmp_path / "cgroup"
    cgroup_files(root, str(7 * GiB), usage=GiB, active_file=GiB // 4, inactive_file=GiB // 4)
    (tmp_path / "self-cgroup").write_text("0::/\n")
    got = available_ram(meminfo(tmp_path, NODE), root, tmp_path / "self-cgroup")
    assert got == 7 * GiB - GiB // 2
    # so the load check refuses Qwen2-7B in bfloat16 there with both numbers, before loading anything
    config = ModelConfig.from_hf(
        dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
             rope_theta=1e6, max_position_embeddings=32768)
    )  # fmt: skip
    with pytest.raises(OutOfMemoryError, match=r"need 14\.29 GiB, but only 6\.50 GiB is free"):
        check_fits(config, torch.bfloat16, "cpu", 2048, free=got)


def test_the_tightest_level_wins_from_the_process_cgroup_up(tmp_path: Path) -> None:
    """Without a cgroup namespace the process's path is the host's: its container has no limit, the
    pod above it has 6 GiB, of which 2 GiB are anonymous memory in use."""
    root = tmp_path / "cgroup"
    cgroup_files(root / "kubepods" / "pod1", str(6 * GiB), usage=3 * GiB, active_file=GiB, inactive_file=0)
    cgroup_files(root / "kubepods" / "pod1" / "ctr", "max", usage=3 * GiB, active_file=GiB, inactive_file=0)
    (tmp_path / "self-cgroup").write_text("0::/kubepods/pod1/ctr\n")
    assert available_ram(meminfo(tmp_path, NODE), root, tmp_path / "self-cgroup") == 4 * GiB


def test_cgroup_v1_limit_and_its_no_limit(tmp_path: Path) -> None:
    """cgroup v1 (Docker without a cgroup namespace: the path is the host's, the mount the container's
    own cgroup), then the same without a limit: the node's figure."""
    root = tmp_path / "cgroup"
    (tmp_path / "self-cgroup").write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    cgroup_files(root / "memory", str(3 * GiB), usage=GiB, active_file=0, inactive_file=GiB // 2, v1=True)
    assert available_ram(meminfo(tmp_path, NODE), root, tmp_path / "self-cgroup") == 3 * GiB - GiB // 2
    cgroup_files(root / "memory", "9223372036854771712", usage=GiB, active_file=0, inactive_file=0, v1=True)
    assert available_ram(meminfo(tmp_path, NODE), root, tmp_path / "self-cgroup") == 209715200 * 1024


def test_the_node_figure_where_it_is_lower_or_no_cgroup_is_readable(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    cgroup_files(root, str(7 * GiB), usage=0, active_file=0, inactive_file=0)
    (tmp_path / "self-cgroup").write_text("0::/\n")
    full_node = "MemTotal:       268435456 kB\nMemAvailable:   1048576 kB\n"  # 1 GiB left on the node
    assert available_ram(meminfo(tmp_path, full_node), root, tmp_path / "self-cgroup") == GiB
    assert available_ram(meminfo(tmp_path, NODE), root, tmp_path / "absent") == 209715200 * 1024


def test_odd_cgroup_paths_read_what_they_name(tmp_path: Path) -> None:
    """A cgroup named with bytes that are not UTF-8 is read by its own name (reading /proc/self/cgroup
    raised UnicodeDecodeError, a traceback before any load); a path outside a cgroup namespace
    ("/../../pod") reads the mount's root alone, never the directories above the mount."""
    root = tmp_path / "cgroup"
    cgroup_files(root / os.fsdecode(b"pod\xff"), str(5 * GiB), usage=GiB, active_file=0, inactive_file=0)
    (tmp_path / "self-cgroup").write_bytes(b"0::/pod\xff\n")
    assert available_ram(meminfo(tmp_path, NODE), root, tmp_path / "self-cgroup") == 4 * GiB
    cgroup_files(tmp_path / "pod", str(GiB), usage=GiB, active_file=0, inactive_file=0)  # beside the mount
    cgroup_files(root, str(3 * GiB), usage=0, active_file=0, inactive_file=0)
    (tmp_path / "self-cgroup").write_text("0::/../pod\n")
    assert cgroup_room(root, tmp_path / "self-cgroup") == 3 * GiB
