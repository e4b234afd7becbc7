"""The extractor catalogue on hand-made answers, with the known traps."""

from __future__ import annotations

import pytest

from qwenkit.evaluate.extract import (
    gsm8k_gold,
    lmeval_flexible,
    lmeval_strict,
    numbers_equal,
    qwen_ceval_chat,
    qwen_gsm8k_base,
    qwen_gsm8k_chat,
    qwen_mmlu_chat,
)
from qwenkit.tokenizer.thinking import split_thinking

NUMBERS = [
    # text, qwen-gsm8k-base, qwen-gsm8k-chat, lmeval-strict, lmeval-flexible
    ("So the total is 1,200 dollars.", "200", "1200", None, "1200"),  # comma trap: Qwen's base reads 200
    ("The temperature fell to -5 degrees.", "5", "-5", None, "-5"),  # negative trap
    ("Each costs 3.5, so the answer is 7", "7", "7", None, "7"),
    ("#### 18\nQuestion: 20 apples and 40 pears", "40", "40", "18", "40"),  # answer before the last number
    ("He pays $1,000,000.00 in total.", "00", "1000000.00", None, "1000000.00"),
    ("The answer is 42.", "42", "42.", None, "42"),
    ("No numbers here.", None, None, None, None),
    ("#### 1,234", "234", "1234", "1234", "1234"),
]


@pytest.mark.parametrize(("text", "base", "chat", "strict", "flexible"), NUMBERS)
def test_number_extractors(text, base, chat, strict, flexible):
    assert qwen_gsm8k_base(text) == base
    assert qwen_gsm8k_chat(text) == chat
    assert lmeval_strict(text) == strict
    assert lmeval_flexible(text) == flexible


def test_numbers_compare_as_decimals_never_eval():
    assert numbers_equal("1200", "1200.00") and numbers_equal("18", "18.")
    assert numbers_equal("-5", "-5") and not numbers_equal("-5", "5")
    assert not numbers_equal("7", "__import__('os')") and not numbers_equal("7", None)
    assert not numbers_equal("7", "007.1")
    assert gsm8k_gold("calc <<2*600=1200>>\n#### 1,200") == "1200"


CHOICES_EN = ("Paris", "London", "Berlin", "Madrid")


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("The answer is C.", "C"),
        ("I choose B", "B"),
        ("B is correct, not A.", "B"),
        ("A. Paris is wrong; the answer is D", "D"),  # several letters: the "answer is" pattern wins
        ("D", "D"),
        ("It must be London.", "B"),  # option text replaced by its letter
        ("Certainly the capital is berlin", "C"),  # case-insensitive option text
        ("The answer isn't A; C is right", "C"),  # negation skipped
        ("Maddrid, I think", "D"),  # nothing matches: most similar option
    ],
)
def test_qwen_mmlu_chat(reply, letter):
    assert qwen_mmlu_chat(reply, CHOICES_EN) == letter


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("答案是B。", "B"),
        ("选C", "C"),
        ("D选项正确", "D"),
        ("A不正确，B正确", "B"),  # several letters: the one called correct
        ("(A) 是最好的", "A"),
        ("应该是传输层", "C"),  # option text replaced by its letter
    ],
)
def test_qwen_ceval_chat(reply, letter):
    assert (
        qwen_ceval_chat(reply, ("物理层", "网络层", "传输层", "应用层"), "TCP协议位于OSI模型的____。")
        == letter
    )


def test_the_answer_after_thinking_is_what_is_extracted():
    reasoning, answer = split_thinking("<think>the answer is 41</think>so 42")
    assert (reasoning, qwen_gsm8k_chat(answer)) == ("the answer is 41", "42")


LMEVAL_REPLIES = [
    "The answer is $18.00.",  # money with cents: lm-eval's exact match fails it, as a number it is 18
    "so she pays 18.0",
    "#### 18.00",
    "It costs 018 dollars",
    "answer 18",
    "#### 18.",
    "#### 18\nQuestion: 3 more",
    "total 18,000",
    "x = -18",
    "no number",
]


@pytest.mark.parametrize("reply", LMEVAL_REPLIES)
def test_lmeval_verdicts_are_lmeval_exact_match(reply):
    """The lmeval-* extractors judge as lm-eval's gsm8k task does (its own filters and exact_match,
    configured from its installed gsm8k.yaml): strings after cleaning, not numbers."""
    from importlib import resources

    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from qwenkit.evaluate.plans.generation import number_fields

    task = yaml.safe_load(resources.files("lm_eval").joinpath("tasks/gsm8k/gsm8k.yaml").read_text())
    metric = task["metric_list"][0]
    gold_answer = "She pays 9 * 2 = <<9*2=18>>18 dollars.\n#### 18"
    ours = number_fields(reply, gsm8k_gold(gold_answer), "qwen-gsm8k-base")["correct_by"]
    for name, flt in zip(("lmeval-strict", "lmeval-flexible"), task["filter_list"], strict=True):
        regex = flt["filter"][0]
        extracted = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0)).apply([[reply]], [{}])
        theirs = exact_match_hf_evaluate(
            [extracted[0][0]],
            [gold_answer],
            regexes_to_ignore=metric["regexes_to_ignore"],
            ignore_case=metric["ignore_case"],
            ignore_punctuation=metric["ignore_punctuation"],
        )["exact_match"]
        assert ours[name] == bool(theirs), (name, reply)
    if reply in ("The answer is $18.00.", "so she pays 18.0", "It costs 018 dollars"):
        assert ours["qwen-gsm8k-chat"]  # Qwen's chat script compares numbers
