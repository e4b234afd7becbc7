"""Build, cache and load the C++ CPU kernels (`python -m qwenkit.kernels.build` prebuilds them).

The library is compiled once per (source, torch version, compiler version, flags) with the system C++
compiler and cached under ``${XDG_CACHE_HOME:-~/.cache}/qwenkit/kernels/<key>/``. A build goes into a
temporary directory that is renamed into place, and the cached file's SHA-256 is checked before it is
loaded, so a process never loads a half-written or damaged library (a damaged entry is rebuilt). One
process compiles an entry at a time: the others wait on its lock file (``.<key>.lock`` beside it, kept)
and take its result. Without a home directory (no HOME, a user id /etc/passwd lacks) a process builds
into a temporary directory of its own, said once.
One source is built at one of four instruction-set levels (``ISA_LEVELS``), the best the CPU has:
"avx512" (AVX-512 with BF16 and VNNI), "avx512vnni" (AVX-512 with VNNI but no BF16: Cascade Lake and
Ice Lake Xeons, Ice Lake and Tiger Lake laptops; the two bf16 instructions written on FMAs by
csrc/avx512_nobf16.h), "avxvnni" (AVX2 with AVX-VNNI: Intel client cores since Alder Lake) and "avx2"
(AVX2, FMA, F16C). The two below AVX-512 build the same source, its AVX-512 intrinsics written on AVX2
by csrc/avx2_compat.h; "avxvnni" adds 256-bit vpdpbusd/vpdpwssd to the integer tiles (the same sums,
fewer instructions). The compile flags name exactly the ISA extensions that `isa_level` checks at run
time.

A container image has no compiler at run time: its build stage runs ``--into-venv``, which compiles
every level whatever the build machine's CPU and stores them inside the virtual environment
(``<venv>/share/qwenkit/kernels/<level>/``), keyed by the source and torch but not the compiler.
``load`` takes that copy first when its checksum and key hold, else the user cache as above.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qwenkit.notes import say_once
from qwenkit.user_cache import NoCacheDirError, home_cache

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "cpu_kernels.cpp"
# What a build reads, so its cache key: the translation unit and every header it includes (its parts).
SOURCES = (SOURCE, *sorted(CSRC.glob("*.h")))
LIBRARY_NAME = "qwenkit_cpu_kernels.so"

# The instruction-set levels the one source is built for, best first: /proc/cpuinfo flag -> the compiler
# flag that lets the code use it (nothing else is enabled). "avxvnni" and "avx2" build the same source
# through csrc/avx2_compat.h, which writes the AVX-512 intrinsics it uses on AVX2 + FMA + F16C.
ISA_LEVELS: dict[str, dict[str, str]] = {
    "avx512": {
        "avx512f": "-mavx512f",
        "avx512bw": "-mavx512bw",
        "avx512vl": "-mavx512vl",
        "avx512_bf16": "-mavx512bf16",
        "avx512_vnni": "-mavx512vnni",
        "fma": "-mfma",
        "f16c": "-mf16c",
    },
    "avx512vnni": {
        "avx512f": "-mavx512f",
        "avx512bw": "-mavx512bw",
        "avx512vl": "-mavx512vl",
        "avx512_vnni": "-mavx512vnni",
        "fma": "-mfma",
        "f16c": "-mf16c",
    },
    "avxvnni": {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c", "avx_vnni": "-mavxvnni"},
    "avx2": {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c"},
}
# -ffp-contract=off: the arithmetic is what the source says (FMAs where it writes them). GCC's default
# contracts a multiply and an add into an FMA where it sees fit, and it saw fit differently in the copies
# of one loop it compiles for a call's serial path and for its threads' chunks: a row's log-sum-exp came
# out an ulp apart alone and in a batch (tests/kernels/test_worker_pool.py).
COMPILE_TIMEOUT = 600  # seconds; a build directory older than twice this belongs to a process that died
BASE_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-DNDEBUG", "-w")


class KernelBuildError(RuntimeError):
    """The kernels could not be built (no compiler, the compiler failed, or the result does not load)."""


class LevelBuildError(KernelBuildError):
    """The compiler ran but failed on this level's flags, or its library does not load: a lower level may
    still build (an older compiler without -mavxvnni or -mavx512bf16). ``lasting``: the compiler itself
    rejected the source or flags, so the same compiler will again; ensure_built remembers that and does
    not try again at every start. A compiler killed by a signal, or failing for the machine's sake (a
    full disk, too little memory), or writing no library raises a plain KernelBuildError instead: a
    lower level would fail the same way, so the search ends there and the next start tries again."""

    def __init__(self, message: str, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


def cache_root() -> Path:
    """Where built libraries are cached: ``${XDG_CACHE_HOME:-~/.cache}/qwenkit/kernels``.

    Deliberately not under ``$QWENKIT_CACHE`` (qwenkit.user_cache.cache_root): the test suite points that
    at a fresh temporary directory every session, and the kernels, which depend only on the source, torch
    and the compiler, would be compiled again (about 30 s a level) at every session. NoCacheDirError
    where neither XDG_CACHE_HOME nor a home directory is known."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else home_cache(fix="XDG_CACHE_HOME")) / "qwenkit" / "kernels"


