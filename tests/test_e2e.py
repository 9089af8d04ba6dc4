"""End to end on the real embedded models: SmolLM2-135M (llama.cpp) and all-MiniLM-L6-v2, a real
chromadb on disk and a real MLflow store, over a few real Language Reference topics."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, check_tune_record
from selftune.cli import app
from selftune.demo_corpus import materialize

pytestmark = pytest.mark.e2e
TOPICS = ["assert", "pass", "break", "continue", "del", "return", "global", "raise"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    assert materialize(tmp / "docs", TOPICS) == len(TOPICS)
    cfg = yaml.safe_load((ROOT / "configs/rag.yaml").read_text())
    cfg.update(workdir=str(tmp / "work"), rubric=str(ROOT / "configs/rubrics/taste.yaml"),
               corpus={"path": str(tmp / "docs")}, probes={"count": 10})
    cfg["sut"]["params"]["chunk_size"] = {"type": "choice", "choices": [300, 500], "initial": 500}
    cfg["optimizer"]["rounds"] = 2
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["tune", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp, path, result.output


def test_tune_lands_in_mlflow(tuned):
    tmp, _, output = tuned
    client, parent = check_tune_record(tmp / "work", output, rounds=2)
    m = parent.data.metrics
    assert m["judge/valid_rate"] >= 0.95
    for key in ("gain/val", "gain/test", "test/baseline_overall", "test/best_overall", "stats/probes"):
        assert key in m
    # judge.retest_sample (10) items re-judged; n counts those validly scored both times, the flip rate items
    n = m["judge/retest/n"]
    assert 1 <= n <= 10 and m["judge/retest/flip_rate"] * n == pytest.approx(round(m["judge/retest/flip_rate"] * n))
    assert len(client.get_metric_history(parent.info.run_id, "judge/swap/consistency")) == 2
    best = yaml.safe_load(open(client.download_artifacts(parent.info.run_id, "best.yaml")).read())
    assert set(best["params"]) == {
        "instructions",
        "top_k",
        "chunk_size",
        "chunk_overlap",
        "hybrid_weight",
        "demos",
        "max_tokens",
        "repeat_penalty",
    }


def test_eval_answers_with_best_params_and_reuses_the_index(tuned, caplog):
    import logging

    tmp, path, _ = tuned
    questions = tmp / "q.jsonl"
    questions.write_text(
        json.dumps({"question": "What does the pass statement do?", "reference": "pass is a null operation"})
        + "\n"
        + json.dumps({"question": "When is AssertionError raised?"})
        + "\n"
    )
    out = tmp / "answers.jsonl"
    with caplog.at_level(logging.INFO, logger="selftune.index"):
        result = CliRunner().invoke(
            app, ["eval", str(path), "--questions", str(questions), "--out", str(out)], catch_exceptions=False
        )
    assert not [r for r in caplog.records if "embedding" in r.getMessage()]  # every collection was reused
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["What does the pass statement do?", "When is AssertionError raised?"]
    for r in rows:
        assert r["answer"] and r["contexts"] and set(r["scores"]) >= {"grounded", "correct"}
    assert rows[0]["scores"]["correct"]["status"] == "ok" and rows[1]["scores"]["correct"]["status"] == "n/a"
    assert rows[0]["scores"]["retrieval_hit"]["status"] == "n/a"  # a user's question has no known source span
