"""Does llama.cpp read the checkpoints qwenkit writes? One run, not a test (the suite has no llama.cpp).

The usual next step after ``qwenkit merge`` (or a full fine-tune, or ``qwenkit convert``) is llama.cpp's
``convert_hf_to_gguf.py``, then llama.cpp or Ollama. This script makes small random models through
qwenkit's writers, from the test factories (Qwen2 and Qwen3 with the real Qwen3 tokenizer, tied
embeddings, Qwen2-MoE and Qwen3-MoE, each with a LoRA adapter merged by ``merge``; ``merge --dtype
bfloat16``; a Qwen v1 checkpoint with ``qwen.tiktoken`` converted by ``convert --to qwen2``; the bundled
SmolLM2 GGUF converted by ``convert --to hf``; ``quantize --method rtn`` int4 and int8, which the
converter dequantizes from the GPTQ layout), runs llama.cpp's converter on each output directory, and
checks the GGUF it writes:

- metadata: the chat template, eos id and vocabulary size are the directory's own;
- logits of a chat-templated prompt and 8 greedy tokens, against transformers' ``from_pretrained`` on the
  directory (qwenkit's loader for the GPTQ outputs, which transformers cannot load without optimum), by
  qwenkit's GGUF loader and by llama.cpp itself (llama-cpp-python over the built ``libllama.so``).

Prints one row per model and GGUF type: converter accepted, max |logit difference| (qwenkit GGUF,
llama.cpp) relative to the largest reference logit, and whether the greedy tokens agree.

On 2026-12-07 (llama-cpp-python 0.3.36's llama.cpp, 2 CPU cores) every output was accepted with its
metadata intact and every greedy continuation agreed; relative logit differences were 0 (qwenkit, f32),
2e-4 to 1.3e-3 (llama.cpp, f32), under 2.4e-3 at f16 and 1e-2 at bf16. The quantized rows' 1-2e-2 is
qwenkit's GPTQ runtime against the same weights dequantized: the converter's dequantized weights equal
qwenkit's exactly (checked per layer), so it is not a reading difference.

    .venv/bin/python benchmarks/check_llamacpp_reads.py [--llama-src DIR] [--llama-lib DIR] \\
        [--outtypes f32,f16,bf16] [--work DIR]

``--llama-src``: the unpacked llama-cpp-python sdist (its ``vendor/llama.cpp`` holds the converter and
gguf-py); ``--llama-lib``: the directory holding its ``libllama.so``. Both default to where
``benchmarks/bench_vs_llamacpp.py`` builds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests/moe"), str(ROOT / "tests/convert")]
CACHE = Path.home() / ".cache/qwenkit/bench_vs_llamacpp"
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


def build_models(work: Path) -> dict[str, Path]:
    """Model name -> the directory qwenkit wrote."""
    from factories import qwen3_tokenizer_dir, write_lora_adapter, write_tiny_chat_model
    from moe_models import hf_moe_model
    from v1_sources import CHAT_GENERATION, write_source

    from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf
    from qwenkit.convert.v1_to_qwen2 import convert_v1_to_qwen2
    from qwenkit.default_model import default_model_path
    from qwenkit.finetune.merge import merge

    out: dict[str, Path] = {}
    for fam in ("qwen2", "qwen3"):
        base = write_tiny_chat_model(work / f"{fam}-base", family=fam)
        adapter = write_lora_adapter(base, work / f"{fam}-lora", seed=1)
        merge(base, adapter, work / f"{fam}-merged")
        out[f"{fam} merge (tied)"] = work / f"{fam}-merged"
    merge(work / "qwen2-base", work / "qwen2-lora", work / "qwen2-merged-bf16", dtype="bfloat16")
    out["qwen2 merge --dtype bf16"] = work / "qwen2-merged-bf16"
    for variant in ("qwen2_moe", "qwen3_moe"):
        base = work / f"{variant}-base"
        hf_moe_model(variant, vocab_size=151936).save_pretrained(base)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copy(qwen3_tokenizer_dir() / name, base / name)
        adapter = write_lora_adapter(base, work / f"{variant}-lora", seed=1)
        merge(base, adapter, work / f"{variant}-merged")
        out[f"{variant} merge"] = work / f"{variant}-merged"
    write_source(work / "v1", tokenizer=True, generation=CHAT_GENERATION, cfg={"vocab_size": 151936})
    convert_v1_to_qwen2(work / "v1", work / "v1-qwen2", progress=False)
    out["qwen v1 -> qwen2"] = work / "v1-qwen2"
    convert_gguf_to_hf(default_model_path(), work / "smollm2-hf")
    out["SmolLM2 gguf -> hf"] = work / "smollm2-hf"
    for bits in (4, 8):
        q = work / f"qwen3-int{bits}"
        cmd = [sys.executable, "-m", "qwenkit", "quantize", str(work / "qwen3-merged"), str(q)]
        cmd += ["--bits", str(bits), "--method", "rtn", "--group-size", "32", "--quiet"]
        subprocess.run(
            cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        )
        out[f"qwen3 quantize rtn int{bits}"] = q
    return out


def convert(src: Path, hf: Path, outtype: str, env: dict[str, str]) -> tuple[Path | None, str]:
    """llama.cpp's converter on ``hf``: the GGUF, or None and its last error line."""
    gguf = hf.parent / f"{hf.name}.{outtype}.gguf"
    cmd = [sys.executable, str(src / "vendor/llama.cpp/convert_hf_to_gguf.py"), str(hf)]
    r = subprocess.run(
        [*cmd, "--outtype", outtype, "--outfile", str(gguf)], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        return None, lines[-1] if lines else f"exit {r.returncode}"
    return gguf, ""


def metadata_problems(gguf: Path, hf: Path, tokenizer) -> list[str]:
    """What the GGUF says differently from the directory: chat template, eos, vocabulary size."""
    from qwenkit.checkpoint.gguf import read_gguf

    meta = read_gguf(gguf).metadata
    problems = []
    if meta.get("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("chat template")
    config = json.loads((hf / "config.json").read_text())
    gen = json.loads((hf / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and meta.get("tokenizer.ggml.eos_token_id") != eos:
        problems.append(f"eos {meta.get('tokenizer.ggml.eos_token_id')} != {eos}")
    if len(meta["tokenizer.ggml.tokens"]) != config["vocab_size"]:
        problems.append("vocab size")
    return problems


def greedy_torch(forward, ids: list[int], n: int):
    import torch

    seq = list(ids)
    with torch.no_grad():
        first = forward(torch.tensor([seq]))[0].float()
        for _ in range(n):
            seq.append(int(forward(torch.tensor([seq]))[0, -1].argmax()))
    return first, seq[len(ids) :]


def llama_logits(gguf: Path, ids: list[int], n: int):
    import llama_cpp
    import numpy as np
    import torch

    llm = llama_cpp.Llama(str(gguf), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        first = torch.tensor(np.array(llm.scores[: len(ids)]))
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return first, out
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-src", type=Path, default=next(CACHE.glob("llama_cpp_python-*"), None))
    ap.add_argument("--llama-lib", type=Path, default=CACHE / "build/bin")
    ap.add_argument("--outtypes", default="f32,f16,bf16")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if args.llama_src is None or not (args.llama_src / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
        sys.exit("no llama.cpp sources: pass --llama-src (see benchmarks/bench_vs_llamacpp.py)")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(args.llama_lib)
    sys.path[:0] = [str(args.llama_src), str(args.llama_src / "vendor/llama.cpp/gguf-py")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path[:2]))

    import torch
    import transformers

    from qwenkit.checkpoint import load_model
    from qwenkit.generate import tokenizer_for

    work = args.work or Path(tempfile.mkdtemp(prefix="llamacpp-reads-"))
    models = build_models(work)
    rows = []
    for name, hf in models.items():
        tokenizer = tokenizer_for(hf)
        ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
        if "quantize" in name:  # transformers needs optimum for GPTQ: qwenkit's own loader is the reference
            model, _ = load_model(hf, "float32", progress=False)
            ref, ref_greedy = greedy_torch(model, ids, 8)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            ref, ref_greedy = greedy_torch(lambda x, m=model: m(x).logits, ids, 8)
        scale = float(ref.abs().max())
        for outtype in args.outtypes.split(","):
            gguf, error = convert(args.llama_src, hf, outtype, env)
            if gguf is None:
                rows.append((name, outtype, f"REFUSED: {error}", "", "", "", ""))
                continue
            problems = metadata_problems(gguf, hf, tokenizer)
            qk_model, _ = load_model(gguf, "float32", progress=False)
            qk, qk_greedy = greedy_torch(qk_model, ids, 8)
            lc, lc_greedy = llama_logits(gguf, ids, 8)
            rows.append(
                (
                    name,
                    outtype,
                    "ok" if not problems else "metadata: " + ", ".join(problems),
                    f"{float((qk - ref).abs().max()) / scale:.1e}",
                    f"{float((lc - ref).abs().max()) / scale:.1e}",
                    "yes" if qk_greedy == ref_greedy else "no",
                    "yes" if lc_greedy == ref_greedy else "no",
                )
            )
            gguf.unlink()
    head = ("model", "gguf", "converter", "qwenkit gguf rel", "llama.cpp rel", "greedy qk", "greedy llama")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
