"""Decode speed of the Qwen2.5-7B shape on a CUDA GPU, CUDA graphs on and off, through the real engine.

Random bfloat16 weights are built directly on the GPU (no checkpoint file), twice: with the checkpoint's
separate q/k/v and gate/up layers, and fused into one product each as ``load_model`` prepares a model
for inference (``quant.fused``; what ``generate``, ``chat`` and ``serve`` run). For batch 1, 4 and 16 it
decodes 128 new tokens after a 16-token prompt through ``Engine.step`` with CUDA graphs (the default on
CUDA) and without (``cuda_graphs=False``: the eager engine path), both layouts, all four alternating,
several rounds, and prints the median aggregate tokens/s beside the bandwidth limit measured in the same
run (device copy bandwidth / weight bytes read per step). Then correctness, on the fused model: greedy
tokens with graphs equal those of the same static step run eagerly, and those of the eager engine path
(float32 at the 7B width; in bfloat16 a difference is allowed only where the top two logits are a near
tie); and the fused model's greedy tokens against the separate layers' (a near tie allowed in both
dtypes: the stacked product may sum in another order). Each configuration catches and prints its own
errors; every loop is bounded, and a watchdog ends the run if a kernel hangs.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_cuda_decode.py                       # CUDA, ~3 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_cuda_decode.py --device cpu --tiny   # the logic, CPU

On a CPU (``--device cpu --tiny``, a 2-layer model of the same head layout) "graphs on" runs the same
static-shape step without capture: everything but the capture itself is exercised.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))  # this checkout's qwenkit even without PYTHONPATH

import torch  # noqa: E402
from shapes import QWEN25_7B  # noqa: E402

from qwenkit.config import ModelConfig  # noqa: E402
from qwenkit.engine import Engine, SamplingParams  # noqa: E402
from qwenkit.model import Transformer  # noqa: E402
from qwenkit.model.rope import inv_freq  # noqa: E402
from qwenkit.quant.fused import fuse_for_inference  # noqa: E402

# Same head layout as the 7B (7 query heads per KV head, head_dim 16 here), small enough for a CPU.
TINY = {
    **QWEN25_7B,
    "vocab_size": 512,
    "hidden_size": 112,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 7,
    "num_key_value_heads": 1,
    "eos_token_id": 1,
}
MODEL_CARD_A100_BF16 = 40.9  # Qwen-7B model card, tokens/s, batch 1, BF16 on an A100
LAYOUTS = ("separate", "fused")
MODES = ("off", "on")  # CUDA graphs
START = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - START:6.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(
    shape: dict, dtype: torch.dtype, device: torch.device, layers: int | None = None
) -> Transformer:
    """Random weights made on the device in ``dtype`` (nn.Linear's own init: activations stay finite)."""
    config = ModelConfig.from_hf({**shape, "num_hidden_layers": layers or shape["num_hidden_layers"]})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    model.rotary.inv_freq = inv_freq(config).to(device)  # as the loader computes it
    return model.eval().requires_grad_(False)


def fused_copy(model: Transformer) -> Transformer:
    """The same weights with q/k/v and gate/up fused, as ``load_model`` prepares an inference model."""
    fused = copy.deepcopy(model)
    count = fuse_for_inference(fused)
    say(f"fused copy: {count} projections fused")
    return fused


def measure_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (each byte read once, written once)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    rounds = 10
    start = time.perf_counter()
    for _ in range(rounds):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * rounds / (time.perf_counter() - start)


def decode_bytes(model: Transformer) -> int:
    """Weight bytes one decode step reads: every parameter but the embedding table (one row per token)."""
    embed = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def prompts_for(batch: int, length: int, vocab: int, salt: int = 0) -> list[list[int]]:
    return [[(salt * 7919 + row * 131 + i * 17 + 1) % vocab for i in range(length)] for row in range(batch)]


def check_prompts(vocab: int) -> list[list[int]]:
    """Four prompts of different lengths (batched, padded to 4 rows), one crossing the 256-token bucket."""
    return [prompts_for(1, n, vocab, salt=n)[0] for n in (5, 23, 40, 240)]


def generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, int]:
    """Greedy tokens per prompt; decode seconds and tokens counted from the step after every row has its
    first token (the prefill) to the end."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outs: dict[object, list[int]] = {i: [] for i in ids}
    started, counted = None, 0
    limit = max(len(p) for p in prompts) * len(prompts) + new_tokens + 32
    for _ in range(limit):  # bounded: a stuck engine fails, never hangs
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id}: {out.error}")
            outs[out.request_id] += out.new_token_ids
        if started is None and all(outs[i] for i in ids):
            sync(engine.device)
            started, counted = time.perf_counter(), sum(len(t) for t in outs.values())
    else:
        raise RuntimeError(f"the engine did not finish within {limit} steps")
    sync(engine.device)
    seconds = time.perf_counter() - started if started is not None else float("nan")
    return [outs[i] for i in ids], seconds, sum(len(t) for t in outs.values()) - counted


def graph_note(engine: Engine) -> str:
    graphs = engine.decode_graphs
    if graphs is None:
        return "static path off"
    if graphs.disabled:
        return f"CAPTURE FAILED ({graphs.disabled})"
    kind = "captured" if graphs.capture else "eager static step (no capture)"
    return f"{kind}: {sorted(graphs.graphs) if graphs.capture else sorted(graphs.shapes_run)}"


def speed(args, models: dict[str, Transformer], device: torch.device, deadline: float) -> dict:
    """Median tokens/s per (batch, layout, graphs on/off)."""
    max_batch = max(args.batches)
    seq = args.prompt_len + args.new_tokens + 16
    engines = {
        (layout, mode): Engine(
            models[layout], max_batch_size=max_batch, max_seq_len=seq, cuda_graphs=mode == "on"
        )
        for layout in LAYOUTS
        for mode in MODES
    }
    rates: dict[tuple[int, str, str], list[float]] = {}
    vocab = models["fused"].config.vocab_size
    for batch in args.batches:
        for (layout, mode), engine in engines.items():
            where = f"batch {batch:2d} {layout:8s} graphs {mode:3s}"
            try:
                t = time.perf_counter()
                generate(engine, prompts_for(batch, args.prompt_len, vocab), 8)  # warm-up (and capture)
                say(f"{where}: warm-up {time.perf_counter() - t:.1f}s; {graph_note(engine)}")
            except Exception:
                say(f"{where}: warm-up ERROR\n{traceback.format_exc()}")
        for round_ in range(args.rounds):
            if time.monotonic() > deadline:
                say(f"batch {batch}: time budget spent, skipping the remaining rounds")
                break
            order = list(engines.items())  # alternating, both orders: drift does not favour one
            for (layout, mode), engine in order if round_ % 2 == 0 else order[::-1]:
                where = f"batch {batch:2d} {layout:8s} graphs {mode:3s} round {round_ + 1}"
                try:
                    prompts = prompts_for(batch, args.prompt_len, vocab, salt=round_ + 1)
                    _, seconds, tokens = generate(engine, prompts, args.new_tokens)
                    rate = tokens / seconds
                    rates.setdefault((batch, layout, mode), []).append(rate)
                    step_ms = 1000 * seconds * batch / tokens
                    say(
                        f"{where}: {tokens} tokens in {seconds:.2f}s = {rate:8.1f} tokens/s, "
                        f"{step_ms:.2f} ms/step"
                    )
                except Exception:
                    say(f"{where}: ERROR\n{traceback.format_exc()}")
    say(f"fused graphs-on engine: {graph_note(engines['fused', 'on'])}")
    return {key: statistics.median(values) for key, values in rates.items()}


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def compare(
    name: str,
    model: Transformer,
    reference: Engine,
    candidate: Engine,
    prompts,
    new_tokens: int,
    near_tie: bool,
) -> bool:
    """Greedy tokens of two engines on the same prompts (batched together); print PASS or FAIL.

    near_tie: a difference passes if, at the first differing token, the two choices' logits (a
    no-cache forward of the common prefix) are within 0.1 standard deviations of that logits row.
    """
    try:
        expected, _, _ = generate(reference, prompts, new_tokens)
        got, _, _ = generate(candidate, prompts, new_tokens)
        verdicts = []
        for prompt, a, b in zip(prompts, expected, got, strict=True):
            at = first_difference(a, b)
            if at is None and len(a) == len(b):
                verdicts.append(("identical", True))
                continue
            if not near_tie or at is None:
                verdicts.append((f"differ at token {at}: {a[at : at + 4]} vs {b[at : at + 4]}", False))
                continue
            with torch.inference_mode():
                ids = torch.tensor([prompt + a[:at]], device=reference.device)
                row = model(ids)[0, -1].float()
            margin, spread = float((row[a[at]] - row[b[at]]).abs()), float(row.std())
            ok = margin <= 0.1 * spread
            verdicts.append((f"differ at token {at}, top-two margin {margin:.4f} (row std {spread:.3f})", ok))
        passed = all(ok for _, ok in verdicts)
        detail = "; ".join(
            f"prompt {i} ({len(p)} tok): {v}"
            for i, (p, (v, _)) in enumerate(zip(prompts, verdicts, strict=True))
        )
        say(f"{'PASS' if passed else 'FAIL'} {name}: {detail}")
        return passed
    except Exception:
        say(f"FAIL {name}: ERROR\n{traceback.format_exc()}")
        return False


def correctness(model: Transformer, args, near_tie: bool, label: str) -> list[bool]:
    """Greedy tokens with graphs against the same step uncaptured, and against the eager engine path."""
    prompts = check_prompts(model.config.vocab_size)
    kwargs = dict(max_batch_size=4, max_seq_len=320)
    results = []
    graphs = Engine(model, cuda_graphs=True, **kwargs)
    static = Engine(model, cuda_graphs=True, **kwargs)
    if static.decode_graphs is not None:
        static.decode_graphs.capture = False  # the same static step, run eagerly
    results.append(
        compare(
            f"{label}: graphs vs the same step uncaptured",
            model,
            static,
            graphs,
            prompts,
            args.check_tokens,
            False,
        )
    )
    say(f"  graphs engine: {graph_note(graphs)}")
    eager = Engine(model, cuda_graphs=False, **kwargs)
    results.append(
        compare(
            f"{label}: graphs vs the eager engine path",
            model,
            eager,
            graphs,
            prompts,
            args.check_tokens,
            near_tie,
        )
    )
    return results


def layouts_agree(models: dict[str, Transformer], args, label: str) -> bool:
    """Greedy tokens of the fused model against the separate layers' (eager engines, near ties allowed)."""
    prompts = check_prompts(models["fused"].config.vocab_size)
    engines = [
        Engine(models[layout], cuda_graphs=False, max_batch_size=4, max_seq_len=320) for layout in LAYOUTS
    ]
    name = f"{label}: fused q/k/v and gate/up vs separate layers"
    return compare(name, models["separate"], *engines, prompts, args.check_tokens, True)


