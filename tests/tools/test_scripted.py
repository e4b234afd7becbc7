"""The scripted test model plays a reply once: a later request of the same prompt length (the tests' next
request often is one) gets the model's own reply, not the script's again or its tail."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scripted import ScriptedModel

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM


def test_a_script_plays_for_one_request_only(tiny_chat_model):
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=2, progress=False)
    end = loaded.tokenizer.added_tokens["<|im_end|>"]
    model = ScriptedModel(loaded.model, end)
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=256)
    prompt = llm.tokenizer.encode("The weather in Paris is")
    reply = llm.tokenizer.encode(" sunny and warm today, with a light breeze.")
    greedy = SamplingParams(max_tokens=len(reply) + 1, temperature=0)
    own = llm.generate([prompt], greedy)[0].token_ids  # the model's own reply
    assert own[: len(reply)] != reply

    model.play(len(prompt), reply)
    assert llm.generate([prompt], greedy)[0].token_ids == [*reply, end]  # the end token ends it
    assert model.script is None  # played whole: cleared
    assert llm.generate([prompt], greedy)[0].token_ids == own

    # cut short (max_tokens, a stop string): the script is not played out, yet steers no later request
    model.play(len(prompt), reply)
    short = SamplingParams(max_tokens=3, temperature=0)
    assert llm.generate([prompt], short)[0].token_ids == reply[:3]
    assert llm.generate([prompt], greedy)[0].token_ids == own
