"""Promotion: a candidate replaces the incumbent only when it beats it on validation by more than
the noise (paired bootstrap interval of the mean per-probe gain above ``min_gain``) and no counted
criterion regresses: a criterion regresses when its mean drops by more than ``max_criterion_drop`` and
its own paired bootstrap interval lies wholly below 0 (a drop within noise, e.g. one item of 42 on a
0/1 check, is named in the reason but does not block). What a gain is comes from the ``Objective``."""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap

from .config import GateSpec
from .objective import Objective
from .records import Evaluation, GateDecision


def paired_bootstrap(diffs: list[float], confidence: float, resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of the paired differences ``diffs``, with a percentile bootstrap
    interval (scipy.stats.bootstrap, seeded)."""
    x = np.asarray(diffs, dtype=float)
    mean = float(x.mean())
    if np.all(x == x[0]):  # no spread: every resample has the same mean
        return mean, mean, mean
    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
                    vectorized=True, rng=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def decide(candidate: Evaluation, incumbent: Evaluation, objective: Objective, spec: GateSpec,
           seed: int) -> GateDecision:
    """The gate on ``objective``: its per-probe ``diff`` over the probes both evaluations share, its
    per-criterion ``deltas``, and its ``note`` as the prefix of the reason."""
    inc = {j.answer.probe.id: j for j in incumbent.judgments}
    pairs = [(j, inc[j.answer.probe.id]) for j in candidate.judgments if j.answer.probe.id in inc]
    diffs = [d for a, b in pairs if (d := objective.diff(a, b)) is not None]
    prefix = f"{objective.note}: " if objective.note else ""
    if len(diffs) < 2:
        return GateDecision(promote=False, reason=f"{prefix}only {len(diffs)} paired valid items", n_paired=len(diffs))
    n_valid = lambda ev: sum(j.overall is not None for j in ev.judgments)  # noqa: E731
    if n_valid(candidate) < n_valid(incumbent):  # failing on hard items must not shrink the comparison
        return GateDecision(promote=False, n_paired=len(diffs),
                            reason=f"{prefix}fewer valid items than the incumbent "
                                   f"({n_valid(candidate)} < {n_valid(incumbent)})")
    mean, low, high = paired_bootstrap(diffs, spec.confidence, spec.resamples, seed)
    per_item = objective.item_deltas(candidate, incumbent)
    crit = {n: sum(d) / len(d) for n, d in per_item.items()}
    drops, noise = [], []  # "name mean [low, high]" of each criterion dropping beyond the tolerance
    for n in sorted(crit):
        if crit[n] < -spec.max_criterion_drop:
            _, c_low, c_high = paired_bootstrap(per_item[n], spec.confidence, spec.resamples, seed)
            (drops if c_high < 0 else noise).append(f"{n} {crit[n]:+.3f} [{c_low:+.3f}, {c_high:+.3f}]")
    common = dict(delta=mean, ci_low=low, ci_high=high, n_paired=len(diffs), criterion_deltas=crit)
    pct = int(spec.confidence * 100)
    ci = f"{pct}% CI [{low:+.3f}, {high:+.3f}]"
    if high < 0:
        return GateDecision(promote=False, reason=f"{prefix}worse than the incumbent by {-mean:.3f} ({ci})", **common)
    if low <= spec.min_gain:
        return GateDecision(promote=False, reason=f"{prefix}gain {mean:+.3f} not above {spec.min_gain} beyond noise "
                                                  f"({ci})", **common)
    if drops:
        return GateDecision(promote=False, reason=f"{prefix}criteria regress: {', '.join(drops)}", **common)
    within = f"; drops within noise: {', '.join(noise)}" if noise else ""
    return GateDecision(promote=True, reason=f"{prefix}gain {mean:+.3f}, {ci} above {spec.min_gain}{within}",
                        **common)


def paired_diffs(candidate: Evaluation, incumbent: Evaluation, objective: Objective) -> list[float]:
    """Per-probe gains of ``candidate`` over ``incumbent`` on ``objective``, over the probes both scored."""
    inc = {j.answer.probe.id: j for j in incumbent.judgments}
    return [d for j in candidate.judgments if j.answer.probe.id in inc
            and (d := objective.diff(j, inc[j.answer.probe.id])) is not None]


def gain(candidate: Evaluation, incumbent: Evaluation, objective: Objective, spec: GateSpec,
         seed: int) -> dict[str, float] | None:
    """The paired gain of ``candidate`` over ``incumbent`` with its bootstrap interval at the gate's
    confidence: ``{"gain", "low", "high", "n"}``; None with fewer than two paired items."""
    diffs = paired_diffs(candidate, incumbent, objective)
    if len(diffs) < 2:
        return None
    mean, low, high = paired_bootstrap(diffs, spec.confidence, spec.resamples, seed)
    return {"gain": mean, "low": low, "high": high, "n": float(len(diffs))}


def min_detectable_effect(sd: float, n: int, confidence: float, power: float = 0.8) -> float | None:
    """The smallest true mean gain the gate would promote with probability ``power``: its interval's
    low end (two-sided ``confidence``) clears 0 when the gain exceeds (z_{(1+c)/2} + z_power) * sd / sqrt(n)
    (normal approximation of the paired mean; ``sd`` of the per-probe paired differences)."""
    if n < 2:
        return None
    from scipy.stats import norm

    return float((norm.ppf((1 + confidence) / 2) + norm.ppf(power)) * sd / n ** 0.5)
