"""load_tokenizer: picks the backend from the files; missing or broken files give one-line errors."""

from __future__ import annotations

import shutil

import pytest
from tokenizer_data import QWEN3_DIR

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import HFTokenizer, QwenV1Tokenizer, TokenizerError, load_tokenizer


def test_backend_choice(v1, qwen3):
    assert isinstance(v1, QwenV1Tokenizer)
    assert isinstance(qwen3, HFTokenizer)


def test_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match="is not a directory") as e:
        load_tokenizer(tmp_path / "nope")
    assert isinstance(e.value, QwenkitError) and isinstance(e.value, ValueError)


def test_no_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == f"no tokenizer in {tmp_path}: looked for tokenizer.json or qwen.tiktoken"


def test_broken_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"cannot read .*tokenizer\.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "qwen.tiktoken").write_text("not base64 !!! x\n")
    with pytest.raises(TokenizerError, match="is not a tiktoken file"):
        load_tokenizer(tmp_path)


def test_broken_config(tmp_path):
    shutil.copy(QWEN3_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"cannot read .*tokenizer_config\.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        # once 'temperature must be a number, got 'hot'', naming an option the user never passed
        ({"do_sample": True, "temperature": "hot"}, "temperature must be a number, not 'hot'"),
        ({"do_sample": True, "top_k": 1.5}, "top_k must be a whole number, not 1.5"),
        # min_p is read as a default since it is taken from a GGUF file's general.sampling.min_p too
        ({"do_sample": True, "min_p": "low"}, "min_p must be a number, not 'low'"),
        ({"max_new_tokens": "many"}, "max_new_tokens must be a whole number, not 'many'"),
        # once truthy: a config that said "false" sampled
        ({"do_sample": "false", "temperature": 0.7}, "do_sample must be true or false, not 'false'"),
        # once dropped: the model's end token was no stop token and generation ran on past it
        ({"eos_token_id": "151645"}, "eos_token_id must be a token id or a list of them, not '151645'"),
        (
            {"eos_token_id": [151645, "x"]},
            "eos_token_id must be a token id or a list of them, not [151645, 'x']",
        ),
    ],
)
def test_a_generation_config_value_of_the_wrong_type_is_named_with_its_file(tmp_path, generation, message):
    import json

    shutil.copy(QWEN3_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == f"{tmp_path / 'generation_config.json'}: {message}"


def transformers5_layout(path):
    """The Qwen3 tokenizer as transformers 5's `save_pretrained` writes it: the chat template in
    chat_template.jinja, none in tokenizer_config.json."""
    import json

    path.mkdir()
    shutil.copy(QWEN3_DIR / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((QWEN3_DIR / "tokenizer_config.json").read_text())
    (path / "chat_template.jinja").write_text(config.pop("chat_template"), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_the_chat_template_of_chat_template_jinja_is_read(qwen3, tmp_path):
    """transformers reads a directory's chat_template.jinja (and prefers it to tokenizer_config.json's);
    without it qwenkit had no template and `chat`/`serve` refused the model."""
    tok = load_tokenizer(transformers5_layout(tmp_path / "t5"))
    assert tok.chat_template == qwen3.chat_template
    messages = [{"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(messages) == qwen3.apply_chat_template(messages)
    (tmp_path / "t5" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    assert load_tokenizer(tmp_path / "t5").render_chat_template(messages) == "Hi!!"
