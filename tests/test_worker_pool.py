"""The tune's side of workers (``workers.Pool``) on an SQLite study, no worker process: what is gated is
always evaluated against the incumbent in force (a report or a job from before a promotion is never
gated), a job is evaluated once (by a worker, or by the tune when none has taken it), a cancelled job
by nobody, and a job whose worker died is re-queued by Optuna's heartbeat and never half-counted."""

import time

import optuna
import pytest

from selftune.loop import _pooled
from selftune.records import Evaluation, GateDecision, Round
from selftune.search import REPEAT
from selftune.studies import open_storage
from selftune.workers import BASE, BY, JOB, PARAMS, VAL, Pool, _pop_job

optuna.logging.set_verbosity(optuna.logging.WARNING)
X = optuna.distributions.CategoricalDistribution([1, 2, 3, 4])


def ev(**params):
    return Evaluation(params=params, split="val", judgments=())


@pytest.fixture
def pool(tmp_path):
    return Pool(open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1), "t", ahead=2)


def draw(study, x, base):
    """A stage-2 draw a worker evaluated against incumbent ``base`` and reported."""
    study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions={"x": X}, value=0.5, user_attrs={
        PARAMS: {"x": x}, VAL: ev(x=x).model_dump(mode="json"), BASE: base, BY: 1}))
    return study.get_trials(deepcopy=False)[-1].number


def test_a_draw_evaluated_against_a_replaced_incumbent_is_never_gated(pool):
    search = optuna.create_study(storage=pool.storage, study_name="t-search", direction="maximize")
    pool.publish(search_study="t-search", base=f"{pool.epoch}:0")
    first = draw(search, 1, f"{pool.epoch}:0")
    assert pool.next(timeout=1).number == first
    late = draw(search, 2, f"{pool.epoch}:0")  # evaluated against incumbent 0 ...
    pool.publish(base=f"{pool.epoch}:1")  # ... which round 1 has just replaced
    assert pool.next(timeout=1) is None  # nothing against incumbent 1 yet: the tune draws one itself
    assert late in pool.stale and late not in pool.gated
    fresh = draw(search, 3, f"{pool.epoch}:1")
    got = pool.next(timeout=1)
    assert got.number == fresh and got.base == f"{pool.epoch}:1"
    assert pool.next(timeout=1) is None and late not in pool.gated  # never gated, later either
    assert pool.control.user_attrs["stale"] == {"t-search": [late]}
    assert pool.control.user_attrs["gated"] == {"t-search": [first, fresh]}


def test_a_draw_from_an_earlier_tune_of_the_study_is_never_gated(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1)
    search = optuna.create_study(storage=storage, study_name="t-search", direction="maximize")
    before = Pool(storage, "t", ahead=1)
    draw(search, 1, f"{before.epoch}:0")
    again = Pool(storage, "t", ahead=1)  # a restarted tune: another epoch, its control reset
    assert again.control.user_attrs["done"] is False and again.control.user_attrs["ready"] is False
    again.publish(search_study="t-search", base=f"{again.epoch}:0")
    assert again.next(timeout=1) is None and again.gated == []


