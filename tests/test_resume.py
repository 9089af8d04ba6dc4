"""Stopping and resuming, as a user meets them: ``selftune tune`` in a real process against a real
OpenAI-compatible endpoint on 127.0.0.1 (``selftune.scripted``: FakeModels' replies by model name, every
request recorded), stopped by SIGKILL or SIGTERM inside a call the server holds, then resumed. No llama.cpp."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import DOCS, check_tune_record, write_config
from selftune.scripted import ScriptedServer, role_reply

SRC = str(Path(__file__).resolve().parents[1] / "src")
ROLES = ("generator", "sut", "judge", "optimizer")


@pytest.fixture
def server():
    srv = ScriptedServer(reply=role_reply).start()
    yield srv
    srv.close()


def _config(tmp: Path, server: ScriptedServer, **replace: str) -> Path:
    docs = tmp / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    models = ", ".join(f"{r}: {{model: openai/{r}, api_base: '{server.base}'}}" for r in ROLES)
    path = write_config(tmp, docs, models=f"{{{models}}}")
    text = path.read_text().replace("optimizer: {rounds: 2}", "optimizer: {rounds: 3}")
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _start(cfg: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("DSPY_CACHEDIR", None)  # the CLI puts DSPy's response cache in the workdir
    return subprocess.Popen([sys.executable, "-m", "selftune.cli", "tune", str(cfg), *args], env=env,
                            cwd=cfg.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    proc = _start(cfg, *args)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop_inside(proc: subprocess.Popen, server: ScriptedServer, sig: int) -> str:
    """Send ``sig`` while the tune waits for the held reply; returns its stderr."""
    assert server.holding.wait(300), "the tune never reached the held call"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    server.release()
    return err


def _tunes(work: Path) -> list:
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("selftune")
    return client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'tune'")


def _lock_is_free(work: Path) -> bool:
    with (work / "selftune.lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _report(stdout: str) -> str:
    """The report, less the lines a replay changes (below)."""
    text = stdout[:stdout.index("MLflow run:")]
    assert "- wall time: " in text
    # less what a replay changes by design: the wall time, and the tokens billed (a cache hit is free)
    return re.sub(r"^- (wall time|spend by role): .*$", "", text, flags=re.M)


def test_sigkill_mid_round_then_resume_finishes_the_same_run_paying_no_call_twice(tmp_path, server):
    # the same tune uninterrupted, in a workdir of its own: what the stopped one must come to
    ref = _run(_config(tmp_path / "ref", server))
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_calls = Counter(server.canonical())
    start = server.requests

    cfg = _config(tmp_path / "t", server)
    work = tmp_path / "t" / "work"
    server.hold("sut", after="optimizer")  # round 2 (a rewrite): its proposal paid, an answer in flight
    proc = _start(cfg)
    _stop_inside(proc, server, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    (killed,) = _tunes(work)
    assert killed.info.status == "RUNNING" and _lock_is_free(work)  # what SIGKILL leaves: no stale lock
    in_flight = server.canonical(server.held)[0]
    middle = server.requests

    res = _run(cfg, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    rid = killed.info.run_id
    assert f"marked KILLED: tune run {rid}" in res.stderr and f"resuming tune run {rid}" in res.stderr
    client, parent = check_tune_record(work, res.stdout, rounds=3)  # one parent, one child per round
    assert parent.info.run_id == rid and parent.data.tags["selftune.resumes"] == "1"
    assert "SIGKILL" in parent.data.tags["selftune.resume1"] and "selftune.aborted" not in parent.data.tags
    # the resumed tune is the uninterrupted one: same rounds, same promotions, same held-out report
    assert _report(res.stdout) == _report(ref.stdout)
    (whole,) = _tunes(tmp_path / "ref" / "work")
    # the probes' synthesis stats too
    assert set(parent.data.metrics) == set(whole.data.metrics)
    assert parent.data.metrics["calls/total"] == whole.data.metrics["calls/total"]
    assert parent.data.metrics["calls/probes"] == whole.data.metrics["calls/probes"] > 0
    # the spend covers the whole tune, kept in the workdir across the kill: what the killed process billed
    # (the probes' synthesis too) and what the resumed one did (the call cut off was never billed)
    assert (work / "spend" / f"{rid}.json").is_file()
    m, w = parent.data.metrics, whole.data.metrics
    assert {k: m[k] for k in m if k.startswith("calls/role/")} == {k: w[k] for k in w if k.startswith("calls/role/")}
    assert m["tokens/generator"] == w["tokens/generator"] > 0
    assert m["tokens/sut"] == w["tokens/sut"] and m["tokens/optimizer"] == w["tokens/optimizer"]
    # paid twice: only the judge's start-up probe (every start sends it) and the call the kill cut off
    paid = Counter(server.canonical(start))
    assert sum(paid.values()) == server.requests - start > middle - start
    extra = paid - ref_calls
    assert ref_calls - paid == Counter()
    probe = next(b for b in extra if "What does the pass statement do?" in b)
    assert extra == Counter({probe: 1, in_flight: 1}), sorted(extra.values())
    assert m["tokens/judge"] == w["tokens/judge"] > 0  # (the start-up probe is not billed to the tune)
    print(f"\nrequests: uninterrupted tune {sum(ref_calls.values())}; killed {middle - start} + resumed "
          f"{server.requests - middle}; ledger calls/total {int(whole.data.metrics['calls/total'])} both")
    assert _lock_is_free(work)


def test_sigterm_stops_like_ctrl_c_and_one_tune_per_workdir(tmp_path, server):
    cfg = _config(tmp_path, server)
    work = tmp_path / "work"
    server.hold("sut", after="judge")  # a baseline answer, the parent run already open
    first = _start(cfg)
    assert server.holding.wait(300), "the tune never reached the held call"
    # a second tune (or an eval) on the busy workdir is refused at once, in one line
    second = _run(cfg)
    assert second.returncode == 2 and second.stdout == ""
    line = second.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {work}: in use by selftune tune ")
    assert f"pid {first.pid}" in line
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What does pass do?"}) + "\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    ev = subprocess.run([sys.executable, "-m", "selftune.cli", "eval", str(cfg), "--questions", str(questions),
                         "--out", str(tmp_path / "a.jsonl"), "--params", "baseline"], env=env, capture_output=True,
                        text=True, timeout=300)
    assert ev.returncode == 2 and "in use by selftune tune" in ev.stderr
    # SIGTERM (timeout, systemd, CI) takes the Ctrl-C path: parent run KILLED, not left RUNNING
    err = _stop_inside(first, server, signal.SIGTERM)
    assert first.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err
    (run,) = _tunes(work)
    assert run.info.status == "KILLED" and run.data.tags["selftune.aborted"].startswith("Terminated")
    assert _lock_is_free(work)
    # a changed config refuses to resume and names the key, before any model is loaded
    changed = _config(tmp_path, server, **{"gate: {resamples: 200}": "gate: {resamples: 300}"})
    refused = _run(changed, "--resume")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"error: {changed}: gate.resamples: changed since the tune being resumed "
                                     f"(run {run.info.run_id}): 200 -> 300")
    # so does an edited rubric (the config names the same file)
    cfg = _config(tmp_path, server)
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(rubric.read_text() + "\n# edited\n")
    refused = _run(cfg, "--resume")
    assert refused.returncode == 2 and refused.stderr == (f"error: {rubric}: edited since the tune being resumed "
                                                          f"(run {run.info.run_id}); undo the edit, or run without "
                                                          "--resume to start a new tune\n")
    assert _tunes(work)[0].info.status == "KILLED"  # a refused resume leaves the stopped run as it was


def test_the_workdir_lock_names_its_holder_and_dies_with_it(tmp_path):
    from selftune.errors import InputError
    from selftune.workdir import WorkdirLock

    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from selftune.workdir import WorkdirLock; lock = WorkdirLock(Path(sys.argv[1]), 'tune x.yaml').acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), SRC], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=rf"in use by selftune tune x.yaml \(pid {holder.pid}, since "):
            WorkdirLock(tmp_path, "eval y.yaml").acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait(30)
    with WorkdirLock(tmp_path, "tune z.yaml") as lock:
        assert f"selftune tune z.yaml (pid {os.getpid()}" in lock.path.read_text()
        with pytest.raises(InputError):  # one holder at a time, within one process too
            WorkdirLock(tmp_path, "tune z.yaml").acquire()
    WorkdirLock(tmp_path, "tune z.yaml").acquire().release()


def test_a_replay_that_differs_from_the_record_stops_the_resume(tmp_path, corpus_dir):
    """In process, on fake models: the tracker checks each replayed round against its child run. The
    same models replay the tune into the same parent (no round logged twice); a round whose record differs
    from its replay stops the resume (FAILED) instead of mixing two tunes in one record."""
    from conftest import FakeModels, no_progress
    from selftune.config import load_config
    from selftune.loop import Session, tune
    from selftune.tracking import MlflowTracker

    cfg = load_config(write_config(tmp_path, corpus_dir))
    first = MlflowTracker(cfg)
    tune(Session(cfg, models=FakeModels()), 2, first, no_progress)
    client = MlflowClient(cfg.tracking_uri())
    pid = first.parent_id

    def children() -> list:
        return client.search_runs([first.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pid}'")

    again = MlflowTracker(cfg, resume=pid)
    tune(Session(cfg, models=FakeModels()), 2, again, no_progress)
    assert again.parent_id == pid and not again.done and len(children()) == 3
    assert client.get_run(pid).info.status == "FINISHED" and client.get_run(pid).data.tags["selftune.resumes"] == "1"

    # a record the replay cannot match (as if another tune had logged round 1): the resume stops
    (one,) = [c for c in children() if c.data.tags["selftune.round"] == "1"]
    was = one.data.tags["selftune.promoted"]
    client.set_tag(one.info.run_id, "selftune.promoted", str(was != "True"))
    with pytest.raises(RuntimeError, match=r"round 1 replayed differently from its record"):
        tune(Session(cfg, models=FakeModels()), 2, MlflowTracker(cfg, resume=pid), no_progress)
    run = client.get_run(pid)
    assert run.info.status == "FAILED" and "replayed differently" in run.data.tags["selftune.aborted"]
    assert len(children()) == 3
