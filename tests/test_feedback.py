"""review -> a person's edits and ratings -> feedback -> the next tune's human references and calibrate's
labels; and the same from assessments added on the items' traces. Fake LMs, a real MLflow store."""

import csv
import io
import json

import pytest
from mlflow import MlflowClient
from mlflow.entities import AssessmentSource, Expectation, Feedback
from mlflow.tracing.client import TracingClient
from typer.testing import CliRunner

from conftest import FakeModels, no_progress, write_config
from selftune.calibrate import read_items
from selftune.cli import app
from selftune.config import load_config
from selftune.feedback import calibration_rows, feedback_pairs, from_mlflow, ingest, read_feedback
from selftune.loop import Session, tune
from selftune.rubric import load_rubric
from selftune.tracking import MlflowTracker


@pytest.fixture
def tuned(tmp_path, corpus_dir):
    path = write_config(tmp_path, corpus_dir)
    cfg = load_config(path)
    session = Session(cfg, models=FakeModels())
    tracker = MlflowTracker(cfg)
    result = tune(session, 1, tracker, no_progress)
    return path, cfg, result, tracker


def test_review_feedback_and_the_next_tune(tuned, tmp_path):
    path, cfg, result, tracker = tuned
    out = tmp_path / "review.jsonl"
    r = CliRunner().invoke(app, ["review", str(path), "--worst", "5", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 3 <= len(rows) <= 5
    overall = [r["overall"] for r in rows]
    assert overall == sorted(overall)  # worst first
    assert {"question", "contexts", "answer", "scores", "edited_answer", "ratings", "comment"} <= set(rows[0])
    assert rows[0]["scores"]["grounded"]["rationale"] and rows[0]["ratings"] == {"grounded": None}
    text = out.with_suffix(".csv").read_bytes()
    assert text.startswith(b"\xef\xbb\xbf")  # a spreadsheet reads it as UTF-8
    table = list(csv.DictReader(io.StringIO(text.decode("utf-8-sig"))))
    assert [t["probe_id"] for t in table] == [r["probe_id"] for r in rows]
    assert "rating_grounded" in table[0] and table[0]["edited_answer"] == ""
    # a person fills in three rows in the spreadsheet and breaks a fourth
    for i, t in enumerate(table[:3]):
        t["edited_answer"] = f"Human answer {i}: the statement does what the manual says."
        t["rating_grounded"] = str(2 + i)
        t["comment"] = "too vague" if i == 0 else ""
    table[3]["rating_grounded"] = "9"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
    filled = tmp_path / "filled.csv"
    filled.write_text(buf.getvalue(), encoding="utf-8")
    r = CliRunner().invoke(app, ["feedback", str(path), "--file", str(filled)])
    assert r.exit_code == 2
    assert "line 5.ratings.grounded" in r.output and "expected an integer in [1, 5]" in r.output
    assert "kept 3 rows" in r.output  # the good rows are kept all the same
    kept = [json.loads(line) for line in (cfg.workdir / "feedback/ingested.jsonl").read_text().splitlines()]
    assert [k["probe_id"] for k in kept] == [t["probe_id"] for t in table[:3]]
    assert list((cfg.workdir / "feedback/raw").iterdir())[0].read_text() == filled.read_text()
    client = MlflowClient(cfg.tracking_uri())
    [fb] = client.search_runs([tracker.experiment_id], filter_string="tags.`selftune.kind` = 'feedback'")
    assert fb.data.metrics["feedback/edits"] == 3 and fb.data.metrics["feedback/rejected"] == 1
    assert client.get_run(rows[0]["run_id"]).data.tags["selftune.feedback"] == "3"
    # the next tune: the three probes carry the human references, which the reference check uses
    session = Session(cfg, models=FakeModels())
    probes, stats = session.probes(no_progress)
    human = {p.id: p for p in probes if p.reference_origin == "human"}
    assert set(human) == {t["probe_id"] for t in table[:3]} and stats["probes_human_reference"] == 3
    for p in human.values():
        assert p.reference.startswith("Human answer") and p.extractive_reference not in (None, p.reference)
    from selftune.records import Answer

    p = next(iter(human.values()))  # the reference check grades against the person's answer, not the sentence
    said = session.sut.answer(p, result.best.params)
    as_human = session.judge.judge(said.model_copy(update={"text": p.reference}))
    as_source = session.judge.judge(Answer(probe=p, text=p.extractive_reference, contexts=said.contexts))
    assert as_human.scores["correct"].value == 1.0 > as_source.scores["correct"].value
    # and calibrate's labels
    labels = calibration_rows(cfg.workdir)
    assert sorted(r["labels"]["grounded"] for r in labels) == [2, 3, 4]
    assert all(r["reference"].startswith("Human answer") for r in labels)
    # and calibrate's pairs: the person's edit preferred to the answer it corrected, with its contexts
    pairs = feedback_pairs(cfg.workdir)
    assert [p["probe_id"] for p in pairs] == [t["probe_id"] for t in table[:3]]
    assert all(p["edited"].startswith("Human answer") and p["original"] and p["contexts"] for p in pairs)
    lab = tmp_path / "labels.jsonl"
    lab.write_text("".join(json.dumps(r) + "\n" for r in labels))
    assert len(read_items(lab, load_rubric(cfg.rubric), need_labels=True)) == 3


def test_malformed_jsonl_rows_name_their_line(tmp_path):
    from conftest import ROOT

    rubric = load_rubric(ROOT / "configs/rubrics/taste.yaml")
    f = tmp_path / "r.jsonl"
    f.write_text('{"probe_id": "a", "edited_answer": "x"}\n{"probe_id": ""}\nnot json\n'
                 '{"probe_id": "b", "ratings": {"nope": 3}}\n{"probe_id": "c", "answer": "y"}\n')
    good, errors = read_feedback(f, rubric)
    assert [g["probe_id"] for g in good] == ["a"]  # c carries nothing a person wrote
    assert [e.key for e in errors] == ["line 3", "line 2.probe_id", "line 4.ratings.nope"]


def test_feedback_from_mlflow_assessments(tuned):
    path, cfg, result, tracker = tuned
    client = MlflowClient(cfg.tracking_uri())
    traces = client.search_traces(locations=[tracker.experiment_id], max_results=5)
    tc = TracingClient(cfg.tracking_uri())
    t0, t1 = traces[0].info.trace_id, traces[1].info.trace_id
    tc.log_assessment(t0, Expectation(name="expected_response", value="A person's answer.",
                                      source=AssessmentSource("HUMAN", "alice")))
    tc.log_assessment(t1, Feedback(name="grounded", value=2, rationale="half of it is invented",
                                   source=AssessmentSource("HUMAN", "bob")))
    tc.log_assessment(t1, Feedback(name="grounded", value=7, source=AssessmentSource("HUMAN", "carol")))
    rubric = load_rubric(cfg.rubric)
    rows, problems = from_mlflow(cfg.tracking_uri(), cfg.tracking.experiment, cfg.workdir, rubric)
    by = {r["source"]: r for r in rows}
    assert by[f"mlflow:{t0}"]["edited_answer"] == "A person's answer."
    assert by[f"mlflow:{t1}"]["ratings"] == {"grounded": 2} and "invented" in by[f"mlflow:{t1}"]["comment"]
    assert by[f"mlflow:{t1}"]["answer"] and by[f"mlflow:{t1}"]["contexts"]
    assert len(problems) == 1 and "carol" in problems[0] and t1 in problems[0]
    # selftune's own expectations (source sentences, hand-written probes) are never taken for a person's
    assert len(rows) == 2
    ingest(cfg.tracking_uri(), cfg.tracking.experiment, cfg.workdir, rows)
    again, _ = from_mlflow(cfg.tracking_uri(), cfg.tracking.experiment, cfg.workdir, rubric)
    assert again == []  # ingested once
    r = CliRunner().invoke(app, ["feedback", str(path), "--from-mlflow"], catch_exceptions=False)
    assert r.exit_code == 0 and "kept 0 rows" in r.output
    probes, stats = Session(cfg, models=FakeModels()).probes(no_progress)
    pid = traces[0].info.tags["selftune.probe_id"]
    assert next(p for p in probes if p.id == pid).reference == "A person's answer."
