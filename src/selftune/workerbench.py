"""``make bench`` (workers): wall time of the same tune in one process, with 1 worker and with 2 workers,
against a model endpoint with a fixed latency per call.

Every role is a model behind ``selftune.scripted`` (``role_reply``: answers by the model's name): a stdlib
``ThreadingHTTPServer`` answering ``/v1/chat/completions`` on 127.0.0.1 after ``time.sleep(latency)`` per
call (the wait of a hosted model, spent without CPU, so the figure measures how much of that wait workers
overlap rather than this machine's load). Each run gets a fresh work directory (no response cache, index or
study carried over), its own SQLite study (``optimizer.storage``), the demo corpus and the same seed and
rounds. Reported per run: wall seconds, the tune's own probe synthesis (and set-up) seconds and the wall
seconds after them, rounds, candidates a worker evaluated (stage-2 draws and jobs), calls served by the
endpoint, and the speed-up over one process, in all and after the probes. Worker processes each load the
embedder and build their own Session: a fixed cost that the latency has to outweigh.

Read the figure for what it can show. Workers overlap candidate evaluations; the default (18 probes, so
5 validation items: two waits per candidate in one process, which already runs up to 8 calls at once)
makes them about a tenth of the tune, the rest being serial work only the tune does (probe synthesis, one
call after another, before any candidate exists; the judge's swap tests; the rewrites' GEPA runs; the
held-out test). (``--probes`` above ~18 changes nothing here: the 8 demo topics yield no more probes.)
README, "When one machine is not enough", has the measurements.

    python -m selftune.workerbench [--latency 0.3] [--rounds 6] [--probes 18] [--out FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from . import scripted
from .demo_corpus import materialize

TOPICS = ["assert", "pass", "break", "continue", "del", "return", "global", "raise"]


def config(tmp: Path, base: str, rounds: int, probes: int) -> Path:
    root = Path(__file__).resolve().parents[2]
    rubric = root / "configs" / "rubrics" / "taste.yaml"
    if not (tmp / "docs").is_dir():
        materialize(tmp / "docs", TOPICS)
    models = {r: {"model": f"openai/{m}", "api_base": base, "cache": False}
              for r, m in (("generator", "gen"), ("sut", "sut"), ("judge", "judge"), ("optimizer", "opt"))}
    cfg = {"name": "bench-workers", "seed": 0, "workdir": str(tmp / "work"), "corpus": {"path": str(tmp / "docs")},
           "rubric": str(rubric), "probes": {"count": probes}, "models": models,
           "sut": {"params": {"instructions": {"type": "text", "initial": "Answer from the context."},
                              "top_k": {"type": "int", "low": 1, "high": 4, "initial": 2},
                              "chunk_size": {"type": "choice", "choices": [300, 500], "initial": 500},
                              "chunk_overlap": {"type": "choice", "choices": [0, 50], "initial": 50},
                              "temperature": {"type": "choice", "choices": [0.0, 0.3, 0.7], "initial": 0.0}}},
           "optimizer": {"rounds": rounds, "storage": f"sqlite:///{tmp / 'work' / 'optuna.db'}", "train_items": 8},
           "gate": {"resamples": 500}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp: Path, server: scripted.ScriptedServer, rounds: int, probes: int, workers: int) -> dict[str, Any]:
    path = config(tmp, server.base, rounds, probes)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         *filter(None, [os.environ.get("PYTHONPATH")])])}
    before = server.requests
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "selftune.cli", "tune", str(path)] + (["--workers", str(workers)] if workers else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - t0
    (tmp / "tune.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"tune with {workers} workers failed: {done.stderr[-2000:]}")
    rounds_done = sum(1 for line in done.stdout.splitlines() if line.startswith("|") and line.split("|")[1].strip()
                      .isdigit())
    probes = _stage_seconds(tmp / "work" / "mlflow.db", ("time/setup", "time/probes"))
    return {"workers": workers, "seconds": round(seconds, 1), "rounds": rounds_done - 1,
            "probes_seconds": None if probes is None else round(probes, 1),
            "after_probes_seconds": None if probes is None else round(seconds - probes, 1),
            "from_workers": done.stdout.count("(a worker's)") + done.stdout.count("evaluated by worker"),
            "calls_served": server.requests - before}


def _stage_seconds(db: Path, keys: tuple[str, ...]) -> float | None:
    """The tune's own wall time in ``keys`` (its ``time/<stage>`` stats, in the workdir's MLflow store)."""
    import sqlite3

    if not db.is_file():
        return None
    with sqlite3.connect(db) as con:
        rows = con.execute(f"SELECT value FROM latest_metrics WHERE key IN ({','.join('?' * len(keys))})",
                           keys).fetchall()
    return sum(v for (v,) in rows) if rows else None


def main() -> None:
    ap = argparse.ArgumentParser(description="wall time of one tune with 0 (in process), 1 and 2 workers")
    ap.add_argument("--latency", type=float, default=0.3, help="seconds the endpoint sleeps per call")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--probes", type=int, default=18)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to time")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep each run's work dir and logs under this folder")
    a = ap.parse_args()
    server = scripted.ScriptedServer(latency=a.latency, reply=scripted.role_reply).start()
    results = []
    try:
        for n in (int(x) for x in a.workers.split(",")):
            if a.keep is not None:
                tmp = a.keep / f"workers-{n}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                r = run(tmp, server, a.rounds, a.probes, n)
            else:
                with tempfile.TemporaryDirectory(prefix="selftune-workerbench-") as t:
                    r = run(Path(t), server, a.rounds, a.probes, n)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        server.close()
    one = next((r for r in results if r["workers"] == 0), None)
    for r in results:
        r["speedup_vs_one_process"] = round(one["seconds"] / r["seconds"], 2) if one else None
        r["speedup_after_probes"] = (round(one["after_probes_seconds"] / r["after_probes_seconds"], 2)
                                     if one and one["after_probes_seconds"] and r["after_probes_seconds"] else None)
    summary = {"latency_s": a.latency, "rounds": a.rounds, "probes": a.probes, "runs": results}
    print("workers | wall s | probes s | after probes s | rounds | from workers | calls served | speed-up | "
          "after probes")
    for r in results:
        print(f"{r['workers']:>7} | {r['seconds']:>6} | {r['probes_seconds']!s:>8} | "
              f"{r['after_probes_seconds']!s:>14} | {r['rounds']:>6} | {r['from_workers']:>12} | "
              f"{r['calls_served']:>12} | "
              f"{r['speedup_vs_one_process']!s:>8} | {r['speedup_after_probes']}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
