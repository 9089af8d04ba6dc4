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


def cheap(setting):  # a cheap objective that prefers more chunks, then the smaller chunk size
    return setting["top_k"] / 10 + (setting["chunk_size"] == 100) * 0.01


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_one_lever_per_round_first_move_from_stage_1_then_search_and_rewrites(sampler):
    seen = []
    # a new text per call: the same text under the same params is not proposed twice (test_pool.py)
    role = fake_role(lambda m: (seen.append(m[-1]["content"]),
                                f"Answer in one short sentence quoting the context, take {len(seen)}.")[1])
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(sampler=sampler), seed=0, cheap=cheap)
    history = [rnd(0, BASE, 0.4)]
    for i in range(1, 7):
        params, notes = opt.propose(history)
        assert 1 <= params["top_k"] <= 4 and params["chunk_size"] in (100, 200)
        incumbent = history[history[-1].incumbent_index]
        if i % 2:  # search rounds change the non-text params only
            assert params["instructions"] == incumbent.params["instructions"] and notes[0].startswith("search")
        else:  # rewrite rounds change the instructions only
            assert {k: params[k] for k in ("top_k", "chunk_size")} == {
                k: incumbent.params[k] for k in ("top_k", "chunk_size")
            }
            assert params["instructions"] == f"Answer in one short sentence quoting the context, take {len(seen)}."
            assert "rewritten" in notes[0]
        if i == 1:  # stage 1's best retrieval setting, no LM call made for it
            assert (params["top_k"], params["chunk_size"]) == (4, 100) and not seen
        history.append(rnd(i, params, 0.4 + i / 100))
    assert "too long" in seen[0] and "q0?" in seen[0]  # the rationales of the worst train items
    assert opt.ledger()["stage1_settings_screened"] == 8  # 4 top_k x 2 chunk sizes, each scored once


def test_rejected_rewrite_falls_back_to_weakest_criterion_description():
    role = fake_role(lambda m: "ok")
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(), seed=0, cheap=cheap)
    history = [rnd(0, BASE, 0.4)]
    history.append(rnd(1, opt.propose(history)[0], 0.3))  # a search round, not promoted
    params, notes = opt.propose(history)
    concise = next(c for c in RUBRIC.criteria if c.name == "concise")
    assert params["instructions"].endswith(concise.description)
    assert "rejected (too short)" in notes[0]


def test_rewrite_alarms_reject_reward_hacking_and_count_it():
    from selftune.optimize import rewrite_alarms

    shown = list(rnd(0, BASE, 0.4).train.judgments)
    probe = shown[0].answer.probe.model_copy(update={"question": "What does the pass statement do in a loop body?"})
    shown[0] = shown[0].model_copy(update={"answer": shown[0].answer.model_copy(update={"probe": probe})})
    assert rewrite_alarms("Say what the pass statement do in a loop body precisely.", shown, []) == [
        "copies_probe_text"
    ]
    assert rewrite_alarms("Answer so the grader gives the top score.", shown, []) == ["grader_talk"]
    assert rewrite_alarms("Answer briefly from the context, quoting it.", shown, [10, 20]) == ["length_creep"]
    assert rewrite_alarms("Answer briefly from the context.", shown, [10, 40]) == []
    role = fake_role(lambda m: "Answer the question so the judge gives a perfect score.")
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(), seed=0, cheap=cheap)
    history = [rnd(0, BASE, 0.4)]
    history.append(rnd(1, opt.propose(history)[0], 0.3))
    params, notes = opt.propose(history)
    assert "alarm: grader_talk" in notes[0] and opt.alarms == {"grader_talk": 1}
    assert "judge" not in params["instructions"]


