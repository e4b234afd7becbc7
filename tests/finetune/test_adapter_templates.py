"""The chat templates a LoRA adapter was trained with, written beside it. A model with named templates
("default" and "tool_use", which rows with tools render) had chat_template.json with the default alone,
and nothing at all where it has no "default"; they are now written as transformers 5 saves them."""

from __future__ import annotations

import json

from factories import with_named_templates

from qwenkit.finetune.run import finetune
from qwenkit.finetune.trainer import TrainArgs
from qwenkit.tokenizer.named_templates import template_files

CHATML = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_run(model, tmp_path):
    data = tmp_path / "d.jsonl"
    msgs = [{"role": "user", "content": "1 plus one?"}, {"role": "assistant", "content": "2."}]
    data.write_text(json.dumps({"messages": msgs}) + "\n")
    out = tmp_path / "o"
    finetune(model, data, out, TrainArgs(max_steps=1, batch_size=1, lora_r=2, progress=False))
    return out


def test_an_adapter_of_named_templates_keeps_them_all(tiny_chat_model, tmp_path):
    model = with_named_templates(tiny_chat_model, tmp_path / "m", CHATML)
    tool_use = (model / "additional_chat_templates" / "tool_use.jinja").read_text()
    out = tiny_run(model, tmp_path)
    assert (out / "chat_template.jinja").read_text() == CHATML
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == tool_use
    assert not (out / "chat_template.json").exists()  # AutoProcessor refuses it beside the folder
    assert template_files(out) == [
        {"name": "default", "template": CHATML},
        {"name": "tool_use", "template": tool_use},
    ]


def test_an_adapter_of_one_template_keeps_chat_template_json(tiny_chat_model, tmp_path):
    out = tiny_run(tiny_chat_model, tmp_path)
    template = json.loads((tiny_chat_model / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((out / "chat_template.json").read_text()) == {"chat_template": template}
    assert not (out / "chat_template.jinja").exists()


def test_a_template_name_that_is_a_path_is_left_out(tmp_path):
    from qwenkit.tokenizer.named_templates import save_named_templates

    named = {"default": "d", "tool_use": "t", "../escape": "x", "a/b": "y", ".hidden": "z"}
    assert save_named_templates(named, tmp_path) == ["default", "tool_use"]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["additional_chat_templates/tool_use.jinja", "chat_template.jinja"]
