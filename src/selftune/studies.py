"""Where the search's Optuna study lives (``optimizer.storage``) and what it is called.

Without a storage the study is in memory and dies with the process (today's behaviour). With one,
Optuna's own storages hold it: an RDB URL (``sqlite:///...``, ``postgresql://...``, anything
SQLAlchemy opens) or a journal file (any other value: a path, ``JournalFileBackend``; safe for several
processes on one machine or a shared file system). The study is named from the config, so a restarted
tune, or a second process with the same config, opens the same study (``load_if_exists``).

What the search keeps in the study, so that any process sees it (``search.MultiFidelitySearch``):
stage 1's cheap scores and the current carry share (study user attrs ``selftune.stage1`` and
``selftune.carry``); every evaluated candidate as a COMPLETE trial (its value), a failed one as a FAIL
trial; draws answered without an evaluation carry the trial user attr ``selftune.repeat`` and never
count as evaluations; a candidate being evaluated is a RUNNING trial, so no other process is handed it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import optuna

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql")
STUDY_VERSION = 1  # bump when what a trial's value means changes


def is_rdb(url: str) -> bool:
    """An SQLAlchemy URL (``scheme://...`` or ``scheme+driver://...``) of a database Optuna supports."""
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    return scheme in RDB_SCHEMES


def open_storage(url: str, base: Path | None = None, heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage behind ``url``: an RDB storage for a database URL, else a journal file at that
    path (relative paths resolved against ``base``, the config's folder).

    ``heartbeat`` (seconds; RDB only, Optuna's heartbeat is an RDB feature): a process evaluating a
    candidate records a heartbeat that often; a RUNNING trial silent for two intervals is failed by the
    next process that asks (``fail_stale_trials``) and re-queued once as a WAITING trial with the same
    params (``RetryHeartbeatStaleTrialCallback``), so a killed process's candidate is evaluated by
    another and never half-counted. With a journal file a killed process's trial stays RUNNING: never
    handed out again, never counted."""
    if is_rdb(url):
        # pool_pre_ping: a server restarted between rounds is reconnected to, not an error
        import warnings

        kw: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True} if "sqlite" not in url else {}}
        with warnings.catch_warnings():  # the heartbeat arguments are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat is not None:
                kw.update(heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            return optuna.storages.RDBStorage(url, **kw)
    from optuna.storages.journal import JournalFileBackend

    path = Path(url).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def default_storage(cfg: Any) -> str:
    """Workers on one machine with no ``optimizer.storage``: an SQLite study in the workdir (RDB, so the
    heartbeat works). Workers on other machines need a storage they all reach (PostgreSQL)."""
    return cfg.optimizer.storage or f"sqlite:///{(cfg.workdir / 'optuna.db').resolve()}"


def _file_digest(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path is not None and path.is_file() else None


def study_name(cfg: Any, corpus_digest: str) -> str:
    """``selftune-<name>-<hash>``: the hash covers what decides a trial's value (the corpus's contents, embedder,
    models, rubric and probe files' contents, probes, seed, the search space, the judge, the gate's
    slices) and nothing that only decides how long a tune runs or where it logs (rounds, budget,
    tracking, workdir, storage, index server). The same config finds the same study on any machine."""
    data = json.loads(cfg.model_dump_json())
    for key in ("workdir", "tracking", "source", "index"):
        data.pop(key, None)
    opt = data.get("optimizer", {})
    for key in ("rounds", "budget", "storage", "heartbeat"):
        opt.pop(key, None)
    data["rubric"] = _file_digest(cfg.rubric)
    data["probes"]["file"] = _file_digest(cfg.probes.file)
    data["corpus"]["path"] = corpus_digest  # what the documents say, not where a machine keeps them
    data["v"] = STUDY_VERSION
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return f"selftune-{cfg.name}-{digest}"
