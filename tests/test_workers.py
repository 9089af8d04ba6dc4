"""Workers for real: ``selftune tune CONFIG --workers 2`` as a user runs it, against PostgreSQL (the shared
study), an MLflow tracking server and a chroma server, all on 127.0.0.1, every role a model behind a scripted
OpenAI-compatible endpoint with a fixed latency per call (``selftune.scripted``; no llama.cpp). One worker is
killed in the middle of a candidate: the tune still finishes, that candidate is failed by the heartbeat and
re-queued, never half-counted. Skipped, saying why, only where Debian's PostgreSQL binaries are absent."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from conftest import DOCS, ROOT, rounds_faced
from servers import chroma_server, mlflow_server, postgres, postgres_bin
from selftune import scripted
from selftune.search import REPEAT
from selftune.studies import open_storage
from selftune.workers import BASE, JOB, PARAMS, VAL

pytestmark = pytest.mark.skipif(
    postgres_bin() is None, reason="PostgreSQL binaries are absent (/usr/lib/postgresql/*/bin/initdb): install "
                                   "Debian's postgresql package to run the worker tests")
ROUNDS = 8


@pytest.fixture(scope="module")
def server():
    with scripted.ScriptedServer(latency=0.1, reply=scripted.role_reply) as server:
        yield server


@pytest.fixture
def endpoint(server):
    return server.base


@pytest.fixture
def served(server):
    """The calls the endpoint served since the test began."""
    before = server.requests
    return lambda: server.requests - before


def write_config(tmp: Path, base: str, storage: str, tracking: str, chroma: str) -> Path:
    docs = tmp / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    models = {r: {"model": f"openai/{m}", "api_base": base, "cache": False}
              for r, m in (("generator", "gen"), ("sut", "sut"), ("judge", "judge"), ("optimizer", "opt"))}
    cfg = {"name": "w", "seed": 1, "workdir": str(tmp / "work"), "corpus": {"path": str(docs)},
           "rubric": str(ROOT / "configs/rubrics/taste.yaml"), "probes": {"count": 9}, "models": models,
           "sut": {"params": {"instructions": {"type": "text", "initial": "Answer from the context."},
                              "top_k": {"type": "int", "low": 1, "high": 3, "initial": 2},
                              "chunk_size": {"type": "choice", "choices": [120, 200], "initial": 200},
                              "chunk_overlap": {"type": "choice", "choices": [0, 20], "initial": 20},
                              "temperature": {"type": "choice", "choices": [0.0, 0.3, 0.7], "initial": 0.0}}},
           "optimizer": {"rounds": ROUNDS, "storage": storage, "heartbeat": 1},
           "gate": {"resamples": 200}, "tracking": {"uri": tracking, "experiment": "workers"},
           "index": {"server": chroma}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_tune_with_two_workers_survives_a_killed_worker(endpoint, served, tmp_path):
    with postgres() as pg, mlflow_server(pg["url"]["mlflow"], tmp_path / "artifacts", tmp_path / "mlflow.log") as ml, \
            chroma_server(tmp_path / "chroma", tmp_path / "chroma.log") as chroma:
        url = pg["url"]["optuna"]
        cfg = write_config(tmp_path, endpoint, url, ml, chroma)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        with (tmp_path / "tune.log").open("wb") as log:
            tune = subprocess.Popen([sys.executable, "-m", "selftune.cli", "tune", str(cfg), "--workers", "2"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed = _kill_worker_mid_candidate(url, tmp_path / "work" / "workers", tune)
            assert tune.wait(timeout=900) == 0, (tmp_path / "tune.log").read_text()[-3000:]
        finally:
            if tune.poll() is None:
                os.killpg(tune.pid, signal.SIGKILL)
                tune.wait()
        out = (tmp_path / "tune.log").read_text()
        # MLflow: one parent run, every round a child run, the gate's decisions in round order
        client = MlflowClient(ml)
        exp = client.get_experiment_by_name("workers")
        [parent] = client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'tune'")
        assert parent.info.status == "FINISHED" and parent.info.run_id in out
        children = client.search_runs([exp.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        rounds = sorted(int(c.data.tags["selftune.round"]) for c in children)
        assert rounds == list(range(len(rounds))) and len(rounds) >= 2
        # the study: every worker-reported candidate a COMPLETE trial, none evaluated twice, the killed one FAIL
        storage = open_storage(url)
        name = parent.data.tags["selftune.study"]
        names = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith(name)]
        by_study = {n: optuna.load_study(study_name=n, storage=storage).get_trials() for n in names
                    if not n.endswith("-control")}
        jobs = by_study.pop(name + "-jobs", [])
        trials = [t for ts in by_study.values() for t in ts]
        reported = [t for t in trials if VAL in t.user_attrs]
        assert reported and all(t.state == optuna.trial.TrialState.COMPLETE for t in reported)
        keys = [tuple(sorted(t.params.items())) for t in reported]
        assert len(keys) == len(set(keys))  # no stage-2 candidate evaluated twice
        evaluated_jobs = [t for t in jobs if VAL in t.user_attrs]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in evaluated_jobs)
        job_keys = [t.user_attrs[JOB]["key"] for t in evaluated_jobs]
        assert len(job_keys) == len(set(job_keys))  # no job evaluated twice
        dead = next(t for t in (jobs if killed[1].endswith("-jobs") else by_study[killed[1]])
                    if t.number == killed[2] and t.user_attrs.get("selftune.worker") == 1)
        assert dead.state == optuna.trial.TrialState.FAIL and VAL not in dead.user_attrs  # never half-counted
        assert not dead.user_attrs.get(REPEAT)
        retried = [t for t in (jobs if killed[1].endswith("-jobs") else by_study[killed[1]])
                   if t.system_attrs.get("failed_trial") == dead.number]
        assert len(retried) == 1 and retried[0].params == dead.params  # re-queued once, same candidate
        assert retried[0].user_attrs.get(JOB) == dead.user_attrs.get(JOB)
        gated = []
        for r, rec, faced in rounds_faced(client, children):
            for note in rec["notes"]:
                if note.endswith("(a worker's)"):
                    number = int(note.split("stage 2 trial ")[1].split(" ")[0])
                    gated.append(number)
                    [t] = [t for t in reported if t.number == number and t.user_attrs[PARAMS] == rec["params"]]
                    assert t.user_attrs[BASE].endswith(f":{faced}")  # evaluated against the incumbent it faced
                if note.startswith("evaluated by worker"):
                    number = int(note.split("(job ")[1].rstrip(")"))
                    [t] = [t for t in evaluated_jobs if t.number == number]
                    assert t.user_attrs[JOB]["round"] == r and t.user_attrs[JOB]["base"].endswith(f":{faced}")
        assert gated and len(gated) == len(set(gated))  # workers' candidates were gated, each once
        # what the workers spent is the tune's: counted in its calls (all but the killed worker's half candidate)
        metrics = parent.data.metrics
        assert metrics["calls/worker_processes"] >= 1
        assert metrics["calls/total"] == sum(v for k, v in metrics.items() if k.startswith("calls/role/"))
        assert metrics["calls/total"] <= served()
        assert set(gated) <= {t.number for t in reported}  # each a reported trial of the study


def _kill_worker_mid_candidate(url: str, logs: Path, tune: subprocess.Popen) -> tuple[int, str, int]:
    """Wait until worker 1 holds a RUNNING trial (a stage-2 draw or a job), SIGKILL it; (its pid, the
    trial's study, its number)."""
    deadline = time.monotonic() + 600
    storage = None
    while time.monotonic() < deadline:
        assert tune.poll() is None, "the tune ended before worker 1 took a candidate"
        pid_file = logs / "worker-1.pid"
        if pid_file.exists():
            storage = storage or open_storage(url)
            for s in optuna.get_all_study_summaries(storage):
                if s.study_name.endswith("-control"):
                    continue
                for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                    if t.user_attrs.get("selftune.worker") == 1:
                        pid = int(pid_file.read_text())
                        os.killpg(pid, signal.SIGKILL)
                        return pid, s.study_name, t.number
        time.sleep(0.2)
    raise AssertionError("worker 1 never held a candidate")
