"""What counts: the one definition of the signal that promotion and optimisation chase.

An ``Objective`` is frozen and made once per trust verdict (``trust.objective_for``). It is handed to
both the optimizer (which climbs ``mean`` and is shown the reasons of ``criteria`` only) and the gate
(which compares ``diff`` per paired item and checks ``deltas`` per criterion). Three kinds exist:

- ``rubric``: every criterion, pointwise (the judge cleared the trust bar);
- ``pairwise``: every criterion, the LLM ones by order-debiased pairwise preferences of candidate over
  incumbent (``judge.mode: pairwise``; ``with_prefs`` binds a round's preferences);
- ``checks``: the deterministic criteria only (checks and ragas's non-LLM metrics), used whenever the
  judge is below the trust bar.

Caps are applied here and only here (``cap``): a violated must-not rule caps an item's overall at the
rule's ``cap``, and an attack-flagged item at ``flag_cap``; the grader uses the same function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from .records import Evaluation, Judgment, Score
from .rubric import CheckCriterion, MustNot, RagasCriterion, Rubric

Kind = Literal["rubric", "pairwise", "checks"]


def deterministic(rubric: Rubric) -> frozenset[str]:
    """Criteria no model scores: checks and ragas's non-LLM metrics."""
    from .ragas_metrics import LLM_METRICS

    return frozenset(c.name for c in rubric.criteria if isinstance(c, CheckCriterion)
                     or (isinstance(c, RagasCriterion) and c.metric not in LLM_METRICS))


def cap(overall: float | None, violated: Iterable[MustNot], flags: tuple[str, ...],
        flag_cap: float | None) -> tuple[float | None, tuple[str, ...]]:
    """The hard rules, whatever the criteria say: each violated must-not rule caps the overall at its
    ``cap``; an attack-flagged answer is capped at ``flag_cap`` (recorded as ``flagged`` when it bit).
    Returns (overall, names of what capped it)."""
    rules = list(violated)
    capped = tuple(r.name for r in rules)
    if overall is None:
        return None, capped
    for r in rules:
        overall = min(overall, r.cap)
    if flags and flag_cap is not None and overall > flag_cap:
        overall, capped = flag_cap, (*capped, "flagged")
    return overall, capped


def weighted(rubric: Rubric, scores: Mapping[str, Score], only: frozenset[str] | None = None) -> float | None:
    """Weighted mean of the ok scores of the criteria in ``only`` (all if None); None when any of
    them is invalid or none applies."""
    chosen = [c for c in rubric.criteria if c.name in scores and (only is None or c.name in only)]
    if any(scores[c.name].status == "invalid" for c in chosen):
        return None
    pairs = [(c.weight, scores[c.name].value) for c in chosen if scores[c.name].status == "ok"]
    if not pairs:
        return None
    return sum(w * (v or 0.0) for w, v in pairs) / sum(w for w, _ in pairs)


