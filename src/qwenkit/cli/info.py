"""``qwenkit info MODEL``: what a user asks before running a model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from qwenkit.checkpoint import open_checkpoint
from qwenkit.checkpoint.bare import lacks_head
from qwenkit.cli.common import resolve_model
from qwenkit.command_parser import CommandParser
from qwenkit.config import ModelConfig
from qwenkit.distributed import local_config
from qwenkit.errors import CheckpointError
from qwenkit.license import find_license
from qwenkit.memory import format_bytes, kv_cache_bytes, weight_bytes
from qwenkit.rope_scaling import LinearScaling


def describe(path: str, tensor_parallel: int = 1) -> str:
    source = open_checkpoint(path)
    cfg = ModelConfig.from_hf(source.hf_config)
    shard = local_config(cfg, tensor_parallel)  # refuses splits that are not whole heads first
    rope = f"{cfg.rope_theta:g}"
    if (scaling := cfg.rope_scaling) is not None:
        rope += f", {scaling.rope_type} x{scaling.factor:g}"
        if not isinstance(scaling, LinearScaling):
            rope += f" from {scaling.original_max_position_embeddings}"
    if cfg.rotary_dim != cfg.head_dim:
        rope += f", rotary dim {cfg.rotary_dim}"
    headless = lacks_head(source, cfg)  # an embedding model's bare decoder: no head in its files
    params = cfg.num_parameters - (cfg.vocab_size * cfg.hidden_size if headless else 0)
    gqa = " (GQA)" if cfg.num_key_value_heads < cfg.num_attention_heads else ""
    rows = [
        ("family", f"{cfg.family} ({', '.join(cfg.architectures) or 'no architectures field'})"),
        ("hidden size", cfg.hidden_size),
        ("attention heads", cfg.num_attention_heads),
        (
            "key/value heads",
            f"{cfg.num_key_value_heads}{gqa}",
        ),
        ("head dim", cfg.head_dim),
        ("layers", cfg.num_hidden_layers),
        ("FFN width", cfg.intermediate_size),
        ("vocab", cfg.vocab_size),
        ("trained context", _context(cfg)),
        ("RoPE base / scaling", rope),
        *_dual_chunk_row(cfg),
        *_sparse_attention_row(path),
        (
            "dynamic NTK / LogN",
            f"{'on' if cfg.use_dynamic_ntk else 'off'} / {'on' if cfg.use_logn_attn else 'off'}",
        ),
        (
            "qkv bias / q-k norm / tied embeddings",
            f"{_yn(cfg.qkv_bias)} / {_yn(cfg.qk_norm)} / {_yn(cfg.tie_word_embeddings)}",
        ),
        ("parameters", f"{params:,} ({params / 1e9:.2f} B)"),
    ]
    if getattr(source, "rank_token_ids", None):  # a reranker's GGUF (checkpoint.gguf_rank)
        rows.append(("output head", 'none: the rows of "yes" and "no" (cls.output): it reranks only'))
    elif headless:
        rows.append(("output head", "none in the files: it computes embeddings only"))
    if cfg.num_experts:
        rows += _moe_rows(cfg)
    if cfg.quantization:
        rows.append(("quantization", _quantization(cfg.quantization)))
    tensor_types = getattr(source, "tensor_types", None)  # a GGUF file names each tensor's block type
    if tensor_types:
        counts = Counter(tensor_types.values()).most_common()
        rows.append(("GGUF tensor types", ", ".join(f"{kind} x{n}" for kind, n in counts)))
    named = getattr(source, "named_sampling", None)  # a GGUF file's general.sampling.* keys
    if named is not None:
        rows.append(("sampling (the file's)", _sampling(named)))
    elif Path(path).is_dir():
        rows.append(("sampling (generation_config.json)", _directory_sampling(Path(path))))
    width = max(len(k) for k, _ in rows)
    out = [f"model: {path}", ""] + [f"  {k:<{width}}  {v}" for k, v in rows]
    out += ["", "memory of the weights:", *_as_stored(source)]
    for label, dtype, quant in (
        ("float32", torch.float32, None),
        ("bfloat16", torch.bfloat16, None),
        ("int8 (weight-only)", torch.bfloat16, "int8"),
        ("int4 (weight-only)", torch.bfloat16, "int4"),
    ):
        line = f"  {label:<20} {format_bytes(weight_bytes(cfg, dtype, quant, headless=headless)):>12}"
        if cfg.num_experts:
            line += (
                f"   active set per token {format_bytes(weight_bytes(cfg, dtype, quant, True, headless)):>12}"
            )
        out.append(line)
    out.append("KV cache per 1,000 tokens:")
    for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out.append(f"  {label:<20} {format_bytes(kv_cache_bytes(cfg, dtype, 1000)):>12}")
    if tensor_parallel > 1:
        out += [
            "",
            f"memory per rank with --tensor-parallel {tensor_parallel} "
            "(heads, FFN columns and vocabulary split; norms copied):",
        ]
        for label, dtype, quant in (
            ("float32", torch.float32, None),
            ("bfloat16", torch.bfloat16, None),
            ("int8 (weight-only)", torch.bfloat16, "int8"),  # --quantize: each rank rounds its own slices
            ("int4 (weight-only)", torch.bfloat16, "int4"),
        ):
            out.append(
                f"  {label:<20} {format_bytes(weight_bytes(shard, dtype, quant, headless=headless)):>12}"
            )
        out.append("KV cache per 1,000 tokens per rank:")
        for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            out.append(f"  {label:<20} {format_bytes(kv_cache_bytes(shard, dtype, 1000)):>12}")
    lic = find_license(path, getattr(source, "license", None))
    out += ["", "license:"]
    # a GGUF file's license is its general.license key; only a directory's files are looked in
    nowhere = " in the model directory" if Path(path).is_dir() else ": the file has no general.license key"
    out.append(f"  {lic.name}: {lic.terms} (from {lic.source})" if lic else f"  none found{nowhere}")
    return "\n".join(out)


def _sampling(named: dict) -> str:
    """The file's sampling settings, which chat, generate and serve default to as llama.cpp does."""
    if not named:
        return "none named (qwenkit's defaults apply)"
    return ", ".join(f"{k} {v:g}" for k, v in named.items())


