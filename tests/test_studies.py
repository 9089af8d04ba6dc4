"""optimizer.storage: the search's Optuna study in a lasting storage (SQLite, a journal file), named from
the config, continued by a restarted search and shared by several processes. (PostgreSQL, a tracking
server and a chroma server: tests/test_servers.py.)"""

import multiprocessing
import time

import optuna
import pytest

from conftest import write_config
from selftune.config import load_config
from selftune.errors import InputError
from selftune.search import REPEAT, MultiFidelitySearch
from selftune.studies import is_rdb, open_storage, study_name

optuna.logging.set_verbosity(optuna.logging.WARNING)
RETRIEVAL = {"top_k": [1, 2, 3, 4, 5, 6], "chunk": [300, 500, 800]}
OTHER = {"temp": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]}
BASE = {"top_k": 2, "chunk": 800, "temp": 0.0}
CHEAP_CALLS = []


def retrieval_quality(p):
    return 1.0 - abs(p["top_k"] - 3) / 10 - abs(p["chunk"] - 500) / 1000


def cheap(p):
    CHEAP_CALLS.append(dict(p))
    return retrieval_quality(p)


def full(p):
    return retrieval_quality(p) - (p["temp"] - 0.6) ** 2


def search(url, name="s", seed=0):
    return MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=seed, carry=0.5, baseline=BASE,
                               storage=open_storage(url), study_name=name)


def key(p):
    return tuple(sorted(p.items()))


def evaluated(url, name="s"):
    """Params of the trials that hold an evaluation (COMPLETE, not a repeat)."""
    st = optuna.load_study(study_name=name, storage=open_storage(url))
    return [t.params for t in st.get_trials() if t.state == optuna.trial.TrialState.COMPLETE
            and not t.user_attrs.get(REPEAT)]


@pytest.fixture(params=["sqlite", "journal"])
def url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'study.db'}" if request.param == "sqlite" else str(tmp_path / "study.journal")


def test_storage_urls_pick_the_optuna_storage(tmp_path):
    assert is_rdb("sqlite:///x.db") and is_rdb("postgresql+psycopg2://u@h/db") and not is_rdb(str(tmp_path / "j"))
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'a.db'}"), optuna.storages.RDBStorage)
    assert isinstance(open_storage("rel.journal", base=tmp_path), optuna.storages.JournalStorage)
    assert (tmp_path / "rel.journal").exists()


def test_a_restarted_search_continues_the_study(url):
    first = search(url)
    CHEAP_CALLS.clear()
    done = []
    for _ in range(4):
        cand = first.ask()
        done.append(cand.params)
        first.tell(cand, full(cand.params))
    assert done[0] == BASE and len(CHEAP_CALLS) == 18  # stage 1 screened the grid once
    CHEAP_CALLS.clear()
    again = search(url)  # a new process: nothing in memory, everything in the study
    carried = again.screen()
    assert CHEAP_CALLS == [] and again.ledger.cheap == 0 and carried == first.carried  # stage 1 from the study
    more = []
    for _ in range(4):
        cand = again.ask()
        more.append(cand.params)
        again.tell(cand, full(cand.params))
    assert BASE not in more  # the baseline was not enqueued again
    assert not {key(p) for p in more} & {key(p) for p in done}  # nothing evaluated twice
    assert sorted(map(key, evaluated(url))) == sorted(map(key, done + more))
    assert again.best()[1] == max(full(p) for p in done + more)


def test_another_name_is_another_study(url):
    a = search(url, "a")
    cand = a.ask()
    a.tell(cand, 0.5)
    b = search(url, "b")
    assert b.ask().params == BASE  # a fresh study starts at its own baseline


def test_a_candidate_running_elsewhere_is_not_handed_out(url):
    a, b = search(url), search(url)
    held = a.ask()  # RUNNING in "process" a
    for _ in range(5):
        cand = b.ask()
        assert cand.params != held.params
        b.tell(cand, full(cand.params))
    a.tell(held, full(held.params))
    st = optuna.load_study(study_name="s", storage=open_storage(url))
    skipped = [t for t in st.get_trials() if t.user_attrs.get(REPEAT) == "being evaluated elsewhere"]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in skipped)
    c = search(url)  # a skipped draw is no failure: the candidate's evaluation counts
    c.ask()
    assert key(held.params) in c._known and key(held.params) not in c._failed


def _worker(url, seed, n, out, name="s"):
    s = search(url, name=name, seed=seed)
    got = []
    for _ in range(n):
        cand = s.ask()
        time.sleep(0.02)  # an evaluation: the other process asks meanwhile
        s.tell(cand, full(cand.params))
        got.append(cand.params)
    out.put(got)


