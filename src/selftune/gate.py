"""Promotion: a candidate replaces the incumbent only when it beats it on validation by more than
the noise (paired bootstrap interval of the mean difference above ``min_gain``) and no rubric
criterion drops by more than ``max_criterion_drop``."""

from __future__ import annotations

import random

from .config import GateSpec
from .records import Evaluation, GateDecision


def paired_bootstrap(diffs: list[float], confidence: float, resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of ``diffs`` with a percentile bootstrap interval."""
    n = len(diffs)
    mean = sum(diffs) / n
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    return mean, means[int(tail * (resamples - 1))], means[int((1 - tail) * (resamples - 1))]


def decide(candidate: Evaluation, incumbent: Evaluation, criteria: list[str], spec: GateSpec, seed: int) -> GateDecision:
    inc = {j.answer.probe.id: j for j in incumbent.judgments}
    pairs = [(j, inc[j.answer.probe.id]) for j in candidate.judgments if j.answer.probe.id in inc]
    diffs = [a.overall - b.overall for a, b in pairs if a.overall is not None and b.overall is not None]
    if len(diffs) < 2:
        return GateDecision(promote=False, reason=f"only {len(diffs)} paired valid items", n_paired=len(diffs))
    mean, low, high = paired_bootstrap(diffs, spec.confidence, spec.resamples, seed)
    crit: dict[str, float] = {}
    for name in criteria:
        d = [a.scores[name].value - b.scores[name].value for a, b in pairs  # type: ignore[operator]
             if a.scores[name].status == "ok" and b.scores[name].status == "ok"]
        if d:
            crit[name] = sum(d) / len(d)
    drops = sorted(n for n, d in crit.items() if d < -spec.max_criterion_drop)
    common = dict(delta=mean, ci_low=low, ci_high=high, n_paired=len(diffs), criterion_deltas=crit)
    pct = int(spec.confidence * 100)
    if high < 0:
        return GateDecision(promote=False, reason=f"worse than the incumbent by {-mean:.3f} ({pct}% CI [{low:+.3f}, {high:+.3f}])", **common)
    if low <= spec.min_gain:
        return GateDecision(promote=False, reason=f"gain {mean:+.3f} not above {spec.min_gain} beyond noise ({pct}% CI [{low:+.3f}, {high:+.3f}])", **common)
    if drops:
        return GateDecision(promote=False, reason=f"criteria regress: {', '.join(drops)}", **common)
    return GateDecision(promote=True, reason=f"gain {mean:+.3f}, {pct}% CI [{low:+.3f}, {high:+.3f}] above {spec.min_gain}", **common)
