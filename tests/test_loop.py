"""The whole loop on fake LMs, with a real chromadb, the real embedder and a real MLflow store."""

import json

import pytest
from mlflow import MlflowClient

from conftest import FakeModels, fake_role, no_progress, write_config
from selftune.config import load_config
from selftune.loop import Session, tune
from selftune.tracking import MlflowTracker, report


def run(tmp_path, corpus_dir, rounds=2, **cfg_over):
    cfg = load_config(write_config(tmp_path, corpus_dir, **cfg_over))
    models = FakeModels()
    session = Session(cfg, models=models)
    tracker = MlflowTracker(cfg)
    return cfg, models, tune(session, rounds, tracker, no_progress), tracker


def test_loop_records_rounds_in_mlflow(tmp_path, corpus_dir):
    cfg, models, result, tracker = run(tmp_path, corpus_dir)
    assert [r.index for r in result.rounds] == [0, 1, 2]
    client = MlflowClient(cfg.tracking_uri())
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "FINISHED"
    assert {"gain/val", "gain/test", "test/best_overall", "judge/valid_rate"} <= set(parent.data.metrics)
    hist = client.get_metric_history(tracker.parent_id, "candidate/val_overall")
    assert [m.step for m in hist] == [0, 1, 2]
    arts = {a.path for a in client.list_artifacts(tracker.parent_id)}
    assert {"best.yaml", "config", "probes", "tables", "report.md"} <= arts
    probe_files = {a.path for a in client.list_artifacts(tracker.parent_id, "probes")}
    assert {"probes/train.jsonl", "probes/val.jsonl", "probes/test.jsonl"} <= probe_files
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_id}'")
    assert len(children) == 3
    for child in children:
        assert {"val/overall", "val/grounded", "val/retrieval_hit"} <= set(child.data.metrics)
        rnd = result.rounds[int(child.data.tags["selftune.round"])]
        # train is answered for the baseline and each promoted candidate only (its failures feed rewrites)
        assert ("train/overall" in child.data.metrics) == (rnd.index == 0 or rnd.gate.promote)
        assert child.data.params["top_k"] in {"1", "2", "3"}
        assert {a.path for a in client.list_artifacts(child.info.run_id, "tables")} == {
            "tables/train.json",
            "tables/val.json",
        }
    assert parent.data.metrics["judge/valid_rate"] == 1.0


def test_judged_items_are_traces_of_their_runs_and_the_report_is_written(tmp_path, corpus_dir):
    cfg, models, result, tracker = run(tmp_path, corpus_dir, rounds=1)
    client = MlflowClient(cfg.tracking_uri())
    eid = tracker.experiment_id
    for rnd in result.rounds:
        [child] = client.search_runs([eid], filter_string=f"tags.`selftune.round` = '{rnd.index}'")
        traces = client.search_traces(locations=[eid], run_id=child.info.run_id)
        questions = {j.answer.probe.question for e in (rnd.train, rnd.val) for j in e.judgments}
        assert len(traces) == len(questions) and {t.info.request_preview for t in traces} == questions
    on_parent = client.search_traces(locations=[eid], run_id=tracker.parent_id)
    n_test = len(result.test_baseline.judgments) * (1 if result.best.index == 0 else 2)
    assert len(on_parent) == n_test and {t.info.tags["selftune.split"] for t in on_parent} == {"test"}
    metrics = client.get_run(tracker.parent_id).data.metrics
    assert metrics["traces/items"] == tracker.traces.items and metrics["traces/failed"] == 0
    # the prompt a trace shows is the prompt the system under test was sent
    trace = client.get_trace(tracker.traces.ids["round-00"][0])
    gen = next(s for s in trace.data.spans if s.name == "generate")
    sent = [c["messages"] for c in models.roles["sut"].engine.calls]
    assert gen.inputs["messages"] in sent
    grounded = next(a for a in trace.info.assessments if a.name == "grounded")
    assert grounded.rationale == "looks grounded" and grounded.source.source_type == "LLM_JUDGE"
    assert set(json.loads(client.get_run(tracker.parent_id).data.tags["selftune.datasets"])) == {"train", "val", "test"}
    report = (cfg.workdir / "report" / "report.html").read_text()
    assert "Validation score per round" in report and tracker.report_dir == cfg.workdir / "report"
    arts = {a.path for a in client.list_artifacts(tracker.parent_id)}
    assert {"report.html", "report.md", "figures"} <= arts


