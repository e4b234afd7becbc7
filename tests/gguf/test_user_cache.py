"""The user's cache directory, worked out in one place (qwenkit.user_cache), where there is no home: a
container run under a user id the image's /etc/passwd does not know (``docker run --user 54321``, a
Kubernetes ``runAsUser``) and no HOME. ``Path.home()`` raises RuntimeError there, and every reader of a
cache gave a traceback: now the benchmark data (the cache is where it lives) is one line naming the fix,
and the caches that only speed a start up are done without, said once."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from factories import hf_model

from qwenkit import notes, user_cache
from qwenkit.checkpoint import gguf_index, prepared_cache
from qwenkit.checkpoint.gguf import read_gguf
from qwenkit.evaluate import data

SRC = Path(__file__).resolve().parents[2] / "src"
UID = os.getuid()
NO_HOME = (
    f"no cache directory: HOME is not set and user id {UID} has no home in the password database; "
    "set HOME or QWENKIT_CACHE"
)


@pytest.fixture
def homeless(monkeypatch):
    """No HOME, no QWENKIT_CACHE, and a user id the password database does not know."""
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("QWENKIT_CACHE", raising=False)

    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    notes.say_once.cache_clear()


def test_the_cache_root_is_qwenkit_cache_else_under_the_home(monkeypatch, tmp_path):
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path / "c"))
    assert user_cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv("QWENKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache.cache_root() == tmp_path / "home" / ".cache" / "qwenkit"
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "qwenkit" / "eval-data"


def test_without_a_home_the_cache_root_is_one_line_naming_the_fix(homeless, capsys):
    with pytest.raises(user_cache.NoCacheDirError) as e:
        user_cache.cache_root()
    assert str(e.value) == NO_HOME
    assert user_cache.cache_root_or_none() is None and user_cache.cache_root_or_none() is None
    assert capsys.readouterr().err == f"qwenkit: {NO_HOME}; running without the cache (slower starts)\n"


def test_a_note_is_said_once_whichever_layer_says_it(homeless, capsys):
    """One once-per-process note for every layer (qwenkit.notes): the cache's note and the same line said
    by another layer (the loader, the kernels' build) come out once, not once per module's own memory."""
    note = f"{NO_HOME}; running without the cache (slower starts)"
    notes.say_once(note)
    assert user_cache.cache_root_or_none() is None
    assert capsys.readouterr().err == f"qwenkit: {note}\n"


def test_qwenkit_cache_is_enough_without_a_home(homeless, monkeypatch, tmp_path):
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path))
    assert user_cache.cache_root() == tmp_path and data.cache_dir() == tmp_path / "eval-data"


def test_benchmark_data_without_a_home_is_one_line(homeless):
    with pytest.raises(data.EvalDataError) as e:
        data.read_member(data.HUMANEVAL, download=False)
    assert str(e.value) == NO_HOME


def test_a_gguf_header_is_parsed_without_a_cache(homeless, monkeypatch, tmp_path, gguf_writer, capsys):
    model = hf_model("qwen2")
    path = gguf_writer(tmp_path / "m.gguf", "qwen2", model.config.to_dict(), model.state_dict())
    monkeypatch.setattr(gguf_index, "MIN_CACHED_BYTES", 0)
    first, second = read_gguf(path), read_gguf(path)
    assert first.metadata == second.metadata and first.metadata["general.architecture"] == "qwen2"
    assert sorted(dict(first.tensors())) == sorted(dict(second.tensors()))
    assert capsys.readouterr().err == f"qwenkit: {NO_HOME}; running without the cache (slower starts)\n"


def test_the_prepared_model_cache_is_done_without(homeless, tmp_path, capsys):
    assert prepared_cache.entry_for(tmp_path, {"dtype": "torch.bfloat16"}) is None
    assert prepared_cache.entry_for(tmp_path, {"dtype": "torch.bfloat16"}) is None
    assert capsys.readouterr().err == f"qwenkit: {NO_HOME}; running without the cache (slower starts)\n"


FAKE_UNKNOWN_USER = """
import pwd, runpy, sys
def unknown(uid):
    raise KeyError(uid)
pwd.getpwuid = unknown
sys.argv = ["python -m qwenkit.evaluate.data"]
runpy.run_module("qwenkit.evaluate.data", run_name="__main__")
"""


def test_fetching_benchmark_data_without_a_home_is_one_line_and_status_1(tmp_path):
    """`python -m qwenkit.evaluate.data` (`make eval-data`) in a child with no HOME and a user id the
    password database does not know (faked: running as another user needs an interpreter it may read)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "QWENKIT_CACHE")}
    r = subprocess.run(
        [sys.executable, "-c", FAKE_UNKNOWN_USER],
        capture_output=True, text=True, env=env | {"PYTHONPATH": str(SRC)}, timeout=120,
    )  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"qwenkit: {NO_HOME}\n")


STRANGER = 54321  # a user id with no /etc/passwd entry


def run_as_stranger(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            env=env,
            user=STRANGER,
            timeout=120,
            cwd=tempfile.gettempdir(),
        )
    except PermissionError:  # this interpreter lives where that user may not read (under /root)
        pytest.skip(f"user id {STRANGER} cannot run {sys.executable}")


@pytest.mark.skipif(UID != 0, reason="running as another user needs root")
def test_a_run_under_an_unknown_user_id_without_home(tmp_path):
    """The real thing: a child process under a user id /etc/passwd lacks, without HOME."""
    try:
        pwd.getpwuid(STRANGER)
        pytest.skip(f"user id {STRANGER} exists here")
    except KeyError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "QWENKIT_CACHE", "XDG_CACHE_HOME")}
    env["PYTHONPATH"] = str(SRC)
    stranger = (
        f"no cache directory: HOME is not set and user id {STRANGER} has no home in the password database"
    )
    r = run_as_stranger([sys.executable, "-m", "qwenkit.evaluate.data"], env)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"qwenkit: {stranger}; set HOME or QWENKIT_CACHE\n")
    code = "from qwenkit import user_cache; print(user_cache.cache_root_or_none())"
    r = run_as_stranger([sys.executable, "-c", code], env)
    assert r.returncode == 0 and r.stdout == "None\n"
    assert (
        r.stderr
        == f"qwenkit: {stranger}; set HOME or QWENKIT_CACHE; running without the cache (slower starts)\n"
    )
