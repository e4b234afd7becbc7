"""The one think-tag split (``qwenkit.tokenizer.thinking``): a reply's leading ``<think>`` block is its
reasoning and the rest its answer, the same however the text is streamed."""

from __future__ import annotations

import pytest

from qwenkit.tokenizer.thinking import ThinkSplitter, split_thinking

CASES = {
    "block": ("<think>\nWeigh it.\n</think>\n\nParis.", False, ("Weigh it.", "Paris.")),
    "cut": ("<think>\nStep one. Step two.\n</thi", False, ("Step one. Step two.\n</thi", "")),
    "opened": ("Hmm.\n</think>\n\nYes.", True, ("Hmm.", "Yes.")),
    "opened-cut": ("\nHmm, and ", True, ("Hmm, and", "")),
    "no-block": ("Paris. <think>not here</think>", False, ("", "Paris. <think>not here</think>")),
    "tag-start": ("<thing> is not a tag", False, ("", "<thing> is not a tag")),
    "lone-start": ("<thi", False, ("", "<thi")),
    "empty-block": ("<think>\n\n</think>\n\nHi.", False, ("", "Hi.")),
    "second-close": ("<think>a</think> b </think> c", False, ("a", "b </think> c")),
}


def split(text: str, opened: bool, cuts: list[int]) -> tuple[str, str]:
    splitter, reasoning, content = ThinkSplitter(opened=opened), "", ""
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        r, c = splitter.feed(text[a:b])
        reasoning, content = reasoning + r, content + c
        assert not (c and splitter.state != "answer")  # content only once the thinking is over
    r, c = splitter.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize("case", CASES)
def test_split_at_every_boundary_equals_whole(case):
    text, opened, expected = CASES[case]
    assert split(text, opened, []) == expected
    for i in range(len(text) + 1):
        assert split(text, opened, [i]) == expected, i
    assert split(text, opened, list(range(1, len(text)))) == expected  # a character at a time


def test_nothing_undecided_goes_out_early():
    splitter = ThinkSplitter()
    assert splitter.feed("<thi") == ("", "")  # may still open the block
    assert splitter.feed("nk>\nPlan") == ("Plan", "")
    assert splitter.feed(" more \n</th") == (" more", "")  # may be closing it: held with its space
    assert splitter.feed("ink>\n\n") == ("", "")  # the newlines after the tag are neither
    assert splitter.feed("Done") == ("", "Done")
    assert splitter.finish() == ("", "")


@pytest.mark.parametrize("case", CASES)
def test_a_whole_reply_splits_as_its_stream(case):
    """``split_thinking`` (evaluation reads whole replies) gives what a stream of the reply gives."""
    text, opened, expected = CASES[case]
    assert split_thinking(text, opened=opened)[1] == expected[1]
    assert (split_thinking(text, opened=opened)[0] or "") == expected[0]


def test_a_whole_reply_says_whether_it_had_a_block():
    assert split_thinking("<think>\nA or B? B.\n</think>\n\nThe answer is B") == (
        "A or B? B.",
        "The answer is B",
    )
    assert split_thinking("<think>\n\n</think>\n\nC") == ("", "C")  # empty block (enable_thinking off)
    assert split_thinking("<think>\nstill thinking about 42") == ("still thinking about 42", "")  # cut off
    assert split_thinking("still thinking about 42", opened=True) == ("still thinking about 42", "")
    assert split_thinking("plain 7") == (None, "plain 7")  # no block: nothing was reasoning
    assert split_thinking(" <think>late</think> 7") == (None, " <think>late</think> 7")
    # an endpoint that split nothing, behind a template that opened the block in the prompt
    assert split_thinking("A or B? B.\n</think>\n\nThe answer is B") == ("A or B? B.", "The answer is B")
