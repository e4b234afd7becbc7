"""`qwenkit tokenize` and `qwenkit template`: exact output, one-line errors with exit code 2."""

from __future__ import annotations

import io
import json

import pytest
from tokenizer_data import QWEN3_DIR

from qwenkit.cli import template, tokenize
from qwenkit.tokenizer import load_tokenizer


def test_tokenize_pieces(capsys, v1_dir):
    assert tokenize.main([str(v1_dir), " Hello world"]) == 0
    assert capsys.readouterr().out == '21927\tĠHello\t" Hello"\n1879\tĠworld\t" world"\n'


def test_tokenize_shows_each_tokens_text(capsys):
    """The third column is the token's bytes: a character split across tokens shows its bytes as \\xNN,
    and quote, backslash, newline and tab are escaped, so each token stays one line; a special token
    (parsed only with --allow-special) shows its text."""
    assert tokenize.main([str(QWEN3_DIR), '世界\n"a\\b"\t<|im_end|>', "--allow-special"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["99489", "ä¸ĸçķĮ", '"世界"'],
        ["198", "Ċ", '"\\n"'],
        ["56693", '"a', '"\\"a"'],
        ["43456", "\\b", '"\\\\b"'],
        ["1", '"', '"\\""'],
        ["197", "ĉ", '"\\t"'],
        ["151645", "<|im_end|>", '"<|im_end|>"'],
    ]
    assert tokenize.shown("界".encode()[:2]) == '"\\xe7\\x95"'
    assert tokenize.shown(b'a\\"\n\t\r') == '"a\\\\\\"\\n\\t\\r"'
    # control characters printed raw acted on the terminal: ESC started a colour, BEL rang, BS erased
    assert tokenize.shown(b"\x1b[31m\x07\x08\x00\x7f") == '"\\x1b[31m\\x07\\x08\\x00\\x7f"'
    assert tokenize.shown("\x85\u2028\u2029é".encode()) == '"\\u0085\\u2028\\u2029é"'
    assert tokenize.shown(b"\x85") == '"\\x85"'  # the lone byte, not the character U+0085
    assert tokenize.shown(b"\\x1b") == '"\\\\x1b"'  # a written backslash stays told apart


def test_tokenize_count_and_json(capsys):
    assert tokenize.main([str(QWEN3_DIR), "12345", "--count"]) == 0
    assert capsys.readouterr().out == "5\n"
    assert tokenize.main([str(QWEN3_DIR), "Hello world", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [9707, 1879]
    assert tokenize.main([str(QWEN3_DIR), "<|im_end|>", "--json", "--allow-special"]) == 0
    assert json.loads(capsys.readouterr().out) == [151645]
    with pytest.raises(SystemExit) as exit_:  # the count alone was printed, --json dropped
        tokenize.main([str(QWEN3_DIR), "12345", "--count", "--json"])
    assert exit_.value.code == 2
    assert capsys.readouterr() == (
        "",
        "error: argument --json: not allowed with argument --count; see `qwenkit tokenize --help`\n",
    )


def test_tokenize_options_between_model_and_text(capsys):
    # argparse gave the optional MODEL_DIR's place to the first word alone: "unrecognized arguments: 12345"
    assert tokenize.main([str(QWEN3_DIR), "--count", "12345"]) == 0
    assert capsys.readouterr().out == "5\n"
    assert tokenize.main(["--json", str(QWEN3_DIR), "--no-bos", "Hello world"]) == 0
    assert json.loads(capsys.readouterr().out) == [9707, 1879]


def test_tokenize_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world"))
    assert tokenize.main([str(QWEN3_DIR), "-", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [9707, 1879]


def test_tokenize_text_that_is_not_utf8(capsys, monkeypatch):
    """Bytes that are not UTF-8 reach Python as surrogates (a C locale's stdin, any argv); the tokenizer
    then raised UnicodeEncodeError with a traceback."""
    stdin = io.TextIOWrapper(io.BytesIO(b"a\x85b"), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr("sys.stdin", stdin)
    assert tokenize.main([str(QWEN3_DIR), "-", "--count"]) == 2
    assert (
        capsys.readouterr().err == "error: standard input is not UTF-8 text (an invalid byte at position 1)\n"
    )
    assert tokenize.main([str(QWEN3_DIR), "ab\udcffc"]) == 2
    assert capsys.readouterr().err == "error: TEXT is not UTF-8 text (an invalid byte at position 2)\n"


def test_tokenize_bad_dir(capsys, tmp_path):
    assert tokenize.main([str(tmp_path), "x"]) == 2
    err = capsys.readouterr().err
    expected = f"no tokenizer in {tmp_path}: looked for tokenizer.json or qwen.tiktoken"
    assert err == f"error: {expected}\n"


def test_template_prints_exact_prompt(capsys, tmp_path, qwen3):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    (tmp_path / "t.json").write_text(json.dumps(tools))
    assert template.main([str(QWEN3_DIR), str(tmp_path / "m.json")]) == 0
    assert (
        capsys.readouterr().out
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.main([str(QWEN3_DIR), str(tmp_path / "m.json"), "--no-generation-prompt"]) == 0
    assert capsys.readouterr().out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert template.main([str(QWEN3_DIR), str(tmp_path / "m.json"), "--tools", str(tmp_path / "t.json")]) == 0
    assert capsys.readouterr().out == qwen3.render_chat_template(messages, tools=tools)


def test_template_messages_that_are_not_utf8(capsys, tmp_path, monkeypatch):
    """From standard input the bad byte arrived as a surrogate: the prompt printed with it, and --ids
    ended in a TypeError traceback."""
    data = b'[{"role": "user", "content": "a\xffb"}]'
    (tmp_path / "m.json").write_bytes(data)
    assert template.main([str(QWEN3_DIR), str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr().err == (
        f"error: messages file {tmp_path / 'm.json'} is not UTF-8 text (an invalid byte at position 31)\n"
    )
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr("sys.stdin", stdin)
    assert template.main([str(QWEN3_DIR), "-", "--ids"]) == 2
    assert (
        capsys.readouterr().err
        == "error: messages file - is not UTF-8 text (an invalid byte at position 31)\n"
    )
    # a JSON escape of half a surrogate pair is a lone surrogate to json.loads: it printed as a raw byte
    # 0xff in the prompt (a UnicodeEncodeError traceback where stdout is strict) and --ids was a traceback
    (tmp_path / "s.json").write_text('[{"role": "user", "content": "a\\udcffb"}]')
    for ids in ([], ["--ids"]):
        assert template.main([str(QWEN3_DIR), str(tmp_path / "s.json"), *ids]) == 2
        assert capsys.readouterr() == (
            "",
            f"error: messages file {tmp_path / 's.json'} is not valid Unicode: it escapes half a surrogate "
            "pair (\\udcff), which is no character\n",
        )
    (tmp_path / "pair.json").write_text('[{"role": "user", "content": "\\ud83d\\ude00"}]')
    assert template.main([str(QWEN3_DIR), str(tmp_path / "pair.json"), "--ids"]) == 0
    assert json.loads(capsys.readouterr().out) == [151644, 872, 198, 141334, 151645, 198, 151644, 77091, 198]


def test_template_bad_input(capsys, tmp_path):
    (tmp_path / "bad.json").write_text("{oops")
    assert template.main([str(QWEN3_DIR), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: messages file") and err.count("\n") == 1
    assert template.main([str(QWEN3_DIR), str(tmp_path / "missing.json")]) == 2
    assert "cannot read messages file" in capsys.readouterr().err
    (tmp_path / "obj.json").write_text('"just a string"')
    assert template.main([str(QWEN3_DIR), str(tmp_path / "obj.json")]) == 2
    assert "must hold a JSON list of messages" in capsys.readouterr().err
    (tmp_path / "norole.json").write_text('[{"content": "x"}]')
    assert template.main([str(QWEN3_DIR), str(tmp_path / "norole.json")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'norole.json'}: chat message 0 must be an object with a string 'role'\n"
    )


def test_template_joins_openai_text_parts_as_the_server_does(capsys, tmp_path, v1_dir):
    """OpenAI's content as a list of text parts reached the template as a list: Qwen3's failed with
    "'list object' has no attribute 'startswith'", v1's ChatML with a TypeError."""
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
    ]
    (tmp_path / "parts.json").write_text(json.dumps(parts))
    assert template.main([str(QWEN3_DIR), str(tmp_path / "parts.json")]) == 0
    assert capsys.readouterr().out == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert template.main([str(v1_dir), str(tmp_path / "parts.json"), "--ids"]) == 0
    joined = [{"role": "user", "content": "Hi there"}]
    assert json.loads(capsys.readouterr().out) == load_tokenizer(v1_dir).apply_chat_template(joined)
    (tmp_path / "image.json").write_text(
        json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    )
    assert template.main([str(QWEN3_DIR), str(tmp_path / "image.json")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'image.json'}: message 0's content parts must be text parts "
        '({"type": "text", "text": ...})\n'
    )


def test_template_message_that_is_not_an_object_is_one_line(capsys, tmp_path, v1_dir):
    """A number in the message list was an AttributeError traceback (exit 1) from the tool-call step."""
    (tmp_path / "m.json").write_text('[{"role": "user", "content": "x"}, 7]')
    for model in (QWEN3_DIR, v1_dir):
        for ids in ([], ["--ids"]):
            assert template.main([str(model), str(tmp_path / "m.json"), *ids]) == 2
            out, err = capsys.readouterr()
            assert out == "" and err.startswith(f"error: {tmp_path / 'm.json'}: chat message 1 must be an ")
            assert err.count("\n") == 1


def test_template_syntax_error_names_the_model_not_the_messages(capsys, tmp_path):
    # the messages file was named ("m.json: chat template has a syntax error"), though it is blameless
    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (model / name).write_bytes((QWEN3_DIR / name).read_bytes())
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    (tmp_path / "m.json").write_text('[{"role": "user", "content": "hi"}]')
    assert template.main([str(model), str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr() == (
        "",
        f"error: {model}: chat template has a syntax error at line 1: Expected an expression, got "
        "'end of statement block'\n",
    )


def test_template_errors_name_the_file_at_fault(capsys, tmp_path):
    """Valid JSON of the wrong shape was refused without naming the file ("`tools` must be an array"),
    and a number as content reached the template ("'int object' has no attribute 'startswith'")."""
    (tmp_path / "m.json").write_text('[{"role": "user", "content": "hi"}]')
    (tmp_path / "t.json").write_text('"get_weather"')
    assert template.main([str(QWEN3_DIR), str(tmp_path / "m.json"), "--tools", str(tmp_path / "t.json")]) == 2
    assert capsys.readouterr() == ("", f"error: {tmp_path / 't.json'}: `tools` must be an array\n")
    (tmp_path / "e.json").write_text("[]")
    assert template.main([str(QWEN3_DIR), str(tmp_path / "e.json")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'e.json'}: chat messages must be a non-empty list of {{'role', 'content'}} "
        "objects\n"
    )
    (tmp_path / "n.json").write_text('[{"role": "user", "content": 5}]')
    for ids in ([], ["--ids"]):
        assert template.main([str(QWEN3_DIR), str(tmp_path / "n.json"), *ids]) == 2
        assert capsys.readouterr() == (
            "",
            f"error: {tmp_path / 'n.json'}: message 0's content must be text or a list of text parts, "
            "not 5\n",
        )


def test_template_continues_the_final_message(capsys, tmp_path, qwen3):
    """``--continue-final-message`` (transformers' continue_final_message, vLLM's chat field): the prompt
    ends inside the final message, with no generation prompt; beside ``--no-generation-prompt`` it is the
    same, and a final message the template cannot continue is a one-line error."""
    messages = [{"role": "user", "content": "Poem?"}, {"role": "assistant", "content": "<think>\nRoses"}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    kwargs = {"add_generation_prompt": False, "continue_final_message": True}
    for flags in (["--continue-final-message"], ["--continue-final-message", "--no-generation-prompt"]):
        assert template.main([str(QWEN3_DIR), str(tmp_path / "m.json"), *flags]) == 0
        out = capsys.readouterr().out
        assert out == qwen3.render_chat_template(messages, **kwargs)
        assert out.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n<think>\nRoses")
    assert template.main([str(QWEN3_DIR), str(tmp_path / "m.json"), "--continue-final-message", "--ids"]) == 0
    assert json.loads(capsys.readouterr().out) == qwen3.apply_chat_template(messages, **kwargs)
    no_content = [messages[0], {"role": "assistant", "reasoning_content": "x"}]
    (tmp_path / "bad.json").write_text(json.dumps(no_content))
    assert template.main([str(QWEN3_DIR), str(tmp_path / "bad.json"), "--continue-final-message"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "continue_final_message" in err
