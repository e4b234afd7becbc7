"""`qwenkit merge` on a GGUF base: the adapter is folded into the floats the file's blocks decode to (what
fine-tuning trained on), and the float checkpoint it writes gives the adapter-applied model's logits."""

from __future__ import annotations

import json

import torch
from factories import randomize_lora

from qwenkit.checkpoint import load_model
from qwenkit.cli import main
from qwenkit.default_model import default_model_path
from qwenkit.finetune.adapter_io import save_adapter
from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_modules

IDS = torch.tensor([[1, 504, 3758, 314, 4194, 28, 1336]])


def test_merge_into_the_bundled_q4_1_model(tmp_path):
    base = default_model_path()
    model, _ = load_model(base, "float32", progress=False, dequantize=True)
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "down_proj"))
    apply_lora(model, cfg)
    randomize_lora(model, seed=3, std=0.05)
    with torch.no_grad():
        adapted = model(IDS)
    (tmp_path / "a").mkdir()
    save_adapter(model, tmp_path / "a", cfg, str(base))
    assert main(["merge", str(base), str(tmp_path / "a"), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "float32"
    merged, config = load_model(tmp_path / "merged", "float32", progress=False)
    assert config.quantization is None and not lora_modules(merged)
    with torch.no_grad():
        got = merged(IDS)
    torch.testing.assert_close(got, adapted, rtol=0, atol=2e-4)
    assert int(got[0, -1].argmax()) == int(adapted[0, -1].argmax())


def test_merge_of_a_gguf_keeps_its_sampling_and_license(tmp_path):
    """The merged directory runs as the file ran (its publisher's sampling, not transformers' greedy
    default) and names the file's license, as `convert --to hf` of the same file does."""
    from qwenkit.checkpoint.gguf import generation_config_to_save, read_gguf
    from qwenkit.license import find_license

    base = default_model_path()
    model, _ = load_model(base, "float32", progress=False, dequantize=True)
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",))
    apply_lora(model, cfg)
    (tmp_path / "a").mkdir()
    save_adapter(model, tmp_path / "a", cfg, str(base))
    assert main(["merge", str(base), str(tmp_path / "a"), str(tmp_path / "merged")]) == 0
    gen = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert gen == generation_config_to_save(read_gguf(base))
    assert (gen["do_sample"], gen["temperature"], gen["top_p"], gen["eos_token_id"]) == (
        True,
        0.2,
        0.9,
        [2, 0, 4],
    )
    found = find_license(tmp_path / "merged")
    assert (found.name, found.source) == ("apache-2.0", "README.md")
