"""`qwenkit merge` stores the merged model in the base model's dtype, as peft's merge_and_unload and
save_pretrained keep it, unless --dtype asks for another."""

from __future__ import annotations

import json

import torch
from factories import hf_model, lora_model, save_hf, save_lora
from safetensors.torch import load_file

from qwenkit.cli import main as cli_main
from qwenkit.finetune.lora import LoRAConfig


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_merge_stores_the_base_models_dtype_by_default(tmp_path, capsys):
    """A bfloat16 base used to be merged into float32 files twice its size; now bfloat16, each weight the
    float32 merge rounded once, and ``--dtype float32`` still gives the float32 merge."""
    base = save_hf(hf_model("qwen2", tie_word_embeddings=False).to(torch.bfloat16), tmp_path / "base")
    assert json.loads((base / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0)
    save_lora(lora_model(base, cfg, seed=1), tmp_path / "a", cfg, base)
    assert cli_main(["merge", str(base), str(tmp_path / "a"), str(tmp_path / "m")]) == 0
    assert f"wrote {tmp_path / 'm'} (bfloat16)\n" in capsys.readouterr().err
    assert (
        cli_main(["merge", str(base), str(tmp_path / "a"), str(tmp_path / "m32"), "--dtype", "float32"]) == 0
    )
    merged, merged32 = _tensors(tmp_path / "m"), _tensors(tmp_path / "m32")
    assert merged.keys() == merged32.keys() and len(merged) > 10
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert {t.dtype for t in merged32.values()} == {torch.float32}
    for name, t in merged.items():
        assert torch.equal(t, merged32[name].to(torch.bfloat16)), name
    # the adapter moved the weights: the bfloat16 base's own weights are not what was written
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], _tensors(base)[q])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config.get("dtype", "bfloat16") == "bfloat16"
