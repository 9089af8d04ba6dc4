"""Budgets: ``models.<role>.budget`` and ``optimizer.budget`` cap calls, tokens and dollars (LiteLLM's
offline price map; the local model costs 0 but counts). A cap reached ends the tune after the current
candidate, every finished round kept, the report saying which cap; the spend per role is logged to
MLflow and printed."""

import json

import pytest
from mlflow import MlflowClient

from conftest import FakeModels, no_progress, write_config
from selftune.config import load_config
from selftune.errors import InputError
from selftune.loop import Session, tune
from selftune.spend import Caps, Spend, prices
from selftune.scripted import ScriptedServer
from selftune.tracking import MlflowTracker, report


def test_prices_come_from_the_offline_map_and_the_local_model_is_free():
    import litellm

    assert prices("local") == (0.0, 0.0)
    inp, out = prices("openai/gpt-4o-mini")
    assert inp == litellm.model_cost["gpt-4o-mini"]["input_cost_per_token"] and 0 < inp < out
    assert prices("openai/no-such-model-anywhere") is None


def test_budget_keys_are_checked_naming_file_key_and_expectation(tmp_path, corpus_dir):
    with pytest.raises(InputError, match=r"cfg.yaml: models.sut.budget.usd: expected a model LiteLLM's offline price "
                                         r"map knows; openai/stub has no price"):
        load_config(write_config(tmp_path, corpus_dir, models="{sut: {model: openai/stub, budget: {usd: 1}}}"))
    with pytest.raises(InputError, match=r"models.judge.budget.calls"):
        load_config(write_config(tmp_path, corpus_dir, models="{judge: {budget: {calls: 0}}}"))
    with pytest.raises(InputError, match=r"optimizer.budget.tokens"):
        load_config(write_config(tmp_path, corpus_dir, optimizer="{budget: {tokens: -5}}"))
    cfg = load_config(write_config(tmp_path, corpus_dir, models="{judge: {model: openai/gpt-4o-mini, "
                                                                "budget: {usd: 0.5, tokens: 900}}}"))
    caps = Caps.of(cfg)
    assert caps.roles["judge"] == {"calls": None, "tokens": 900, "usd": 0.5} and caps.tune["calls"] == 1500
    assert caps.reached(Spend(), {"judge": Spend(tokens=899)}) is None
    assert caps.reached(Spend(), {"judge": Spend(tokens=900)}) == \
        "judge budget reached: 900 tokens >= 900 tokens (models.judge.budget.tokens)"


def test_a_role_call_cap_starts_no_candidate_that_would_leave_too_little_for_the_test(tmp_path, corpus_dir):
    from selftune.config import RoleBudget

    cfg = load_config(write_config(tmp_path, corpus_dir))
    session = Session(cfg, models=FakeModels())
    probes, _ = session.probes(no_progress)
    baseline = min(sum(p.split == "train" for p in probes), cfg.optimizer.train_items) + \
        sum(p.split == "val" for p in probes)
    # the SUT may answer the baseline (one call an item) and one call more: a candidate would pass the cap
    sut = cfg.models.sut.model_copy(update={"budget": RoleBudget(calls=baseline + 1)})
    session.cfg = cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"sut": sut})})
    tracker = MlflowTracker(cfg)
    result = tune(session, 4, tracker, no_progress)
    assert [r.index for r in result.rounds] == [0]  # no candidate started
    why = result.stats["stopped_because"]
    assert why.startswith(f"sut budget forecast: {baseline} calls spent + ~") and why.endswith(
        f" for the held-out test > {baseline + 1} calls (models.sut.budget.calls), so it stopped after 0 candidates")
    text = report(result)
    assert f"- stopped: {why}" in text and "- spend by role: " in text and "; sut " in text
    client = MlflowClient(cfg.tracking_uri())
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["selftune.stopped_because"] == why
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_id}'")
    assert len(children) == 1  # every finished round kept
    m = parent.data.metrics
    assert m["calls/role/sut"] >= baseline and m["calls/role/judge"] > 0
    assert m["tokens/sut"] == 2 * m["calls/role/sut"]  # the scripted engine reports 1 + 1 tokens a call
    assert m["usd/sut"] == 0.0 and m["tokens/total"] == sum(v for k, v in m.items() if k.startswith("tokens/")
                                                            and k != "tokens/total")


