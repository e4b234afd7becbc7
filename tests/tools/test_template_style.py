"""One reading of a chat template's tool and reasoning style, shared by the server, agent and evaluator."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from scripted import ScriptedModel, steer_next_request

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.tokenizer import load_tokenizer
from qwenkit.tools.agent import Agent, Tool
from qwenkit.tools.react import STOP_WORDS
from qwenkit.tools.template_style import prompt_opens_thinking, template_style

OPENED = "{{- '<|im_start|>assistant\\n<think>\\n' }}"  # a thinking template's generation prompt


def test_styles_of_real_and_v1_templates(tiny_chat_model):
    qwen3 = template_style(load_tokenizer(tiny_chat_model).chat_template)
    assert (qwen3.react, qwen3.reasoning, qwen3.stop) == (False, True, ())
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    v1 = template_style(chatml)
    assert (v1.react, v1.reasoning, v1.stop) == (True, False, STOP_WORDS)
    assert template_style(None).react


def test_prompt_opens_thinking_reads_the_rendered_end(tiny_chat_model):
    tok = load_tokenizer(tiny_chat_model)
    chat = [{"role": "user", "content": "hi <think>"}]
    plain = tok.apply_chat_template(chat, add_generation_prompt=True)
    closed = tok.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False)
    assert not prompt_opens_thinking(tok.decode, plain)
    assert not prompt_opens_thinking(tok.decode, closed)
    opened = tok.encode("<|im_start|>assistant\n<think>\n", allow_special=True)
    assert prompt_opens_thinking(
        tok.decode, plain + opened[len(tok.encode("<|im_start|>assistant\n", allow_special=True)) :]
    )


@pytest.fixture(scope="module")
def thinking_model(tiny_chat_model, tmp_path_factory):
    """The tiny Qwen3 model whose template opens <think> in the generation prompt (as thinking-only
    Qwen3 releases do), so the reply starts inside the reasoning block."""
    path = tmp_path_factory.mktemp("opens-think") / "m"
    shutil.copytree(tiny_chat_model, path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    old = "{{- '<|im_start|>assistant\\n' }}"
    assert config["chat_template"].count(old) == 1
    config["chat_template"] = config["chat_template"].replace(old, OPENED)
    config_file.write_text(json.dumps(config))
    return path


def test_agent_splits_reasoning_when_the_prompt_opened_it(thinking_model):
    loaded = LLM.load(thinking_model, dtype="float32", max_batch_size=2, progress=False)
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=2048)
    pending = steer_next_request(llm, model)
    pending.append(llm.tokenizer.encode("Two and two.\n</think>\n\nThe answer is 4.", allow_special=True))
    noop = Tool("noop", lambda: "", "Does nothing", {"type": "object", "properties": {}})
    result = Agent(llm, [noop], params=SamplingParams(max_tokens=40, temperature=0)).run("2+2?")
    assert result.answer == "The answer is 4."


def test_react_prompt_joins_text_parts(tiny_chat_model):
    """The ReAct prompt writes each content into its own text: text parts come in joined (a list failed
    there on a missing string method)."""
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    style = template_style(chatml)
    functions = [{"name": "now", "description": "Current time", "parameters": {}}]
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "What "}, {"type": "text", "text": "time?"}]}
    ]
    as_text = [{"role": "user", "content": "What time?"}]
    rendered = style.prompt_messages(parts, functions)
    assert rendered == style.prompt_messages(as_text, functions)
    assert rendered[0]["content"].endswith("\n\nQuestion: What time?")
