"""Multi-fidelity search: screen retrieval settings on a cheap objective, then search full candidates.

Built from Optuna parts (a seeded multivariate TPE sampler, a pruner, ask/tell); nothing here samples
by itself. Plain dicts of params in, floats out: the tune and the grid benchmark (``gridbench``) drive
the same code.

Contract
--------
``MultiFidelitySearch(retrieval, other, cheap, seed=...)``

- ``retrieval``: name -> the finite choices of one retrieval param (e.g. ``top_k: [1, 2, 3, 4]``).
  ``other``: name -> choices (a sequence) or an Optuna distribution (generation settings, demos, an
  instruction-pool index, a generator model). Names must not overlap.
- **Stage 1, cheap fidelity.** ``cheap(retrieval_params) -> float | None`` scores a retrieval setting
  (higher is better; None = failed: recorded, never carried). ``screen()`` (run by the first
  ``ask()``) scores the whole grid when it has at most ``screen_budget`` settings, else a seeded
  random sample of ``screen_budget`` of them (random, so that the sample's quantiles estimate the
  grid's); stage 2 scores any other setting it draws, when it draws it. No setting is scored twice.
- **Carry.** A setting is *carried* when its cheap score is at least that of the ``ceil(carry x n)``-th
  best of the ``n`` settings scored so far (ties are carried: a cheap objective that cannot separate
  settings is no ground to drop any). The baseline's setting is always carried.
- **Stage 2, full fidelity.** A TPE study (multivariate, seeded, ``n_startup_trials``) over every
  retrieval param x ``other``. A draw whose setting is not carried is recorded as pruned, with its
  cheap score as the value at step 0 (so TPE learns where the cheap objective is low); a draw already
  evaluated is told its known value again (a failed one, FAIL again). Neither reaches the caller, and
  both are free. After ``idle_draws`` such draws in a row, ``carry`` widens by ``widen`` (the carried
  set has been worked through); at ``carry == 1`` a seeded draw among the unevaluated candidates of
  a finite space is enqueued, and when there is none, ``ask()`` raises ``Exhausted``.
- ``ask() -> Candidate`` (its ``params``: retrieval + other in one dict), then exactly one of
  ``tell(cand, value)`` (a float; None = the evaluation failed: recorded as FAIL, never a score, not
  handed out again) or ``prune(cand)``. Between them, ``report(cand, step, value)`` gives the mean on a
  growing slice (``step`` >= 1 = items scored so far; the same slice sizes for every candidate) and
  ``should_prune(cand)`` asks the pruner (default: Optuna's ``PercentilePruner(75)``: stop a candidate
  in the bottom quarter at that step, once 3 trials have completed). A pruned candidate is recorded as
  pruned, never as a score, and never becomes ``best()``.
- ``baseline``: the first candidate ``ask()`` returns. ``add(params, value)`` records a candidate
  evaluated elsewhere (e.g. a tune's round 0) as complete; it is not handed out again.
- ``ledger``: cheap look-ups and full evaluations counted separately (``Ledger``).
- Same arguments and same told values -> the same sequence of candidates (no global RNG).
- ``storage`` + ``study_name``: the study lives in an Optuna storage (``studies.open_storage``) and is
  continued when it exists. Stage 1's scores and the carry share are study user attrs, every evaluation
  a trial, so a restarted search or another process sharing the study screens nothing again, is never
  handed a candidate already evaluated, failed, or RUNNING in another process (see ``studies.py``).
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

Value = Any  # a hashable scalar: int, float, str, bool or None
Params = dict[str, Value]
Key = tuple[tuple[str, Value], ...]
STAGE1 = "selftune.stage1"  # study user attr: [[setting, cheap score], ...]
CARRY = "selftune.carry"  # study user attr: the carry share after widening
REPEAT = "selftune.repeat"  # trial user attr: a trial that holds no evaluation of its own (why)


def _heartbeat(storage: optuna.storages.BaseStorage | None) -> bool:
    return storage is not None and getattr(storage, "get_heartbeat_interval", lambda: None)() is not None


class Exhausted(Exception):
    """Every candidate of a finite space has been evaluated."""


@dataclass(frozen=True)
class Candidate:
    number: int  # the stage-2 trial number
    params: Params


@dataclass
class Ledger:
    """What the search spent, cheap look-ups and candidates handed out counted apart."""

    cheap: int = 0  # retrieval settings scored by the cheap objective (failed ones included)
    full: int = 0  # candidates told a value
    pruned: int = 0  # candidates stopped on a slice (each cost part of a full evaluation)
    failed: int = 0  # candidates told None
    repeats: int = 0  # draws answered without the caller (not carried, or known): free

    def cost(self, cheap_weight: float) -> float:
        """Full-evaluation equivalents when a cheap look-up costs ``cheap_weight`` of a full one
        (a pruned or failed candidate counted as a full one: an upper bound)."""
        return self.full + self.pruned + self.failed + cheap_weight * self.cheap


def _key(params: Mapping[str, Value]) -> Key:
    return tuple(sorted(params.items()))


def _values(dist: BaseDistribution) -> list[Value] | None:
    """Every value of a finite distribution (None for a continuous one)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    return None


