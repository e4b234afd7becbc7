"""A config.json that promises more (or fewer) layers, or another embedding, than its weights hold is
refused before the model is built, naming the key and both numbers; `info` counts layers arithmetically."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from factories import TINY, hf_model, save_hf

from qwenkit.checkpoint import load_model
from qwenkit.config import ModelConfig
from qwenkit.errors import CheckpointError, ConfigError


def _edit_config(path, **values):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **values}))
    return path


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("promises") / "qwen2")


def _run(*args: str) -> subprocess.CompletedProcess:
    # a timeout, so that a regression (building 100,000 layers) fails instead of hanging the suite
    return subprocess.run(
        [sys.executable, "-m", "qwenkit", *args], capture_output=True, text=True, timeout=60
    )


def test_generate_refuses_a_config_of_more_layers_than_the_weights_at_once(tiny_chat_model, tmp_path):
    model = _edit_config(shutil.copytree(tiny_chat_model, tmp_path / "m"), num_hidden_layers=100_000)
    r = _run("generate", str(model), "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines()[-1] == (
        f"error: {model}: config.json's num_hidden_layers is 100,000, but the checkpoint holds 1 layers; "
        "fix config.json or use the weights it was written for"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_hidden_layers": 1}, "num_hidden_layers is 1, but the checkpoint holds 2 layers"),
        ({"num_hidden_layers": 100_000}, "num_hidden_layers is 100,000, but the checkpoint holds 2 layers"),
        (
            {"vocab_size": 10**9},
            "vocab_size is 1,000,000,000, but the checkpoint holds an embedding of 512 rows",
        ),
        (
            {"intermediate_size": 10**9},
            "intermediate_size is 1,000,000,000, but the checkpoint holds an FFN of width 160 in layer 0",
        ),
        (
            {"hidden_size": 2**20, "head_dim": 16},
            "hidden_size is 1,048,576, but the checkpoint holds an embedding 64 wide",
        ),
    ],
)
def test_load_model_names_the_key_and_both_numbers(qwen2_dir, tmp_path, values, message):
    model = _edit_config(shutil.copytree(qwen2_dir, tmp_path / "m"), **values)
    with pytest.raises(CheckpointError, match=f"^{model}: config.json's {message}; fix config.json"):
        load_model(model, progress=False)


def test_info_on_two_billion_layers_counts_them_without_a_loop(qwen2_dir, tmp_path):
    model = _edit_config(shutil.copytree(qwen2_dir, tmp_path / "m"), num_hidden_layers=2_000_000_000)
    r = _run("info", str(model))
    assert r.returncode == 0, r.stderr
    layers = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("layers ")]
    assert layers == [["layers", "2000000000"]]


@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("mlp_only", [(), (0,), (1, 5, 9, 40), (-1, 2)])
def test_sparse_layers_are_counted_as_they_are_listed(step, mlp_only):
    for layers in (1, 2, 7, 12):
        cfg = ModelConfig.from_hf(
            {
                "model_type": "qwen2_moe",
                **TINY,
                "num_hidden_layers": layers,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "decoder_sparse_step": step,
                "mlp_only_layers": list(mlp_only),
            }
        )
        assert cfg.num_sparse_layers == len(cfg.sparse_layers)


def test_sliding_layers_of_two_billion_are_named_as_a_span():
    cfg = {"model_type": "qwen2", **TINY, "num_hidden_layers": 2_000_000_000, "use_sliding_window": True}
    with pytest.raises(ConfigError, match=r"^use_sliding_window=true makes layer\(s\) 28-1999999999 sliding"):
        ModelConfig.from_hf({**cfg, "sliding_window": 4096, "max_window_layers": 28})
