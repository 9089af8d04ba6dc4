"""The judge is measured during every tune; below the trust bar it may not steer promotion."""

import itertools
import json
import random
import re

import pytest
from mlflow import MlflowClient

from conftest import ROOT, FakeModels, fake_role, no_progress, write_config
from selftune.config import load_config
from selftune.loop import Session, tune
from selftune.records import Answer, Chunk, Probe
from selftune.rubric import load_rubric
from selftune.checks import token_f1
from selftune.tracking import MlflowTracker, report
from selftune.objective import checks_only


def run_with_judge(tmp_path, corpus_dir, judge_script, **over):
    cfg = load_config(write_config(tmp_path, corpus_dir, **over))
    models = FakeModels()
    models.roles["judge"] = fake_role(judge_script)
    session = Session(cfg, models=models)
    tracker = MlflowTracker(cfg)
    return cfg, tune(session, 2, tracker, no_progress), tracker


FEW = "{trust: {min_items: 3}}"  # the unit tune has a handful of items; the default bar wants 10


def fenced(text, label):
    """The data inside one fenced block of a judge prompt."""
    m = re.search(rf"^{label}:\n<<(\S+)>>\n(.*?)\n<</\1>>", text, re.S | re.M)
    return m.group(2) if m else ""


def reader(m):
    """A judge that reads: its score follows the answer's token F1 with the reference; of two answers
    it prefers the longer one, in either order."""
    user = m[-1]["content"]
    if "compare two answers" in m[0]["content"]:
        a, b = len(fenced(user, "Answer A")), len(fenced(user, "Answer B"))
        return json.dumps({"rationale": "fuller", "winner": "A" if a > b else "B" if b > a else "tie"})
    f1 = token_f1(fenced(user, "Answer to grade"), fenced(user, "Reference answer"))
    return json.dumps({"rationale": "as close as the reference", "score": 1 + round(4 * f1)})


def test_a_reading_judge_is_trusted_once_measured(tmp_path, corpus_dir):
    cfg, result, tracker = run_with_judge(tmp_path, corpus_dir, reader, judge=FEW)
    st = result.stats
    assert st["judge/retest/flip_rate"] == 0.0 and st["judge/retest/score_sd"] == 0.0 and st["judge/retest/n"] > 0
    assert st["judge/swap/consistency"] == 1.0 and st["judge/valid/grounded/rate"] == 1.0
    assert st["judge/discrimination/grounded/reference"] > 0.9 and st["judge/spread/grounded"] > 0.05
    assert st["judge/trusted"] == 1.0 and st["judge/verdict"].state == "trusted"
    assert not result.rounds[0].trusted  # no position-consistency figure yet after the baseline: unproven
    assert "judge unproven (" in result.rounds[1].gate.reason or result.rounds[1].trusted
    text = report(result)
    assert "judge within the trust bar" in text and "## Judge trust bar: trusted" in text
    for figure, bar in (("grounded valid-score rate", ">= 0.95"), ("test-retest flip rate", "<= 0.25"),
                        ("swap consistency", ">= 0.6"), ("grounded score spread (SD)", ">= 0.05"),
                        ("grounded rank rho with reference", ">= 0.2"), ("grounded length correlation", "within ±0.6")):
        row = rf"^\| {re.escape(figure)} \| [-+0-9.]+ \| {re.escape(bar)} \| \d+ \| ok \|$"
        assert re.search(row, text, re.M), figure
    parent = MlflowClient(cfg.tracking_uri()).get_run(tracker.parent_id)
    assert parent.data.metrics["judge/trusted"] == 1.0 and "judge/retest/score_sd" in parent.data.metrics
    assert parent.data.tags["selftune.judge_state"] == "trusted" and parent.data.metrics["judge/valid_rate"] == 1.0


def test_until_trusted_the_judge_scores_a_sample_and_once_trusted_every_item_it_decides_on(tmp_path, corpus_dir):
    from selftune.loop import has_unscored_items

    for k in range(4):  # enough probes for splits larger than the monitoring sample
        (corpus_dir / f"valves{k}.txt").write_text(" ".join(
            f"Pump{k}{n} gasket{n} valve{k} opens at {10 * k + n} bar and closes again at {5 * n + k} bar."
            for n in range(6)), encoding="utf-8")
    judge = "{trust: {min_items: 3, max_length_corr: null}, monitor_sample: 2}"  # its length bias: not under test
    cfg, result, _ = run_with_judge(tmp_path, corpus_dir, reader, judge=judge,
                                    probes="{count: 30, mix: {single: 1.0}, dedup_similarity: 0.999}")
    rounds = result.rounds
    assert result.stats["judge/verdict"].state == "trusted", result.stats["judge/verdict"].reasons
    assert all(len(ev.judgments) > 2 for ev in (rounds[0].train, rounds[0].val)), result.stats
    assert not rounds[0].trusted and has_unscored_items(rounds[0].train)  # unproven: a sample of 2 was scored
    decided = [r for r in rounds[1:] if r.trusted and not r.pruned]
    assert decided
    for r in decided:  # the skipped items were judged once the judge's scores counted, on both sides
        assert not has_unscored_items(r.val)
        assert not has_unscored_items(rounds[rounds[r.index - 1].incumbent_index].val)