@dataclass(frozen=True)
class Objective:
    """The counted signal. ``criteria``: the criteria it counts; ``note``: prefixes gate reasons
    (empty for the plain rubric); ``description``: one line for reports."""

    kind: Kind
    rubric: Rubric
    criteria: frozenset[str]
    flag_cap: float | None = 0.0
    note: str = ""
    prefs: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # probe id -> criterion -> P(cand wins)

    @property
    def name(self) -> str:
        return self.kind

    @property
    def description(self) -> str:
        what = {"rubric": "every rubric criterion", "pairwise": "every criterion, LLM ones by pairwise preference",
                "checks": "the deterministic criteria only"}[self.kind]
        return f"{what} ({', '.join(sorted(self.criteria))})" + (f"; {self.note}" if self.note else "")

    def item(self, j: Judgment) -> float | None:
        """One item's score on this objective (caps applied). For ``rubric``/``pairwise`` it is the
        grader's overall."""
        if self.kind != "checks":
            return j.overall
        if j.answer.error is not None:
            return None
        scores = {n: s for n, s in j.scores.items() if n in self.criteria}
        rules = [r for r in self.rubric.must_not if r.name in j.capped_by]
        return cap(weighted(self.rubric, scores, self.criteria), rules, j.flags, self.flag_cap)[0]

    def mean(self, ev: Evaluation) -> float | None:
        vals = [v for j in ev.judgments if (v := self.item(j)) is not None]
        return sum(vals) / len(vals) if vals else None

    def diff(self, a: Judgment, b: Judgment) -> float | None:
        """Per-probe gain of candidate item ``a`` over incumbent item ``b``; None when not comparable."""
        if self.kind != "pairwise":
            x, y = self.item(a), self.item(b)
            return x - y if x is not None and y is not None else None
        if a.overall is None or b.overall is None:
            return None
        if a.capped_by or b.capped_by or a.flags or b.flags:  # hard rules decide, whatever the preference
            return a.overall - b.overall
        llm = {c.name for c in self.rubric.llm_criteria()}
        parts = []
        for c in self.rubric.criteria:
            if c.name in llm:
                p = self.prefs.get(a.answer.probe.id, {}).get(c.name)
                if p is None:
                    return None  # no valid comparison for this probe: not paired
                parts.append((c.weight, 2 * p - 1))
            elif a.scores[c.name].status == "ok" and b.scores[c.name].status == "ok":
                parts.append((c.weight, (a.scores[c.name].value or 0.0) - (b.scores[c.name].value or 0.0)))
        if not parts:
            return None
        return sum(w * d for w, d in parts) / sum(w for w, _ in parts)

    def deltas(self, candidate: Evaluation, incumbent: Evaluation) -> dict[str, float]:
        """Mean change per counted criterion over paired items (pairwise: the LLM criteria's mean
        preference margin, 2P - 1)."""
        return {n: sum(d) / len(d) for n, d in self.item_deltas(candidate, incumbent).items()}

    def item_deltas(self, candidate: Evaluation, incumbent: Evaluation) -> dict[str, list[float]]:
        """Per counted criterion, its paired per-item changes (pairwise: the LLM criteria's per-probe
        preference margins, 2P - 1): what ``deltas`` averages and the gate bootstraps."""
        inc = {j.answer.probe.id: j for j in incumbent.judgments}
        pairs = [(j, inc[j.answer.probe.id]) for j in candidate.judgments if j.answer.probe.id in inc]
        out: dict[str, list[float]] = {}
        for c in self.rubric.criteria:
            if c.name not in self.criteria:
                continue
            d = [(a.scores[c.name].value or 0.0) - (b.scores[c.name].value or 0.0) for a, b in pairs
                 if c.name in a.scores and c.name in b.scores
                 and a.scores[c.name].status == "ok" and b.scores[c.name].status == "ok"]
            if d:
                out[c.name] = d
        if self.kind == "pairwise":
            for c in self.rubric.llm_criteria():
                ps = [p[c.name] for p in self.prefs.values() if c.name in p]
                if ps:
                    out[c.name] = [2 * p - 1 for p in ps]
        return out

    def with_prefs(self, prefs: Mapping[str, Mapping[str, float]]) -> Objective:
        """This pairwise objective bound to one round's preferences."""
        from dataclasses import replace

        return replace(self, prefs=prefs)


def whole_rubric(rubric: Rubric, flag_cap: float | None) -> Objective:
    return Objective("rubric", rubric, frozenset(c.name for c in rubric.criteria), flag_cap)


def checks_only(rubric: Rubric, flag_cap: float | None, why: str = "", state: str = "untrusted") -> Objective:
    """The deterministic criteria only; ``why`` the judge is ``state`` (untrusted or unproven) goes in the note."""
    note = f"judge {state} ({why}), deterministic criteria only" if why else "deterministic criteria only"
    return Objective("checks", rubric, deterministic(rubric), flag_cap, note=note)


def pairwise(rubric: Rubric, flag_cap: float | None) -> Objective:
    return Objective("pairwise", rubric, frozenset(c.name for c in rubric.criteria), flag_cap, note="pairwise")
