"""How far the judge can be trusted: the statistics, as plain functions over numbers.

- test-retest: the same items judged twice (cache bypassed); the flip rate of the pass/fail verdict
  and the within-item standard deviation of the score;
- position consistency: pairwise verdicts judged in both orders; how often the winner survives the swap;
- length bias: the correlation of score with answer length;
- panel agreement: two judges on the same items; how often they agree on pass/fail;
- agreement with human labels (or another judge): Cohen's kappa (linear/quadratic weights for ordinal
  scales), Spearman's rho, a percentile bootstrap interval for either, and the confusion table.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Literal

Verdict = Literal["A", "B", "tie"]


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (scipy.stats.spearmanr, ties at their average rank); None with fewer than 3
    pairs or a constant side, where it is undefined."""
    if len(x) != len(y):
        raise ValueError("x and y differ in length")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def confusion(a: Sequence[int], b: Sequence[int], levels: Sequence[int]) -> list[list[int]]:
    """``table[i][j]``: items rated ``levels[i]`` by ``a`` and ``levels[j]`` by ``b``."""
    index = {lvl: i for i, lvl in enumerate(levels)}
    table = [[0] * len(levels) for _ in levels]
    for u, v in zip(a, b):
        table[index[u]][index[v]] += 1
    return table


def cohen_kappa(a: Sequence[int], b: Sequence[int], levels: Sequence[int],
                weights: Literal["none", "linear", "quadratic"] = "none") -> float | None:
    """Cohen's kappa of two raters over ``levels`` (ordered); weighted for ordinal scales
    (sklearn.metrics.cohen_kappa_score). None when it is undefined (no items, or chance agreement is
    already perfect)."""
    if len(a) == 0:
        return None
    table = confusion(a, b, levels)
    rows = [sum(r) for r in table]
    cols = [sum(r[j] for r in table) for j in range(len(levels))]
    # expected disagreement is zero exactly when each rater uses one level and both use the same one
    if sum(1 for r in rows if r) == 1 and rows == cols:
        return None
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(list(a), list(b), labels=list(levels),
                                   weights=None if weights == "none" else weights))


def bootstrap_ci(stat: Callable[[list[int]], float | None], n: int, confidence: float = 0.95,
                 resamples: int = 1000, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval of ``stat(indices)`` over resampled item indices, undefined draws skipped.
    (Not scipy.stats.bootstrap: kappa and rho are undefined on some resamples, e.g. every item at one
    level, and scipy has no way to leave a draw out; the gate's mean difference uses scipy.)"""
    if n == 0:
        return None, None
    rng = random.Random(seed)
    values = sorted(v for v in (stat([rng.randrange(n) for _ in range(n)]) for _ in range(resamples)) if v is not None)
    if not values:
        return None, None
    tail = (1 - confidence) / 2
    return values[int(tail * (len(values) - 1))], values[int((1 - tail) * (len(values) - 1))]


def retest_stats(first: Sequence[float], second: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """Two judgments of the same items (normalized scores). ``flip_rate``: share of items whose
    pass/fail verdict (score >= threshold) changed; ``score_sd``: within-item standard deviation,
    sqrt(mean((a - b)^2) / 2); ``mean_abs_diff``."""
    if len(first) != len(second):
        raise ValueError("first and second differ in length")
    n = len(first)
    if n == 0:
        return {"n": 0.0}
    flips = sum((a >= threshold) != (b >= threshold) for a, b in zip(first, second))
    sq = sum((a - b) ** 2 for a, b in zip(first, second)) / n
    return {"n": float(n), "flip_rate": flips / n, "score_sd": math.sqrt(sq / 2),
            "mean_abs_diff": sum(abs(a - b) for a, b in zip(first, second)) / n}


def panel_agreement(pairs: Sequence[tuple[float, float]], threshold: float = 0.5) -> dict[str, float]:
    """Two judges on the same items (normalized scores, one pair per item and pair of judges).
    ``rate``: share of pairs with the same pass/fail verdict (score >= threshold), the figure the
    trust bar's ``min_agreement`` reads; ``disagreement_rate`` = 1 - rate; ``mean_abs_diff``; and
    ``spearman`` (rank agreement) when defined."""
    n = len(pairs)
    if n == 0:
        return {"n": 0.0}
    same = sum((a >= threshold) == (b >= threshold) for a, b in pairs)
    out = {"n": float(n), "rate": same / n, "disagreement_rate": 1 - same / n,
           "mean_abs_diff": sum(abs(a - b) for a, b in pairs) / n}
    rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
    if rho is not None:
        out["spearman"] = rho
    return out


def swap_consistency(ab: Sequence[Verdict], ba: Sequence[Verdict]) -> float | None:
    """``ab[i]``: verdict with X shown as A and Y as B; ``ba[i]``: the same pair with Y as A and X as B.
    The verdict survives the swap when the same *answer* wins (or both are ties)."""
    if len(ab) != len(ba):
        raise ValueError("ab and ba differ in length")
    if not ab:
        return None
    flip = {"A": "B", "B": "A", "tie": "tie"}
    return sum(u == flip[v] for u, v in zip(ab, ba)) / len(ab)


def length_correlation(scores: Sequence[float], lengths: Sequence[int]) -> float | None:
    """Spearman's rho of score with answer length (words): a judge that rewards padding shows it here."""
    return spearman(list(scores), [float(n) for n in lengths])
