"""`qwenkit info` (total and active parameters, memory of all weights and of the active set),
`qwenkit profile` and router statistics on MoE models."""

from __future__ import annotations

import json
import re

import pytest
import torch
from moe_models import hf_moe_model

from qwenkit.checkpoint import load_model
from qwenkit.cli import main
from qwenkit.config import ModelConfig
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM, tokenizer_for
from qwenkit.memory import weight_bytes

# Published shapes: Qwen1.5-MoE-A2.7B is 14.3 B parameters with 2.7 B active; Qwen3-30B-A3B 30.5 B / 3.3 B.
A27 = dict(
    model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
)  # fmt: skip
A3B = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
)  # fmt: skip


@pytest.mark.parametrize(("cfg", "total", "active"), [(A27, 14.32, 2.69), (A3B, 30.53, 3.35)])
def test_published_parameter_counts(cfg, total, active):
    c = ModelConfig.from_hf(cfg)
    assert round(c.num_parameters / 1e9, 2) == total
    assert round(c.num_active_parameters / 1e9, 2) == active


@pytest.mark.parametrize("variant", ["qwen2_moe-mixed", "qwen3_moe-top1-mixed"])
def test_counts_equal_the_loaded_model(tmp_path, variant):
    hf_moe_model(variant).save_pretrained(tmp_path / "m")
    model, c = load_model(tmp_path / "m", dtype="float32", progress=False)
    assert c.num_parameters == sum(p.numel() for p in model.parameters())  # tied weights counted once
    routed_per_layer = c.num_experts * 3 * c.hidden_size * c.moe_intermediate_size
    idle = (c.num_experts - c.num_experts_per_tok) / c.num_experts
    assert c.num_parameters - c.num_active_parameters == len(c.sparse_layers) * routed_per_layer * idle
    assert weight_bytes(c, torch.bfloat16, active=True) == 2 * c.num_active_parameters
    assert weight_bytes(c, torch.bfloat16, "int4", active=True) < weight_bytes(c, torch.bfloat16, "int4")


def test_info_shows_total_and_active(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(A27))  # info reads no weights
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "14,315,784,192 (14.32 B)" in out
    assert re.search(r"active parameters per token\s+2,689,173,504 \(2\.69 B\)", out)
    assert "60 routed, top-4, expert FFN width 1408" in out
    assert "width 5632, sigmoid-gated" in out and "sparse layers" in out and "24 of 24" in out
    c = ModelConfig.from_hf(A27)
    bf16 = next(line for line in out.splitlines() if line.strip().startswith("bfloat16"))
    assert f"{weight_bytes(c, torch.bfloat16) / 2**30:.2f} GiB" in bf16  # 26.66 GiB
    assert re.search(rf"active set per token\s+{2 * c.num_active_parameters / 2**30:.2f} GiB", bf16)  # 5.01


def test_profile_runs_moe(tmp_path):
    from qwenkit.profile import profile

    hf_moe_model("qwen2_moe").save_pretrained(tmp_path / "m")
    rows = profile(tmp_path / "m", ["float32", "int8"], generate=4, encode=8, isolate=False)
    assert all(r.tokens_per_second > 0 and r.encode_tokens_per_second > 0 for r in rows)
    linears = 3 * (4 + 8 * 3 + 3) + 1  # attention, 8 experts, shared expert per layer; lm_head
    assert rows[0].kernels == {"dense F.linear (float32)": linears, "float router F.linear (float32)": 6}
    # int8 runs at the default activation dtype; the routers stay floating point at that dtype
    assert sum(n for k, n in rows[1].kernels.items() if k.startswith("float router")) == 6
    from qwenkit.quant.kernels import choose_kernel, kernel_class

    int8 = kernel_class(choose_kernel(8, 64, 64, 64, torch.device("cpu"))).description
    assert rows[1].kernels[int8] > 0


