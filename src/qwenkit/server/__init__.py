"""The OpenAI-compatible server: ``create_app(llm)`` for embedding, ``qwenkit serve`` to run it."""

from qwenkit.server.app import create_app
from qwenkit.server.state import ServerConfig

__all__ = ["ServerConfig", "create_app"]
