"""Workers: candidates evaluated in parallel, on one machine or many, through the shared Optuna study.

Glue around Optuna's shared-storage protocol (``optimizer.storage``, ``studies.py``), no scheduler of
our own:

- The **tune** (``selftune tune CONFIG --workers N``) starts its N local workers first thing (their
  start-up overlaps its probes and baseline), then publishes what a worker needs in a control study
  ``<study>-control`` (user attrs): the probes (train and validation only: a worker is never handed a
  test probe), the incumbent's params and which round it is (``base``: ``<tune epoch>:<round>``), the
  objective the search climbs, the demonstration pool, how many items the judge model scores, whether
  stage-2 draws have begun. It republishes after every round.
- **Jobs.** Every candidate the tune proposes itself (stage 1's best, a lever, a rewrite) is queued in
  ``<study>-jobs`` as a WAITING trial (``enqueue_trial``; user attr ``selftune.job``: params, round,
  base). A worker pops it (Optuna's atomic WAITING -> RUNNING), keeps its heartbeat, evaluates it on
  validation and stores the evaluation on the trial. When the tune needs a job's evaluation and no
  worker has taken it, the tune pops and evaluates it itself (never waiting on idle work).
- **Draws.** A worker with no job asks the shared search study for a stage-2 candidate
  (``MultiFidelitySearch.ask``: a RUNNING trial with a heartbeat; never one evaluated, failed, or being
  evaluated elsewhere), evaluates the incumbent's params with the candidate's search params on
  validation, stores the evaluation and the base on the trial and tells its value; at most ``N``
  draws against one incumbent ahead of the gate. When none is coming, the tune draws one itself.
- **Ahead of the gate.** While round ``i`` is evaluated elsewhere, the tune proposes round ``i+1`` when
  it is a rewrite (against the same incumbent) and queues it: workers evaluate it while the tune gates
  round ``i``. Promotion stays in the tune, one decision at a time in round order with the same gate,
  and only ever on an evaluation made against the incumbent in force: a draw or a job evaluated or
  queued against an incumbent that has since been replaced is stale, recorded as such (control attr
  ``stale``, a cancelled job FAIL with ``selftune.repeat``), never gated; its round is proposed again.
  The held-out test is touched once, at the end, by the tune. Workers answer validation only (the
  tune answers the train minibatch of a promoted candidate, as it does for its own) and no slice
  pruning (the gate compares the whole split); a job the tune takes itself is evaluated as its own
  candidates are, on growing slices, pruned when clearly losing or stopped by the time budget.
- **Spend.** Each worker reports what it spent in this tune, by role (calls, tokens, dollars; its set-up's
  calls too), in the control study when it joins and after every candidate (``spend.<epoch>.<worker>.<token>``,
  a running total); the tune
  counts it in its ledger before every round and once more after the local workers have exited, so
  ``optimizer.budget`` and ``models.<role>.budget`` cap the whole tune, workers included, and the report's
  calls are all of them (stage ``worker processes``). A cap can be passed by the candidates the workers
  hold when it is reached (the forecast counts them: no round starts that would pass a cap with them);
  a killed worker's half candidate is never counted (its calls were made, but nobody reports them).
- **A killed worker** stops its heartbeat (Optuna's, RDB storages only): the next look fails its trial
  and re-queues the candidate once (``RetryHeartbeatStaleTrialCallback``, the job's attrs copied), for a
  worker or the tune; its half evaluation is never stored, so never counted.

What machines share: the study (candidates, values, stage 1's scores), the MLflow server, the chroma
server (``index.server``); each machine re-pays its BM25 indexes (no model call), its embedder load,
and, with a different workdir, the LM response cache (workers on one machine share the workdir's).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna

from .records import Evaluation, Params, Probe
from .search import REPEAT, _heartbeat

log = logging.getLogger(__name__)
CONTROL, JOBS = "-control", "-jobs"
PARAMS, VAL, BASE = "selftune.params", "selftune.val", "selftune.base"
JOB, BY, SECS = "selftune.job", "selftune.worker", "selftune.seconds"
SPEND = "spend."  # control attr prefix: a worker's spend in a tune (``_Spent``)
POLL = 0.2  # seconds between a worker's looks at the study when it has nothing to do
WAIT = 0.1  # seconds between the tune's looks while it waits for an evaluation
NICE = 10  # how much lower a local worker's CPU priority is than the tune's


def control_study(storage: optuna.storages.BaseStorage, study: str) -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=study + CONTROL, load_if_exists=True)


def jobs_study(storage: optuna.storages.BaseStorage, study: str) -> optuna.Study:
    """Candidates the tune proposed itself (stage 1's best, a lever, a rewrite), queued as WAITING trials
    (``enqueue_trial``) whose user attr ``selftune.job`` holds what to evaluate; whoever pops one (Optuna's
    own atomic WAITING -> RUNNING) evaluates it."""
    return optuna.create_study(storage=storage, study_name=study + JOBS, load_if_exists=True)


@dataclass
class Report:
    """A validation evaluation made elsewhere (a worker's), as the tune gates it: a stage-2 draw's
    (``number``: its search trial) or a job's (``job``: its jobs trial), with the incumbent it was
    evaluated against (``base``)."""

    number: int
    params: Params
    val: Evaluation
    base: str
    worker: int | None = None
    job: bool = False
    seconds: float = 0.0  # the evaluation's wall time, where it ran


@dataclass
class Job:
    """A candidate the tune queued for round ``round`` against incumbent ``base`` (``Pool.submit``)."""

    key: str
    round: int
    params: Params
    notes: tuple[str, ...]
    base: str


class Pool:
    """The tune's side: publish what workers need; take their reports in trial order; queue its own
    candidates as jobs; start and stop local worker processes."""

    def __init__(self, storage: optuna.storages.BaseStorage, study: str, ahead: int):
        self.storage, self.study, self.ahead = storage, study, max(1, ahead)
        self.control = control_study(storage, study)
        self.jobs = jobs_study(storage, study)
        # per search study (one per objective, trial numbers restarting in each): draws gated, draws stale
        self.gated_in: dict[str, list[int]] = _by_study(self.control.user_attrs.get("gated"))
        self.stale_in: dict[str, list[int]] = _by_study(self.control.user_attrs.get("stale"))
        self._stale_before = len(self.stale)
        self.procs: list[subprocess.Popen] = []
        self.search_study: str | None = None
        self.cancelled = 0  # jobs queued ahead whose incumbent changed before their turn
        # jobs need Optuna's heartbeat (RDB storages): with a journal file a dead worker's job would be
        # waited for forever, so there the tune evaluates its own candidates (workers draw only)
        self.takes_jobs = _heartbeat(storage)
        # a token of this tune: the incumbent a report was evaluated against is "<epoch>:<round>"
        self.epoch = uuid.uuid4().hex[:12]
        self.base = f"{self.epoch}:0"
        # a continued study's control holds the last tune's attrs: workers wait until this tune is ready
        self.publish(done=False, ready=False, draws=False, epoch=self.epoch, base=self.base)

    def publish(self, **attrs: Any) -> None:
        for k, v in attrs.items():
            self.control.set_user_attr(k, v)
        if "search_study" in attrs:
            self.search_study = attrs["search_study"]
        if "base" in attrs:
            self.base = attrs["base"]

    def spawn(self, config: Path, n: int, workdir: Path) -> None:
        """N local ``selftune worker`` processes (their logs in ``workdir/workers``)."""
        logs = workdir / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        src = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
        for k in range(1, n + 1):
            with (logs / f"worker-{k}.log").open("ab") as out:
                self.procs.append(subprocess.Popen(
                    _nicer([sys.executable, "-m", "selftune.cli", "worker", str(config), "--id", str(k)]),
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            (logs / f"worker-{k}.pid").write_text(str(self.procs[-1].pid))

    @property
    def gated(self) -> list[int]:
        """The draws of the current search study gated so far."""
        return self.gated_in.get(self.search_study or "", [])

    @property
    def stale(self) -> list[int]:
        """The draws of every search study found stale (evaluated against a replaced incumbent)."""
        return [n for ns in self.stale_in.values() for n in ns]

    @property
    def dropped(self) -> int:
        """Evaluations this tune never gated because their incumbent was replaced first: stale draws
        and cancelled jobs."""
        return len(self.stale) - self._stale_before + self.cancelled

    def _local_alive(self, worker: Any) -> bool:
        """Worker ``worker`` (its ``--id``) is one of this tune's local processes and has not exited."""
        k = worker if isinstance(worker, int) else -1
        return 1 <= k <= len(self.procs) and self.procs[k - 1].poll() is None

    def _alone(self) -> bool:
        """Every local worker has exited (and none was started elsewhere that we know of)."""
        return bool(self.procs) and all(p.poll() is not None for p in self.procs)

    def next(self, timeout: float | None = None) -> Report | None:
        """The lowest-numbered stage-2 draw a worker reported against the current incumbent and not yet
        gated, waiting for one while a worker is evaluating one against it; None when none is coming (no
        draw against this incumbent is being evaluated, or, with no heartbeat to tell a dead worker, none
        by a live local worker of this tune; every local worker exited; ``timeout`` passed): the tune then
        draws and evaluates one itself. A report evaluated against an earlier
        incumbent is stale: recorded (control attr ``stale``), never gated."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.search_study is not None:
                study = optuna.load_study(study_name=self.search_study, storage=self.storage)
                _fail_stale(study)
                trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.RUNNING))
                gated = self.gated_in.setdefault(self.search_study, [])
                stale = self.stale_in.setdefault(self.search_study, [])
                done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and VAL in t.user_attrs
                        and t.number not in gated and t.number not in stale]
                old = [t.number for t in done if t.user_attrs.get(BASE) != self.base]
                if old:
                    stale += old
                    self.control.set_user_attr("stale", self.stale_in)
                ready = [t for t in done if t.user_attrs.get(BASE) == self.base]
                if ready:
                    t = min(ready, key=lambda t: t.number)
                    gated.append(t.number)
                    self.control.set_user_attr("gated", self.gated_in)
                    return Report(t.number, dict(t.user_attrs[PARAMS]), Evaluation.model_validate(t.user_attrs[VAL]),
                                  self.base, t.user_attrs.get(BY))
                # without a heartbeat a dead worker's draw would look alive forever: only one a live local
                # worker holds is waited for
                coming = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING
                          and t.user_attrs.get(BASE) == self.base
                          and (self.takes_jobs or self._local_alive(t.user_attrs.get(BY)))]
                if not coming:
                    return None
            if self._alone():
                return None
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(WAIT)

    def submit(self, round: int, params: Params, notes: tuple[str, ...], llm_items: int | None) -> Job:
        """Queue a candidate the tune proposed (any kind but a stage-2 draw) for a worker to evaluate on
        validation against the current incumbent."""
        key = f"{self.base}:{round}:{uuid.uuid4().hex[:8]}"
        spec = {"key": key, "round": round, "params": params, "base": self.base, "llm_items": llm_items}
        self.jobs.enqueue_trial({}, user_attrs={JOB: json.loads(json.dumps(spec))})
        return Job(key, round, dict(params), notes, self.base)

    def _job_trials(self, job: Job) -> list[optuna.trial.FrozenTrial]:
        """The jobs trials holding ``job``: the one queued and its heartbeat retries (same user attrs)."""
        return [t for t in self.jobs.get_trials(deepcopy=False) if t.user_attrs.get(JOB, {}).get("key") == job.key]

    def result(self, job: Job, evaluate: Callable[[Params, int | None], Evaluation]) -> Report:
        """``job``'s validation evaluation: a worker's report, or, when no worker has taken it (or every
        worker is gone), the tune's own: it pops the WAITING trial itself (Optuna's atomic claim, so no
        worker evaluates it too) and calls ``evaluate``. A job whose worker died is failed by the
        heartbeat and re-queued once (its half evaluation never stored); failed again, the tune
        evaluates it. Never two evaluations of one job counted."""
        spec = None
        while True:
            _fail_stale(self.jobs)
            trials = self._job_trials(job)
            spec = spec or (trials[0].user_attrs[JOB] if trials else None)
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and VAL in t.user_attrs]
            if done:
                t = done[0]
                return Report(t.number, job.params, Evaluation.model_validate(t.user_attrs[VAL]), job.base,
                              t.user_attrs.get(BY), job=True, seconds=float(t.user_attrs.get(SECS, 0.0)))
            waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and not self._lost(t)]
            if waiting or not running or self._alone():  # nobody holds it: the tune evaluates it, not waits
                mine = None
                for t in waiting:
                    if self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.RUNNING):
                        mine = t
                        break
                if waiting and mine is None:
                    continue  # a worker popped it just now
                llm = spec.get("llm_items") if spec else None
                started = time.perf_counter()
                try:
                    val = evaluate(job.params, llm)
                except BaseException:
                    if mine is not None:
                        self.storage.set_trial_state_values(mine._trial_id, optuna.trial.TrialState.FAIL)
                    raise
                took = time.perf_counter() - started
                if mine is not None:
                    self.storage.set_trial_user_attr(mine._trial_id, BY, 0)
                    self.storage.set_trial_user_attr(mine._trial_id, SECS, took)
                    self.storage.set_trial_user_attr(mine._trial_id, VAL, val.model_dump(mode="json"))
                    self.storage.set_trial_state_values(mine._trial_id, optuna.trial.TrialState.COMPLETE, [0.0])
                return Report(mine.number if mine is not None else -1, job.params, val, job.base, 0, job=True,
                              seconds=took)
            time.sleep(WAIT)

    def _lost(self, t: optuna.trial.FrozenTrial) -> bool:
        """A job popped by a process that died before its first heartbeat (it names its worker only after
        that): failed here once it is older than the heartbeat's grace period, so the tune takes it."""
        every = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        if BY in t.user_attrs or every is None or t.datetime_start is None:
            return False
        if (datetime.now() - t.datetime_start).total_seconds() < 2 * every:
            return False
        try:
            return self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return True

    def cancel(self, job: Job) -> None:
        """A queued job whose incumbent changed before it was gated: popped by the tune and failed,
        marked as holding no evaluation, so no worker evaluates it; one a worker already holds is
        evaluated there and never gated (its report is stale)."""
        self.cancelled += 1
        for t in self._job_trials(job):
            if t.state == optuna.trial.TrialState.WAITING and self.storage.set_trial_state_values(
                    t._trial_id, optuna.trial.TrialState.RUNNING):
                self.storage.set_trial_user_attr(t._trial_id, REPEAT, "cancelled: its incumbent changed")
                self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)

    def spend(self) -> dict[str, Any]:
        """What this tune's workers reported spending, by role (``spend.Spend``), summed over workers: each
        reports its running total after every candidate it finished or failed; a candidate in hand is
        counted once it is done, and a killed worker's half candidate never."""
        from .spend import Spend, combine

        out: dict[str, Any] = {}
        for k, v in _attrs(self.control).items():
            if k.startswith(f"{SPEND}{self.epoch}.") and isinstance(v, dict):
                out = combine(out, {r: Spend(int(s["calls"]), int(s["tokens"]), float(s["usd"])) for r, s in v.items()})
        return {r: Spend(int(s.calls), int(s.tokens), s.usd) for r, s in out.items()}

    def in_flight(self) -> int:
        """Candidates a worker of this tune is evaluating now (stage-2 draws and jobs): their spend is
        still to come."""
        states = (optuna.trial.TrialState.RUNNING,)
        jobs = sum(1 for t in self.jobs.get_trials(deepcopy=False, states=states)
                   if str(t.user_attrs.get(JOB, {}).get("base", "")).startswith(f"{self.epoch}:")
                   and t.user_attrs.get(BY))
        draws = 0
        if self.search_study is not None:
            study = optuna.load_study(study_name=self.search_study, storage=self.storage)
            draws = sum(1 for t in study.get_trials(deepcopy=False, states=states)
                        if str(t.user_attrs.get(BASE, "")).startswith(f"{self.epoch}:"))
        return jobs + draws

    def stop(self) -> None:
        """Tell workers the tune is over (they finish the candidate in hand and exit)."""
        self.control.set_user_attr("done", True)

    def close(self) -> None:
        """Tell workers the tune is over; stop the local ones (each by its own process group)."""
        import signal

        self.stop()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)


