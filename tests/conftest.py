import os
import sys
import tempfile
from pathlib import Path

from qwenkit.library_threads import quiet_library_threads

# torch loads libgomp as `qwenkit serve` and `chat` load it (GOMP_SPINCOUNT, quiet_library_threads): with
# libgomp's default spin its worker held the core the kernels' worker needs, and the in-process test
# servers (tests/server/live.py) decoded the tiny chat model at 20-57 tokens/s where `qwenkit serve` on the
# same model does 140-250 (2 shared cores, 2026-12-07).
with quiet_library_threads():
    import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
if not torch.cuda.is_available():
    # Triton kernels (quant/kernels/triton_affine.py) run on Triton's CPU interpreter here. Triton reads
    # this when it is first imported, so it is set before any test can import it.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# qwen-agent (a reference client in the server tests) makes its tool folders under ./workspace when it is
# imported; they go to the temporary directory instead of the checkout.
os.environ.setdefault(
    "QWEN_AGENT_DEFAULT_WORKSPACE", os.path.join(tempfile.gettempdir(), "qwenkit-tests-qwen-agent")
)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A random Qwen3-architecture model with the real Qwen3 tokenizer (for chat, CLI and server tests)."""
    from factories import write_tiny_chat_model

    return write_tiny_chat_model(tmp_path_factory.mktemp("chat") / "tiny-qwen3")


@pytest.fixture(scope="session", autouse=True)
def _own_cache_dir(tmp_path_factory):
    """Parsed GGUF headers and prepared models of the suite's throwaway checkpoints go to a directory of
    the session (and CLI subprocesses inherit it), never to the user's ~/.cache/qwenkit."""
    import os

    os.environ["QWENKIT_CACHE"] = str(tmp_path_factory.mktemp("qwenkit-cache"))
