"""Multi-fidelity search: screen retrieval settings on a cheap objective, then search full candidates.

Built from Optuna parts (samplers, pruners, ask/tell); nothing here samples by itself. Plain dicts of
params in, floats out: the tune and the grid benchmark (``gridbench``) drive the same code.

Contract
--------
``MultiFidelitySearch(retrieval, other, cheap, seed=...)``

- ``retrieval``: name -> the finite choices of one retrieval param (e.g. ``top_k: [1, 2, 3, 4]``).
  ``other``: name -> choices (a sequence) or an Optuna distribution (generation settings, demos, an
  instruction-pool index, a generator model). Names must not overlap.
- **Stage 1** (``screen()``, run by the first ``ask()``): ``cheap(retrieval_params) -> float | None``
  scores retrieval settings (higher is better; None = failed, recorded, never carried). A grid of
  at most ``screen_budget`` settings is screened whole; a larger one by a seeded TPE study on the cheap
  objective until ``screen_budget`` distinct settings are scored. Each setting is scored at most once.
- **Carry**: the ``carry`` best screened settings, plus any tied with the last one, plus the
  baseline's retrieval setting, go forward. Ties are carried because a cheap objective that cannot
  separate settings (all 0, say) is no ground to drop any of them.
- **Stage 2**: a TPE study (multivariate, seeded, ``n_startup_trials``) over the carried values of
  each retrieval param x ``other``. A sampled retrieval combination that was not carried is recorded
  as pruned without intermediate value (TPE learns to avoid it) and never reaches the caller; a
  sampled candidate already evaluated is told its known value again and never reaches the caller. After
  ``patience`` such internal draws in a row, or once every carried candidate is evaluated, the next
  ``carry`` screened settings join the carried set (the study is rebuilt on the wider space and
  replayed). If nothing is left to carry, a seeded draw among the unevaluated candidates is enqueued;
  when there is none, ``ask()`` raises ``Exhausted``.
- ``ask() -> Candidate`` (its ``params`` are retrieval + other, one dict); then exactly one of
  ``tell(cand, value)`` (a float; None = the evaluation failed: recorded as FAIL, never a score) or
  ``prune(cand)``. Between them ``report(cand, step, value)`` gives the mean on a growing slice
  (``step`` = items scored so far, the same slice sizes for every candidate) and ``should_prune(cand)``
  asks the pruner (default: Optuna's ``PercentilePruner(75)``, i.e. prune a candidate in the bottom
  quarter at that step once 3 trials have completed). A pruned candidate is recorded as pruned,
  never as a score, and never becomes ``best()``.
- ``baseline``: its params are the first candidate ``ask()`` returns. ``add(params, value)`` records
  a candidate evaluated elsewhere (e.g. a tune's round 0) as a complete trial.
- ``ledger``: cheap look-ups and full evaluations counted separately (see ``Ledger``).
- Same arguments and same told values -> the same sequence of candidates (no global RNG).
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

Value = Any  # a hashable scalar: int, float, str, bool or None
Params = dict[str, Value]


class Exhausted(Exception):
    """Every candidate of a finite space has been evaluated."""


@dataclass(frozen=True)
class Candidate:
    number: int  # the stage-2 trial number
    params: Params


@dataclass
class Ledger:
    """What the search spent: distinct cheap look-ups and candidates handed out, by outcome."""

    cheap: int = 0  # retrieval settings scored by the cheap objective (failed ones included)
    full: int = 0  # candidates told a value
    pruned: int = 0  # candidates stopped by the pruner (they cost part of a full evaluation)
    failed: int = 0  # candidates told None
    repeats: int = 0  # internal draws answered from memory (already evaluated or not carried): free

    def cost(self, cheap_weight: float) -> float:
        """Full-evaluation equivalents when a cheap look-up costs ``cheap_weight`` of a full one."""
        return self.full + self.failed + self.pruned + cheap_weight * self.cheap


def _key(params: Mapping[str, Value]) -> tuple[tuple[str, Value], ...]:
    return tuple(sorted(params.items()))


def _size(dist: BaseDistribution) -> float:
    """How many values a distribution holds (inf for a continuous one)."""
    if isinstance(dist, CategoricalDistribution):
        return len(dist.choices)
    if isinstance(dist, IntDistribution):
        return (dist.high - dist.low) // dist.step + 1
    return math.inf


@dataclass
class MultiFidelitySearch:
    retrieval: Mapping[str, Sequence[Value]]
    other: Mapping[str, Sequence[Value] | BaseDistribution]
    cheap: Callable[[Params], float | None]
    seed: int
    carry: int = 8
    screen_budget: int = 64
    n_startup_trials: int = 5
    patience: int = 20
    baseline: Params | None = None
    pruner: optuna.pruners.BasePruner | None = None
    ledger: Ledger = field(default_factory=Ledger)

    def __post_init__(self) -> None:
        overlap = set(self.retrieval) & set(self.other)
        if overlap:
            raise ValueError(f"retrieval and other params must not share names, but both have {sorted(overlap)}")
        if self.carry < 1:
            raise ValueError(f"carry >= 1 must hold, but got carry={self.carry}")
        self._other = {n: d if isinstance(d, BaseDistribution) else CategoricalDistribution(list(d))
                       for n, d in self.other.items()}
        self._rng = random.Random(self.seed)
        self.scores: dict[tuple, float | None] = {}  # cheap score per retrieval setting (stage 1)
        self.carried: list[Params] = []
        self._known: dict[tuple, float] = {}  # full value per evaluated candidate
        self._done: list[FrozenTrial] = []  # every finished trial, replayed when the study is rebuilt
        self._pending: dict[int, optuna.trial.Trial] = {}
        self._study: optuna.Study | None = None
        self._widened = 0
        self._failed: set[tuple] = set()  # candidates whose evaluation failed: not handed out again
        if self.baseline is not None:
            bad = [n for n in [*self.retrieval, *self._other] if n not in self.baseline]
            bad += [n for n, c in self.retrieval.items() if n in self.baseline and self.baseline[n] not in c]
            if bad:
                raise ValueError(f"baseline must give a value within the space for every param, but not for {bad}")

    # ---- stage 1 -------------------------------------------------------------------------------
    def _cheap(self, setting: Params) -> float | None:
        k = _key(setting)
        if k not in self.scores:
            self.ledger.cheap += 1
            self.scores[k] = self.cheap(dict(setting))
        return self.scores[k]

    def screen(self) -> list[Params]:
        """Run stage 1 (once); return the carried retrieval settings."""
        if not self.scores:
            names = list(self.retrieval)
            self._grid = [dict(zip(names, v)) for v in itertools.product(*(self.retrieval[n] for n in names))]
            self._s1 = optuna.create_study(direction="maximize", sampler=self._tpe(self.seed))
            self._screen_more(self.screen_budget)
            if not any(v is not None for v in self.scores.values()):
                raise RuntimeError("stage 1: the cheap objective failed on every retrieval setting screened")
            self._extend(self.carry)
        return self.carried

    def _screen_more(self, n: int) -> None:
        """Score ``n`` more settings: the whole grid if it holds at most ``screen_budget``, else the
        ones a TPE study on the cheap objective proposes (a seeded random draw if it only repeats)."""
        if len(self._grid) <= self.screen_budget:
            n = len(self._grid)
        goal = min(len(self.scores) + n, len(self._grid))
        if len(self._grid) <= self.screen_budget:
            for setting in self._grid:
                self._cheap(setting)
        dists = {n: CategoricalDistribution(list(v)) for n, v in self.retrieval.items()}
        for _ in range(20 * n):
            if len(self.scores) >= goal:
                return
            trial = self._s1.ask(dists)
            value = self._cheap(trial.params)  # a repeat is answered from memory and told again
            self._s1.tell(trial, value, state=TrialState.FAIL if value is None else TrialState.COMPLETE)
        left = [s for s in self._grid if _key(s) not in self.scores]
        for setting in self._rng.sample(left, goal - len(self.scores)):
            self._cheap(setting)

    def _extend(self, n: int) -> bool:
        """Carry the ``n`` best screened settings not yet carried (and any tied with the last),
        screening more when too few are left; False if the whole grid is carried already."""
        def ranked() -> list[Params]:
            scored = [(v, i, dict(k)) for i, (k, v) in enumerate(self.scores.items())
                      if v is not None and dict(k) not in self.carried]
            return [s for _, _, s in sorted(scored, key=lambda t: (-t[0], t[1]))]

        if len(ranked()) < n and len(self.scores) < len(self._grid):
            self._screen_more(n - len(ranked()))
        order = ranked()
        if not order:
            return False
        end = min(n, len(order))
        while end < len(order) and self._score(order[end]) == self._score(order[end - 1]):
            end += 1
        self.carried.extend(order[:end])
        if self.baseline is not None:
            base = {n: self.baseline[n] for n in self.retrieval}
            if base not in self.carried:
                self.carried.append(base)
        return True

    def _score(self, setting: Params) -> float | None:
        return self.scores[_key(setting)]

    # ---- stage 2 -------------------------------------------------------------------------------
    def _tpe(self, seed: int) -> optuna.samplers.TPESampler:
        with warnings.catch_warnings():  # multivariate TPE is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials, multivariate=True)

    def _space(self) -> dict[str, BaseDistribution]:
        dims: dict[str, BaseDistribution] = {}
        for n, choices in self.retrieval.items():
            kept = [c for c in choices if any(s[n] == c for s in self.carried)]
            dims[n] = CategoricalDistribution(kept)
        return {**dims, **self._other}

    def _build(self) -> None:
        self._dists = self._space()
        pruner = self.pruner or optuna.pruners.PercentilePruner(75.0, n_startup_trials=3, n_min_trials=3)
        self._study = optuna.create_study(direction="maximize", sampler=self._tpe(self.seed + self._widened),
                                          pruner=pruner)
        for t in self._done:
            self._study.add_trial(optuna.trial.create_trial(
                state=t.state, value=t.value, params=t.params, distributions=self._dists,
                intermediate_values=t.intermediate_values, system_attrs=t.system_attrs))
        if self.baseline is not None and not self._done:
            self._study.enqueue_trial(self.baseline)

    def _finite_size(self) -> float:
        return len(self.carried) * math.prod(_size(d) for d in self._other.values())

    def _widen(self) -> None:
        if self._extend(self.carry):
            self._widened += 1
            self._build()
            return
        unseen = self._unevaluated()
        if unseen is None:  # a continuous space never runs out; let TPE repeat itself
            return
        if not unseen:
            raise Exhausted("every candidate of the carried space has been evaluated")
        assert self._study is not None
        self._study.enqueue_trial(self._rng.choice(unseen))

    def _unevaluated(self) -> list[Params] | None:
        if math.isinf(self._finite_size()) or self._finite_size() > 100_000:
            return None
        names = list(self._other)
        values = [list(self._other[n].choices) if isinstance(self._other[n], CategoricalDistribution)
                  else list(range(self._other[n].low, self._other[n].high + 1, self._other[n].step))
                  for n in names]
        out = []
        for setting in self.carried:
            for vals in itertools.product(*values):
                p = {**setting, **dict(zip(names, vals))}
                if _key(p) not in self._known and _key(p) not in self._failed:
                    out.append(p)
        return out

    def _finish(self, trial: optuna.trial.Trial, state: TrialState, value: float | None = None) -> None:
        assert self._study is not None
        frozen = self._study.tell(trial, value, state=state, skip_if_finished=False)
        self._done.append(frozen)

    def ask(self) -> Candidate:
        """The next candidate: never one already evaluated, never outside the carried settings."""
        if self._study is None:
            self.screen()
            self._build()
        assert self._study is not None
        idle = 0
        while True:
            if idle >= self.patience or len(self._known) + len(self._failed) >= self._finite_size():
                self._widen()
                idle = 0
            trial = self._study.ask(self._dists)
            params = dict(trial.params)
            setting = {n: params[n] for n in self.retrieval}
            if setting not in self.carried:
                self._finish(trial, TrialState.PRUNED)
            elif _key(params) in self._known:
                self._finish(trial, TrialState.COMPLETE, self._known[_key(params)])
            elif _key(params) in self._failed:
                self._finish(trial, TrialState.FAIL)
            else:
                self._pending[trial.number] = trial
                return Candidate(trial.number, params)
            self.ledger.repeats += 1
            idle += 1

    def report(self, cand: Candidate, step: int, value: float) -> None:
        self._pending[cand.number].report(value, step)

    def should_prune(self, cand: Candidate) -> bool:
        return self._pending[cand.number].should_prune()

    def tell(self, cand: Candidate, value: float | None) -> None:
        trial = self._pending.pop(cand.number)
        if value is None:
            self.ledger.failed += 1
            self._failed.add(_key(cand.params))
            self._finish(trial, TrialState.FAIL)
            return
        self.ledger.full += 1
        self._known[_key(cand.params)] = value
        self._finish(trial, TrialState.COMPLETE, value)

    def prune(self, cand: Candidate) -> None:
        self.ledger.pruned += 1
        self._finish(self._pending.pop(cand.number), TrialState.PRUNED)

    def add(self, params: Params, value: float) -> None:
        """Record a candidate evaluated elsewhere (e.g. the tune's baseline round)."""
        if self._study is None:
            self.screen()
            self._build()
        assert self._study is not None
        for n, c in ((n, params[n]) for n in self.retrieval):
            if c not in self._dists[n].choices:  # type: ignore[attr-defined]
                raise ValueError(f"{n}={c!r} is not a carried value; carried: {self._dists[n]}")
        self._known[_key(params)] = value
        trial = optuna.trial.create_trial(params=params, distributions=self._dists, value=value)
        self._study.add_trial(trial)
        self._done.append(self._study.trials[-1])

    def best(self) -> tuple[Params, float] | None:
        """The best evaluated candidate and its value (pruned and failed ones never count)."""
        if not self._known:
            return None
        k, v = max(self._known.items(), key=lambda kv: kv[1])
        return dict(k), v
