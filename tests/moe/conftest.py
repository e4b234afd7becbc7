import sys
from pathlib import Path

# The GGUF writer the GGUF tests use (llama.cpp's names and layout) writes our MoE files too, and the
# decode-layer tests' steps check MoE layers in one kernel call.
sys.path.insert(0, str(Path(__file__).parent.parent / "gguf"))
sys.path.insert(0, str(Path(__file__).parent.parent / "quant"))

import shutil

import pytest


@pytest.fixture(scope="session")
def moe_with_tokenizer(tmp_path_factory):
    """A tiny random Qwen3-MoE with the real Qwen3 tokenizer files (for quantize and the CLI)."""
    from factories import qwen3_tokenizer_dir
    from moe_models import hf_moe_model

    path = tmp_path_factory.mktemp("moe") / "with-tokenizer"
    hf_moe_model("qwen3_moe", vocab_size=151936).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)
    return path
