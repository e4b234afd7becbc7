"""Named chat templates ("default" and "tool_use"): the one a call renders is the one transformers picks.

Hermes-2-Pro-style models keep their tool definitions in the "tool_use" template only; qwenkit rendered
"default" for every call, so a request offering tools got a prompt without them (and the server read the
tool-call format from the template that was not rendered)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizer_data import QWEN3_DIR

from qwenkit.cli import template
from qwenkit.tokenizer import TokenizerError, load_tokenizer
from qwenkit.tools.template_style import tool_style

# renders no tools at all, as a "default" beside a "tool_use" template may; its first line tells it apart
PLAIN = (
    "plain\n{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_USE = json.loads((QWEN3_DIR / "tokenizer_config.json").read_text())["chat_template"]  # hermes tools
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def named_dir(path: Path, layout: str, templates: dict[str, str]) -> Path:
    """The Qwen3 tokenizer with ``templates``: listed in tokenizer_config.json ("config"), or as
    transformers 5 saves them ("files": chat_template.jinja, additional_chat_templates/<name>.jinja)."""
    path.mkdir()
    shutil.copy(QWEN3_DIR / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((QWEN3_DIR / "tokenizer_config.json").read_text())
    del config["chat_template"]
    if layout == "config":
        config["chat_template"] = [{"name": n, "template": t} for n, t in templates.items()]
    else:
        for name, text in templates.items():
            if name == "default":
                (path / "chat_template.jinja").write_text(text, encoding="utf-8")
            else:
                (path / "additional_chat_templates").mkdir(exist_ok=True)
                (path / "additional_chat_templates" / f"{name}.jinja").write_text(text, encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(params=["config", "files"])
def two_templates(request, tmp_path) -> Path:
    return named_dir(tmp_path / "m", request.param, {"default": PLAIN, "tool_use": TOOL_USE})


def hf_prompt(path: Path, **kwargs) -> tuple[str, list[int]]:
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    assert isinstance(hf.chat_template, dict)  # transformers read the two of them
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kwargs)
    ids = hf.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=False, add_generation_prompt=True, **kwargs
    )
    return text, list(ids)


@pytest.mark.parametrize("tools", [TOOLS, [], None])
def test_the_template_is_the_one_transformers_picks(two_templates, tools):
    """With tools (even an empty list, as transformers tests ``is not None``): "tool_use"; without:
    "default". Text and ids equal transformers'."""
    tok = load_tokenizer(two_templates)
    text, ids = hf_prompt(two_templates, tools=tools)
    assert tok.render_chat_template(MESSAGES, tools=tools) == text
    assert tok.apply_chat_template(MESSAGES, tools=tools) == ids
    assert ("get_weather" in text) == bool(tools)
    assert text.startswith("plain<|im_start|>") == (tools is None)
    assert tok.chat_template == PLAIN
    assert tok.chat_template_for(tools) == (PLAIN if tools is None else TOOL_USE)


def test_tool_calls_are_read_in_the_format_of_the_rendered_template(two_templates, tmp_path, capsys):
    """The server, agent and evaluator read the call format from the template the prompt was rendered
    with: hermes <tool_call> from "tool_use" (it read "default", which renders no tools, and wrote a
    ReAct prompt over it); without tools, "default"'s."""
    tok = load_tokenizer(two_templates)
    style = tool_style(tok, TOOLS)
    assert (style.calls, style.reasoning) == ("hermes", True)
    assert tool_style(tok, None).calls == "react" and tool_style(tok, []).calls == "react"
    functions = [t["function"] for t in TOOLS]
    text, ids = hf_prompt(two_templates, tools=TOOLS)
    assert style.prompt_text(tok, MESSAGES, functions, TOOLS) == text
    assert style.tool_prompt(tok, MESSAGES, TOOLS) == ids

    (tmp_path / "m.json").write_text(json.dumps(MESSAGES))
    (tmp_path / "t.json").write_text(json.dumps(TOOLS))
    assert (
        template.main([str(two_templates), str(tmp_path / "m.json"), "--tools", str(tmp_path / "t.json")])
        == 0
    )
    out = capsys.readouterr()
    assert (out.out, out.err) == (text, "")
    assert template.main([str(two_templates), str(tmp_path / "m.json")]) == 0
    assert capsys.readouterr().out == hf_prompt(two_templates)[0]


def test_the_server_renders_the_tool_use_template(two_templates):
    from qwenkit.server.completions import chat_prompt
    from qwenkit.server.schemas import ChatCompletionRequest
    from qwenkit.server.tool_use import plan_tools

    llm = SimpleNamespace(tokenizer=load_tokenizer(two_templates), engine=SimpleNamespace(max_seq_len=4096))
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": TOOLS})
    ids = chat_prompt(llm, body)
    assert ids == hf_prompt(two_templates, tools=TOOLS)[1]
    plan = plan_tools(llm, body, ids)
    assert (plan.react, plan.llama3_json, plan.reasoning) == (False, False, True)


