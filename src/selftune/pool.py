"""The instruction pool, and the hosted optimizer path that hands mutation to the ``gepa`` library.

``InstructionPool`` holds every instruction text proposed and evaluated so far with its judgments,
per item: the rounds' train minibatch and validation answers, and the train minibatches GEPA's
adapter answered. A text is evaluated in a *context* (every other param), since a search round
keeps the incumbent's text under new retrieval settings; a text is represented by its best context.
``select`` picks the parent a rewrite mutates, GEPA's way: ``pareto`` samples among the texts that
are best on at least one item (``gepa.gepa_utils``' Pareto selection, dominated texts removed),
``best`` takes the highest validation mean (the lean default). Scores are recomputed on the
objective in force, so a trust verdict that changes what counts re-ranks the pool.

``gepa_mutate`` runs ``gepa.optimize`` from a parent text with ``SelftuneAdapter``, whose
``evaluate`` answers a minibatch of *train* probes through the loop's evaluation callback (it
refuses any other split) and scores each item with ``Objective.item``. Nothing here sees a test
probe: the pool refuses one, and the probes GEPA gets are the train probes of the rounds it is handed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .lm import Role
from .objective import Objective
from .records import Judgment, Params, Probe, Round

log = logging.getLogger(__name__)
Item = tuple[str, str]  # (split, probe id)
Context = tuple[tuple[str, Any], ...]  # every param but the text one, sorted
EvaluateTrain = Callable[[Params, list[Probe]], list[Judgment]]
PARETO_ITEMS = 6  # train probes GEPA tracks its Pareto front on; the others feed reflective minibatches
MINIBATCH = 3  # GEPA's reflective minibatch


def context(params: Params, name: str) -> Context:
    return tuple(sorted((k, v) for k, v in params.items() if k != name))


@dataclass
class Entry:
    text: str
    origin: str  # where it was first evaluated: "round 3", "a GEPA run"
    contexts: dict[Context, dict[Item, Judgment]] = field(default_factory=dict)


class InstructionPool:
    """Every instruction text evaluated so far (param ``name``), with its judgments per item.
    ``rng`` (seeded) draws the Pareto parent; no other state."""

    def __init__(self, name: str, seed: int):
        self.name, self.rng = name, random.Random(seed)
        self.entries: dict[str, Entry] = {}
        self._observed: set[int] = set()

    def add(self, params: Params, judgments: Sequence[Judgment], origin: str) -> None:
        """Record ``judgments`` of the text ``params[name]`` under the rest of ``params`` (the latest
        judgment of an item wins). A test item is a contract violation: it raises."""
        if any(j.answer.probe.split == "test" for j in judgments):
            raise ValueError("the instruction pool never holds a test item")
        text = str(params[self.name])
        entry = self.entries.setdefault(text, Entry(text, origin))
        items = entry.contexts.setdefault(context(params, self.name), {})
        items.update({(j.answer.probe.split, j.answer.probe.id): j for j in judgments})

    def observe(self, history: Sequence[Round]) -> None:
        """Every round not seen yet: its train minibatch and its validation answers."""
        for r in history:
            if r.index not in self._observed and self.name in r.params:
                self._observed.add(r.index)
                self.add(r.params, [*r.train.judgments, *r.val.judgments], f"round {r.index}")

    @staticmethod
    def _mean(items: dict[Item, float], split: str | None = None) -> float | None:
        vals = [v for (s, _), v in items.items() if split is None or s == split]
        return sum(vals) / len(vals) if vals else None

    @staticmethod
    def _scored(items: dict[Item, Judgment], objective: Objective) -> dict[Item, float]:
        return {k: v for k, j in items.items() if (v := objective.item(j)) is not None}

    def _rank(self, items: dict[Item, Judgment], objective: Objective) -> tuple[bool, float]:
        """A context's rank: its validation mean first (the gate's split), its train mean if it has none."""
        scored = self._scored(items, objective)
        val = self._mean(scored, "val")
        return (True, val) if val is not None else (False, self._mean(scored) or 0.0)

    def _contexts(self, text: str, objective: Objective) -> list[dict[Item, Judgment]]:
        """The text's contexts, best first."""
        entry = self.entries.get(text)
        return sorted(entry.contexts.values(), key=lambda js: self._rank(js, objective), reverse=True) if entry else []

    def scores(self, text: str, objective: Objective) -> dict[Item, float]:
        """The text's per-item scores in its best context (items it could not be scored on left out)."""
        ranked = self._contexts(text, objective)
        return self._scored(ranked[0], objective) if ranked else {}

    def judgments(self, text: str, params: Params, split: str = "train") -> list[Judgment]:
        """The text's judgments on ``split`` in the context of ``params`` (for cache look-ups)."""
        items = self.entries.get(text, Entry(text, "")).contexts.get(context(params, self.name), {})
        return [j for (s, _), j in items.items() if s == split]

    def train_judgments(self, text: str, objective: Objective) -> list[Judgment]:
        """The text's train judgments in its best context that has any (what a rewriter may be shown)."""
        for items in self._contexts(text, objective):
            if train := [j for (s, _), j in items.items() if s == "train"]:
                return train
        return []

    def select(self, objective: Objective, how: Literal["best", "pareto"], default: str) -> str:
        """The parent text to mutate: ``best`` validation mean (ties: the earliest), or a draw from
        the Pareto front over every item (GEPA's selection). ``default`` when nothing is scored."""
        texts = [t for t in self.entries if self.scores(t, objective)]
        if not texts:
            return default
        if how == "best":
            return max(texts, key=lambda t: self._rank(self._contexts(t, objective)[0], objective))
        from gepa.gepa_utils import select_program_candidate_from_pareto_front

        per = [self.scores(t, objective) for t in texts]
        front: dict[Item, set[int]] = {}
        for item in sorted({k for s in per for k in s}):  # sorted: str hashes vary by process
            top = max(s[item] for s in per if item in s)
            front[item] = {i for i, s in enumerate(per) if s.get(item) == top}
        means = [self._mean(s) or 0.0 for s in per]
        return texts[select_program_candidate_from_pareto_front(front, means, self.rng)]


