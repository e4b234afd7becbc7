"""Build, cache and load the C++ CPU kernels (`python -m qwenkit.kernels.build` prebuilds them).

The library is compiled once per (source, torch version, compiler version, flags) with the system C++
compiler and cached under ``${XDG_CACHE_HOME:-~/.cache}/qwenkit/kernels/<key>/``. A build goes into a
temporary directory that is renamed into place, and the cached file's SHA-256 is checked before it is
loaded, so a process never loads a half-written or damaged library (a damaged entry is rebuilt).
The compile flags name exactly the ISA extensions that `missing_isa` checks at run time.

A container image has no compiler at run time: its build stage runs ``--into-venv``, which compiles
for those flags whatever the build machine's CPU and stores the library inside the virtual
environment (``<venv>/share/qwenkit/kernels/``), keyed by the source and torch but not the compiler.
``load`` takes that copy first when its checksum and key hold, else the user cache as above.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
LIBRARY_NAME = "qwenkit_cpu_kernels.so"

# /proc/cpuinfo flag -> the compiler flag that lets the code use it. Nothing else is enabled.
ISA_FLAGS = {
    "avx512f": "-mavx512f",
    "avx512bw": "-mavx512bw",
    "avx512vl": "-mavx512vl",
    "avx512_bf16": "-mavx512bf16",
    "avx512_vnni": "-mavx512vnni",
    "fma": "-mfma",
    "f16c": "-mf16c",
}
BASE_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-DNDEBUG", "-w")


class KernelBuildError(RuntimeError):
    """The kernels could not be built (no compiler, the compiler failed, or the result does not load)."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwenkit" / "kernels"


def missing_isa() -> str | None:
    """Why this CPU cannot run the kernels, or None when it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the AVX-512 kernels need Linux on x86-64 (this is {platform.system()} {platform.machine()})"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as e:
        return f"cannot read /proc/cpuinfo ({e.strerror})"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    missing = [f for f in ISA_FLAGS if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def compiler() -> str | None:
    """The C++ compiler to use ($CXX, else g++, else c++), or None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cxx} --version failed ({e})") from e
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def compile_flags() -> list[str]:
    abi = int(torch.compiled_with_cxx11_abi())
    return [*BASE_FLAGS, *ISA_FLAGS.values(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def _key(*extra: str) -> str:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    for part in (torch.__version__, str(torch.version.git_version), *extra, " ".join(compile_flags())):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:24]


def cache_key(cxx_version: str) -> str:
    return _key(cxx_version)


def venv_dir() -> Path:
    """Where ``--into-venv`` stores a library built for this environment (a container image's venv)."""
    return Path(sys.prefix) / "share" / "qwenkit" / "kernels"


def venv_library() -> Path | None:
    """The library ``--into-venv`` stored, if it is whole and was built from this source for this torch."""
    entry = venv_dir()
    try:
        key = (entry / "key").read_text().strip()
    except OSError:
        return None
    return cached_library(entry) if key == _key() else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_library(entry: Path) -> Path | None:
    """The library in a cache entry if it is complete and undamaged, else None."""
    lib, digest = entry / LIBRARY_NAME, entry / (LIBRARY_NAME + ".sha256")
    try:
        return lib if digest.read_text().strip() == _sha256(lib) else None
    except OSError:
        return None


def _compile(cxx: str, out: Path) -> None:
    from torch.utils import cpp_extension  # slow to import; only needed to build

    cmd = [cxx, *compile_flags()]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [str(SOURCE), "-o", str(out)]
    for p in cpp_extension.library_paths():
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    cmd += ["-lc10", "-ltorch_cpu"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cxx} did not run ({e})") from e
    if proc.returncode != 0:
        first_error = next(
            (ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[-300:]
        )
        raise KernelBuildError(f"{Path(cxx).name} failed: {first_error}")


def _discard(entry: Path) -> None:
    """Move a damaged entry aside first, so no other process sees it half-deleted."""
    aside = entry.with_name(f"{entry.name}.bad.{os.getpid()}")
    try:
        entry.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def ensure_built(announce: bool = True) -> Path:
    """Path of the cached library, compiling it first if needed. Raises KernelBuildError."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (install g++ or set CXX)")
    entry = cache_root() / cache_key(compiler_version(cxx))
    lib = cached_library(entry)
    if lib is not None:
        return lib
    if entry.exists():
        _discard(entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as e:
        raise KernelBuildError(f"cannot write the kernel cache {entry.parent} ({e.strerror})") from e
    if announce:
        print(f"qwenkit: building the CPU kernels once into {entry} (about 30 s)", file=sys.stderr)
    try:
        _compile(cxx, tmp / LIBRARY_NAME)
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


def into_venv() -> Path:
    """Compile (or take from the user cache) and store the library in ``venv_dir``, replacing the files
    one by one under temporary names, the checksum last, so a reader never trusts a half-written copy."""
    built = ensure_built(announce=False)
    entry = venv_dir()
    entry.mkdir(parents=True, exist_ok=True)
    files = {LIBRARY_NAME: built.read_bytes(), "key": (_key() + "\n").encode()}
    files[LIBRARY_NAME + ".sha256"] = (hashlib.sha256(files[LIBRARY_NAME]).hexdigest() + "\n").encode()
    for name, data in files.items():
        tmp = entry / f".{name}.{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(entry / name)
    return entry / LIBRARY_NAME


def load() -> None:
    """Load the ops into torch.ops.qwenkit: the venv's prebuilt copy, else the user cache's (building it
    if needed). Raises KernelBuildError."""
    lib = venv_library() or ensure_built()
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        _discard(lib.parent)  # a library that passes its checksum yet fails to load: rebuild next time
        raise KernelBuildError(f"the built library does not load ({e})") from e


def main(argv: list[str] | None = None) -> int:
    """Prebuild for `make setup`: exits 0 either way, with one line saying what happened.

    ``--into-venv`` (an image's build stage): compile for the AVX-512 flags even when this CPU lacks
    them, since the image runs elsewhere, and store the library in the venv; exits 1 when it cannot.
    """
    args = sys.argv[1:] if argv is None else argv
    if args == ["--into-venv"]:
        try:
            lib = into_venv()
        except (KernelBuildError, OSError) as e:
            print(f"qwenkit kernels: not stored in the venv ({e})")
            return 1
        print(f"qwenkit kernels: stored in the venv at {lib}")
        return 0
    if args:
        print(f"usage: python -m qwenkit.kernels.build [--into-venv] (got {' '.join(args)})")
        return 2
    reason = missing_isa()
    if reason:
        print(f"qwenkit kernels: not built, {reason}; the plain PyTorch path will be used")
        return 0
    try:
        lib = ensure_built(announce=False)
    except (KernelBuildError, OSError) as e:  # OSError: e.g. the C++ source missing from an install
        print(f"qwenkit kernels: not built ({e}); the plain PyTorch path will be used")
        return 0
    print(f"qwenkit kernels: ready at {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
