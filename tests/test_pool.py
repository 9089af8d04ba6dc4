"""The instruction pool (parent selection, bookkeeping, no test item) and the two rewrite paths: the
lean one (one call of a local optimizer model) and the hosted one (the gepa library driving a
scripted reflection LM and a scripted train evaluation callback)."""

import re

import pytest

from conftest import ROOT, fake_role
from selftune.config import OptimizerSpec, TextParam
from selftune.lm import CallLedger
from selftune.objective import whole_rubric
from selftune.optimize import Optimizer
from selftune.pool import InstructionPool, SelftuneAdapter, gepa_mutate
from selftune.records import Answer, Chunk, Evaluation, GateDecision, Judgment, Probe, Round, Score
from selftune.rubric import load_rubric

RUBRIC = load_rubric(ROOT / "configs/rubrics/taste.yaml")
OBJ = whole_rubric(RUBRIC, 0.0)
SPACE = {"instructions": TextParam(type="text", initial="Answer from the context.")}
A, B, C = "Answer from the context.", "Answer from the context in one sentence.", "Say anything at all, please."


def probe(pid, split):
    return Probe(id=f"{split}{pid}", question=f"What does the {split} probe number {pid} ask about loops?", split=split)


def judged(p, value, text="an answer", why="too vague"):
    ctx = (Chunk(id="c1", doc="d.txt", start=0, end=40, text=f"Passage retrieved for {p.id}."),)
    return Judgment(answer=Answer(probe=p, text=text, contexts=ctx),
                    scores={"concise": Score(value=value, rationale=why), "correct": Score(value=value)},
                    overall=value)


def ev(split, values, params=None, n0=0):
    return Evaluation(params=params or {}, split=split,
                      judgments=tuple(judged(probe(n0 + i, split), v) for i, v in enumerate(values)))


def rnd(index, params, val, train=(), incumbent=0):
    return Round(index=index, params=params, train=ev("train", train, params), val=ev("val", val, params),
                 gate=GateDecision(promote=index == incumbent, reason=""), incumbent_index=incumbent)


# ---------------------------------------------------------------- the pool


def test_pool_keeps_every_text_its_best_context_and_picks_the_best_validation_mean():
    pool = InstructionPool("instructions", seed=0)
    history = [rnd(0, {"instructions": A, "top_k": 2}, [0.5, 0.5, 0.5], train=[0.2, 0.9]),
               rnd(1, {"instructions": A, "top_k": 1}, [0.1, 0.2, 0.3]),  # a search round: A, worse retrieval
               rnd(2, {"instructions": B, "top_k": 2}, [0.6, 0.4, 0.7]),  # a rewrite, not promoted
               rnd(3, {"instructions": C, "top_k": 2}, [0.2, 0.2, 0.2])]
    pool.observe(history[:2])
    pool.observe(history)  # idempotent: rounds already seen are not added twice
    assert list(pool.entries) == [A, B, C] and len(pool.entries[A].contexts) == 2
    # A is represented by its best context (round 0), with its train minibatch
    assert pool.scores(A, OBJ) == {("val", "val0"): 0.5, ("val", "val1"): 0.5, ("val", "val2"): 0.5,
                                   ("train", "train0"): 0.2, ("train", "train1"): 0.9}
    assert pool.select(OBJ, "best", default=A) == B  # 0.567 > 0.5: the best kept, whoever the incumbent is
    assert [j.answer.probe.id for j in pool.train_judgments(A, OBJ)] == ["train0", "train1"]
    assert pool.train_judgments(B, OBJ) == []  # not promoted: never answered train
    assert InstructionPool("instructions", 0).select(OBJ, "best", default=A) == A  # empty pool: the default
    # ties go to the earliest text
    tie = InstructionPool("instructions", 0)
    tie.observe([rnd(0, {"instructions": A}, [0.5]), rnd(1, {"instructions": B}, [0.5])])
    assert tie.select(OBJ, "best", default=C) == A


def test_pareto_parent_is_drawn_from_the_texts_best_on_some_item_and_is_seeded():
    def pool(seed):
        p = InstructionPool("instructions", seed=seed)
        p.observe([rnd(0, {"instructions": A}, [0.9, 0.1, 0.5]), rnd(1, {"instructions": B}, [0.1, 0.9, 0.5]),
                   rnd(2, {"instructions": C}, [0.1, 0.1, 0.4])])  # C is best on no item: never a parent
        return p

    p = pool(7)
    draws = [p.select(OBJ, "pareto", default=C) for _ in range(40)]
    assert set(draws) == {A, B}
    q = pool(7)
    assert [q.select(OBJ, "pareto", default=C) for _ in range(40)] == draws  # same seed, same draws


