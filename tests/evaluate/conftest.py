import pytest

from qwenkit.evaluate.backends import LocalBackend
from qwenkit.generate import LLM


@pytest.fixture(scope="session")
def eval_llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, dtype="float32", max_batch_size=8, progress=False)


@pytest.fixture
def local(eval_llm):
    return LocalBackend(eval_llm, batch_size=8)
