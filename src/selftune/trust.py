"""Measuring the judge during a tune, and the trust bar that decides whether its scores may steer.

- every item judged: per model-scored criterion, the valid-score rate; per LLM criterion, the spread
  of its scores and its rank correlation with the computational signals it ``tracks`` (reference
  agreement: token F1 with the probe's reference; the retrieval hit of the probe's source span);
- after the baseline: test-retest on a sample of items (every model-scored criterion), re-judged
  with the response cache bypassed and fresh fence tokens (flip rate, score SD); with
  ``judge.trust.labels``, Cohen's kappa with the human labels (``calibrate``);
- after every round: position consistency on a sample of validation probes, candidate vs incumbent
  judged in both orders (pairwise); with ``judge.mode: pairwise`` the same comparisons, over every
  validation probe, are the promotion signal for the LLM criteria;
- length bias: per model-scored criterion (LLM criteria and ragas's LLM metrics), the correlation of
  score with answer length over everything judged;
- with a judge panel (``judge.models``): how often its members agree on pass/fail, per LLM criterion
  and pooled (``agreement/rate``; ``disagreement_rate`` is its complement).

``Monitor.verdict`` reads them against the bar (``judge.trust``) as a frozen ``records.Verdict``:
*untrusted* when a counted figure fails, else *unproven* while a required figure rests on fewer than
``trust.min_items`` items, else *trusted*. ``objective_for`` is the one place a verdict becomes the
objective the optimizer and the gate follow: below *trusted*, the deterministic criteria only.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from .checks import token_f1
from .config import Config, JudgeSpec
from .judge import UNSCORED, Judge
from .objective import Objective, checks_only, pairwise, whole_rubric
from .parallel import run_ordered
from .records import Evaluation, Figure, Judgment, Verdict
from .reliability import length_correlation, panel_agreement, retest_stats, spearman, swap_consistency
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
    _valid: dict[str, list[int]] = field(default_factory=dict)  # criterion -> [ok, invalid] items
    _signals: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)  # (score, signal)

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
        """Re-judge up to ``retest_sample`` items (a second sample: past the first judgment's cache
        entry, new fences); flip rate and score SD pooled over the model-scored criteria, and per criterion."""
        panel = self.judge.panel
        if not self.model_scored or self.spec.retest_sample == 0 or panel is None:
            return {}
        names = [c.name for c in self.model_scored]  # items the judge model scored (not a skipped one)
        items = [j for ev in evals for j in ev.judgments
                 if j.answer.error is None and any(j.scores.get(n, UNSCORED) != UNSCORED for n in names)]
        rng = random.Random(self.seed)
        sample = rng.sample(items, min(self.spec.retest_sample, len(items)))
        again = self.judge.variant(roles=[r.with_lm(_second_sample(r.lm)) for r in panel.roles],
                                   seed=self.seed + 7919)
        first_all: list[float] = []
        second_all: list[float] = []
        out: dict[str, float] = {}
        # a criterion group is re-scored as it was scored; in a pool of the judge's concurrency, each item's
        # fence tokens drawn first in item order (the prompts, hence cache keys, of a one-at-a-time run)
        jobs = [(j.answer, again.reserve(j.answer)) for j in sample]
        redone = run_ordered(lambda job: again.judge(job[0], tokens=job[1]), jobs, again.concurrency)
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
        llm = self.llm

        def both_orders(job: tuple[Judgment, Judgment, list[str]]) -> list[tuple[Any, ...]]:
            cand, old, tokens = job
            out = []
            with panel.using(tokens):
                for c in llm:
                    v1, p1, _ = panel.compare(c, cand.answer, old.answer)   # candidate shown as A
                    v2, p2, _ = panel.compare(c, old.answer, cand.answer)   # candidate shown as B
                    out.append((c, v1, p1, v2, p2))
            return out

        # the pairs in a pool of the judge's concurrency; each pair's fence tokens drawn first, in pair order
        # (two comparisons per criterion, one token each per member): a one-at-a-time run's prompts
        per_pair = len(llm) * 2 * len(panel.roles)
        compared = run_ordered(both_orders, [(cand, old, panel.draw(per_pair)) for cand, old in pairs],
                               panel.concurrency)
        swaps: list[tuple[str, str]] = []
        prefs: dict[str, dict[str, float]] = {}
        for (cand, _), results in zip(pairs, compared):
            for c, v1, p1, v2, p2 in results:
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
        """Over everything judged so far: per model-scored criterion its valid-score rate and length
        correlation; per LLM criterion the spread of its scores and their rank correlation with the
        signals it tracks; with a panel, how far its judges agree. Failed answers are not the judge's."""
        for ev in evals:
            for j in ev.judgments:
                if j.answer.error is not None:
                    continue
                for c in self.model_scored:
                    s = j.scores.get(c.name)
                    if s is None or s.status == "n/a":
                        continue
                    self._valid.setdefault(c.name, [0, 0])[s.status != "ok"] += 1
                    if s.status == "ok":
                        self._lengths.setdefault(c.name, []).append((s.value or 0.0, len(j.answer.text.split())))
                        if isinstance(c, LLMCriterion):
                            for sig, x in _signals(j).items():
                                if sig in c.tracks:
                                    self._signals.setdefault((c.name, sig), []).append((s.value or 0.0, x))
                    if len(s.by_judge) > 1 and isinstance(c, LLMCriterion):
                        raws = [v for v in s.by_judge.values() if v is not None]
                        if len(raws) > 1:  # every pair of members that both scored
                            self._panel.setdefault(c.name, []).extend(
                                (c.scale.normalize(a), c.scale.normalize(b))
                                for k, a in enumerate(raws) for b in raws[k + 1:])
        for name, (ok, bad) in self._valid.items():
            self.stats[f"valid/{name}/rate"], self.stats[f"valid/{name}/n"] = ok / (ok + bad), float(ok + bad)
        for name, pts in self._lengths.items():
            r = length_correlation([v for v, _ in pts], [n for _, n in pts])
            if r is not None:
                self.stats[f"length_corr/{name}"] = r
            self.stats[f"spread/{name}"] = _sd([v for v, _ in pts])
            self.stats[f"spread/{name}/n"] = float(len(pts))
        for (name, sig), pts in self._signals.items():
            rho = spearman([v for v, _ in pts], [x for _, x in pts])
            if rho is not None:
                self.stats[f"discrimination/{name}/{sig}"] = rho
            self.stats[f"discrimination/{name}/{sig}/n"] = float(len(pts))
        pooled: list[tuple[float, float]] = []
        for name, pairs in self._panel.items():
            self.stats.update({f"agreement/{name}/{k}": v for k, v in panel_agreement(pairs).items()})
            pooled += pairs
        if pooled:
            self.stats.update({f"agreement/{k}": v for k, v in panel_agreement(pooled).items()})

    def calibrate(self) -> dict[str, float]:
        """With ``judge.trust.labels``: judge the labelled items and keep, per labelled LLM criterion,
        Cohen's kappa with the humans (quadratic weights on its scale, as ``selftune calibrate``)."""
        from .calibrate import agreement, read_items, to_answer

        labels = self.spec.trust.labels
        if labels is None or self.judge.panel is None:
            return {}
        rows = read_items(labels, self.rubric, need_labels=True)
        # in a pool of the judge's concurrency, each item's fence tokens drawn first in item order (as in retest)
        jobs = [(a, self.judge.reserve(a)) for a in (to_answer(r, i) for i, r in enumerate(rows))]
        judged = run_ordered(lambda job: self.judge.judge(job[0], tokens=job[1]), jobs, self.judge.concurrency)
        out: dict[str, float] = {}
        for name, a in agreement(self.rubric, rows, judged, self.seed, resamples=200).items():
            if name in {c.name for c in self.llm}:
                out[f"kappa/{name}/n"] = float(a["n"])
                if a["kappa"] is not None:
                    out[f"kappa/{name}"] = a["kappa"]
        self.stats.update(out)
        return out

    def verdict(self) -> Verdict:
        """Every figure against the bar (see the module docstring for the states). A judge with no
        model-scored criterion has nothing to prove."""
        if not self.model_scored:
            return Verdict(state="trusted")
        t, st, need = self.spec.trust, self.stats, self.spec.trust.min_items
        figs: list[Figure] = []
        for c in self.model_scored:
            v, n = st.get(f"valid/{c.name}/rate"), int(st.get(f"valid/{c.name}/n", 0))
            figs.append(Figure(label=f"{c.name} valid-score rate", value=v, op=">=", bar=t.min_valid, n=n,
                               required=True, why=f"{c.name} valid-score rate {v or 0:.2f} < {t.min_valid} "
                                                  f"({round((v or 0) * n)} of {n} items scored)"))
        bad, good = int(st.get("swap/invalid", 0)), int(st.get("swap/n", 0))
        if bad + good:
            rate = good / (bad + good)
            figs.append(Figure(label="pairwise comparisons valid", value=rate, op=">=", bar=t.min_valid,
                               n=bad + good, why=f"{bad} of {bad + good} pairwise comparisons failed "
                                                 f"(valid {rate:.2f} < {t.min_valid})"))
        retested = min((int(st.get(f"retest/{c.name}/n", 0)) for c in self.model_scored), default=0)
        flip = st.get("retest/flip_rate")
        figs.append(Figure(label="test-retest flip rate", value=flip, op="<=", bar=t.max_flip_rate, n=retested,
                           need=need, required=True, why=f"flip rate {flip or 0:.2f} > {t.max_flip_rate}"))
        if self.llm:
            swap = st.get("swap/consistency")
            figs.append(Figure(label="swap consistency", value=swap, op=">=", bar=t.min_swap_consistency, n=good,
                               need=need, required=True,
                               why=f"swap consistency {swap or 0:.2f} < {t.min_swap_consistency}"))
        for c in self.llm:
            sd, n = st.get(f"spread/{c.name}"), int(st.get(f"spread/{c.name}/n", 0))
            figs.append(Figure(label=f"{c.name} score spread (SD)", value=sd, op=">=", bar=t.min_spread, n=n,
                               need=need, required=True,
                               why=f"{c.name} says the same thing to everything (score SD {sd or 0:.3f} < "
                                   f"{t.min_spread} over {n} items)"))
            for sig in c.tracks:
                pts = self._signals.get((c.name, sig), [])
                rho = st.get(f"discrimination/{c.name}/{sig}")
                # a signal no item carries, or one that never varies, separates nothing: not the judge's fault
                varies = len({x for _, x in pts}) > 1
                figs.append(Figure(label=f"{c.name} rank rho with {sig}", value=rho, op=">=",
                                   bar=t.min_discrimination, n=len(pts), need=need, required=varies,
                                   why=f"{c.name} does not rank answers as {sig} does (rho {rho or 0:+.2f} < "
                                       f"{t.min_discrimination} over {len(pts)} items)"))
            if t.labels is not None:
                k, n = st.get(f"kappa/{c.name}"), int(st.get(f"kappa/{c.name}/n", 0))
                figs.append(Figure(label=f"{c.name} kappa with human labels", value=k, op=">=", bar=t.min_kappa,
                                   n=n, need=need, required=True,
                                   why=f"{c.name} agrees with human labels at kappa {k or 0:+.2f} < {t.min_kappa}"))
        if t.max_length_corr is not None:
            for c in self.model_scored:
                r, n = st.get(f"length_corr/{c.name}"), len(self._lengths.get(c.name, []))
                figs.append(Figure(label=f"{c.name} length correlation", value=r, op="|<=|", bar=t.max_length_corr,
                                   n=n, need=need, why=f"{c.name} length correlation {r or 0:+.2f} beyond "
                                                      f"±{t.max_length_corr}"))
        agree = st.get("agreement/rate")
        if agree is not None and t.min_agreement is not None:
            n = int(st.get("agreement/n", 0))
            figs.append(Figure(label="judge panel agreement", value=agree, op=">=", bar=t.min_agreement, n=n,
                               need=need, why=f"judges agree on {agree:.2f} of items < {t.min_agreement}"))
        return Verdict.of(figs)


