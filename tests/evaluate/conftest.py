import pytest

from qwenkit.evaluate.backends import LocalBackend
from qwenkit.generate import LLM


@pytest.fixture(scope="session")
def eval_llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, dtype="float32", max_batch_size=8, progress=False)


@pytest.fixture
def local(eval_llm):
    return LocalBackend(eval_llm, batch_size=8)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny random Llama whose tokenizer adds a BOS to every prompt."""
    from llama_tokenizers import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def llama_llm(llama_dir):
    llm = LLM.load(llama_dir, dtype="float32", max_batch_size=8, progress=False)
    yield llm
    llm.close()
