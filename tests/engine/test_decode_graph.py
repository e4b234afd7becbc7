"""The static-shape decode step (what CUDA graphs capture) against the engine's ordinary path.

On the CPU the static step runs eagerly (``Engine(cuda_graphs=True)``); it must give the same logits
(float32, within 1e-5) and the same tokens as the ordinary path, across batch buckets with padded
rows, rows at different lengths, and a context-bucket boundary. The capture itself is tested only
where CUDA is available.
"""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf, write_v1_checkpoint

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams
from qwenkit.engine.decode_graph import (
    MIN_CONTEXT_TOKENS,
    DecodeGraphs,
    batch_buckets,
    bucket_for,
    context_blocks,
    static_decode_forward,
)
from qwenkit.engine.kv_cache import PagedKVCache, StepAttention


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    model = hf_model("qwen2", max_position_embeddings=1024)
    return load_model(save_hf(model, tmp_path_factory.mktemp("m") / "q2"), dtype="float32")[0]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    model = hf_model("qwen3", max_position_embeddings=1024)
    return load_model(save_hf(model, tmp_path_factory.mktemp("m") / "q3"), dtype="float32")[0]


@pytest.fixture(scope="module")
def qwen_v1(tmp_path_factory):
    return load_model(write_v1_checkpoint(tmp_path_factory.mktemp("m") / "v1"), dtype="float32")[0]


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(n, [1, 2, 4, 8, 12]) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        bucket_for(13, [1, 2, 4, 8, 12])
    smallest = MIN_CONTEXT_TOKENS // 16
    assert context_blocks(1, 16, 4096) == smallest
    assert context_blocks(MIN_CONTEXT_TOKENS, 16, 4096) == smallest
    assert context_blocks(MIN_CONTEXT_TOKENS + 1, 16, 4096) == 2 * smallest
    assert context_blocks(10_000, 16, 4096) == 1024
    assert context_blocks(10_000, 16, 100) == 100  # never past the longest sequence


