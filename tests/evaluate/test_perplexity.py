"""Sliding-window perplexity equals the Hugging Face guide's computation with transformers."""

from __future__ import annotations

import math

import pytest
import torch

from qwenkit.evaluate.perplexity import perplexity, windows

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity. 天下大势，分久必合，合久必分。"
) * 3


def test_windows_score_every_token_once():
    for n, window, stride in [(100, 32, 16), (100, 32, 31), (10, 64, 8), (33, 32, 1), (2, 2, 1)]:
        scored = [p for b, e, first in windows(n, window, stride) for p in range(first, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= window for b, e, _ in windows(n, window, stride))


def hf_guide_nll(model_dir, text: str, window: int, stride: int) -> tuple[float, int]:
    """The loop from transformers' perplexity guide (labels -100 for already-scored tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        trg_len = end - prev_end
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(x).logits[0, :-1].float()
        lab = labels[0, 1:]
        keep = lab != -100
        lp = torch.log_softmax(logits, -1)[keep].gather(1, lab[keep, None])
        nll -= float(lp.sum())
        count += int(keep.sum())
        prev_end = end
        if end == ids.size(1):
            break
    return nll, count


@pytest.mark.parametrize(("window", "stride"), [(48, 16), (48, 47), (4096, 4095)])
def test_matches_the_transformers_guide(local, tiny_chat_model, window, stride):
    ours = perplexity(local, TEXT, window, stride)
    nll, count = hf_guide_nll(tiny_chat_model, TEXT, window, stride)
    assert ours["tokens_scored"] == count == len(local.encode(TEXT)) - 1
    assert ours["bos"] == "none (the text's first token is context only)"
    assert ours["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert ours["token_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    n_bytes = len(TEXT.encode())
    assert ours["bytes"] == n_bytes and ours["bits_per_byte"] == pytest.approx(
        nll / n_bytes / math.log(2), rel=1e-5
    )


def test_bad_windows_are_refused(local):
    from qwenkit.evaluate.data import EvalDataError

    with pytest.raises(EvalDataError, match="stride < window"):
        perplexity(local, TEXT, 32, 32)


def test_overlapping_windows_give_more_context(local):
    disjoint = perplexity(local, TEXT, 32, 31)
    sliding = perplexity(local, TEXT, 32, 8)
    assert sliding["tokens_scored"] == disjoint["tokens_scored"]
    assert sliding["nll_sum"] != disjoint["nll_sum"]


def test_ppl_task_through_the_cli(tiny_chat_model, tmp_path, capsys):
    from qwenkit.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    args = [
        "eval",
        str(tiny_chat_model),
        "--task",
        "ppl",
        "--data",
        str(corpus),
        "--window",
        "48",
        "--stride",
        "16",
    ]
    assert main([*args, "--dtype", "float32", "--no-progress", "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    import json

    scores = json.loads((tmp_path / "run" / "results.json").read_text())["scores"]
    assert f"perplexity {scores['token_perplexity']:.3f} per token" in out
    assert scores["tokens_scored"] > 100 and scores["bytes"] == len(TEXT.encode())
    assert scores["bos"] == "none (the text's first token is context only)"  # in samples.jsonl alone before


def test_a_directory_given_as_the_text_is_named_a_directory(tiny_chat_model, tmp_path, capsys):
    from qwenkit.cli import main

    args = ["eval", str(tiny_chat_model), "--task", "ppl", "--data", str(tmp_path), "--no-progress"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: perplexity needs a text file: {tmp_path} is a directory\n"
    assert main([*args[:4], "--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err == (
        f"error: perplexity needs a text file: {tmp_path / 'missing.txt'} does not exist\n"
    )


def test_a_bos_model_is_scored_from_its_bos_as_the_guide(llama_llm, llama_dir):
    """The guide encodes with `tokenizer(text)`, so a Llama's text starts at its BOS and its first token
    is scored too."""
    from qwenkit.evaluate.backends import LocalBackend

    text = "The quick brown fox jumps over the lazy dog. " * 8
    backend = LocalBackend(llama_llm, batch_size=4)
    ours = perplexity(backend, text, 48, 16)
    nll, count = hf_guide_nll(llama_dir, text, 48, 16)
    assert ours["tokens_scored"] == count
    assert ours["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert count == len(backend.encode(text)) == len(backend.encode_prompt(text)) - 1
    # and the record says so (it used to say "none (the text's first token is context only)" here too)
    assert ours["bos"] == "the tokenizer's BOS leads, as context only: every token of the text is scored"


def test_windows_are_reported_as_they_are_scored_with_the_same_result(local):
    """A long text is one item of a run, so its bar sat at 0/1 until every window was scored: the windows
    are scored a chunk at a time and each chunk reported; the figures are those of one pass."""
    calls: list[tuple[int, int]] = []
    chunked = perplexity(local, TEXT, 12, 4, chunk=16, report=lambda done, total: calls.append((done, total)))
    whole = perplexity(local, TEXT, 12, 4, chunk=10_000)
    total = chunked["windows"]
    assert total > 32
    assert calls == [*((n, total) for n in range(0, total, 16)), (total, total)]
    assert chunked == whole


def test_the_ppl_run_shows_windows_at_the_runs_cadence(tiny_chat_model, tmp_path, capsys, monkeypatch):
    """The bar of ``qwenkit eval --task ppl`` counts windows, updated every chunk_size of them (16 at
    --batch-size 1), as other tasks' bars count items; --no-progress draws none."""
    import json

    import tqdm

    from qwenkit.cli import main as qwenkit_main

    bars: list[tuple[str, int, list[int]]] = []  # (unit, total, n after each update)

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append((self.unit, self.total, []))

        def update(self, n=1):
            super().update(n)
            bars[-1][2].append(self.n)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = ["eval", str(tiny_chat_model), "--task", "ppl", "--data", str(text), "--window", "12"]
    argv += ["--stride", "4", "--batch-size", "1", "--dtype", "float32"]
    assert qwenkit_main([*argv, "--output", str(tmp_path / "run")]) == 0
    total = json.loads((tmp_path / "run" / "results.json").read_text())["scores"]["windows"]
    assert total > 32
    assert bars == [("window", total, [*range(0, total, 16), total])]  # drawn at 0 before the first
    assert f"{total}/{total} [" in capsys.readouterr().err
    bars.clear()
    assert qwenkit_main([*argv, "--no-progress"]) == 0
    assert bars == [] and "window" not in capsys.readouterr().err
