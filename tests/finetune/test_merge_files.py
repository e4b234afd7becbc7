"""What `qwenkit merge` writes beside the merged weights: the base's license stays with the model."""

from __future__ import annotations

import shutil
from pathlib import Path

from factories import hf_model, lora_model, save_hf, save_lora

from qwenkit.cli import main as cli_main
from qwenkit.finetune.lora import LoRAConfig
from qwenkit.license import find_license


def test_merge_keeps_the_license_files_and_the_model_cards_license(tmp_path):
    """A merged model is still under its base's license: LICENSE/NOTICE are copied, and a license named
    only in the base's model card front matter is named in the merged directory's card."""
    qwen2_dir = save_hf(hf_model("qwen2", tie_word_embeddings=False), tmp_path / "q2")
    base, carded = (Path(shutil.copytree(qwen2_dir, tmp_path / name)) for name in ("base", "carded"))
    (base / "LICENSE").write_text("Tongyi Qianwen LICENSE AGREEMENT\n...")
    (base / "NOTICE").write_text("This product contains Qwen models by Alibaba Cloud.\n")
    (carded / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# a model\n")
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0)
    save_lora(lora_model(qwen2_dir, cfg), tmp_path / "a", cfg, qwen2_dir)
    for src, out in ((base, "m1"), (carded, "m2")):
        assert cli_main(["merge", str(src), str(tmp_path / "a"), str(tmp_path / out)]) == 0
    for name in ("LICENSE", "NOTICE"):
        assert (tmp_path / "m1" / name).read_text() == (base / name).read_text()
    assert find_license(tmp_path / "m1").name == "tongyi-qianwen"
    found = find_license(tmp_path / "m2")
    assert (found.name, found.source) == ("apache-2.0", "README.md")


def test_merge_keeps_the_named_chat_templates_and_the_files_other_tools_read(tmp_path):
    """A tokenizer saved with named templates (transformers writes tool_use to
    additional_chat_templates/tool_use.jinja) lost them in the merged directory: AutoTokenizer there had
    only the default template, and tools that ask for "tool_use" failed. Qwen2.5-1M's
    sparse_attention_config.json (vLLM reads it beside dual_chunk_attention_config) was dropped too. Each
    is copied byte for byte."""
    import transformers

    qwen2_dir = save_hf(hf_model("qwen2", tie_word_embeddings=False), tmp_path / "q2")
    base = Path(shutil.copytree(qwen2_dir, tmp_path / "base"))
    tool_use = "{% for m in messages %}TOOL {{ m['content'] }}\n{% endfor %}"
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "tool_use.jinja").write_bytes(tool_use.encode())
    sparse = b'{"0": {"5": ["vertical_and_slash", 1000, 6096, 0.5]}}\n'
    (base / "sparse_attention_config.json").write_bytes(sparse)
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0)
    save_lora(lora_model(qwen2_dir, cfg), tmp_path / "a", cfg, qwen2_dir)
    assert cli_main(["merge", str(base), str(tmp_path / "a"), str(tmp_path / "m")]) == 0
    merged = tmp_path / "m"
    for name in ("additional_chat_templates/tool_use.jinja", "sparse_attention_config.json"):
        assert (merged / name).read_bytes() == (base / name).read_bytes()
    templates = transformers.AutoTokenizer.from_pretrained(merged).chat_template
    assert isinstance(templates, dict) and templates["tool_use"] == tool_use
