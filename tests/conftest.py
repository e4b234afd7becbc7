import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A random Qwen3-architecture model with the real Qwen3 tokenizer (for chat, CLI and server tests)."""
    from factories import write_tiny_chat_model

    return write_tiny_chat_model(tmp_path_factory.mktemp("chat") / "tiny-qwen3")
