"""Peak resident memory while loading, against the in-memory model size.

Writes a random checkpoint with the exact Qwen2.5-0.5B shape (bfloat16 safetensors, sharded), then loads
it in fresh subprocesses at several dtypes (bfloat16 also as ``generate`` loads it for inference on the
plain PyTorch path: q/k/v and gate/up stacked into one layer each), and with ``--quantize int8|int4``
(each layer rounded as its weight arrives; also as ``generate``/``chat``/``serve`` load it, on the
kernels with q/k/v and gate/up fused), and reports peak RSS over the interpreter's own baseline
(python with torch and qwenkit's loading code imported, the C++ kernels' library loaded), and of that
peak, the pages of torch's own libraries that the load and the forward ran for the first time (code,
the same for any model size: most of a small model's margin over its weights). Beside the
quantized loads, the old way in the same run: load the float model whole, then quantize it. Builds run
with the prepared-model cache off (``QWENKIT_PREPARED_CACHE=off``; the GGUF header cache as the user has
it); the "from the prepared cache" rows load the same model again from an entry written just before (in a
temporary ``QWENKIT_CACHE``). Also a GPTQ-format int4 checkpoint of the same weights (written once beside
the checkpoint by ``qwenkit quantize --method rtn``). Goal: peak under 1.3 x the model's in-memory size
(for --quantize: the quantized weights).

    .venv/bin/python benchmarks/bench_load.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from shapes import QWEN25_05B  # benchmarks/shapes.py, beside this script

# VmHWM (this process's peak RSS) rather than ru_maxrss, which Linux carries over from the parent on exec.
CHILD = r"""
import sys, time, json
import torch
def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
def torch_code_kib():  # resident pages of torch's own libraries (code run for the first time counts too)
    kib, ours = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            ours = "/torch/lib/" in line
        elif ours and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return kib
from qwenkit.checkpoint import load_model
import qwenkit.checkpoint.gguf, qwenkit.quant.on_load, qwenkit.quant.dense  # code, not data: the baseline
from qwenkit import kernels
kernels.available()  # the C++ kernels' library, loaded (or found missing) once per process
base, code = hwm_kib(), torch_code_kib()
quantize = sys.argv[3] if sys.argv[3] != "-" else None
t = time.perf_counter()
if sys.argv[4] == "dequantize":  # a GGUF file as floats (the old load)
    model, cfg = load_model(sys.argv[1], dtype=sys.argv[2], progress=False, dequantize=True)
elif sys.argv[4] in ("inference", "packed", "packed-cached"):  # as generate/chat load it
    # (inference: under QWENKIT_KERNELS=torch, fused; packed: bf16 packed into the kernels' tiles)
    model, cfg = load_model(sys.argv[1], dtype=sys.argv[2], progress=False, fast_kernels=True)
elif sys.argv[4] == "after":  # the old way: the whole float model, then quantized
    from qwenkit.quant import quantize_for_runtime
    model, cfg = load_model(sys.argv[1], dtype=sys.argv[2], progress=False)
    quantize_for_runtime(model, quantize)
elif sys.argv[4] == "kernels":  # as generate/chat/serve load it: on the kernels, q/k/v and gate/up fused
    model, cfg = load_model(
        sys.argv[1], dtype=sys.argv[2], quantize=quantize, progress=False, fast_kernels=True
    )
else:
    model, cfg = load_model(sys.argv[1], dtype=sys.argv[2], quantize=quantize, progress=False)
dt = time.perf_counter() - t
with torch.no_grad():  # touch every weight: memory-mapped pages count once they are read
    model(torch.tensor([[1, 2, 3]]))
seen, size = set(), 0
for tensor in [*model.parameters(), *model.buffers()]:  # a tied lm_head/embedding counts once
    if tensor.data_ptr() not in seen:
        seen.add(tensor.data_ptr())
        size += tensor.numel() * tensor.element_size()
