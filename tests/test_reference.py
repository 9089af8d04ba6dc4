"""reference_match that a negation or a swapped fact cannot fool, measured on the shipped labelled set."""

import json

import pytest

from conftest import ROOT
from selftune.checks import token_f1
from selftune.reference import consistent_f1, content_f1, contradiction

ROWS = [json.loads(line) for line in (ROOT / "datasets/reference/agreement.jsonl").read_text().splitlines()]
CONTRADICTIONS = {"negation", "antonym", "number", "name"}


def consistent(r):
    return consistent_f1(r["answer"], r["reference"], r["question"])[0]


def f1(r):
    return token_f1(r["answer"], r["reference"])


def ranked_above(method, rows, kinds):
    """P(score of a true answer > score of a false one of ``kinds``), over pairs of one question (ties 1/2)."""
    wins = pairs = 0
    score = {id(r): method(r) for r in rows}
    for q in {r["question"] for r in rows}:
        true = [score[id(r)] for r in rows if r["question"] == q and r["true"]]
        false = [score[id(r)] for r in rows if r["question"] == q and r["kind"] in kinds]
        for t in true:
            for f in false:
                wins += 1.0 if t > f else 0.5 if t == f else 0.0
                pairs += 1
    return wins / pairs


def test_labelled_set_covers_paraphrases_negations_swaps_and_partial_answers():
    kinds = {r["kind"] for r in ROWS}
    assert {"exact", "paraphrase", "partial", "negation", "antonym", "number", "name", "wrong"} <= kinds
    assert {r["split"] for r in ROWS} == {"dev", "heldout"} and len(ROWS) >= 150
    assert all(r["true"] == (r["kind"] in {"exact", "paraphrase", "partial"}) for r in ROWS)


@pytest.mark.parametrize("split", ["dev", "heldout"])
def test_contradictions_are_caught_and_true_answers_are_not_accused(split):
    rows = [r for r in ROWS if r["split"] == split]
    accused = [r["answer"] for r in rows if r["true"] and contradiction(r["answer"], r["reference"], r["question"])]
    caught = [r for r in rows if r["kind"] in CONTRADICTIONS
              and contradiction(r["answer"], r["reference"], r["question"])]
    n_true = sum(r["true"] for r in rows)
    n_contra = sum(r["kind"] in CONTRADICTIONS for r in rows)
    assert len(accused) <= 0.05 * n_true, accused  # measured: 0 of 65 (dev), 0 of 34 (held out)
    assert len(caught) >= 0.8 * n_contra  # measured: 37 of 37 (dev), 16 of 19 (held out)


@pytest.mark.parametrize("split", ["dev", "heldout"])
def test_a_contradiction_ranks_below_the_truth_where_token_f1_ranked_it_above(split):
    rows = [r for r in ROWS if r["split"] == split]
    assert ranked_above(f1, rows, CONTRADICTIONS) < 0.6  # token F1: a negated copy looks right
    assert ranked_above(consistent, rows, CONTRADICTIONS) >= 0.85  # measured: 0.99 (dev), 0.87 (held out)
    # and it costs nothing on honest wrong answers
    assert ranked_above(consistent, rows, {"wrong"}) >= ranked_above(f1, rows, {"wrong"}) - 0.05


@pytest.mark.parametrize("answer, reference, question, why", [
    ("pass is not a null operation; something happens when it is executed.",
     "pass is a null operation; nothing happens when it is executed.", "What does pass do?", "negation"),
    ("Tuples are mutable sequences.", "Tuples are immutable sequences.", "Are tuples mutable?", "'mutable'"),
    ("The default recursion limit is 100.", "The default recursion limit is 1000.", "", "number 100"),
    ("It raises ValueError.", "It raises AssertionError.", "", "name 'valueerror'"),
    ("The finally clause runs after the try suite.", "The finally clause runs before the try suite.", "", "'after'"),
    ("A return without an expression does not return None.", "A return without an expression returns None.", "",
     "negation"),
])
def test_contradiction_signals(answer, reference, question, why):
    found = contradiction(answer, reference, question)
    assert found is not None and why in found, found


@pytest.mark.parametrize("answer, reference, question", [
    ("Tuples are not mutable.", "Tuples are immutable.", "Are tuples mutable?"),  # two flips cancel
    ("No, tuples are immutable.", "Tuples are immutable sequences.", "Are tuples mutable?"),
    ("pass is a null operation that does nothing when executed.",
     "pass is a null operation; nothing happens when it is executed.", ""),
    ("__exit__ runs whether or not an exception occurred.", "__exit__ is called even if an exception was raised.", ""),
    ("None of the body runs before next is called.", "Its body does not run until next is called.", ""),
    ("It returns None.", "It leaves the function and returns None.", "What does a bare return do?"),
    ("It raises an assertion error.", "It raises AssertionError.", ""),
    ("It checks identity rather than equality of values.", "is tests identity, not equality of values.", ""),
])
def test_no_contradiction_in_paraphrases(answer, reference, question):
    assert contradiction(answer, reference, question) is None


def test_content_f1_ignores_function_words_and_echoes_of_the_question():
    q, ref = "What does the pass statement do?", "pass is a null operation."
    assert content_f1("The pass statement is what the pass statement is.", ref, q) == 0.0
    assert token_f1("The pass statement is what the pass statement is.", ref) > 0.2  # what F1 gave it
    assert content_f1("pass is a null operation", ref, q) == 1.0
    assert content_f1("Python's None.", "It returns None.") > 0  # None the value is a content word