def test_traces_off_and_one_overall_progress_bar(tmp_path, corpus_dir):
    import io

    from selftune.runtime import TuneProgress

    cfg = load_config(write_config(tmp_path, corpus_dir, tracking="{traces: false}"))
    tracker = MlflowTracker(cfg)
    bars = TuneProgress(file=io.StringIO())
    result = tune(Session(cfg, models=FakeModels()), 1, tracker, bars)
    planned = bars.overall.total
    bars.close()
    assert tracker.traces is None
    assert MlflowClient(cfg.tracking_uri()).search_traces(locations=[tracker.experiment_id]) == []
    n = {
        s: len(e.judgments)
        for s, e in (("train", result.rounds[0].train), ("val", result.rounds[0].val), ("test", result.test_baseline))
    }
    # counted in items: every probe attempt, then every answer; planned with validation answered by the
    # baseline and each candidate, the baseline's train minibatch, and the test split answered twice
    attempts, rounds = result.stats["attempts"], 2
    assert planned == attempts + n["train"] + rounds * n["val"] + 2 * n["test"]
    answered = sum(len(e.judgments) for r in result.rounds for e in (r.train, r.val))
    done = attempts + answered + n["test"] * (1 if result.best.index == 0 else 2)
    assert bars.overall.n == bars.overall.total == done
    assert (cfg.workdir / "report" / "report.html").is_file()


def test_test_split_is_never_seen_before_the_end(tmp_path, corpus_dir):
    cfg, models, result, _ = run(tmp_path, corpus_dir)
    test_ids = {j.answer.probe.id for j in result.test_baseline.judgments}
    assert test_ids
    for r in result.rounds:
        assert test_ids.isdisjoint(j.answer.probe.id for e in (r.train, r.val) for j in e.judgments)
    # the optimizer's prompts never contain a test question
    test_qs = [j.answer.probe.question for j in result.test_baseline.judgments]
    for call in models.roles["optimizer"].engine.calls:
        assert not any(q in call["messages"][-1]["content"] for q in test_qs)


def test_rerun_reuses_probes_and_embeds_no_chunk(tmp_path, corpus_dir):
    _, models, first, _ = run(tmp_path, corpus_dir, rounds=1)
    n_gen = len(models.roles["generator"].engine.calls)
    assert first.stats["index_collections_built"] >= 1
    _, models2, second, _ = run(tmp_path, corpus_dir, rounds=1)
    assert n_gen > 0 and models2.roles["generator"].engine.calls == []
    assert second.stats["index_collections_built"] == 0
    # only questions were embedded, each once: every evaluated item's, and stage 1's (train and val probes
    # with a known source, screened under every retrieval setting without an LM call)
    evaluated = [e for r in second.rounds for e in (r.train, r.val)] + [second.test_baseline, second.test_best]
    asked = {j.answer.probe.question for e in evaluated for j in e.judgments}
    probes = [json.loads(line) for f in (tmp_path / "work" / "probes").glob("*.jsonl") for line in f.open()]
    asked |= {p["question"] for p in probes if p["split"] != "test" and p.get("source_doc")}
    assert second.stats["texts_embedded"] == len(asked)
    def ids(res):
        return sorted(j.answer.probe.id for e in (res.rounds[0].train, res.rounds[0].val) for j in e.judgments)

    assert ids(first) == ids(second)


