"""``qwenkit quantize``: what it writes loads back to exactly the model it quantized; bad input: one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factories import hf_model, qwen3_tokenizer_dir
from safetensors.torch import load_file, save_file

from qwenkit.checkpoint import load_model
from qwenkit.cli import main
from qwenkit.generate import tokenizer_for
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.pipeline import quantize_checkpoint

CALIB_TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "def f(x):\n    return x * 2\n" * 20


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random Qwen2 (qkv bias, untied) with the real Qwen tokenizer files."""
    path = tmp_path_factory.mktemp("src") / "tiny"
    hf_model(
        "qwen2",
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


IDS = torch.randint(0, 151936, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("method", "bits", "extra"),
    [
        ("gptq", 4, ["--act-order", "dynamic"]),
        ("gptq", 4, []),
        ("gptq", 8, ["--group-size", "-1", "--no-act-order"]),
        ("rtn", 4, ["--no-sym"]),
        ("rtn", 8, []),
    ],
)
def test_quantized_checkpoint_reloads_exactly(src, calib, tmp_path, capsys, method, bits, extra) -> None:
    out = tmp_path / "out"
    opts = ["--calib-samples", "4", "--seq-len", "32"] + (["--calib", str(calib)] if method == "gptq" else [])
    args = ["--bits", str(bits), "--method", method, *opts, *extra]
    assert main(["quantize", str(src), str(out), "-q", *args]) == 0
    err = capsys.readouterr().err
    assert f"int{bits}" in err
    assert ("desc_act: true" in err) == ("dynamic" in extra)  # the one-line warning about vLLM
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "quantize_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    # the same quantization in memory (the library call the CLI makes) computes what the files load as
    group = -1 if "-1" in extra else 128
    ref = quantize_checkpoint(
        src,
        tmp_path / "again",
        bits=bits,
        method=method,
        tokenizer=lambda: tokenizer_for(src),
        group_size=group,
        calib=calib if method == "gptq" else None,
        calib_samples=4,
        seq_len=32,
        act_order=("dynamic" if "dynamic" in extra else "none" if "--no-act-order" in extra else None),
        sym="--no-sym" not in extra,
        progress=False,
    )
    loaded, config = load_model(out, dtype="float32", progress=False)
    assert config.quantization["bits"] == bits
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 2 * 7
    with torch.no_grad():
        assert torch.equal(loaded(IDS), ref.model(IDS))

    assert (
        main(["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    )
    assert "new tokens" in capsys.readouterr().err


def test_gptq_with_default_calibration_text(src, tmp_path) -> None:
    r = quantize_checkpoint(
        src,
        tmp_path / "q",
        bits=4,
        tokenizer=lambda: tokenizer_for(src),
        calib_samples=2,
        seq_len=64,
        progress=False,
    )
    assert r.calibration_windows == 2 and r.calibration_tokens == 128
    assert "static act-order, calibrated on 2 x 64 tokens" in r.summary()  # the default
    assert r.config.act_order == "static" and not r.config.desc_act
    assert not [n for n in r.notes if "--seq-len" in n]


def test_calibration_past_the_trained_context_is_noted(src, tmp_path) -> None:
    r = quantize_checkpoint(
        src,
        tmp_path / "q",
        bits=4,
        tokenizer=lambda: tokenizer_for(src),
        calib_samples=1,
        seq_len=300,
        progress=False,
    )
    assert [n for n in r.notes if "--seq-len" in n] == [
        "--seq-len 300 is past the model's own context of 256 tokens: the layers are calibrated on "
        "activations of positions it was never trained on"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "3"], "error: --bits 3 is not supported; choose 4 or 8"),
        (["--group-size", "0"], "error: --group-size 0 must be positive, or -1 for one group per row"),
        (["--group-size", "-5"], "error: --group-size -5 must be positive, or -1 for one group per row"),
        (["--method", "awq"], "error: --method 'awq' is not supported; choose gptq or rtn"),
        (
            ["--calib", "/nonexistent/calib.txt"],
            "error: calibration file /nonexistent/calib.txt does not exist",
        ),
        (["--calib", "/"], "error: calibration file / is a directory; pass a UTF-8 text file"),
        (["--calib-samples", "0"], "error: --calib-samples 0 must be positive"),
        (["--method", "rtn", "--act-order", "static"], "error: --act-order reorders GPTQ's columns"),
        (["--method", "rtn", "--calib", "/"], "error: --calib is GPTQ's calibration text; --method rtn"),
        (
            ["--act-order", "sideways"],
            "error: --act-order 'sideways' is not supported; choose static, dynamic or none",
        ),
    ],
)
def test_bad_input_is_one_line(src, tmp_path, capsys, args, message) -> None:
    assert main(["quantize", str(src), str(tmp_path / "out"), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_gptq_without_a_tokenizer_fails_before_the_weights_load(src, tmp_path, capsys, monkeypatch) -> None:
    """GPTQ needs the tokenizer for its calibration windows; a source without one once loaded every weight
    first (minutes for a large model) and only then said so."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, bare / name)

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr("qwenkit.checkpoint.load_model", no_load)
    assert main(["quantize", str(bare), str(tmp_path / "out"), "-q"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: no tokenizer in {bare}: looked for tokenizer.json or qwen.tiktoken"
    )
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_beyond_the_vocab_is_refused_in_one_line(tmp_path, capsys) -> None:
    """Calibration ids the embedding has no row for once ended in an IndexError traceback."""
    small = tmp_path / "small"
    hf_model("qwen2", vocab_size=512, num_hidden_layers=1).save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, small / name)
    calib = tmp_path / "calib.txt"
    calib.write_text("Hello world")  # Qwen's ids 9707 (Hello) and 1879 ( world)
    assert main(["quantize", str(small), str(tmp_path / "out"), "-q", "--calib", str(calib)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the tokenizer of {small} gives token id 9707, beyond the model's vocab_size 512: "
        "the tokenizer files do not belong to this model"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_a_source_holding_nan_is_refused_in_one_line(src, calib, tmp_path, capsys, method) -> None:
    """GPTQ once ended in a Cholesky traceback on a NaN weight, and RTN wrote the NaN into the output."""
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    args = ["quantize", str(bad), str(tmp_path / "out"), "-q", "--method", method, "--calib", str(calib)]
    assert main(args[: 6 if method == "rtn" else None]) == 2  # rtn takes no --calib
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: model.layers.1.mlp.up_proj.weight holds NaN or infinite values; "
        "the source checkpoint is corrupt"
    )
    assert not (tmp_path / "out").exists()


def test_a_hessian_gptq_cannot_invert_is_one_line(src, tmp_path, capsys) -> None:
    """Three calibration tokens for 64 inputs and almost no damping: Cholesky fails. That was a LinAlgError
    traceback; now the layer, its numbers and the two ways out."""
    calib = tmp_path / "short.txt"
    calib.write_text("hi there")
    args = ["quantize", str(src), str(tmp_path / "out"), "-q", "--calib", str(calib), "--damp", "1e-12"]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: GPTQ cannot invert the Hessian of model.layers.0.self_attn.q_proj (64 inputs, 2 calibration "
        "tokens): raise --damp (now 1e-12) or calibrate on more text"
    )
    assert not (tmp_path / "out").exists()


def test_a_width_4bit_words_cannot_pack_is_refused_naming_the_layer(tmp_path, capsys) -> None:
    """An FFN 100 wide: 8 int4 codes a word do not fit 100. That was found only when the file was written,
    after all the work, as 'cannot pack 100 rows at 4 bits' with no layer named."""
    odd = tmp_path / "odd"
    hf_model("qwen2", vocab_size=512, intermediate_size=100, num_hidden_layers=1).save_pretrained(odd)
    capsys.readouterr()  # transformers' progress bar
    out = tmp_path / "out"
    assert main(["quantize", str(odd), str(out), "-q", "--method", "rtn", "--group-size", "-1"]) == 2
    assert capsys.readouterr().err == (
        "error: model.layers.0.mlp.gate_proj has 100 outputs, which 4-bit GPTQ words cannot pack "
        "(a multiple of 8 is needed); --bits 8 packs it\n"
    )
    assert not out.exists()
    assert (
        main(["quantize", str(odd), str(out), "-q", "--method", "rtn", "--group-size", "-1", "--bits", "8"])
        == 0
    )


def test_the_config_names_the_dtype_the_file_holds(src, tmp_path) -> None:
    """A source saved by transformers 5 says "dtype": "float32"; copied as it was, transformers read the
    float16 checkpoint as float32 (it reads dtype before torch_dtype)."""
    import transformers

    assert json.loads((src / "config.json").read_text())["dtype"] == "float32"
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "-q", "--method", "rtn"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["dtype"], cfg["torch_dtype"]) == ("float16", "float16")
    assert transformers.AutoConfig.from_pretrained(out).dtype == torch.float16


def test_existing_out_dir_needs_overwrite(src, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["quantize", str(src), str(out), "-q", "--method", "rtn"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} already exists; pass --overwrite to replace it\n"
    assert (out / "keep.txt").exists()
    assert main(["quantize", str(src), str(out), "-q", "--method", "rtn", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "quantize_config.json").exists()


def test_overwrite_never_replaces_the_calibration_text(src, tmp_path, capsys) -> None:
    """--calib inside OUT with --overwrite: the text was read, OUT replaced, and the user's file gone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "calib.txt").write_text(CALIB_TEXT)
    for method in ("gptq", "rtn"):
        argv = ["quantize", str(src), str(out), "-q", "--method", method, "--overwrite"]
        assert main([*argv, "--calib", str(out / "calib.txt")]) == 2
        err = capsys.readouterr().err
        replace = (
            f"error: output {out} would replace the source {out / 'calib.txt'}; choose another directory\n"
        )
        unread = "error: --calib is GPTQ's calibration text; --method rtn reads none (drop --calib)\n"
        assert err == (replace if method == "gptq" else unread)
        assert sorted(p.name for p in out.iterdir()) == ["calib.txt"]


def test_missing_source_and_quantized_source(tmp_path, capsys, src) -> None:
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "out"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    q = tmp_path / "q"
    assert main(["quantize", str(src), str(q), "-q", "--method", "rtn"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(q), str(tmp_path / "qq"), "-q", "--method", "rtn"]) == 2
    assert "is already quantized (gptq)" in capsys.readouterr().err


@pytest.mark.parametrize("group_size", [32, -1])  # -1 adds a note, which once replaced the calibration text
def test_gptq_calibrates_on_the_calib_file(src, tmp_path, group_size) -> None:
    """The --calib text is what GPTQ sees: a short file gives one window of exactly its tokens (the notes
    loop once reused the variable that held the text, so the default text or a note was used instead)."""
    text = "A short calibration file."
    path = tmp_path / "short.txt"
    path.write_text(text)
    encode = tokenizer_for(src).encode
    r = quantize_checkpoint(
        src,
        tmp_path / "q",
        bits=4,
        group_size=group_size,
        tokenizer=lambda: tokenizer_for(src),
        calib=path,
        progress=False,
    )
    assert r.calibration_windows == 1 and r.calibration_tokens == len(encode(text))
    n = len(encode(text))  # fewer windows than asked for is said, not done quietly
    assert r.notes[-1] == (
        f"the calibration text holds {n} tokens: 1 window(s) of at most 512, not the 32 asked for (a longer "
        "--calib text, or a smaller --seq-len, gives more)"
    )


def test_a_qwen_v1_checkpoint_is_converted_first(tmp_path, capsys) -> None:
    """quantize writes qwen2 tensor names; a v1 config beside them would load in neither v1's code nor
    AutoGPTQ, so a v1 source is refused with the command that converts it."""
    from factories import write_v1_checkpoint

    v1 = write_v1_checkpoint(tmp_path / "v1")
    assert main(["quantize", str(v1), str(tmp_path / "out"), "-q", "--method", "rtn"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {v1} is a Qwen v1 checkpoint: convert it to the Qwen1.5 layout first "
        f"(qwenkit convert {v1} OUT), then quantize OUT\n"
    )
    assert not (tmp_path / "out").exists()


def test_quantize_at_load_of_a_quantized_checkpoint_names_its_path(src, tmp_path, capsys) -> None:
    """--quantize on a GPTQ checkpoint: one line naming the directory (it once printed the source object's
    dump, its whole config included)."""
    q = tmp_path / "q"
    assert main(["quantize", str(src), str(q), "-q", "--method", "rtn"]) == 0
    capsys.readouterr()
    assert main(["generate", str(q), "-p", "Hi", "--quantize", "int8", "--max-new-tokens", "1"]) == 2
    assert capsys.readouterr().err == f"error: {q} is already quantized (gptq); drop --quantize\n"


def test_gptq_calibration_windows_begin_with_the_bos_a_prompt_gets(tmp_path, monkeypatch, capsys) -> None:
    """A Llama-layout checkpoint's prompts start with <s>, so its calibration windows do too; a --seq-len
    that leaves no room after it is refused in one line."""
    from llama_tokenizers import write_tiny_llama

    import qwenkit.quant.pipeline as pipeline

    src = write_tiny_llama(tmp_path / "llama")
    tok = tokenizer_for(src)
    seen = []
    real = pipeline.gptq_quantize_model
    monkeypatch.setattr(
        pipeline, "gptq_quantize_model", lambda m, w, *a, **k: seen.extend(w) or real(m, w, *a, **k)
    )
    text = "one two three four five six seven eight nine ten " * 4
    (tmp_path / "calib.txt").write_text(text)
    result = quantize_checkpoint(
        src, tmp_path / "q", bits=8, tokenizer=lambda: tok, calib=tmp_path / "calib.txt", seq_len=12,
        progress=False,
    )  # fmt: skip
    assert tok.sequence_special_ids[0] == (1,)
    assert seen and all(w[0] == 1 and len(w) == 12 for w in seen[:-1]) and 1 < len(seen[-1]) <= 12
    assert [i for w in seen for i in w[1:]] == tok.encode(text)  # all of it: fewer than 32 windows
    n = len(tok.encode(text))  # the text's tokens, not the <s> each window adds
    assert result.notes[-1].startswith(f"the calibration text holds {n} tokens: {len(seen)} window(s) ")
    assert main(["quantize", str(src), str(tmp_path / "q1"), "-q", "--seq-len", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --seq-len 1 leaves no room for text after the 1 token(s) the tokenizer puts before "
        "every prompt"
    )


def test_a_license_named_only_by_the_model_card_is_kept(src, tmp_path) -> None:
    """`convert --to hf` of a GGUF names its license only in README.md's front matter; quantizing that
    directory lost it (`info` then said no license was found)."""
    from qwenkit.license import find_license

    carded = tmp_path / "carded"
    shutil.copytree(src, carded)
    (carded / "README.md").write_text('---\nlicense: "apache-2.0"\n---\n\nA model.\n')
    assert main(["quantize", str(carded), str(tmp_path / "q"), "--bits", "4", "--method", "rtn"]) == 0
    found = find_license(tmp_path / "q")
    assert (found.name, found.source) == ("apache-2.0", "README.md")


def test_quantizing_the_bundled_gguf_keeps_its_license_and_sampling(tmp_path) -> None:
    from qwenkit.checkpoint.gguf import generation_config_to_save, read_gguf
    from qwenkit.default_model import default_model_path
    from qwenkit.license import find_license

    gguf = default_model_path()
    assert main(["quantize", str(gguf), str(tmp_path / "q"), "--bits", "4", "--method", "rtn"]) == 0
    gen = json.loads((tmp_path / "q" / "generation_config.json").read_text())
    assert gen == generation_config_to_save(read_gguf(gguf)) and gen["temperature"] == 0.2
    found = find_license(tmp_path / "q")
    assert (found.name, found.source) == ("apache-2.0", "README.md")


def test_a_chat_template_in_chat_template_jinja_is_kept(src, tmp_path) -> None:
    """A directory saved by transformers 5 keeps its template in chat_template.jinja; the quantized
    directory renders the same prompts."""
    moved = tmp_path / "t5"
    shutil.copytree(src, moved)
    config = json.loads((moved / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (moved / "chat_template.jinja").write_text(template, encoding="utf-8")
    (moved / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["quantize", str(moved), str(tmp_path / "q"), "--bits", "4", "--method", "rtn"]) == 0
    assert (tmp_path / "q" / "chat_template.jinja").read_text(encoding="utf-8") == template


def test_named_templates_come_out_in_a_directory_others_can_open(src, tmp_path) -> None:
    """additional_chat_templates/ was published 0644 (the files' mode), which no user but root can
    enter: the quantized model's named templates were unreadable to everyone else."""
    import os

    from factories import with_named_templates

    named = with_named_templates(src, tmp_path / "named", "{{ 'default' }}")
    old = os.umask(0o022)
    try:
        assert main(["quantize", str(named), str(tmp_path / "q"), "-q", "--method", "rtn"]) == 0
    finally:
        os.umask(old)
    templates = tmp_path / "q" / "additional_chat_templates"
    assert templates.stat().st_mode & 0o777 == 0o755
    assert (templates / "tool_use.jinja").read_text() == (
        named / "additional_chat_templates/tool_use.jinja"
    ).read_text()


def test_calibration_settings_given_with_rtn_are_said_to_be_ignored(src, tmp_path, capsys) -> None:
    """--calib-samples, --seq-len and --damp steer GPTQ only: with --method rtn they were read by nothing,
    and nothing said so (--calib, the text itself, is refused)."""
    args = [
        "quantize",
        str(src),
        str(tmp_path / "q"),
        "-q",
        "--method",
        "rtn",
        "--seq-len",
        "64",
        "--damp",
        "0.1",
    ]
    assert main(args) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "do nothing" in line]
    assert notes == ["note: GPTQ's settings (--seq-len, --damp) do nothing with --method rtn"]
    assert main(["quantize", str(src), str(tmp_path / "q2"), "-q", "--method", "rtn"]) == 0
    assert "do nothing" not in capsys.readouterr().err


def test_a_chat_calibration_text_gets_its_special_tokens(src, tmp_path, monkeypatch) -> None:
    """A --calib file of chat transcripts (Qwen's GPTQ guide calibrates on apply_chat_template's text)
    is read as transformers' tokenizer(text) reads it: <|im_start|> is its token, as at chat inference,
    not the plain-text pieces '<', '|', 'im', ... it was calibrated on."""
    import transformers

    import qwenkit.quant.pipeline as pipeline

    seen = []
    real = pipeline.gptq_quantize_model
    monkeypatch.setattr(
        pipeline, "gptq_quantize_model", lambda m, w, *a, **k: seen.extend(w) or real(m, w, *a, **k)
    )
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    (tmp_path / "chat.txt").write_text(text)
    quantize_checkpoint(
        src, tmp_path / "q", bits=8, tokenizer=lambda: tokenizer_for(src), calib=tmp_path / "chat.txt",
        progress=False,
    )  # fmt: skip
    want = transformers.AutoTokenizer.from_pretrained(src)(text)["input_ids"]
    assert seen == [want] and want[0] == 151644
