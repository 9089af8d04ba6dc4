"""Faults and rate limits against a real local server that injects them (``selftune.scripted``: 429 with
Retry-After, 500/503, a reply slower than the timeout, a 200 whose body is not JSON, prose where JSON was
asked for, a dropped connection), called through the real ``ServedEngine`` / ``dspy.LM`` path.

Transient faults are retried (DSPy's retry loop, ``models.<role>.retries``) and the item is answered as
if nothing happened; a fault that outlasts the retries makes the item invalid (counted, never 0); a role
that fails on more than its ``max_failed_share`` of a split's items stops the tune with a one-line
reason, the finished rounds kept in MLflow. One call at a time here, so which item meets a fault is fixed."""

import json

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from conftest import no_progress, write_config
from selftune.config import initial_params, load_config
from selftune.errors import InputError
from selftune.loop import Session, tune
from selftune.spend import TuneStopped
from selftune.scripted import ScriptedServer
from selftune.tracking import MlflowTracker

SPEC = {"model": "openai/stub", "cache": False, "concurrency": 1, "retries": 2, "timeout": 1.0, "max_retry_wait": 2.0}


def config(tmp_path, corpus_dir, rag_base, judge_base, **over):
    models = {r: {**SPEC, "api_base": rag_base} for r in ("generator", "sut", "optimizer")}
    models["judge"] = {**SPEC, "api_base": judge_base}
    return load_config(write_config(tmp_path, corpus_dir, models=json.dumps(models), **over))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One session on two servers (the judge's own, so a fault hits one role) and its probes."""
    from conftest import DOCS

    tmp = tmp_path_factory.mktemp("faults")
    docs = tmp / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    with ScriptedServer() as rag, ScriptedServer() as judge:
        cfg = config(tmp, docs, rag.base, judge.base)
        session = Session(cfg)
        probes, _ = session.probes(no_progress)
        try:
            yield session, probes, rag, judge
        finally:
            session.close()


def evaluate(served, server, **faults):
    session, probes, rag, judge = served
    for s in (rag, judge):
        s.faults, s.fault_every, s.hits, s.stamps = [], [], {}, []
    for k, v in faults.items():
        setattr(server(rag, judge), k, v)
    return session.evaluate(initial_params(session.cfg), probes, "train", no_progress)


SUT = lambda rag, judge: rag  # noqa: E731
JUDGE = lambda rag, judge: judge  # noqa: E731


@pytest.mark.parametrize("fault", ["500", "503", "badjson", "drop", "slow"])
def test_a_transient_fault_is_retried_and_the_item_answered(served, fault):
    ev = evaluate(served, SUT, faults=[fault], slow_seconds=3.0)
    assert served[2].hits.get(fault, 0) + (fault == "slow") >= 1  # (a slow reply is counted when it ends)
    assert all(j.valid for j in ev.judgments) and ev.counts()["answer_errors"] == 0


def test_a_rate_limit_is_retried_after_the_servers_retry_after(served):
    ev = evaluate(served, JUDGE, faults=["429"], retry_after=0.6)
    judge = served[3]
    assert judge.hits["429"] == 1 and all(j.valid for j in ev.judgments)
    (t429, _), (t_next, _) = judge.stamps[0], judge.stamps[1]
    assert t_next - t429 >= 0.55  # waited as told (DSPy's own backoff would have been 1 s)


def test_a_fault_that_outlasts_the_retries_makes_the_item_invalid_never_zero(served):
    session = served[0]
    failed_before = session.ledger.failed.get("sut", 0)
    ev = evaluate(served, SUT, faults=["500", "503", "500"])  # three attempts of the first answer
    first, rest = ev.judgments[0], ev.judgments[1:]
    assert first.answer.error and "500" in first.answer.error and first.overall is None
    assert all(s.status == "invalid" for s in first.scores.values())
    assert all(j.valid for j in rest) and ev.counts()["answer_errors"] == 1
    assert session.ledger.failed["sut"] == failed_before + 1
    # the judge's turn: its call fails on the first item, which is invalid (not scored 0)
    ev = evaluate(served, JUDGE, faults=["503", "503", "503"])
    assert ev.judgments[0].scores["grounded"].status == "invalid" and ev.judgments[0].overall is None
    assert "judge call failed" in ev.judgments[0].scores["grounded"].rationale
    assert all(j.valid for j in ev.judgments[1:])


def test_prose_where_json_was_asked_is_an_invalid_score(served):
    ev = evaluate(served, JUDGE, faults=["prose"])
    score = ev.judgments[0].scores["grounded"]
    assert score.status == "invalid" and score.value is None and ev.judgments[0].overall is None
    assert "no score in judge output" in score.rationale and all(j.valid for j in ev.judgments[1:])


def test_a_role_failing_on_most_items_stops_with_one_line_naming_it(served):
    with pytest.raises(TuneStopped) as err:
        evaluate(served, JUDGE, fault_every=["500"])
    msg = str(err.value)
    assert msg.startswith("judge calls failed on ") and "train items (more than max_failed_share 0.5" in msg
    assert "\n" not in msg and "500" in msg


def test_a_tune_stopped_by_a_failing_judge_keeps_its_finished_rounds_in_mlflow(tmp_path, corpus_dir):
    with ScriptedServer() as rag, ScriptedServer() as judge:
        cfg = config(tmp_path, corpus_dir, rag.base, judge.base)
        tracker = MlflowTracker(cfg)

        class FailAfterBaseline(MlflowTracker):
            def round(self, rnd):
                super().round(rnd)
                judge.fault_every = ["500"]  # the judge's endpoint goes down once round 0 is logged

        tracker.__class__ = FailAfterBaseline
        session = Session(cfg)
        try:
            with pytest.raises(TuneStopped, match=r"^judge calls failed"):
                tune(session, 2, tracker, no_progress)
        finally:
            session.close()
    client = MlflowClient(cfg.tracking_uri())
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "FAILED" and "judge calls failed" in parent.data.tags["selftune.aborted"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_id}'")
    assert len(children) == 1  # the baseline round, kept


def test_the_cli_says_why_in_one_line_and_exits_3(tmp_path, corpus_dir):
    from selftune.cli import app

    with ScriptedServer() as rag, ScriptedServer(faults=[""], fault_every=["503"]) as judge:  # the probe call passes
        cfg = config(tmp_path, corpus_dir, rag.base, judge.base)
        out = CliRunner().invoke(app, ["tune", str(cfg.source)])
    assert out.exit_code == 3, out.output
    lines = [line for line in out.output.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and "judge calls failed on" in lines[0] and "finished rounds are kept in MLflow" in lines[0]


def test_a_judge_endpoint_down_at_start_is_a_clear_error_before_any_work(tmp_path, corpus_dir):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ScriptedServer() as rag:
        cfg = config(tmp_path, corpus_dir, rag.base, f"http://127.0.0.1:{port}/v1")
        with pytest.raises(InputError) as err:
            Session(cfg)
        assert rag.requests == 0  # no probe question, no answer: nothing was done
    msg = str(err.value)
    assert msg.startswith(f"{cfg.source}: models.judge.model: judge model openai/stub gave no usable score")
    assert "LMTransportError" in msg and "\n" not in msg
