"""A ``.bin`` (pickle) checkpoint is unpickled once per file at load: the layout check's read of its
names and shapes is handed to the loader, which used to unpickle every file a second time."""

from __future__ import annotations

import json

import pytest
import torch
from factories import hf_model

from qwenkit.checkpoint import load_model


@pytest.fixture
def torch_loads(monkeypatch):
    """The files torch.load is called on, in order."""
    calls, real = [], torch.load

    def counting(f, *args, **kwargs):
        calls.append(f)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return calls


def _bin_dir(path, hf, shards: int):
    path.mkdir()
    hf.config.to_json_file(path / "config.json")
    state = hf.state_dict()
    names = list(state)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return [path / "pytorch_model.bin"]
    files, weight_map = [], {}
    for i in range(shards):
        file = path / f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, file)
        weight_map |= dict.fromkeys(part, file.name)
        files.append(file)
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return files


@pytest.mark.parametrize("shards", [1, 3])
def test_a_bin_checkpoint_is_unpickled_once_per_file(tmp_path, torch_loads, shards):
    hf = hf_model("qwen2", tie_word_embeddings=False)
    files = _bin_dir(tmp_path / "m", hf, shards)
    model, _ = load_model(tmp_path / "m", "float32", progress=False)
    assert sorted(map(str, torch_loads)) == sorted(map(str, files))
    ids = torch.tensor([[3, 17, 200, 5, 9, 41]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
