"""``qwenkit profile``: one row per precision, positive numbers, and the kernel each layer runs."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import torch
from factories import hf_model, save_hf

from qwenkit import kernels
from qwenkit.cli import main
from qwenkit.kernels import build
from qwenkit.profile import ProfileError, parse_precisions, profile, prompt_ids
from qwenkit.quant.kernels.avx512 import INT_ISA_NAMES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_hf(hf_model("qwen2", tie_word_embeddings=True), tmp_path_factory.mktemp("profile") / "m")


def test_profile_rows_per_precision(tiny) -> None:
    rows = profile(tiny, ["float32", "int8", "int4"], generate=6, encode=12)
    assert [r.precision for r in rows] == ["float32", "int8", "int4"]
    for r in rows:
        assert r.tokens_per_second > 0 and r.encode_tokens_per_second > 0
        assert r.peak_encode_bytes > 0 and r.peak_generate_bytes > 0 and r.weight_bytes > 0
        assert sum(r.kernels.values()) == 2 * 7 + 1  # every projection and lm_head
    assert rows[0].kernels == {"dense F.linear (float32)": 15}
    fast = kernels.available()  # qwenkit's kernels where built, else PyTorch's packed ones
    isa = INT_ISA_NAMES.get(kernels.isa_level() or "")
    int8 = f"qwenkit {isa} int8" if fast else "aten._weight_int8pack_mm"
    int4 = f"qwenkit {isa} int4" if fast else "aten._weight_int4pack_mm_for_cpu"
    assert [k for k in rows[1].kernels if k.startswith(int8)], rows[1].kernels
    assert [k for k in rows[2].kernels if k.startswith(int4)], rows[2].kernels
    assert rows[2].weight_bytes < rows[1].weight_bytes < rows[0].weight_bytes


def test_profile_cli_table(tiny, capsys) -> None:
    assert (
        main(["profile", str(tiny), "--generate", "4", "--encode", "8", "--precisions", "bfloat16,int4"]) == 0
    )
    out, err = capsys.readouterr()
    assert err == "qwenkit profile: bfloat16 (1 of 2)\nqwenkit profile: int4 (2 of 2)\n"  # progress
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header + one row per precision
    level = kernels.isa_level()
    vector = "qwenkit AVX-512 BF16 (vdpbf16ps)"
    # on AMX: all but the two down_proj layers, whose K (160) is not a multiple of 64
    avx512 = f"qwenkit AMX BF16 (tdpbf16ps) x13; {vector} x2" if kernels.amx_in_use() else f"{vector} x15"
    avx2 = "qwenkit AVX2 BF16 (FMA) x15"  # AVX-VNNI has no bf16 products: its build runs AVX2's
    names = {"avx512": avx512, "avx512vnni": "qwenkit AVX-512 BF16 (FMA) x15", "avxvnni": avx2, "avx2": avx2}
    bf16 = names.get(level or "", "dense F.linear (bfloat16) x15")
    assert table[1].startswith(f"| bfloat16 | bfloat16 | {bf16} |"), table[1]
    int4 = f"{INT_ISA_NAMES[level]} int4" if level else "_weight_int4pack_mm_for_cpu"
    assert table[2].startswith("| int4 |") and int4 in table[2], table[2]
    for row in table[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[4]) > 0 and all(float(c.split()[0]) > 0 for c in (cells[3], cells[5], cells[6]))
    assert "tokens/s generating 4 (context 1)" in table[0] and "encoding 8 tokens" in table[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--precisions", "int3"],
            "error: unknown precision 'int3'; choose from checkpoint, float32, bfloat16, float16, int8, int4",
        ),
        (["--generate", "0", "--encode", "0"], "error: --context must be at least 1"),
        (["--precisions", ""], "error: --precisions is empty"),  # once: every precision, 2,048 tokens each
        # the one token carries the prefill and is not timed: the table showed 0.0 tokens/s
        (["--generate", "1"], "error: --generate 1 times nothing: the first token carries the prompt's"),
        # was "error: profiling float32 failed: IndexError: list index out of range", from the child
        (["--tensor-parallel", "0"], "error: --tensor-parallel must be at least 1, got 0\n"),
    ],
)
def test_profile_bad_input(tiny, capsys, args, message) -> None:
    assert main(["profile", str(tiny), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_precision_is_one_error_line(tiny, capsys) -> None:
    """The child's "error: " is not repeated after the parent's."""
    assert main(["profile", str(tiny), "--precisions", "int4", "--device", "cuda", "--generate", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: profiling int4 failed: --device cuda was asked for, but no CUDA device is available"
    )


def test_prompt_ids_stay_inside_a_small_vocabulary(tiny) -> None:
    """A 512-token vocabulary got prompt id 512 from the 500th position on: encoding 512 tokens failed
    with "prompt token id 512 is outside the vocabulary (0..511)"."""
    assert all(0 < i < 512 for i in prompt_ids(2048, 512))
    assert prompt_ids(4, 151936) == [12, 19, 26, 33]  # a real vocabulary's prompt is unchanged
    assert max(prompt_ids(2048, 151936)) == 1000
    (row,) = profile(tiny, ["float32"], generate=0, encode=512, isolate=False)
    assert row.encode_tokens_per_second > 0 and row.peak_encode_bytes > 0


def test_quantize_on_a_quantized_checkpoint_is_refused(tmp_path, capsys) -> None:
    """--quantize int4 on a GPTQ checkpoint was dropped without a word and the checkpoint profiled;
    --precisions int4 (and generate --quantize) refuse it."""
    from qwenkit.quant.pipeline import quantize_checkpoint

    src = save_hf(hf_model("qwen2"), tmp_path / "m")
    quantize_checkpoint(src, tmp_path / "q", bits=8, method="rtn", progress=False)
    capsys.readouterr()  # transformers' progress bars while saving
    args = ["--quantize", "int4", "--generate", "2", "--encode", "2"]
    assert main(["profile", str(tmp_path / "q"), *args]) == 2
    assert capsys.readouterr().err == (
        "error: the model is already quantized; it runs only at its own precision, not int4\n"
    )


def test_quantized_checkpoint_runs_only_as_itself() -> None:
    assert parse_precisions("checkpoint", quantized_checkpoint=True) == ["checkpoint"]
    with pytest.raises(ProfileError, match="already quantized"):
        parse_precisions("int4", quantized_checkpoint=True)


@pytest.mark.slow
def test_profile_with_tensor_parallel_reports_per_rank_memory(tmp_path, capsys) -> None:
    """`--tensor-parallel 2`: each precision over 2 ranks (GQA 8/4 heads splits); a rank holds about half
    the weights (norms copied), and a split the model cannot take is one line before anything starts."""
    path = save_hf(hf_model("qwen2", num_attention_heads=8, num_key_value_heads=4), tmp_path / "m")
    single = profile(path, ["float32", "int8"], generate=6, encode=12)
    split = profile(path, ["float32", "int8"], generate=6, encode=12, tensor_parallel=2)
    for one, two in zip(single, split, strict=True):
        assert (one.tensor_parallel, two.tensor_parallel) == (1, 2) and two.precision == one.precision
        assert 0.45 < two.weight_bytes / one.weight_bytes < 0.6, (one.weight_bytes, two.weight_bytes)
        assert two.tokens_per_second > 0 and two.peak_generate_bytes > two.weight_bytes
    capsys.readouterr()  # transformers' saving progress
    assert main(["profile", str(path), "--generate", "4", "--encode", "0", "--tensor-parallel", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --tensor-parallel 3 does not divide the model's 8 attention heads; "
        "this model splits over 1, 2, 4 ranks"
    ]


def test_why_the_kernels_are_off_is_said_once_for_the_whole_profile(tiny, tmp_path, monkeypatch, capsys):
    """Without a compiler each child process fell back to the plain path and said why on its stderr,
    which the profile dropped: the table named aten kernels and the user never learned the cause or the
    remedy. Now the line is passed on, once for all the precisions."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.delenv("QWENKIT_KERNELS", raising=False)
    argv = ["profile", str(tiny), "--generate", "2", "--encode", "0", "--precisions", "bfloat16,int8,int4"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if not line.startswith("qwenkit profile: ")]
    why = build.missing_isa() or (
        "no C++ compiler found (CXX='no-such-compiler' names nothing runnable; install g++ or fix CXX)"
    )
    assert notes == [f"qwenkit: CPU kernels unavailable: {why}; using the plain PyTorch path"]
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| bfloat16 | bfloat16 | dense F.linear (bfloat16) x15 |"), table[1]
    assert "aten._weight_int8pack_mm" in table[2] and "aten._weight_int4pack_mm_for_cpu" in table[3]