def test_pool_never_holds_a_test_item():
    pool = InstructionPool("instructions", seed=0)
    with pytest.raises(ValueError, match="test"):
        pool.add({"instructions": A}, [judged(probe(0, "test"), 0.5)], "round 9")
    assert pool.entries == {}
    adapter = SelftuneAdapter(pool, {"instructions": A}, lambda ps, items: pytest.fail("answered"), OBJ, 10)
    with pytest.raises(ValueError, match="train probes only"):
        adapter.evaluate([probe(0, "val")], {"instructions": A})


# ---------------------------------------------------------------- the lean path (local optimizer model)


def test_lean_path_mutates_the_pool_parent_with_one_local_call():
    seen = []
    reply = {"text": "Answer in one short sentence quoting the context."}
    role = fake_role(lambda m: (seen.append(m[-1]["content"]), reply["text"])[1], local=True)
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(), seed=0)
    opt.evaluate_train = lambda ps, items: pytest.fail("the lean path answers nothing itself")
    history = [rnd(0, {"instructions": A}, [0.4, 0.4, 0.4], train=[0.1, 0.3]),
               rnd(1, {"instructions": B}, [0.5, 0.4, 0.5])]  # better on validation, not promoted
    params, notes = opt.propose(history)
    assert params == {"instructions": reply["text"]} and len(seen) == 1
    assert f"Current instructions:\n{B}" in seen[0]  # the parent is B, the best kept, not the incumbent's A
    assert "train probe number 0" in seen[0]  # B never answered train: the incumbent's train failures are shown
    assert "parent: the text from round 1" in notes[0]
    # the same text under the same params is not proposed again: the weakest criterion's hint instead
    history.append(rnd(2, params, [0.3, 0.3, 0.3]))
    params, notes = opt.propose(history)
    assert "already evaluated with these params" in notes[0] and params["instructions"].startswith(A)
    assert opt.ledger()["pool_texts"] == 3


# ---------------------------------------------------------------- the hosted path (gepa)


GOOD = "Answer briefly and cite the passage you relied on for each claim."


class Scripted:
    """A train evaluation callback: quality depends on the instruction text; records every call."""

    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, params, items):
        assert all(p.split == "train" for p in items)
        self.calls.append((params["instructions"], [p.id for p in items]))
        text = params["instructions"]
        variant = re.search(r"variant (\d+)", text)
        good = "cite" in text
        return [judged(p, min(0.3 + 0.05 * int(variant.group(1)), 1.0) if variant else 0.9 if good
                       else 0.2 + (int(p.id[5:]) % 3) / 10,
                       why="cites its source" if good else "does not say where the answer comes from")
                for p in items]

    @property
    def answered(self):
        return sum(len(ids) for _, ids in self.calls)


def hosted(script, gepa_calls=40, n_train=12):
    prompts: list[str] = []
    role = fake_role(lambda m: (prompts.append(m[-1]["content"]), script(m[-1]["content"]))[1], local=False)
    ledger = CallLedger()
    ledger.stage = "optimizer"
    role.lm.callbacks.append(ledger)
    opt = Optimizer(SPACE, RUBRIC, role, OptimizerSpec(gepa_calls=gepa_calls), seed=0)
    opt.evaluate_train = Scripted()
    # the incumbent answered n_train train probes (the minibatch GEPA draws from) and validation
    history = [rnd(0, {"instructions": A}, [0.4] * 5, train=[0.2 + (i % 3) / 10 for i in range(n_train)])]
    return opt, history, prompts, ledger


def test_hosted_path_runs_gepa_on_train_minibatches_and_returns_its_best():
    opt, history, prompts, ledger = hosted(lambda p: f"Here you are:\n```\n{GOOD}\n```")
    params, notes = opt.propose(history)
    assert params == {"instructions": GOOD}
    assert notes[0].startswith("instructions: GEPA: ") and "mutations" in notes[0]
    ev_ = opt.evaluate_train
    # the seed's items came from the pool (the incumbent's own train answers): only mutations were answered
    assert ev_.calls and all(text == GOOD for text, _ in ev_.calls)
    assert opt.pool_stats["gepa_runs"] == 1 and opt.pool_stats["gepa_items_answered"] == ev_.answered
    # the reflection LM read questions, retrieved passages, answers and the counted criteria's reasons
    assert prompts and "What does the train probe number" in prompts[0] and "Passage retrieved for train" in prompts[0]
    assert "concise: 0.20 (too vague)" in prompts[0] and "Score 0.20 of 1." in prompts[0]
    assert ledger.by_stage == {"optimizer": len(prompts)}  # every reflection call went through role.lm
    # the pool now holds GEPA's mutation with its train minibatch scores
    assert set(opt.pools["instructions"].entries) == {A, GOOD}
    assert all(s == "train" for s, _ in opt.pools["instructions"].scores(GOOD, OBJ))


