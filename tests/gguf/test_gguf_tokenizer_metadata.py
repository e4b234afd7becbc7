"""A GGUF's tokenizer keys read as llama.cpp reads them: a special id outside the vocabulary is ignored
(llama.cpp warns and drops it), a token_type list or merge that cannot be read is refused in one line,
and SmolLM's pre-tokenizer splits every digit off first (llama.cpp's ``smollm`` regexes, the release's
``Digits``)."""

from __future__ import annotations

import gguf
import pytest
from factories import hf_model
from gguf_files import CHAT_TEMPLATE, MERGES, Q, tiny_vocab

from qwenkit.checkpoint.gguf import GGUFError, read_gguf
from qwenkit.checkpoint.gguf_tokenizer import GGUFVocab, build_tokenizer


def _tiny(tmp_path, gguf_writer, name: str, add_bos: bool = False, **keys):
    """A tiny qwen2 GGUF whose tokenizer keys ``keys`` replace (integers as uint32, or int32 below 0;
    lists as arrays)."""
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    state = {n: p.detach() for n, p in model.named_parameters()}

    def extra(w: gguf.GGUFWriter) -> None:
        for key, value in keys.items():
            key = f"tokenizer.ggml.{key}"
            w.kv_data[0].pop(key, None)
            if isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)

    return gguf_writer(
        tmp_path / name, "qwen2", model.config.to_dict(), state, Q.F16, add_bos=add_bos, extra=extra
    )


def test_a_special_id_outside_the_vocabulary_is_ignored_as_llama_cpp_does(tmp_path, gguf_writer, capsys):
    """An unk id of -1 was once read as the last token (Python's tokens[-1]); llama.cpp reads it as a
    uint32 past the end, warns and ignores it."""
    n_tokens = len(tiny_vocab()[0])
    path = _tiny(
        tmp_path,
        gguf_writer,
        "bos.gguf",
        add_bos=True,
        bos_token_id=99999,
        padding_token_id=n_tokens,
        unknown_token_id=-1,
    )
    ckpt = read_gguf(path)
    assert ckpt.tokenizer.encode(" the").ids == [n_tokens - 4]  # "Ġthe" (a merge), no BOS before it
    assert not {"bos_token", "pad_token", "unk_token"} & set(ckpt.tokenizer_config)
    assert ckpt.tokenizer_config["eos_token"] == "<|im_end|>"
    assert "bos_token_id" not in ckpt.hf_config and "pad_token_id" not in ckpt.hf_config
    assert ckpt.hf_config["eos_token_id"] == 2 and ckpt.generation_config["eos_token_id"] == [2, 0]
    err = capsys.readouterr().err
    assert f"tokenizer.ggml.bos_token_id 99999 is outside the vocabulary ({n_tokens} tokens); ignored" in err
    assert f"tokenizer.ggml.padding_token_id {n_tokens} is outside the vocabulary" in err
    assert "tokenizer.ggml.unknown_token_id -1 is outside the vocabulary" in err


def test_a_short_token_type_list_is_refused_in_one_line(tmp_path, gguf_writer):
    tokens, types = tiny_vocab()
    ckpt = read_gguf(_tiny(tmp_path, gguf_writer, "types.gguf", token_type=types[:-5]))
    with pytest.raises(GGUFError) as info:
        ckpt.tokenizer  # noqa: B018
    assert str(info.value) == (
        f"{ckpt.path}: tokenizer.ggml.token_type has {len(tokens) - 5} entries for {len(tokens)} tokens"
    )


def test_a_longer_token_type_list_is_read_as_llama_cpp_reads_it(tmp_path, gguf_writer):
    _, types = tiny_vocab()
    ckpt = read_gguf(_tiny(tmp_path, gguf_writer, "long.gguf", token_type=[*types, 1, 1]))
    assert ckpt.tokenizer.encode("<|im_end|> the").ids == [2, len(types) - 4]


def test_a_merge_without_two_parts_is_refused_by_name(tmp_path, gguf_writer):
    ckpt = read_gguf(_tiny(tmp_path, gguf_writer, "merges.gguf", merges=["Ġt", *MERGES[1:]]))
    with pytest.raises(GGUFError) as info:
        ckpt.tokenizer  # noqa: B018
    assert (
        str(info.value) == f"{ckpt.path}: tokenizer.ggml.merges[0] is 'Ġt', not two tokens split by a space"
    )


