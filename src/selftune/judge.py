"""The rubric grader: one ``Judgment`` per answer, every criterion scored with its rationale.

It combines the three kinds of criteria: ``llm`` criteria scored by the LLM panel (``panel.py``; a
criterion group in one structured output), ``ragas`` metrics (``ragas_metrics.py``, LLM metrics on
the primary judge model) and deterministic ``check`` criteria (``checks.py``). The item's overall is
the weighted mean of its criterion scores, capped by violated must-not rules and by attack flags
(``attacks.py``, computed once per item) through ``objective.cap``, the one place caps are applied.

An answer with an error, or any applicable criterion scored ``invalid``, has no overall (counted,
never 0).
"""

from __future__ import annotations

from typing import Any

from .attacks import attack_flags
from .checks import run_check
from .lm import Role
from .objective import cap, weighted
from .panel import Panel
from .ragas_metrics import LLM_METRICS
from .records import Answer, Judgment, Score
from .rubric import LLMCriterion, RagasCriterion, Rubric


UNSCORED = Score(status="n/a", rationale="not scored: the judge has not earned trust (below the trust bar, or "
                                       "not measured yet), so only a monitoring sample of items is judged by the model")


def has_unscored(judgment: Judgment) -> bool:
    """True when the judge model skipped this item (``judge(..., llm=False)``)."""
    return any(s == UNSCORED for s in judgment.scores.values())


class Judge:
    """Scores answers against a rubric. ``role`` is the judge model, or a panel of them (a list:
    each scores every LLM criterion; the scores combine by ``aggregate``); None when the rubric needs
    no model. The first member is the primary: it runs the ragas LLM metrics."""

    def __init__(self, rubric: Rubric, role: Role | list[Role] | None, seed: int = 0, method: str = "auto",
                 flag_cap: float | None = 0.0, embedder: Any = None, aggregate: str = "mean"):
        roles = [] if role is None else list(role) if isinstance(role, (list, tuple)) else [role]
        if rubric.needs_judge_model() and not roles:
            raise ValueError("the rubric has llm (or ragas LLM) criteria but no judge model was given")
        self.rubric, self.flag_cap, self.embedder = rubric, flag_cap, embedder
        self.panel = Panel(roles, seed=seed, method=method, aggregate=aggregate) if roles else None
        self.ragas = None
        if rubric.ragas_criteria():
            from .ragas_metrics import RagasScorer

            self.ragas = RagasScorer(roles[0] if roles else None, embedder)

    def variant(self, rubric: Rubric | None = None, roles: list[Role] | None = None, seed: int = 0) -> Judge:
        """The same judge with another rubric (e.g. calibration examples added) or other roles
        (e.g. the response cache bypassed), and a new fence seed."""
        p = self.panel
        return Judge(rubric or self.rubric, roles if roles is not None else (p.roles if p else None), seed=seed,
                     method=p.method if p else "auto", flag_cap=self.flag_cap, embedder=self.embedder,
                     aggregate=p.aggregate if p else "mean")

    def score_ragas(self, c: RagasCriterion, answer: Answer) -> Score:
        assert self.ragas is not None
        return self.ragas.score(c.metric, dict(c.options), answer)

    @property
    def concurrency(self) -> int:
        """Items this judge may score at once: the panel's (``Panel.concurrency``); 1 with ragas metrics
        (their scorer keeps state per call) or no model."""
        if self.panel is None or self.ragas is not None:
            return 1
        return self.panel.concurrency

    def reserve(self, answer: Answer, llm: bool = True) -> list[str]:
        """The fence tokens ``judge(answer, llm)`` will use, drawn now: one per LLM criterion group and
        panel member. Drawn in item order before items are judged concurrently, they make each item's
        prompts (and cache keys) those of a sequential run."""
        if self.panel is None or answer.error is not None or not llm:
            return []
        return self.panel.draw(len(self.rubric.llm_groups()) * len(self.panel.roles))

    def judge(self, answer: Answer, llm: bool = True, tokens: list[str] | None = None) -> Judgment:
        """Every criterion on one answer. ``llm=False`` leaves the model-scored criteria unscored
        (``n/a``, said in the rationale): below the trust bar they cannot count, so only a monitoring
        sample of items pays for them. ``tokens``: the fence tokens ``reserve`` drew for it."""
        if tokens is not None and self.panel is not None:
            with self.panel.using(tokens):
                return self.judge(answer, llm)
        if answer.error is not None:
            scores = {c.name: Score(status="invalid", rationale=f"no answer: {answer.error}")
                      for c in self.rubric.criteria}
            return Judgment(answer=answer, scores=scores, overall=None)
        flags = attack_flags(answer.text, answer.probe.question)
        by_name: dict[str, Score] = {}
        for group in self.rubric.llm_groups() if llm else []:
            assert self.panel is not None
            by_name.update(self.panel.score_group(group, answer, flags))
        scores: dict[str, Score] = {}
        for c in self.rubric.criteria:
            if isinstance(c, LLMCriterion):
                scores[c.name] = by_name[c.name] if llm else UNSCORED
            elif isinstance(c, RagasCriterion):
                scores[c.name] = (self.score_ragas(c, answer) if llm or c.metric not in LLM_METRICS
                                  else UNSCORED)
            else:
                scores[c.name] = run_check(c.check, answer)
        rule_scores = [(r, run_check(r.check, answer)) for r in self.rubric.must_not]
        violated = [r for r, s in rule_scores if s.status == "ok" and (s.value or 0.0) < 0.5]
        overall, capped = cap(weighted(self.rubric, scores), violated, flags, self.flag_cap)
        return Judgment(answer=answer, scores=scores, overall=overall, capped_by=capped, flags=flags)
