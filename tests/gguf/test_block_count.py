"""A GGUF file whose block_count is not the number of its blocks is refused before the model is built."""

from __future__ import annotations

import pytest
from factories import hf_model
from gguf_files import write_gguf

from qwenkit.checkpoint import load_model
from qwenkit.errors import CheckpointError


def test_a_gguf_whose_block_count_is_not_its_blocks_is_refused(tmp_path):
    model = hf_model("qwen2")
    state = {n: p.detach() for n, p in model.state_dict().items()}
    config = {**model.config.to_dict(), "num_hidden_layers": 50}
    path = write_gguf(tmp_path / "m.gguf", "qwen2", config, state, tokenizer=False)
    with pytest.raises(CheckpointError, match="num_hidden_layers is 50, but the checkpoint holds 2 layers"):
        load_model(path, progress=False)