def _nicer(cmd: list[str]) -> list[str]:
    """A local worker runs at a lower CPU priority than the tune (``NICE``, by ``nice``, which keeps the
    pid): its work is mostly waiting on the models, and on a machine with few cores its start-up
    (imports, the embedder) and its parsing must not slow the tune's serial path (probes, proposals,
    gating), which every round waits on."""
    import shutil

    return ["nice", "-n", str(NICE), *cmd] if shutil.which("nice") else cmd


def _by_study(attr: Any) -> dict[str, list[int]]:
    """A control attr of trial numbers per search study (an earlier version's flat list: dropped, its
    tune's draws are another epoch's and never gated anyway)."""
    return {k: list(v) for k, v in attr.items()} if isinstance(attr, dict) else {}


def _fail_stale(study: optuna.Study) -> None:
    """Optuna's heartbeat check (RDB storages): a silent process's RUNNING trials failed, re-queued once."""
    import warnings

    if _heartbeat(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def run_worker(cfg: Any, worker_id: int = 0, models: Any = None, max_candidates: int | None = None) -> int:
    """A worker's loop (module docstring); returns the candidates it reported."""
    from .loop import Session
    from .objective import Objective
    from .optimize import Optimizer
    from .rag import Demo
    from .search import Exhausted
    from .studies import default_storage, open_storage, study_name

    spec = cfg.optimizer.model_copy(update={"storage": default_storage(cfg)})
    session = Session(cfg, models=models)
    try:
        # the embedder loads on first use (seconds of CPU): now, while the tune makes its probes and
        # baseline, not in the middle of the first candidate the tune waits for
        session.embedder.encode(["warm up"])
        storage = open_storage(spec.storage, cfg.source.resolve().parent if cfg.source else None, spec.heartbeat)
        name = study_name(cfg, session.corpus.digest)
        control = control_study(storage, name)
        jobs = jobs_study(storage, name)
        log.info("worker %d: waiting for the tune to publish %s", worker_id, name + CONTROL)
        attrs = _attrs(control)
        while not attrs.get("ready") and not attrs.get("done"):
            time.sleep(POLL)
            attrs = _attrs(control)
        probes = [Probe.model_validate(p) for p in attrs.get("probes", [])]
        # what this process spends (its set-up's calls too) is the tune's: reported now and after every
        # candidate (``Pool.spend``)
        spent = _Spent(control, session.ledger, attrs.get("epoch"), worker_id)
        spent.report()
        opt = Optimizer(cfg.sut.params, session.rubric, session.models.role("optimizer"), spec, cfg.seed + worker_id,
                        cheap=session.retrieval_objective(probes), storage=storage, study=name)
        demos: Any = None
        done = 0
        exhausted = False
        while not attrs.get("done") and (max_candidates is None or done < max_candidates):
            if attrs.get("demos") != demos and hasattr(session.sut, "set_demos"):
                demos = attrs.get("demos")
                session.sut.set_demos([Demo.model_validate(d) for d in demos or []])
            job = _pop_job(jobs, attrs.get("base"))
            if job is not None:  # the tune's own candidates first: the tune waits for them
                spec_ = job.user_attrs[JOB]
                with _beating(storage, job._trial_id):
                    storage.set_trial_user_attr(job._trial_id, BY, worker_id)  # after the first heartbeat
                    started = time.perf_counter()
                    try:
                        val = session.evaluate(spec_["params"], probes, "val", _quiet, llm_items=spec_["llm_items"])
                    except Exception as err:  # noqa: BLE001 -- a candidate that cannot be evaluated is FAIL
                        log.warning("worker %d: job %d failed: %s: %s", worker_id, job.number, type(err).__name__, err)
                        storage.set_trial_state_values(job._trial_id, optuna.trial.TrialState.FAIL)
                    else:
                        storage.set_trial_user_attr(job._trial_id, SECS, time.perf_counter() - started)
                        storage.set_trial_user_attr(job._trial_id, VAL, val.model_dump(mode="json"))
                        storage.set_trial_state_values(job._trial_id, optuna.trial.TrialState.COMPLETE, [0.0])
                        done += 1
                        log.info("worker %d: evaluated job %d (round %s)", worker_id, job.number, spec_["round"])
                spent.report()
                attrs = _attrs(control)
                continue
            if exhausted or not attrs.get("draws") or _ahead(storage, attrs) >= int(attrs.get("ahead", 1)):
                time.sleep(POLL)
                attrs = _attrs(control)
                continue
            objective = Objective(attrs["objective"]["kind"], session.rubric,
                                  frozenset(attrs["objective"]["criteria"]), session.judge.flag_cap)
            opt.steer(objective)
            if opt.search.study_name != attrs["search_study"]:
                raise RuntimeError(f"worker {worker_id}: search study {opt.search.study_name} is not the tune's "
                                   f"{attrs['search_study']} (different config?)")
            try:
                cand = opt.search.ask()
            except Exhausted:
                log.info("worker %d: the search space is exhausted", worker_id)
                exhausted = True
                continue
            base = attrs["base"]
            opt.search.annotate(cand, BY, worker_id)
            opt.search.annotate(cand, BASE, base)
            params = {**attrs["incumbent"], **cand.params}
            try:
                val = session.evaluate(params, probes, "val", _quiet, llm_items=attrs.get("llm_items"))
            except Exception as err:  # noqa: BLE001 -- a candidate that cannot be evaluated is FAIL, not a crash
                log.warning("worker %d: trial %d failed: %s: %s", worker_id, cand.number, type(err).__name__, err)
                opt.search.tell(cand, None)
            else:
                opt.search.annotate(cand, PARAMS, params)
                opt.search.annotate(cand, VAL, val.model_dump(mode="json"))
                opt.search.tell(cand, opt.value(val))
                done += 1
                log.info("worker %d: reported trial %d", worker_id, cand.number)
            spent.report()
            attrs = _attrs(control)
        return done
    finally:
        session.close()


class _Spent:
    """A worker process's spend, by role, reported in the control study for the tune of epoch ``epoch``
    (user attr ``spend.<epoch>.<worker>.<process token>``, a running total) when it joins and after every
    candidate, failed or not: the tune counts it in its ledger, its caps and its report (``Pool.spend``).
    A worker serves one tune (it exits when that tune is done), so its whole spend is that tune's."""

    def __init__(self, control: optuna.Study, ledger: Any, epoch: str | None, worker_id: int):
        self.control, self.ledger = control, ledger
        self.key = f"{SPEND}{epoch}.{worker_id}.{uuid.uuid4().hex[:8]}"

    def report(self) -> None:
        from dataclasses import asdict

        self.control.set_user_attr(self.key, {r: asdict(s) for r, s in sorted(self.ledger.spend.items()) if s.calls})


def _attrs(control: optuna.Study) -> dict[str, Any]:
    return optuna.load_study(study_name=control.study_name, storage=control._storage).user_attrs


def _pop_job(jobs: optuna.Study, base: str | None = None) -> optuna.trial.FrozenTrial | None:
    """The oldest queued job (against incumbent ``base``, if given: one queued against an earlier
    incumbent, or by an earlier tune, is left for the tune to cancel), popped: WAITING -> RUNNING,
    atomic in the storage, so one process gets it."""
    _fail_stale(jobs)
    for t in jobs.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        if JOB in t.user_attrs and (base is None or t.user_attrs[JOB].get("base") == base) \
                and jobs._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.RUNNING):
            return t
    return None