_scratch: list[Path] = []  # this process's own build directory, where there is no cache directory


def _build_root() -> Path:
    """cache_root(), or without one a temporary directory for this process alone (said once, removed at
    exit; the kernels are only an accelerator, and a loaded library needs no file)."""
    try:
        return cache_root()
    except NoCacheDirError as e:
        if not _scratch:
            try:
                _scratch.append(Path(tempfile.mkdtemp(prefix="qwenkit-kernels-")))
            except OSError as err:
                raise KernelBuildError(f"{e}, and no temporary directory ({err.strerror})") from None
            atexit.register(shutil.rmtree, _scratch[0], ignore_errors=True)
            say_once(f"{e}; building the CPU kernels for this process only")
        return _scratch[0]


def _cpu_flags() -> set[str] | str:
    """The CPU's feature flags, or why they cannot be known."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the CPU kernels need Linux on x86-64 (this is {platform.system()} {platform.machine()})"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as e:
        return f"cannot read /proc/cpuinfo ({e.strerror})"
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (none where they cannot be known)."""
    flags = _cpu_flags()
    return set() if isinstance(flags, str) else flags


def runnable_levels(cap: str | None = None) -> list[str]:
    """The levels in ISA_LEVELS this CPU runs, no better than ``cap`` (a level name), best first."""
    flags = _cpu_flags()
    if isinstance(flags, str):
        return []
    levels = list(ISA_LEVELS)
    return [level for level in levels[levels.index(cap) if cap else 0 :] if set(ISA_LEVELS[level]) <= flags]


def isa_level(cap: str | None = None) -> str | None:
    """The best level in ISA_LEVELS this CPU runs, no better than ``cap`` (a level name), or None."""
    levels = runnable_levels(cap)
    return levels[0] if levels else None


def missing_isa(cap: str | None = None) -> str | None:
    """Why this CPU cannot run the kernels at any level up to ``cap``, or None when it can."""
    flags = _cpu_flags()
    if isinstance(flags, str):
        return flags
    if isa_level(cap) is not None:
        return None
    lowest = list(ISA_LEVELS)[-1]
    return f"this CPU lacks {', '.join(f for f in ISA_LEVELS[lowest] if f not in flags)}"


def compiler() -> str | None:
    """The C++ compiler command to use, as a shell-quoted line: $CXX, else g++, else c++; None when there
    is none. CXX is a path or a name on PATH, and may carry a launcher or arguments as build systems take
    it ("ccache g++", "g++ -fuse-ld=gold"). A CXX that names nothing runnable is said once, with the
    compiler used instead."""
    named = _named_cxx()
    if named:
        whole = shutil.which(named)  # a path with spaces in it
        try:
            words = shlex.split(named) if whole is None else [whole]
        except ValueError:  # an unbalanced quote
            words = []
        found = shutil.which(words[0]) if words else None
        if found:
            return shlex.join([found, *words[1:]])
    for name in ("g++", "c++"):
        found = shutil.which(name)
        if found:
            if named:
                say_once(f"CXX={named!r} was not found; building the CPU kernels with {found}")
            return found
    return None


def _named_cxx() -> str:
    return os.environ.get("CXX", "").strip()


