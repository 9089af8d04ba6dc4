"""`selftune ui` and what a person sees in the MLflow UI, checked in a real headless chromium.

One fake-model tune is logged to a sqlite store; ``selftune ui CONFIG`` serves that store (a real
``mlflow server`` on 127.0.0.1, in a subprocess, with the offline environment); a second tune is then
logged *through that server* over REST, so the traces are shown to work with a remote tracking server.
The browser test opens the experiment, the last tune's parent run, a child run and one item's trace, and
saves a screenshot of each under ``$SELFTUNE_SCREENSHOTS`` (default: the test's tmp folder).
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cdp import Browser, chromium
from conftest import DOCS, ROOT, FakeModels, no_progress, write_config
from selftune.config import load_config
from selftune.loop import Session, tune
from selftune.tracking import MlflowTracker


def fake_tune(cfg_path: Path):
    cfg = load_config(cfg_path)
    tracker = MlflowTracker(cfg)
    return cfg, tune(Session(cfg, models=FakeModels()), 1, tracker, no_progress), tracker


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    docs = tmp / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    cfg_path = write_config(tmp, docs)
    local_cfg, _, local = fake_tune(cfg_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for k in ("LITELLM_LOCAL_MODEL_COST_MAP", "HF_HUB_OFFLINE"):  # selftune ui must bring its own
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "selftune.cli", "ui", str(cfg_path), "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()  # a thread, so a command that hangs fails the deadline instead of blocking a read
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith(("last tune:", "no tune")) for line in list(lines)):
            assert proc.poll() is None, "selftune ui exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, "selftune ui printed no URL in 240s:\n" + "".join(lines)
            time.sleep(0.2)
        base = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        # a second tune of the same store, logged through the server over REST
        remote_path = write_config(tmp, docs, tracking=f"{{uri: '{base}', experiment: selftune}}")
        remote_cfg, remote_result, remote = fake_tune(remote_path)
        yield {"base": base, "printed": "".join(lines), "local": local, "remote": remote, "cfg": local_cfg,
               "remote_result": remote_result, "tmp": tmp}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does: the command stops its server and exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_ui_command_serves_the_store_and_prints_the_last_tune(ui):
    eid, pid = ui["local"].experiment_id, ui["local"].parent_id
    assert f"last tune: {ui['base']}/#/experiments/{eid}/runs/{pid}" in ui["printed"]
    with urllib.request.urlopen(f"{ui['base']}/health", timeout=10) as r:
        assert r.status == 200


def test_traces_through_a_remote_tracking_server(ui):
    client = MlflowClient(ui["base"])
    remote, res = ui["remote"], ui["remote_result"]
    assert remote.traces.failed == 0 and remote.traces.items > 0
    for rnd in res.rounds:
        [child] = client.search_runs([remote.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{remote.parent_id}' and tags.`selftune.round` = '{rnd.index}'"))
        traces = client.search_traces(locations=[remote.experiment_id], run_id=child.info.run_id)
        assert len(traces) == len(rnd.train.judgments) + len(rnd.val.judgments)
    t = client.get_trace(remote.traces.ids["round-01"][0])
    assert {s.name for s in t.data.spans} >= {"item", "retrieve", "generate", "judge", "grounded"}
    by = {a.name: a for a in t.info.assessments}
    assert by["grounded"].rationale == "looks grounded" and by["grounded"].source.source_type == "LLM_JUDGE"
    assert "expected_response" in by and by["concise"].source.source_type == "CODE"
    assert client.search_datasets(experiment_ids=[remote.experiment_id])


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed: `make setup` installs it with apt-get "
                                               "(apt-get install chromium); without it the browser test cannot run")
def test_the_ui_shows_runs_metrics_and_a_judged_item(ui):
    base, remote = ui["base"], ui["remote"]
    eid, pid = remote.experiment_id, remote.parent_id
    client = MlflowClient(base)
    [child] = client.search_runs([eid], filter_string=f"tags.mlflow.parentRunId = '{pid}' and "
                                                      "tags.`selftune.round` = '1'")
    tid = remote.traces.ids["round-01"][0]
    trace = client.get_trace(tid)
    question = trace.info.request_preview
    shots = Path(os.environ.get("SELFTUNE_SCREENSHOTS") or ui["tmp"] / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    parent_name = client.get_run(pid).info.run_name
    b = Browser(ui["tmp"], height=2400)  # tall: the metric charts render lazily, only once in view

    def tidy() -> None:  # the assistant panel and a first-visit tip cover half the page
        b.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
        b.click('[data-component-id="mlflow.detect_issues.guidance.got_it"]')

    try:
        b.open(f"{base}/#/experiments/{eid}/runs")
        b.wait_text([parent_name, ui["local"].client.get_run(ui["local"].parent_id).info.run_name])
        tidy()
        b.click('button[data-component-id*="runnamecellrenderer"]')  # unfold the last tune's rounds
        b.wait_text(["round-00", "round-01"])
        b.screenshot(shots / "1-experiment-runs.png")

        b.open(f"{base}/#/experiments/{eid}/runs/{pid}")
        b.wait_text([parent_name, "round-00", "round-01", "candidate/val_overall", "gain/test"])
        tidy()
        b.screenshot(shots / "2-parent-run.png")
        b.open(f"{base}/#/experiments/{eid}/runs/{pid}/model-metrics")
        b.wait_text(["Add chart", "(candidate/val_overall)"])  # the tuning curve's legend (charts below: lazy)
        time.sleep(2)  # the plots draw after their legends
        b.screenshot(shots / "3-parent-run-curves.png")

        b.open(f"{base}/#/experiments/{eid}/runs/{child.info.run_id}")
        b.wait_text(["round-01", "val/overall", "top_k", "selftune.gate", parent_name])
        tidy()
        b.screenshot(shots / "4-child-run.png")

        b.open(f"{base}/#/experiments/{eid}/traces?selectedEvaluationId={tid}")
        b.wait_text([question, "retrieve", "generate", "judge", "grounded"])
        tidy()
        assert b.click('[data-component-id="shared.model-trace-explorer.assessments-pane-toggle"]') or \
            "Feedback" in b.text()
        b.wait_text(["Feedback", "grounded", "expected_response"])
        # unfold every assessment: their order on the pane is not fixed (the code checks may come first)
        assert b.click_all('[data-component-id="shared.model-trace-explorer.toggle-assessment-expanded"]')
        b.wait_text(["looks grounded"])  # the judge's rationale for the LLM criteria
        b.screenshot(shots / "5-item-trace.png")
    finally:
        b.close()
    assert all((shots / n).stat().st_size > 10_000 for n in ("1-experiment-runs.png", "2-parent-run.png",
                                                              "3-parent-run-curves.png", "4-child-run.png",
                                                              "5-item-trace.png"))