def served_tune(tmp_path, corpus_dir, server, optimizer):
    spec = {"model": "openai/stub", "api_base": server.base, "cache": False}
    models = json.dumps({r: spec for r in ("generator", "sut", "judge", "optimizer")})
    tmp_path.mkdir()
    cfg = load_config(write_config(tmp_path, corpus_dir, models=models, optimizer=optimizer))
    session = Session(cfg)
    try:
        result = tune(session, 3, MlflowTracker(cfg), no_progress)
    finally:
        session.close()
    return result, session.ledger


def test_a_tune_calls_cap_is_not_overrun_the_forecast_keeps_the_test_within_it(tmp_path, corpus_dir):
    """On a real local endpoint: the tune uncapped, then capped one call short of what it spent. Checked only
    before each call, the cap would let the last candidate start and the held-out test overrun it; the
    forecast (the mean candidate so far, the baseline's cost per item times the test items) stops first."""
    with ScriptedServer() as server:
        free, free_ledger = served_tune(tmp_path / "free", corpus_dir, server, "{rounds: 3}")
        spent = free_ledger.totals().calls
        assert [r.index for r in free.rounds] == [0, 1, 2, 3] and "stopped_because" not in free.stats
        cap = spent - 1
        capped, ledger = served_tune(tmp_path / "capped", corpus_dir, server,
                                     f"{{rounds: 3, budget: {{calls: {cap}}}}}")
    assert ledger.totals().calls <= cap  # the held-out test ran, within the cap
    assert capped.test_baseline.judgments and len(capped.rounds) < 4
    why = capped.stats["stopped_because"]
    assert why.startswith("tune budget forecast: ") and f"for the held-out test > {cap} calls " \
        "(optimizer.budget.calls), so it stopped after " in why
    assert f"- stopped: {why}" in report(capped)


def test_the_forecast_of_a_candidate_and_the_test():
    from selftune.spend import Forecast

    f = Forecast(per_item={"sut": Spend(calls=1, tokens=10), "judge": Spend(calls=2, tokens=30, usd=0.01)})
    assert f.candidate(5)["judge"] == Spend(calls=10, tokens=150, usd=0.05)  # before any: baseline per item
    f.candidates += [{"sut": Spend(calls=4)}, {"sut": Spend(calls=8), "optimizer": Spend(calls=2)}]
    assert f.candidate(5)["sut"].calls == 6 and f.candidate(5)["optimizer"].calls == 1
    assert f.test(3)["sut"] == Spend(calls=6, tokens=60)  # the baseline and the best, 3 items each
    caps = Caps(tune={"calls": 20}, roles={"sut": {"calls": None, "tokens": None, "usd": None}})
    assert caps.forecast({"sut": Spend(calls=7)}, f.candidate(5), {"sut": Spend(calls=6)}) is None  # 7 + 7 + 6
    assert caps.forecast({"sut": Spend(calls=8)}, f.candidate(5), {"sut": Spend(calls=6)}) == \
        "tune budget forecast: 8 calls spent + ~7 calls for another candidate + ~6 calls for the held-out test > " \
        "20 calls (optimizer.budget.calls)"


def test_a_tune_token_cap_stops_before_any_candidate_once_reached(tmp_path, corpus_dir):
    cfg = load_config(write_config(tmp_path, corpus_dir, optimizer="{rounds: 3, budget: {tokens: 10}}"))
    result = tune(Session(cfg, models=FakeModels()), 3, MlflowTracker(cfg), no_progress)
    assert [r.index for r in result.rounds] == [0]  # the probes alone spent more than 10 tokens
    assert result.stats["stopped_because"].startswith("tune budget reached: ")
    assert "(optimizer.budget.tokens) after 0 candidates" in result.stats["stopped_because"]
    assert result.test_baseline.judgments  # the report's held-out test still ran


