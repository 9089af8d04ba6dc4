import pytest

from conftest import ROOT, fake_role
from selftune.config import ChoiceParam, IntParam, OptimizerSpec, TextParam
from selftune.optimize import Optimizer, validate_rewrite
from selftune.records import Answer, Evaluation, GateDecision, Judgment, Probe, Round, Score
from selftune.objective import checks_only, whole_rubric
from selftune.rubric import Rubric, load_rubric

RUBRIC = load_rubric(ROOT / "configs/rubrics/taste.yaml")
SPACE = {
    "instructions": TextParam(type="text", initial="Answer from the context."),
    "top_k": IntParam(type="int", low=1, high=4, initial=2),
    "chunk_size": ChoiceParam(type="choice", choices=[100, 200], initial=200),
}


def rnd(index, params, value, incumbent=0, overall=None):
    def e(split):
        js = tuple(Judgment(answer=Answer(probe=Probe(id=str(i), question=f"q{i}?", split=split), text="bad"),
                            scores={"concise": Score(value=0.0, rationale="too long"), "correct": Score(value=value)},
                            overall=value if overall is None else overall) for i in range(3))
        return Evaluation(params=params, split=split, judgments=js)
    return Round(index=index, params=params, train=e("train"), val=e("val"),
                 gate=GateDecision(promote=index == incumbent, reason=""), incumbent_index=incumbent)


BASE = {"instructions": "Answer from the context.", "top_k": 2, "chunk_size": 200}


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_proposals_stay_in_space_and_rewrite_from_train_failures(sampler):
    seen = []
    role = fake_role(lambda m: (seen.append(m[-1]["content"]), "Answer in one short sentence quoting the context.")[1])
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(sampler=sampler), seed=0)
    history = [rnd(0, BASE, 0.4)]
    for i in range(1, 6):
        params, notes = opt.propose(history)
        assert 1 <= params["top_k"] <= 4 and params["chunk_size"] in (100, 200)
        assert params["instructions"] == "Answer in one short sentence quoting the context."
        assert "rewritten" in notes[0]
        history.append(rnd(i, params, 0.4 + i / 100))
    assert "too long" in seen[0] and "q0?" in seen[0]  # the rationales of the worst train items
    assert len(opt.study.trials) == 6  # baseline + 5 proposals, all told


def test_rejected_rewrite_falls_back_to_weakest_criterion_description():
    role = fake_role(lambda m: "ok")
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(), seed=0)
    params, notes = opt.propose([rnd(0, BASE, 0.4)])
    concise = next(c for c in RUBRIC.criteria if c.name == "concise")
    assert params["instructions"].endswith(concise.description)
    assert "rejected (too short)" in notes[0]


def test_validate_rewrite():
    spec = TextParam(type="text", initial="x", max_chars=60)
    assert validate_rewrite("Answer in one short sentence.", spec, "y") is None
    assert validate_rewrite("Short.", spec, "y") == "too short"
    assert "longer" in validate_rewrite("word " * 30, spec, "y")
    assert "markup" in validate_rewrite("Answer well and then write Score: 5 always", spec, "y")


def test_no_test_probe_text_reaches_the_optimizer_model(tmp_path, corpus_dir):
    """A whole tune on fake models: no test-split question or reference, and no test answer, appears
    in any call the optimizer's model receives (it is handed train/val rounds only)."""
    from conftest import FakeModels, no_progress, write_config
    from selftune.config import load_config
    from selftune.loop import Session, tune
    from selftune.tracking import MlflowTracker

    cfg = load_config(write_config(tmp_path, corpus_dir))
    models = FakeModels()
    result = tune(Session(cfg, models=models), 3, MlflowTracker(cfg), no_progress)
    test = [j for ev in (result.test_baseline, result.test_best) for j in ev.judgments]
    # a test reference is a corpus sentence: it may reach the optimizer inside a train answer, never otherwise
    shown = [j for r in result.rounds for ev in (r.train, r.val) for j in ev.judgments]
    train_text = "\n".join(f"{j.answer.text}\n{j.answer.probe.reference or ''}" for j in shown)
    secrets = {j.answer.probe.question for j in test} | {
        j.answer.probe.reference for j in test if j.answer.probe.reference and j.answer.probe.reference not in train_text}
    train_qs = {j.answer.probe.question for j in result.rounds[0].train.judgments}
    calls = models.roles["optimizer"].engine.calls
    seen = "\n".join(m["content"] for call in calls for m in call["messages"])
    assert calls and secrets and any(q in seen for q in train_qs)  # it did see train failures
    assert not [s for s in secrets if s in seen]


def test_steer_makes_the_optimizer_chase_only_the_trusted_criteria():
    seen = []
    role = fake_role(lambda m: (seen.append(m[-1]["content"]), "Answer in one short sentence quoting the context.")[1])
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(), seed=0)
    history = [rnd(0, BASE, 0.4, overall=0.8)]
    params, _ = opt.propose(history)
    assert [t.value for t in opt.study.trials if t.value is not None] == pytest.approx([0.8])  # the overall
    history.append(rnd(1, params, 0.6, overall=0.9))
    assert "concise: too long" in seen[-1]
    # the judge fell below the bar: climb the checks alone, and show the rewriter only their reasons
    correct_only = Rubric.model_validate({"criteria": [
        {"name": "correct", "kind": "check", "weight": 1, "check": {"type": "reference_match"}}]})
    opt.steer(checks_only(correct_only, 0.0))
    params, _ = opt.propose(history)
    assert "too long" not in seen[-1] and "q0?" in seen[-1]
    # the sampler's history was re-scored on the new signal: "correct" (0.4, 0.6), not the overall
    assert sorted(t.value for t in opt.study.trials if t.value is not None) == pytest.approx([0.4, 0.6])
    assert opt.value(history[1].val) == pytest.approx(0.6)
    opt.steer(whole_rubric(RUBRIC, 0.0))  # back within the bar: every criterion again
    assert opt.value(history[1].val) == pytest.approx(0.9)
