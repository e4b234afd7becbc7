import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from browser_pages import browser, open_page  # noqa: F401 - the web page tests' fixtures
from live import LiveServer

from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app


@pytest.fixture(scope="session")
def chat_llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, dtype="float32", max_batch_size=8, progress=False)


@pytest.fixture(scope="module")
def server(chat_llm):
    """The tiny chat model served with defaults, response cache off (so every request runs the model)."""
    app = create_app(chat_llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as live:
        yield live


@pytest.fixture
def make_server(chat_llm):
    """Start a server with other settings on the same model."""
    started = []

    def start(**config) -> LiveServer:
        live = LiveServer(create_app(chat_llm, ServerConfig(served_model_name="tiny", **config)))
        started.append(live.__enter__())
        return live

    yield start
    for live in started:
        live.__exit__(None, None, None)