def transformers_rate(shape: dict, device: torch.device, prompt_len: int, new_tokens: int) -> float:
    """The peer: transformers' own ``generate`` (eager, its default cache), batch 1, same shape and dtype;
    tokens/s over the whole call (the 16-token prefill is a small part of it)."""
    import transformers

    config = transformers.Qwen2Config(**{k: v for k, v in shape.items() if k != "architectures"})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    ids = torch.tensor(prompts_for(1, prompt_len, shape["vocab_size"]), device=device)
    settings = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **settings)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        sync(device)
    seconds = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) / seconds


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def table(args, rates: dict, limit_rate: float | None) -> str:
    lines = [
        "| batch | separate, graphs off | separate, graphs on | fused, graphs off | fused, graphs on "
        "| fused vs separate (graphs on) | fused graphs on, per row | bandwidth limit per row "
        "| fraction of limit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cell = lambda v: f"{v:.1f}" if v is not None else "error"  # noqa: E731
    for batch in args.batches:
        got = {(layout, mode): rates.get((batch, layout, mode)) for layout in LAYOUTS for mode in MODES}
        best, before = got["fused", "on"], got["separate", "on"]
        gain = f"{best / before:.2f}x" if best and before else "-"
        per_row = best / batch if best else None
        limit = f"{limit_rate:.0f}" if limit_rate else "-"
        frac = f"{per_row / limit_rate:.0%}" if per_row and limit_rate else "-"
        speeds = " | ".join(cell(got[key]) for key in got)
        lines.append(f"| {batch} | {speeds} | {gain} | {cell(per_row)} | {limit} | {frac} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same head layout (CPU check)")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' generate (the peer)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds before remaining rounds are skipped")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    faulthandler.dump_traceback_later(args.budget + 30, exit=True)  # a hung kernel still ends the run
    deadline = START + args.budget - 60  # leave time for the correctness checks
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        say("FAIL: --device cuda but torch sees no CUDA device (use --device cpu --tiny for the CPU check)")
        return 2
    shape = TINY if args.tiny else QWEN25_7B
    name = "tiny (Qwen2.5-7B head layout)" if args.tiny else "Qwen2.5-7B"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {where}; model {name}, bfloat16")
    passed: list[bool] = []
    rates: dict = {}
    limit_rate = None
    try:
        bandwidth = measure_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
        say(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s")
        t = time.perf_counter()
        model = build_model(shape, torch.bfloat16, device)
        sync(device)
        weights = decode_bytes(model)
        limit_rate = bandwidth / weights
        say(
            f"built the model in {time.perf_counter() - t:.1f}s: {weights / 1e9:.2f} GB read per step, "
            f"bandwidth limit {limit_rate:.0f} tokens/s per row"
        )
        models = {"separate": model, "fused": fused_copy(model)}
        rates = speed(args, models, device, deadline)
        passed += correctness(models["fused"], args, near_tie=True, label="bfloat16")
        passed.append(layouts_agree(models, args, "bfloat16"))
        del model, models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception:
        say(f"ERROR in the bfloat16 runs\n{traceback.format_exc()}")
        passed.append(False)
    try:
        layers = 2 if args.tiny else 4
        model32 = build_model(shape, torch.float32, device, layers=layers)
        say(f"float32 check model: {layers} layers at the shape's full width")
        models32 = {"separate": model32, "fused": fused_copy(model32)}
        passed += correctness(models32["fused"], args, near_tie=False, label="float32")
        passed.append(layouts_agree(models32, args, "float32"))
        del model32, models32
    except Exception:
        say(f"ERROR in the float32 check\n{traceback.format_exc()}")
        passed.append(False)
    peer = None
    if time.monotonic() < START + args.budget - 30 and not args.no_peer:
        try:
            peer = transformers_rate(shape, device, args.prompt_len, args.new_tokens)
            say(f"peer: transformers generate, batch 1: {peer:.1f} tokens/s")
        except Exception:
            say(f"peer (transformers) ERROR\n{traceback.format_exc()}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        say("peer (transformers) skipped")
    faulthandler.cancel_dump_traceback_later()
    print()
    print(
        f"Decode, {name}, bfloat16, {args.prompt_len}-token prompt + {args.new_tokens} new tokens, "
        f"greedy, median of up to {args.rounds} rounds, aggregate tokens/s over all rows ({where}):"
    )
    print()
    print(table(args, rates, limit_rate))
    print()
    if peer is not None:
        version = _version("transformers")
        print(f"Peer, same run: transformers {version} generate (eager, bf16), batch 1: {peer:.1f} tokens/s.")
    print(
        f"Reference: the Qwen-7B model card gives {MODEL_CARD_A100_BF16} tokens/s (batch 1, BF16, A100). "
        "Target: >= 150 tokens/s at batch 1, fused, graphs on (H100/H200)."
    )
    verdict = "PASS" if passed and all(passed) else "FAIL"
    print(f"correctness: {verdict} ({sum(passed)}/{len(passed)} checks passed)")
    say("done")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
