"""The objective: how criterion scores combine, where caps apply, and what each kind counts."""

import pytest

from conftest import ROOT
from selftune.objective import cap, checks_only, pairwise, weighted, whole_rubric
from selftune.records import Answer, Chunk, Evaluation, Judgment, Probe, Score
from selftune.rubric import Rubric, load_rubric

TWO = Rubric.model_validate({
    "criteria": [{"kind": "check", "name": "a", "weight": 3, "check": {"type": "retrieval_hit"}},
                 {"kind": "check", "name": "b", "weight": 1, "check": {"type": "retrieval_hit"}}],
    "must_not": [{"name": "r", "cap": 0.1, "check": {"type": "regex", "must_not": "x"}}]})


def test_weighted_mean_skips_na_and_refuses_invalid():
    assert weighted(TWO, {"a": Score(value=1.0), "b": Score(value=0.0)}) == pytest.approx(0.75)
    assert weighted(TWO, {"a": Score(value=1.0), "b": Score(status="n/a")}) == pytest.approx(1.0)
    assert weighted(TWO, {"a": Score(value=1.0), "b": Score(status="invalid")}) is None
    assert weighted(TWO, {"a": Score(value=1.0), "b": Score(value=0.0)}, frozenset({"b"})) == 0.0


def test_caps_rules_and_flags_in_one_place():
    assert cap(1.0, [TWO.must_not[0]], (), 0.0) == (pytest.approx(0.1), ("r",))
    assert cap(0.9, [], ("padding:filler",), 0.2) == (0.2, ("flagged",))
    assert cap(0.1, [], ("padding:filler",), 0.2) == (0.1, ())  # a cap that does not bite is not recorded
    assert cap(0.9, [], ("padding:filler",), None) == (0.9, ())  # flag_cap: null turns the flag cap off
    assert cap(None, [TWO.must_not[0]], (), 0.0) == (None, ("r",))


def test_checks_objective_ignores_llm_scores_but_keeps_caps(tmp_path):

    rubric = load_rubric(ROOT / "configs/rubrics/taste.yaml")
    probe = Probe(id="p", question="What does pass do?", reference="pass does nothing", source_doc="d",
                  source_end=10)
    ans = Answer(probe=probe, text="pass does nothing at all here", contexts=(Chunk(id="c", doc="d", start=0, end=10,
                                                                                        text="pass does nothing"),))
    scores = {"grounded": Score(value=1.0, raw=5), "concise": Score(value=1.0), "retrieval_hit": Score(value=1.0),
              "correct": Score(value=0.5), "quotes_source": Score(value=0.0)}
    j = Judgment(answer=ans, scores=scores, overall=0.8)
    # checks only: (1*1 + 1*1 + 2*0.5 + 1*0) / 5 = 0.6
    checks = checks_only(rubric, 0.0)
    assert checks.item(j) == 0.6
    assert checks.item(j.model_copy(update={"flags": ("echo:question",)})) == 0.0
    assert checks.item(j.model_copy(update={"capped_by": ("no_grader_talk",)})) == 0.0
    assert checks_only(rubric, 0.3).item(j.model_copy(update={"flags": ("echo:question",)})) == 0.3


def test_pairwise_objective_uses_preferences_for_llm_criteria_only():
    rubric = Rubric.model_validate({"criteria": [
        {"name": "grounded", "kind": "llm", "weight": 2, "description": "Supported by the context."},
        {"name": "concise", "kind": "check", "check": {"type": "word_bounds", "max": 60}},
        {"name": "retrieval_hit", "kind": "check", "check": {"type": "retrieval_hit"}},
        {"name": "correct", "kind": "check", "weight": 2, "check": {"type": "reference_match"}},
        {"name": "quotes_source", "kind": "check", "check": {"type": "cites_context"}},
        {"name": "abstains", "kind": "check", "check": {"type": "abstains"}}]})
    probe = Probe(id="p", question="q?")
    checks = {"concise": Score(value=1.0), "retrieval_hit": Score(status="n/a"), "correct": Score(status="n/a"),
              "quotes_source": Score(value=0.0), "abstains": Score(value=1.0)}
    a = Judgment(answer=Answer(probe=probe, text="x"), scores={"grounded": Score(value=0.5), **checks}, overall=0.6)
    b = a.model_copy(update={"scores": {**a.scores, "quotes_source": Score(value=1.0)}})
    on = pairwise(rubric, 0.0).with_prefs({"p": {"grounded": 1.0}})
    # weights: grounded 2 (preference 2 * 1.0 - 1 = +1), concise 1 (0), quotes_source 1 (-1), abstains 1 (0)
    assert on.diff(a, b) == pytest.approx((2 * 1 - 1) / 5)
    assert pairwise(rubric, 0.0).diff(a, b) is None  # no preference for this probe: not paired
    ev = lambda j: Evaluation(params={}, split="val", judgments=(j,))  # noqa: E731
    assert on.deltas(ev(a), ev(b)) == {"grounded": 1.0, "concise": 0.0, "quotes_source": -1.0, "abstains": 0.0}
    assert whole_rubric(rubric, 0.0).diff(a, b) == 0.0  # pointwise: the overalls
