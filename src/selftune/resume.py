"""``tune --resume``: which tune to continue, whether it may be, and the parent runs of dead tunes.

How a tune resumes, and why that way. Every LM call goes through DSPy's response cache in the workdir
(a diskcache SQLite store; each reply is committed as it arrives, so a SIGKILL loses at most the call
in flight), every random choice is seeded, and the loop is sequential in a fixed order. So the resumed
process runs the *same* tune from round 0 and every call the killed one made is read back from the
cache (no endpoint request, no llama.cpp compute): the probes, the baseline, the trust monitor's
test-retest (a second sample under its own cache key, ``trust._second_sample``), each proposal and
each evaluation. The optimizer's whole state (the Optuna study with its sampler's RNG and pending
trials, the instruction pool, the demonstrations, the trust monitor's statistics, the call ledger's
totals) is rebuilt by the code that built it the first time, so it cannot drift from what a fresh run
would hold, which persisting each piece on its own (an Optuna storage for the study, a pickle for the
rest) could. The tracker (``MlflowTracker(cfg, resume=run_id)``) reattaches to the killed parent
run, checks each replayed round against its finished child run (params and promotion; a mismatch
stops the resume rather than mixing two tunes in one record) and logs only the rounds after them.
The price is the non-LM work of the finished rounds (retrieval, checks), seconds beside their calls.
The one request a resume repeats is the judge's start-up probe (one per judge model), sent by every
start on purpose: it proves the endpoint is up and scores before any work.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from .config import Config
from .errors import InputError

WORKDIR_TAG = "selftune.workdir"
STALE = ("found RUNNING by a later selftune tune holding the workdir lock, so its process had died "
         "without a clean stop (SIGKILL, out of memory, power loss)")


def workdir_id(cfg: Config) -> str:
    return str(cfg.workdir.resolve())


def file_sha(path: Path | None) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path is not None and path.is_file() else ""


def start_tags(cfg: Config) -> dict[str, str]:
    """Tags a tune's parent run carries so a later ``--resume`` can find it and check its inputs."""
    return {WORKDIR_TAG: workdir_id(cfg), "selftune.rubric_sha256": file_sha(cfg.rubric),
            "selftune.probes_file_sha256": file_sha(cfg.probes.file)}


def _client_and_experiment(cfg: Config) -> tuple[Any, str | None]:
    """The store's client and the experiment's id (None, and no store created, when there is none yet)."""
    from mlflow import MlflowClient

    if cfg.tracking.uri is None and not (cfg.workdir / "mlflow.db").is_file():
        return None, None
    client = MlflowClient(tracking_uri=cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, exp.experiment_id if exp else None


def _mine(cfg: Config, run: Any) -> bool:
    """A run of this workdir's tunes (runs logged before the workdir tag existed count when the store
    is the workdir's own)."""
    tag = run.data.tags.get(WORKDIR_TAG)
    return tag == workdir_id(cfg) if tag is not None else cfg.tracking.uri is None


def reap_stale(cfg: Config) -> list[str]:
    """Mark KILLED (with a tag saying why) every tune parent run of this workdir still RUNNING, and
    its RUNNING child runs. Called only with the workdir lock held: no live tune can own such a run."""
    client, exp = _client_and_experiment(cfg)
    if exp is None:
        return []
    runs = client.search_runs([exp], filter_string="attributes.status = 'RUNNING' and tags.`selftune.kind` = 'tune'")
    reaped = []
    for run in (r for r in runs if _mine(cfg, r)):
        rid = run.info.run_id
        for child in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{rid}' "
                                                             "and attributes.status = 'RUNNING'"):
            client.set_terminated(child.info.run_id, "KILLED")
        client.set_tag(rid, "selftune.aborted", STALE)
        client.set_terminated(rid, "KILLED")
        reaped.append(rid)
    return reaped


def last_unfinished(cfg: Config) -> Any | None:
    """The latest tune of this config in this workdir, if it did not finish (else None)."""
    client, exp = _client_and_experiment(cfg)
    if exp is None:
        return None
    runs = client.search_runs([exp], filter_string="tags.`selftune.kind` = 'tune'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    latest = next((r for r in runs if r.data.tags.get("selftune.config") == cfg.name and _mine(cfg, r)), None)
    return latest if latest is not None and latest.info.status != "FINISHED" else None


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def _short(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(cfg: Config, run: Any, corpus_digest: str | None = None) -> None:
    """Refuse (InputError: file, the key that changed, was -> now) unless this config, its rubric,
    its probes file and (once loaded) its documents are those of ``run``."""
    client, _ = _client_and_experiment(cfg)
    rid, src = run.info.run_id, cfg.source or "config"
    with tempfile.TemporaryDirectory() as tmp:
        old = json.loads(Path(client.download_artifacts(rid, "config/resolved.json", tmp)).read_text())
    was, now = _flat(old), _flat(json.loads(cfg.model_dump_json()))
    was.pop("source", None)
    now.pop("source", None)
    for key in sorted(set(was) | set(now)):
        if was.get(key, "<unset>") != now.get(key, "<unset>"):
            raise InputError(src, key, f"changed since the tune being resumed (run {rid}): "
                                       f"{_short(was.get(key, '<unset>'))} -> {_short(now.get(key, '<unset>'))}; "
                                       "undo the change, or run without --resume to start a new tune")
    tags = run.data.tags
    for path, tag in ((cfg.rubric, "selftune.rubric_sha256"), (cfg.probes.file, "selftune.probes_file_sha256")):
        if tag in tags and tags[tag] != file_sha(path):
            raise InputError(path or src, "", f"edited since the tune being resumed (run {rid}); undo the edit, "
                                              "or run without --resume to start a new tune")
    old_digest = tags.get("selftune.corpus_digest")
    if corpus_digest is not None and old_digest is not None and old_digest != corpus_digest:
        raise InputError(cfg.corpus.path, "", f"the documents changed since the tune being resumed (run {rid}); "
                                              "run without --resume to start a new tune")