def feedback(j: Judgment, value: float | None, objective: Objective) -> str:
    """What the reflection LM reads about one answer: its score on the objective, and each counted
    criterion's score and reason; an unscorable item says why."""
    if value is None:
        why = j.answer.error or ", ".join(n for n, s in j.scores.items() if s.status == "invalid") or "no score"
        return f"Not scorable ({why}); counted as 0."
    parts = [f"{n}: {s.value:.2f}" + (f" ({s.rationale[:300]})" if s.rationale else "")
             for n, s in j.scores.items() if n in objective.criteria and s.status == "ok" and s.value is not None]
    return f"Score {value:.2f} of 1. " + "; ".join(parts)


class SelftuneAdapter:
    """GEPA's adapter protocol over the system under test: ``evaluate`` answers train probes with
    the candidate's text (every other param from ``base``) through ``evaluate_train``, reusing the
    pool's judgments made in the same context. Per-item score: ``objective.item``; an unscorable
    item scores 0, says so in its feedback and is counted in ``failed``. ``answered`` counts the
    items sent to ``evaluate_train``; past ``budget`` an item is not answered (scored 0, counted)."""

    propose_new_texts = None

    def __init__(self, pool: InstructionPool, base: Params, evaluate_train: EvaluateTrain, objective: Objective,
                 budget: int):
        self.pool, self.base, self.evaluate_train, self.objective = pool, base, evaluate_train, objective
        self.budget, self.answered, self.failed, self.refused = budget, 0, 0, 0
        self.seen: list[Judgment] = []  # every judgment a reflective record may show

    def evaluate(self, batch: list[Probe], candidate: dict[str, str], capture_traces: bool = False) -> Any:
        from gepa import EvaluationBatch

        if any(p.split != "train" for p in batch):
            raise ValueError("SelftuneAdapter answers train probes only")
        params = {**self.base, self.pool.name: candidate[self.pool.name]}
        known = {j.answer.probe.id: j for j in self.pool.judgments(candidate[self.pool.name], params)}
        todo = [p for p in batch if p.id not in known][: max(self.budget - self.answered, 0)]
        self.refused += sum(p.id not in known for p in batch) - len(todo)
        if todo:
            fresh = self.evaluate_train(params, todo)
            if [j.answer.probe.id for j in fresh] != [p.id for p in todo]:
                raise RuntimeError("the train evaluation callback did not answer the probes it was given")
            self.answered += len(todo)
            self.pool.add(params, fresh, "a GEPA run")
            known.update({j.answer.probe.id: j for j in fresh})
        judged = [known.get(p.id) for p in batch]
        values = [None if j is None else self.objective.item(j) for j in judged]
        self.failed += sum(j is not None and v is None for j, v in zip(judged, values))
        self.seen += [j for j in judged if j is not None]
        traces = [{"probe": p, "judgment": j, "value": v} for p, j, v in zip(batch, judged, values)]
        return EvaluationBatch(outputs=[j.answer.text if j else "" for j in judged],
                               scores=[v or 0.0 for v in values], trajectories=traces if capture_traces else None)

    def make_reflective_dataset(self, candidate: dict[str, str], eval_batch: Any,
                                components_to_update: list[str]) -> dict[str, list[dict[str, Any]]]:
        records = []
        for t in eval_batch.trajectories or []:
            j: Judgment | None = t["judgment"]
            if j is None:
                continue  # not answered (budget spent): nothing to reflect on
            ctx = "\n".join(f"[{k + 1}] {c.text[:300]}" for k, c in enumerate(j.answer.contexts[:3]))
            records.append({"Inputs": {"question": t["probe"].question, "retrieved context": ctx or "(none)"},
                            "Generated Outputs": j.answer.text[:600] or f"(no answer: {j.answer.error})",
                            "Feedback": feedback(j, t["value"], self.objective)})
        return {name: records for name in components_to_update}


