"""Workers: stage-2 candidates evaluated in parallel, on one machine or many, through the shared Optuna study.

Glue around Optuna's shared-storage protocol (``optimizer.storage``, ``studies.py``), no scheduler of
our own:

- The **tune** (``selftune tune CONFIG --workers N``) makes the probes and the baseline, then publishes
  what a worker needs in a control study ``<study>-control`` (user attrs): the probes (train and
  validation only: a worker is never handed a test probe), the incumbent's params, the objective the
  search climbs, the demonstration pool, how many items the judge model scores. It republishes on
  every promotion or change of objective.
- A **worker** (``selftune worker CONFIG``, spawned N times by the tune, or started on any machine that
  reaches the storage, the tracking server and the models) asks the shared search study for a candidate
  (``MultiFidelitySearch.ask``: a RUNNING trial with a heartbeat; never one evaluated, failed, or being
  evaluated elsewhere), evaluates the incumbent's params with the candidate's search params on
  validation and on the train minibatch, stores both evaluations on the trial (user attrs) and tells its
  value. A worker killed mid-candidate stops its heartbeat: the next ask fails the trial and re-queues
  its params once (``RetryHeartbeatStaleTrialCallback``) for another worker; its half evaluation is
  never stored, so never counted.
- **Promotion** stays in the tune, one decision at a time in round order with the same gate: a search
  round takes the lowest-numbered reported trial not yet gated (``Pool.next``), a rewrite round is
  proposed and evaluated by the tune itself as before; the held-out test is touched once, at the end,
  by the tune. Workers evaluate the whole validation split (no slice pruning: the gate compares the
  whole split) and at most ``N`` candidates ahead of the gate.

What machines share: the study (candidates, values, stage 1's scores), the MLflow server, the chroma
server (``index.server``); each machine re-pays its BM25 indexes (no model call), its embedder load,
and, with a different workdir, the LM response cache (workers on one machine share the workdir's).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .records import Evaluation, Params, Probe

log = logging.getLogger(__name__)
CONTROL = "-control"
PARAMS, VAL, TRAIN = "selftune.params", "selftune.val", "selftune.train"
POLL = 0.5  # seconds between looks at the study


def control_study(storage: optuna.storages.BaseStorage, study: str) -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=study + CONTROL, load_if_exists=True)


@dataclass
class Report:
    """A worker's evaluation of one candidate, as the tune gates it."""

    number: int
    params: Params
    val: Evaluation
    train: Evaluation


