"""Fixtures for the GGUF tests: the bundled SmolLM2 file (opened once per session, by us and by
transformers) and a writer that builds small GGUF files the way llama.cpp's converter lays them out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf_files import write_gguf

# ---- the real file ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from qwenkit.default_model import default_model_path

    return default_model_path()  # `make setup` installs it; a missing file is a failure, not a skip


@pytest.fixture(scope="session")
def smollm(smollm_path: Path):
    from qwenkit.checkpoint.gguf import read_gguf

    return read_gguf(smollm_path)


@pytest.fixture(scope="session")
def hf_smollm(smollm_path: Path):
    """transformers' own GGUF import of the same file (dequantized, float32)."""
    import transformers  # needs accelerate (a test dependency) to load GGUF files

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture
def gguf_writer() -> Callable[..., Path]:
    return write_gguf