class Recorder:
    """Wraps an engine's forwards: per step, each request's logits row, and which path gave it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.logits: list[dict[int, torch.Tensor]] = []
        self.static_steps = 0
        for name in ("_forward", "_forward_static"):
            setattr(engine, name, self._wrap(getattr(engine, name), name == "_forward_static"))

    def _wrap(self, forward, static: bool):
        def call(rows, *copies):
            logits, where, *embeddings = forward(rows, *copies)
            self.static_steps += static
            step = {}
            for request, _ in rows:
                first, count = where[id(request)]
                if count:
                    step[request.id] = logits[first + count - 1].clone()
            self.logits.append(step)
            return logits, where, *embeddings

        return call


def run(engine: Engine, prompts, params) -> list[list[int]]:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    outs: dict[int, list[int]] = {i: [] for i in ids}
    for _ in range(2000):  # bounded: a bug must fail, not hang
        if not engine.has_unfinished():
            break
        for o in engine.step():
            assert o.error is None
            outs[o.request_id] += o.new_token_ids
    assert not engine.has_unfinished()
    return [outs[i] for i in ids]


def compare(model, prompts, params, **engine_args) -> tuple[Recorder, Recorder, DecodeGraphs]:
    """Run the prompts on the ordinary path and on the static path; assert same tokens and logits."""
    plain = Recorder(Engine(model, cuda_graphs=False, **engine_args))
    static = Recorder(Engine(model, cuda_graphs=True, **engine_args))
    assert plain.engine.decode_graphs is None and static.engine.decode_graphs is not None
    expected = run(plain.engine, prompts, params)
    got = run(static.engine, prompts, params)
    assert got == expected
    assert len(static.logits) == len(plain.logits)
    for step, (a, b) in enumerate(zip(plain.logits, static.logits, strict=True)):
        assert a.keys() == b.keys(), step
        for rid in a:
            torch.testing.assert_close(b[rid], a[rid], atol=1e-5, rtol=0, msg=f"step {step} request {rid}")
    assert static.static_steps > 0 and plain.static_steps == 0
    return plain, static, static.engine.decode_graphs


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_static_step_equals_engine_path(family, request):
    """Three rows at different lengths (batch bucket 4: one padded row), then two and one as the
    shorter ones finish (buckets 2 and 1), one row crossing the 256-token context bucket."""
    model = request.getfixturevalue(family)
    prompts = [list(range(5, 12)), list(range(100, 350)), [7]]  # 7, 250 and 1 tokens
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
    ]
    _, _, graphs = compare(model, prompts, params, max_batch_size=4, max_seq_len=1024, prefill_chunk=512)
    smallest = MIN_CONTEXT_TOKENS // 16
    widths = {w for w, _ in graphs.shapes_run}
    blocks = {b for _, b in graphs.shapes_run}
    assert {4, 2, 1} <= widths  # three rows padded to four, then two, then one
    assert {smallest, 2 * smallest} <= blocks  # the long row crossed position 256


def test_sampling_penalties_and_logprobs_equal(qwen2):
    """Seeded sampling, penalties, token and prompt log-probabilities: per-request state is untouched."""
    prompts = [list(range(30, 50)), [3], list(range(200, 209))]
    params = [
        SamplingParams(
            temperature=0.9, top_p=0.9, top_k=50, seed=1, max_tokens=12, ignore_eos=True, logprobs=3
        ),
        SamplingParams(
            temperature=1.0,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            seed=2,
            max_tokens=12,
            ignore_eos=True,
        ),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2, logprobs=1),
    ]
    compare(model=qwen2, prompts=prompts, params=params, max_batch_size=3, max_seq_len=256)


def test_preemption_and_prefix_sharing_equal(qwen3):
    """A pool too small for every row: rows are preempted and recomputed; shared prompts share blocks."""
    shared = list(range(40, 80))
    prompts = [[*shared, 1, 2], [*shared, 3], list(range(400, 430)), shared]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * len(prompts)
    _, static, _ = compare(
        qwen3, prompts, params, max_batch_size=4, max_seq_len=128, kv_cache_tokens=160, block_size=8
    )
    assert static.engine.preemptions > 0
    assert static.engine.blocks.prefix_hits > 0


def test_qwen_v1_logn_and_ntk_rows(qwen_v1):
    """Qwen v1: LogN past the trained 32 tokens on the static path; a prompt long enough for a dynamic
    NTK alpha keeps the ordinary path whenever it is in the step."""
    prompts = [list(range(10, 40)), list(range(50, 120))]  # the second has NTK alpha > 1
    assert qwen_v1.ntk_alpha(len(prompts[0])) == 1.0 and qwen_v1.ntk_alpha(len(prompts[1])) > 1.0
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * 2
    compare(qwen_v1, prompts[:1], params[:1], max_batch_size=2, max_seq_len=200)
    mixed = Recorder(Engine(qwen_v1, cuda_graphs=True, max_batch_size=2, max_seq_len=200))
    both = run(mixed.engine, prompts, params)
    alone = [run(Engine(qwen_v1, cuda_graphs=False, max_seq_len=200), [p], params[:1])[0] for p in prompts]
    assert both == alone
    assert mixed.static_steps == 0  # the NTK row decodes in every step: no static step at all


def test_padded_rows_leave_real_rows_and_blocks_alone(qwen2):
    """Dummy rows change neither the real rows' logits nor any block but the dummy one."""
    cfg = qwen2.config
    size, num_blocks = 4, 12
    cache = PagedKVCache(
        cfg.num_hidden_layers,
        num_blocks + 1,
        size,
        cfg.num_key_value_heads,
        cfg.head_dim,
        torch.float32,
        "cpu",
    )
    for t in cache.k + cache.v:  # unwritten slots are NaN: none may leak into a result
        t.fill_(float("nan"))
    tables = [[5, 2, 9], [0, 7]]
    seqs = [list(range(20, 31)), list(range(60, 66))]  # 11 and 6 tokens
    with torch.no_grad():
        for table, seq in zip(tables, seqs, strict=True):  # prefill all but the last token
            step = StepAttention(cache, [], [(table, 0, len(seq) - 1)])
            qwen2(torch.tensor([seq[:-1]]), positions=torch.arange(len(seq) - 1)[None], cache=step)
        graphs = DecodeGraphs(
            qwen2, cache, max_batch=8, max_seq_len=32, dummy_block=num_blocks, capture=False
        )
        rows = [(seq[-1], len(seq) - 1, table) for table, seq in zip(tables, seqs, strict=True)]
        snapshot = [t.clone() for t in cache.k + cache.v]
        width, blocks = 8, graphs.max_blocks  # pad the two rows to eight
        packed = graphs._host_rows(rows, width, blocks)
        padded = static_decode_forward(qwen2, cache, packed)
        assert padded.shape == (8, cfg.vocab_size) and torch.isfinite(padded).all()
        written = {
            table[(len(seq) - 1) // size] * size + (len(seq) - 1) % size
            for table, seq in zip(tables, seqs, strict=True)
        }
        owned = [s for b in range(num_blocks) for s in range(b * size, (b + 1) * size)]
        for before, after in zip(snapshot, cache.k + cache.v, strict=True):
            changed = {
                s for s in owned if not torch.equal(before[s].nan_to_num(7.0), after[s].nan_to_num(7.0))
            }
            assert changed == written
        alone = static_decode_forward(qwen2, cache, graphs._host_rows(rows, 2, blocks))
        torch.testing.assert_close(padded[:2], alone, atol=1e-6, rtol=0)
        for i, seq in enumerate(seqs):
            full = qwen2(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(padded[i], full, atol=1e-5, rtol=0)


def test_no_static_path_by_default_on_cpu(qwen2):
    assert Engine(qwen2).decode_graphs is None
    assert Engine(qwen2, cuda_graphs=True).decode_graphs.capture is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_capture_matches_eager(tmp_path):
    model = load_model(
        save_hf(hf_model("qwen2", max_position_embeddings=1024), tmp_path / "q2"),
        dtype="float32",
        device="cuda",
    )[0]
    prompts = [list(range(5, 12)), list(range(100, 350)), [7]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 20, 10)]
    plain = Engine(model, cuda_graphs=False, max_batch_size=4, max_seq_len=1024)
    graphs_engine = Engine(model, max_batch_size=4, max_seq_len=1024)  # on by default on CUDA
    graphs = graphs_engine.decode_graphs
    assert graphs is not None and graphs.capture
    assert run(graphs_engine, prompts, params) == run(plain, prompts, params)
    assert graphs.disabled is None
    assert len(graphs.graphs) >= 3 and set(graphs.graphs) == graphs.shapes_run


def run_benchmark(script: str, *args: str) -> str:
    """stdout of ``benchmarks/<script>`` run on the CPU in a fresh interpreter; fails on a non-zero exit."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), "--device", "cpu", "--tiny", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_cuda_benchmark_script_logic_on_cpu():
    """The GPU benchmark's whole flow (build, bandwidth, speed table, correctness checks) on a tiny CPU
    model, so the script the GPU run depends on cannot rot unnoticed."""
    args = ["--batches", "1,3", "--new-tokens", "8", "--rounds", "1", "--check-tokens", "6"]
    out = run_benchmark("bench_cuda_decode.py", *args)
    assert out.count("] PASS ") == 6 and "FAIL" not in out and "ERROR" not in out
    assert "correctness: PASS (6/6 checks passed)" in out
    assert out.count("] PASS bfloat16: fused q/k/v and gate/up vs separate layers") == 1
    assert "fused copy: 4 projections fused" in out  # 2 layers x (q/k/v, gate/up)
    rows = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
    # batch, four speeds (separate/fused x graphs off/on), the gain, per row, limit, fraction
    assert len(rows) == 2 and all("error" not in row and row.count("|") == 10 for row in rows)
    assert "eager static step (no capture): [(1, " in out  # the static path ran in the graphs-on engine
    assert "Peer, same run: transformers" in out


def test_step_profile_script_runs_on_cpu():
    """benchmarks/profile_cuda_step.py on a CPU counts the static step's outermost operators: the tiny
    model's 2 layers x (q/k/v, o, gate/up, down) + lm_head = 9 matrix products a step, fused as loaded."""
    import re

    out = run_benchmark("profile_cuda_step.py")
    assert "fused copy: 4 projections fused" in out
    assert re.search(r"matrix products 9 operators [0-9.]+ ms", out), out
    assert re.search(r"^\| aten::linear \| 9 \| [0-9.]+ \|$", out, re.M), out
    assert re.search(r"^\| aten::scaled_dot_product_attention \| 2 \|", out, re.M), out


def test_quantized_gpu_benchmark_runs_on_cpu():
    """benchmarks/bench_cuda_quant.py's flow on a CPU: every precision row, its error checks passing, and
    the quantized rows within a few percent of bfloat16's logits (the tiny model's int8/int4 layers)."""
    import re

    out = run_benchmark("bench_cuda_quant.py", "--new-tokens", "8", "--rounds", "1")
    assert "correctness: PASS" in out and "ERROR" not in out
    rows = {
        m.group(1): m.group(0) for m in re.finditer(r"^\| (bf16|int8|int8-dequant|int4) \|.*$", out, re.M)
    }
    assert set(rows) == {"bf16", "int8", "int8-dequant", "int4"}
    for name, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0  # tokens/s
        assert float(cells[7]) < (0.001 if name == "bf16" else 0.1)  # logits error against bf16


@pytest.mark.parametrize("flag, expected", [([], None), (["--no-cuda-graphs"], False)])
def test_cli_flag_reaches_the_engine(tiny_chat_model, monkeypatch, capsys, flag, expected):
    """``--no-cuda-graphs`` is passed down to LLM.load (unset: None, the engine's automatic choice)."""
    from qwenkit.cli import main
    from qwenkit.generate import LLM

    seen = {}
    original = LLM.load.__func__

    def load(cls, *args, **kwargs):
        seen["cuda_graphs"] = kwargs.get("cuda_graphs", "missing")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LLM, "load", classmethod(load))
    argv = ["generate", str(tiny_chat_model), "--prompt-ids", "9707,11", "--dtype", "float32"]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "2", *flag]) == 0
    assert seen["cuda_graphs"] is expected
    assert capsys.readouterr().out.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs capture to fail: no CUDA device")
def test_failed_capture_falls_back_with_one_warning(qwen2, caplog):
    """A capture that raises (here: no CUDA device) disables graphs with one logged warning; the step
    that tried still gives the right tokens, and later steps take the ordinary path."""
    prompts = [list(range(5, 12)), [7]]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 2
    expected = run(Engine(qwen2, cuda_graphs=False), prompts, params)
    engine = Engine(qwen2, cuda_graphs=True)
    engine.decode_graphs.capture = True  # as on CUDA
    recorder = Recorder(engine)
    with caplog.at_level("WARNING", logger="qwenkit.engine.decode_graph"):
        assert run(engine, prompts, params) == expected
    assert engine.decode_graphs.disabled and not engine.decode_graphs.graphs
    warnings = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(warnings) == 1
    assert recorder.static_steps == 1  # only the step that tried to capture
