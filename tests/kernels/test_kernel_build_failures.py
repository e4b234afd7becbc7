"""The C++ kernels' build where the compiler fails, is killed, is no compiler or races another process:
one line naming the cause, the plain path's very answer, and a cache left whole for the next start."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_kernel_build import (  # noqa: F401
    FULL_DISK,
    LEVEL,
    OLD_FLAGS,
    SRC,
    cache_files,
    fake_cache,
    needs_isa,
    run_python,
)

from qwenkit.kernels import build, ops


@pytest.mark.parametrize(("message", "lasting"), [(FULL_DISK, False), (OLD_FLAGS, True)])
def test_a_full_disk_is_not_noted_as_the_compilers_verdict(tmp_path, message, lasting):
    """A compiler that ran out of disk (as one CI run did while another checkout filled it) fails only
    this time; noting it as lasting would keep the kernels off for every later start after the disk was
    freed, and a lower level would fail the same way (so it is no level's own: the search ends). A flag
    the compiler does not know fails every time, at this level only."""
    cxx = fake_compiler(tmp_path, f'echo "{message}" >&2\nexit 1')
    with pytest.raises(build.KernelBuildError) as caught:
        build._compile(str(cxx), "avx2", tmp_path / "lib.so")
    assert isinstance(caught.value, build.LevelBuildError) is lasting
    assert getattr(caught.value, "lasting", False) is lasting
    assert str(caught.value) == f"g++ failed: {message}"


def fake_compiler(tmp_path: Path, body: str) -> Path:
    """A stand-in g++: ``--version`` answers, anything else runs ``body`` (sh; "$out" is its -o file)."""
    cxx = tmp_path / "bin" / "g++"
    cxx.parent.mkdir(exist_ok=True)
    cxx.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo "fake g++ 1.0"; exit 0; fi\n'
        'out=""; while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n' + body + "\n"
    )
    cxx.chmod(0o755)
    return cxx


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("kill -9 $$", "g++ was killed by SIGKILL while building"),  # the OOM killer, a user's kill
        ("exit 0", "exited 0 but wrote no library (is CXX a C++ compiler?)"),  # CXX=/bin/true
        ('echo "usage: not a compiler" >&2\necho more >&2\nexit 2', "g++ failed: usage: not a compiler"),
        ("exit 3", "g++ failed: exit status 3, no message"),
    ],
)
def test_a_compiler_that_fails_without_saying_why_is_named_in_one_line(tmp_path, body, said):
    """Each used to end as "g++ failed: " with nothing after it, two lines, or "cannot write the kernel
    cache (No such file or directory)" for a CXX that made no library."""
    cxx = fake_compiler(tmp_path, body)
    with pytest.raises(build.KernelBuildError) as caught:
        build._compile(str(cxx), "avx2", tmp_path / "lib.so")
    assert str(caught.value).endswith(said) and "\n" not in str(caught.value)
    # the compiler's own refusal is this level's (noted); the others end the search for every level
    assert isinstance(caught.value, build.LevelBuildError) is said.startswith("g++ failed")


def test_a_killed_compiler_is_said_once_and_no_lower_level_is_tried(tmp_path):
    """Killing the compiler half-way (or the OOM killer doing so) used to go on to build every lower
    level, announcing each, then say "g++ failed: " with no cause. Now: one build tried, one line with
    the cause, the plain path, nothing left in the cache, and the next start tries again."""
    cxx = fake_compiler(tmp_path, 'echo partial > "$out"\nkill -9 $$')
    code = "from qwenkit import kernels; print(kernels.available(), kernels.available())"
    env = dict(XDG_CACHE_HOME=str(tmp_path / "cache"), CXX=str(cxx), QWENKIT_KERNELS="auto")
    r = run_python(code, **env)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr
    lines = r.stderr.strip().splitlines()
    if build.missing_isa() is not None:
        assert len(lines) == 1 and "plain PyTorch path" in lines[0]
        return
    assert len(lines) == 2 and lines[0].startswith(f"qwenkit: building the {LEVEL} CPU kernels once"), lines
    assert lines[1] == (
        "qwenkit: CPU kernels unavailable: g++ was killed by SIGKILL while building; "
        "using the plain PyTorch path"
    )
    assert cache_files(tmp_path / "cache" / "qwenkit" / "kernels") == []  # no note, no half library


@needs_isa
def test_a_build_left_by_a_killed_process_is_swept_at_the_next_build(fake_cache, tmp_path):  # noqa: F811
    """A process killed while it compiled left its build directory (a whole library) in the cache for
    ever; the next build removes those older than twice the compile timeout, and leaves a younger one
    (another process's build under way) alone."""
    entry = build.cache_root() / build.cache_key(build.compiler_version(build.compiler()), LEVEL)
    dead, live = entry.with_name(f".{entry.name}.dead1"), entry.with_name(f".{entry.name}.live1")
    for left in (dead, live):
        left.mkdir(parents=True)
        (left / build.LIBRARY_NAME).write_bytes(b"\x7fELF" + b"\0" * 4096)
    long_ago = time.time() - 2 * build.COMPILE_TIMEOUT - 60
    os.utime(dead, (long_ago, long_ago))
    assert build.ensure_built(LEVEL, announce=False) == entry / build.LIBRARY_NAME and len(fake_cache) == 1
    assert [p.name for p in cache_files(entry.parent)] == sorted([entry.name, live.name])


CONCURRENT_BUILD = """
import torch
from qwenkit import kernels
w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
x = torch.randn(2, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
print(kernels.available(), kernels.isa_level())
print(kernels.linear_bf16(x, kernels.prepare_bf16(w)).float().sum().item())
"""


@needs_isa
def test_two_processes_starting_on_an_empty_cache_compile_once(loaded, tmp_path):
    """Two starts on an empty cache: the second waits on the entry's lock for the first one's build
    (both used to compile, each saying "building once" and taking 30 s), says so in one line, and loads
    the very library the first stored. The compiler holds on until the second is seen waiting."""
    real = build.ensure_built(LEVEL)
    started, go = tmp_path / "started", tmp_path / "go"
    started.mkdir()
    wait_for_go = f'touch "{started}/$$"\nfor i in $(seq 1200); do [ -e "{go}" ] && break; sleep 0.1; done\n'
    cxx = fake_compiler(tmp_path, f'{wait_for_go}cp "{real}" "$out"')
    env = {k: v for k, v in os.environ.items() if k != ops.ENV_SWITCH}
    env |= dict(PYTHONPATH=str(SRC), XDG_CACHE_HOME=str(tmp_path / "cache"), CXX=str(cxx), QWENKIT_AMX="off")
    env[ops.ENV_SWITCH] = os.environ.get(ops.ENV_SWITCH, "auto")  # this session's level

    def start() -> subprocess.Popen:
        cmd = [sys.executable, "-c", CONCURRENT_BUILD]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)

    first = start()
    procs = [first]
    try:
        deadline = time.monotonic() + 120
        while not any(started.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(started.iterdir()), "the first process never started compiling"
        second = start()
        procs.append(second)
        ready, _, _ = select.select([second.stderr], [], [], 120)
        waiting = second.stderr.readline().strip() if ready else ""
        go.touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    entry = tmp_path / "cache" / "qwenkit" / "kernels" / build.cache_key("fake g++ 1.0", LEVEL)
    assert waiting == f"qwenkit: another process is building the {LEVEL} CPU kernels; waiting"
    (out1, err1), (out2, err2) = ((out.split(), err) for out, err in results)
    rc1, rc2 = (p.returncode for p in procs)
    assert err1.strip().splitlines() == [
        f"qwenkit: building the {LEVEL} CPU kernels once into {entry} (about 30 s)"
    ]
    assert rc1 == rc2 == 0 and err2.strip() == "", err2
    assert out1[:2] == out2[:2] == ["True", LEVEL] and out1[2] == out2[2]  # the same product
    assert len(list(started.iterdir())) == 1  # one compile
    assert [p.name for p in cache_files(entry.parent)] == [entry.name]
    assert sorted(p.name for p in entry.iterdir()) == [build.LIBRARY_NAME, build.LIBRARY_NAME + ".sha256"]
    assert (entry / build.LIBRARY_NAME).read_bytes() == real.read_bytes()


def test_generate_without_a_compiler_answers_as_the_plain_path_exactly(tmp_path):
    """End to end on the bundled model: `qwenkit generate` where nothing can be built gives the very ids
    and log-probabilities of QWENKIT_KERNELS=torch, says why once, and leaves no cache behind."""
    cmd = [sys.executable, "-m", "qwenkit.cli", "generate", "--prompt-ids", "5,9,13,200", "--json"]
    cmd += ["--max-new-tokens", "8", "--temperature", "0", "--ignore-eos", "--logprobs", "1"]
    base = {k: v for k, v in os.environ.items() if k != ops.ENV_SWITCH} | {"PYTHONPATH": str(SRC)}
    plain = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=base | {ops.ENV_SWITCH: "torch"}
    )
    cache = tmp_path / "cache"
    bare = base | {"XDG_CACHE_HOME": str(cache), "PATH": "/nonexistent", "CXX": "no-such-compiler"}
    fallback = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=bare)
    assert plain.returncode == 0 and fallback.returncode == 0, fallback.stderr[-2000:]
    got, want = json.loads(fallback.stdout), json.loads(plain.stdout)
    got.pop("timings"), want.pop("timings")
    assert len(got["output_token_ids"]) == 8 and got == want
    notes = [line for line in fallback.stderr.splitlines() if line.startswith("qwenkit")]
    why = build.missing_isa() or (
        "no C++ compiler found (CXX='no-such-compiler' names nothing runnable; install g++ or fix CXX)"
    )
    assert notes == [f"qwenkit: CPU kernels unavailable: {why}; using the plain PyTorch path"]
    assert not cache.exists()


