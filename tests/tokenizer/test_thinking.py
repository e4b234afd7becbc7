"""The one think-tag split (``qwenkit.tokenizer.thinking``): a reply's leading ``<think>`` block is its
reasoning and the rest its answer, the same however the text is streamed."""

from __future__ import annotations

import pytest

from qwenkit.tokenizer.thinking import ThinkSplitter

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