def test_dollars_are_priced_per_role_from_the_providers_usage(tmp_path, corpus_dir):
    """Every role a priced hosted id on a real local endpoint that reports usage: the judge's dollar cap
    ends the tune after the baseline; its spend is the map's price times the tokens the server reported."""
    with ScriptedServer() as server:
        spec = {"model": "openai/gpt-4o-mini", "api_base": server.base, "cache": False}
        models = {r: spec for r in ("generator", "sut", "optimizer")}
        models["judge"] = {**spec, "budget": {"usd": 1e-6}}
        cfg = load_config(write_config(tmp_path, corpus_dir, models=json.dumps(models)))
        session = Session(cfg)
        try:
            result = tune(session, 3, MlflowTracker(cfg), no_progress)
        finally:
            session.close()
        usage = [json.loads(json.dumps(b)) for b in server.bodies]
    assert len(usage) == server.requests
    assert [r.index for r in result.rounds] == [0]
    assert result.stats["stopped_because"].startswith("judge budget reached: $")
    assert "(models.judge.budget.usd) after 0 candidates" in result.stats["stopped_because"]
    inp, out = prices("openai/gpt-4o-mini")
    spent = session.ledger.spend["judge"]
    assert spent.tokens > 0 and 0 < spent.usd <= spent.tokens * out and spent.usd >= spent.tokens * inp
    assert result.stats["usd/judge"] == spent.usd and result.stats["usd/total"] >= spent.usd


def test_the_time_budget_leaves_stage_1s_one_off_screen_out_of_a_rounds_estimate(monkeypatch):
    """A round that also ran stage 1's screen (a one-off) is estimated without it: with 600 s elapsed of
    a 20-min budget, a 400-s round of which 300 s were the screen leaves room for another (100 s) plus the
    test; counted whole (400 s) it would not."""
    import time
    from types import SimpleNamespace

    from selftune import loop

    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    opt = SimpleNamespace(screen_seconds=0.0)
    round_started, screened = now[0], opt.screen_seconds
    opt.screen_seconds, now[0] = 300.0, now[0] + 400.0
    took = loop._took(round_started, screened, opt)
    assert took == pytest.approx(100.0)
    started = now[0] - 600.0
    assert loop._out_of_time(started, 20, took, 450.0, 1) == ""
    why = loop._out_of_time(started, 20, 400.0, 450.0, 1)
    assert why.startswith("time budget: 10.0 of 20 min used") and "stopped after 1 candidates" in why


def test_the_time_budget_expects_a_rewrite_at_the_incumbents_pace_and_a_search_draw_at_the_slowest():
    """Figures of a weak-start tune: the baseline (1 chunk of 300) answers at 1.8 s per item; a lever
    round with its settings took 87 s and was promoted; stage 1's move (4 chunks of 800) answered at
    4.5 s per item and took 204 s. A rewrite keeps the incumbent's settings: expected to take 87 s, and
    the test to answer the best at the incumbent's pace; a search draw may be as slow as the slowest."""
    from selftune.loop import Pace

    pace = Pace(n_val=42, n_test=36, base_key="weak", base_secs=1.8)
    assert pace.next_round("weak", keeps=True) == pytest.approx(1.8 * 42)  # nothing measured yet: the baseline's
    pace.evaluated("rp", 1.9)
    pace.took("rp", 87.0)
    pace.evaluated("long", 4.5)
    pace.took("long", 204.0)
    assert pace.next_round("rp", keeps=True) == 87.0
    assert pace.test("rp", keeps=True) == pytest.approx((1.8 + 1.9) * 36)
    assert pace.next_round("rp", keeps=False) == 204.0
    assert pace.test("rp", keeps=False) == pytest.approx((1.8 + 4.5) * 36)
    # the incumbent's settings never had a round of their own (the baseline): the slowest round
    assert pace.next_round("weak", keeps=True) == 204.0
    # and the test answers the baseline at its pace, not both at the slower one (a default run's 2.5 s
    # and 4.3 s per item over 36 test items: 245 s, where 2 x 4.3 s said 310 s)
    slow = Pace(n_val=42, n_test=36, base_key="base", base_secs=2.5)
    slow.evaluated("long", 4.3)
    assert slow.test("base", keeps=False) == pytest.approx(244.8)