@needs_isa
def test_a_cached_library_that_passes_its_checksum_but_does_not_load_is_rebuilt(loaded, tmp_path):
    """A library whose checksum holds but that does not load (overwritten along with its .sha256): this
    start says so once and takes the next level down (or the plain path), the entry is removed, and the
    next start builds it again and runs the level it asked for."""
    real = build.ensure_built(LEVEL)
    cxx = fake_compiler(tmp_path, f'cp "{real}" "$out"')
    env = dict(XDG_CACHE_HOME=str(tmp_path / "cache"), CXX=str(cxx), QWENKIT_AMX="off")
    env[ops.ENV_SWITCH] = os.environ.get(ops.ENV_SWITCH, "auto")
    entry = tmp_path / "cache" / "qwenkit" / "kernels" / build.cache_key("fake g++ 1.0", LEVEL)
    entry.mkdir(parents=True)
    (entry / build.LIBRARY_NAME).write_bytes(b"not a shared library" * 100)
    (entry / (build.LIBRARY_NAME + ".sha256")).write_text(build._sha256(entry / build.LIBRARY_NAME) + "\n")
    code = "from qwenkit import kernels; print(kernels.available(), kernels.isa_level())"
    r = run_python(code, **env)
    lower = build.runnable_levels(LEVEL)[1:2]
    assert r.returncode == 0 and r.stdout.split() == (["True", lower[0]] if lower else ["False", "None"])
    said = [line for line in r.stderr.splitlines() if not line.startswith("qwenkit: building")]
    assert len(said) == 1 and "the built library does not load (" in said[0], r.stderr
    assert not entry.exists()
    r = run_python(code, **env)
    assert r.returncode == 0 and r.stdout.split() == ["True", LEVEL], r.stderr
    assert r.stderr.strip().splitlines() == [
        f"qwenkit: building the {LEVEL} CPU kernels once into {entry} (about 30 s)"
    ]
    assert build.cached_library(entry) == entry / build.LIBRARY_NAME