def _hf_routing_counts(path, ids: list[int]) -> dict[int, list[int]]:
    """Tokens per expert from transformers' own router logits."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    k, n = hf.config.num_experts_per_tok, hf.config.num_experts
    return {
        i: torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=n).tolist()
        for i, logits in enumerate(out.router_logits)
    }


def test_router_stats_api_and_cli(moe_with_tokenizer, capsys):
    ids = [(37 * i + 11) % 151000 for i in range(40)]
    llm = LLM(
        load_model(moe_with_tokenizer, dtype="float32", progress=False)[0], tokenizer_for(moe_with_tokenizer)
    )
    stats = llm.router_stats(ids)
    assert stats.per_layer == _hf_routing_counts(moe_with_tokenizer, ids)
    assert sum(stats.total) == 3 * 40 * 4  # layers x tokens x top-4

    prompt = ",".join(map(str, ids))
    args = ["generate", str(moe_with_tokenizer), "--prompt-ids", prompt, "--router-stats"]
    assert main([*args, "--max-new-tokens", "2", "--temperature", "0", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    for layer, counts in stats.per_layer.items():
        assert f"layer {layer:3d}: 160 routings" in err and f"counts {counts}" in err


def test_router_stats_of_a_bad_prompt_is_one_line(moe_with_tokenizer, capsys):
    """An id past the vocabulary (or an empty prompt) went into the model's forward unchecked: an
    IndexError traceback from the embedding on the CLI, a RuntimeError from torch in the API."""
    from qwenkit.engine import SamplingParamsError

    llm = LLM(
        load_model(moe_with_tokenizer, dtype="float32", progress=False)[0], tokenizer_for(moe_with_tokenizer)
    )
    with pytest.raises(SamplingParamsError, match=r"^prompt token id 999999 is outside the vocabulary"):
        llm.router_stats([5, 999999])
    with pytest.raises(SamplingParamsError, match="^the prompt is empty"):
        llm.router_stats([])
    args = ["generate", str(moe_with_tokenizer), "--prompt-ids", "5,999999", "--router-stats"]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: prompt token id 999999 is outside the vocabulary (0..151935)"
    ]


def test_router_stats_on_a_dense_model_is_one_line(tiny_chat_model, capsys):
    assert main(["generate", str(tiny_chat_model), "--prompt", "hi", "--router-stats"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --router-stats needs a mixture-of-experts model") and err.count("\n") == 1


def test_router_stats_with_an_adapter_on_the_router(moe_with_tokenizer, tmp_path, capsys):
    """An adapter that adapts the router wraps it in finetune's LoRALinear, which has no ``weight`` of its
    own: counting raised an AttributeError traceback. The counts are the merged model's, as transformers
    routes it."""
    from factories import write_lora_adapter

    adapter = write_lora_adapter(moe_with_tokenizer, tmp_path / "adapter", seed=3, targets=("gate",), std=1.0)
    merged = tmp_path / "merged"
    assert main(["merge", str(moe_with_tokenizer), str(adapter), str(merged)]) == 0
    ids = [(37 * i + 11) % 151000 for i in range(40)]
    want = _hf_routing_counts(merged, ids)
    assert want != _hf_routing_counts(moe_with_tokenizer, ids)  # the adapter changes the routing

    model, _ = load_model(moe_with_tokenizer, dtype="float32", adapter=adapter, progress=False)
    assert LLM(model, tokenizer_for(moe_with_tokenizer)).router_stats(ids).per_layer == want
    capsys.readouterr()
    args = ["generate", str(moe_with_tokenizer), "--adapter", str(adapter), "--router-stats"]
    args += ["--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "2", "--dtype", "float32"]
    assert main(args) == 0
    err = capsys.readouterr().err
    for layer, counts in want.items():
        assert f"layer {layer:3d}: 160 routings" in err and f"counts {counts}" in err


def test_router_stats_while_requests_run_counts_only_its_prompt_and_leaves_them_alone(moe_with_tokenizer):
    """router_stats ran the model in the caller's thread while the engine's thread stepped it: the
    steps' tokens were counted too (and the counter it set on the shared layers switched their path
    mid-step). It now runs between two steps."""
    ids = [(37 * i + 11) % 151000 for i in range(40)]
    llm = LLM(
        load_model(moe_with_tokenizer, dtype="float32", progress=False)[0], tokenizer_for(moe_with_tokenizer)
    )
    want = llm.router_stats(ids).per_layer
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    alone = llm.generate([ids[:7]], params)[0].token_ids
    running = llm.submit(ids[:7], params)
    reader = iter(running)
    next(reader)
    seen = [llm.router_stats(ids).per_layer for _ in range(5)]
    list(reader)
    assert seen == [want] * 5
    assert (running.completion.finish_reason, running.completion.token_ids) == ("length", alone)
    llm.close()