def test_a_judge_measured_on_too_few_items_is_unproven_and_decides_nothing(tmp_path, corpus_dir):
    cfg, result, tracker = run_with_judge(tmp_path, corpus_dir, reader)  # default bar: 10 items per figure
    verdict = result.stats["judge/verdict"]
    assert verdict.state == "unproven" and result.stats["judge/trusted"] == 0.0
    assert any("fewer than trust.min_items 10" in r for r in verdict.reasons)
    for r in result.rounds[1:]:
        assert not r.trusted and r.gate.reason.startswith("judge unproven (")
        assert "deterministic criteria only" in r.gate.reason and "grounded" not in r.gate.criterion_deltas
    text = report(result)
    assert "JUDGE UNPROVEN (" in text and "BELOW THE TRUST BAR" not in text
    assert "not counted yet (needs 10 items)" in text
    parent = MlflowClient(cfg.tracking_uri()).get_run(tracker.parent_id)
    assert parent.data.tags["selftune.judge_state"] == "unproven"


def test_fickle_judge_falls_below_the_bar_and_only_checks_promote(tmp_path, corpus_dir):
    scores = itertools.cycle([5, 1])  # every second call contradicts the one before

    def fickle(m):
        if "compare two answers" in m[0]["content"]:
            return json.dumps({"rationale": "x", "winner": "tie"})
        return json.dumps({"rationale": "whim", "score": next(scores)})

    cfg, result, tracker = run_with_judge(tmp_path, corpus_dir, fickle, judge=FEW)
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

    _, result, _ = run_with_judge(tmp_path, corpus_dir, first_wins, judge=FEW)
    assert result.stats["judge/swap/consistency"] == 0.0
    assert result.stats["judge/trusted"] == 0.0 and "swap consistency" in result.stats["judge/untrusted_because"]


def test_pairwise_mode_promotes_on_order_debiased_preferences(tmp_path, corpus_dir):
    # FakeModels' optimizer rewrites instructions to "Quote ..."; the reader prefers the longer answer
    # in both orders, which is consistent, so it is trusted once the first round has measured it
    # (the two validation probes give two comparisons a round; its length bias is not under test).
    _, result, _ = run_with_judge(tmp_path, corpus_dir, reader,
                                  judge="{mode: pairwise, trust: {min_items: 2, max_length_corr: null}}")
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


def rescored(f):
    """The reader, its score passed through ``f``."""
    def script(m):
        if "compare two answers" in m[0]["content"]:
            return reader(m)
        return json.dumps({"rationale": "fine", "score": f(json.loads(reader(m))["score"])})
    return script


@pytest.mark.parametrize("second, agree", [(lambda s: s, 1.0), (lambda s: 1 if s >= 3 else 5, 0.0)])
def test_judge_panel_agreement_is_measured_and_gates_trust(tmp_path, corpus_dir, second, agree):
    cfg = load_config(write_config(tmp_path, corpus_dir, judge="{models: [local, local], trust: {min_items: 3}}"))
    models = FakeModels()
    models.roles["judge"] = fake_role(reader, name="judge")
    models.roles["judge2"] = fake_role(rescored(second), name="judge2")
    tracker = MlflowTracker(cfg)
    result = tune(Session(cfg, models=models), 2, tracker, no_progress)
    st = result.stats
    # the second judge repeats the first, or turns each pass (3 and up) into a fail and back, on every item
    assert st["judge/agreement/rate"] == agree and st["judge/agreement/grounded/rate"] == agree
    assert st["judge/agreement/disagreement_rate"] == 1 - agree and st["judge/agreement/n"] > 0
    j = result.rounds[0].val.judgments[0].scores["grounded"]
    first = j.by_judge["judge"]
    assert j.by_judge == {"judge": first, "judge2": second(first)} and j.raw == (first + second(first)) / 2
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
    assert not monitor.verdict().trusted


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


# --- The bar against judges whose truth is known: four scripted judges on the shipped labelled items ---

LABELS = ROOT / "datasets/labels/pyref-labels.jsonl"


def labelled_judge(m):
    """Reproduces the shipped human labels: the grounded level a person gave this answer; of two
    answers, the one a person rated higher (a tie when equal)."""
    level = {json.loads(line)["answer"]: json.loads(line)["labels"]["grounded"] for line in LABELS.open()}
    user = m[-1]["content"]
    if "compare two answers" in m[0]["content"]:
        a, b = level[fenced(user, "Answer A")], level[fenced(user, "Answer B")]
        return json.dumps({"rationale": "as a person rated them", "winner": "A" if a > b else "B" if b > a else "tie"})
    return json.dumps({"rationale": "as a person rated it", "score": level[fenced(user, "Answer to grade")]})


def random_judge(seed=0):
    rng = random.Random(seed)

    def script(m):
        if "compare two answers" in m[0]["content"]:
            return json.dumps({"rationale": "coin", "winner": rng.choice("AB")})
        return json.dumps({"rationale": "dice", "score": rng.randint(1, 5)})
    return script


