"""Schema of the rubric YAML (the user's taste) and how criterion scores aggregate.

A criterion is ``kind: llm`` (scored by the judge model on an anchored scale, rationale first),
``kind: check`` (deterministic, from the closed catalogue in ``checks.py``) or ``kind: ragas`` (a ragas
metric by name, ``ragas_metrics.py``). ``must_not`` rules are
checks whose failure caps an item's overall score whatever the other criteria say (how scores
combine and caps apply: ``objective.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InputError, read_yaml, validate
from .ragas_metrics import METRICS


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WordBounds(Strict):
    type: Literal["word_bounds"]
    min: int = Field(1, ge=0)
    max: int = Field(120, ge=1)

    @model_validator(mode="after")
    def _order(self) -> WordBounds:
        if self.min > self.max:
            raise ValueError(f"`min <= max` must hold, but got (min={self.min}, max={self.max})")
        return self


class Regex(Strict):
    type: Literal["regex"]
    must: str | None = None
    must_not: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Regex:
        import re

        if (self.must is None) == (self.must_not is None):
            raise ValueError("exactly one of `must` or `must_not` must be given")
        try:
            re.compile(self.must or self.must_not or "")
        except re.error as err:
            raise ValueError(f"invalid regular expression: {err}") from None
        return self


class RetrievalHit(Strict):
    type: Literal["retrieval_hit"]


class ReferenceMatch(Strict):
    """Agreement with the probe's reference answer: ``consistent`` (content-word F1, 0 when the answer
    contradicts the reference: ``reference.py``), ``no_contradiction`` (1 unless it contradicts the
    reference: a ``must_not`` rule), ``f1`` (SQuAD token F1) or ``contains``."""

    type: Literal["reference_match"]
    method: Literal["consistent", "no_contradiction", "f1", "contains"] = "consistent"


class CitesContext(Strict):
    """The answer quotes a run of ``min_words`` consecutive words of a retrieved chunk that is relevant
    (overlaps the probe's source span or shares the reference's words), and copies no more than it
    needs (``quotes.py``)."""

    type: Literal["cites_context"]
    min_words: int = Field(4, ge=2, le=30)


class OwnWords(Strict):
    """The share of the answer that is not context pasted beyond what it needs: runs of ``min_words``
    words of a retrieved chunk off the source span, or more of it than the reference is long
    (``quotes.py``). 1 for an answer that pastes nothing."""

    type: Literal["own_words"]
    min_words: int = Field(4, ge=2, le=30)


DEFAULT_ABSTAIN = (r"(?i)\b(i (do not|don't|cannot|can't) (know|tell|say|find|answer)|"
                   r"(the )?(context|documents?|sources?) (do|does|did)n?'?t? ?(not )?"
                   r"(say|mention|contain|cover|answer)|"
                   r"not (mentioned|covered|answered|stated) in the (context|documents?)|no information)")


class Abstains(Strict):
    """Says "I don't know" exactly when it should: on a probe marked unanswerable the answer must
    abstain; on an answerable one it must not."""

    type: Literal["abstains"]
    pattern: str = DEFAULT_ABSTAIN

    @model_validator(mode="after")
    def _compiles(self) -> Abstains:
        import re

        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"invalid regular expression: {err}") from None
        return self


CheckSpec = Annotated[WordBounds | Regex | RetrievalHit | ReferenceMatch | CitesContext | OwnWords | Abstains,
                      Field(discriminator="type")]


class Scale(Strict):
    min: int = 1
    max: int = 5
    anchors: dict[int, str] = Field(min_length=2)

    @model_validator(mode="after")
    def _anchors_in_range(self) -> Scale:
        if self.min >= self.max:
            raise ValueError(f"`min < max` must hold, but got (min={self.min}, max={self.max})")
        bad = [k for k in self.anchors if not self.min <= k <= self.max]
        if bad:
            raise ValueError(f"anchor levels must lie in [{self.min}, {self.max}], but got {bad}")
        return self

    def normalize(self, raw: float) -> float:
        """A score on this scale mapped to [0, 1]."""
        return (raw - self.min) / (self.max - self.min)


class Example(Strict):
    answer: str
    score: int
    why: str


class LLMCriterion(Strict):
    kind: Literal["llm"]
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)
    scale: Scale = Scale(anchors={1: "fails the criterion", 3: "partly meets it", 5: "fully meets it"})
    examples: list[Example] = []
    group: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$",
                              description="LLM criteria of one group are scored in one structured output per item")
    tracks: list[Literal["reference", "retrieval"]] = Field(
        ["reference"], description="computational signals a trustworthy judge's scores on this criterion rank "
                                   "with (judge.trust.min_discrimination): reference agreement, the retrieval hit; "
                                   "[] for a criterion neither should predict (e.g. tone)")


class _Scored(Strict):
    """Fields every non-LLM criterion shares."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    weight: float = Field(1.0, gt=0)


class CheckCriterion(_Scored):
    kind: Literal["check"]
    check: CheckSpec


class RagasCriterion(_Scored):
    """A ragas metric, computed by ragas with the judge model and the embedder (``ragas_metrics.py``)."""

    kind: Literal["ragas"]
    metric: Literal[METRICS]  # type: ignore[valid-type]
    options: dict[str, str | int | float | bool] = Field(default_factory=dict,
                                                         description="keyword arguments of the ragas metric")


Criterion = Annotated[LLMCriterion | CheckCriterion | RagasCriterion, Field(discriminator="kind")]


class MustNot(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    check: CheckSpec
    cap: float = Field(0.0, ge=0.0, le=1.0)


RESERVED = {"overall", "valid_rate", "n_items", "n_items_valid", "n_answer_errors", "n_scores_ok",
            "n_scores_invalid", "n_scores_na", "baseline", "best", "flagged"}


class Rubric(Strict):
    name: str = "rubric"
    criteria: list[Criterion] = Field(min_length=1)
    must_not: list[MustNot] = []

    @model_validator(mode="after")
    def _unique(self) -> Rubric:
        names = [c.name for c in self.criteria] + [m.name for m in self.must_not]
        reserved = sorted(set(names) & RESERVED)
        if reserved:
            raise ValueError(f"criterion names {reserved} are reserved for the run's own metrics")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"criterion and rule names must be unique, but {dup} repeat")
        return self

    def llm_criteria(self) -> list[LLMCriterion]:
        return [c for c in self.criteria if isinstance(c, LLMCriterion)]

    def llm_groups(self) -> list[list[LLMCriterion]]:
        """The LLM criteria as scored: those sharing a ``group`` together (in rubric order), each
        other one alone."""
        groups: dict[str, list[LLMCriterion]] = {}
        for c in self.llm_criteria():
            groups.setdefault(c.group or f"\0{c.name}", []).append(c)
        return list(groups.values())

    def ragas_criteria(self) -> list[RagasCriterion]:
        return [c for c in self.criteria if isinstance(c, RagasCriterion)]

    def needs_judge_model(self) -> bool:
        from .ragas_metrics import LLM_METRICS

        return bool(self.llm_criteria()) or any(c.metric in LLM_METRICS for c in self.ragas_criteria())


def load_rubric(path: str | Path) -> Rubric:
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(path, "", "expected a mapping with a `criteria` list")
    return validate(Rubric, data, path)
