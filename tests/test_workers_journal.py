"""Workers on a journal file: ``selftune tune CONFIG --workers 2`` as a user runs it, the shared study an
Optuna journal file (``optimizer.storage: <path>.journal``), MLflow's default local store in the workdir
and a local chroma index, every role a model behind a scripted OpenAI-compatible endpoint
(``selftune.scripted``; no llama.cpp). No server at all, so never skipped.

A journal file has no heartbeat (``workers.py``): ``Pool.takes_jobs`` is False, so the tune evaluates
its own candidates (nothing is queued in ``<study>-jobs``) and the workers draw stage-2 candidates only,
each gated against the incumbent it was evaluated against."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from conftest import DOCS, ROOT, rounds_faced
from selftune import scripted
from selftune.studies import open_storage
from selftune.workers import BASE, BY, PARAMS, VAL

# stage-2 turns are rounds 3, 5, 7: without a heartbeat the tune waits only for a draw a live local worker
# already holds (else it draws one itself), so a slow worker (niced, first index builds) can miss a turn that
# comes before it started a draw; three turns, not two
ROUNDS = 8


@pytest.fixture(scope="module")
def server():
    with scripted.ScriptedServer(latency=0.1, reply=scripted.role_reply) as server:
        yield server


@pytest.fixture
def endpoint(server):
    return server.base


def write_config(tmp: Path, base: str, storage: Path) -> Path:
    docs = tmp / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    models = {r: {"model": f"openai/{m}", "api_base": base, "cache": False}
              for r, m in (("generator", "gen"), ("sut", "sut"), ("judge", "judge"), ("optimizer", "opt"))}
    cfg = {"name": "wj", "seed": 1, "workdir": str(tmp / "work"), "corpus": {"path": str(docs)},
           "rubric": str(ROOT / "configs/rubrics/taste.yaml"), "probes": {"count": 9}, "models": models,
           "sut": {"params": {"instructions": {"type": "text", "initial": "Answer from the context."},
                              "top_k": {"type": "int", "low": 1, "high": 3, "initial": 2},
                              "chunk_size": {"type": "choice", "choices": [120, 200], "initial": 200},
                              "chunk_overlap": {"type": "choice", "choices": [0, 20], "initial": 20},
                              "temperature": {"type": "choice", "choices": [0.0, 0.3, 0.7], "initial": 0.0}}},
           "optimizer": {"rounds": ROUNDS, "storage": str(storage)},
           "gate": {"resamples": 200}, "tracking": {"experiment": "workers-journal"}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_tune_with_two_workers_on_a_journal_file(server, endpoint, tmp_path):
    served = server.requests
    journal = tmp_path / "study.journal"
    cfg = write_config(tmp_path, endpoint, journal)
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with (tmp_path / "tune.log").open("wb") as log:
        tune = subprocess.Popen([sys.executable, "-m", "selftune.cli", "tune", str(cfg), "--workers", "2"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert tune.wait(timeout=600) == 0, _logs(tmp_path)
    finally:
        if tune.poll() is None:
            os.killpg(tune.pid, signal.SIGKILL)
            tune.wait()
            for pid_file in (work / "workers").glob("worker-*.pid"):  # each in its own session: not killed above
                try:
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
    out = (tmp_path / "tune.log").read_text()
    # the workers ran, each logging in the workdir
    for k in (1, 2):
        assert (work / "workers" / f"worker-{k}.log").is_file()
    # MLflow's default local store (sqlite in the workdir): one parent run, every round a child, in order
    assert (work / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{(work / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("workers-journal")
    [parent] = client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'tune'")
    assert parent.info.status == "FINISHED" and parent.info.run_id in out
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    rounds = sorted(int(c.data.tags["selftune.round"]) for c in children)
    assert rounds == list(range(len(rounds))) and len(rounds) >= 2
    # the journal file holds the study: its search study(ies) hold trials, every reported one COMPLETE
    assert journal.is_file() and journal.stat().st_size > 0
    storage = open_storage(str(journal))
    name = parent.data.tags["selftune.study"]
    names = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith(name)]
    assert name + "-control" in names
    by_study = {n: optuna.load_study(study_name=n, storage=storage).get_trials() for n in names
                if not n.endswith("-control")}
    jobs = by_study.pop(name + "-jobs", [])
    assert by_study and all(by_study.values())  # a search study, holding trials
    trials = [t for ts in by_study.values() for t in ts]
    reported = [t for t in trials if VAL in t.user_attrs]
    assert reported and all(t.state == optuna.trial.TrialState.COMPLETE for t in reported)
    assert all(t.user_attrs.get(BY) in (1, 2) for t in reported)  # only a worker stores an evaluation on a draw
    keys = [tuple(sorted(t.params.items())) for t in reported]
    assert len(keys) == len(set(keys))  # no stage-2 candidate evaluated twice
    # no heartbeat, so no job queued: the tune evaluated its own candidates, no worker took one
    assert not [t for t in jobs if t.user_attrs.get(BY, 0) != 0]
    assert jobs == []
    assert not any(n.startswith("evaluated by worker") for c in children
                   for n in json.loads(open(client.download_artifacts(c.info.run_id, "round.json")).read())["notes"])
    # workers' draws gated, each once, each against the incumbent it was evaluated against
    gated = []
    for r, rec, faced in rounds_faced(client, children):
        for note in rec["notes"]:
            if note.endswith("(a worker's)"):
                number = int(note.split("stage 2 trial ")[1].split(" ")[0])
                gated.append(number)
                [t] = [t for t in reported if t.number == number and t.user_attrs[PARAMS] == rec["params"]]
                assert t.user_attrs[BASE].endswith(f":{faced}")  # evaluated against the incumbent it faced
    assert gated, _logs(tmp_path)  # at least one worker's draw was gated
    assert len(gated) == len(set(gated))  # each once
    assert set(gated) <= {t.number for t in reported}  # each a reported trial of the study
    # what the workers spent is the tune's: every call the endpoint served is in the tune's count, no other
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["calls/worker_processes"] >= 1
    assert metrics["calls/total"] == server.requests - served


def _logs(tmp: Path) -> str:
    """The tail of the tune's log and of each worker's, for a failure's message."""
    logs = [tmp / "tune.log", *sorted((tmp / "work" / "workers").glob("worker-*.log"))]
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.is_file())