@pytest.mark.parametrize("layout", ["config", "files"])
def test_no_default_template(tmp_path, layout):
    """Only a "tool_use" template: it renders calls with tools; one without is refused in a line naming
    the templates, where transformers raises."""
    path = named_dir(tmp_path / "m", layout, {"tool_use": TOOL_USE})
    tok = load_tokenizer(path)
    assert tok.apply_chat_template(MESSAGES, tools=TOOLS) == hf_prompt(path, tools=TOOLS)[1]
    with pytest.raises(TokenizerError) as e:
        tok.render_chat_template(MESSAGES)
    assert str(e.value) == (
        "this model has several chat templates (tool_use) and none named 'default' to render this "
        "conversation with"
    )
    with pytest.raises(ValueError, match="no default specified"):
        hf_prompt(path)


def test_malformed_template_list_is_one_line(tmp_path):
    path = named_dir(tmp_path / "m", "config", {"default": PLAIN})
    config = json.loads((path / "tokenizer_config.json").read_text())
    for value, message in [
        ([{"template": PLAIN}], "a string or a list of"),
        ([{"name": "default", "template": 3}], "chat_template 'default' must be a string"),
        (7, "a string or a list of"),
    ]:
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": value}))
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(path)


@pytest.mark.parametrize("name", ["chat_template.jinja", "additional_chat_templates/tool_use.jinja"])
def test_a_template_file_that_is_not_utf8_is_one_line(tmp_path, name):
    """A UnicodeDecodeError traceback from every command that read the tokenizer (template, chat, serve)."""
    path = named_dir(tmp_path / "m", "files", {"default": PLAIN, "tool_use": TOOL_USE})
    (path / name).write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    assert str(e.value).startswith(f"cannot read {path / name}: not UTF-8 text ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tools", [TOOLS, None])
@pytest.mark.parametrize("name", ["default", "tool_use", "{{ messages[1]['content'] }}!"])
def test_chat_template_argument_picks_by_name(two_templates, tools, name):
    """transformers' ``chat_template`` argument: a name renders that template whatever the tools, other
    text is a template itself (it was a template variable, and "default" was rendered)."""
    tok = load_tokenizer(two_templates)
    text, ids = hf_prompt(two_templates, tools=tools, chat_template=name)
    assert tok.render_chat_template(MESSAGES, tools=tools, chat_template=name) == text
    assert tok.apply_chat_template(MESSAGES, tools=tools, chat_template=name) == ids
    if name == "tool_use" and tools is None:
        assert text.startswith("<|im_start|>system\nBe brief.")
    if name == "default":
        assert text.startswith("plain<|im_start|>")


def test_template_command_chat_template_option(two_templates, tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps(MESSAGES))
    (tmp_path / "t.json").write_text(json.dumps(TOOLS))
    args = [str(two_templates), str(tmp_path / "m.json"), "--tools", str(tmp_path / "t.json")]
    assert template.main([*args, "--chat-template", "tool_use"]) == 0
    assert capsys.readouterr().out == hf_prompt(two_templates, tools=TOOLS, chat_template="tool_use")[0]
    assert template.main([*args[:2], "--chat-template", "default"]) == 0
    assert capsys.readouterr().out == hf_prompt(two_templates, chat_template="default")[0]
    assert template.main([*args, "--chat-template", "default"]) == 0  # it renders no tools: ReAct's prompt
    out = capsys.readouterr()
    assert out.out.startswith("plain<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnswer the")
    assert "the prompt below carries the ReAct instruction" in out.err
    assert template.main([*args[:2], "--chat-template", "tool_use", "--ids"]) == 0
    assert json.loads(capsys.readouterr().out) == hf_prompt(two_templates, chat_template="tool_use")[1]
    assert template.main([*args, "--chat-template", "rag"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {two_templates} has no chat template named 'rag' (it has default, tool_use)\n"
    )


def test_the_server_takes_no_chat_template_among_the_template_kwargs(two_templates):
    """vLLM refuses it there; taken by the tokenizer as its template choice, a request could have
    rendered any template text."""
    from qwenkit.cli.serve import chat_template_kwargs
    from qwenkit.errors import QwenkitError
    from qwenkit.server.completions import template_kwargs
    from qwenkit.server.errors import APIError
    from qwenkit.server.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}
    )
    with pytest.raises(APIError) as e:
        template_kwargs(body)
    assert (e.value.status, e.value.param) == (400, "chat_template_kwargs")
    with pytest.raises(QwenkitError, match="may not hold chat_template"):
        chat_template_kwargs('{"chat_template": "tool_use"}')


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_finetune_labels_render_the_template_the_record_picks(two_templates, tools):
    """A training record with tools is rendered by "tool_use", as transformers renders it (and as a server
    prompts the trained model); one without by "default". Only the reply is labelled."""
    import transformers

    from qwenkit.finetune.encode import IGNORE, encode_messages

    tok = load_tokenizer(two_templates)
    reply = {"role": "assistant", "content": "It is sunny."}
    ids, labels = encode_messages(tok, [*MESSAGES, reply], tools)
    hf = transformers.AutoTokenizer.from_pretrained(str(two_templates))
    want = hf.apply_chat_template([*MESSAGES, reply], tools=tools, tokenize=True, return_dict=False)
    assert ids == list(want)
    assert tok.decode([t for t in labels if t != IGNORE]) == "It is sunny.<|im_end|>"
    assert ("get_weather" in tok.decode(ids)) == (tools is not None)