def test_interrupt_keeps_finished_rounds(tmp_path, corpus_dir, monkeypatch):
    cfg = load_config(write_config(tmp_path, corpus_dir))
    session = Session(cfg, models=FakeModels())
    tracker = MlflowTracker(cfg)
    original = tracker.round
    calls = []

    def round_then_interrupt(rnd):
        original(rnd)
        calls.append(rnd.index)
        if rnd.index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracker, "round", round_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tune(session, 3, tracker, no_progress)
    client = MlflowClient(cfg.tracking_uri())
    assert client.get_run(tracker.parent_id).info.status == "KILLED"
    children = client.search_runs(
        [client.get_run(tracker.parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_id}'",
    )
    assert sorted(c.data.tags["selftune.round"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" for c in children)


def test_a_clearly_losing_candidate_is_pruned_on_a_validation_slice(tmp_path, corpus_dir):
    """Round 1 is stage 1's retrieval move; round 2 rewrites the instructions into nonsense, which is
    stopped after the first slice of validation: recorded as pruned, never compared or promoted."""
    from selftune.demo_corpus import materialize

    materialize(corpus_dir / "ref", ["assert", "pass", "break", "continue", "del", "return", "global", "raise"])
    cfg = load_config(
        write_config(tmp_path, corpus_dir, probes="{count: 30}", optimizer="{rounds: 2, slices: [3], train_items: 4}")
    )
    models = FakeModels()
    sut = models.roles["sut"].engine.script
    models.roles["sut"].engine.script = lambda m: "banana" if "banana" in m[0]["content"] else sut(m)
    models.roles["optimizer"] = fake_role(
        lambda m: "Reply with the single word banana and nothing else at all.", local=True
    )  # the lean path: one rewrite, taken as it is
    result = tune(Session(cfg, models=models), 2, MlflowTracker(cfg), no_progress)
    r2 = result.rounds[2]
    n_val = len(result.rounds[0].val.judgments)
    assert n_val > 3 and r2.pruned and len(r2.val.judgments) == 3 and not r2.gate.promote
    assert r2.gate.reason.startswith("pruned after 3 validation items: clearly worse than the incumbent")
    assert all(j.answer.text == "banana" for j in r2.val.judgments) and r2.train.judgments == ()
    assert result.stats["search/stage1_settings_screened"] > 0 and result.stats["calls/total"] > 0
    # where the time went, stage by stage, in the report
    secs = {k: v for k, v in result.stats.items() if k.startswith("time/")}
    assert {"time/probes", "time/baseline", "time/stage_2", "time/test"} <= set(secs)
    assert all(v >= 0 for v in secs.values())
    assert "- wall time: " in report(result) and " baseline " in report(result).split("- wall time: ")[1]


@pytest.mark.parametrize("budget, why", [("{calls: 1}", "tune budget reached: "),
                                         ("{minutes: 0.001}", "time budget: ")])
def test_a_budget_ends_the_tune_before_the_next_candidate_and_the_report_says_why(tmp_path, corpus_dir, budget, why):
    path = write_config(tmp_path, corpus_dir)
    path.write_text(path.read_text().replace("optimizer: {rounds: 2}", f"optimizer: {{rounds: 2, budget: {budget}}}"))
    cfg = load_config(path)
    result = tune(Session(cfg, models=FakeModels()), 2, MlflowTracker(cfg), no_progress)
    assert len(result.rounds) == 1 and result.stats["stopped_because"].startswith(why)
    assert f"- stopped: {why}" in report(result) and "after 0 candidates" in result.stats["stopped_because"]
    assert result.test_best is result.test_baseline  # the held-out test is still scored, once


def test_a_candidate_that_fits_only_without_its_train_minibatch_runs_to_its_end_as_the_last(
        tmp_path, corpus_dir, monkeypatch):
    """When the rest of a candidate's round and the held-out test fit the time budget only without the
    train minibatch a promotion answers (for the rewrites after it), the candidate is answered to its
    end, gated, never given that minibatch, and is the last: the tune goes to the held-out test."""
    from selftune import loop

    asked = []

    def tight(started, minutes, pace, done, secs, left, train=True):
        asked.append(train)
        return "" if not train else f"time budget: stopped after {done} of {pace.n_val} validation items: too slow"

    monkeypatch.setattr(loop, "_out_of_time_midway", tight)
    from selftune.demo_corpus import materialize

    materialize(corpus_dir / "ref", ["assert", "pass", "break", "continue", "del", "return", "global", "raise"])
    cfg = load_config(write_config(tmp_path, corpus_dir, probes="{count: 30}",
                                   optimizer="{rounds: 3, slices: [3], train_items: 4, budget: {minutes: 60}}"))
    result = tune(Session(cfg, models=FakeModels()), 3, MlflowTracker(cfg), no_progress)
    assert asked and True in asked and False in asked
    base, r1 = result.rounds
    assert not r1.pruned and len(r1.val.judgments) == len(base.val.judgments)  # answered to its end
    assert r1.train.judgments == ()  # promoted or not, no train minibatch
    assert result.stats["stopped_because"].startswith("time budget: candidate 1 was answered to its end as the last")
    assert result.stats["stopped_because"].endswith("so it stopped after 1 candidates")
    best = result.best
    assert (result.test_best is result.test_baseline) == (best.index == 0)  # the test still scored, once


def test_a_candidate_past_the_time_budget_is_stopped_at_its_first_slice_and_the_test_still_runs(
        tmp_path, corpus_dir, monkeypatch):
    """The time budget is asked at each pruning step too (``loop._out_of_time_midway``, Optuna's timeout
    at a report): a candidate whose measured pace would overrun it is stopped there, recorded as
    unfinished with the reason, never promoted, and the tune goes to the held-out test."""
    from selftune import loop

    asked = []

    def past(started, minutes, pace, done, secs, left, train=True):
        asked.append((done, secs))
        return f"time budget: stopped after {done} of {pace.n_val} validation items"

    monkeypatch.setattr(loop, "_out_of_time_midway", past)
    from selftune.demo_corpus import materialize

    materialize(corpus_dir / "ref", ["assert", "pass", "break", "continue", "del", "return", "global", "raise"])
    cfg = load_config(write_config(tmp_path, corpus_dir, probes="{count: 30}",
                                   optimizer="{rounds: 3, slices: [3], train_items: 4, budget: {minutes: 60}}"))
    result = tune(Session(cfg, models=FakeModels()), 3, MlflowTracker(cfg), no_progress)
    assert asked and asked[0][0] == 3 and asked[0][1] > 0
    r1 = result.rounds[-1]
    assert len(result.rounds) == 2 and r1.pruned and not r1.gate.promote and len(r1.val.judgments) == 3
    assert r1.gate.reason == f"time budget: stopped after 3 of {len(result.rounds[0].val.judgments)} validation items"
    assert result.stats["stopped_because"].endswith("so it stopped after 1 candidates (the last one unfinished)")
    assert result.test_best is result.test_baseline  # the held-out test is still scored, once
