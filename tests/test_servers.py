"""When one machine is not enough: the study in PostgreSQL, runs on an MLflow tracking server, collections on a
chroma server, all real and on 127.0.0.1 (tests/servers.py). Two "machines" (two workdirs, nothing shared but
the three servers) tune the same config one after the other: the second continues the first's study and
embeds nothing. Skipped, saying why, only where Debian's PostgreSQL binaries are absent."""

import json

import optuna
import pytest
from mlflow import MlflowClient

from conftest import DOCS, FakeModels, no_progress, write_config
from servers import chroma_server, mlflow_server, postgres, postgres_bin
from selftune.config import load_config
from selftune.corpus import load_corpus
from selftune.index import Embedder, Index
from selftune.loop import Session, tune
from selftune.search import REPEAT
from selftune.studies import open_storage
from selftune.tracking import MlflowTracker
from test_studies import key, share_between_two_processes

pytestmark = pytest.mark.skipif(
    postgres_bin() is None, reason="PostgreSQL binaries are absent (/usr/lib/postgresql/*/bin/initdb): install "
                                   "Debian's postgresql package to run the shared-storage tests")
ROUNDS = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("servers")
    with postgres() as pg, \
            mlflow_server(pg["url"]["mlflow"], tmp / "artifacts", tmp / "mlflow.log") as tracking, \
            chroma_server(tmp / "chroma", tmp / "chroma.log") as chroma:
        yield {"pg": pg, "tracking": tracking, "chroma": chroma, "tmp": tmp}


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def test_a_second_machine_reuses_the_collections_on_the_chroma_server(stack, docs, tmp_path):
    corpus = load_corpus(docs, ["*.txt"])
    first = Index(corpus, Embedder(), tmp_path / "a" / "chroma", server=stack["chroma"])
    hits = first.search("What does the pass statement do?", 2, 200, 20)
    assert hits[0].doc == "pass.txt"
    emb = Embedder()
    second = Index(corpus, emb, tmp_path / "b" / "chroma", server=stack["chroma"])  # another machine's workdir
    again = second.search("What does the pass statement do?", 2, 200, 20)
    assert [h.id for h in again] == [h.id for h in hits]
    assert second.built == [] and emb.encoded == 1  # only the question was embedded
    assert not list((tmp_path / "b" / "chroma").iterdir())  # nothing stored locally


def _tune(stack, docs, machine):
    cfg = load_config(write_config(machine, docs, optimizer=f"{{storage: '{stack['pg']['url']['optuna']}'}}",
                                   tracking=f"{{uri: '{stack['tracking']}', experiment: shared}}",
                                   index=f"{{server: '{stack['chroma']}'}}"))
    tracker = MlflowTracker(cfg)
    return cfg, tune(Session(cfg, models=FakeModels()), ROUNDS, tracker, no_progress), tracker


def test_two_machines_tune_one_config_against_postgres_mlflow_and_chroma(stack, docs, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg_a, first, tracker_a = _tune(stack, docs, tmp_path / "a")
    cfg_b, second, tracker_b = _tune(stack, docs, tmp_path / "b")
    assert cfg_a.workdir != cfg_b.workdir
    # the vector server: the second machine embedded no chunk, screened nothing (stage 1 is in the study)
    assert first.stats["index_collections_built"] > 0 and second.stats["index_collections_built"] == 0
    assert first.stats["search/stage1_settings_screened"] > 0
    assert second.stats["search/stage1_settings_screened"] == 0
    # the tracking server: each tune one finished parent run, every round a child run in round order, the
    # gate's decisions as the rounds made them, artifacts served back
    client = MlflowClient(stack["tracking"])
    exp = client.get_experiment_by_name("shared")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # kept by the server, not in a workdir
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'tune'")
    assert {p.info.run_id for p in parents} == {tracker_a.parent_id, tracker_b.parent_id}
    for result, tracker in ((first, tracker_a), (second, tracker_b)):
        parent = client.get_run(tracker.parent_id)
        assert parent.info.status == "FINISHED" and parent.data.tags["selftune.study"] == result.stats[
            "optimizer/study"]
        children = client.search_runs([exp.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_id}'")
        by_round = {int(c.data.tags["selftune.round"]): c for c in children}
        assert sorted(by_round) == list(range(ROUNDS + 1)) and len(children) == ROUNDS + 1
        for r in result.rounds:
            assert by_round[r.index].data.tags["selftune.promoted"] == str(r.gate.promote)
        incumbents = [r.incumbent_index for r in result.rounds]
        assert incumbents == sorted(incumbents)  # promotion in round order
        assert "held-out test" in open(client.download_artifacts(tracker.parent_id, "report.md")).read()
        table = json.loads(open(client.download_artifacts(by_round[1].info.run_id, "tables/val.json")).read())
        assert table["data"]
    # the study in PostgreSQL: the same for both machines, holding every stage-2 trial, each told once
    assert first.stats["optimizer/study"] == second.stats["optimizer/study"]
    storage = open_storage(stack["pg"]["url"]["optuna"])
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)
             if s.study_name.startswith(first.stats["optimizer/study"])]
    trials = {t.number: t for n in names for t in optuna.load_study(study_name=n, storage=storage).get_trials()}
    numbers = [int(note.rsplit(" ", 1)[1]) for r in first.rounds + second.rounds for note in r.notes
               if note.startswith("search: stage 2 trial")]
    assert numbers and len(numbers) == len(set(numbers))
    assert all(trials[n].state != optuna.trial.TrialState.RUNNING for n in numbers)
    done = [key(t.params) for t in trials.values()
            if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get(REPEAT)]
    assert len(done) == len(set(done))  # no candidate evaluated twice, across machines


def test_two_processes_share_a_postgres_study(stack):
    share_between_two_processes(stack["pg"]["url"]["optuna"], "shared-pg")
