"""The judge is measured during every tune; below the trust bar it may not steer promotion."""

import itertools
import re
import json

import pytest
from mlflow import MlflowClient

from conftest import FakeModels, fake_role, no_progress, write_config
from selftune.config import load_config
from selftune.loop import Session, tune
from selftune.records import Answer, Chunk, Probe
from selftune.rubric import load_rubric
from selftune.tracking import MlflowTracker, report
from selftune.objective import checks_only


def run_with_judge(tmp_path, corpus_dir, judge_script, **over):
    cfg = load_config(write_config(tmp_path, corpus_dir, **over))
    models = FakeModels()
    models.roles["judge"] = fake_role(judge_script)
    session = Session(cfg, models=models)
    tracker = MlflowTracker(cfg)
    return cfg, tune(session, 2, tracker, no_progress), tracker


def steady(m):
    if "compare two answers" in m[0]["content"]:
        return json.dumps({"rationale": "same", "winner": "tie"})
    return json.dumps({"rationale": "fine", "score": 4})


def test_steady_judge_is_measured_and_trusted(tmp_path, corpus_dir):
    cfg, result, tracker = run_with_judge(tmp_path, corpus_dir, steady)
    st = result.stats
    assert st["judge/retest/flip_rate"] == 0.0 and st["judge/retest/score_sd"] == 0.0 and st["judge/retest/n"] > 0
    assert st["judge/swap/consistency"] == 1.0 and st["judge/trusted"] == 1.0
    assert all(r.trusted for r in result.rounds)
    assert "judge within the trust bar" in report(result)
    parent = MlflowClient(cfg.tracking_uri()).get_run(tracker.parent_id)
    assert parent.data.metrics["judge/trusted"] == 1.0 and "judge/retest/score_sd" in parent.data.metrics


def test_fickle_judge_falls_below_the_bar_and_only_checks_promote(tmp_path, corpus_dir):
    scores = itertools.cycle([5, 1])  # every second call contradicts the one before

    def fickle(m):
        if "compare two answers" in m[0]["content"]:
            return json.dumps({"rationale": "x", "winner": "tie"})
        return json.dumps({"rationale": "whim", "score": next(scores)})

    cfg, result, tracker = run_with_judge(tmp_path, corpus_dir, fickle)
    assert result.stats["judge/retest/flip_rate"] > 0.25
    assert result.stats["judge/trusted"] == 0.0 and "flip rate" in result.stats["judge/untrusted_because"]
    for r in result.rounds[1:]:
        assert not r.trusted and "deterministic criteria only" in r.gate.reason
        assert "grounded" not in r.gate.criterion_deltas  # the LLM criterion did not count
    assert "BELOW THE TRUST BAR" in report(result)
    assert "on the deterministic criteria alone: validation" in report(result)
    client = MlflowClient(cfg.tracking_uri())
    parent = client.get_run(tracker.parent_id)
    assert parent.data.metrics["judge/trusted"] == 0.0 and "selftune.judge_untrusted" in parent.data.tags
    checks = checks_only(load_rubric(cfg.rubric), cfg.judge.flag_cap)
    assert parent.data.metrics["checks/test_best"] == pytest.approx(checks.mean(result.test_best))
    assert parent.data.metrics["checks/val_baseline"] == pytest.approx(checks.mean(result.rounds[0].val))
    assert [m.value for m in client.get_metric_history(tracker.parent_id, "judge/trusted")] == [0.0, 0.0, 0.0]


def test_position_biased_judge_fails_swap_consistency(tmp_path, corpus_dir):
    def first_wins(m):
        if "compare two answers" in m[0]["content"]:
            return json.dumps({"rationale": "A is first", "winner": "A"})
        return json.dumps({"rationale": "fine", "score": 4})

    _, result, _ = run_with_judge(tmp_path, corpus_dir, first_wins)
    assert result.stats["judge/swap/consistency"] == 0.0
    assert result.stats["judge/trusted"] == 0.0 and "swap consistency" in result.stats["judge/untrusted_because"]


def test_pairwise_mode_promotes_on_order_debiased_preferences(tmp_path, corpus_dir):
    def prefers_quotes(m):
        # FakeModels' optimizer rewrites instructions to "Quote ..."; this judge prefers the longer
        # answer in both orders, which is consistent, so it stays trusted.
        if "compare two answers" in m[0]["content"]:
            text = m[-1]["content"]
            a, b = (re.search(rf"^Answer {x}:\n<<(\S+)>>\n(.*?)\n<</\1>>", text, re.S | re.M).group(2) for x in "AB")
            winner = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
            return json.dumps({"rationale": "fuller", "winner": winner})
        return json.dumps({"rationale": "fine", "score": 4})

    _, result, _ = run_with_judge(tmp_path, corpus_dir, prefers_quotes, judge="{mode: pairwise}")
    assert result.stats["judge/swap/consistency"] == 1.0
    for r in result.rounds[1:]:
        assert r.gate.reason.startswith("pairwise: ")
        # the LLM criterion's delta is the mean order-debiased preference (2p - 1), not a score difference
        faced = result.rounds[result.rounds[r.index - 1].incumbent_index]
        inc = {j.answer.probe.id: len(j.answer.text) for j in faced.val.judgments}
        expect = [(len(j.answer.text) > inc[j.answer.probe.id]) - (len(j.answer.text) < inc[j.answer.probe.id])
                  for j in r.val.judgments if j.answer.probe.id in inc]
        assert r.gate.criterion_deltas["grounded"] == pytest.approx(sum(expect) / len(expect))


