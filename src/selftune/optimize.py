"""The optimizer: ``propose(history) -> (params, notes)``.

Retrieval settings come from a seeded Optuna sampler told the validation score of every evaluated
round. Text params (``instructions``) are rewritten from lowest-scored *train* items and their
rationales (reflective): a parent drawn from the pool of every text evaluated (``pool.py``) is mutated
by one call of the local optimizer model, or by the ``gepa`` library on train minibatches when the
optimizer model is hosted and the loop hands a train evaluation callback. A rewrite that is empty,
too long or smuggles fence/markup text is rejected; the fallback appends the user's own description
of the weakest criterion. The optimizer is handed only train and validation rounds: the test split
never exists in what it sees. It climbs the same ``Objective`` the gate promotes on (``steer``), so
below the trust bar it chases the deterministic criteria only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import dspy
import optuna

from .config import ChoiceParam, IntParam, OptimizerSpec, ParamSpec, TextParam
from .lm import Role
from .objective import Objective, whole_rubric
from .pool import EvaluateTrain, InstructionPool, gepa_mutate
from .records import Evaluation, Judgment, Params, Probe, Round
from .rubric import Rubric

log = logging.getLogger(__name__)


class ImproveInstructions(dspy.Signature):
    """Rewrite the instructions of a question-answering assistant so it avoids the failures shown.
    Output only the new instructions, in two or three sentences."""

    current_instructions: str = dspy.InputField()
    failures: str = dspy.InputField(desc="questions answered badly, with the grader's reasons")
    new_instructions: str = dspy.OutputField()


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


GRADER_TALK = re.compile(r"\b(grader|judge|rubric|evaluator|score|scoring|rating|marks?)\b", re.I)
COPY_WORDS = 6


def _shingles(text: str, n: int = COPY_WORDS) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9_]+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def rewrite_alarms(text: str, shown: list[Judgment], lengths: list[int]) -> list[str]:
    """Reward-hacking alarms on a proposed instruction text: it copies probe text (a run of
    ``COPY_WORDS`` words of a question or reference the optimizer was handed), it talks to the grader
    (attack flags, or words about scores and judges), or it grows longer round after round (longer than
    the last two proposals, each longer than the one before)."""
    from .attacks import attack_flags

    alarms = []
    mine = _shingles(text)
    if any(mine & _shingles(f"{j.answer.probe.question} || {j.answer.probe.reference or ''}") for j in shown):
        alarms.append("copies_probe_text")
    if attack_flags(text) or GRADER_TALK.search(text):
        alarms.append("grader_talk")
    if len(lengths) >= 2 and len(text) > lengths[-1] > lengths[-2]:
        alarms.append("length_creep")
    return alarms


RETRIEVAL = ("top_k", "chunk_size", "chunk_overlap", "hybrid_weight")

# Generation levers moved by rule when the incumbent's validation answers show the failure each one fixes
# (a measured symptom, not a draw): how many answers must show it, as a share of the split and at least.
LEVER_SHARE, LEVER_MIN = 0.1, 2
_ENDS = re.compile(r"[.!?:;)\]\"'`*]\s*$")


def repetitive(j: Judgment) -> bool:
    """The answer degenerated into repetition or filler (the attack check's ``padding:*`` flags)."""
    return any(f.startswith("padding:") for f in j.flags)


def cut_off(j: Judgment) -> bool:
    """The answer stops mid-sentence: it has words and does not end like a sentence (the token budget ran
    out before the model finished)."""
    text = j.answer.text.strip()
    return j.answer.error is None and bool(re.search(r"\w", text)) and not _ENDS.search(text)


LEVERS: dict[str, tuple[Callable[[Judgment], bool], str, str]] = {
    # param: (symptom, what the symptom is called in the notes, how the param moves: "max" or "up")
    "repeat_penalty": (repetitive, "repetitive or padded", "max"),
    "max_tokens": (cut_off, "cut off mid-sentence", "up"),
}


def search_space(space: dict[str, ParamSpec]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """The non-text params as (retrieval choices, other choices or distributions) for the search."""
    retrieval: dict[str, list[Any]] = {}
    other: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, TextParam):
            continue
        if isinstance(spec, IntParam):
            values: Any = list(range(spec.low, spec.high + 1))
        elif isinstance(spec, ChoiceParam):
            values = list(spec.choices)
        else:  # a float range
            values = optuna.distributions.FloatDistribution(spec.low, spec.high)  # type: ignore[attr-defined]
        (retrieval if name in RETRIEVAL and isinstance(values, list) else other)[name] = values
    return retrieval, other


class Optimizer:
    """Proposes one candidate per round, one lever at a time: odd rounds take the next candidate of
    the multi-fidelity search over the non-text params (``search.py``: stage 1 screens retrieval on
    the cheap objective, stage 2 is a TPE study over the carried settings and the other params; the
    first move is the best screened retrieval setting with everything else as the incumbent has it),
    even rounds rewrite the instructions from the incumbent's train failures. A round that changes one
    lever is a gain (or a loss) the report can attribute."""

    def __init__(self, space: dict[str, ParamSpec], rubric: Rubric, role: Role, spec: OptimizerSpec, seed: int,
                 cheap: Callable[[Params], float | None] | None = None,
                 storage: optuna.storages.BaseStorage | None = None, study: str | None = None):
        self.space, self.rubric, self.role, self.spec = space, rubric, role, spec
        self.seed, self.cheap = seed, cheap
        self.storage, self.study = storage, study  # optimizer.storage: a shared, lasting study (studies.py)
        self.retrieval, self.other = search_space(space)
        if cheap is None:  # no cheap fidelity (a custom system under test): everything is stage 2
            self.other.update(self.retrieval)
            self.retrieval = {}
        self.text = [n for n, s in space.items() if isinstance(s, TextParam)]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # What the optimizer climbs: the whole rubric, until steer() hands it another objective.
        self.objective = whole_rubric(rubric, 0.0)
        self.alarms: dict[str, int] = {}  # rewrites rejected by a reward-hacking alarm, by alarm
        self.pruned_reason = ""
        self._lengths: list[int] = []  # lengths of the instruction texts proposed so far
        self._searched: dict[int, Params] = {}  # round -> the search params it evaluated
        self._cand: Any = None  # the search candidate being evaluated
        self._first_move_done = False
        self._levers_moved: set[str] = set()  # each generation lever is moved by rule at most once
        self._history: list[Round] = []
        self._index = 0  # the round being proposed
        # Rewrites mutate a parent drawn from the pool of every text evaluated (pool.py). With a hosted
        # optimizer model and this train-only evaluation callback (set by the loop), GEPA does the mutating.
        self.pools: dict[str, InstructionPool] = {}
        self.evaluate_train: EvaluateTrain | None = None
        self.pool_stats: dict[str, int] = {}
        self._new_search()

    def _new_search(self) -> None:
        from .search import MultiFidelitySearch

        pruner = optuna.pruners.PercentilePruner(25.0, n_startup_trials=3, n_warmup_steps=0)
        baseline = {n: self.space[n].initial for n in [*self.retrieval, *self.other]}  # always carried
        name = None
        if self.storage is not None:  # one study per objective: values on another objective mean something else
            import hashlib

            what = hashlib.sha256(",".join(sorted(self.objective.criteria)).encode()).hexdigest()[:6]
            name = f"{self.study or 'selftune'}-{'checks' if self.objective.kind == 'checks' else 'rubric'}-{what}"
        self.search = MultiFidelitySearch(self.retrieval, self.other, self.cheap or (lambda _: 0.0), seed=self.seed,
                                          storage=self.storage, study_name=name,
                                          carry=self.spec.carry, pruner=pruner, baseline=baseline,
                                          screen_budget=4096,  # stage 1 costs no LM call: screen the grid whole
                                          n_startup_trials=3 if self.spec.sampler == "tpe" else 10 ** 6)
        self._told: set[int] = set()
        self._cand = None

    def ledger(self) -> dict[str, float]:
        """Stage 1's cheap look-ups and stage 2's candidates, by outcome."""
        led = self.search.ledger
        return {"stage1_settings_screened": led.cheap, "stage2_full": led.full, "stage2_pruned": led.pruned,
                "stage2_failed": led.failed, "carried": len(self.search.carried),
                "pool_texts": sum(len(p.entries) for p in self.pools.values()), **self.pool_stats}

    @property
    def screen_seconds(self) -> float:
        """Wall time of stage 1's one-off screen so far (the loop leaves it out of a round's time)."""
        return self.search.screen_seconds

    def steer(self, objective: Objective) -> None:
        """Climb ``objective`` and show the rewriter only the reasons of its criteria. Called with
        each trust verdict, so the optimizer chases the same signal the gate promotes on; when what
        an item scores changes, the search is rebuilt and its history re-scored on the new signal."""
        old = self.objective
        self.objective = objective
        if (old.kind == "checks", old.criteria) != (objective.kind == "checks", objective.criteria):
            self._new_search()

    def value(self, ev: Evaluation) -> float | None:
        return self.objective.mean(ev)

    def _sub(self, params: Params) -> Params:
        return {n: params[n] for n in [*self.retrieval, *self.other]}

    def _tell(self, history: list[Round]) -> None:
        """Every finished round the search has not heard of: its own candidate told (or pruned), the
        baseline and search-lever rounds evaluated elsewhere added."""
        for r in history:
            if r.index in self._told or (r.index and r.index not in self._searched):
                continue
            self._told.add(r.index)
            value = self.value(r.val)
            if self._cand is not None and self._searched.get(r.index) == self._cand.params:
                if r.pruned:
                    self.search.prune(self._cand)
                else:
                    self.search.tell(self._cand, None if value is None else value)
                self._cand = None
            elif value is not None and not r.pruned and (self.retrieval or self.other):
                try:
                    self.search.add(self._sub(r.params), value)
                except ValueError:  # a setting outside the carried ones (an earlier search's): not replayed
                    pass

    def settle(self, history: list[Round] | None) -> None:
        """The tune is over: tell the search the last rounds (with a lasting study, no trial of ours may
        stay RUNNING), or, with no history (the tune stopped mid-round), abandon the candidate in hand."""
        if history is not None:
            self._tell(history)
        self.search.abandon()
        self._cand = None

    def _search_turn(self, history: list[Round], index: int | None = None) -> bool:
        """Search moves and rewrites take turns, a search move first. A lever round (a measured symptom
        mended by rule) takes no one's turn: the round after it is the turn it came before. Round
        ``index`` further on than the next counts the rounds between it and ``history`` as turns."""
        index = history[-1].index + 1 if index is None else index
        turn = (1 + sum(1 for r in history[1:] if not (r.notes and r.notes[0].startswith("lever: ")))
                + index - history[-1].index - 1)
        return bool(self.retrieval or self.other) and (not self.text or turn % 2 == 1)

    def search_turn(self, history: list[Round], index: int) -> bool:
        """Round ``index`` is a search move's turn (stage 1's best, a draw; or a lever, if one is due)."""
        return self._search_turn(history, index)

    def stage2_turn(self, history: list[Round]) -> bool:
        """The next round is a stage-2 search candidate (workers may evaluate it; ``workers.py``)."""
        return (self._search_turn(history) and self._lever_move(history) is None
                and (self._first_move_done or not self.retrieval))

    def keeps_settings(self, history: list[Round]) -> bool:
        """The next round rewrites the text params only (no search move, no lever due): its candidate
        answers with the incumbent's retrieval and generation settings, so at the incumbent's pace."""
        return self.rewrite_turn(history, history[-1].index + 1)

    def rewrite_turn(self, history: list[Round], index: int) -> bool:
        """Round ``index`` (from the incumbent of ``history``) rewrites the text params only."""
        return bool(self.text) and not self._search_turn(history, index) and self._lever_move(history) is None

    def drawing(self) -> bool:
        """Stage 2's draws have begun: stage 1's best has been proposed (or there is no stage 1)."""
        return self._first_move_done or not self.retrieval

    def holds_draw(self) -> bool:
        """A stage-2 candidate of this process's search is out (asked, not yet told)."""
        return self._cand is not None

    def propose(self, history: list[Round], index: int | None = None) -> tuple[Params, tuple[str, ...]]:
        """Next candidate from the incumbent (the last round's ``incumbent_index``): for the round after
        the last, or for round ``index`` further on (proposed ahead against the same incumbent, the
        rounds between not yet seen)."""
        self._history = history
        self._tell(history)
        incumbent = next(r for r in history if r.index == history[-1].incumbent_index)
        params: Params = dict(incumbent.params)
        index = history[-1].index + 1 if index is None else index
        self._index = index
        search_turn = self._search_turn(history, index)
        if (lever := self._lever_move(history)) is not None:
            name, value, note = lever  # a measured symptom first: before stage 1's move, draws and rewrites
            self._levers_moved.add(name)
            params[name] = value
            if name in self.retrieval or name in self.other:
                self._searched[index] = self._sub(params)
            return params, (note,)
        if search_turn:
            move = self._first_move(incumbent) if not self._first_move_done else None
            self._first_move_done = True
            if move is not None:
                params.update(move)
                self._searched[index] = self._sub(params)
                return params, ("search: stage 1's best retrieval setting, everything else as the incumbent",)
            from .search import Exhausted

            try:
                self._cand = self.search.ask()
            except Exhausted:
                self._cand = None
            if self._cand is not None:
                params.update(self._cand.params)
                self._searched[index] = dict(self._cand.params)
                return params, (f"search: stage 2 trial {self._cand.number}",)
        notes = []
        for name in self.text:
            spec = self.space[name]
            assert isinstance(spec, TextParam)
            params[name], note = self._rewrite(str(incumbent.params[name]), incumbent, spec, name)
            notes.append(f"{name}: {note}")
        return params, tuple(notes)

    def _lever_move(self, history: list[Round]) -> tuple[str, Any, str] | None:
        """The generation lever (``LEVERS``) not yet moved whose symptom at least ``LEVER_SHARE`` (and
        ``LEVER_MIN``) of the incumbent's validation answers show, with the value it moves to:
        (name, value, note); None when no lever is due. An answer showing several symptoms counts for the
        first in ``LEVERS`` order (a repetitive answer runs into its token budget: the repetition, not the
        budget, is its trouble). A symptom counts only where it costs score: its answers must score below
        the answers showing no symptom, on average (a cut-off answer the rubric does not mark down is no
        reason to spend a round on a longer budget). Of several due, the one whose answers lose the most
        against those (their count times the mean gap) goes first."""
        if not history:
            return None
        incumbent = next(r for r in history if r.index == history[-1].incumbent_index)
        answers = list(incumbent.val.judgments)
        due: list[tuple[float, int, tuple[str, Any, str]]] = []
        shown: list[list[Judgment]] = []  # each answer under the first symptom it shows
        for symptom, _, _ in LEVERS.values():
            taken = {id(j) for group in shown for j in group}
            shown.append([j for j in answers if id(j) not in taken and symptom(j)])
        taken = {id(j) for group in shown for j in group}
        clean = [j.overall for j in answers if id(j) not in taken and j.overall is not None]
        for order, ((name, (_, called, how)), showing) in enumerate(zip(LEVERS.items(), shown, strict=True)):
            spec = self.space.get(name)
            if name in self._levers_moved or not isinstance(spec, ChoiceParam | IntParam):
                continue
            values = (sorted(v for v in spec.choices if isinstance(v, int | float)) if isinstance(spec, ChoiceParam)
                      else list(range(spec.low, spec.high + 1)))
            now = incumbent.params.get(name, spec.initial)
            higher = [v for v in values if isinstance(now, int | float) and v > now]
            n = len(showing)
            if not higher or n < max(LEVER_MIN, LEVER_SHARE * len(answers)):
                continue
            mine = [j.overall if j.overall is not None else 0.0 for j in showing]
            gap = (sum(clean) / len(clean) if clean else 1.0) - sum(mine) / n
            if gap <= 0:
                continue
            value = higher[-1] if how == "max" else higher[0]
            due.append((gap * n, -order, (name, value, f"lever: {name} {now} -> {value} ({n} of {len(answers)} "
                                                       f"validation answers {called}, scoring {gap:.2f} below those "
                                                       "with no symptom)")))
        return max(due, key=lambda d: d[:2])[2] if due else None

    def _first_move(self, incumbent: Round) -> Params | None:
        """The best retrieval setting of stage 1 (cheap objective, no LM call), everything else kept."""
        if not self.retrieval:
            return None
        ranked = self.search.screen()
        if not ranked:
            return None
        move = dict(ranked[0])
        return move if any(incumbent.params.get(k) != v for k, v in move.items()) else None

    def checkpoint(self, judgments: list[Judgment], incumbent: Evaluation, gate: Any) -> bool:
        """Asked after each validation slice: True prunes the candidate. Pruned when it is clearly
        losing to the incumbent on the same probes (the gate's paired interval, at its confidence, lies
        wholly below zero) or, for a search candidate, when Optuna's pruner puts its running mean in the
        bottom quarter of the candidates at that slice."""
        from .gate import paired_bootstrap, paired_diffs

        n = len(judgments)
        part = Evaluation(params={}, split="val", judgments=tuple(judgments))
        diffs = paired_diffs(part, incumbent, self.objective)
        if len(diffs) >= 3:
            mean, low, high = paired_bootstrap(diffs, gate.confidence, gate.resamples, self.seed + n)
            if high < 0:
                self.pruned_reason = (f"pruned after {n} validation items: clearly worse than the incumbent "
                                      f"({mean:+.3f}, {int(gate.confidence * 100)}% CI [{low:+.3f}, {high:+.3f}])")
                return True
        value = self.objective.mean(part)
        if self._cand is not None and value is not None:
            self.search.report(self._cand, n, value)
            if self.search.should_prune(self._cand):
                self.pruned_reason = (f"pruned after {n} validation items: running mean {value:.3f} in the bottom "
                                      "quarter of the candidates at that slice (Optuna percentile pruner)")
                return True
        return False

    def _rewrite(self, current: str, incumbent: Round, spec: TextParam, name: str = "instructions") -> tuple[str, str]:
        """New text for ``name``: a mutation of the parent the pool selects, by GEPA (hosted optimizer
        model and a train evaluation callback) or by one call of the optimizer model (the lean path);
        each proposal validated and checked for reward hacking, else the weakest criterion's hint."""
        pool = self.pools.setdefault(name, InstructionPool(name, self.seed))
        pool.observe(self._history)
        how = self.spec.parent if self.spec.parent != "auto" else ("best" if self.role.local else "pareto")
        parent = pool.select(self.objective, how, current)
        shown = pool.train_judgments(parent, self.objective) or list(incumbent.train.judgments)
        made = "rewritten by the optimizer model"
        texts: list[str] = []
        reason = "no proposal"
        try:
            if self.evaluate_train is not None and not self.role.local:
                run = gepa_mutate(pool, parent, dict(incumbent.params), self._train_probes(), self.evaluate_train,
                                  self.objective, self.role, self.spec.gepa_calls, spec.max_chars,
                                  self.seed + self._index)  # len(history) when proposed in turn
                texts, shown, made = run.proposals, shown + run.shown, run.note
                for k, v in {"gepa_runs": 1, **run.stats}.items():
                    self.pool_stats[k] = self.pool_stats.get(k, 0) + v
                reason = "GEPA found no mutation at least as good as its parent" if run.stats else run.note
            else:
                texts = [self._mutate(parent, shown)]
        except Exception as err:
            reason = f"optimizer call failed: {type(err).__name__}"
        if parent != current:
            made += f"; parent: the text from {pool.entries[parent].origin}"
        for text in (t.strip().strip('"').strip() for t in texts):
            reason = validate_rewrite(text, spec, current) or (
                "already evaluated with these params" if pool.judgments(text, {**incumbent.params, name: text}, "val")
                else None)
            if reason is None:
                alarms = rewrite_alarms(text, shown, self._lengths or [len(current)])
                for a in alarms:
                    self.alarms[a] = self.alarms.get(a, 0) + 1
                if alarms:
                    reason = f"alarm: {', '.join(alarms)}"
            if reason is None:
                self._lengths.append(len(text))
                return text, made
        hint = self._weakest_hint(incumbent)
        if hint and hint not in current and len(current) + len(hint) + 1 <= spec.max_chars:
            return f"{current} {hint}", f"rewrite rejected ({reason}); appended the weakest criterion's description"
        return current, f"rewrite rejected ({reason}); kept"

    def _mutate(self, parent: str, shown: list[Judgment]) -> str:
        """The lean mutation: one call of the optimizer model on the worst train items shown."""
        failures = describe_failures(shown, self.spec.worst_k, self.objective)
        with self.role.context():
            out = dspy.Predict(ImproveInstructions)(current_instructions=parent, failures=failures)
        return str(out.new_instructions)

    def _train_probes(self) -> list[Probe]:
        """The train probes of the rounds handed in, in first-seen order (the rounds hold no others)."""
        seen: dict[str, Probe] = {}
        for r in self._history:
            for j in r.train.judgments:
                if j.answer.probe.split == "train":
                    seen.setdefault(j.answer.probe.id, j.answer.probe)
        return list(seen.values())

    def _weakest_hint(self, incumbent: Round) -> str | None:
        means = [(incumbent.train.criterion_mean(c.name), c) for c in self.rubric.criteria
                 if c.description and c.name in self.objective.criteria]
        means = [(m, c) for m, c in means if m is not None]
        if not means:
            return None
        _, c = min(means, key=lambda mc: mc[0])
        return c.description.strip().rstrip(".") + "."
