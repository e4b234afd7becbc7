"""Answer extractors, each named in the results. Patterns follow the scripts they are named after.

- ``qwen-mmlu-chat`` / ``qwen-ceval-chat``: QwenLM/Qwen ``evaluate_chat_{mmlu,ceval}.py``: option texts
  in the reply become their letters, then a cascade of patterns, then the option most similar to the
  reply (Qwen uses ``thefuzz``; we use difflib's ratio, so every reply still yields a letter).
- ``qwen-gsm8k-base``: the last run of digits (Qwen's base script; weak on "1,200" and "-5", kept for
  comparability). ``qwen-gsm8k-chat``: the last number, commas and signs understood.
- ``lmeval-strict`` (``#### N``) and ``lmeval-flexible`` (last number-like run) as lm-eval's gsm8k,
  judged as lm-eval judges them: ``exact_match`` of the cleaned strings, so "18.00" is not "18".

Qwen's numbers are compared as decimals, never with ``eval``. Qwen3 thinking is split off first, by the one
split the chat API and the server use (``qwenkit.tokenizer.thinking.split_thinking``): a reply whose
thinking never closes has an empty answer.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

LETTERS = ("A", "B", "C", "D")


# ---- multiple choice -------------------------------------------------------------------------------

_MMLU_CASCADE = (
    r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:|is|:|be))\b)"
    r"[^ABCD]{0,20}?\b(A|B|C|D)\b",
    r"\b(A|B|C|D)\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b",
    r"^(A|B|C|D)(?:\.|,|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
)
_CEVAL_CASCADE = (
    r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|选|为|：|:|】))"
    r"[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)",
    r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))[^ABCD]{0,4}?"
    r"(?:正确|对[的，。：]|符合)",
    r"^[\(（]?(A|B|C|D)(?:。|\)|）|\.|，|,|．|：|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
)


def _cascade(patterns: Sequence[str], text: str) -> str | None:
    for pattern in patterns:
        found = re.search(pattern, text)
        if found is not None:
            return found.group(1)
    return None


def _most_similar(reply: str, choices: Sequence[str]) -> str:
    scores = [difflib.SequenceMatcher(None, reply, c).ratio() for c in choices]
    return LETTERS[scores.index(max(scores))]


def qwen_mmlu_chat(reply: str, choices: Sequence[str], question: str = "") -> str:
    for letter, text in sorted(zip(LETTERS, choices, strict=True), key=lambda kv: len(kv[1]), reverse=True):
        reply = re.sub(re.escape(text.rstrip(".")), letter, reply, flags=re.IGNORECASE) if text else reply
    return _cascade(_MMLU_CASCADE, reply) or _most_similar(reply, choices)


def qwen_ceval_chat(reply: str, choices: Sequence[str], question: str = "") -> str:
    parts = question.rstrip("。").split("。")[-1].split("_")
    if len(parts[0].strip()) > 4:
        reply = reply.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        reply = reply.replace(parts[-1], "")
    for letter, text in sorted(zip(LETTERS, choices, strict=True), key=lambda kv: len(kv[1]), reverse=True):
        if text.rstrip("。"):
            reply = reply.replace(text.rstrip("。"), letter)
    return _cascade(_CEVAL_CASCADE, reply) or _most_similar(reply, choices)


CHOICE_EXTRACTORS: dict[str, Callable[..., str]] = {
    "qwen-mmlu-chat": qwen_mmlu_chat,
    "qwen-ceval-chat": qwen_ceval_chat,
}


# ---- numbers (GSM8K) -------------------------------------------------------------------------------

_QWEN_CHAT_NUMBER = re.compile(
    r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)"
)


def qwen_gsm8k_base(text: str) -> str | None:
    """Qwen's base script: the last ``\\d+`` (so "1,200" gives "200" and "-5" gives "5")."""
    found = re.findall(r"\d+", text)
    return found[-1] if found else None


def qwen_gsm8k_chat(text: str) -> str | None:
    """Qwen's chat script: the last number, commas and "+" removed, sign and decimals kept."""
    found = list(_QWEN_CHAT_NUMBER.finditer(text))
    if not found:
        return None
    return found[-1].group().replace(",", "").replace("+", "").strip()


def lmeval_strict(text: str) -> str | None:
    """lm-eval gsm8k ``strict-match``: the first ``#### N``."""
    found = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return _lmeval_clean(found.group(1)) if found else None


def lmeval_flexible(text: str) -> str | None:
    """lm-eval gsm8k ``flexible-extract``: the last number-like run."""
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    if not found:
        return None
    last = next(g for g in found[-1] if g)
    return _lmeval_clean(last)


def _lmeval_clean(s: str) -> str:
    """lm-eval's exact-match normalisation: drop commas, "$" and a trailing period."""
    return re.sub(r"\.$", "", s.replace(",", "").replace("$", ""))


def lmeval_exact_match(gold: str, pred: str | None) -> bool:
    """lm-eval gsm8k's ``exact_match``: both sides cleaned (commas, "$", a trailing period), case ignored,
    then compared as strings, not as numbers ("$18.00" and "018" are not "18")."""
    return pred is not None and pred.lower() == _lmeval_clean(gold).lower()


NUMBER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "qwen-gsm8k-base": qwen_gsm8k_base,
    "qwen-gsm8k-chat": qwen_gsm8k_chat,
    "lmeval-strict": lmeval_strict,
    "lmeval-flexible": lmeval_flexible,
}


def number_verdict(extractor: str, gold: str, pred: str | None) -> bool:
    """Whether ``pred`` (what ``extractor`` read) is ``gold``, judged as that extractor's harness judges."""
    if extractor.startswith("lmeval-"):
        return lmeval_exact_match(gold, pred)
    return numbers_equal(gold, pred)


def gsm8k_gold(answer: str) -> str:
    """The gold number of an upstream GSM8K answer ("...#### 1,200" -> "1200")."""
    found = re.search(r"#### (\-?[0-9\.\,]+)", answer)
    return (found.group(1) if found else answer).replace(",", "").strip()


def numbers_equal(gold: str | None, pred: str | None, tolerance: Decimal = Decimal("1e-4")) -> bool:
    """Decimal comparison within ``tolerance`` (Qwen's ``math.isclose(abs_tol=1e-4)``, without eval)."""
    if gold is None or pred is None:
        return False
    try:
        return abs(Decimal(gold) - Decimal(pred)) <= tolerance
    except InvalidOperation:
        return False