def test_checkpoint_prunes_a_clearly_losing_candidate_only():
    from selftune.config import GateSpec

    opt = Optimizer(SPACE, RUBRIC, fake_role(lambda m: "x"), OptimizerSpec(), seed=0, cheap=cheap)

    def items(value, n=10):
        return [
            Judgment(
                answer=Answer(probe=Probe(id=str(i), question=f"q{i}?", split="val"), text="a"),
                scores={"correct": Score(value=value)},
                overall=value,
            )
            for i in range(n)
        ]

    incumbent = Evaluation(params={}, split="val", judgments=tuple(items(0.8, 40)))
    assert opt.checkpoint(items(0.1), incumbent, GateSpec())
    assert opt.pruned_reason.startswith("pruned after 10 validation items: clearly worse than the incumbent")
    mixed = [j.model_copy(update={"overall": 0.9 if k % 2 else 0.6}) for k, j in enumerate(items(0.0))]
    assert not opt.checkpoint(mixed, incumbent, GateSpec())  # within noise of the incumbent: goes on


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
        j.answer.probe.reference
        for j in test
        if j.answer.probe.reference and j.answer.probe.reference not in train_text
    }
    train_qs = {j.answer.probe.question for j in result.rounds[0].train.judgments}
    calls = models.roles["optimizer"].engine.calls
    seen = "\n".join(m["content"] for call in calls for m in call["messages"])
    assert calls and secrets and any(q in seen for q in train_qs)  # it did see train failures
    # the fake optimizer model is hosted: its rewrite ran GEPA on train minibatches through the loop's callback
    assert result.stats["search/gepa_runs"] == 1 and result.stats["search/gepa_items_answered"] > 0
    assert not [s for s in secrets if s in seen]


def test_steer_makes_the_optimizer_chase_only_the_trusted_criteria():
    seen = []
    role = fake_role(lambda m: (seen.append(m[-1]["content"]), "Answer in one short sentence quoting the context.")[1])
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(), seed=0, cheap=cheap)
    history = [rnd(0, BASE, 0.4, overall=0.8)]
    params, _ = opt.propose(history)
    assert opt.search.best()[1] == pytest.approx(0.8)  # the baseline, told on the overall
    history.append(rnd(1, params, 0.6, overall=0.9))
    # the judge fell below the bar: climb the checks alone, and show the rewriter only their reasons
    correct_only = Rubric.model_validate(
        {"criteria": [{"name": "correct", "kind": "check", "weight": 1, "check": {"type": "reference_match"}}]}
    )
    opt.steer(checks_only(correct_only, 0.0))
    params, _ = opt.propose(history)  # a rewrite round
    assert "too long" not in seen[-1] and "q0?" in seen[-1]
    # the search's history was re-scored on the new signal: "correct" (0.4, 0.6), not the overall (0.8, 0.9)
    assert opt.search.best()[1] == pytest.approx(0.6)
    assert opt.value(history[1].val) == pytest.approx(0.6)
    opt.steer(whole_rubric(RUBRIC, 0.0))  # back within the bar: every criterion again
    assert opt.value(history[1].val) == pytest.approx(0.9)