def test_a_candidate_is_stopped_midway_when_its_own_pace_would_overrun_the_budget(monkeypatch):
    """Figures of the 2026-12-06 default runs: the baseline answered at 2.5 s per validation item; a
    promoted round's time beyond its 42 validation answers was 25 items' worth; stage 1's move (4 chunks
    of 800) answered its first 10 items in 57 s, 30 s of them in its answers: the other 27 s were the
    judge's, which scores only the first 8 items (the monitoring sample, below the trust bar). So the
    rest of validation is 32 answers at 3 s (96 s), no judge call left: the first slice's 5.7 s per item
    would have said 182 s, and stopped a candidate that fits."""
    import time

    from selftune import loop
    from selftune.loop import Pace, val_pace
    from selftune.records import Answer, Judgment, Probe

    js = [Judgment(answer=Answer(probe=Probe(id=str(i), question="q?", split="val"), text="a", seconds=3.0),
                   scores={}, overall=0.5) for i in range(10)]
    left, secs = val_pace(js, 57.0, 8, 42)
    assert left == pytest.approx(96.0) and secs == pytest.approx((57 + 96) / 42)
    # with every item judged (a trusted judge), each item still to come pays its judge share too
    left_all, _ = val_pace(js, 57.0, None, 42)
    assert left_all == pytest.approx(96.0 + 32 * 27 / 10)
    # a sample larger than the slice: the judged items still to come pay it
    assert val_pace(js, 57.0, 12, 42)[0] == pytest.approx(96.0 + 2 * 2.7)
    # no item judged: the time beyond the answers is the checks', per item
    assert val_pace(js, 40.0, 0, 42)[0] == pytest.approx(96.0 + 32 * 1.0)

    pace = Pace(n_val=42, n_test=36, base_key="base", base_secs=2.5, n_train=16)
    assert pace.midway(secs, left) == pytest.approx(left + secs * 16 + (2.5 + secs) * 36)  # nothing measured
    pace.evaluated("rp", 2.6)
    pace.took("rp", 2.6 * 42 + 2.6 * 25)  # a full round: 25 items' worth beyond validation
    pace.evaluated("x", 9.9)
    pace.took("x", 10.0, full=False)  # a pruned round teaches nothing about a round's overhead
    assert pace.overhead == [pytest.approx(25.0)]
    need = pace.midway(secs, left)
    assert need == pytest.approx(96.0 + secs * 25 + (2.5 + secs) * 36)
    now = [10_000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    assert loop._out_of_time_midway(now[0] - 10.1 * 60, 19.5, pace, 10, secs, left) == ""  # ~6.9 min more fits
    why = loop._out_of_time_midway(now[0] - 13 * 60, 19.5, pace, 10, secs, left)
    assert why.startswith(f"time budget: stopped after 10 of 42 validation items: at {secs:.1f} s per item")
    assert f"(~{need / 60:.1f} min) would end at {13 + need / 60:.1f} of 19.5 min" in why
    # as the last candidate, without the train minibatch a promotion answers (16 items of the 25's overhead)
    assert pace.midway(secs, left, train=False) == pytest.approx(96.0 + secs * 9 + (2.5 + secs) * 36)
    short = 60 * 19.5 - pace.midway(secs, left, train=False) - 1  # fits without the minibatch, not with it
    assert loop._out_of_time_midway(now[0] - short, 19.5, pace, 10, secs, left)
    assert loop._out_of_time_midway(now[0] - short, 19.5, pace, 10, secs, left, train=False) == ""
