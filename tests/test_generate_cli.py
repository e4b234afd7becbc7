"""`qwenkit generate` and `qwenkit info` as users run them: real outputs, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from gguf import GGUFReader
from test_config import QWEN_7B

from qwenkit.checkpoint import load_model
from qwenkit.cli import main
from qwenkit.memory import format_bytes


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model):
    return tiny_chat_model


def test_json_output_has_real_ids_and_logprobs(model_dir, capsys):
    assert (
        main(
            [
                "generate",
                str(model_dir),
                "--prompt-ids",
                "9707,11,1879",
                "--json",
                "--dtype",
                "float32",
                "--temperature",
                "0",
                "--max-new-tokens",
                "5",
                "--logprobs",
                "2",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    model, _ = load_model(model_dir, dtype="float32")
    ids = [9707, 11, 1879]
    logps = []
    for _ in range(5):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
        ids.append(int(lp.argmax()))
        logps.append(lp.max().item())
    assert out["prompt_token_ids"] == [9707, 11, 1879]
    assert out["output_token_ids"] == ids[3:]
    assert out["logprobs"] == pytest.approx(logps, abs=1e-4)
    assert len(out["top_logprobs"]) == 5 and out["top_logprobs"][0][0]["token_id"] == ids[3]
    assert out["finish_reason"] in ("length", "stop") and out["timings"]["decode_seconds"] >= 0


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--max-tokens"])
def test_streams_text_then_summary(model_dir, capsys, flag):
    assert main(["generate", str(model_dir), "-p", "Hello", flag, "4", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")
    assert "1 prompt tokens, 4 new tokens" in captured.err and "decode" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
        (["--prompt-ids", "1,,2"], "--prompt-ids must be comma-separated integers, got '1,,2'"),
        (["--prompt-ids", "999999999"], "prompt token id 999999999 is outside the vocabulary"),
        (["-p", "hi", "--temperature", "-1"], "temperature must be >= 0, got -1"),
        (["-p", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["-p", "hi", "--max-context", "1000000000"], "not enough free RAM"),
        # vLLM's spellings of --tensor-parallel were "unrecognized arguments"
        (["-p", "hi", "--tensor-parallel-size", "0"], "error: --tensor-parallel must be at least 1, got 0"),
        (["-p", "hi", "-tp", "-2"], "error: --tensor-parallel must be at least 1, got -2"),
        # streamed text showed no log-probabilities: the option was dropped without a word
        (["-p", "hi", "--logprobs", "3"], "error: --logprobs is reported in the --json output; add --json"),
        pytest.param(
            ["-p", "hi", "--device", "cuda"],
            "no CUDA device is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_input_one_line_error(model_dir, capsys, args, message):
    assert main(["generate", str(model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_float16_runs_on_weights_quantized_at_load(model_dir, capsys, quantize):
    """--dtype float16 with --quantize (or a quantized GGUF such as the bundled model) failed in the
    engine's thread: 'error: internal error: RuntimeError: qwenkit linear_int4: x must be bfloat16 or
    float32, got Half', after the step's traceback."""
    args = ["generate", str(model_dir), "--prompt-ids", "9707,11", "--json", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "3", "--dtype", "float16", "--quantize", quantize]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert len(out["output_token_ids"]) == 3 and out["finish_reason"] == "length"
    assert "Traceback" not in captured.err


def test_a_prompt_that_is_not_utf8_is_one_line(model_dir, capsys):
    """Bytes that are not UTF-8 (arriving as surrogates from argv, or from stdin in either locale) ended in
    a UnicodeEncodeError traceback from the tokenizer, or a UnicodeDecodeError from the read."""
    assert main(["generate", str(model_dir), "-p", "ab\udcff", "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == "error: the prompt is not UTF-8 text (an invalid byte at position 2)\n"
    for encoding in ("utf-8:surrogateescape", "utf-8:strict"):  # the C locale's stdin, a UTF-8 locale's
        r = subprocess.run(
            [sys.executable, "-m", "qwenkit", "generate", str(model_dir), "-p", "-", "--max-new-tokens", "2"],
            input=b"abc\xff",
            capture_output=True,
            env={**os.environ, "PYTHONIOENCODING": encoding},
            timeout=120,
        )
        assert (r.returncode, r.stdout, r.stderr) == (
            2,
            b"",
            b"error: standard input is not UTF-8 text (an invalid byte at position 3)\n",
        )


def test_a_context_past_the_models_own_is_said(model_dir, capsys):
    own = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    args = ["generate", str(model_dir), "-p", "hi", "--max-new-tokens", "2", "--max-context", str(own + 1)]
    assert main(args) == 0
    assert capsys.readouterr().err.startswith(
        f"warning: --max-context {own + 1} is past the model's own context of {own} tokens; "
        f"positions past {own} were never trained and answers that reach them may be poor\n"
    )
    assert main([*args[:-1], str(own)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "-p", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_info_on_qwen_7b_config_with_license(tmp_path, capsys):
    d = tmp_path / "Qwen-7B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN_7B))
    (d / "LICENSE").write_text(
        "Tongyi Qianwen LICENSE AGREEMENT\n\nTongyi Qianwen Release Date: August 3, 2023 ..."
    )
    assert main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "7,721,324,544" in out
    assert "dynamic NTK / LogN" in out and "on / on" in out
    assert "fewer than 100 million monthly active users" in out
    assert "14.38 GiB" in out  # bfloat16 weights: 7,721,324,544 x 2 bytes
    assert "500.0 MiB" in out  # KV cache per 1,000 tokens, bf16: 2 x 32 layers x 4096 x 2 bytes x 1000


def test_info_on_gguf_shows_metadata_license(capsys):
    from qwenkit.default_model import default_model_path

    assert main(["info", str(default_model_path())]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "apache-2.0" in out.lower()
    # the block types as gguf-py's reader counts them, most common first
    counts = Counter(t.tensor_type.name for t in GGUFReader(default_model_path()).tensors).most_common()
    assert counts[0] == ("Q4_1", 210)
    assert "GGUF tensor types" in out and ", ".join(f"{k} x{n}" for k, n in counts) in out
    # the blocks' own size (92.1 MiB, what chat holds them in), beside what each precision would take
    stored = sum(int(t.n_bytes) for t in GGUFReader(default_model_path()).tensors)
    assert f"  as stored {format_bytes(stored):>23}\n" in out and format_bytes(stored) == "92.1 MiB"
    assert main(["info"]) == 0  # the bundled model, as generate/chat/serve/profile default: where it lives
    assert capsys.readouterr().out == out and out.startswith(f"model: {default_model_path()}\n")


def test_info_shows_a_quantized_directory_as_stored(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "int4"
    assert main(["quantize", str(model_dir), str(out_dir), "--bits", "4", "--method", "rtn"]) == 0
    capsys.readouterr()
    assert main(["info", str(out_dir)]) == 0
    stored = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    assert f"  as stored {format_bytes(stored):>23}\n" in capsys.readouterr().out


def test_stop_flags_reach_the_request(model_dir, capsys):
    """--stop-token-id, --min-tokens, --include-stop-str-in-output and --ignore-eos, as the API takes them
    (the command had only --stop); --json reports the stop_reason."""
    base = ["generate", str(model_dir), "--prompt-ids", "9707,11", "--json", "--dtype", "float32"]
    base += ["--temperature", "1", "--seed", "3", "--max-new-tokens", "6"]

    def run(*extra: str) -> dict:
        assert main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    free = run("--ignore-eos")
    ids = free["output_token_ids"]
    assert (len(ids), free["finish_reason"], free["stop_reason"]) == (6, "length", None)
    stop = ids[2]
    by_id = run("--stop-token-id", str(stop))
    assert by_id["output_token_ids"] == ids[: ids.index(stop) + 1]
    assert (by_id["finish_reason"], by_id["stop_reason"]) == ("stop", stop)
    held = run("--stop-token-id", str(stop), "--min-tokens", "4")
    assert len(held["output_token_ids"]) >= 4 and stop not in held["output_token_ids"][:4]
    piece = free["text"][-3:]
    kept = run("--stop", piece, "--include-stop-str-in-output", "--ignore-eos")
    assert kept["text"].endswith(piece) and (kept["finish_reason"], kept["stop_reason"]) == ("stop", piece)