def _within(dist: BaseDistribution, value: Value) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    assert isinstance(dist, (IntDistribution, FloatDistribution)), f"unsupported distribution {dist!r}"
    return isinstance(value, (int, float)) and dist.low <= value <= dist.high


@dataclass
class MultiFidelitySearch:
    """The two-stage search of the module docstring.

    Defaults, and why: ``carry=0.4`` (the best 40% go forward; 10 of the tune's 24 settings) was the
    best of 0.3 / 0.4 / 0.5 on the Dev splits of the RAG-HPO grid (``gridbench``), where the Dev-best
    configuration's retrieval setting ranks 6th, 14th and 16th of 54 by the cheap score on three
    datasets (46th on the fourth, where the cheap score misleads; all tie on the fifth): a share
    much below a third would drop it; ``screen_budget=64`` screens small grids whole
    (free in LM calls in the tune); ``n_startup_trials=5`` as in the README's TPE baseline;
    ``idle_draws=30`` / ``widen=0.15``: widening rarely triggers before the carried space is worked
    through, and the results moved little between 15 and 60 draws. ``sampler="gp"`` (Optuna's
    GPSampler in stage 2) reached the grid's targets at 12.4 trials on average over seeds 100-129
    against 16.6 for multivariate TPE over seeds 100-199 (``gridbench``); the tune keeps TPE until the
    GP sampler has been measured there (it costs seconds per draw with many trials).
    """

    retrieval: Mapping[str, Sequence[Value]]
    other: Mapping[str, Sequence[Value] | BaseDistribution]
    cheap: Callable[[Params], float | None]
    seed: int
    carry: float = 0.4
    screen_budget: int = 64
    n_startup_trials: int = 5
    idle_draws: int = 30
    widen: float = 0.15
    baseline: Params | None = None
    pruner: optuna.pruners.BasePruner | None = None
    ledger: Ledger = field(default_factory=Ledger)
    storage: optuna.storages.BaseStorage | None = None  # None: in memory (studies.open_storage makes one)
    sampler: str = "tpe"  # stage 2's Optuna sampler: "tpe" (multivariate TPE) or "gp" (GPSampler)
    deterministic: bool = False  # the objective has no noise (a table look-up): lets "gp" skip its noise term
    study_name: str | None = None  # with a storage: the study to create or continue

    def __post_init__(self) -> None:
        if set(self.retrieval) & set(self.other):
            raise ValueError(f"retrieval and other params must not share names, but both have "
                             f"{sorted(set(self.retrieval) & set(self.other))}")
        if self.sampler not in ("tpe", "gp"):
            raise ValueError(f"sampler must be 'tpe' or 'gp', but got {self.sampler!r}")
        if not 0 < self.carry <= 1:
            raise ValueError(f"0 < carry <= 1 must hold, but got carry={self.carry}")
        dims = {n: CategoricalDistribution(list(c)) for n, c in self.retrieval.items()}
        other = {n: d if isinstance(d, BaseDistribution) else CategoricalDistribution(list(d))
                 for n, d in self.other.items()}
        self._dists: dict[str, BaseDistribution] = {**dims, **other}
        if self.baseline is not None:
            bad = [n for n, d in self._dists.items() if n not in self.baseline or not _within(d, self.baseline[n])]
            if bad:
                raise ValueError(f"baseline must give a value within the space for every param, but not for {bad}")
        self.scores: dict[Key, float | None] = {}  # cheap score per retrieval setting scored
        self._rng = random.Random(self.seed)
        self._known: dict[Key, float] = {}  # full value per evaluated candidate
        self._failed: set[Key] = set()
        self._pending: dict[int, optuna.trial.Trial] = {}
        self._beats: dict[int, tuple[threading.Event, threading.Thread]] = {}  # heartbeats of pending trials
        self._in_flight: set[Key] = set()  # candidates another process is evaluating (RUNNING trials)
        self._study: optuna.Study | None = None
        self._screening = False
        self.screen_seconds = 0.0  # wall time stage 1's screen took in this process (a one-off, not a round's)

    # ---- stage 1 -------------------------------------------------------------------------------
    def _setting(self, params: Mapping[str, Value]) -> Params:
        return {n: params[n] for n in self.retrieval}

    def _score(self, setting: Params) -> float | None:
        k = _key(setting)
        if k not in self.scores:
            self.ledger.cheap += 1
            self.scores[k] = self.cheap(dict(setting))
            if not self._screening:
                self._save_scores()
        return self.scores[k]

    def _save_scores(self) -> None:
        """Stage 1's scores into the study (user attr ``selftune.stage1``), for every process sharing it."""
        if self._study is not None:
            self._study.set_user_attr(STAGE1, [[dict(k), v] for k, v in self.scores.items()])

    def _load_scores(self) -> None:
        """Merge the scores other processes saved (the cheap objective is deterministic: same values)."""
        assert self._study is not None
        for setting, v in self._study.user_attrs.get(STAGE1, []):
            self.scores.setdefault(_key(setting), v)
        self.carry = max(self.carry, float(self._study.user_attrs.get(CARRY, self.carry)))

    def screen(self) -> list[Params]:
        """Run stage 1 (once per study: a shared or restarted study hands back the scores it holds);
        return the carried settings, best cheap score first."""
        self._open()
        if not self.scores:
            self._load_scores()
        if not self.scores:
            names = list(self.retrieval)
            grid = [dict(zip(names, v)) for v in itertools.product(*(self.retrieval[n] for n in names))]
            self._screening = True
            t0 = time.perf_counter()
            try:
                for setting in grid if len(grid) <= self.screen_budget else self._rng.sample(grid, self.screen_budget):
                    self._score(setting)
            finally:
                self._screening = False
                self.screen_seconds += time.perf_counter() - t0
            if all(v is None for v in self.scores.values()):
                raise RuntimeError("stage 1: the cheap objective failed on every retrieval setting screened")
            self._save_scores()
        return self.carried

    def _threshold(self) -> float:
        ranked = sorted((v for v in self.scores.values() if v is not None), reverse=True)
        return ranked[max(0, math.ceil(self.carry * len(ranked)) - 1)] if ranked else math.inf

    def _carried(self, setting: Params) -> bool:
        if self.baseline is not None and setting == self._setting(self.baseline):
            return True
        value = self._score(setting)
        return value is not None and value >= self._threshold()

    @property
    def carried(self) -> list[Params]:
        """The scored settings carried now, best cheap score first (the baseline's too)."""
        scored = sorted(((v, k) for k, v in self.scores.items() if v is not None), key=lambda vk: -vk[0])
        out = [dict(k) for v, k in scored if v >= self._threshold()]
        if self.baseline is not None and self._setting(self.baseline) not in out:
            out.append(self._setting(self.baseline))
        return out

    # ---- stage 2 -------------------------------------------------------------------------------
    def _open(self) -> optuna.Study:
        """The study: in memory, or created in (or loaded from) ``storage`` under ``study_name``. A new
        study gets the baseline enqueued; a continued one already holds it."""
        if self._study is None:
            with warnings.catch_warnings():  # multivariate TPE is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                sampler: optuna.samplers.BaseSampler
                if self.sampler == "gp":
                    sampler = optuna.samplers.GPSampler(seed=self.seed, n_startup_trials=self.n_startup_trials,
                                                        deterministic_objective=self.deterministic)
                else:
                    sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials,
                                                         multivariate=True)
            pruner = self.pruner or optuna.pruners.PercentilePruner(75.0, n_startup_trials=3, n_min_trials=3)
            self._study = optuna.create_study(storage=self.storage, study_name=self.study_name, load_if_exists=True,
                                              direction="maximize", sampler=sampler, pruner=pruner)
            if self.baseline is not None and not self._study.get_trials(deepcopy=False):
                self._study.enqueue_trial(self.baseline)
        return self._study

    def _start(self) -> optuna.Study:
        study = self._open()
        self.screen()
        return study

    def _sync(self, study: optuna.Study) -> None:
        """What every process sharing the study has done: evaluated candidates (COMPLETE), failed ones
        (FAIL, repeats aside), candidates being evaluated elsewhere (RUNNING, not ours), stage 1's
        scores and the carry share."""
        if self.storage is None:
            return
        if _heartbeat(self.storage):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a silent process's candidates: FAIL, re-queued
        self._load_scores()
        self._in_flight = set()
        trials = study.get_trials(deepcopy=False)
        retried = {n for t in trials for n in [t.system_attrs.get("failed_trial"), *t.system_attrs.get(
            "retry_history", [])] if n is not None}
        for t in trials:
            k = _key(t.params)
            if t.state == TrialState.COMPLETE and t.value is not None:
                self._known.setdefault(k, t.value)
            elif t.state == TrialState.FAIL and not t.user_attrs.get(REPEAT) and t.number not in retried:
                self._failed.add(k)
            elif t.state == TrialState.RUNNING and t.number not in self._pending and t.params:
                self._in_flight.add(k)

    def _beat(self, trial: optuna.trial.Trial) -> None:
        """While a candidate is out, record a heartbeat every interval (Optuna's own heartbeat runs only
        inside ``optimize``; ask/tell keeps it with the storage's public ``record_heartbeat``)."""
        if not _heartbeat(self.storage):
            return
        storage: Any = self.storage
        stop, every, trial_id = threading.Event(), storage.get_heartbeat_interval(), trial._trial_id

        def beat() -> None:
            while not stop.wait(every):
                storage.record_heartbeat(trial_id)

        storage.record_heartbeat(trial_id)  # the first before the candidate is handed out: never out unwatched

        thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
        thread.start()
        self._beats[trial.number] = (stop, thread)

    def _unbeat(self, number: int) -> None:
        if number in self._beats:
            stop, thread = self._beats.pop(number)
            stop.set()
            thread.join()

    def _claimed_elsewhere(self, study: optuna.Study, number: int, k: Key) -> bool:
        """Another process drew the same candidate since the last sync: any other trial holding it, running
        or done. Checked after our own draw is stored, so of two processes drawing it at once the later
        check sees the earlier draw: at most one evaluates it (both may step aside; neither is wrong)."""
        if self.storage is None:
            return False
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
            if t.number != number and not t.user_attrs.get(REPEAT) and t.params and _key(t.params) == k:
                self._in_flight.add(k)
                return True
        return False

    def _widen(self, study: optuna.Study) -> None:
        if self.carry < 1:
            self.carry = min(1.0, self.carry + self.widen)
            study.set_user_attr(CARRY, self.carry)
            return
        finite = [v for d in self._dists.values() if (v := _values(d)) is not None]
        if len(finite) < len(self._dists) or math.prod(len(v) for v in finite) > 100_000:
            return  # a continuous (or huge) space never runs out: let TPE repeat itself
        candidates = (dict(zip(self._dists, vals)) for vals in itertools.product(*finite))
        unseen = [p for p in candidates if _key(p) not in self._known and _key(p) not in self._failed]
        if not unseen:
            raise Exhausted("every candidate of the space has been evaluated")
        study.enqueue_trial(self._rng.choice(unseen))

    def ask(self) -> Candidate:
        """The next candidate: carried, and never one already evaluated."""
        study = self._start()
        self._sync(study)
        idle = 0
        while True:
            if idle >= self.idle_draws:
                self._widen(study)
                idle = 0
            with warnings.catch_warnings():  # Optuna expects heartbeats with optimize(); ours are kept below
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask(self._dists)
            params, setting = dict(trial.params), self._setting(trial.params)
            k = _key(params)
            if not self._carried(setting):
                value = self.scores[_key(setting)]
                if value is not None:
                    trial.report(value, 0)
                trial.set_user_attr(REPEAT, "not carried")
                study.tell(trial, state=TrialState.PRUNED)
            elif k in self._known:
                trial.set_user_attr(REPEAT, "evaluated")
                study.tell(trial, self._known[k])
            elif k in self._failed or k in self._in_flight or self._claimed_elsewhere(study, trial.number, k):
                trial.set_user_attr(REPEAT, "failed" if k in self._failed else "being evaluated elsewhere")
                study.tell(trial, state=TrialState.FAIL)
            else:
                self._pending[trial.number] = trial
                self._beat(trial)
                return Candidate(trial.number, params)
            self.ledger.repeats += 1
            idle += 1

    def annotate(self, cand: Candidate, name: str, value: Any) -> None:
        """Keep ``value`` on the candidate's trial (a user attr every process sharing the study can read)."""
        self._pending[cand.number].set_user_attr(name, value)

    def report(self, cand: Candidate, step: int, value: float) -> None:
        if step < 1:
            raise ValueError(f"step >= 1 must hold (step 0 holds cheap scores), but got step={step}")
        self._pending[cand.number].report(value, step)

    def should_prune(self, cand: Candidate) -> bool:
        return self._pending[cand.number].should_prune()

    def tell(self, cand: Candidate, value: float | None) -> None:
        trial = self._pending.pop(cand.number)
        self._unbeat(cand.number)
        assert self._study is not None
        if value is None:
            self.ledger.failed += 1
            self._failed.add(_key(cand.params))
            self._study.tell(trial, state=TrialState.FAIL)
        else:
            self.ledger.full += 1
            self._known[_key(cand.params)] = value
            self._study.tell(trial, value)

    def prune(self, cand: Candidate) -> None:
        self.ledger.pruned += 1
        assert self._study is not None
        self._unbeat(cand.number)
        self._study.tell(self._pending.pop(cand.number), state=TrialState.PRUNED)

    def abandon(self) -> None:
        """Close every candidate handed out and not told (the process is stopping): FAIL, marked as
        holding no evaluation, so a shared or restarted study hands them out again."""
        assert self._study is not None or not self._pending
        for number, trial in list(self._pending.items()):
            self._unbeat(number)
            trial.set_user_attr(REPEAT, "abandoned: its evaluation did not end")
            self._study.tell(trial, state=TrialState.FAIL)  # type: ignore[union-attr]
            del self._pending[number]

    def add(self, params: Params, value: float) -> None:
        """Record a candidate evaluated elsewhere (e.g. the tune's baseline round) as complete."""
        study = self._start()
        self._sync(study)
        self._score(self._setting(params))
        if _key(params) in self._known:  # a continued study already holds it
            return
        study.add_trial(optuna.trial.create_trial(params=params, distributions=self._dists, value=value))
        self._known[_key(params)] = value

    def best(self) -> tuple[Params, float] | None:
        """The best evaluated candidate and its value (pruned and failed ones never count)."""
        if not self._known:
            return None
        k, v = max(self._known.items(), key=lambda kv: kv[1])
        return dict(k), v