class _beating:
    """A job's heartbeat while it is evaluated (as ``MultiFidelitySearch`` keeps a draw's)."""

    def __init__(self, storage: Any, trial_id: int):
        self.storage, self.trial_id, self.stop = storage, trial_id, threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> None:
        if not _heartbeat(self.storage):
            return
        every = self.storage.get_heartbeat_interval()
        self.storage.record_heartbeat(self.trial_id)

        def beat() -> None:
            while not self.stop.wait(every):
                self.storage.record_heartbeat(self.trial_id)

        self.thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-job-{self.trial_id}")
        self.thread.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _ahead(storage: optuna.storages.BaseStorage, attrs: dict[str, Any]) -> int:
    """Stage-2 draws evaluated or being evaluated against the current incumbent and not yet gated."""
    study = optuna.load_study(study_name=attrs["search_study"], storage=storage)
    gated = set(_by_study(attrs.get("gated")).get(attrs["search_study"], []))
    return sum(1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                    optuna.trial.TrialState.RUNNING))
               if t.number not in gated and t.user_attrs.get(BASE) == attrs.get("base")
               and (VAL in t.user_attrs or t.state == optuna.trial.TrialState.RUNNING)
               and not t.user_attrs.get(REPEAT))


def _quiet(items: Any, **_: Any) -> Any:
    return items
