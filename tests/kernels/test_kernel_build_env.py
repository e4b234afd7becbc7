"""What the kernels' build takes from the environment: CXX (a command with arguments, or one that names
nothing, said once) and the cache directory (none without a home: this process builds for itself)."""

from __future__ import annotations

import pwd
import shlex
import shutil

import pytest
from test_kernel_build import LEVEL, fake_cache, needs_isa  # noqa: F401
from test_kernel_build_failures import fake_compiler

from qwenkit import notes
from qwenkit.kernels import build


@pytest.fixture(autouse=True)
def _fresh_notes(monkeypatch):
    notes.say_once.cache_clear()


def test_a_cxx_that_names_nothing_is_said_once_with_the_compiler_used(monkeypatch, capsys):
    """CXX=/opt/no/g++ (a typo, a compiler not installed in this image) silently became g++."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no g++ here")
    monkeypatch.setenv("CXX", "/opt/no/g++")
    assert build.compiler() == gxx and build.compiler() == gxx
    assert capsys.readouterr().err == (
        f"qwenkit: CXX='/opt/no/g++' was not found; building the CPU kernels with {gxx}\n"
    )
    monkeypatch.setenv("CXX", "g++")  # one that resolves is not remarked on
    assert build.compiler() == shutil.which("g++") and capsys.readouterr().err == ""


def test_no_compiler_where_cxx_names_nothing_says_cxx_is_the_fix(monkeypatch):
    """With CXX set to something not installed and no g++ or c++, the line said "set CXX" (it was set)."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CXX", "clang++-17")
    with pytest.raises(build.KernelBuildError) as e:
        build.ensure_built(LEVEL, announce=False)
    assert (
        str(e.value)
        == "no C++ compiler found (CXX='clang++-17' names nothing runnable; install g++ or fix CXX)"
    )
    monkeypatch.delenv("CXX")
    with pytest.raises(
        build.KernelBuildError, match=r"^no C\+\+ compiler found \(install g\+\+ or set CXX\)$"
    ):
        build.ensure_built(LEVEL, announce=False)


@needs_isa
def test_cxx_may_be_a_launcher_and_a_compiler_as_build_systems_take_it(monkeypatch, tmp_path, loaded):
    """CXX="ccache g++" (a launcher, then the compiler) used to resolve to nothing and fall back to g++;
    now the command runs as written, its version line keys the cache, and its name is in the messages."""
    real = build.ensure_built(LEVEL, announce=False)
    gxx = fake_compiler(tmp_path, f'cp "{real}" "$out"')
    log = tmp_path / "launched"
    launcher = tmp_path / "bin" / "launch"
    launcher.write_text(f'#!/bin/sh\necho "$1 $2" >> "{log}"\nexec "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("CXX", f"launch {gxx}")
    monkeypatch.setenv("PATH", f"{launcher.parent}:/usr/bin:/bin")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert build.compiler() == shlex.join([str(launcher), str(gxx)])
    assert build.compiler_version(build.compiler()) == "fake g++ 1.0"
    lib = build.ensure_built(LEVEL, announce=False)
    assert (
        lib == tmp_path / "cache" / "qwenkit" / "kernels" / build.cache_key("fake g++ 1.0", LEVEL) / lib.name
    )
    assert lib.read_bytes() == real.read_bytes()
    assert log.read_text().splitlines() == [f"{gxx} --version"] * 2 + [f"{gxx} -O3"]
    assert build._name(build.compiler()) == f"launch {gxx}"


@needs_isa
def test_without_a_home_the_kernels_are_built_for_this_process_and_said_once(fake_cache, monkeypatch, capsys):  # noqa: F811
    """No HOME, no XDG_CACHE_HOME and a user id /etc/passwd lacks: Path.home() raised RuntimeError out of
    kernels.available(). Now this process builds into a directory of its own (removed at exit), says so
    once, and builds once however often it asks."""
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME", raising=False)

    def unknown(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    monkeypatch.setattr(build, "_scratch", [])
    first = build.ensure_built(LEVEL, announce=False)
    assert build.ensure_built(LEVEL, announce=False) == first and len(fake_cache) == 1
    assert first.parent.parent == build._scratch[0] and first.parent.parent.name.startswith(
        "qwenkit-kernels-"
    )
    uid = __import__("os").getuid()
    assert capsys.readouterr().err == (
        f"qwenkit: no cache directory: HOME is not set and user id {uid} has no home in the password "
        "database; set HOME or XDG_CACHE_HOME; building the CPU kernels for this process only\n"
    )
    shutil.rmtree(build._scratch[0])
