"""The C++ CPU kernels' build: the cache, the instruction-set levels, the switch, the venv copy and the
fallback to the plain path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenkit import kernels
from qwenkit.kernels import build, ops

SRC = Path(__file__).resolve().parents[2] / "src"
needs_isa = pytest.mark.skipif(build.missing_isa() is not None, reason=f"{build.missing_isa()}")
LEVEL = build.isa_level()  # the instruction-set level this CPU builds ("avx512", "avxvnni" or "avx2")


# --- build cache and fallback --------------------------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != ops.ENV_SWITCH}
    full_env.update(PYTHONPATH=str(SRC), **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


def cache_files(directory: Path) -> list[Path]:
    """What a cache directory holds besides the lock files of its entries (kept: see build._hold)."""
    return sorted(p for p in directory.iterdir() if p.suffix != ".lock")


@needs_isa
def test_second_process_reuses_the_cached_library(loaded):
    # the level this session loaded (a capped one under QWENKIT_KERNELS), not the CPU's own
    same_level = {ops.ENV_SWITCH: os.environ.get(ops.ENV_SWITCH, "auto")}
    r = run_python("from qwenkit import kernels; print(kernels.available())", **same_level)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    assert "building" not in r.stderr and r.stderr.strip() == "", r.stderr


@needs_isa
def test_prebuild_command_reports_the_library(loaded, capsys):
    assert build.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"qwenkit kernels: {LEVEL} ready at ")
    assert out[0].endswith(build.LIBRARY_NAME) and Path(out[0].split(" at ", 1)[1]).is_file()


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, loaded):
    """A private cache whose 'compiler' copies the library this session built, counting the builds."""
    real = build.ensure_built(LEVEL)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []

    def copy_compile(cxx, level, out):
        builds.append(out)
        shutil.copyfile(real, out)

    monkeypatch.setattr(build, "_compile", copy_compile)
    return builds


@needs_isa
def test_cache_entry_is_built_once_then_reused(fake_cache, tmp_path):
    first = build.ensure_built(LEVEL, announce=False)
    assert first.is_relative_to(tmp_path / "qwenkit" / "kernels") and len(fake_cache) == 1
    assert build.ensure_built(LEVEL, announce=False) == first and len(fake_cache) == 1
    assert [p.name for p in cache_files(first.parent.parent)] == [first.parent.name]  # no temp dirs left


@needs_isa
def test_damaged_cache_entry_is_rebuilt(fake_cache):
    lib = build.ensure_built(LEVEL, announce=False)
    good = lib.read_bytes()
    lib.write_bytes(good[: len(good) // 2])  # a truncated file, as after a crash or a full disk
    again = build.ensure_built(LEVEL, announce=False)
    assert len(fake_cache) == 2 and again.read_bytes() == good


@needs_isa
def test_an_entry_another_process_just_finished_is_not_thrown_away(fake_cache, monkeypatch):
    """Between this process finding no library and making room for its own build, another process may
    rename its finished build into place: that entry is whole and is used, not discarded as damaged
    (which pulled the library from under the other process and built it again)."""
    lib = build.ensure_built(LEVEL, announce=False)
    real = build.cached_library
    looks = []  # the first look comes before the other process's rename

    def cached_library(entry):
        looks.append(entry)
        return None if len(looks) == 1 else real(entry)

    monkeypatch.setattr(build, "cached_library", cached_library)
    assert build.ensure_built(LEVEL, announce=False) == lib and len(fake_cache) == 1
    assert build.cached_library(lib.parent) == lib


@needs_isa
def test_failed_build_is_refused_cleanly(fake_cache, monkeypatch, tmp_path):
    def broken(cxx, level, out):
        out.write_bytes(b"half")
        raise build.KernelBuildError("g++ failed: error: something")

    monkeypatch.setattr(build, "_compile", broken)
    with pytest.raises(build.KernelBuildError, match="g\\+\\+ failed"):
        build.ensure_built(LEVEL, announce=False)
    assert cache_files(tmp_path / "qwenkit" / "kernels") == []  # nothing half-written stays


@needs_isa
@pytest.mark.parametrize("lasting", [True, False])
def test_a_level_the_compiler_rejects_is_not_compiled_again(
    fake_cache, monkeypatch, tmp_path, capsys, lasting
):
    """An old g++ that rejects -mavxvnni rejects it at every start: the failure is noted beside the cache
    entry (keyed by compiler, source and flags) and the next start goes straight to the next level. A
    compiler killed by a signal (not lasting) is tried again."""
    calls = []

    def failing(cxx, level, out):
        calls.append(level)
        raise build.LevelBuildError(
            "g++ failed: g++: error: unrecognized command-line option", lasting=lasting
        )

    monkeypatch.setattr(build, "_compile", failing)
    for _ in range(2):
        with pytest.raises(build.LevelBuildError, match="unrecognized command-line option"):
            build.ensure_built(LEVEL)
    announced = capsys.readouterr().err.strip().splitlines()
    left = cache_files(tmp_path / "qwenkit" / "kernels")
    if not lasting:
        assert calls == [LEVEL, LEVEL] and len(announced) == 2 and left == []
        return
    assert calls == [LEVEL] and len(announced) == 1  # no second "building ... once" either
    assert [p.suffix for p in left] == [".failed"], left  # the note only: nothing half-built
    left[0].unlink()  # deleting it (or a new compiler: a new key) tries again
    with pytest.raises(build.LevelBuildError):
        build.ensure_built(LEVEL, announce=False)
    assert calls == [LEVEL, LEVEL]


FULL_DISK = "cpu_kernels.cpp:3411:1: fatal error: error writing to /tmp/ccoB9QYx.s: No space left on device"
OLD_FLAGS = "g++: error: unrecognized command-line option '-mavxvnni'"


@needs_isa
def test_a_note_of_a_full_disk_left_by_an_older_version_is_dropped(fake_cache, tmp_path):
    entry = build.cache_root() / build.cache_key(build.compiler_version(build.compiler()), LEVEL)
    entry.parent.mkdir(parents=True)
    build.failure_note(entry).write_text(f"g++ failed: {FULL_DISK}\n")
    assert build.ensure_built(LEVEL, announce=False) == entry / build.LIBRARY_NAME
    assert len(fake_cache) == 1 and not build.failure_note(entry).exists()


def test_no_compiler_falls_back_with_one_line(tmp_path):
    code = "from qwenkit import kernels; print(kernels.available()); print(kernels.available())"
    r = run_python(code, XDG_CACHE_HOME=str(tmp_path), CXX="false", PATH="/nonexistent")
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain PyTorch path" in lines[0], r.stderr
    if build.missing_isa() is None:
        assert "no C++ compiler found" in lines[0]
    r = run_python(
        "from qwenkit.kernels.build import main; main()", XDG_CACHE_HOME=str(tmp_path), PATH="/nonexistent"
    )
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 and "not built" in r.stdout


def test_unwritable_cache_falls_back_with_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    r = run_python("from qwenkit import kernels; print(kernels.available())", XDG_CACHE_HOME=str(not_a_dir))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain PyTorch path" in lines[0], r.stderr
    if build.missing_isa() is None:
        assert "cannot write the kernel cache" in lines[0]


def test_missing_isa_falls_back_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(ops, "_loaded", None)
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"sse4_2", "avx", "fma"})  # AVX without AVX2
    monkeypatch.delenv(ops.ENV_SWITCH, raising=False)
    assert kernels.available() is False and kernels.available() is False
    err = capsys.readouterr().err.strip().splitlines()
    lacks = "this CPU lacks avx2, f16c"
    assert err == [f"qwenkit: CPU kernels unavailable: {lacks}; using the plain PyTorch path"]


AVX512_FLAGS = set(build.ISA_LEVELS["avx512"])


@pytest.mark.parametrize(
    "flags,cap,level",
    [
        (AVX512_FLAGS | {"avx2"}, None, "avx512"),
        (AVX512_FLAGS | {"avx2"}, "avx2", "avx2"),  # QWENKIT_KERNELS=avx2 on an AVX-512 CPU
        (AVX512_FLAGS | {"avx2"}, "avxvnni", "avx2"),  # a cap the CPU cannot meet: the next level down
        (AVX512_FLAGS | {"avx2", "avx_vnni"}, None, "avx512"),  # Sapphire Rapids
        (AVX512_FLAGS | {"avx2", "avx_vnni"}, "avx512vnni", "avx512vnni"),
        (AVX512_FLAGS | {"avx2", "avx_vnni"}, "avxvnni", "avxvnni"),
        (AVX512_FLAGS | {"avx2", "avx_vnni"}, "avx2", "avx2"),
        ({"avx2", "fma", "f16c", "avx_vnni"}, None, "avxvnni"),  # Alder Lake and later client cores
        ({"avx2", "fma", "f16c", "avx512f"}, None, "avx2"),  # AVX-512 without BW/VL/VNNI
        (AVX512_FLAGS - {"avx512_bf16"} | {"avx2"}, None, "avx512vnni"),  # Cascade/Ice Lake: VNNI, no BF16
        (AVX512_FLAGS - {"avx512_bf16", "avx512_vnni"} | {"avx2"}, None, "avx2"),  # Skylake-SP
        ({"avx2", "fma"}, None, None),
        ({"avx2", "fma", "avx_vnni"}, None, None),
    ],
)
def test_the_best_level_the_cpu_has_is_built(monkeypatch, flags, cap, level):
    monkeypatch.setattr(build, "_cpu_flags", lambda: flags)
    assert build.isa_level(cap) == level
    assert (build.missing_isa(cap) is None) == (level is not None)
    if level:  # the flags a level compiles with are exactly the ones checked
        assert set(build.compile_flags(level)) >= set(build.ISA_LEVELS[level].values())
        assert level.startswith("avx512") or not any("avx512" in f for f in build.compile_flags(level))
        assert level == "avx512" or "-mavx512bf16" not in build.compile_flags(level)
    else:
        assert build.missing_isa(cap) == "this CPU lacks f16c"


@pytest.fixture
def fresh_load(monkeypatch, loaded):
    """ops' load state reset for one test (restored after it), on a CPU with every level."""
    for name in ("_loaded", "_level", "_amx"):
        monkeypatch.setattr(ops, name, getattr(ops, name))
    monkeypatch.setattr(ops, "_loaded", None)
    monkeypatch.setattr(build, "_cpu_flags", lambda: AVX512_FLAGS | {"avx2", "avx_vnni"})
    monkeypatch.delenv(ops.ENV_SWITCH, raising=False)
    tried: list[str] = []
    return tried


