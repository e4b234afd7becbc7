"""The README's main job, as a new user runs it: chat with the bundled default model, no download."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--seed", "0"]])
def test_default_model_knows_the_capital_of_france(sampling):
    r = subprocess.run(
        [sys.executable, "-m", "qwenkit.cli", "chat", "-p", "What is the capital of France?", *sampling],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
