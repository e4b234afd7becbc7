"""The model card's speed and memory row on a GPU: the Qwen2.5-7B shape in bfloat16, int8 and int4.

The Qwen-7B model card measures batch-1 generation from a 1-token context on one A100 (BF16 40.93
tokens/s, Int8 37.47, Int4 50.09; peak memory 16.99, 11.20 and 8.21 GB). This script builds random
bfloat16 weights of the Qwen2.5-7B shape on the GPU, quantizes them as ``--quantize int8|int4`` does
(round-to-nearest, decoder layers at that width, the output head at int8), fuses what
``load_model`` fuses, and decodes through the engine with CUDA graphs, printing per precision: the kernel
the layers run on, tokens/s (median of several rounds), weight memory and peak memory during the
decode. Correctness per precision: one layer's product against its dequantized weight in float32, and
the whole model's teacher-forced logits against the bfloat16 model's (top-1 agreement, relative error).

    PYTHONPATH=src python3 benchmarks/bench_cuda_quant.py                        # CUDA, ~2 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_cuda_quant.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_cuda_decode import TINY, build_model, graph_note, measure_bandwidth, say, sync  # noqa: E402
from shapes import QWEN25_7B  # noqa: E402

from qwenkit.engine import Engine, SamplingParams  # noqa: E402
from qwenkit.quant import quantize_for_runtime  # noqa: E402
from qwenkit.quant.fused import fuse_for_inference  # noqa: E402
from qwenkit.quant.kernels.triton_affine import affine_int8_matmul  # noqa: E402
from qwenkit.quant.linear import QuantizedLinear  # noqa: E402

PRECISIONS = ("bf16", "int8", "int8-dequant", "int4")  # int8-dequant: int8 without the Triton kernel
# Qwen-7B model card (A100-SXM4-80G, batch 1, 1-token context, 2048 new tokens): tokens/s, peak GB
MODEL_CARD = {"bf16": (40.93, 16.99), "int8": (37.47, 11.20), "int4": (50.09, 8.21)}
# the Qwen2.5-7B layer shapes a decode step multiplies (fused q/k/v, o, fused gate/up, down, the head)
LAYER_SHAPES = {
    "qkv": (4608, 3584),
    "o": (3584, 3584),
    "gate_up": (37888, 3584),
    "down": (3584, 18944),
    "lm_head": (152064, 3584),
}


def prepared_model(shape: dict, precision: str, device: torch.device):
    """Random bf16 weights, quantized as ``--quantize`` does ("int8-dequant": with the Triton kernel off)
    and fused as ``load_model`` fuses them."""
    model = build_model(shape, torch.bfloat16, device)
    if precision != "bf16":
        width, _, variant = precision.partition("-")
        previous = os.environ.get("QWENKIT_TRITON")
        os.environ["QWENKIT_TRITON"] = "0" if variant == "dequant" else "1"
        try:
            quantize_for_runtime(model, width)
        finally:
            if previous is None:
                del os.environ["QWENKIT_TRITON"]
            else:
                os.environ["QWENKIT_TRITON"] = previous
    fuse_for_inference(model)
    return model


SWEEP = {  # column name -> affine_int8_matmul's tile arguments ({}: its defaults, ``tiles``)
    "default": {},
    "split 2": {"split_k": 2},
    "split 4": {"split_k": 4},
    "n16 w2": {"block_n": 16, "num_warps": 2},
    "n32 w4": {"block_n": 32, "num_warps": 4},
    "n64 w4": {"block_n": 64, "num_warps": 4},
    "n32 w4 split 2": {"block_n": 32, "num_warps": 4, "split_k": 2},
}


def sweep(device: torch.device, rows: int, bandwidth: float) -> bool:
    """The Triton int8 kernel's tile choices on each 7B layer shape, per-channel int8, ``rows`` rows:
    microseconds (median of CUDA-event timings) and the share of the copy bandwidth its bytes take;
    each result checked against the dequantized weight (False if any is off)."""
    import triton.testing

    print(f"\nTriton int8 tiles, {rows} row(s), per-channel groups; us and share of copy bandwidth:")
    print("| layer | " + " | ".join(SWEEP) + " |")
    print("|---|" + "---:|" * len(SWEEP))
    ok = True
    for name, (n, k) in LAYER_SHAPES.items():
        codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, device=device)
        scale = torch.rand(1, n, device=device) * 0.01
        shift = -128 * scale
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        ref = F.linear(
            x.float(),
            (codes.float() * scale.T.bfloat16().float() + shift.T.bfloat16().float()).bfloat16().float(),
        )
        cells = []
        for tile_args in SWEEP.values():
            try:
                run = functools.partial(affine_int8_matmul, x, codes, scale, shift, k, **tile_args)
                error = float((run().float() - ref).norm() / ref.norm())
                us = 1000 * triton.testing.do_bench(run, warmup=5, rep=40, return_mode="median")
                cells.append(f"{us:.0f} ({n * k / (us * 1e-6) / bandwidth:.0%})")
                if not error < 1e-2:
                    cells[-1] += f" ERROR {error:.1e}"
                    ok = False
            except Exception as e:  # a tile the compiler refuses
                cells.append(type(e).__name__)
        print(f"| {name} {n}x{k} | " + " | ".join(cells) + " |")
    return ok


def kernels_used(model) -> str:
    counts = Counter(m.kernel for m in model.modules() if isinstance(m, QuantizedLinear))
    return "; ".join(f"{n} x {name}" for name, n in counts.most_common()) or "bf16 nn.Linear"


def resident_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (the weights a decode step reads, and the embedding)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def layer_error(model, device: torch.device) -> float | None:
    """The largest, over the first layer's q/k/v and down products and the output head, of a quantized
    layer's error against its own weight as its kernel rounds it: ||y - x W^T|| / ||x W^T||, summed in
    float32. None when no layer is quantized."""
    block = model.model.layers[0]
    layers = [getattr(block.self_attn, "qkv_proj", None), block.mlp.down_proj, model.lm_head]
    errors = []
    for layer in layers:
        if not isinstance(layer, QuantizedLinear):
            continue
        x = torch.randn(3, layer.in_features, device=device, dtype=torch.bfloat16)
        ref = F.linear(x.float(), layer.impl.dequantize(torch.bfloat16).float())
        if layer.bias is not None:
            ref = ref + layer.bias.float()
        errors.append(float((layer(x).float() - ref).norm() / ref.norm()))
    return max(errors) if errors else None


def decode_rate(model, new_tokens: int, rounds: int) -> tuple[list[float], float, str]:
    """tokens/s of each round (batch 1, 1-token prompt, greedy), peak bytes allocated, and whether the
    steps ran as captured CUDA graphs."""
    vocab = model.config.vocab_size
    engine = Engine(model, max_batch_size=1, max_seq_len=new_tokens + 16)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    rates = []
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for round_ in range(rounds + 1):  # the first round warms up (and captures)
        engine.add_request([(round_ * 7919 + 1) % vocab], params)
        engine.step()  # the prompt
        sync(engine.device)
        start, tokens = time.perf_counter(), 0
        while engine.has_unfinished():
            tokens += sum(len(out.new_token_ids) for out in engine.step())
        sync(engine.device)
        if round_:
            rates.append(tokens / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() if engine.device.type == "cuda" else 0
    return rates, peak, graph_note(engine)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--new-tokens", type=int, default=512, help="the model card generates 2048")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="also time the Triton int8 kernel's tile choices")
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = TINY if args.tiny else QWEN25_7B
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"torch {torch.__version__} on {where}; {'tiny' if args.tiny else 'Qwen2.5-7B'} shape")
    bandwidth = measure_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    say(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    vocab = shape["vocab_size"]
    ids = torch.tensor([[(i * 131 + 7) % vocab for i in range(args.check_tokens)]], device=device)
    reference = None
    rows, ok = [], True
    for precision in args.precisions.split(","):
        try:
            t = time.perf_counter()
            model = prepared_model(shape, precision, device)
            sync(device)
            say(f"{precision}: prepared in {time.perf_counter() - t:.1f}s; {kernels_used(model)}")
            with torch.inference_mode():
                logits = model(ids)[0].float()
                if reference is None:
                    reference = logits  # the first precision (bf16) is the reference
                agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
                rel = float((logits - reference).norm() / reference.norm())
                layer = layer_error(model, device)
            rates, peak, graphs = decode_rate(model, args.new_tokens, args.rounds)
            weights = resident_bytes(model)
            layer_note = f"{layer:.2e}" if layer is not None else "-"
            say(
                f"{precision}: {[round(r, 1) for r in rates]} tokens/s; weights {weights / 1e9:.2f} GB, "
                f"peak {peak / 1e9:.2f} GB; top-1 agreement with bf16 {agree:.1%}, logits error {rel:.3f}, "
                f"layer error {layer_note}; {graphs}"
            )
            if layer is not None and not layer < 1e-2:
                say(f"FAIL {precision}: the layer's product is off its dequantized weight by {layer:.2e}")
                ok = False
            rows.append((precision, statistics.median(rates), weights, peak, agree, rel, layer_note))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception:
            say(f"{precision}: ERROR\n{traceback.format_exc()}")
            ok = False
    print()
    print(f"Batch-1 decode, 1-token prompt + {args.new_tokens} new tokens, greedy, CUDA graphs ({where}):")
    print()
    print(
        "| precision | tokens/s | model card A100 tokens/s | weights GB | peak GB | model card peak GB "
        "| top-1 agreement with bf16 | logits error vs bf16 | largest layer error vs its own weight |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for precision, rate, weights, peak, agree, rel, layer_note in rows:
        card_rate, card_peak = MODEL_CARD[precision.partition("-")[0]]
        sizes = f"{weights / 1e9:.2f} | {peak / 1e9:.2f} | {card_peak}"
        print(
            f"| {precision} | {rate:.1f} | {card_rate} | {sizes} | {agree:.1%} | {rel:.3f} | {layer_note} |"
        )
    if args.sweep and device.type == "cuda":
        ok = sweep(device, 1, bandwidth) and ok
    print(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
