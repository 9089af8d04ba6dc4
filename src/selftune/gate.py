"""Promotion: a candidate replaces the incumbent only when it beats it on validation by more than
the noise (paired bootstrap interval of the mean difference above ``min_gain``) and no rubric
criterion drops by more than ``max_criterion_drop``."""

from __future__ import annotations

import random
from collections.abc import Callable

from .config import GateSpec
from .records import Evaluation, GateDecision, Judgment


def paired_bootstrap(diffs: list[float], confidence: float, resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of ``diffs`` with a percentile bootstrap interval."""
    n = len(diffs)
    mean = sum(diffs) / n
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    return mean, means[int(tail * (resamples - 1))], means[int((1 - tail) * (resamples - 1))]


def decide(candidate: Evaluation, incumbent: Evaluation, criteria: list[str], spec: GateSpec, seed: int,
           diff: Callable[[Judgment, Judgment], float | None] | None = None,
           deltas: dict[str, float] | None = None, note: str = "") -> GateDecision:
    """``diff(candidate_item, incumbent_item)`` is the per-probe gain (default: the difference of the
    overall scores); ``deltas`` replaces measured per-criterion mean changes (pairwise mode);
    ``note`` prefixes the reason (e.g. why only deterministic criteria counted)."""
    inc = {j.answer.probe.id: j for j in incumbent.judgments}
    pairs = [(j, inc[j.answer.probe.id]) for j in candidate.judgments if j.answer.probe.id in inc]
    if diff is None:
        diff = lambda a, b: a.overall - b.overall if a.overall is not None and b.overall is not None else None  # noqa: E731
    diffs = [d for a, b in pairs if (d := diff(a, b)) is not None]
    prefix = f"{note}: " if note else ""
    if len(diffs) < 2:
        return GateDecision(promote=False, reason=f"{prefix}only {len(diffs)} paired valid items", n_paired=len(diffs))
    n_valid = lambda ev: sum(j.overall is not None for j in ev.judgments)  # noqa: E731
    if n_valid(candidate) < n_valid(incumbent):  # failing on hard items must not shrink the comparison
        return GateDecision(promote=False, n_paired=len(diffs),
                            reason=f"{prefix}fewer valid items than the incumbent ({n_valid(candidate)} < {n_valid(incumbent)})")
    mean, low, high = paired_bootstrap(diffs, spec.confidence, spec.resamples, seed)
    crit: dict[str, float] = {}
    for name in criteria:
        d = [a.scores[name].value - b.scores[name].value for a, b in pairs  # type: ignore[operator]
             if name in a.scores and name in b.scores and a.scores[name].status == "ok" and b.scores[name].status == "ok"]
        if d:
            crit[name] = sum(d) / len(d)
    crit.update({k: v for k, v in (deltas or {}).items() if k in criteria})
    drops = sorted(n for n, d in crit.items() if d < -spec.max_criterion_drop)
    common = dict(delta=mean, ci_low=low, ci_high=high, n_paired=len(diffs), criterion_deltas=crit)
    pct = int(spec.confidence * 100)
    if high < 0:
        return GateDecision(promote=False, reason=f"{prefix}worse than the incumbent by {-mean:.3f} ({pct}% CI [{low:+.3f}, {high:+.3f}])", **common)
    if low <= spec.min_gain:
        return GateDecision(promote=False, reason=f"{prefix}gain {mean:+.3f} not above {spec.min_gain} beyond noise ({pct}% CI [{low:+.3f}, {high:+.3f}])", **common)
    if drops:
        return GateDecision(promote=False, reason=f"{prefix}criteria regress: {', '.join(drops)}", **common)
    return GateDecision(promote=True, reason=f"{prefix}gain {mean:+.3f}, {pct}% CI [{low:+.3f}, {high:+.3f}] above {spec.min_gain}", **common)