def test_failed_pairwise_comparisons_are_counted_not_ties(tmp_path, corpus_dir):
    def no_verdict(m):
        if "compare two answers" in m[0]["content"]:
            return "I cannot decide."
        return json.dumps({"rationale": "fine", "score": 4})

    _, result, _ = run_with_judge(tmp_path, corpus_dir, no_verdict)
    assert result.stats["judge/swap/invalid"] > 0 and "judge/swap/consistency" not in result.stats
    assert result.stats["judge/trusted"] == 0.0 and "comparisons failed" in result.stats["judge/untrusted_because"]


def scoring(score):
    def script(m):
        if "compare two answers" in m[0]["content"]:
            return json.dumps({"rationale": "same", "winner": "tie"})
        return json.dumps({"rationale": "fine", "score": score})
    return script


@pytest.mark.parametrize("second, agree", [(5, 1.0), (2, 0.0)])
def test_judge_panel_agreement_is_measured_and_gates_trust(tmp_path, corpus_dir, second, agree):
    cfg = load_config(write_config(tmp_path, corpus_dir, judge="{models: [local, local]}"))
    models = FakeModels()
    models.roles["judge"] = fake_role(scoring(4), name="judge")
    models.roles["judge2"] = fake_role(scoring(second), name="judge2")
    tracker = MlflowTracker(cfg)
    result = tune(Session(cfg, models=models), 2, tracker, no_progress)
    st = result.stats
    # 4 is a pass (0.75 on [0, 1]); 5 agrees with it, 2 (0.25) does not, on every item
    assert st["judge/agreement/rate"] == agree and st["judge/agreement/grounded/rate"] == agree
    assert st["judge/agreement/disagreement_rate"] == 1 - agree and st["judge/agreement/n"] > 0
    j = result.rounds[0].val.judgments[0].scores["grounded"]
    assert j.by_judge == {"judge": 4, "judge2": second} and j.raw == (4 + second) / 2
    assert st["judge/trusted"] == float(agree == 1.0)
    if agree == 0.0:
        assert "judges agree on 0.00 of items < 0.6" in st["judge/untrusted_because"]
        assert all("deterministic criteria only" in r.gate.reason for r in result.rounds[1:])
    client = MlflowClient(cfg.tracking_uri())
    parent = client.get_run(tracker.parent_id)
    assert parent.data.metrics["judge/agreement/rate"] == agree
    assert parent.data.params["model.judge"] == "local, local" and "judge panel agreement" in report(result)


def test_ragas_llm_metrics_are_retested_and_length_checked():
    from selftune.config import JudgeSpec
    from selftune.judge import Judge
    from selftune.records import Evaluation
    from selftune.rubric import Rubric
    from selftune.trust import Monitor

    state = {"verdict": 1}

    def script(m):  # ragas faithfulness: statements, then a verdict that changes after the first pass
        if '"verdict"' in m[-1]["content"]:
            statement = {"statement": "pass does nothing.", "reason": "r", "verdict": state["verdict"]}
            return json.dumps({"statements": [statement]})
        return json.dumps({"statements": ["pass does nothing."]})

    rubric = Rubric.model_validate({"criteria": [{"name": "faithful", "kind": "ragas", "metric": "faithfulness"}]})
    judge = Judge(rubric, fake_role(script, local=True))
    ctx = (Chunk(id="c", doc="d", start=0, end=1, text="pass is a null operation."),)
    evs = Evaluation(params={}, split="train", judgments=tuple(
        judge.judge(Answer(probe=Probe(id=f"p{i}", question="What does pass do?"), text="pass does nothing " * (i + 1),
                           contexts=ctx)) for i in range(4)))
    assert all(j.scores["faithful"].value == 1.0 for j in evs.judgments)
    monitor = Monitor(rubric, judge, JudgeSpec(retest_sample=3))
    state["verdict"] = 0
    out = monitor.retest([evs])
    assert out["retest/faithful/n"] == 3 and out["retest/faithful/flip_rate"] == 1.0 and out["retest/flip_rate"] == 1.0
    monitor.observe([evs])
    assert "length_corr/faithful" not in monitor.stats  # every score is 1.0: no correlation defined
    assert not monitor.verdict()[0]


def test_below_the_bar_the_optimizer_is_shown_only_deterministic_failures(tmp_path, corpus_dir):
    scores = itertools.cycle([5, 1])

    def fickle(m):
        if "compare two answers" in m[0]["content"]:
            return json.dumps({"rationale": "x", "winner": "tie"})
        return json.dumps({"rationale": "whim", "score": next(scores)})

    cfg = load_config(write_config(tmp_path, corpus_dir))
    models = FakeModels()
    models.roles["judge"] = fake_role(fickle)
    result = tune(Session(cfg, models=models), 2, MlflowTracker(cfg), no_progress)
    assert result.stats["judge/trusted"] == 0.0
    prompts = [c["messages"][-1]["content"] for c in models.roles["optimizer"].engine.calls]
    assert prompts and not any("grounded: whim" in p for p in prompts)
