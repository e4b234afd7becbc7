"""Shared by the kernel tests."""

from __future__ import annotations

import pytest

from qwenkit import kernels


@pytest.fixture(scope="module")
def loaded():
    """Fails (not skips) a test that needs the kernels where they should have loaded."""
    if not kernels.available():
        pytest.fail("kernels did not load on a CPU that has the ISA (see stderr)")
