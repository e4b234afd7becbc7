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