def test_a_job_is_evaluated_once_by_a_worker_or_by_the_tune_and_a_cancelled_one_by_nobody(pool):
    calls = []

    def evaluate(params, llm):
        calls.append((params, llm))
        return ev(**params)

    stale = pool.submit(2, {"x": 1}, ("rewrite",), None)
    pool.publish(base=f"{pool.epoch}:1")  # its incumbent replaced before its turn
    pool.cancel(stale)
    assert _pop_job(pool.jobs) is None  # no worker can take it
    [t] = pool.jobs.get_trials()
    assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs[REPEAT].startswith("cancelled")
    assert VAL not in t.user_attrs and pool.cancelled == 1

    theirs = pool.submit(3, {"x": 2}, ("lever",), 4)
    popped = _pop_job(pool.jobs)  # a worker pops it ...
    assert popped.user_attrs[JOB]["key"] == theirs.key and popped.user_attrs[JOB]["llm_items"] == 4
    assert _pop_job(pool.jobs) is None  # ... and no other process gets it
    pool.storage.set_trial_user_attr(popped._trial_id, BY, 7)
    pool.storage.set_trial_user_attr(popped._trial_id, VAL, ev(x=2).model_dump(mode="json"))
    pool.storage.set_trial_state_values(popped._trial_id, optuna.trial.TrialState.COMPLETE, [0.0])
    got = pool.result(theirs, evaluate)
    assert got.worker == 7 and got.params == {"x": 2} and got.base == f"{pool.epoch}:1" and calls == []

    ours = pool.submit(4, {"x": 3}, ("rewrite",), None)  # nobody has taken it: the tune evaluates it
    got = pool.result(ours, evaluate)
    assert calls == [({"x": 3}, None)] and got.worker == 0 and got.val.params == {"x": 3}
    assert _pop_job(pool.jobs) is None  # claimed by the tune: no worker evaluates it too
    assert pool.result(ours, evaluate).val == got.val and len(calls) == 1  # stored, not evaluated again
    done = [t for t in pool.jobs.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    keys = [t.user_attrs[JOB]["key"] for t in done]
    assert sorted(keys) == sorted([theirs.key, ours.key]) and all(VAL in t.user_attrs for t in done)


def test_a_job_whose_worker_died_is_requeued_by_the_heartbeat_and_evaluated_once(pool):
    job = pool.submit(1, {"x": 4}, ("stage 1's best",), None)
    popped = _pop_job(pool.jobs)  # a worker pops it, beats once, names itself, and is killed
    pool.storage.record_heartbeat(popped._trial_id)
    pool.storage.set_trial_user_attr(popped._trial_id, BY, 1)
    time.sleep(2.5)  # past the grace period (2 heartbeats of 1 s)
    calls = []
    got = pool.result(job, lambda ps, llm: calls.append(ps) or ev(**ps))
    assert calls == [{"x": 4}] and got.worker == 0  # the re-queued copy, evaluated once (by the tune)
    trials = pool.jobs.get_trials()
    dead = next(t for t in trials if t.number == popped.number)
    assert dead.state == optuna.trial.TrialState.FAIL and VAL not in dead.user_attrs  # never half-counted
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs[JOB] == dead.user_attrs[JOB]


class Opt:
    """An optimizer whose every round is a rewrite, proposed from the incumbent of the history handed in."""

    def __init__(self):
        self.proposed = []

    def stage2_turn(self, history):
        return False

    def rewrite_turn(self, history, index):
        return False

    def search_turn(self, history, index):
        return False

    def holds_draw(self):
        return False

    def propose(self, history, index=None):
        index = history[-1].index + 1 if index is None else index
        inc = history[-1].incumbent_index
        self.proposed.append((index, inc))
        return {"x": f"round {index} from incumbent {inc}"}, ("rewrite",)


class Ledger:
    stage = ""


class Session:
    ledger = Ledger()


def own(params, llm_items):
    """The tune's own evaluation of a candidate (``loop.run_tune``'s ``own``)."""
    return ev(**params)


def rnd(i, inc):
    return Round(index=i, params={"x": i}, train=ev(), val=ev(), gate=GateDecision(promote=i == inc, reason=""),
                 incumbent_index=inc)


def test_a_job_queued_ahead_is_dropped_when_its_incumbent_changed(pool):
    """``loop._pooled``: a rewrite queued ahead against incumbent 0 is cancelled at its turn when round 1
    was promoted, and its round proposed again against the new incumbent; unchanged, it is gated."""
    opt = Opt()
    ahead = {2: pool.submit(2, {"x": "round 2 from incumbent 0"}, ("rewrite",), None)}
    pool.publish(base=f"{pool.epoch}:1")  # round 1 was promoted
    history = [rnd(0, 0), rnd(1, 1)]
    got, params, _ = _pooled(pool, ahead, 2, 3, history, opt, Session(), own, None)
    assert params == {"x": "round 2 from incumbent 1"} and got.val.params == params and opt.proposed == [(2, 1)]
    assert pool.cancelled == 1 and not ahead

    ahead = {3: pool.submit(3, {"x": "round 3 from incumbent 1"}, ("rewrite",), None)}  # round 2 not promoted
    history.append(rnd(2, 1))
    got, params, _ = _pooled(pool, ahead, 3, 3, history, opt, Session(), own, None)
    assert params == {"x": "round 3 from incumbent 1"} and opt.proposed == [(2, 1)] and pool.cancelled == 1


def test_without_a_heartbeat_the_tune_evaluates_its_own_candidates(tmp_path):
    """A journal file has no heartbeat: a dead worker's job could not be told from a slow one, so no job
    is queued; the tune evaluates what it proposes (workers draw stage-2 candidates only)."""
    pool = Pool(open_storage(str(tmp_path / "study.journal")), "t", ahead=2)
    assert not pool.takes_jobs
    got, params, notes = _pooled(pool, {}, 1, 3, [rnd(0, 0)], Opt(), Session(), own, None)
    assert got is None and params == {"x": "round 1 from incumbent 0"} and pool.jobs.get_trials() == []


def test_the_rewrite_after_a_draw_is_queued_ahead_and_never_gated_after_a_promotion(pool):
    """While round 3's draw is out, round 4's rewrite is proposed against the same incumbent and queued;
    round 3 promoted, that job is cancelled at its turn (no worker evaluates it) and round 4 proposed
    again against round 3."""

    class Drawing(Opt):
        def stage2_turn(self, history):
            return history[-1].index + 1 == 3

        def rewrite_turn(self, history, index):
            return index == 4

    search = optuna.create_study(storage=pool.storage, study_name="t-search", direction="maximize")
    pool.publish(search_study="t-search", base=f"{pool.epoch}:1")
    number = draw(search, 2, f"{pool.epoch}:1")
    opt, ahead = Drawing(), {}
    history = [rnd(0, 0), rnd(1, 1), rnd(2, 1)]
    got, params, notes = _pooled(pool, ahead, 3, 4, history, opt, Session(), own, None)
    assert got.number == number and notes == (f"search: stage 2 trial {number} (a worker's)",)
    assert opt.proposed == [(4, 1)] and ahead[4].base == f"{pool.epoch}:1"  # queued ahead, against round 1
    assert pool.control.user_attrs["ahead"] == 0  # no search turn after round 3: no worker draws again
    pool.publish(base=f"{pool.epoch}:3")  # round 3 promoted
    history.append(rnd(3, 3))
    got, params, _ = _pooled(pool, ahead, 4, 4, history, opt, Session(), own, None)
    assert params == {"x": "round 4 from incumbent 3"} and opt.proposed == [(4, 1), (4, 3)]
    [stale] = [t for t in pool.jobs.get_trials() if t.user_attrs[JOB]["base"] == f"{pool.epoch}:1"]
    assert stale.state == optuna.trial.TrialState.FAIL and VAL not in stale.user_attrs and pool.cancelled == 1


def test_what_workers_spend_counts_in_the_tunes_ledger_and_caps(pool):
    """Each worker reports its running total in the control study after every candidate; the tune sums this
    tune's reports (not an earlier tune's of the same study), and its ledger counts them in its spend, its
    calls and its caps."""
    from selftune.lm import CallLedger
    from selftune.spend import Caps, Spend
    from selftune.workers import _Spent

    class Worker:  # a worker's own ledger: what it spent on the candidates it evaluated
        def __init__(self):
            self.spend = {}

    old = Pool(pool.storage, "t", ahead=2)  # an earlier tune of this study: its workers' spend is not ours
    w_old = Worker()
    s_old = _Spent(old.control, w_old, old.epoch, 1)
    w_old.spend = {"sut": Spend(50, 0, 0.0)}
    s_old.report()

    pool = Pool(pool.storage, "t", ahead=2)
    workers = [Worker(), Worker()]
    spent = [_Spent(pool.control, w, pool.epoch, k + 1) for k, w in enumerate(workers)]
    assert pool.spend() == {}
    workers[0].spend = {"sut": Spend(3, 30, 0.0)}  # its set-up's calls, reported when it joins
    spent[0].report()
    assert pool.spend()["sut"].calls == 3
    workers[0].spend = {"sut": Spend(10, 100, 0.01), "judge": Spend(2, 20, 0.0)}
    spent[0].report()
    workers[1].spend = {"sut": Spend(7, 70, 0.02)}
    spent[1].report()
    workers[1].spend = {"sut": Spend(9, 90, 0.03)}  # a running total: the later report replaces the earlier
    spent[1].report()
    got = pool.spend()
    assert got["sut"].calls == 10 + 9 and got["sut"].tokens == 100 + 90
    assert got["sut"].usd == pytest.approx(0.04) and got["judge"].calls == 2

    ledger = CallLedger()
    ledger.own = {"sut": Spend(5, 0, 0.0)}
    ledger.limit(Caps(tune={"calls": 25}))
    assert ledger.exhausted is None
    ledger.others(got)
    assert ledger.spend["sut"].calls == 24 and ledger.totals().calls == 26
    assert ledger.by_stage["worker processes"] == 21
    assert ledger.exhausted and "26 calls >= 25 calls" in ledger.exhausted


def test_candidates_in_workers_hands_are_counted_as_in_flight(pool):
    """The forecast counts what the workers hold: their spend is still to come."""
    study = optuna.create_study(storage=pool.storage, study_name="t-search")
    pool.publish(search_study="t-search")
    assert pool.in_flight() == 0
    t = study.ask({"x": X})
    study._storage.set_trial_user_attr(t._trial_id, BASE, pool.base)
    t2 = study.ask({"x": X})
    study._storage.set_trial_user_attr(t2._trial_id, BASE, "an-earlier-tune:3")
    job = pool.submit(1, {"x": 1}, (), None)
    popped = _pop_job(pool.jobs, pool.base)
    assert popped is not None and popped.user_attrs[JOB]["key"] == job.key
    assert pool.in_flight() == 1  # popped, but no worker has named itself yet (nor the tune)
    pool.storage.set_trial_user_attr(popped._trial_id, BY, 2)
    assert pool.in_flight() == 2


def test_without_a_heartbeat_the_tune_waits_only_for_a_draw_a_live_local_worker_holds(tmp_path):
    """A journal file cannot tell a dead worker's draw from a slow one, but the tune knows its own local
    workers: it waits for a draw one of them holds while that process lives, and not for one held by a
    worker it cannot see."""
    import subprocess

    pool = Pool(open_storage(str(tmp_path / "study.journal")), "t", ahead=2)
    study = optuna.create_study(storage=pool.storage, study_name="t-search", direction="maximize")
    pool.publish(search_study="t-search", base=f"{pool.epoch}:0")
    held = study.ask({"x": X})
    study._storage.set_trial_user_attr(held._trial_id, BASE, pool.base)
    study._storage.set_trial_user_attr(held._trial_id, BY, 3)  # a worker on another machine
    live = subprocess.Popen(["sleep", "60"])
    pool.procs.append(live)
    try:
        t0 = time.monotonic()
        assert pool.next(timeout=5) is None and time.monotonic() - t0 < 1  # not waited for: nobody to ask
        study._storage.set_trial_user_attr(held._trial_id, BY, 1)  # local worker 1, alive
        t0 = time.monotonic()
        assert pool.next(timeout=1) is None and time.monotonic() - t0 >= 1  # waited for, up to the timeout
        study._storage.set_trial_user_attr(held._trial_id, VAL, ev(x=2).model_dump(mode="json"))
        study._storage.set_trial_user_attr(held._trial_id, PARAMS, {"x": 2})
        study.tell(held, 0.5)
        got = pool.next(timeout=5)
        assert got is not None and got.number == held.number and got.params == {"x": 2}
        nxt = study.ask({"x": X})
        study._storage.set_trial_user_attr(nxt._trial_id, BASE, pool.base)
        study._storage.set_trial_user_attr(nxt._trial_id, BY, 1)
        live.kill()
        live.wait()
        t0 = time.monotonic()
        assert pool.next(timeout=5) is None and time.monotonic() - t0 < 1  # its worker died: not waited for
    finally:
        live.kill()
        live.wait()
