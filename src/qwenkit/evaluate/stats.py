"""Standard errors and the unbiased pass@k estimator."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def macro_stderr(groups: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean over groups of each group's mean, and its standard error (groups independent): not known
    (nan) when a group has one item, whose variance there is nothing to estimate from."""
    stats = [mean_stderr(g) for g in groups if g]
    if not stats:
        return float("nan"), float("nan")
    k = len(stats)
    mean = sum(m for m, _ in stats) / k
    return mean, math.sqrt(sum(se**2 for _, se in stats)) / k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail
