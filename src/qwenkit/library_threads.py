"""How torch's OpenMP and numpy's OpenBLAS are loaded: their variables must be set before the libraries
load (each reads them once), so before the first ``import torch``.

A leaf: it imports nothing of qwenkit and not torch, so the package's ``__init__`` and the commands'
dispatcher can use it before anything loads torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Spins of an OpenMP worker waiting for the next parallel region before it sleeps (libgomp's own default
# is 300000, some milliseconds).
OPENMP_SPIN_COUNT = "10000"
# The variables set while torch is first imported, each with the ones that, when the user set any,
# leave it alone.
IMPORT_SETTINGS = {
    "GOMP_SPINCOUNT": (OPENMP_SPIN_COUNT, ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")),
    "OPENBLAS_NUM_THREADS": ("1", ("OPENBLAS_NUM_THREADS",)),
}


# What before_torch set for the import to come (a command's import takes it back after).
_SET_AT_IMPORT: set[str] = set()


@contextmanager
def quiet_library_threads() -> Iterator[None]:
    """Within: torch's first import loads libgomp with ``GOMP_SPINCOUNT`` at OPENMP_SPIN_COUNT, and
    numpy's OpenBLAS (torch imports numpy) with one thread, each unless the user set it (IMPORT_SETTINGS);
    after, the variables are gone again, so child processes (the code sandbox, a peer in a benchmark) see
    the user's environment.

    Why the spin: in `chat` and `serve` the engine's driver thread runs torch's small ops on OpenMP and
    the kernels' matrix products on their own workers (csrc/worker_pool.h, WorkerPool). With libgomp's
    default its worker keeps spinning for milliseconds after each op and holds the core the kernels'
    worker needs: a short prompt's first token took 55-90 ms on the bundled model instead of 26-46 (2
    cores, 2026-12-01). Ten thousand spins still bridge the gaps between torch's ops in a plain-PyTorch
    step (its decode rate unchanged, where OMP_WAIT_POLICY=PASSIVE cut it by a third). libgomp reads the
    variable once, when it is loaded, hence at the import.

    Why OpenBLAS: qwenkit never multiplies with numpy, but OpenBLAS starts a worker per core when numpy
    loads, and each spins about 0.1 s of CPU before it sleeps, beside torch's import: `qwenkit chat -p`
    on the bundled model used 0.1 s less CPU and started 10-20 ms sooner with one (2 cores, 2026-12-04).
    """
    if "torch" in sys.modules:
        yield
        return
    ours = [name for name in IMPORT_SETTINGS if name in _SET_AT_IMPORT or not _users(name)]
    for name in ours:
        os.environ[name] = IMPORT_SETTINGS[name][0]
    try:
        yield
    finally:
        for name in ours:
            os.environ.pop(name, None)
        _SET_AT_IMPORT.clear()


def before_torch() -> None:
    """Run when the package is imported: where torch is not loaded yet and the user set no spin of their
    own, set ``GOMP_SPINCOUNT`` for the torch import to come, so that a program using qwenkit from Python
    (``LLM``, an app around ``create_app``) gets the decode rate the commands get (on 2 busy cores the tiny
    test model: 34-57 tokens/s with libgomp's default, 174-245 with this; on 2 quiet ones the bundled
    model: 157-213 against 183-221, 2026-12-07). It stays set: no hook
    runs after the program's own ``import torch``. Threads of numpy's OpenBLAS are left alone here, as
    the program may multiply with numpy itself. A command's import (quiet_library_threads) takes it back
    after torch is loaded, as it does its own."""
    if "torch" in sys.modules or _users("GOMP_SPINCOUNT"):
        return
    os.environ["GOMP_SPINCOUNT"] = IMPORT_SETTINGS["GOMP_SPINCOUNT"][0]
    _SET_AT_IMPORT.add("GOMP_SPINCOUNT")


def _users(name: str) -> bool:
    """Whether the user set ``name`` or a variable that, set, leaves it alone."""
    return any(u in os.environ for u in IMPORT_SETTINGS[name][1])