def _directory_sampling(model_dir: Path) -> str:
    """The sampling chat, generate and serve default to for a directory: its generation_config.json read as
    they read it (transformers' defaults for what it leaves out, greedy unless do_sample is true), or
    qwenkit's fallback where it has none. A value of the wrong type is refused as loading refuses it."""
    from qwenkit.default_model import FALLBACK_SAMPLING, sampling_with_config
    from qwenkit.tokenizer.base import GENERATION_KEYS
    from qwenkit.tokenizer.loader import check_generation_config, read_json

    file = model_dir / "generation_config.json"
    if not file.is_file():
        return "none in the directory; qwenkit's defaults apply: " + _values(FALLBACK_SAMPLING)
    found = read_json(file)
    check_generation_config(file, found)
    if found.get("do_sample") is not True:
        return "greedy (do_sample is not true)"
    return _values(sampling_with_config({k: found[k] for k in GENERATION_KEYS if found.get(k) is not None}))


def _values(sampling: dict) -> str:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return ", ".join(f"{k} {sampling.get(k, 0):g}" for k in keys)


def _quantization(q: dict) -> str:
    """``gptq 4-bit, group 128, symmetric, no act-order (desc_act false)``: what decides which readers take
    the file. A config qwenkit cannot read shows its raw bits and group, and why."""
    from qwenkit.quant.gptq_format import GPTQConfig, QuantizationError

    try:
        c = GPTQConfig.from_dict(q)
    except QuantizationError as e:
        return (
            f"{q.get('quant_method', '?')} {q.get('bits', '?')}-bit, group {q.get('group_size', '?')} ({e})"
        )
    group = "one group per row" if c.group_size == -1 else f"group {c.group_size}"
    order = {"none": "no act-order", "static": "static act-order", "dynamic": "act-order"}[c.act_order]
    symmetry = "symmetric" if c.sym else "asymmetric"
    line = f"gptq {c.bits}-bit, {group}, {symmetry}, {order} (desc_act {str(c.desc_act).lower()})"
    return line + _per_layer(c.extra)


def _per_layer(extra: dict) -> str:
    """The per-layer settings that override the line above for some layers (readers that ignore them
    read those layers wrongly), or nothing."""
    notes = []
    if extra.get("modules_in_block_to_quantize"):
        notes.append("only modules_in_block_to_quantize quantized")
    if dynamic := extra.get("dynamic"):
        kept = sum(str(pattern).startswith("-:") for pattern in dynamic)
        overridden = len(dynamic) - kept
        if overridden:
            notes.append(f"{overridden} dynamic override{'s' if overridden > 1 else ''}")
        if kept:
            notes.append(f"{kept} dynamic pattern{'s' if kept > 1 else ''} kept float")
    return f"; per layer: {', '.join(notes)}" if notes else ""


