"""Every command that takes a model directory also takes a .gguf file."""

from __future__ import annotations

import json

from qwenkit.cli import main


def test_tokenize_and_template_read_the_gguf_tokenizer(smollm_path, hf_smollm_tokenizer, capsys, tmp_path):
    assert main(["tokenize", str(smollm_path), "Hello world, 12345!", "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == hf_smollm_tokenizer.encode("Hello world, 12345!", add_special_tokens=False)
    assert main(["tokenize", "Hello world, 12345!", "--json"]) == 0  # no model: the bundled one, as chat
    assert json.loads(capsys.readouterr().out) == ids
    messages = [{"role": "user", "content": "Hi"}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    assert main(["template", str(smollm_path), str(tmp_path / "m.json")]) == 0
    rendered = capsys.readouterr().out
    assert rendered.rstrip("\n") == hf_smollm_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ).rstrip("\n")


def test_template_with_tools_a_template_cannot_render_shows_the_react_prompt(capsys, tmp_path, smollm_path):
    """SmolLM2's template has no tools section: the server prompts it with ReAct, and `template` prints
    that prompt (saying so on stderr) instead of silently dropping the tools."""
    from qwenkit.generate import tokenizer_for
    from qwenkit.tools.react import react_messages

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {}}}}
    (tmp_path / "m.json").write_text(json.dumps(messages))
    (tmp_path / "t.json").write_text(json.dumps([{"type": "function", "function": function}]))
    model = str(smollm_path)
    assert main(["template", model, str(tmp_path / "m.json"), "--tools", str(tmp_path / "t.json")]) == 0
    out, err = capsys.readouterr()
    assert out == tokenizer_for(model).render_chat_template(react_messages(messages, [function]))
    assert "get_weather" in out and "Action Input:" in out
    assert err.startswith(
        "qwenkit template: this template renders no hermes <tool_call> tools; the prompt below carries"
    )
    (tmp_path / "bad.json").write_text('[{"type": "function"}]')
    assert main(["template", model, str(tmp_path / "m.json"), "--tools", str(tmp_path / "bad.json")]) == 2
    shape = '{"type": "function", "function": {...}}'
    assert capsys.readouterr().err == f"error: {tmp_path / 'bad.json'}: tools[0] must be {shape}\n"


def _gguf_without(tmp_path, gguf_writer, key: str):
    """A tiny qwen2 GGUF file whose metadata lacks ``key``."""
    from factories import hf_model
    from gguf_files import Q, tiny_vocab

    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    state = {n: p.detach() for n, p in model.named_parameters()}
    return gguf_writer(
        tmp_path / "bare.gguf", "qwen2", model.config.to_dict(), state, Q.F16,
        extra=lambda w: w.kv_data[0].pop(key),
    )  # fmt: skip


def test_info_on_a_gguf_without_a_license_says_where_it_looked(tmp_path, gguf_writer, capsys):
    """A GGUF file's license is its general.license key (the directory around it is not read): info says
    so, not that none was found "in the model directory"."""
    path = _gguf_without(tmp_path, gguf_writer, "general.license")
    assert main(["info", str(path)]) == 0
    assert capsys.readouterr().out.endswith("\nlicense:\n  none found: the file has no general.license key\n")


def test_chat_on_a_gguf_without_a_template_names_the_key_it_lacks(tmp_path, gguf_writer, capsys):
    """The message named only a directory's files, which a GGUF file has none of."""
    path = _gguf_without(tmp_path, gguf_writer, "tokenizer.chat_template")
    assert main(["chat", str(path), "-p", "hi", "--max-new-tokens", "1"]) == 2
    assert capsys.readouterr().err == (
        "error: this tokenizer has no chat_template (neither tokenizer_config.json nor chat_template.jinja "
        "has one; in a GGUF file, no tokenizer.chat_template key)\n"
    )
