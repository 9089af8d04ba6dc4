"""The loop's vocabulary: frozen records that cross every boundary.

Everything here is immutable (``frozen=True``) and strict (``extra="forbid"``), so a record that
was written once is the record that is logged, compared and reported.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Split = Literal["train", "val", "test"]
ParamValue = str | int | float
Params = dict[str, ParamValue]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Chunk(Frozen):
    """A span ``[start, end)`` of one document's text; ``score`` is the retrieval similarity when the
    chunk was retrieved (1 - cosine distance), else None."""

    id: str
    doc: str
    start: int
    end: int
    text: str
    score: float | None = None

    def overlaps(self, doc: str, start: int, end: int) -> bool:
        return self.doc == doc and self.start < end and start < self.end


class Span(Frozen):
    """A character span ``[start, end)`` of one document: a probe's further known source."""

    doc: str
    start: int
    end: int


Kind = Literal["single", "multi", "comparison", "procedural", "unanswerable", "vague", "misspelled", "keyword"]
KINDS: tuple[str, ...] = ("single", "multi", "comparison", "procedural", "unanswerable", "vague", "misspelled",
                          "keyword")


class Probe(Frozen):
    """A question with a known source span, so retrieval can be checked under any chunking.

    ``reference`` is the source sentence the question was written from (extractive reference),
    or a human's gold answer, which replaces it (``reference_origin == "human"``; the extractive one is
    kept in ``extractive_reference``). ``kind`` says how it was made (``probe_kinds``), ``persona`` for
    whom; a multi-passage or comparison probe records its second passage in ``more_sources``; an
    unanswerable one says in ``verified`` how the corpus was checked not to answer it.
    """

    id: str
    question: str
    reference: str | None = None
    reference_origin: Literal["source", "human"] = "source"
    source_doc: str = ""
    source_start: int = 0
    source_end: int = 0
    source_chunk_ids: tuple[str, ...] = ()
    split: Split = "train"
    answerable: bool = True  # False: the corpus does not answer it; the right reply is "I don't know"
    kind: Kind = "single"
    persona: str = ""
    more_sources: tuple[Span, ...] = ()
    section: str = ""  # the heading above the source span (coverage)
    verified: str = ""  # unanswerable: how it was checked that the corpus does not answer it
    extractive_reference: str | None = None  # the source sentence(s), kept when a human reference replaces it
    mined_from: str = ""  # failure mining: the id of the incumbent's failed train probe it was made near


class Answer(Frozen):
    """What the system under test said. ``error`` set means the item failed and is not scorable."""

    probe: Probe
    text: str = ""
    contexts: tuple[Chunk, ...] = ()
    error: str | None = None
    seconds: float = 0.0


class Score(Frozen):
    """One criterion on one item.

    ``value`` is normalized to [0, 1]; ``raw`` is on the criterion's own scale. ``status`` is
    ``ok``, ``invalid`` (the judge could not score it; counted, never 0) or ``n/a`` (the criterion
    does not apply, e.g. reference match on a probe without a reference).
    """

    value: float | None = None
    raw: float | None = None
    rationale: str = ""
    status: Literal["ok", "invalid", "n/a"] = "ok"
    flags: tuple[str, ...] = ()
    by_judge: dict[str, float | None] = Field(default_factory=dict)  # a panel's raw scores (None: invalid)


class Judgment(Frozen):
    answer: Answer
    scores: dict[str, Score]
    overall: float | None = None  # None when the item is invalid (answer error or an invalid score)
    capped_by: tuple[str, ...] = ()  # must-not rules (or "flagged") that capped the overall score
    flags: tuple[str, ...] = ()  # ways the answer games its grader (attacks.attack_flags)

    @property
    def valid(self) -> bool:
        return self.overall is not None