def share_between_two_processes(url, name="s"):
    """Two forked processes take 6 candidates each from one study (stage 1 screened once, before they
    start, as the tune does): 12 distinct candidates, exactly the trials the study holds."""
    search(url, name=name).screen()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, seed, 6, out, name)) for seed in (1, 2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    both = got[0] + got[1]
    assert len(both) == 12 and len({key(p) for p in both}) == 12
    assert sorted(map(key, evaluated(url, name))) == sorted(map(key, both))


def test_two_processes_share_one_study_and_never_evaluate_a_candidate_twice(url):
    share_between_two_processes(url)


def test_study_name_is_stable_and_tracks_what_decides_a_value(tmp_path, corpus_dir):
    cfg = load_config(write_config(tmp_path, corpus_dir))
    name = study_name(cfg, "d1")
    assert name == study_name(load_config(write_config(tmp_path, corpus_dir)), "d1")
    assert name.startswith("selftune-t-")
    longer = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"rounds": 40, "storage": "x"})})
    assert study_name(longer, "d1") == name  # how long a tune runs, or where the study lives: same study
    assert study_name(cfg.model_copy(update={"seed": 2}), "d1") != name
    assert study_name(cfg, "d2") != name  # other documents


def test_bad_storage_and_index_server_are_named(tmp_path, corpus_dir):
    with pytest.raises(InputError, match=r"index\.server.*http://host:port"):
        load_config(write_config(tmp_path, corpus_dir, index="{server: 'localhost:8000'}"))
    with pytest.raises(InputError, match=r"optimizer\.storage"):
        load_config(write_config(tmp_path, corpus_dir, optimizer="{storage: ' '}"))
    cfg = load_config(write_config(tmp_path, corpus_dir, index="{server: 'http://127.0.0.1:8000'}"))
    assert cfg.index.server == "http://127.0.0.1:8000"


def test_a_restarted_tune_continues_its_study(tmp_path, corpus_dir):
    """Two tunes with the same config and optimizer.storage: the second finds the first's study (stage 1's
    scores and every trial), screens nothing, and its search rounds draw candidates the study lacks."""
    from mlflow import MlflowClient

    from conftest import FakeModels, no_progress
    from selftune.loop import Session, tune
    from selftune.tracking import MlflowTracker

    db = tmp_path / "study.db"
    cfg = load_config(write_config(tmp_path, corpus_dir, optimizer=f"{{storage: 'sqlite:///{db}'}}"))
    runs = []
    for _ in range(2):
        tracker = MlflowTracker(cfg)
        runs.append((tune(Session(cfg, models=FakeModels()), 5, tracker, no_progress), tracker))
    (first, _), (second, tracker) = runs
    name = first.stats["optimizer/study"]
    assert name == second.stats["optimizer/study"] == study_name(cfg, Session(cfg, models=FakeModels()).corpus.digest)
    assert first.stats["search/stage1_settings_screened"] > 0 and second.stats["search/stage1_settings_screened"] == 0
    assert MlflowClient(cfg.tracking_uri()).get_run(tracker.parent_id).data.tags["selftune.study"] == name
    storage = open_storage(f"sqlite:///{db}")
    [summary] = [s for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith(name)]
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    stage2 = [[n for n in r.notes if n.startswith("search: stage 2 trial")] for r in first.rounds + second.rounds]
    numbers = [int(n[0].rsplit(" ", 1)[1]) for n in stage2 if n]
    assert numbers and len(numbers) == len(set(numbers))  # the second tune's trials follow the first's
    held = {t.number: t for t in trials}
    assert all(held[n].state != optuna.trial.TrialState.RUNNING for n in numbers)  # each one told
    evaluated_params = [key(held[n].params) for n in numbers if held[n].state == optuna.trial.TrialState.COMPLETE]
    assert len(evaluated_params) == len(set(evaluated_params))  # no candidate evaluated twice across the tunes


def _ask_and_hang(url, out):
    s = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=3, carry=0.5, baseline=BASE,
                            storage=open_storage(url, heartbeat=1), study_name="hb")
    cand = s.ask()
    out.put(cand.params)
    time.sleep(600)  # an evaluation that never ends: the test kills this process


def test_a_killed_process_candidate_is_requeued_by_the_heartbeat(tmp_path):
    """Optuna's heartbeat (RDB): the killed process's RUNNING trial goes stale, the next ask fails it and
    re-queues its params once (RetryHeartbeatStaleTrialCallback); another process evaluates it, once."""
    import os
    import signal

    url = f"sqlite:///{tmp_path / 'hb.db'}"
    MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=3, carry=0.5, baseline=BASE, storage=open_storage(url),
                        study_name="hb").screen()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_ask_and_hang, args=(url, out))
    proc.start()
    held = out.get(timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    time.sleep(3.5)  # past the grace period (2 heartbeats of 1 s): the trial is stale
    other = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=4, carry=0.5, baseline=BASE,
                                storage=open_storage(url, heartbeat=1), study_name="hb")
    cand = other.ask()
    assert cand.params == held  # the killed process's candidate, re-queued
    other.tell(cand, full(cand.params))
    trials = optuna.load_study(study_name="hb", storage=open_storage(url)).get_trials()
    killed = [t for t in trials if t.params == held and t.state == optuna.trial.TrialState.FAIL]
    assert len(killed) == 1 and not killed[0].user_attrs.get(REPEAT)  # failed by the heartbeat, not a score
    assert [key(p) for p in evaluated(url, "hb")] == [key(held)]  # evaluated once, by the survivor
    nxt = other.ask()
    assert nxt.params != held  # and not handed out again
