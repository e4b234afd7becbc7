"""A GGUF file whose feed_forward_length is not the width of its FFN tensors is refused in one line
naming both numbers (its config took the width from the tensors, so it used to load without a word)."""

from __future__ import annotations

import pytest
from factories import hf_model
from gguf_files import write_gguf

from qwenkit.checkpoint import load_model
from qwenkit.cli import main as cli_main
from qwenkit.errors import CheckpointError


def _state(model):
    return {n: p.detach() for n, p in model.state_dict().items()}


def test_a_gguf_whose_feed_forward_length_is_not_its_tensors_width_is_refused(tmp_path, capsys):
    model = hf_model("qwen2")  # intermediate_size 160
    config = {**model.config.to_dict(), "intermediate_size": 999}  # the metadata's; the tensors stay 160
    path = write_gguf(tmp_path / "m.gguf", "qwen2", config, _state(model))
    message = (
        f"{path}: its metadata's qwen2.feed_forward_length is 999, but it holds an FFN of width 160 in "
        "layer 0; the file's metadata does not describe its weights"
    )
    with pytest.raises(CheckpointError) as e:
        load_model(path, progress=False)
    assert str(e.value) == message
    capsys.readouterr()
    assert cli_main(["generate", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "1"]) != 0
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize(("arch", "stated"), [("qwen2", 160), ("qwen", 320), ("qwen", 160)])
def test_a_gguf_whose_feed_forward_length_is_its_tensors_width_loads(tmp_path, arch, stated):
    """Qwen v1 files may store the width doubled, as v1's config.json does (llama.cpp's own convention)."""
    if arch == "qwen":
        from factories import V1_TINY, v1_state_dict

        state = v1_state_dict(V1_TINY)  # FFN tensors 160 wide
        config = {**V1_TINY, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
        config["intermediate_size"] = stated // 2  # write_gguf writes twice what it is given for v1
    else:
        model = hf_model("qwen2")
        state, config = _state(model), {**model.config.to_dict(), "intermediate_size": stated}
    path = write_gguf(tmp_path / "m.gguf", arch, config, state, tokenizer=False)
    loaded, cfg = load_model(path, "float32", progress=False)
    assert cfg.intermediate_size == 160
    assert tuple(loaded.model.layers[0].mlp.up_proj.weight.shape) == (160, 64)
