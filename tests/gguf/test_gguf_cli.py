"""Every command that takes a model directory also takes a .gguf file."""

from __future__ import annotations

import json

from qwenkit.cli import main


def test_tokenize_and_template_read_the_gguf_tokenizer(smollm_path, hf_smollm_tokenizer, capsys, tmp_path):
    assert main(["tokenize", str(smollm_path), "Hello world, 12345!", "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == hf_smollm_tokenizer.encode("Hello world, 12345!", add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi"}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    assert main(["template", str(smollm_path), str(tmp_path / "m.json")]) == 0
    rendered = capsys.readouterr().out
    assert rendered.rstrip("\n") == hf_smollm_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ).rstrip("\n")
