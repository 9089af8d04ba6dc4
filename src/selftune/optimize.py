"""The optimizer: ``propose(history) -> (params, notes)``.

Retrieval settings come from a seeded Optuna sampler told the validation score of every evaluated
round. Text params (``instructions``) are rewritten by the optimizer model from the incumbent's
lowest-scored *train* items and their rationales (reflective, GEPA-style). A rewrite that is empty,
too long or smuggles fence/markup text is rejected; the fallback appends the user's own description
of the weakest criterion. The optimizer is handed only train and validation rounds: the test split
never exists in what it sees. It climbs the same ``Objective`` the gate promotes on (``steer``), so
below the trust bar it chases the deterministic criteria only.
"""

from __future__ import annotations

import logging
from typing import Any

import dspy
import optuna

from .config import ChoiceParam, IntParam, OptimizerSpec, ParamSpec, TextParam
from .lm import Role
from .objective import Objective, whole_rubric
from .records import Evaluation, Judgment, Params, Round
from .rubric import Rubric

log = logging.getLogger(__name__)


class ImproveInstructions(dspy.Signature):
    """Rewrite the instructions of a question-answering assistant so it avoids the failures shown.
    Output only the new instructions, in two or three sentences."""

    current_instructions: str = dspy.InputField()
    failures: str = dspy.InputField(desc="questions answered badly, with the grader's reasons")
    new_instructions: str = dspy.OutputField()


def distributions(space: dict[str, ParamSpec]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, IntParam):
            out[name] = optuna.distributions.IntDistribution(spec.low, spec.high)
        elif isinstance(spec, ChoiceParam):
            out[name] = optuna.distributions.CategoricalDistribution(spec.choices)
    return out


def describe_failures(judgments: list[Judgment], k: int, objective: Objective) -> str:
    """The ``k`` lowest-scored items on ``objective`` with the reasons of the criteria it counts
    that they fail."""
    criteria = objective.criteria
    scored = [(v, j) for j in judgments if (v := objective.item(j)) is not None]
    worst = [j for _, j in sorted(scored, key=lambda vj: vj[0])[:k]]
    lines = []
    for j in worst:
        why = "; ".join(f"{n}: {s.rationale}" for n, s in j.scores.items()
                        if s.status == "ok" and (s.value or 0) < 0.5 and n in criteria)
        lines.append(f"Q: {j.answer.probe.question}\nA: {j.answer.text[:300]}\nWhy bad: {why[:400]}")
    return "\n\n".join(lines)


def validate_rewrite(text: str, spec: TextParam, current: str) -> str | None:
    """The reason a rewrite is rejected, or None if it is acceptable."""
    if len(text.split()) < 5:
        return "too short"
    if len(text) > spec.max_chars:
        return f"longer than {spec.max_chars} characters"
    if any(t in text for t in ("<<", ">>", "```", "Rationale:", "Score:")):
        return "contains fence or grader markup"
    if text.strip() == current.strip():
        return "unchanged"
    return None


class Optimizer:
    def __init__(self, space: dict[str, ParamSpec], rubric: Rubric, role: Role, spec: OptimizerSpec, seed: int):
        self.space, self.rubric, self.role, self.spec = space, rubric, role, spec
        self.dists = distributions(space)
        self.seed = seed
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._next = 1
        # What the optimizer climbs: the whole rubric, until steer() hands it another objective.
        self.objective = whole_rubric(rubric, 0.0)
        self._new_study()

    def _new_study(self) -> None:
        sampler = (optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=3, multivariate=True)
                   if self.spec.sampler == "tpe" else optuna.samplers.RandomSampler(seed=self.seed))
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self._pending: dict[int, optuna.trial.Trial] = {}
        self._told: set[int] = set()

    def steer(self, objective: Objective) -> None:
        """Climb ``objective`` and show the rewriter only the reasons of its criteria. Called with
        each trust verdict, so the optimizer chases the same signal the gate promotes on; when what
        an item scores changes, the sampler's history is re-scored on the new signal."""
        old = self.objective
        self.objective = objective
        if (old.kind == "checks", old.criteria) != (objective.kind == "checks", objective.criteria):
            self._new_study()

    def value(self, ev: Evaluation) -> float | None:
        return self.objective.mean(ev)

    def _tell(self, history: list[Round]) -> None:
        for r in history:
            if r.index in self._told:
                continue
            value = self.value(r.val)
            if r.index in self._pending:
                trial = self._pending.pop(r.index)
                if value is None:
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    self.study.tell(trial, value)
            elif value is not None and self.dists:  # the baseline, or a round from another proposer
                params = {k: r.params[k] for k in self.dists}
                self.study.add_trial(optuna.trial.create_trial(params=params, distributions=self.dists, value=value))
            self._told.add(r.index)

    def propose(self, history: list[Round]) -> tuple[Params, tuple[str, ...]]:
        """Next candidate from the incumbent (the last round's ``incumbent_index``)."""
        self._tell(history)
        incumbent = next(r for r in history if r.index == history[-1].incumbent_index)
        params: Params = dict(incumbent.params)
        notes: list[str] = []
        if self.dists:
            trial = self.study.ask(self.dists)
            self._pending[self._next] = trial
            params.update(trial.params)
        self._next += 1
        for name, spec in self.space.items():
            if isinstance(spec, TextParam):
                params[name], note = self._rewrite(str(incumbent.params[name]), incumbent, spec)
                notes.append(f"{name}: {note}")
        return params, tuple(notes)

    def _rewrite(self, current: str, incumbent: Round, spec: TextParam) -> tuple[str, str]:
        failures = describe_failures(list(incumbent.train.judgments), self.spec.worst_k, self.objective)
        try:
            with self.role.context():
                text = str(dspy.Predict(ImproveInstructions)(current_instructions=current, failures=failures).new_instructions)
            text = text.strip().strip('"').strip()
            reason = validate_rewrite(text, spec, current)
        except Exception as err:
            text, reason = "", f"optimizer call failed: {type(err).__name__}"
        if reason is None:
            return text, "rewritten by the optimizer model"
        hint = self._weakest_hint(incumbent)
        if hint and hint not in current and len(current) + len(hint) + 1 <= spec.max_chars:
            return f"{current} {hint}", f"rewrite rejected ({reason}); appended the weakest criterion's description"
        return current, f"rewrite rejected ({reason}); kept"

    def _weakest_hint(self, incumbent: Round) -> str | None:
        means = [(incumbent.train.criterion_mean(c.name), c) for c in self.rubric.criteria
                 if c.description and c.name in self.objective.criteria]
        means = [(m, c) for m, c in means if m is not None]
        if not means:
            return None
        _, c = min(means, key=lambda mc: mc[0])
        return c.description.strip().rstrip(".") + "."
