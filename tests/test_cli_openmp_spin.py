"""The CLI loads torch's OpenMP with a bounded spin and numpy's OpenBLAS with one thread, and leaves the
user's environment as it found it.

Each case is a fresh interpreter (libgomp and OpenBLAS read their variables once, when loaded); a finder
on ``sys.meta_path`` records ``GOMP_SPINCOUNT`` at the moment ``import torch`` starts and
``OPENBLAS_NUM_THREADS`` when ``numpy`` starts; the process's threads are counted after the import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qwenkit.library_threads import OPENMP_SPIN_COUNT

PROBE = r"""
import json, os, sys
seen, blas = [], []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
        if name == "numpy":
            blas.append(os.environ.get("OPENBLAS_NUM_THREADS"))
        return None
if sys.argv[1] == "torch-first":
    import torch
sys.meta_path.insert(0, Spy())
from qwenkit.cli import _import_without_gc
_import_without_gc("qwenkit.cli.chat")
import torch
print(json.dumps({"at_import": seen[:1], "after": os.environ.get("GOMP_SPINCOUNT"), "torch": torch.__name__,
                  "blas_at_import": blas[:1], "blas_after": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "threads": len(os.listdir("/proc/self/task"))}))
"""


def probe(case: str, **env: str) -> dict:
    mine = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")
    clean = {k: v for k, v in os.environ.items() if k not in mine}
    r = subprocess.run(
        [sys.executable, "-c", PROBE, case], env=clean | env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def without_threads(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "threads"}


def test_torch_loads_with_the_bounded_spin_and_the_variable_is_gone_after():
    assert without_threads(probe("fresh")) == {
        "at_import": [OPENMP_SPIN_COUNT],
        "after": None,
        "torch": "torch",
        "blas_at_import": ["1"],
        "blas_after": None,
    }


def test_openblas_starts_no_workers():
    """With OpenBLAS's default, numpy's import starts a worker per further core (each spinning ~0.1 s of
    CPU): the CLI's import has that many threads fewer than one the user pinned to a thread count."""
    ours = probe("fresh")["threads"]
    default = probe("fresh", OPENBLAS_NUM_THREADS=str(os.cpu_count()))
    assert default["blas_at_import"] == [str(os.cpu_count())] and default["blas_after"] == str(os.cpu_count())
    assert default["threads"] - ours == os.cpu_count() - 1


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"GOMP_SPINCOUNT": "77"}, {"at_import": ["77"], "after": "77"}),
        ({"OMP_WAIT_POLICY": "active"}, {"at_import": [None], "after": None}),
    ],
)
def test_a_users_own_openmp_setting_is_kept(env, expected):
    ours = {"torch": "torch", "blas_at_import": ["1"], "blas_after": None}
    assert without_threads(probe("fresh", **env)) == expected | ours


def test_nothing_is_set_once_torch_is_already_loaded():
    # torch imported before the CLI: the finder never sees its import, and the variable is never set
    expected = {"at_import": [], "after": None, "torch": "torch", "blas_at_import": [], "blas_after": None}
    assert without_threads(probe("torch-first")) == expected


API_PROBE = r"""
import json, os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
        return None
if sys.argv[1] == "torch-first":
    import torch
sys.meta_path.insert(0, Spy())
from qwenkit.generate import LLM
print(json.dumps({"at_import": seen[:1], "after": os.environ.get("GOMP_SPINCOUNT"),
                  "blas": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


@pytest.mark.parametrize(
    "case, env, expected",
    [
        ("fresh", {}, {"at_import": [OPENMP_SPIN_COUNT], "after": OPENMP_SPIN_COUNT, "blas": None}),
        ("fresh", {"GOMP_SPINCOUNT": "77"}, {"at_import": ["77"], "after": "77", "blas": None}),
        ("fresh", {"OMP_WAIT_POLICY": "passive"}, {"at_import": [None], "after": None, "blas": None}),
        ("torch-first", {}, {"at_import": [], "after": None, "blas": None}),
    ],
)
def test_the_python_api_loads_torch_with_the_bounded_spin_too(case, env, expected):
    """`from qwenkit.generate import LLM` before torch: libgomp loads with the commands' spin (it loaded
    with libgomp's default, and a program's LLM decoded the tiny test model at 34-57 tokens/s where the
    commands do 174-245). Numpy's OpenBLAS is the program's own business there: left alone."""
    mine = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")
    clean = {k: v for k, v in os.environ.items() if k not in mine}
    r = subprocess.run(
        [sys.executable, "-c", API_PROBE, case], env=clean | env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == expected