peak = hwm_kib()
code = torch_code_kib() - code
print(json.dumps({"base_kib": base, "peak_kib": peak, "code_kib": code, "model_bytes": size, "seconds": dt}))
"""


def write_checkpoint(path: Path, config: dict) -> None:
    import torch

    from qwenkit.checkpoint.saver import save_sharded
    from qwenkit.config import ModelConfig
    from qwenkit.model import Transformer

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(config))
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, p in model.named_parameters():
            yield name, (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)

    save_sharded(tensors(), path, shard_bytes=300 * 10**6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "qwen2.5-0.5b-shape"
        if not (path / "config.json").exists():
            write_checkpoint(path, QWEN25_05B)
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"checkpoint: Qwen2.5-0.5B shape, {disk / 2**20:.0f} MiB of bfloat16 safetensors\n")
        peak = "peak RSS over interpreter (load + 1 forward)"
        print(f"| load | model in memory | {peak} | ratio | {CODE} | load time |")
        print("|---|---|---|---|---|---|")
        runs = [
            ("bfloat16", "-", "-"),
            ("bfloat16", "-", "inference"),
            ("bfloat16", "-", "packed"),
            ("bfloat16", "-", "packed-cached"),
            ("float32", "-", "-"),
            ("bfloat16", "int8", "on-load"),
            ("bfloat16", "int8", "kernels"),
            ("bfloat16", "int8", "after"),
            ("bfloat16", "int4", "on-load"),
            ("bfloat16", "int4", "kernels"),
            ("bfloat16", "int4", "after"),
            ("bfloat16", "int8", "cached"),
            ("bfloat16", "int4", "cached"),
        ]
        for dtype, quantize, how in runs:
            label = dtype if quantize == "-" else f"--quantize {quantize} ({dtype} activations)"
            if how == "after":
                label = f"{label}: float load, then quantize (before)"
            if how == "cached":
                label = f"{label}, from the prepared cache"
            if how == "inference":
                label = f"{label}, inference load on the plain PyTorch path (q/k/v and gate/up stacked)"
            if how == "packed":
                label = f"{label}, inference load on the kernels (packed into their tiles, fused)"
            if how == "kernels":
                label = f"{label}, as generate/chat/serve load it (on the kernels, fused)"
            if how == "packed-cached":
                label = f"{label}, inference load on the kernels, from the prepared cache"
            print(row(label, path, dtype, quantize, how))
        gptq = path.with_name(path.name + "-gptq-int4")
        if not (gptq / "config.json").exists():  # a GPTQ-format int4 checkpoint of the same weights (RTN)
            exe = str(Path(sys.executable).with_name("qwenkit"))
            cmd = [exe, "quantize", str(path), str(gptq), "-q", "--method", "rtn", "--bits", "4"]
            subprocess.run(cmd, check=True, capture_output=True)
        label = "GPTQ int4 checkpoint (written by `qwenkit quantize --method rtn`)"
        print(row(label, gptq, "bfloat16", "-", "-"))
        print(row("GPTQ int4 checkpoint, as generate/chat/serve load it", gptq, "bfloat16", "-", "packed"))
        print(row("GPTQ int4 checkpoint, from the prepared cache", gptq, "bfloat16", "-", "cached"))
        from qwenkit.default_model import default_model_path

        gguf = default_model_path()
        print(f"\nthe bundled {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB file)\n")
        print(f"| load | model in memory | peak RSS over interpreter | ratio | {CODE} | load time |")
        print("|---|---|---|---|---|---|")
        print(row("in the file's precision (Q4_1/Q8_0 codes; default)", gguf, "bfloat16", "-", "-"))
        print(row("--gguf-dequantize (bfloat16 floats, the old load)", gguf, "bfloat16", "-", "dequantize"))
        print(row("in the file's precision, from the prepared cache", gguf, "bfloat16", "-", "cached"))


CODE = "of which torch's code, first run"


def row(label: str, path: Path, dtype: str, quantize: str, how: str) -> str:
    """One table row: load ``path`` in a fresh process and measure it (``cached``: after a first load
    that writes the prepared-model cache, in another fresh process)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "QWENKIT_PREPARED_CACHE": "off"}  # the GGUF header cache stays the user's
        if how in ("cached", "packed-cached"):
            env |= {"QWENKIT_CACHE": cache, "QWENKIT_PREPARED_CACHE": "on"}
        if how == "inference":
            env["QWENKIT_KERNELS"] = "torch"  # the path of CPUs without the kernels (and like CUDA's)
        cmd = [sys.executable, "-c", CHILD, str(path), dtype, quantize, how]
        if how in ("cached", "packed-cached"):
            subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    over = (r["peak_kib"] - r["base_kib"]) * 1024
    return (
        f"| {label} | {r['model_bytes'] / 2**20:.0f} MiB | {over / 2**20:.0f} MiB | "
        f"{over / r['model_bytes']:.2f}x | {r['code_kib'] / 1024:.0f} MiB | {r['seconds']:.2f} s |"
    )


if __name__ == "__main__":
    main()
