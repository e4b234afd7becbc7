"""Embedding throughput of the Qwen3-Embedding-0.6B shape: qwenkit's ``LLM.embed`` against transformers.

A random model of the exact Qwen3-Embedding-0.6B shape (tied embeddings, q/k norms, GQA 16/8 heads of
128, the 151,669-token vocabulary) is written in its sentence-transformers layout (the bare decoder's
weights, the tokenizer appending <|endoftext|>, last-token Pooling and Normalize: tests/factories.py),
then a fixed batch of ``--texts`` texts of exactly ``--tokens`` tokens each (the appended
<|endoftext|> counted) is embedded, in bfloat16 and float32, by qwenkit (``LLM.embed``: tokenizing,
batching in the engine's prefill steps, pooling, normalizing; prefix caching off, as the same texts
come back every round) and by transformers as the model card
does (``AutoModel``, left padding, the last token's hidden state, L2-normalized; tokenizing counted
too), all four models loaded at once, on the same threads, alternating over ``--rounds`` (the order
flipped each round). The table gives each one's median texts/s and tokens/s, its ratio to the peer
of its dtype, and the least cosine between the two implementations' vectors of a text (both must
reach 0.999; the script exits 1 otherwise). The machine's load average is printed before and after.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_embed.py [--texts 32] [--tokens 128] [--rounds 5]
        [--threads N] [--layers 28]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src"), str(HERE.parent / "tests")]

import torch  # noqa: E402
import transformers  # noqa: E402
from factories import write_tiny_embedding_model  # noqa: E402  (tests/)
from shapes import QWEN3_EMBEDDING_06B  # noqa: E402

from qwenkit.generate import LLM  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MIN_COSINE = 0.999
WORDS = " ".join(
    (
        "the cat sat on a mat while people in the old city talked about weather music water light",
        "money time work school house river mountain garden window letter market history science",
        "family friend morning evening summer winter story question answer problem system number",
    )
).split()


def texts_of(llm: LLM, count: int, tokens: int) -> list[str]:
    """``count`` different texts of exactly ``tokens`` tokens each as the checkpoint's tokenizer
    encodes them (its appended <|endoftext|> included): random words, cut to fit, then " the"
    (one token each) to the length."""
    out = []
    for i in range(count):
        rng = random.Random(i)
        words = [rng.choice(WORDS) for _ in range(tokens)]
        text = " ".join(words).capitalize()
        while len(llm.encode(text)) > tokens:
            words.pop()
            text = " ".join(words).capitalize()
        text += " the" * (tokens - len(llm.encode(text)))
        if len(llm.encode(text)) != tokens:
            raise SystemExit(f"could not make a text of {tokens} tokens (got {len(llm.encode(text))})")
        out.append(text)
    return out


def card_embedder(path: Path, dtype: torch.dtype) -> Callable[[list[str]], torch.Tensor]:
    """The Qwen3-Embedding model card's transformers recipe, as a function of the texts."""
    tok = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    model = transformers.AutoModel.from_pretrained(path, dtype=dtype).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state[:, -1]
        return torch.nn.functional.normalize(hidden.float(), p=2, dim=1)

    return embed


def timed(embed: Callable[[list[str]], object], texts: list[str]) -> float:
    start = time.perf_counter()
    embed(texts)
    return time.perf_counter() - start


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=32, help="texts in the batch")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per text, <|endoftext|> included")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    layers = QWEN3_EMBEDDING_06B["num_hidden_layers"]
    ap.add_argument("--layers", type=int, default=layers, help="fewer: a quick check")
    args = ap.parse_args()
    for name in ("texts", "tokens", "rounds", "threads", "layers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    if args.tokens < 2:
        raise SystemExit("--tokens must be at least 2 (a word and the appended <|endoftext|>)")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # the factory's save and the loads: one table
    shape = {k: v for k, v in QWEN3_EMBEDDING_06B.items() if k not in ("model_type", "architectures")}
    shape["num_hidden_layers"] = args.layers
    print(time.strftime("%Y-%m-%d %H:%M"), load_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_embedding_model(Path(tmp) / "q3e-0.6b", shape=shape)
        impls: dict[tuple[str, str], Callable[[list[str]], object]] = {}
        llms = []
        for dname, dtype in DTYPES.items():
            llm = LLM.load(
                path,
                dtype=dtype,
                max_batch_size=args.texts,
                max_seq_len=args.tokens,
                prefix_caching=False,  # else every round after the first reads the same texts back cached
                progress=False,
            )
            llms.append(llm)
            impls[dname, "qwenkit"] = llm.embed
            impls[dname, "transformers"] = card_embedder(path, dtype)
        try:
            texts = texts_of(llms[0], args.texts, args.tokens)
            cosine = {}
            for dname in DTYPES:  # the first call of each is also its warm-up
                ours = torch.tensor(impls[dname, "qwenkit"](texts))
                theirs = impls[dname, "transformers"](texts)
                cosine[dname] = float((ours * theirs).sum(dim=1).min())
            seconds: dict[tuple[str, str], list[float]] = {key: [] for key in impls}
            for r in range(args.rounds):
                for key in list(impls)[:: 1 if r % 2 == 0 else -1]:
                    seconds[key].append(timed(impls[key], texts))
        finally:
            for llm in llms:
                llm.close()
    report(args, seconds, cosine)
    if min(cosine.values()) < MIN_COSINE:
        raise SystemExit(1)


def report(args: argparse.Namespace, seconds: dict[tuple[str, str], list[float]], cosine: dict) -> None:
    tokens = args.texts * args.tokens
    print(
        f"\nQwen3-Embedding-0.6B shape, random weights, {args.layers} layers; {args.texts} texts of "
        f"{args.tokens} tokens; {args.threads} threads; medians of {args.rounds} rounds; {load_line()}\n"
    )
    print("| dtype | implementation | texts/s | tokens/s | vs peer | rounds (s) | least cosine |")
    print("|---|---|---:|---:|---:|---|---:|")
    for (dname, impl), times in seconds.items():
        peer = "transformers" if impl == "qwenkit" else "qwenkit"
        ratio = statistics.median(seconds[dname, peer]) / statistics.median(times)
        rate = 1 / statistics.median(times)
        spread = f"{min(times):.3f}-{max(times):.3f}"
        ok = "yes" if cosine[dname] >= MIN_COSINE else "**no**"
        print(
            f"| {dname} | {impl} | {args.texts * rate:.1f} | {tokens * rate:.0f} | {ratio:.2f}x "
            f"| {spread} | {cosine[dname]:.5f} ({ok}) |"
        )


if __name__ == "__main__":
    main()