def _processes_with(marker: str) -> list[int]:
    """The live processes whose environment holds ``marker`` (this test's children and theirs)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "environ").read_bytes() and int(proc.name) != os.getpid():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_precision_that_runs_past_the_limit_is_stopped_with_one_line(tiny, monkeypatch) -> None:
    """Each precision's subprocess had no time limit: a child that hung (a stuck rank, a deadlock) hung
    `qwenkit profile` for ever. Past ``timeout_s`` it is stopped, with every process it started."""
    marker = f"profile-timeout-{uuid.uuid4().hex}"
    monkeypatch.setenv("QWENKIT_TEST_MARKER", marker)
    start = time.monotonic()
    with pytest.raises(ProfileError) as e:
        profile(tiny, ["float32"], generate=4, encode=8, timeout_s=0.5)
    assert str(e.value) == "profiling float32 took over 0.5 s and was stopped (--timeout sets the limit)"
    assert time.monotonic() - start < 60
    assert _processes_with(marker) == []


def test_the_cli_names_the_limit_and_refuses_a_bad_one(tiny, capsys) -> None:
    args = ["profile", str(tiny), "--precisions", "int4", "--generate", "2", "--encode", "4"]
    assert main([*args, "--timeout", "0.5"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: profiling int4 took over 0.5 s and was stopped (--timeout sets the limit)"
    )
    with pytest.raises(SystemExit) as e:
        main([*args, "--timeout", "-1"])
    assert e.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith("error: --timeout must be a number of seconds, 0 for no limit (got -1)")
    )


@pytest.mark.parametrize(
    ("script", "said"),
    [
        (
            "kill -9 $$",
            "its process was killed by SIGKILL (most likely the out-of-memory killer: too little free RAM)",
        ),
        (
            "echo 'qwenkit: building the CPU kernels' >&2; kill -9 $$",
            "its process was killed by SIGKILL (most likely the out-of-memory killer: too little free RAM)",
        ),
        ("kill -TERM $$", "its process was killed by SIGTERM"),
        ("exit 3", "exit status 3, no message"),
    ],
    ids=["oom-killed", "killed-after-a-note", "terminated", "silent-exit"],
)
def test_a_child_killed_by_a_signal_is_named_so(tiny, tmp_path, monkeypatch, script, said) -> None:
    """A precision's process the OOM killer ended (a model too large for the RAM) failed with "no
    output", or with a note it had printed before ("qwenkit: building the CPU kernels") as its error."""
    child = tmp_path / "python"
    child.write_text(f"#!/bin/sh\ncat > /dev/null\n{script}\n")
    child.chmod(0o755)
    monkeypatch.setattr("sys.executable", str(child))  # what profile() starts for each precision
    with pytest.raises(ProfileError) as e:
        profile(tiny, ["float32"], generate=2, encode=0)
    assert str(e.value) == f"profiling float32 failed: {said}"