def failing_above(level: str, tried: list[str]):
    """A stand-in for build.load: this session's library is already loaded; levels above ``level`` fail
    as a compiler without their flags fails."""

    def load(lvl: str) -> None:
        tried.append(lvl)
        if lvl != level:
            raise build.LevelBuildError(f"g++ failed: error: unrecognized command-line option for {lvl}")

    return load


def test_a_level_the_compiler_cannot_build_falls_back_to_the_next(fresh_load, monkeypatch, capsys):
    """A g++ that rejects every level above AVX2 (its AVX-512 and AVX-VNNI flags) still gets the AVX2
    kernels, with one line naming why."""
    monkeypatch.setattr(build, "load", failing_above("avx2", fresh_load))
    assert kernels.available() is True and kernels.isa_level() == "avx2"
    assert fresh_load == ["avx512", "avx512vnni", "avxvnni", "avx2"]
    why = "g++ failed: error: unrecognized command-line option for"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qwenkit: CPU kernels: avx512: {why} avx512; avx512vnni: {why} avx512vnni; avxvnni: {why} avxvnni; "
        "using the avx2 build"
    ]


@pytest.mark.parametrize(("cap", "said"), [("avxvnni", "avx_vnni"), ("avx512vnni", None)])
def test_a_switch_to_a_level_this_cpu_lacks_says_which_build_runs(fresh_load, monkeypatch, capsys, cap, said):
    """QWENKIT_KERNELS=avxvnni on an AVX-512 CPU without AVX-VNNI (Zen 4, Skylake-SP) ran the AVX2 build
    without a word, while the user believed the AVX-VNNI one was being compared or tested."""
    monkeypatch.setattr(build, "_cpu_flags", lambda: AVX512_FLAGS | {"avx2"})
    monkeypatch.setenv(ops.ENV_SWITCH, cap)
    monkeypatch.setattr(build, "load", fresh_load.append)
    assert kernels.available() is True and kernels.available() is True
    want = "avx2" if said else cap
    assert kernels.isa_level() == want and fresh_load == [want]
    err = capsys.readouterr().err.strip().splitlines()
    named = f"qwenkit: QWENKIT_KERNELS={cap}: this CPU lacks {said}; using the avx2 build"
    assert err == ([named] if said else [])


