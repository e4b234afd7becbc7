"""GPTQ checkpoints without ``g_idx`` tensors load as vLLM loads them.

Some writers omit ``g_idx`` when ``desc_act`` is false; readers then use the default ``i // group_size``.
qwenkit refused them with "missing tensor(s) ...g_idx". With ``desc_act`` true the groups are a
permutation only the file knows, so such a checkpoint is refused in one line naming the problem.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factories import hf_model
from safetensors.torch import load_file, save_file

from qwenkit.checkpoint import load_model
from qwenkit.quant.gptq_format import QuantizationError
from qwenkit.quant.pipeline import quantize_checkpoint

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    root = tmp_path_factory.mktemp("no-g-idx")
    hf_model("qwen2", hidden_size=64, intermediate_size=128).save_pretrained(root / "float")
    quantize_checkpoint(root / "float", root / "int4", bits=4, group_size=32, method="rtn", progress=False)
    return root


def _without_g_idx(root, name, **quantization):
    out = root / name
    shutil.copytree(root / "int4", out)
    tensors = load_file(out / "model.safetensors")
    dropped = [k for k in tensors if k.endswith(".g_idx")]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, out / "model.safetensors")
    for file in ("config.json", "quantize_config.json"):
        data = json.loads((out / file).read_text())
        (data.get("quantization_config", data)).update(quantization)
        (out / file).write_text(json.dumps(data))
    return out


def test_checkpoint_without_g_idx_loads_with_the_default_groups(int4) -> None:
    out = _without_g_idx(int4, "plain")
    expected, _ = load_model(int4 / "int4", dtype="float32", progress=False)
    model, _ = load_model(out, dtype="float32", progress=False)
    with torch.no_grad():
        assert torch.equal(model(IDS), expected(IDS))
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.to_int().g_idx, torch.arange(64, dtype=torch.int32) // 32)


def test_act_order_checkpoint_without_g_idx_is_refused(int4) -> None:
    out = _without_g_idx(int4, "act-order", desc_act=True)
    with pytest.raises(QuantizationError) as e:
        load_model(out, dtype="float32", progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert "desc_act" in message and "g_idx" in message
    assert "model.layers.0.mlp.down_proj.g_idx" in message
