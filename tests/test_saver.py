"""The saver: sharded safetensors that the reference reader loads bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qwenkit.checkpoint.saver import parse_size, save_sharded
from qwenkit.errors import ConfigError


def test_shards_index_and_exact_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.qweight": torch.randint(-(2**31), 2**31 - 1, (16, 8), dtype=torch.int32, generator=g),
        "c.scales": torch.randn(3, 5, generator=g).half(),
        "d.bias": torch.randn(7, generator=g),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
    }
    weight_map = save_sharded(tensors.items(), tmp_path, shard_bytes=4096, metadata={"source": "test"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and len(set(weight_map.values())) >= 2
    loaded = {}
    for f in set(weight_map.values()):
        loaded |= load_file(tmp_path / f)
        with safe_open(str(tmp_path / f), "pt") as h:
            assert h.metadata() == {"format": "pt", "source": "test"}
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k


def test_dtype_cast_on_save_keeps_integers(tmp_path):
    tensors = [("w", torch.randn(4, 4)), ("q", torch.arange(4, dtype=torch.int32))]
    save_sharded(tensors, tmp_path, dtype=torch.bfloat16)
    out = load_file(tmp_path / "model.safetensors")
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], tensors[0][1].to(torch.bfloat16))
    assert out["q"].dtype == torch.int32


def test_parse_size():
    assert (
        parse_size("5GB") == 5 * 10**9
        and parse_size("2GiB") == 2 * 2**30
        and parse_size("500MB") == 5 * 10**8
    )
    with pytest.raises(ConfigError, match="cannot read size 'lots'"):
        parse_size("lots")


def test_sigterm_while_writing_removes_the_partial_directory(tmp_path):
    """SIGTERM (timeout, kill, a container stop) once killed the process mid-write and left the hidden
    ``.out.partial-*`` directory, a model's size, behind; now it unwinds: exit 143, nothing left."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from qwenkit.checkpoint.output_dir import atomic_output_dir\n"
        "with atomic_output_dir(Path(sys.argv[1]) / 'out') as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    (tmp / 'config.json').write_text('{}')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 143, done.stderr
    assert list(tmp_path.iterdir()) == []


_STAGE_AND_STOP = (
    "import os, signal, sys\n"
    "from pathlib import Path\n"
    "from qwenkit.checkpoint.output_dir import atomic_output_dir\n"
    "with atomic_output_dir(Path(sys.argv[1]) / 'out') as tmp:\n"
    "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
    "    print(tmp.name, flush=True)\n"
    "    if sys.argv[2] == 'kill':\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    sys.stdin.read()\n"
)