class Pool:
    """The tune's side: publish what workers need; take their reports in trial order; start and stop
    local worker processes."""

    def __init__(self, storage: optuna.storages.BaseStorage, study: str, ahead: int):
        self.storage, self.study, self.ahead = storage, study, max(1, ahead)
        self.control = control_study(storage, study)
        self.gated: list[int] = list(self.control.user_attrs.get("gated", []))
        self.procs: list[subprocess.Popen] = []
        self.search_study: str | None = None

    def publish(self, **attrs: Any) -> None:
        for k, v in attrs.items():
            self.control.set_user_attr(k, v)
        if "search_study" in attrs:
            self.search_study = attrs["search_study"]

    def spawn(self, config: Path, n: int, workdir: Path) -> None:
        """N local ``selftune worker`` processes (their logs in ``workdir/workers``)."""
        logs = workdir / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        src = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
        for k in range(1, n + 1):
            with (logs / f"worker-{k}.log").open("ab") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "selftune.cli", "worker", str(config), "--id", str(k)],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            (logs / f"worker-{k}.pid").write_text(str(self.procs[-1].pid))

    def next(self, timeout: float | None = None) -> Report | None:
        """The lowest-numbered reported candidate not yet gated, waiting for one; None when no worker
        is left to report (every local one exited and none is remote) or ``timeout`` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.search_study is not None:
                study = optuna.load_study(study_name=self.search_study, storage=self.storage)
                ready = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                         if VAL in t.user_attrs and t.number not in self.gated]
                if ready:
                    t = min(ready, key=lambda t: t.number)
                    self.gated.append(t.number)
                    self.control.set_user_attr("gated", self.gated)
                    return Report(t.number, dict(t.user_attrs[PARAMS]), Evaluation.model_validate(t.user_attrs[VAL]),
                                  Evaluation.model_validate(t.user_attrs[TRAIN]))
            if self.procs and all(p.poll() is not None for p in self.procs):
                return None
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(POLL)

    def close(self) -> None:
        """Tell workers the tune is over; stop the local ones (each by its own process group)."""
        import signal

        self.control.set_user_attr("done", True)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)


def run_worker(cfg: Any, worker_id: int = 0, models: Any = None, max_candidates: int | None = None) -> int:
    """A worker's loop (module docstring); returns the candidates it reported."""
    from .loop import Session
    from .objective import Objective
    from .optimize import Optimizer
    from .rag import Demo
    from .studies import open_storage, study_name
    from .studies import default_storage

    spec = cfg.optimizer.model_copy(update={"storage": default_storage(cfg)})
    session = Session(cfg, models=models)
    try:
        storage = open_storage(spec.storage, cfg.source.resolve().parent if cfg.source else None, spec.heartbeat)
        base = study_name(cfg, session.corpus.digest)
        control = control_study(storage, base)
        log.info("worker %d: waiting for the tune to publish %s", worker_id, base + CONTROL)
        while "probes" not in _attrs(control) and not _attrs(control).get("done"):
            time.sleep(POLL)
        attrs = _attrs(control)
        probes = [Probe.model_validate(p) for p in attrs.get("probes", [])]
        opt = Optimizer(cfg.sut.params, session.rubric, session.models.role("optimizer"), spec, cfg.seed + worker_id,
                        cheap=session.retrieval_objective(probes), storage=storage, study=base)
        done = 0
        while not attrs.get("done") and (max_candidates is None or done < max_candidates):
            objective = Objective(attrs["objective"]["kind"], session.rubric,
                                  frozenset(attrs["objective"]["criteria"]), session.judge.flag_cap)
            opt.steer(objective)
            if opt.search.study_name != attrs["search_study"]:
                raise RuntimeError(f"worker {worker_id}: search study {opt.search.study_name} is not the tune's "
                                   f"{attrs['search_study']} (different config?)")
            if attrs.get("demos") and hasattr(session.sut, "set_demos"):
                session.sut.set_demos([Demo.model_validate(d) for d in attrs["demos"]])
            ahead = _reported_ungated(storage, attrs)
            if ahead >= int(attrs.get("ahead", 1)):
                time.sleep(POLL)
                attrs = _attrs(control)
                continue
            from .search import Exhausted

            try:
                cand = opt.search.ask()
            except Exhausted:
                log.info("worker %d: the search space is exhausted", worker_id)
                break
            opt.search.annotate(cand, "selftune.worker", worker_id)
            params = {**attrs["incumbent"], **cand.params}
            llm = attrs.get("llm_items")
            try:
                val = session.evaluate(params, probes, "val", _quiet, llm_items=llm)
                train = session.evaluate(params, probes, "train", _quiet, limit=spec.train_items, llm_items=llm)
            except Exception as err:  # noqa: BLE001 -- a candidate that cannot be evaluated is FAIL, not a crash
                log.warning("worker %d: trial %d failed: %s: %s", worker_id, cand.number, type(err).__name__, err)
                opt.search.tell(cand, None)
            else:
                opt.search.annotate(cand, PARAMS, params)
                opt.search.annotate(cand, VAL, val.model_dump(mode="json"))
                opt.search.annotate(cand, TRAIN, train.model_dump(mode="json"))
                opt.search.tell(cand, opt.value(val))
                done += 1
                log.info("worker %d: reported trial %d", worker_id, cand.number)
            attrs = _attrs(control)
        return done
    finally:
        session.close()


def _attrs(control: optuna.Study) -> dict[str, Any]:
    return optuna.load_study(study_name=control.study_name, storage=control._storage).user_attrs


def _reported_ungated(storage: optuna.storages.BaseStorage, attrs: dict[str, Any]) -> int:
    study = optuna.load_study(study_name=attrs["search_study"], storage=storage)
    gated = set(attrs.get("gated", []))
    return sum(1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                    optuna.trial.TrialState.RUNNING))
               if t.number not in gated and (VAL in t.user_attrs or t.state == optuna.trial.TrialState.RUNNING)
               and not t.user_attrs.get("selftune.repeat"))


def _quiet(items: Any, **_: Any) -> Any:
    return items
