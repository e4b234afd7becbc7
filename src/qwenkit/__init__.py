"""qwenkit."""

from qwenkit.library_threads import before_torch

before_torch()