def test_a_killed_runs_staging_directory_is_removed_by_the_next_run_and_a_live_ones_kept(tmp_path, capsys):
    """SIGKILL (the OOM killer, ``kill -9``) unwinds nothing: the hidden ``.out.partial-*`` directory, a
    model's size, stayed beside OUT for good. The next run for OUT removes it once its process is dead,
    in one line; a live run's directory, another machine's, and one of unknown process stay."""
    from qwenkit.checkpoint.output_dir import atomic_output_dir

    cmd = [sys.executable, "-c", _STAGE_AND_STOP, str(tmp_path)]
    live = subprocess.Popen([*cmd, "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live_dir = tmp_path / live.stdout.readline().strip()
        dead = subprocess.run([*cmd, "kill"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert dead.returncode == -signal.SIGKILL and dead.stderr == ""  # it kept the live one, silently
        dead_dir = tmp_path / dead.stdout.strip()
        pid, tag = dead_dir.name.split(".partial-")[1].split(".")[:2]
        elsewhere = tmp_path / f".out.partial-{pid}.{'0' * len(tag)}.x"  # a dead pid on another machine
        unknown = tmp_path / ".out.partial-abc123"  # an older version's name: no process to ask
        for d in (elsewhere, unknown):
            d.mkdir()
        assert str(live.pid) in live_dir.name and (live_dir / "model.safetensors").read_bytes() == b"half"
        assert dead_dir.is_dir()
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
        err = capsys.readouterr().err
        assert err == f"qwenkit: removed {dead_dir}, left by an interrupted run (process {pid})\n"
        assert not dead_dir.exists()
        assert (live_dir / "model.safetensors").read_bytes() == b"half"
        assert elsewhere.is_dir() and unknown.is_dir()
        assert (tmp_path / "out" / "config.json").read_text() == "{}"
    finally:
        live.kill()
        live.wait()


_KILLED_WHILE_REPLACING = (
    "import os, signal, sys\n"
    "from pathlib import Path\n"
    "from qwenkit.checkpoint.output_dir import atomic_output_dir\n"
    "rename = Path.rename\n"
    "def killed(self, target):  # SIGKILL at the rename of the new output into place\n"
    "    if self.name.startswith('.out.partial-'):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    return rename(self, target)\n"
    "Path.rename = killed\n"
    "with atomic_output_dir(Path(sys.argv[1]) / 'out', overwrite=True) as tmp:\n"
    "    (tmp / 'keep.txt').write_text('new')\n"
)


def test_a_run_killed_while_replacing_out_leaves_the_previous_output_and_the_next_run_says_where(
    tmp_path, capsys
):
    """Killed between moving OUT aside and renaming the new one in, a run leaves no OUT and the previous
    output only in ``.out.old-*``: the user's only copy. The next run for OUT removes nothing (not the
    killed run's staging either) and says in one line where that copy is."""
    from qwenkit.checkpoint.output_dir import atomic_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_REPLACING, str(tmp_path)], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL and killed.stderr == ""
    (aside,) = tmp_path.glob(".out.old-*")
    (staged,) = tmp_path.glob(".out.partial-*")
    pid = staged.name.split(".partial-")[1].split(".")[0]
    assert not out.exists() and (aside / "out" / "keep.txt").read_text() == "old"
    with atomic_output_dir(out) as tmp:
        (tmp / "keep.txt").write_text("newer")
    assert capsys.readouterr().err == (
        f"qwenkit: {out} is missing: a run (process {pid}) was killed while replacing it; "
        f"the previous output is in {aside / 'out'}; nothing was removed\n"
    )
    assert (aside / "out" / "keep.txt").read_text() == "old"
    assert (staged / "keep.txt").read_text() == "new" and (out / "keep.txt").read_text() == "newer"
    # OUT back in place: nothing more is said of the copy, and the dead run's staging goes as usual
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "keep.txt").write_text("newest")
    assert capsys.readouterr().err.startswith(f"qwenkit: removed {staged}, left by an interrupted run")
    assert (aside / "out" / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("own_handler", [False, True])
def test_a_finished_write_leaves_the_sigterm_handler_as_it_was(tmp_path, own_handler):
    """The handler is the writer's only while it writes; a program's own (the server's) is never replaced."""
    from qwenkit.checkpoint.output_dir import atomic_output_dir

    def handler(signum, frame):  # a program's own
        pass

    previous = signal.signal(signal.SIGTERM, handler if own_handler else signal.SIG_DFL)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            inside = signal.getsignal(signal.SIGTERM)
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (inside is handler) == own_handler and inside is not signal.SIG_DFL
    assert after is (handler if own_handler else signal.SIG_DFL)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"


def test_sigterm_while_writing_a_file_leaves_the_old_one(tmp_path):
    """atomic_file (filter's OUT and report, eval's results): SIGTERM mid-write exits 143 with the file
    as it was and no temporary file beside it."""
    (tmp_path / "out.jsonl").write_text("old\n")
    script = (
        "import os, signal, sys\n"
        "from qwenkit.checkpoint.output_dir import atomic_file\n"
        "with atomic_file(sys.argv[1]) as f:\n"
        "    f.write('half')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    f.write(' and the rest')\n"
    )
    target = str(tmp_path / "out.jsonl")
    done = subprocess.run([sys.executable, "-c", script, target], capture_output=True, text=True)
    assert done.returncode == 143, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert (tmp_path / "out.jsonl").read_text() == "old\n"


@pytest.mark.parametrize("spelling", [".", "sub/.."])
def test_overwrite_of_a_directory_spelled_relative_to_itself(tmp_path, monkeypatch, spelling):
    """``qwenkit convert SRC . --overwrite`` once built the model inside ``.`` (the temporary directory went
    to ``Path('.').parent``, the same place), then failed renaming ``.`` and left ``..old-*`` behind: the
    work lost, a stray directory in the user's. The output's spelling is now made absolute first."""
    from qwenkit.checkpoint.output_dir import atomic_output_dir

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    monkeypatch.chdir(out)
    with atomic_output_dir(spelling, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_a_failed_replace_leaves_no_stray_directory(tmp_path, monkeypatch):
    """When the existing output cannot be moved aside (a mount point: EBUSY), the error stands and
    neither the new directory nor the empty ``.out.old-*`` directory made for the old one stays behind."""
    import errno
    from pathlib import Path

    from qwenkit.checkpoint.output_dir import atomic_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if self == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="busy"), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_of_a_mount_point_is_refused_before_any_work(tmp_path, monkeypatch):
    """A mount point (a container's volume) cannot be renamed, so --overwrite could only fail at the very
    end, after the whole conversion; it is refused up front in one line instead."""
    import os

    from qwenkit.checkpoint.output_dir import check_out_dir
    from qwenkit.errors import CheckpointError

    out = tmp_path / "vol"
    out.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(out))
    with pytest.raises(CheckpointError, match=f"^{out} is a mount point, which --overwrite cannot replace"):
        check_out_dir(out, overwrite=True)
    check_out_dir(tmp_path / "new", overwrite=True)  # not one: fine


def test_when_the_new_output_cannot_take_its_place_the_old_one_is_put_back(tmp_path, monkeypatch):
    """The old output is moved aside before the new one is renamed in; if that second rename fails (another
    run created OUT in between), the old one used to stay hidden in ``.out.old-*`` while the new one was
    deleted: both gone from where the user looks. Now the old one is moved back."""
    import errno
    from pathlib import Path

    from qwenkit.checkpoint.output_dir import atomic_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out and self.name.startswith(".out.partial-"):
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(target))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="not empty"), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "keep.txt").read_text() == "old" and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_directory_inside_the_output_stays_searchable(tmp_path):
    """Files get 0666 less the umask; a directory inside the output (a model's
    additional_chat_templates/) needs its x bit too, or at 0644 nobody but root can open what it holds."""
    import os

    from qwenkit.checkpoint.output_dir import atomic_output_dir

    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "additional_chat_templates").mkdir()
            (tmp / "additional_chat_templates" / "tool_use.jinja").write_text("x")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out, *out.iterdir())}
    assert modes == {"out": 0o755, "config.json": 0o644, "additional_chat_templates": 0o755}