class Evaluation(Frozen):
    """One params set scored on one split."""

    params: Params
    split: Split
    judgments: tuple[Judgment, ...]

    def overall(self) -> float | None:
        vals = [j.overall for j in self.judgments if j.overall is not None]
        return sum(vals) / len(vals) if vals else None

    def criterion_mean(self, name: str) -> float | None:
        vals = [j.scores[name].value for j in self.judgments
                if name in j.scores and j.scores[name].status == "ok"]
        return sum(v for v in vals if v is not None) / len(vals) if vals else None

    def counts(self) -> dict[str, int]:
        """Items, scored items, failed answers; criterion scores ok / invalid / n/a."""
        out = {"items": len(self.judgments), "items_valid": 0, "answer_errors": 0,
               "scores_ok": 0, "scores_invalid": 0, "scores_na": 0}
        for j in self.judgments:
            out["items_valid"] += j.valid
            out["answer_errors"] += j.answer.error is not None
            for s in j.scores.values():
                out[{"ok": "scores_ok", "invalid": "scores_invalid", "n/a": "scores_na"}[s.status]] += 1
        return out

    def valid_rate(self) -> float:
        c = self.counts()
        scored = c["scores_ok"] + c["scores_invalid"]
        return c["scores_ok"] / scored if scored else 0.0


class GateDecision(Frozen):
    promote: bool
    reason: str
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_paired: int = 0
    criterion_deltas: dict[str, float] = Field(default_factory=dict)


class Round(Frozen):
    """One evaluated candidate. Round 0 is the baseline (the config's initial params)."""

    index: int
    params: Params
    train: Evaluation
    val: Evaluation
    gate: GateDecision
    incumbent_index: int  # the incumbent after this round's decision
    notes: tuple[str, ...] = ()  # how the candidate was made (e.g. rewrite rejected, fallback used)
    judge_stats: dict[str, float] = Field(default_factory=dict)  # reliability figures so far (trust.Monitor)
    trusted: bool = True  # did the judge clear the trust bar when this round was decided (Verdict.trusted)
    pruned: bool = False  # stopped early on validation (clearly losing): never compared or promoted


State = Literal["trusted", "untrusted", "unproven"]


class Figure(Frozen):
    """One trust figure beside its bar. ``value`` None: not measured (or undefined). It counts only
    once it rests on ``need`` items (``n``); while a ``required`` figure does not count, the judge is
    unproven. ``why``: the reason given when it counts and fails."""

    label: str
    value: float | None
    op: Literal[">=", "<=", "|<=|"]
    bar: float
    n: int
    need: int = 1
    required: bool = False
    why: str = ""

    @property
    def counts(self) -> bool:
        return self.value is not None and self.n >= self.need

    @property
    def passed(self) -> bool:
        v = self.value if self.value is not None else math.nan
        return v >= self.bar if self.op == ">=" else v <= self.bar if self.op == "<=" else abs(v) <= self.bar

    @property
    def threshold(self) -> str:
        return f"within ±{self.bar:g}" if self.op == "|<=|" else f"{self.op} {self.bar:g}"  # no pipes: a table cell

    @property
    def pending(self) -> str:
        return (f"{self.label} not measured yet" if self.n == 0 else
                f"{self.label} measured on {self.n} items, fewer than trust.min_items {self.need}")


class Verdict(Frozen):
    """The trust bar's reading: ``state``, the ``reasons`` for it (failing figures when untrusted,
    unmeasured ones when unproven) and every ``figure`` beside its threshold."""

    state: State
    reasons: tuple[str, ...] = ()
    figures: tuple[Figure, ...] = ()

    @property
    def trusted(self) -> bool:
        return self.state == "trusted"

    @classmethod
    def of(cls, figures: list[Figure]) -> Verdict:
        failing = [f.why for f in figures if f.counts and not f.passed]
        pending = [f.pending for f in figures if f.required and not f.counts]
        state: State = "untrusted" if failing else "unproven" if pending else "trusted"
        return cls(state=state, reasons=tuple(failing or pending), figures=tuple(figures))

    def table(self) -> list[str]:
        """Markdown rows: every figure, its value, its threshold, the items it rests on, its status."""
        rows = ["| figure | value | threshold | items | status |", "|---|---|---|---|---|"]
        for f in self.figures:
            value = "n/a" if f.value is None else f"{f.value:+.3f}" if f.op == "|<=|" or "rho" in f.label \
                else f"{f.value:.3f}"
            status = ("ok" if f.passed else "FAILS") if f.counts else \
                f"not counted yet (needs {f.need} items)" if f.value is not None or f.n else "not measured"
            rows.append(f"| {f.label} | {value} | {f.threshold} | {f.n} | {status} |")
        return rows
