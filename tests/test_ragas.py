"""kind: ragas criteria, computed by ragas itself: non-LLM metrics for real, LLM metrics on a scripted judge."""

import json

import pytest

from conftest import fake_role
from selftune.errors import InputError
from selftune.judge import Judge
from selftune.ragas_metrics import bounded
from selftune.records import Answer, Chunk, Probe
from selftune.rubric import Rubric, load_rubric

PROBE = Probe(
    id="p", question="What does pass do?", reference="pass is a null operation; nothing happens when it runs."
)
CTX = (Chunk(id="c", doc="d", start=0, end=1, text="pass is a null operation: when it is executed, nothing happens."),)


def rubric(*criteria):
    return Rubric.model_validate({"criteria": list(criteria)})


def test_non_llm_metrics_are_computed_by_ragas():
    r = rubric(
        {"name": "rouge", "kind": "ragas", "metric": "rouge_score", "options": {"rouge_type": "rouge1"}},
        {"name": "sim", "kind": "ragas", "metric": "non_llm_string_similarity"},
        {"name": "exact", "kind": "ragas", "metric": "exact_match"},
        {"name": "ctx_recall", "kind": "ragas", "metric": "non_llm_context_recall"},
    )
    judge = Judge(r, None)
    same = judge.judge(Answer(probe=PROBE, text=PROBE.reference, contexts=CTX))
    other = judge.judge(Answer(probe=PROBE, text="It loops forever over the list.", contexts=CTX))
    for name in ("rouge", "sim", "exact"):
        assert same.scores[name].value == pytest.approx(1.0)
        assert other.scores[name].value < 0.5
    assert same.scores["ctx_recall"].status == "ok"
    no_ref = judge.judge(Answer(probe=PROBE.model_copy(update={"reference": None}), text="x y", contexts=CTX))
    assert no_ref.scores["rouge"].status == "n/a"


def test_llm_metric_runs_on_the_judge_model_with_its_schema():
    def script(m):
        prompt = m[-1]["content"]
        if '"verdict"' in prompt:
            return json.dumps(
                {
                    "statements": [
                        {"statement": "pass does nothing.", "reason": "stated", "verdict": 1},
                        {"statement": "pass loops.", "reason": "not stated", "verdict": 0},
                    ]
                }
            )
        return json.dumps({"statements": ["pass does nothing.", "pass loops."]})

    role = fake_role(script, local=True)
    judge = Judge(rubric({"name": "faithful", "kind": "ragas", "metric": "faithfulness"}), role)
    j = judge.judge(Answer(probe=PROBE, text="pass does nothing. pass loops.", contexts=CTX))
    assert j.scores["faithful"].status == "ok" and j.scores["faithful"].value == pytest.approx(0.5)
    # on the local model every call is schema-constrained, with strings and lists bounded
    formats = [c["response_format"] for c in role.engine.calls]
    assert formats and all(f and f["schema"] for f in formats)


def test_llm_metric_failure_is_invalid_not_zero():
    role = fake_role(lambda m: "no json here", local=True)
    judge = Judge(rubric({"name": "faithful", "kind": "ragas", "metric": "faithfulness"}), role)
    s = judge.judge(Answer(probe=PROBE, text="pass does nothing.", contexts=CTX)).scores["faithful"]
    assert s.status == "invalid" and "faithfulness failed" in s.rationale


def test_llm_metric_needs_a_judge_model_and_unknown_metric_is_named(tmp_path):
    with pytest.raises(ValueError, match="no judge model"):
        Judge(rubric({"name": "f", "kind": "ragas", "metric": "faithfulness"}), None)
    bad = tmp_path / "r.yaml"
    bad.write_text("criteria:\n  - {name: f, kind: ragas, metric: faithfullness}\n")
    with pytest.raises(InputError, match=r"criteria\[0\]\.metric.*faithfulness"):
        load_rubric(bad)


def test_bounded_schema():
    s = bounded(
        {
            "type": "object",
            "properties": {
                "a": {"type": "string"},
                "b": {"type": "array", "items": {"type": "string"}},
                "c": {"type": "string", "enum": ["x"]},
            },
        }
    )
    assert s["properties"]["a"]["maxLength"] == 160 and s["properties"]["b"]["maxItems"] == 6
    assert s["properties"]["b"]["minItems"] == 1 and "maxLength" not in s["properties"]["c"]