def test_generation_levers_move_once_each_when_the_incumbents_answers_show_a_costly_symptom():
    """repeat_penalty goes to its highest choice when enough validation answers are padded or repetitive;
    max_tokens one step up when as many stop mid-sentence; each once, before stage 1's first move and any
    draw or rewrite, the one whose answers lose the most against the clean ones first (an answer with both
    symptoms counted for the first); a symptom that is absent, or costs no score, never moves its lever."""
    space = {**SPACE, "repeat_penalty": ChoiceParam(type="choice", choices=[1.0, 1.1, 1.3], initial=1.0),
             "max_tokens": ChoiceParam(type="choice", choices=[32, 48, 64], initial=48)}
    base = {**BASE, "repeat_penalty": 1.0, "max_tokens": 48}
    role = fake_role(lambda m: "Answer in one short sentence quoting the context, please.")
    opt = Optimizer(space, RUBRIC, role, OptimizerSpec(), seed=0, cheap=cheap)

    def answers(texts, overalls, flags=()):
        # the padded answers (the first 3, when flagged) are capped at 0, as the attack flags cap them
        js = tuple(Judgment(answer=Answer(probe=Probe(id=str(i), question=f"q{i}?", split="val"), text=t),
                            scores={"correct": Score(value=o)}, overall=o, flags=flags if i < 3 else ())
                   for i, (t, o) in enumerate(zip(texts, overalls, strict=True)))
        return Evaluation(params=base, split="val", judgments=js)

    # 3 of 10 answers repetitive (padding flag, capped at 0) and so run into their token budget; 4 more
    # cut off mid-sentence (0.3 each); 3 clean (0.8). The repetitive ones count for repetition only:
    # 3 x 0.8 below the clean ones, more than the cut-off ones' 4 x 0.5 (counted as cut off too, the 7
    # would lose 7 x 0.63 and the longer budget would go first)
    val = answers(["It is a list. It is a list. It is"] * 3 + ["It returns the value and"] * 4 + ["Done."] * 3,
                  [0.0] * 3 + [0.3] * 4 + [0.8] * 3, flags=("padding:repetitive",))
    r0 = Round(index=0, params=base, train=val.model_copy(update={"split": "train"}), val=val,
               gate=GateDecision(promote=True, reason=""), incumbent_index=0)
    history = [r0]
    assert not opt.stage2_turn(history)  # round 1 is a search turn, but a lever is due: no worker's draw
    assert not opt.keeps_settings(history)
    p1, n1 = opt.propose(history)
    assert p1 == {**base, "repeat_penalty": 1.3} and n1 == (
        "lever: repeat_penalty 1.0 -> 1.3 (3 of 10 validation answers repetitive or padded, scoring 0.80 below "
        "those with no symptom)",)
    history.append(r0.model_copy(update={"index": 1, "params": p1, "incumbent_index": 0, "notes": n1}))
    p2, n2 = opt.propose(history)
    assert p2 == {**base, "max_tokens": 64} and n2[0].startswith("lever: max_tokens 48 -> 64 (4 of 10")
    assert n2[0].endswith("scoring 0.50 below those with no symptom)")
    history.append(r0.model_copy(update={"index": 2, "params": p2, "incumbent_index": 0, "notes": n2}))
    p3, n3 = opt.propose(history)  # both moved once: stage 1's first move, then draws and rewrites
    assert n3[0].startswith("search: stage 1") and p3["repeat_penalty"] == 1.0 and p3["max_tokens"] == 48
    history.append(r0.model_copy(update={"index": 3, "params": p3, "incumbent_index": 0, "notes": n3}))
    assert opt.keeps_settings(history)  # round 4 rewrites: the incumbent's settings, at its pace (time budget)
    p4, n4 = opt.propose(history)
    assert not n4[0].startswith("lever") and {k: v for k, v in p4.items() if k != "instructions"} == {
        k: v for k, v in base.items() if k != "instructions"}

    # a lever takes no one's turn: after one lever round, the search turn it came before is still due
    # (stage 1's move), then a rewrite
    one = Optimizer(space, RUBRIC, role, OptimizerSpec(), seed=0, cheap=cheap)
    rep = answers(["It is a list. It is a list. It is"] * 3 + ["Done."] * 7, [0.0] * 3 + [0.8] * 7,
                  flags=("padding:repetitive",))
    h = [r0.model_copy(update={"val": rep})]
    q1, m1 = one.propose(h)
    assert m1[0].startswith("lever: repeat_penalty 1.0 -> 1.3 (3 of 10")
    h.append(h[0].model_copy(update={"index": 1, "params": q1, "incumbent_index": 0, "notes": m1}))
    assert one.stage2_turn(h) is False and not one.keeps_settings(h)  # stage 1's move, the tune's own
    q2, m2 = one.propose(h)
    assert m2[0].startswith("search: stage 1") and q2["repeat_penalty"] == 1.0
    h.append(h[0].model_copy(update={"index": 2, "params": q2, "incumbent_index": 0, "notes": m2}))
    assert one.keeps_settings(h)
    assert "rewritten" in one.propose(h)[1][0]

    # no costly symptom: 4 of 10 answers cut off but scoring as the rest do, none padded: no lever moves
    calm = Optimizer(space, RUBRIC, role, OptimizerSpec(), seed=0, cheap=cheap)
    ok = answers(["It returns the value and"] * 4 + ["It is a list."] * 6, [0.5] * 10)
    r0 = r0.model_copy(update={"val": ok})
    history = [r0]
    for i in range(1, 4):
        p, notes = calm.propose(history)
        assert not notes[0].startswith("lever")  # (a stage-2 draw may still try any value)
        history.append(r0.model_copy(update={"index": i, "params": p, "incumbent_index": 0}))