def test_hosted_path_respects_the_budget_and_shows_no_validation_probe():
    k = {"n": 0}

    def new_text(_):  # a new, better text each time: GEPA would go on as long as it may
        k["n"] += 1
        return f"```\nAnswer briefly and cite the passage, variant {k['n']}.\n```"

    found = {}
    for budget in (20, 40):
        opt, history, prompts, _ = hosted(new_text, gepa_calls=budget)
        val_qs = {j.answer.probe.question for j in history[0].val.judgments}  # handed in, never to be shown
        params, notes = opt.propose(history)
        stats = opt.pool_stats
        assert opt.evaluate_train.answered <= budget and stats["gepa_metric_calls"] <= budget
        assert stats["gepa_items_refused"] == 0  # GEPA stopped in time: the adapter's hard cap never bit
        assert all(p.startswith("train") for _, ids in opt.evaluate_train.calls for p in ids)
        seen = "\n".join(prompts)
        assert "train probe number" in seen and not [q for q in val_qs if q in seen]
        found[budget] = stats["gepa_candidates"]
        # GEPA's best (the latest variant) is the proposal
        assert params["instructions"] == f"Answer briefly and cite the passage, variant {k['n']}."
    assert found == {20: 1, 40: 2}  # the budget decides how many mutations GEPA evaluates


def test_a_test_item_smuggled_into_a_round_stops_the_rewrite_before_any_call():
    opt, history, prompts, _ = hosted(lambda p: f"```\n{GOOD}\n```")
    leaked = history[0].val.model_copy(update={"judgments": (*history[0].val.judgments, judged(probe(0, "test"), 0.1))})
    with pytest.raises(ValueError, match="never holds a test item"):
        opt.propose([history[0].model_copy(update={"val": leaked})])
    assert prompts == [] and opt.evaluate_train.calls == []


def test_gepa_mutate_refuses_non_train_probes_and_a_budget_with_no_iteration():
    pool = InstructionPool("instructions", 0)
    role = fake_role(lambda m: pytest.fail("no reflection"), local=False)
    with pytest.raises(ValueError, match="train probes only"):
        gepa_mutate(pool, A, {"instructions": A}, [probe(0, "test")], Scripted(), OBJ, role, 40, 800, 0)
    run = gepa_mutate(pool, A, {"instructions": A}, [probe(i, "train") for i in range(12)], Scripted(), OBJ,
                      role, 10, 800, 0)
    assert run.proposals == [] and "leaves no iteration" in run.note


def test_hosted_proposals_still_face_validation_and_reward_hacking_alarms():
    question = probe(3, "train").question
    opt, history, _, _ = hosted(lambda p: f"```\nAlways cite, and remember: {question}\n```")
    params, notes = opt.propose(history)
    assert opt.alarms == {"copies_probe_text": 1} and "alarm: copies_probe_text" in notes[0]
    assert question not in params["instructions"] and params["instructions"].startswith(A)
    opt, history, _, _ = hosted(lambda p: "```\ncite.\n```")  # too short to be instructions
    params, notes = opt.propose(history)
    assert "rejected (too short)" in notes[0]


def test_a_failing_item_scores_zero_is_counted_and_says_why():
    def evaluate(params, items):
        out = []
        for p in items:
            j = judged(p, 0.9 if "cite" in params["instructions"] else 0.3)
            if p.id == "train7":
                j = j.model_copy(update={"answer": j.answer.model_copy(update={"error": "TimeoutError"}),
                                         "overall": None})
            out.append(j)
        return out

    pool = InstructionPool("instructions", 0)
    adapter = SelftuneAdapter(pool, {"instructions": A}, evaluate, OBJ, budget=10)
    batch = adapter.evaluate([probe(6, "train"), probe(7, "train")], {"instructions": A}, capture_traces=True)
    assert batch.scores == [0.3, 0.0] and adapter.failed == 1 and adapter.answered == 2
    records = adapter.make_reflective_dataset({"instructions": A}, batch, ["instructions"])["instructions"]
    assert records[1]["Feedback"] == "Not scorable (TimeoutError); counted as 0."
    # answered again from the pool, free; past the budget an item is not answered (scored 0, counted)
    adapter.budget = 2
    again = adapter.evaluate([probe(6, "train"), probe(8, "train")], {"instructions": A})
    assert again.scores == [0.3, 0.0] and adapter.answered == 2 and adapter.refused == 1