def preflight(judge: Judge, cfg: Config) -> None:
    """Before any work: ``judge.trust.labels`` parse against the rubric, and every judge model gives a
    score to a probe call (``panel.check_judges``). Either failing is an ``InputError`` (exit 2)."""
    from .calibrate import read_items
    from .panel import check_judges, judge_keys

    if cfg.judge.trust.labels is not None:
        read_items(cfg.judge.trust.labels, judge.rubric, need_labels=True)
    if judge.panel is not None:
        check_judges(judge.panel, next(iter(judge.rubric.llm_criteria()), None), cfg.source or "config",
                     judge_keys(cfg))


def _signals(j: Judgment) -> dict[str, float]:
    """The computational signals of one answered item: reference agreement (token F1 with the
    probe's reference) and the retrieval hit (its source span among the contexts), where known."""
    p, out = j.answer.probe, {}
    if p.reference:
        out["reference"] = token_f1(j.answer.text, p.reference)
    if p.source_doc:
        out["retrieval"] = float(any(c.overlaps(p.source_doc, p.source_start, p.source_end) for c in j.answer.contexts))
    return out


def _sd(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def objective_for(rubric: Rubric, verdict: Verdict, mode: str, flag_cap: float | None) -> Objective:
    """The signal the judge has earned: every criterion (pointwise, or pairwise with
    ``judge.mode: pairwise``) when trusted; the deterministic criteria only when untrusted or unproven."""
    if not verdict.trusted:
        return checks_only(rubric, flag_cap, "; ".join(verdict.reasons), verdict.state)
    if mode == "pairwise" and rubric.llm_criteria():
        return pairwise(rubric, flag_cap)
    return whole_rubric(rubric, flag_cap)


def _second_sample(lm: Any) -> Any:
    """``lm`` with DSPy's ``rollout_id``: a request it makes misses the first judgment's cache entry
    (a fresh sample) but is cached under its own key, so a replayed tune (``tune --resume``) reads the
    retest back instead of paying for it again. At temperature 0 the id still splits the cache key;
    DSPy's warning that it then changes no sampling is expected here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rollout_id has no effect")
        return lm.copy(rollout_id=1)
