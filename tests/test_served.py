"""End to end against a served model, the way most teams run selftune: llama-cpp-python's own
OpenAI-compatible server (``python -m llama_cpp.server``) serves the embedded GGUF on 127.0.0.1, and a
short tune runs with all four roles as ``openai/...`` ids with ``api_base`` and ``api_key_env``.

The tune runs as the CLI runs it, in a subprocess whose HOME and TMPDIR are inside the test's folder,
so every file it writes (workdir, MLflow store, response cache, logs, anything a library keeps under
HOME) can be searched for the key's value afterwards. The server demands the key, so a tune that
finishes has sent it on every call."""

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, check_tune_record
from selftune import lm
from selftune.demo_corpus import materialize
from selftune.llamaserver import LlamaServer

pytestmark = pytest.mark.e2e
TOPICS = ["assert", "pass", "break", "continue", "del", "return", "global", "raise"]
KEY_ENV = "SELFTUNE_SERVED_KEY"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The embedded GGUF behind an OpenAI-compatible endpoint that demands a random key; always torn down."""
    tmp = tmp_path_factory.mktemp("served")
    key = "sk-selftune-" + secrets.token_hex(16)
    log = tmp / "server.log"
    with LlamaServer(log, key) as base:
        yield {"base": base, "key": key, "log": log, "tmp": tmp}


def _served_config(tmp: Path, base: str) -> Path:
    assert materialize(tmp / "docs", TOPICS) == len(TOPICS)
    cfg = yaml.safe_load((ROOT / "configs/rag.yaml").read_text())
    cfg.update(workdir=str(tmp / "work"), rubric=str(ROOT / "configs/rubrics/taste.yaml"),
               corpus={"path": str(tmp / "docs")}, probes={"count": 6})
    cfg["sut"]["params"]["chunk_size"] = {"type": "choice", "choices": [300, 500], "initial": 500}
    cfg["optimizer"]["rounds"] = 1
    del cfg["sut"]["params"]["repeat_penalty"]  # llama.cpp's own knob: a served sut is refused it (config.py)
    for role, spec in cfg["models"].items():  # same temperatures and lengths as the local tune
        cfg["models"][role] = {**spec, "model": "openai/smollm2-135m", "api_base": base, "api_key_env": KEY_ENV}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_tune_against_a_served_model_lands_in_mlflow_and_never_writes_the_key(served):
    tmp, key = served["tmp"], served["key"]
    path = _served_config(tmp, served["base"])
    (tmp / "home").mkdir()
    (tmp / "tmpdir").mkdir()
    src = str(Path(lm.__file__).resolve().parents[1])  # the selftune under test, whatever the cwd
    env = {**os.environ, KEY_ENV: key, "HOME": str(tmp / "home"), "TMPDIR": str(tmp / "tmpdir"),
           "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("DSPY_CACHEDIR", None)  # the CLI puts DSPy's response cache in the workdir
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "selftune.cli", "tune", str(path)], env=env, cwd=tmp,
                         capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - t0
    (tmp / "tune.out").write_text(run.stdout)
    (tmp / "tune.err").write_text(run.stderr)
    print(f"\nserved tune: {seconds:.0f} s wall")
    assert run.returncode == 0, run.stderr[-3000:]
    # the key's value appears nowhere: not in the workdir (MLflow store and artifacts, response cache,
    # index, probes), the tune's HOME and TMPDIR, the server's log, or what the tune printed
    needle = key.encode()
    leaked = [str(p) for p in tmp.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert leaked == [] and key not in run.stdout + run.stderr
    assert (tmp / "work" / "dspy_cache").is_dir() and (tmp / "work" / "mlflow.db").is_file()  # searched, not absent
    client, parent = check_tune_record(tmp / "work", run.stdout, rounds=1)
    m = parent.data.metrics
    assert parent.data.params["model.judge"] == "openai/smollm2-135m"
    # either the served judge scores (almost) every item, or the bar refuses it for not doing so
    if m["judge/valid_rate"] < 0.95:
        assert m["judge/trusted"] == 0.0 and "valid-score rate" in parent.data.tags["selftune.judge_untrusted"]
    (tmp / "served.json").write_text(json.dumps({"seconds": seconds, "valid_rate": m["judge/valid_rate"],
                                                 "judge_state": parent.data.tags["selftune.judge_state"]}))
