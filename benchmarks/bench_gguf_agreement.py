"""How closely a GGUF model run in its own precision follows its dequantized float32 load: qwenkit (as
``chat`` runs it) beside llama.cpp on the same file, teacher-forced on the float model's greedy answers.

For each chat prompt the float32 model (``--gguf-dequantize``: the file's weights decoded to floats,
float activations) answers greedily; every model then predicts each token of that answer from the same
prefix (the prompt in one chunk, then a token a step through the KV cache), so every position is
compared, not only those before the first disagreement. Prints, per model, the largest logit difference
from the float model, at how many positions its top token differs, and the float model's top-two gaps at
those positions (a gap near zero is a near tie that any rounding may flip). Not a test: a measurement.

    .venv/bin/python benchmarks/bench_gguf_agreement.py [MODEL.gguf] [--tokens 24]
        [--llama-src SDIST --llama-lib DIR]   # llama.cpp through llama-cpp-python, as bench_vs_llamacpp.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_vs_llamacpp import llama_env  # benchmarks/, beside this script

from qwenkit.checkpoint import load_model
from qwenkit.default_model import default_model_path
from qwenkit.engine.forward import ForwardCall, run_forward
from qwenkit.engine.kv_cache import PagedKVCache
from qwenkit.generate import tokenizer_for
from qwenkit.model import Transformer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Name three primary colors.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is the capital of France? Answer in one sentence.",
    "Give me a tip for learning Python.",
    "What is the boiling point of water?",
    "Tell me a fun fact about cats.",
    "What does a CPU do?",
    "Summarize the plot of Cinderella.",
    "What is 15 plus 27?",
    "List two renewable energy sources.",
]
LLAMA_CHILD = r"""
import json, sys
import numpy as np, llama_cpp
seqs = json.load(open(sys.argv[2]))
llm = llama_cpp.Llama(sys.argv[1], n_ctx=1024, n_batch=512, logits_all=True, n_threads=2, verbose=False)
out = []
for seq, n_prompt in seqs:
    llm.reset()
    llm.eval(seq[:-1])
    out.append(np.array(llm.scores[: len(seq) - 1])[n_prompt - 1 :].tolist())
json.dump(out, open(sys.argv[3], "w"))
"""


class Decoder:
    """One sequence through ``model`` with its own KV cache: the prompt in one chunk, then a token a step,
    as the engine runs it; each call returns the float32 logits after the tokens fed."""

    def __init__(self, model: Transformer, length: int) -> None:
        cfg, dtype = model.config, model.model.norm.weight.dtype
        blocks = -(-length // 16)
        self.model, self.table, self.done = model, list(range(blocks)), 0
        self.cache = PagedKVCache(
            cfg.num_hidden_layers, blocks, 16, cfg.num_key_value_heads, cfg.head_dim, dtype, "cpu"
        )

    def __call__(self, ids: list[int]) -> torch.Tensor:
        n, done = len(ids), self.done
        rows = ([(self.table, done)], []) if n == 1 else ([], [(self.table, done, n)])
        with torch.no_grad():
            logits = run_forward(
                self.model, self.cache, ForwardCall(ids, list(range(done, done + n)), None, [n - 1], *rows)
            )
        self.done += n
        return logits[0].float()


def predictions(model: Transformer, seq: list[int], n_prompt: int) -> torch.Tensor:
    """Logits predicting each of seq[n_prompt:] from the tokens before it, (len(seq) - n_prompt, V)."""
    feed = Decoder(model, len(seq))
    return torch.stack([feed(seq[:n_prompt])] + [feed([t]) for t in seq[n_prompt:-1]])


def greedy(model: Transformer, ids: list[int], tokens: int) -> list[int]:
    """ids and the model's greedy continuation of ``tokens`` tokens."""
    feed, seq = Decoder(model, len(ids) + tokens), list(ids)
    logits = feed(ids)
    for _ in range(tokens):
        seq.append(int(logits.argmax()))
        logits = feed(seq[-1:])
    return seq


def report(name: str, logits: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    worst, gaps = 0.0, []
    for got, want in zip(logits, reference, strict=True):
        worst = max(worst, float((got - want).abs().max()))
        top2 = want.topk(2, dim=-1).values
        differ = got.argmax(-1) != want.argmax(-1)
        gaps += [round(float(g), 3) for g in (top2[:, 0] - top2[:, 1])[differ]]
    total = sum(t.shape[0] for t in reference)
    print(f"| {name} | {worst:.3f} | {len(gaps)} of {total} | {', '.join(map(str, sorted(gaps))) or '-'} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "model", nargs="?", type=Path, default=None, help="a .gguf file (default: the bundled one)"
    )
    ap.add_argument("--tokens", type=int, default=24, help="greedy tokens of each float answer")
    ap.add_argument("--llama-src", type=Path, help="llama-cpp-python's unpacked sdist (bench_vs_llamacpp.py)")
    ap.add_argument("--llama-lib", type=Path, help="the directory holding the libllama built from it")
    args = ap.parse_args()
    path = args.model or default_model_path()
    tokenizer = tokenizer_for(path)
    floats, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    seqs = []
    for text in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        seqs.append((greedy(floats, ids, args.tokens), len(ids)))
    reference = [predictions(floats, s, n) for s, n in seqs]
    print(
        f"{path.name}: {len(PROMPTS)} chat prompts, {args.tokens} greedy tokens of the float32 model each\n"
    )
    print("| model | max logit difference | top token differs | float model's top-two gaps there |")
    print("|---|---:|---:|---|")
    for dtype in ("bfloat16", "float32"):
        model, _ = load_model(path, dtype=dtype, progress=False, fast_kernels=True)
        head = model.lm_head.impl.description if hasattr(model.lm_head, "impl") else "float"
        report(
            f"qwenkit, own precision, {dtype} (head: {head})",
            [predictions(model, s, n) for s, n in seqs],
            reference,
        )
        del model
    if args.llama_src and args.llama_lib:
        with tempfile.TemporaryDirectory() as tmp:
            ins, outs = Path(tmp) / "seqs.json", Path(tmp) / "logits.json"
            ins.write_text(json.dumps(seqs))
            cmd = [sys.executable, "-c", LLAMA_CHILD, str(path), str(ins), str(outs)]
            done = subprocess.run(
                cmd, env=llama_env(args.llama_src, args.llama_lib), capture_output=True, text=True
            )
            if done.returncode != 0:
                sys.exit(f"llama.cpp failed: {done.stderr.strip()[-500:]}")
            logits = [torch.tensor(x) for x in json.loads(outs.read_text())]
        report("llama.cpp (llama-cpp-python)", logits, reference)


if __name__ == "__main__":
    main()