def _as_stored(source: object) -> list[str]:
    """The weights' size as the checkpoint stores them: a GGUF file's blocks (which ``chat`` and ``serve``
    run in their own precision) or GPTQ's packed codes. None for a directory with only a config."""
    try:  # a GGUF file counts its blocks; a directory its weight files
        stored = getattr(source, "stored_bytes", None) or source.total_bytes  # type: ignore[attr-defined]
    except CheckpointError:
        return []
    return [f"  {'as stored':<20} {format_bytes(stored):>12}"]


def _moe_rows(cfg: ModelConfig) -> list[tuple[str, object]]:
    """Experts, routing and the parameters a token actually computes with."""
    sparse, layers = cfg.num_sparse_layers, cfg.num_hidden_layers
    dense = _dense_layers(cfg)
    shared = (
        f"width {cfg.shared_expert_intermediate_size}, sigmoid-gated"
        if cfg.shared_expert_intermediate_size
        else "none"
    )
    active = cfg.num_active_parameters
    return [
        (
            "experts",
            f"{cfg.num_experts} routed, top-{cfg.num_experts_per_tok}"
            f"{' renormalized' if cfg.norm_topk_prob else ''}, expert FFN width {cfg.moe_intermediate_size}",
        ),
        ("shared expert", shared),
        (
            "sparse layers",
            f"{sparse} of {layers}" + (f" (dense: {dense})" if dense else ""),
        ),
        ("active parameters per token", f"{active:,} ({active / 1e9:.2f} B)"),
    ]


def _dense_layers(cfg: ModelConfig) -> list[int] | str:
    """A MoE model's dense layers, listed where few, else counted: a loop over every layer of a
    config.json of 2e9 layers never ended."""
    count = cfg.num_hidden_layers - cfg.num_sparse_layers
    if count > 64:
        return f"{count:,} layers"
    if cfg.decoder_sparse_step == 1:  # only mlp_only_layers are dense, however many layers there are
        return sorted(i for i in cfg.mlp_only_layers if 0 <= i < cfg.num_hidden_layers)
    return [i for i in range(cfg.num_hidden_layers) if not cfg.is_sparse_layer(i)]  # (128 at most)


def _context(cfg: ModelConfig) -> str:
    """The trained window, and the longer one the model runs to where dynamic NTK, YaRN or linear
    scaling extends it."""
    trained = str(cfg.max_position_embeddings)
    return (
        trained
        if cfg.max_context == cfg.max_position_embeddings
        else f"{trained} (runs to {cfg.max_context})"
    )


def _dual_chunk_row(cfg: ModelConfig) -> list[tuple[str, str]]:
    """Qwen2.5-1M's dual-chunk attention, which qwenkit does not run (transformers neither; vLLM does)."""
    dca = cfg.dual_chunk_attention
    if dca is None:
        return []
    window = f", trained for {cfg.dual_chunk_window}" if cfg.dual_chunk_window else ""
    keys = ", ".join(f"{k} {dca[k]}" for k in ("chunk_size", "local_size") if k in dca)
    return [("dual-chunk attention", f"not run: full attention{window}" + (f" ({keys})" if keys else ""))]


def _sparse_attention_row(path: str) -> list[tuple[str, str]]:
    """Qwen2.5-1M's sparse_attention_config.json, which qwenkit ignores (vLLM runs it within dual-chunk
    attention)."""
    from qwenkit.checkpoint.side_files import SPARSE_ATTENTION_FILE, sparse_attention_note

    if sparse_attention_note(path) is None:
        return []
    return [("sparse attention", f"not run: {SPARSE_ATTENTION_FILE} ignored, full attention")]


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="qwenkit info", description="Describe a model before running it.")
    parser.add_argument("model", nargs="?", help="model directory or .gguf file (default: the bundled model)")
    parser.add_argument(
        "--tensor-parallel", type=int, default=1, metavar="N", help="also show memory per rank on N ranks"
    )
    args = parser.parse_args(argv)
    print(describe(str(resolve_model(args.model)), args.tensor_parallel))
    return 0