def _digits_vocab(pre: str | None) -> GGUFVocab:
    tokens = ["Ġ", "1", "2", "x", "Ġ1", "12"]
    return GGUFVocab(
        model="gpt2", pre=pre, tokens=tokens, token_types=[1] * len(tokens), merges=["Ġ 1", "1 2"],
        special_ids={}, add_bos_token=False, add_eos_token=False, chat_template=None,
    )  # fmt: skip


def test_smollm_splits_every_digit_off_first_as_llama_cpp():
    """llama.cpp's smollm pre-tokenizer isolates each \\p{N} before GPT-2's regex: no merge takes a digit."""
    assert build_tokenizer(_digits_vocab(None)).encode("x 12").tokens == ["x", "Ġ1", "2"]
    assert build_tokenizer(_digits_vocab("smollm")).encode("x 12").tokens == ["x", "Ġ", "1", "2"]


def test_the_bundled_smollm2_reads_a_vulgar_fraction_as_llama_cpp(smollm):
    """½ is a number (\\p{N}): split off before the byte-level merges, so " ½" is "Ġ" + "Â½", as llama.cpp
    and SmolLM2's own tokenizer.json (Digits, individual_digits) read it, not "ĠÂ" + "½"."""
    tok = smollm.tokenizer
    assert tok.encode("a ½ cup").tokens == ["a", "Ġ", "Â½", "Ġcup"]


def test_a_pre_tokenizer_qwenkit_does_not_know_is_refused_by_name(tmp_path, gguf_writer):
    """llama.cpp splits deepseek-llm's text with regexes of its own; GPT-2's would give other ids."""
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    state = {n: p.detach() for n, p in model.named_parameters()}

    def pre(w: gguf.GGUFWriter) -> None:
        w.kv_data[0].pop("tokenizer.ggml.pre")
        w.add_tokenizer_pre("deepseek-llm")

    path = gguf_writer(tmp_path / "pre.gguf", "qwen2", model.config.to_dict(), state, Q.F16, extra=pre)
    with pytest.raises(GGUFError) as info:
        read_gguf(path).tokenizer  # noqa: B018
    message = str(info.value)
    assert message.startswith(
        f"{path}: pre-tokenizer 'deepseek-llm' (tokenizer.ggml.pre) splits text in a way qwenkit does not "
        "know; it reads "
    )
    assert "qwen2" in message and "llama-bpe" in message and "\n" not in message


def test_falcon3_reads_as_llama_3_does_in_llama_cpp():
    """llama.cpp reads Falcon3's pre-tokenizer as Llama 3's: a word that is one token is that token, and
    text gets the BOS where the file does not say."""
    tokens = ["<s>", "a", "b", "c", "ab", "abc"]
    vocab = GGUFVocab.from_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "falcon3", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.bos_token_id": 0,
    })  # fmt: skip
    assert vocab.add_bos_token is True
    assert build_tokenizer(vocab).encode("abc").tokens == ["<s>", "abc"]


def test_the_bundled_smollm2_ends_where_llama_cpp_ends(smollm):
    """libllama's llama_vocab_is_eog on this file holds for 0, 2 and 4: <|endoftext|>, <|im_end|> (its eos)
    and <reponame>, the fill-in-the-middle repository token llama.cpp ends a generation on too."""
    assert smollm.end_of_generation_ids == (2, 0, 4)


def test_fill_in_the_middle_tokens_end_a_generation_as_in_llama_cpp():
    """Qwen2.5's vocabulary as llama.cpp reads it (libllama on a Qwen2.5 GGUF ends on 151643, 151645,
    151662-151664 and on "</s>"); a fim_*_token_id key the file states is taken instead of a spelling."""
    tokens = ["a", "<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "</s>", "b"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 2}  # fmt: skip
    assert GGUFVocab.from_metadata(meta).end_of_generation_ids == (2, 1, 6, 3, 4, 5)
    stated = {**meta, "tokenizer.ggml.fim_sep_token_id": 7}
    assert GGUFVocab.from_metadata(stated).end_of_generation_ids == (2, 1, 6, 3, 4, 7)


def _ends(tokens: list[str], eos: int) -> tuple[int, ...]:
    return GGUFVocab.from_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": eos,
    }).end_of_generation_ids  # fmt: skip