REFLECTION_PROMPT = """I gave a question-answering assistant these instructions:
```
<curr_param>
```

Below are questions it answered with them, the passages it retrieved, its answers and feedback on each:
```
<side_info>
```

Write new instructions for the assistant that avoid the failures shown and keep what worked. They must be \
general rules for every question: do not copy any question, answer or passage, and do not mention grading, \
scores or feedback. At most MAX_CHARS characters, a few sentences. Put the new instructions within ``` blocks."""


def reflection_lm(role: Role) -> Callable[[str | list[dict[str, Any]]], str]:
    """The optimizer role's LM as GEPA's ``LanguageModel`` (text in, text out). Calls go through
    ``role.lm``, so its callbacks (the LM-call ledger) count them."""
    from dspy.lm15 import Config as LMConfig
    from dspy.lm15 import Message, Request

    def call(prompt: str | list[dict[str, Any]]) -> str:
        text = prompt if isinstance(prompt, str) else "\n\n".join(str(m.get("content", "")) for m in prompt)
        kw = role.lm.kwargs
        config = LMConfig(max_tokens=kw.get("max_tokens"), temperature=kw.get("temperature"))
        return role.lm(Request(model=role.lm.model, messages=(Message.user(text),), config=config)).text or ""

    return call


class _GepaLog:
    def log(self, message: str) -> None:
        log.debug("gepa: %s", message)


@dataclass
class GepaRun:
    """A GEPA run's outcome: ``proposals`` (texts, best first, each no worse than the parent on
    GEPA's Pareto items), every judgment the reflection LM may have been shown, and its accounting."""

    proposals: list[str]
    shown: list[Judgment]
    note: str
    stats: dict[str, int]


def gepa_mutate(pool: InstructionPool, parent: str, base: Params, probes: list[Probe],
                evaluate_train: EvaluateTrain, objective: Objective, role: Role, budget: int, max_chars: int,
                seed: int) -> GepaRun:
    """``gepa.optimize`` from ``parent`` on the train ``probes``: the first ``PARETO_ITEMS`` are GEPA's
    validation (Pareto) set, the rest its reflective minibatches. ``budget`` caps the items evaluated
    (pool re-uses included): GEPA checks its ``max_metric_calls`` before each iteration, and one
    iteration costs at most two minibatches and the Pareto set, so it is handed what leaves room."""
    import gepa

    if any(p.split != "train" for p in probes):
        raise ValueError("GEPA is handed train probes only")
    n_val = min(PARETO_ITEMS, max(len(probes) // 2, 1))
    valset, trainset = probes[:n_val], probes[n_val:] or probes[:n_val]
    size = min(MINIBATCH, len(trainset))
    max_calls = budget - (2 * size + n_val) + 1
    if max_calls <= n_val:
        return GepaRun([], [], f"GEPA skipped: optimizer.gepa_calls={budget} leaves no iteration", {})
    adapter = SelftuneAdapter(pool, base, evaluate_train, objective, budget)
    result = gepa.optimize(
        seed_candidate={pool.name: parent}, trainset=trainset, valset=valset, adapter=adapter,
        reflection_lm=reflection_lm(role), reflection_minibatch_size=size, max_metric_calls=max_calls,
        reflection_prompt_template=REFLECTION_PROMPT.replace("MAX_CHARS", str(max_chars)),
        candidate_selection_strategy="pareto", logger=_GepaLog(), seed=seed, raise_on_exception=True)
    seed_score = result.val_aggregate_scores[0]
    order = sorted(range(1, len(result.candidates)), key=lambda i: (-result.val_aggregate_scores[i], i))
    proposals = [result.candidates[i][pool.name] for i in order if result.val_aggregate_scores[i] >= seed_score]
    stats = {"gepa_candidates": len(result.candidates) - 1, "gepa_items_answered": adapter.answered,
             "gepa_items_failed": adapter.failed, "gepa_items_refused": adapter.refused,
             "gepa_metric_calls": result.total_metric_calls or 0}
    best = f"{result.val_aggregate_scores[order[0]]:.3f}" if order else "-"
    note = (f"GEPA: {stats['gepa_candidates']} mutations, best {best} vs parent {seed_score:.3f} on {n_val} "
            f"train items, {adapter.answered} items answered")
    return GepaRun(proposals, adapter.seen, note, stats)
