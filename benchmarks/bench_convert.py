"""Peak resident memory and time of ``qwenkit convert --to qwen2`` on a multi-GB Qwen v1 checkpoint.

Writes a synthetic Qwen v1 checkpoint with the exact Qwen-1.8B shape (float16, ~3.7 GB in 1 GB shards),
converts it in a fresh subprocess and reports peak RSS against the streaming budget: the largest source
shard (its memory-mapped pages) plus one output shard, over the interpreter's own baseline (python +
torch + qwenkit imported). Everything is deleted afterwards unless --keep is given.

    .venv/bin/python benchmarks/bench_convert.py [--layers 24] [--shard-size 1GB] [--out-shard-size 1GB]
                                                 [--dtype bfloat16] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Qwen-1.8B (qwen_facts §1.2): 2048 wide, 16 heads, FFN 5504 (stored doubled), 151936 vocab, 24 layers.
QWEN_1_8B = {
    "model_type": "qwen",
    "architectures": ["QWenLMHeadModel"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "intermediate_size": 11008,
    "kv_channels": 128,
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "seq_length": 8192,
    "max_position_embeddings": 8192,
    "layer_norm_epsilon": 1e-6,
    "no_bias": True,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "tie_word_embeddings": False,
}

# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so it would report the writer's peak.
CHILD = r"""
import json, re, sys, time
import torch
import qwenkit.convert.v1_to_qwen2
from qwenkit.cli.convert import main

def hwm_kib():
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))

base = hwm_kib()
t = time.perf_counter()
rc = main(sys.argv[1:])
dt = time.perf_counter() - t
print(json.dumps({"rc": rc, "base_kib": base, "peak_kib": hwm_kib(), "seconds": dt}))
"""


def v1_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["vocab_size"]
    shapes = [("transformer.wte.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes += [
            (p + "ln_1.weight", (h,)),
            (p + "attn.c_attn.weight", (3 * h, h)),
            (p + "attn.c_attn.bias", (3 * h,)),
            (p + "attn.c_proj.weight", (h, h)),
            (p + "ln_2.weight", (h,)),
            (p + "mlp.w1.weight", (f, h)),
            (p + "mlp.w2.weight", (f, h)),
            (p + "mlp.c_proj.weight", (h, f)),
        ]
    return [*shapes, ("transformer.ln_f.weight", (h,)), ("lm_head.weight", (v, h))]


def write_v1_checkpoint(path: Path, cfg: dict, shard_bytes: int) -> list[int]:
    """float16 tensors tiled from one small random block (fast to make, not compressible to zero pages),
    written shard by shard so the writer holds one shard at a time."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in v1_shapes(cfg):
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            n = math.prod(shape)
            tensors[name] = block.repeat(-(-n // block.numel()))[:n].view(shape).clone()
            total += 2 * n
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, fname)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return [(path / f).stat().st_size for f in sorted(set(weight_map.values()))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: Qwen-1.8B, ~3.7 GB)")
    parser.add_argument("--shard-size", default="1GB", help="source shard size")
    parser.add_argument("--out-shard-size", default="1GB", help="output shard size (--shard-size of convert)")
    parser.add_argument("--dtype", help="also cast (bfloat16, float16, float32); default keeps float16")
    parser.add_argument("--dir", help="where to write (default: a temporary directory under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()

    from qwenkit.checkpoint.saver import parse_size

    cfg = {**QWEN_1_8B, "num_hidden_layers": args.layers}
    if args.dir:  # mkdtemp needs its parent to exist
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.dir))
    try:
        t = time.perf_counter()
        shard_sizes = write_v1_checkpoint(root / "src", cfg, parse_size(args.shard_size))
        print(f"wrote the source in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        cmd = [
            str(root / "src"),
            str(root / "out"),
            "--to",
            "qwen2",
            "--shard-size",
            args.out_shard_size,
            "--no-progress",
        ]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, *cmd], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        out_shards = sorted((root / "out").glob("*.safetensors"))
        out_sizes = [p.stat().st_size for p in out_shards]
        out_shard_bytes = parse_size(args.out_shard_size)
        base, peak = stats["base_kib"] * 1024, stats["peak_kib"] * 1024
        budget = max(shard_sizes) + out_shard_bytes
        rows = [
            ("model shape", f"Qwen-1.8B v1, {args.layers} layers, float16 -> {args.dtype or 'float16'}"),
            ("source total", f"{sum(shard_sizes) / 1e9:.2f} GB in {len(shard_sizes)} shards"),
            ("largest source shard", f"{max(shard_sizes) / 1e9:.2f} GB"),
            (
                "output",
                f"{sum(out_sizes) / 1e9:.2f} GB in {len(out_sizes)} shards "
                f"(--shard-size {args.out_shard_size})",
            ),
            ("interpreter baseline RSS", f"{base / 2**30:.2f} GiB"),
            ("peak RSS", f"{peak / 2**30:.2f} GiB"),
            ("peak RSS over baseline", f"{(peak - base) / 1e9:.2f} GB"),
            ("budget: largest shard + output shard", f"{budget / 1e9:.2f} GB"),
            ("within budget", "yes" if peak - base <= budget else "NO"),
            ("time", f"{stats['seconds']:.1f} s ({sum(shard_sizes) / 1e6 / stats['seconds']:.0f} MB/s)"),
        ]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
        return 0 if peak - base <= budget else 1
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
