"""Long context as users switch it on: static YaRN configs, past the original window, end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
from factories import run_engine, write_tiny_chat_model
from test_config import QWEN3_SMALL

from qwenkit.checkpoint import load_model
from qwenkit.cli import main
from qwenkit.config import ModelConfig
from qwenkit.engine import Engine, SamplingParams
from qwenkit.errors import ConfigError

QWEN25_7B = {**QWEN3_SMALL, "model_type": "qwen2", "max_position_embeddings": 32768}
YARN_X4 = {"factor": 4.0, "original_max_position_embeddings": 32768}


def test_yarn_context_is_the_original_window_times_its_factor():
    """Qwen2.5's documented YaRN setting adds rope_scaling and leaves max_position_embeddings at 32768;
    the model then runs to 131072 tokens (as vLLM reads it). It was held to 32768, so a longer prompt was
    refused and --max-context 131072 warned that the positions were never trained."""
    published = ModelConfig.from_hf({**QWEN25_7B, "rope_scaling": {"type": "yarn", **YARN_X4}})
    assert published.max_position_embeddings == 32768 and published.max_context == 131072
    # transformers 5 writes the same setting as rope_parameters
    v5 = {**QWEN25_7B, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, **YARN_X4}}
    assert ModelConfig.from_hf(v5).max_context == 131072
    # Qwen3's documented form also raises max_position_embeddings: the same context
    qwen3 = {**QWEN3_SMALL, "rope_scaling": {"rope_type": "yarn", **YARN_X4}}
    assert ModelConfig.from_hf(qwen3).max_context == 131072
    assert ModelConfig.from_hf(QWEN25_7B).max_context == 32768  # no scaling: the trained window


def test_a_prompt_past_the_original_window_runs_under_yarn_as_in_transformers(tmp_path, capsys):
    """A 150-token prompt on a model whose YaRN x4 stretches a 64-token window: generated in prompt
    chunks, then decoded, with transformers' greedy tokens, and no warning."""
    import transformers

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    path = write_tiny_chat_model(tmp_path / "m", max_position_embeddings=64, rope_scaling=yarn)
    assert json.loads((path / "config.json").read_text())["max_position_embeddings"] == 64
    prompt = torch.randint(0, 151936, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    args = ["generate", str(path), "--prompt-ids", ",".join(map(str, prompt)), "--json"]
    args += ["--dtype", "float32", "--temperature", "0", "--max-new-tokens", "8"]
    assert main(args) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "error" not in captured.err
    out = json.loads(captured.out)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def hf_greedy(ids: list[int]) -> list[int]:
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        return out[0, len(ids) :].tolist()

    ref = hf_greedy(prompt)
    assert out["output_token_ids"] == ref and out["finish_reason"] == "length"
    # The engine's default window too, the long prompt in 16-token chunks beside a short request
    model, _ = load_model(path, dtype="float32")
    engine = Engine(model, max_batch_size=2, prefill_chunk=16)
    assert engine.max_seq_len == 256
    outs = run_engine(
        engine, [prompt, prompt[:20]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    assert outs == [ref, hf_greedy(prompt[:20])]

    assert main(["info", str(path)]) == 0
    info = capsys.readouterr().out
    assert "trained context" in info and "64 (runs to 256)" in info and "yarn x4 from 64" in info


def test_a_perplexity_window_past_the_context_is_refused(tmp_path, capsys):
    """Perplexity windows run the network directly, not through the engine that checks the context: a
    --window past it scored positions the model never saw (exit 0, a perplexity of untrained positions)."""
    path = write_tiny_chat_model(tmp_path / "m", max_position_embeddings=64)
    capsys.readouterr()  # transformers' save progress
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The stones by the road are warm. A dog sleeps in the shade. " * 20, encoding="utf-8")
    args = ["eval", str(path), "--task", "ppl", "--data", str(corpus), "--no-progress", "--dtype", "float32"]
    assert main([*args, "--window", "128", "--stride", "64", "--output", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (
        "error: --window 128 is past the model's context of 64 tokens: give a window of at most 64\n"
    )
    assert main([*args, "--window", "64", "--stride", "32", "--output", str(tmp_path / "b")]) == 0
    scores = json.loads((tmp_path / "b" / "results.json").read_text())["scores"]
    assert scores["windows"] > 1 and scores["tokens_scored"] > 200
    # the context asked for is the limit (said once, as for every command)
    args += ["--max-context", "128", "--window", "128", "--stride", "64", "--output", str(tmp_path / "c")]
    assert main(args) == 0
    assert capsys.readouterr().err.startswith("warning: --max-context 128 is past the model's own context")
    # a text shorter than the window stays within the context: nothing to refuse
    corpus.write_text("A dog sleeps in the shade.", encoding="utf-8")
    assert main([*args[:-6], "--window", "128", "--stride", "64", "--output", str(tmp_path / "d")]) == 0


def test_qwen_v1_ntk_and_logn_in_chunks_beside_shorter_requests(tmp_path):
    """Qwen v1 (seq_length 64, dynamic NTK and LogN) with prompts 3x past it, computed in 16-token chunks
    in one batch with shorter requests (one crossing 64 while decoding, under preemption): each request's
    greedy tokens are the v1 reference's, whose NTK alpha is fixed by the whole prompt's length."""
    from factories import write_v1_checkpoint
    from qwen_v1_reference import v1_greedy
    from safetensors.torch import load_file

    path = write_v1_checkpoint(tmp_path / "v1", {"seq_length": 64})
    cfg = json.loads((path / "config.json").read_text())
    sd = load_file(path / "model.safetensors")
    model, _ = load_model(path, dtype="float32")
    base = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    prompts = [base[:150], base[:100], base[:60], base, base[:20]]
    assert [model.ntk_alpha(len(p)) for p in prompts] == [7, 3, 1, 7, 1]
    engine = Engine(model, max_batch_size=4, max_seq_len=300, prefill_chunk=16, kv_cache_tokens=400)
    outs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert engine.preemptions > 0
    assert outs == [v1_greedy(sd, cfg, p, 30) for p in prompts]


def test_the_last_position_of_the_context_is_generated_and_a_full_prompt_is_refused(tmp_path):
    """A prompt one token short of the window gets exactly one token (finish_reason length); one that
    fills the window was refused with 'the prompt has 64 tokens; the context window is 64', which read
    as if it fitted."""
    from factories import write_v1_checkpoint

    from qwenkit.engine import SamplingParamsError

    model, _ = load_model(write_v1_checkpoint(tmp_path / "v1", {"seq_length": 32}), dtype="float32")
    engine = Engine(model, max_batch_size=1, max_seq_len=64, prefill_chunk=16)
    prompt = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    rid = engine.add_request(prompt[:63], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [(o.request_id, len(o.new_token_ids), o.finish_reason) for o in outs] == [(rid, 1, "length")]
    with pytest.raises(SamplingParamsError) as refused:
        engine.add_request(prompt, SamplingParams(max_tokens=1))
    assert str(refused.value) == (
        "the prompt has 64 tokens; the context window is 64, and a prompt may take at most 63 to leave "
        "room for a token to be generated"
    )


def test_a_prompt_filling_the_window_is_scored_when_nothing_is_generated(tmp_path):
    """Scoring a prompt (max_tokens 0, prompt_logprobs) generates no token, so a prompt of exactly the
    window is served, with the log-probabilities a larger window gives it; it was refused as if a token
    had to follow, which made endpoint perplexity at the full window fail. One token more is refused."""
    from factories import write_v1_checkpoint

    from qwenkit.engine import SamplingParamsError

    model, _ = load_model(write_v1_checkpoint(tmp_path / "v1", {"seq_length": 32}), dtype="float32")
    prompt = torch.randint(0, 512, (65,), generator=torch.Generator().manual_seed(2)).tolist()
    score = SamplingParams(max_tokens=0, prompt_logprobs=0)

    def scored(max_seq_len: int) -> list[float | None]:
        engine = Engine(model, max_batch_size=1, max_seq_len=max_seq_len, prefill_chunk=16)
        engine.add_request(prompt[:64], score)
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        assert [(len(o.new_token_ids), o.finish_reason) for o in outs if o.finish_reason] == [(0, "length")]
        lps = next(o.prompt_logprobs for o in outs if o.prompt_logprobs)
        return [None if lp is None else lp.logprob for lp in lps]

    full, roomy = scored(64), scored(128)
    assert len(full) == 64 and full[0] is None
    assert full[1:] == pytest.approx(roomy[1:], abs=1e-5)
    engine = Engine(model, max_batch_size=1, max_seq_len=64, prefill_chunk=16)
    with pytest.raises(SamplingParamsError, match="^the prompt has 65 tokens; the context window is 64$"):
        engine.add_request(prompt, score)


def test_info_names_llama3_and_linear_scaling_and_refuses_a_bad_one_in_one_line(tmp_path, capsys):
    """`qwenkit info` on Llama 3.1 8B's config.json (and a linear one) named the rope type "yarn" would
    have; the config was refused before. A llama3 rope_scaling without low_freq_factor: one line, exit 2."""
    from test_config import LLAMA31_8B

    linear = {**LLAMA31_8B, "max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4}}
    for name, cfg, expected in (
        ("llama31", LLAMA31_8B, ("RoPE base / scaling", "500000, llama3 x8 from 8192")),
        ("linear", linear, ("trained context", "4096 (runs to 16384)")),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        assert main(["info", str(tmp_path / name)]) == 0
        lines = capsys.readouterr().out.splitlines()
        rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines if "  " in line.strip())
        assert rows[expected[0]] == expected[1]
    assert "linear x4" in rows["RoPE base / scaling"] and "from" not in rows["RoPE base / scaling"]
    broken = {**LLAMA31_8B, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps(broken))
    assert main(["info", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "rope_scaling type llama3 needs low_freq_factor (a number)"
    )


YARN_8_FROM_64 = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}
YARN_VARIANTS = {
    "qwen2": dict(model_type="qwen2", rope_scaling={**YARN_8_FROM_64, "type": "yarn"}),
    "qwen3": dict(model_type="qwen3", head_dim=32, rope_scaling=YARN_8_FROM_64),
    "qwen3-attention-factor-betas-untruncated": dict(
        model_type="qwen3",
        head_dim=32,
        rope_scaling={
            **YARN_8_FROM_64,
            "attention_factor": 0.8,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        },
    ),
    "qwen3-mscale": dict(
        model_type="qwen3",
        head_dim=32,
        rope_scaling={**YARN_8_FROM_64, "mscale": 0.707, "mscale_all_dim": 1.0},
    ),
    "qwen2-rope-parameters": dict(model_type="qwen2", rope_parameters={**YARN_8_FROM_64, "rope_theta": 1e6}),
}


@pytest.mark.parametrize("variant", list(YARN_VARIANTS))
def test_yarn_logits_past_the_original_window_equal_transformers_in_chunks_and_decode(variant, tmp_path):
    """A 200-token prompt (the original window is 64, YaRN x8 stretches it to 512) computed in 48-token
    chunks, then 24 tokens decoded one by one through the KV cache: every prompt token's and every decoded
    token's log-probability is transformers' on the whole sequence at once, for each key transformers
    honours (attention_factor, beta_fast/beta_slow, mscale/mscale_all_dim, truncate)."""
    from factories import hf_model_from_config_json

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    hf = hf_model_from_config_json(tmp_path / "m", {**shape, **YARN_VARIANTS[variant]})
    model, config = load_model(tmp_path / "m", dtype="float32")
    assert config.max_context == 512
    assert model.rotary.scale == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert torch.equal(model.rotary.inv_freq, hf.model.rotary_emb.inv_freq)
    prompt = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(model, max_batch_size=1, prefill_chunk=48)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    engine.add_request(prompt, params)
    prompt_lps, generated, generated_lps = None, [], []
    while engine.has_unfinished():
        for out in engine.step():
            prompt_lps = out.prompt_logprobs or prompt_lps
            generated += out.new_token_ids
            generated_lps += [lp.logprob for lp in out.logprobs]
    whole = prompt + generated
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([whole])).logits[0], dim=-1)  # (224, V)
    want = ref[torch.arange(len(whole) - 1), torch.tensor(whole[1:])]
    assert len(generated) == 24 and ref[199:-1].argmax(-1).tolist() == generated  # greedy agrees
    ours = torch.tensor([lp.logprob for lp in prompt_lps[1:]] + generated_lps)
    assert (ours - want).abs().max().item() < 1e-5


MEMORY_SCRIPT = """
import resource, sys, torch
from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams
from qwenkit.errors import ConfigError
torch.set_num_threads(2)
model, _ = load_model(sys.argv[1], dtype="float32")
ids = torch.randint(0, 512, (6144,), generator=torch.Generator().manual_seed(0)).tolist()
engines = [Engine(model, max_batch_size=1, max_seq_len=6160, prefill_chunk=c) for c in (6144, 1024)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    model(torch.tensor([ids]), logits_index=torch.tensor([6143]))  # as a perplexity window runs
for engine in engines:
    engine.add_request(ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_a_long_prompt_is_computed_without_a_square_matrix_of_scores(tmp_path):
    """A 6,144-token prompt (YaRN x4 from 2,048) run whole through the network, in one engine step and in
    1,024-token chunks: the peak memory grows by tens of MB (activations, a chunk's mask), far from the
    600 MB that one layer's (heads, tokens, tokens) float32 scores would take."""
    import subprocess
    import sys

    from factories import hf_model, save_hf

    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    path = save_hf(hf_model("qwen2", max_position_embeddings=8192, rope_scaling=yarn), tmp_path / "m")
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    grown_mb = int(run.stdout.split()[-1])
    assert grown_mb < 200, f"prefill's peak memory grew by {grown_mb} MB"


# Qwen2.5-7B-Instruct-1M's config.json (and 14B's): vLLM runs dual-chunk attention from it, transformers
# ignores it and runs full attention over all 1,010,000 positions
DUAL_CHUNK = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}


def test_a_dual_chunk_attention_config_is_said_once_and_shown_by_info(tmp_path, capsys):
    """Qwen2.5-1M's dual_chunk_attention_config was ignored without a word: a user running past the
    262,144 tokens it was trained for got full attention, not vLLM's dual-chunk attention. Loading says
    so once, in one line naming that window; `qwenkit info` shows it; the logits are full attention's."""
    import transformers

    path = write_tiny_chat_model(
        tmp_path / "m",
        family="qwen2",
        max_position_embeddings=1010000,
        dual_chunk_attention_config=DUAL_CHUNK,
    )
    capsys.readouterr()  # transformers' save progress
    model, config = load_model(path, dtype="float32", progress=False)
    assert config.dual_chunk_attention == DUAL_CHUNK and config.dual_chunk_window == 262144
    load_model(path, dtype="float32", progress=False)  # a second load says nothing more
    assert capsys.readouterr().err == (
        "qwenkit: config.json's dual_chunk_attention_config is not implemented: full attention runs over "
        "every position, as in transformers (the model was trained for 262,144 tokens)\n"
    )
    ids = torch.randint(0, 151936, (1, 40), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)

    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines if "  " in line.strip())
    assert rows["dual-chunk attention"] == (
        "not run: full attention, trained for 262144 (chunk_size 262144, local_size 8192)"
    )
    assert rows["trained context"] == "1010000"
    # a model without it: no row, nothing said
    plain = ModelConfig.from_hf({**QWEN25_7B})
    assert plain.dual_chunk_attention is None and plain.dual_chunk_note is None


def test_a_dual_chunk_attention_config_that_is_not_an_object_is_refused_naming_it():
    with pytest.raises(
        ConfigError, match=r"^config.json: dual_chunk_attention_config must be an object or null, not 5$"
    ):
        ModelConfig.from_hf({**QWEN25_7B, "dual_chunk_attention_config": 5})


def test_a_sparse_attention_config_is_said_to_be_ignored_and_shown_by_info(tmp_path, capsys):
    """Qwen2.5-1M ships sparse_attention_config.json beside its dual_chunk_attention_config (vLLM runs
    those sparse patterns within dual-chunk attention); qwenkit ignored it without a word. Loading says
    so once, `qwenkit info` shows it, and a model without the file gets neither."""
    path = write_tiny_chat_model(
        tmp_path / "m",
        family="qwen2",
        max_position_embeddings=1010000,
        dual_chunk_attention_config=DUAL_CHUNK,
    )
    (path / "sparse_attention_config.json").write_text(
        '{"0": {"5": ["vertical_and_slash", 1000, 6096, 0.5]}}'
    )
    capsys.readouterr()
    load_model(path, dtype="float32", progress=False)
    load_model(path, dtype="float32", progress=False)
    err = capsys.readouterr().err
    assert err.count("qwenkit: sparse_attention_config.json") == 1
    assert (
        "qwenkit: sparse_attention_config.json (the sparse attention vLLM runs within dual-chunk attention) "
        "is not implemented: it is ignored and full attention runs over every position\n"
    ) in err
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines if "  " in line.strip())
    assert rows["sparse attention"] == "not run: sparse_attention_config.json ignored, full attention"
    (path / "sparse_attention_config.json").unlink()
    assert main(["info", str(path)]) == 0
    assert "sparse attention" not in capsys.readouterr().out