def test_a_failure_of_no_level_in_particular_does_not_try_the_others(fresh_load, monkeypatch, capsys):
    def no_compiler(level: str) -> None:
        fresh_load.append(level)
        raise build.KernelBuildError("no C++ compiler found (install g++ or set CXX)")

    monkeypatch.setattr(build, "load", no_compiler)
    assert kernels.available() is False and fresh_load == ["avx512"]
    assert capsys.readouterr().err.strip().splitlines() == [
        "qwenkit: CPU kernels unavailable: no C++ compiler found (install g++ or set CXX); "
        "using the plain PyTorch path"
    ]


def test_prebuild_names_the_level_built_and_the_ones_that_failed(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(build, "_cpu_flags", lambda: AVX512_FLAGS | {"avx2", "avx_vnni"})
    tried: list[str] = []
    fail = failing_above("avxvnni", tried)

    def ensure_built(level: str, announce: bool = True) -> Path:
        fail(level)
        return tmp_path / level / build.LIBRARY_NAME

    monkeypatch.setattr(build, "ensure_built", ensure_built)
    assert build.main([]) == 0 and tried == ["avx512", "avx512vnni", "avxvnni"]
    assert capsys.readouterr().out.strip().splitlines() == [
        f"qwenkit kernels: avxvnni ready at {tmp_path / 'avxvnni' / build.LIBRARY_NAME} (not avx512: g++ "
        "failed: error: unrecognized command-line option for avx512; avx512vnni: g++ failed: error: "
        "unrecognized command-line option for avx512vnni)"
    ]


def test_a_cpu_other_than_x86_64_linux_is_named(monkeypatch):
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    assert build.isa_level() is None
    assert build.missing_isa().startswith("the CPU kernels need Linux on x86-64 (this is Linux aarch64")


@needs_isa
def test_avx2_switch_loads_the_avx2_build(loaded, tmp_path):
    """QWENKIT_KERNELS=avx2 takes the AVX2 build even on an AVX-512 CPU, and it computes the product."""
    out = tmp_path / "y.pt"
    code = (
        "import torch\nfrom qwenkit import kernels\n"
        "w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)\n"
        "x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)\n"
        "print(kernels.available(), kernels.ops.isa_level())\n"
        f"torch.save(kernels.linear_bf16(x, kernels.prepare_bf16(w)), {str(out)!r})\n"
    )
    r = run_python(code, QWENKIT_KERNELS="avx2")
    assert r.returncode == 0 and r.stdout.split() == ["True", "avx2"], r.stderr
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = x.double() @ w.double().T  # the float reference
    assert (torch.load(out).double() - want).abs().max() <= 0.01 * want.abs().max()


# Integer products of every kind the tiles have (1-2 row and 4-row passes, int4 and int8, group sizes
# from 32 to per-channel, shifts, zero points, fp16 and fp32 scales), saved by a child process that
# loads one level.
LEVEL_PRODUCTS = """
import sys, torch
from qwenkit import kernels
assert kernels.available()
print(kernels.ops.isa_level())
g = torch.Generator().manual_seed(0)
out = {}
N, K = 48, 256
for bits in (8, 4):
    for group, shifted, zero in ((32, True, 0), (32, False, 2 ** (bits - 1)), (64, True, 0), (128, False, 0),
                                 (K, False, 2 ** (bits - 1)), (K, True, 0)):
        codes = torch.randint(0, 2 ** bits, (N, K), dtype=torch.uint8, generator=g)
        scale = torch.rand(K // group, N, generator=g) * 0.02 + 1e-3
        shift = torch.randn(K // group, N, generator=g) * 0.01 if shifted else None
        for scale_dtype in (torch.float16, torch.float32):
            prepare = kernels.prepare_int8 if bits == 8 else kernels.prepare_int4
            p = prepare(codes, scale, shift, group, zero, scale_dtype)
            for m in (1, 2, 3, 4, 5, 8, 11, 16, 21):
                x = torch.randn(m, K, generator=g).to(torch.bfloat16)
                key = f"int{bits} g{group} shift={shifted} z={zero} {scale_dtype} m={m}"
                out[key] = (kernels.linear_int8 if bits == 8 else kernels.linear_int4)(x, p)
for n, k in ((40, 64), (48, 96), (136, 256)):  # bf16 on the vector tiles (the children run with AMX off)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    p = kernels.prepare_bf16(w)
    for m in (1, 2, 3, 4, 5, 8, 11, 16, 21):
        out[f"bf16 {n}x{k} m={m}"] = kernels.linear_bf16(torch.randn(m, k, generator=g).to(torch.bfloat16), p)
torch.save(out, sys.argv[1])
"""


def levels_this_cpu_runs() -> list[str]:
    return [level for level in build.ISA_LEVELS if build.isa_level(level) == level]


@needs_isa
def test_every_level_this_cpu_runs_gives_the_same_products(loaded, tmp_path):
    """The AVX-512, AVX-VNNI and AVX2 builds reach the same integer sums by different instructions
    (vpdpbusd on 512 or 256 bits, vpmaddubsw chains) and do the same float arithmetic after them, so
    each integer product is bit for bit the same on every level: a model answers the same on each. The
    bf16 products too, where vdpbf16ps is written as two FMAs (AMX, which rounds its own way, is off).
    Each level this CPU runs is loaded in a child process (QWENKIT_KERNELS caps the level)."""
    levels = levels_this_cpu_runs()
    if len(levels) < 2:
        pytest.skip(f"this CPU runs one level only ({levels[0]}): nothing to compare it with")
    results = {}
    for level in levels:
        out = tmp_path / f"{level}.pt"
        r = subprocess.run(
            [sys.executable, "-c", LEVEL_PRODUCTS, str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env={
                **os.environ,
                "PYTHONPATH": str(SRC),
                ops.ENV_SWITCH: "auto" if level == LEVEL else level,
                ops.AMX_SWITCH: "off",
            },
        )
        assert r.returncode == 0 and r.stdout.split() == [level], r.stderr[-2000:]
        results[level] = torch.load(out)
    first, *others = levels
    assert len(results[first]) == 2 * 6 * 2 * 9 + 3 * 9
    for level in others:
        differ = [k for k, y in results[first].items() if not torch.equal(y, results[level][k])]
        assert not differ, f"{level} differs from {first} in {len(differ)} products, e.g. {differ[:3]}"


@needs_isa
def test_every_level_this_cpu_runs_answers_alike_through_chat(loaded):
    """End to end: `qwenkit chat -p` on the bundled model (Q4_1 layers, Q8_0 head), greedy, answers the
    same on each level this CPU runs (the whole decode step: quantized activations, the integer
    tiles of the layers and the head, the one-call decode layers)."""
    levels = levels_this_cpu_runs()
    if len(levels) < 2:
        pytest.skip(f"this CPU runs one level only ({levels[0]}): nothing to compare it with")
    exe = Path(sys.executable).with_name("qwenkit")
    cmd = [
        str(exe),
        "chat",
        "-p",
        "Name three prime numbers.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
    ]
    answers = {}
    for level in levels:
        env = {**os.environ, "PYTHONPATH": str(SRC), ops.ENV_SWITCH: "auto" if level == LEVEL else level}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        answers[level] = r.stdout
    assert len(answers[levels[0]].split()) >= 5, answers
    assert all(a == answers[levels[0]] for a in answers.values()), answers


def test_torch_switch_turns_the_kernels_off(monkeypatch, capsys):
    monkeypatch.setenv(ops.ENV_SWITCH, "torch")
    assert kernels.available() is False
    assert capsys.readouterr().err == ""
    r = run_python("from qwenkit import kernels; print(kernels.available())", QWENKIT_KERNELS="torch")
    assert r.stdout.strip() == "False" and r.stderr == ""


@needs_isa
def test_a_misspelt_switch_is_named_once_not_ignored(loaded):
    """QWENKIT_KERNELS=toch is no choice: one line names it and the setting used (the kernels)."""
    code = "from qwenkit import kernels; print(kernels.available(), kernels.available())"
    r = run_python(code, QWENKIT_KERNELS="toch")
    assert r.returncode == 0 and r.stdout.strip() == "True True", r.stderr
    named = (
        "qwenkit: QWENKIT_KERNELS='toch' is not one of auto, avx2, avx512, avx512vnni, avxvnni, torch;"
        " using 'auto'"
    )
    assert r.stderr.strip().splitlines() == [named]
    r = run_python(code, QWENKIT_KERNELS=" Torch ")  # case and spaces do not matter
    assert r.stdout.strip() == "False False" and r.stderr == ""


@needs_isa
def test_the_top_level_is_a_choice_too(loaded):
    """QWENKIT_KERNELS=avx512 names the best build: where the CPU runs it, it is the build that runs, with
    nothing said (it was "not one of ...; using 'auto'"); where it lacks it, the line names what it lacks."""
    code = "from qwenkit import kernels; print(kernels.isa_level())"
    r = run_python(code, QWENKIT_KERNELS="avx512")
    assert r.returncode == 0, r.stderr
    if "avx512" in levels_this_cpu_runs():
        assert (r.stdout.strip(), r.stderr) == ("avx512", "")
    else:
        lacks = ", ".join(sorted(set(build.ISA_LEVELS["avx512"]) - build.cpu_flags()))
        assert (
            r.stderr.strip()
            == f"qwenkit: QWENKIT_KERNELS=avx512: this CPU lacks {lacks}; using the {r.stdout.strip()} build"
        )


# --- a library stored in the venv (container images: built in the build stage, no compiler at run time) --

VENV_CHECK = """
import sys
sys.prefix = {prefix!r}
import torch
from qwenkit import kernels
ok = kernels.available()
print(ok)
if ok:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = kernels.linear_bf16(x, kernels.prepare_bf16(w)).float()
    want = x.float() @ w.float().T
    print(float((got - want).abs().max() / want.abs().max()))
"""


@pytest.fixture
def venv_copy(tmp_path, monkeypatch, capsys, loaded):
    """``--into-venv`` run for a stand-in venv prefix (the libraries come from the session's cache; the
    levels this CPU does not load are compiled once into it, as an image's build stage compiles them all)."""
    prefix = tmp_path / "venv"
    monkeypatch.setattr(build.sys, "prefix", str(prefix))
    assert build.main(["--into-venv"]) == 0
    stored = prefix / "share" / "qwenkit" / "kernels"
    assert capsys.readouterr().out.strip().splitlines() == [
        f"qwenkit kernels: {level} stored in the venv at {stored / level / build.LIBRARY_NAME}"
        for level in build.ISA_LEVELS
    ]
    return prefix


def run_without_compiler(prefix: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    empty_cache = tmp_path / "cache"
    return run_python(
        VENV_CHECK.format(prefix=str(prefix)),
        XDG_CACHE_HOME=str(empty_cache),
        CXX="false",
        PATH="/nonexistent",
    )


@needs_isa
def test_library_stored_in_the_venv_loads_without_a_compiler(venv_copy, tmp_path):
    stored = venv_copy / "share" / "qwenkit" / "kernels"
    assert sorted(p.name for p in stored.iterdir()) == sorted(build.ISA_LEVELS)
    for level in build.ISA_LEVELS:
        assert sorted(p.name for p in (stored / level).iterdir()) == sorted(
            [build.LIBRARY_NAME, build.LIBRARY_NAME + ".sha256", "key"]
        )  # no temporary files left
        assert build.venv_library(level) == stored / level / build.LIBRARY_NAME
    r = run_without_compiler(venv_copy, tmp_path)
    lines = r.stdout.split()
    assert r.returncode == 0 and lines[0] == "True" and r.stderr == "", r.stderr
    assert float(lines[1]) < 0.01  # the op computes (within bf16 output rounding)
    assert not (tmp_path / "cache").exists()  # nothing was built or cached


@needs_isa
@pytest.mark.parametrize("damage", ["truncated", "other source"])
def test_damaged_or_stale_venv_library_is_not_loaded(venv_copy, tmp_path, damage):
    stored = venv_copy / "share" / "qwenkit" / "kernels" / LEVEL
    if damage == "truncated":
        lib = stored / build.LIBRARY_NAME
        lib.write_bytes(lib.read_bytes()[:4096])
    else:  # built from another qwenkit source or for another torch
        (stored / "key").write_text("0" * 24 + "\n")
    assert build.venv_library(LEVEL) is None
    r = run_without_compiler(venv_copy, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "False"
    (line,) = r.stderr.strip().splitlines()
    assert "no C++ compiler found" in line and "plain PyTorch path" in line


def test_build_command_refuses_unknown_arguments(capsys):
    assert build.main(["--into"]) == 2
    assert "usage: python -m qwenkit.kernels.build [--into-venv]" in capsys.readouterr().out


def test_every_file_a_build_reads_ships_in_the_package():
    """A non-editable install (the images) must carry every source a build reads: the package data
    globs of qwenkit.kernels cover build.SOURCES."""
    import fnmatch
    import tomllib

    data = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["qwenkit.kernels"]
    package = SRC / "qwenkit" / "kernels"
    for source in build.SOURCES:
        rel = source.relative_to(package).as_posix()
        assert source.is_file() and any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)


def test_every_header_the_kernels_include_is_in_the_cache_key():
    """cpu_kernels.cpp includes its parts and the ISA compatibility headers: an edit to any of them must
    change the cache key, or a stale library would be loaded for new source."""
    import re

    included = set()
    for source in build.SOURCES:
        included |= set(re.findall(r'^#include "([^"]+)"', source.read_text(), flags=re.M))
    assert len(included) >= 10
    for name in included:
        assert build.CSRC / name in build.SOURCES, name
    parts = set(re.findall(r'^#include "([^"]+)"', build.SOURCE.read_text(), flags=re.M))
    assert {p.name for p in build.SOURCES} == parts | {"cpu_kernels.cpp"}  # no header left unused
