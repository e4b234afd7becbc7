"""The CLI loads torch's OpenMP with a bounded spin and leaves the user's environment as it found it.

Each case is a fresh interpreter (libgomp reads the variable once, when torch loads it); a finder on
``sys.meta_path`` records ``GOMP_SPINCOUNT`` at the moment ``import torch`` starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qwenkit.cli import OPENMP_SPIN_COUNT

PROBE = r"""
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
from qwenkit.cli import _import_without_gc
_import_without_gc("qwenkit.cli.chat")
import torch
print(json.dumps({"at_import": seen[:1], "after": os.environ.get("GOMP_SPINCOUNT"), "torch": torch.__name__}))
"""


def probe(case: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    r = subprocess.run(
        [sys.executable, "-c", PROBE, case], env=clean | env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_torch_loads_with_the_bounded_spin_and_the_variable_is_gone_after():
    assert probe("fresh") == {"at_import": [OPENMP_SPIN_COUNT], "after": None, "torch": "torch"}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"GOMP_SPINCOUNT": "77"}, {"at_import": ["77"], "after": "77"}),
        ({"OMP_WAIT_POLICY": "active"}, {"at_import": [None], "after": None}),
    ],
)
def test_a_users_own_openmp_setting_is_kept(env, expected):
    assert probe("fresh", **env) == expected | {"torch": "torch"}


def test_nothing_is_set_once_torch_is_already_loaded():
    # torch imported before the CLI: the finder never sees its import, and the variable is never set
    assert probe("torch-first") == {"at_import": [], "after": None, "torch": "torch"}