def constant_judge(m):
    if "compare two answers" in m[0]["content"]:
        return json.dumps({"rationale": "both fine", "winner": "tie"})
    return json.dumps({"rationale": "fine", "score": 4})


def prose_judge(m):
    return "This answer looks good to me and I would rate it highly."


def bar_on_labels(script):
    """The trust monitor run over the 44 labelled items, as a tune runs it: every item judged and
    observed, 20 re-judged, the labels' kappa, and 22 candidate-vs-incumbent comparisons in both
    orders (two answers to the same question); then the verdict."""
    from selftune.calibrate import read_items, to_answer
    from selftune.config import JudgeSpec
    from selftune.judge import Judge
    from selftune.records import Evaluation
    from selftune.trust import Monitor

    rubric = load_rubric(ROOT / "configs/rubrics/taste.yaml")
    rows = read_items(LABELS, rubric, need_labels=True)
    judge = Judge(rubric, fake_role(script))
    monitor = Monitor(rubric, judge, JudgeSpec(retest_sample=20, trust={"labels": LABELS}), seed=3)
    questions = sorted({r["question"] for r in rows})
    answers: dict[str, list] = {}
    for i, r in enumerate(rows):  # probe id = the question, so answers to one question pair up
        a = to_answer(r, i)
        answers.setdefault(r["question"], []).append(
            a.model_copy(update={"probe": a.probe.model_copy(update={"id": f"q{questions.index(r['question'])}"})}))
    evs = [Evaluation(params={}, split="val", judgments=tuple(judge.judge(answers[q][k]) for q in questions))
           for k in range(4)]
    monitor.observe(evs)
    monitor.retest(evs)
    monitor.calibrate()
    monitor.compare(evs[0], evs[1], None)
    monitor.compare(evs[2], evs[3], None)
    return monitor.verdict(), monitor.stats


@pytest.mark.parametrize("name, script, reason", [
    ("constant", constant_judge, "grounded says the same thing to everything (score SD 0.000 < 0.05 over 44 items)"),
    ("random", random_judge(), "flip rate "),
    ("never parses", prose_judge, "grounded valid-score rate 0.00 < 0.95 (0 of 44 items scored)"),
])
def test_scripted_judges_that_cannot_be_trusted_are_refused_for_the_stated_reason(name, script, reason):
    verdict, stats = bar_on_labels(script)
    assert verdict.state == "untrusted", (name, verdict.reasons)
    assert any(r.startswith(reason) for r in verdict.reasons), (name, verdict.reasons)
    if name == "random":  # blind as well as fickle: it ranks nothing as the reference or the humans do
        assert stats["retest/flip_rate"] > 0.25
        assert any("does not rank answers as reference" in r for r in verdict.reasons)
        assert any("kappa" in r for r in verdict.reasons)
    if name == "constant":
        assert "discrimination/grounded/reference" not in stats  # undefined for a constant: spread says it
        assert any(r.startswith("grounded agrees with human labels at kappa +0.00") for r in verdict.reasons)


def test_a_judge_that_reproduces_the_human_labels_is_trusted():
    verdict, stats = bar_on_labels(labelled_judge)
    assert verdict.state == "trusted" and verdict.reasons == (), verdict.reasons
    assert stats["valid/grounded/rate"] == 1.0 and stats["retest/flip_rate"] == 0.0 and stats["swap/consistency"] == 1.0
    assert stats["kappa/grounded"] == 1.0 and stats["kappa/grounded/n"] == 44
    assert stats["discrimination/grounded/reference"] == pytest.approx(0.704, abs=0.01)  # the humans' own rho
    assert "discrimination/grounded/retrieval" not in stats  # labelled items have no known source span
    counted = {f.label for f in verdict.figures if f.counts}
    assert {"grounded valid-score rate", "test-retest flip rate", "swap consistency", "grounded score spread (SD)",
            "grounded rank rho with reference", "grounded kappa with human labels"} <= counted


def test_a_judge_that_cannot_score_stops_the_tune_before_any_work(tmp_path, corpus_dir):
    from selftune.errors import InputError

    cfg = load_config(write_config(tmp_path, corpus_dir))
    models = FakeModels()
    models.roles["judge"] = fake_role(prose_judge)
    with pytest.raises(InputError, match=r"cfg\.yaml: models\.judge\.model: judge model fake/fake gave no usable "
                                         r"score to a probe call \(schema: 'This answer looks good"):
        Session(cfg, models=models)
    assert models.roles["generator"].engine.calls == [] and models.roles["sut"].engine.calls == []


def test_trust_labels_that_do_not_fit_the_rubric_stop_the_tune_before_any_work(tmp_path, corpus_dir):
    from selftune.errors import InputError

    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"question": "q?", "answer": "a", "labels": {"polite": 3}}) + "\n")
    cfg = load_config(write_config(tmp_path, corpus_dir, judge=f"{{trust: {{labels: {labels}}}}}"))
    models = FakeModels()
    with pytest.raises(InputError, match=r"labels\.jsonl: line 1\.labels\.polite: unknown criterion"):
        Session(cfg, models=models)
    assert models.roles["generator"].engine.calls == []