def _command(cxx: str) -> list[str]:
    return shlex.split(cxx)


def _name(cxx: str) -> str:
    """The compiler as messages name it: "g++", "ccache g++"."""
    first, *rest = _command(cxx)
    return " ".join([Path(first).name, *rest])


def compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run(
            [*_command(cxx), "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cxx} --version failed ({e})") from e
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def compile_flags(level: str) -> list[str]:
    abi = int(torch.compiled_with_cxx11_abi())
    return [*BASE_FLAGS, *ISA_LEVELS[level].values(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def _key(level: str, *extra: str) -> str:
    h = hashlib.sha256()
    for source in SOURCES:
        h.update(source.read_bytes())
    flags = " ".join(compile_flags(level))
    for part in (torch.__version__, str(torch.version.git_version), *extra, flags):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:24]


def cache_key(cxx_version: str, level: str) -> str:
    return _key(level, cxx_version)


def venv_dir(level: str) -> Path:
    """Where ``--into-venv`` stores a library built for this environment (a container image's venv)."""
    return Path(sys.prefix) / "share" / "qwenkit" / "kernels" / level


def venv_library(level: str) -> Path | None:
    """The library ``--into-venv`` stored, if it is whole and was built from this source for this torch."""
    entry = venv_dir(level)
    try:
        key = (entry / "key").read_text().strip()
    except OSError:
        return None
    return cached_library(entry) if key == _key(level) else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_library(entry: Path) -> Path | None:
    """The library in a cache entry if it is complete and undamaged, else None."""
    lib, digest = entry / LIBRARY_NAME, entry / (LIBRARY_NAME + ".sha256")
    try:
        return lib if digest.read_text().strip() == _sha256(lib) else None
    except OSError:
        return None


def _compile(cxx: str, level: str, out: Path) -> None:
    from torch.utils import cpp_extension  # slow to import; only needed to build

    cmd = [*_command(cxx), *compile_flags(level)]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [str(SOURCE), "-o", str(out)]
    for p in cpp_extension.library_paths():
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    cmd += ["-lc10", "-ltorch_cpu"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired as e:  # its message would be the whole command line
        raise KernelBuildError(f"{_name(cxx)} took over {e.timeout:.0f} s and was stopped") from e
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cxx} did not run ({e})") from e
    name = _name(cxx)
    if proc.returncode < 0:  # killed (the OOM killer, a user's kill): no level's own, and no message
        raise KernelBuildError(f"{name} was killed by {_signal_name(-proc.returncode)} while building")
    if proc.returncode != 0:
        said = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]  # one line of them
        first_error = next((ln for ln in said if "error" in ln), said[0] if said else "")[:300]
        first_error = first_error or f"exit status {proc.returncode}, no message"
        if _trouble_outside_the_source(proc.stderr):  # a lower level would fail the same way
            raise KernelBuildError(f"{name} failed: {first_error}")
        raise LevelBuildError(f"{name} failed: {first_error}", lasting=True)
    if not out.is_file() or out.stat().st_size == 0:
        raise KernelBuildError(f"{cxx} exited 0 but wrote no library (is CXX a C++ compiler?)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# Compiler failures the machine caused, not the source or flags: a full disk, a read-only or failing
# temporary directory, too little memory, cc1plus killed. Noting one as lasting would refuse the kernels
# to every later start (and every checkout sharing the cache) after the disk is freed.
_MACHINE_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.ENOMEM,
    errno.EROFS,
    errno.EMFILE,
    errno.ENFILE,
)
_MACHINE_TROUBLE = (
    *(os.strerror(code).lower() for code in _MACHINE_ERRNOS),
    "error writing to",
    "virtual memory exhausted",
    "signal terminated program",
    "killed signal",
)


def _trouble_outside_the_source(stderr: str) -> bool:
    """Whether the compiler's messages blame the machine (disk, memory, a killed process)."""
    text = stderr.lower()
    return any(sign in text for sign in _MACHINE_TROUBLE)


def _discard(entry: Path) -> None:
    """Move a damaged entry aside first, so no other process sees it half-deleted."""
    aside = entry.with_name(f"{entry.name}.bad.{os.getpid()}")
    try:
        entry.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def ensure_built(level: str, announce: bool = True) -> Path:
    """Path of the cached library for ``level``, compiling it first if needed. Raises KernelBuildError.

    One process compiles an entry at a time: the others wait on its lock file and take its result."""
    cxx = compiler()
    if cxx is None:
        named = _named_cxx()
        fix = (
            f"CXX={named!r} names nothing runnable; install g++ or fix CXX"
            if named
            else "install g++ or set CXX"
        )
        raise KernelBuildError(f"no C++ compiler found ({fix})")
    entry = _build_root() / cache_key(compiler_version(cxx), level)
    lib = cached_library(entry)
    if lib is not None:
        return lib
    _refuse_known_failure(entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(entry.parent / f".{entry.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise KernelBuildError(f"cannot write the kernel cache {entry.parent} ({e.strerror})") from e
    try:
        _hold(lock, level, entry, announce)
        return _build(cxx, level, entry, announce)
    finally:
        os.close(lock)  # releases the lock


LOCK_WAIT = COMPILE_TIMEOUT + 60  # seconds; longer than the build being waited for can take


def _hold(lock: int, level: str, entry: Path, announce: bool) -> None:
    """Take the entry's lock, so a second process starting on an empty cache waits for the first one's
    build instead of compiling too. The kernel drops a dead holder's flock, so a killed build blocks
    nobody; one alive but stuck is waited for LOCK_WAIT seconds, then built beside (as without a lock)."""
    deadline = time.monotonic() + LOCK_WAIT
    said = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError:  # a file system without locks: every process builds, as before
            return
        if time.monotonic() >= deadline:
            if announce:
                print(f"qwenkit: gave up waiting for the other build after {LOCK_WAIT} s", file=sys.stderr)
            return
        if announce and not said:
            print(f"qwenkit: another process is building the {level} CPU kernels; waiting", file=sys.stderr)
            said = True
        time.sleep(0.1)


def _refuse_known_failure(entry: Path) -> None:
    """Raise the verdict noted when this compiler rejected this source and level: it will again (a new
    compiler is a new key)."""
    note = failure_note(entry)
    try:
        known_failure = note.read_text().strip()
    except OSError:
        return
    if known_failure and _trouble_outside_the_source(known_failure):
        note.unlink(missing_ok=True)  # noted by an older qwenkit that took a full disk for a verdict
    elif known_failure:
        raise LevelBuildError(known_failure, lasting=True)


def _build(cxx: str, level: str, entry: Path, announce: bool) -> Path:
    """ensure_built's work under the entry's lock: what a process it waited for left, else a build."""
    lib = cached_library(entry)
    if lib is not None:
        return lib
    _refuse_known_failure(entry)
    if entry.exists():  # damaged, or renamed into place by a process that gave up waiting for the lock
        lib = cached_library(entry)
        if lib is not None:
            return lib
        _discard(entry)
    try:
        _sweep_dead_builds(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as e:
        raise KernelBuildError(f"cannot write the kernel cache {entry.parent} ({e.strerror})") from e
    if announce:
        print(f"qwenkit: building the {level} CPU kernels once into {entry} (about 30 s)", file=sys.stderr)
    try:
        try:
            _compile(cxx, level, tmp / LIBRARY_NAME)
        except LevelBuildError as e:
            if e.lasting:
                _remember_failure(failure_note(entry), str(e))
            raise
        (tmp / (LIBRARY_NAME + ".sha256")).write_text(_sha256(tmp / LIBRARY_NAME) + "\n")
        try:
            tmp.rename(entry)
        except OSError as e:  # another process finished first; use its copy if it is whole
            if cached_library(entry) is None:
                raise KernelBuildError(f"cannot store the built library in {entry} ({e.strerror})") from e
    except OSError as e:  # a full disk, a read-only cache
        raise KernelBuildError(f"cannot write the kernel cache {entry.parent} ({e.strerror})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lib = cached_library(entry)
    if lib is None:
        raise KernelBuildError(f"the built library in {entry} is missing or damaged")
    return lib


def _sweep_dead_builds(entry: Path) -> None:
    """Remove the build directories a killed process left beside ``entry`` (a library each, for ever);
    one younger than twice the compile timeout may be another process's build under way."""
    now = time.time()
    for left in entry.parent.glob(f".{entry.name}.*"):
        try:
            if left.is_dir() and now - left.stat().st_mtime > 2 * COMPILE_TIMEOUT:
                shutil.rmtree(left, ignore_errors=True)
        except OSError:
            continue


def failure_note(entry: Path) -> Path:
    """Where ensure_built notes that the compiler of ``entry``'s key rejected its source and flags."""
    return entry.with_name(entry.name + ".failed")


def _remember_failure(note: Path, message: str) -> None:
    """Write the note whole (a temporary file renamed into place) or not at all; a cache that cannot be
    written only costs a retry at the next start."""
    tmp = note.with_name(f".{note.name}.{os.getpid()}")
    try:
        tmp.write_text(message + "\n")
        tmp.replace(note)
    except OSError:
        tmp.unlink(missing_ok=True)


def into_venv(level: str) -> Path:
    """Compile ``level`` (or take it from the user cache) and store it in ``venv_dir``, replacing the files
    one by one under temporary names, the checksum last, so a reader never trusts a half-written copy."""
    built = ensure_built(level, announce=False)
    entry = venv_dir(level)
    entry.mkdir(parents=True, exist_ok=True)
    files = {LIBRARY_NAME: built.read_bytes(), "key": (_key(level) + "\n").encode()}
    files[LIBRARY_NAME + ".sha256"] = (hashlib.sha256(files[LIBRARY_NAME]).hexdigest() + "\n").encode()
    for name, data in files.items():
        tmp = entry / f".{name}.{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(entry / name)
    return entry / LIBRARY_NAME


def load(level: str) -> None:
    """Load the ``level`` ops into torch.ops.qwenkit: the venv's prebuilt copy, else the user cache's
    (building it if needed). Raises KernelBuildError."""
    lib = venv_library(level) or ensure_built(level)
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        _discard(lib.parent)  # a library that passes its checksum yet fails to load: rebuild next time
        raise LevelBuildError(f"the built library does not load ({e})") from e


def first_that_builds(levels: list[str], make: Callable[[str], object]) -> tuple[str, list[str]]:
    """The first of ``levels`` (best first) that ``make`` (load or ensure_built) succeeds for, and why
    each better one failed ("level: reason"). A failure that is no level's own (no compiler, a cache
    that cannot be written) ends the search; when none succeeds, the best level's error is raised."""
    failed: list[tuple[str, KernelBuildError]] = []
    for level in levels:
        try:
            make(level)
        except LevelBuildError as e:
            failed.append((level, e))
            continue
        return level, [f"{lvl}: {e}" for lvl, e in failed]
    if not failed:
        raise KernelBuildError("this CPU runs no level of the kernels")
    raise failed[0][1]


def main(argv: list[str] | None = None) -> int:
    """Prebuild for `make setup`: exits 0 either way, with one line saying what happened.

    ``--into-venv`` (an image's build stage): compile every level in ISA_LEVELS whatever this CPU has,
    since the image runs elsewhere, and store them in the venv; exits 1 when it cannot.
    """
    args = sys.argv[1:] if argv is None else argv
    if args == ["--into-venv"]:
        for level in ISA_LEVELS:
            try:
                lib = into_venv(level)
            except (KernelBuildError, OSError) as e:
                print(f"qwenkit kernels: {level} not stored in the venv ({e})")
                return 1
            print(f"qwenkit kernels: {level} stored in the venv at {lib}")
        return 0
    if args:
        print(f"usage: python -m qwenkit.kernels.build [--into-venv] (got {' '.join(args)})")
        return 2
    levels = runnable_levels()
    if not levels:
        print(f"qwenkit kernels: not built, {missing_isa()}; the plain PyTorch path will be used")
        return 0
    built: dict[str, Path] = {}
    try:
        level, failed = first_that_builds(
            levels, lambda lvl: built.setdefault(lvl, ensure_built(lvl, announce=False))
        )
    except (KernelBuildError, OSError) as e:  # OSError: e.g. the C++ source missing from an install
        print(f"qwenkit kernels: not built ({e}); the plain PyTorch path will be used")
        return 0
    lower = f" (not {'; '.join(failed)})" if failed else ""
    print(f"qwenkit kernels: {level} ready at {built[level]}{lower}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
