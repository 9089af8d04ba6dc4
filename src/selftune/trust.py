"""Measuring the judge during a tune, and the trust bar that decides whether its scores may steer.

- after the baseline: test-retest on a sample of items (every model-scored criterion), re-judged
  with the response cache bypassed and fresh fence tokens (flip rate, score SD);
- after every round: position consistency on a sample of validation probes, candidate vs incumbent
  judged in both orders (pairwise); with ``judge.mode: pairwise`` the same comparisons, over every
  validation probe, are the promotion signal for the LLM criteria;
- length bias: per model-scored criterion (LLM criteria and ragas's LLM metrics), the correlation of
  score with answer length over everything judged;
- with a judge panel (``judge.models``): how often its members agree on pass/fail, per LLM criterion
  and pooled (``agreement/rate``; ``disagreement_rate`` is its complement).

Below the bar (``judge.trust``) the tune says so, and ``objective_for`` makes the objective that both
the optimizer and the gate then follow: the deterministic criteria only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from .config import JudgeSpec
from .judge import Judge
from .lm import Role
from .records import Evaluation
from .reliability import length_correlation, panel_agreement, retest_stats, swap_consistency
from .objective import Objective, checks_only, pairwise, whole_rubric
from .rubric import LLMCriterion, RagasCriterion, Rubric

log = logging.getLogger(__name__)


@dataclass
class Monitor:
    rubric: Rubric
    judge: Judge
    spec: JudgeSpec
    seed: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    _swaps: list[tuple[str, str]] = field(default_factory=list)
    _lengths: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    _panel: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @property
    def llm(self) -> list[LLMCriterion]:
        return self.rubric.llm_criteria()

    @property
    def model_scored(self) -> list[LLMCriterion | RagasCriterion]:
        """Every criterion a model scores: the LLM criteria and ragas's LLM metrics."""
        from .ragas_metrics import LLM_METRICS

        return [c for c in self.rubric.criteria if isinstance(c, LLMCriterion)
                or (isinstance(c, RagasCriterion) and c.metric in LLM_METRICS)]

    def retest(self, evals: list[Evaluation]) -> dict[str, float]:
        """Re-judge up to ``retest_sample`` items (cache bypassed, new fences); flip rate and score SD
        pooled over the model-scored criteria, and per criterion."""
        panel = self.judge.panel
        if not self.model_scored or self.spec.retest_sample == 0 or panel is None:
            return {}
        items = [j for ev in evals for j in ev.judgments if j.answer.error is None]
        rng = random.Random(self.seed)
        sample = rng.sample(items, min(self.spec.retest_sample, len(items)))
        again = self.judge.variant(roles=[Role(r.name, r.lm.copy(cache=False), r.adapter, r.local)
                                          for r in panel.roles], seed=self.seed + 7919)
        first_all: list[float] = []
        second_all: list[float] = []
        out: dict[str, float] = {}
        redone = [again.judge(j.answer) for j in sample]  # a criterion group is re-scored as it was scored
        for c in self.model_scored:
            first, second = [], []
            for j, r in zip(sample, redone):
                s1 = j.scores[c.name]
                s2 = r.scores[c.name]
                if s1.status == "ok" and s2.status == "ok":
                    first.append(s1.value or 0.0)
                    second.append(s2.value or 0.0)
            r = retest_stats(first, second)
            out.update({f"retest/{c.name}/{k}": v for k, v in r.items()})
            first_all += first
            second_all += second
        pooled = retest_stats(first_all, second_all)
        out.update({f"retest/{k}": v for k, v in pooled.items()})
        self.stats.update(out)
        return out

    def compare(self, candidate: Evaluation, incumbent: Evaluation, sample: int | None) -> dict[str, Any]:
        """Candidate vs incumbent on shared validation probes, per LLM criterion, in both orders.
        Returns this round's swap consistency and, per probe, the candidate's order-averaged win
        probability per criterion (the pairwise promotion signal)."""
        panel = self.judge.panel
        if not self.llm or panel is None:
            return {}
        inc = {j.answer.probe.id: j for j in incumbent.judgments if j.answer.error is None}
        pairs = [(j, inc[j.answer.probe.id]) for j in candidate.judgments
                 if j.answer.error is None and j.answer.probe.id in inc]
        if sample is not None:
            pairs = random.Random(self.seed + len(self._swaps)).sample(pairs, min(sample, len(pairs)))
        swaps: list[tuple[str, str]] = []
        prefs: dict[str, dict[str, float]] = {}
        for cand, old in pairs:
            for c in self.llm:
                v1, p1, _ = panel.compare(c, cand.answer, old.answer)   # candidate shown as A
                v2, p2, _ = panel.compare(c, old.answer, cand.answer)   # candidate shown as B
                if p1 is None or p2 is None:  # a failed comparison is counted, never taken as a tie
                    self.stats["swap/invalid"] = self.stats.get("swap/invalid", 0.0) + 1
                    continue
                swaps.append((v1, v2))
                prefs.setdefault(cand.answer.probe.id, {})[c.name] = (p1 + (1 - p2)) / 2
        self._swaps += swaps
        ab, ba = [u for u, _ in swaps], [v for _, v in swaps]
        round_consistency = swap_consistency(ab, ba)  # type: ignore[arg-type]
        total = swap_consistency([u for u, _ in self._swaps], [v for _, v in self._swaps])  # type: ignore[arg-type]
        if total is not None:
            self.stats["swap/consistency"] = total
            self.stats["swap/n"] = float(len(self._swaps))
        return {"consistency": round_consistency, "n": len(swaps), "prefs": prefs}

    def observe(self, evals: list[Evaluation]) -> None:
        """Over everything judged so far: each model-scored criterion's length correlation and,
        with a panel, how far its judges agree."""
        for ev in evals:
            for j in ev.judgments:
                for c in self.model_scored:
                    s = j.scores.get(c.name)
                    if s is not None and s.status == "ok":
                        self._lengths.setdefault(c.name, []).append((s.value or 0.0, len(j.answer.text.split())))
                    if s is not None and len(s.by_judge) > 1 and isinstance(c, LLMCriterion):
                        raws = [v for v in s.by_judge.values() if v is not None]
                        if len(raws) > 1:  # every pair of members that both scored
                            self._panel.setdefault(c.name, []).extend(
                                (c.scale.normalize(a), c.scale.normalize(b))
                                for k, a in enumerate(raws) for b in raws[k + 1:])
        for name, pts in self._lengths.items():
            r = length_correlation([v for v, _ in pts], [n for _, n in pts])
            if r is not None:
                self.stats[f"length_corr/{name}"] = r
        pooled: list[tuple[float, float]] = []
        for name, pairs in self._panel.items():
            self.stats.update({f"agreement/{name}/{k}": v for k, v in panel_agreement(pairs).items()})
            pooled += pairs
        if pooled:
            self.stats.update({f"agreement/{k}": v for k, v in panel_agreement(pooled).items()})

    def verdict(self) -> tuple[bool, list[str]]:
        """(trusted, reasons it is not). A figure not measured yet does not count against the judge."""
        if not self.model_scored:
            return True, []
        t = self.spec.trust
        why = []
        flip = self.stats.get("retest/flip_rate")
        if flip is not None and flip > t.max_flip_rate:
            why.append(f"flip rate {flip:.2f} > {t.max_flip_rate}")
        bad, good = self.stats.get("swap/invalid", 0.0), self.stats.get("swap/n", 0.0)
        if bad > good:
            why.append(f"{int(bad)} of {int(bad + good)} pairwise comparisons failed")
        agree = self.stats.get("agreement/rate")
        if agree is not None and t.min_agreement is not None and agree < t.min_agreement:
            why.append(f"judges agree on {agree:.2f} of items < {t.min_agreement}")
        swap = self.stats.get("swap/consistency")
        if swap is not None and swap < t.min_swap_consistency:
            why.append(f"swap consistency {swap:.2f} < {t.min_swap_consistency}")
        for name, r in self.stats.items():
            if name.startswith("length_corr/") and t.max_length_corr is not None and abs(r) > t.max_length_corr:
                why.append(f"{name.split('/', 1)[1]} length correlation {r:+.2f} beyond ±{t.max_length_corr}")
        return not why, why


def objective_for(rubric: Rubric, trusted: bool, why: list[str], mode: str, flag_cap: float | None) -> Objective:
    """The signal the judge has earned: every criterion (pointwise, or pairwise with
    ``judge.mode: pairwise``) within the trust bar; the deterministic criteria only below it."""
    if not trusted:
        return checks_only(rubric, flag_cap, "; ".join(why))
    if mode == "pairwise" and rubric.llm_criteria():
        return pairwise(rubric, flag_cap)
    return whole_rubric(rubric, flag_cap)