def test_the_tokens_llama_cpp_takes_back_out_of_its_end_list_do_not_end_a_generation():
    """llama.cpp ends on </s> and <|end|> by spelling, then takes them back out where the vocabulary is
    Gemma 4's (<|tool_response>: its </s> is text) or gpt-oss's / Solar Open's (<|end|> closes a message,
    <|return|> and <|call|> end the generation): a directory made from such a file stopped mid-answer."""
    gemma = ["a", "<eos>", "</s>", "<turn|>", "<|tool_response>", "b"]
    assert _ends(gemma, 1) == (1, 3, 4)
    assert _ends(["a", "<eos>", "</s>", "<turn|>"], 1) == (1, 2, 3)  # no <|tool_response>: </s> ends
    harmony = ["a", "<|return|>", "<|end|>", "<|call|>", "<|endoftext|>"]
    assert _ends(harmony, 1) == (1, 3, 4)
    assert _ends(["a", "<|endoftext|>", "<|end|>", "<|calls|>", "<|flush|>"], 1) == (1, 3, 4)
    assert _ends(["a", "<|endoftext|>", "<|end|>", "<|return|>"], 1) == (1, 2, 3)  # Phi-3's <|end|> ends
    # llama.cpp counts <|call|> and <|calls|> alike: either with <|return|> or with <|flush|>
    assert _ends(["a", "<|endoftext|>", "<|end|>", "<|return|>", "<|calls|>"], 1) == (1, 3, 4)
    assert _ends(["a", "<|endoftext|>", "<|end|>", "<|call|>", "<|flush|>"], 1) == (1, 3, 4)
    assert _ends(["a", "<|endoftext|>", "<|end|>", "<|calls|>"], 1) == (1, 2, 3)  # a call alone: it ends


def test_a_merge_of_tokens_the_vocabulary_lacks_is_refused_in_one_line(tmp_path, gguf_writer):
    """tokenizers' own BPE refuses it with a bare Exception, which reached the user as a traceback."""
    ckpt = read_gguf(_tiny(tmp_path, gguf_writer, "stray.gguf", merges=[*MERGES, "Ġthe xyz"]))
    with pytest.raises(GGUFError) as info:
        ckpt.tokenizer  # noqa: B018
    assert str(info.value) == (
        f"{ckpt.path}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: "
        "Error while initializing BPE: Token `xyz` out of vocabulary"
    )


def test_named_chat_templates_are_read_and_the_tool_use_one_renders_with_tools(tmp_path, gguf_writer):
    """gguf-py writes a model's named templates as ``tokenizer.chat_template.<name>`` (llama.cpp renders
    "tool_use" when tools are passed); only ``tokenizer.chat_template`` was read, so tools never reached
    the prompt. The directory made from the file keeps them too, and transformers renders it alike."""
    import json

    import transformers

    from qwenkit.checkpoint.loader import open_checkpoint
    from qwenkit.checkpoint.side_files import write_side_files
    from qwenkit.generate import tokenizer_for

    tool_use = "{{ tools | map(attribute='function.name') | join(',') }}|" + CHAT_TEMPLATE
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))

    def templates(w: gguf.GGUFWriter) -> None:
        w.kv_data[0].pop("tokenizer.chat_template", None)
        w.add_chat_template(
            [{"name": "default", "template": CHAT_TEMPLATE}, {"name": "tool_use", "template": tool_use}]
        )

    state = {n: p.detach() for n, p in model.named_parameters()}
    path = gguf_writer(tmp_path / "m.gguf", "qwen2", model.config.to_dict(), state, Q.F16, extra=templates)
    messages = [{"role": "user", "content": "the weather"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    tok = tokenizer_for(path)
    assert tok.render_chat_template(messages, tools=tools) == (
        "get_weather|<|im_start|>user\nthe weather<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        tok.render_chat_template(messages)
        == "<|im_start|>user\nthe weather<|im_end|>\n<|im_start|>assistant\n"
    )
    out = tmp_path / "hf"
    out.mkdir()
    write_side_files(open_checkpoint(path), out, "a test")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == [
        {"name": "default", "template": CHAT_TEMPLATE},
        {"name": "tool_use", "template": tool_use},
    ]
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for offered in (tools, None):
        expected = hf.apply_chat_template(
            messages, tools=offered, tokenize=True, return_dict=False, add_generation_prompt=True
        )
        assert tok.apply_chat_template(messages, tools=offered) == list(expected)
