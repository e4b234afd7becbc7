"""Fixtures: the real Qwen tokenizer files shipped in test dependencies, each loaded once per session."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
import tiktoken
from tokenizer_data import QWEN3_DIR, QWEN_PAT, QWEN_SPECIALS, QWEN_TIKTOKEN

from qwenkit.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qwen_v1")
    shutil.copy(QWEN_TIKTOKEN, d / "qwen.tiktoken")
    return d


@pytest.fixture(scope="session")
def v1(v1_dir: Path):
    return load_tokenizer(v1_dir)


@pytest.fixture(scope="session")
def raw_tiktoken() -> tiktoken.Encoding:
    """An independent tiktoken.Encoding built straight from the file, as QWenTokenizer builds it."""
    lines = (ln.split() for ln in QWEN_TIKTOKEN.read_bytes().splitlines() if ln)
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in lines}
    return tiktoken.Encoding("ref", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=QWEN_SPECIALS)


@pytest.fixture(scope="session")
def qwen3():
    return load_tokenizer(QWEN3_DIR)


@pytest.fixture(scope="session")
def hf_qwen3():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(QWEN3_DIR))


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2 GGUF's own tokenizer (GPT-2 byte-level BPE, ChatML control tokens)."""
    from qwenkit.default_model import default_model_path
    from qwenkit.generate import tokenizer_for

    return tokenizer_for(default_model_path())  # `make setup` installs it; missing is a failure
