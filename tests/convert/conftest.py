"""One chat-style Qwen v1 source (tokenizer, generation config, license) converted once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from v1_sources import CHAT_GENERATION, write_source

from qwenkit.convert.v1_to_qwen2 import ConversionResult, convert_v1_to_qwen2


@dataclass
class Converted:
    src: Path
    out: Path
    result: ConversionResult


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    root = tmp_path_factory.mktemp("chat")
    src = write_source(root / "Qwen-tiny-Chat", tokenizer=True, generation=CHAT_GENERATION)
    out = root / "Qwen-tiny-Chat-qwen2"
    # Small shards so the output is sharded too (the tiny model is ~640 kB in float32).
    result = convert_v1_to_qwen2(src, out, shard_bytes=200_000, progress=False)
    return Converted(src, out, result)
