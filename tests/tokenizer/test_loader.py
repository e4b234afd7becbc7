"""load_tokenizer: picks the backend from the files; missing or broken files give one-line errors."""

from __future__ import annotations

import shutil

import pytest
from tokenizer_data import QWEN3_DIR

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import HFTokenizer, QwenV1Tokenizer, TokenizerError, load_tokenizer


def test_backend_choice(v1, qwen3):
    assert isinstance(v1, QwenV1Tokenizer)
    assert isinstance(qwen3, HFTokenizer)


def test_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match="is not a directory") as e:
        load_tokenizer(tmp_path / "nope")
    assert isinstance(e.value, QwenkitError) and isinstance(e.value, ValueError)


def test_no_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == f"no tokenizer in {tmp_path}: looked for tokenizer.json or qwen.tiktoken"


def test_broken_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"cannot read .*tokenizer\.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "qwen.tiktoken").write_text("not base64 !!! x\n")
    with pytest.raises(TokenizerError, match="is not a tiktoken file"):
        load_tokenizer(tmp_path)


def test_broken_config(tmp_path):
    shutil.copy(QWEN3_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"cannot read .*tokenizer_config\.json"):
        load_tokenizer(tmp_path)
