"""``make bench`` (workers): wall time of the same tune in one process, with 1 worker and with 2 workers,
against a model endpoint with a fixed latency per call.

Every role is a model behind ``selftune.scripted`` (``role_reply``: answers by the model's name): a stdlib
``ThreadingHTTPServer`` answering ``/v1/chat/completions`` on 127.0.0.1 after ``time.sleep(latency)`` per
call (the wait of a hosted model, spent without CPU, so the figure measures how much of that wait workers
overlap rather than this machine's load; default 1 s, "a hosted judge takes a second or more per call").
Each process runs up to ``models.<role>.concurrency`` calls at once (hosted default 8).

The corpus is 50 Language Reference topics (``--topics``; 140 probes: 56 train, 42 validation, 42 test).
Before the timed runs, an untimed one-round tune against the same models answering at once synthesizes
the probes and embeds the corpus (``prepare``); each timed run starts from a fresh work directory holding
a copy of those probes and indexes only (no response cache, no study), as a team's probe set and chroma
server would hold them: the timed runs measure the rounds, the part workers can speed up. Each has its own
SQLite study (``optimizer.storage``) and the same seed and rounds. Reported per run: wall seconds, the
tune's own set-up and probe seconds and the wall seconds after them, rounds, candidates a worker evaluated
(stage-2 draws and jobs), calls the endpoint served, calls the tune counted (its ledger, the workers'
reports included, less the probe calls it read back: equal to the served ones when every worker's spend
reached the tune), the tune's time per stage, and the speed-up over one process. Worker processes each
load the embedder and build their own Session on the same 2 cores: a fixed cost the latency has to
outweigh.

What workers overlap is candidate evaluation (a worker's draw or queued rewrite while the tune gates the
round before); the rest is serial work only the tune does (the baseline, the judge's swap tests, the
rewrites' GEPA runs, the promotion's train minibatch, the held-out test). README, "When one machine is not
enough", has the measurements.

    python -m selftune.workerbench [--latency 1.0] [--rounds 8] [--topics 50] [--probes 300] [--out FILE]
        [--keep DIR] [--prepared DIR] [--no-prepare]
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


def topics(n: int) -> list[str]:
    """The 8 statement topics, then more Language Reference topics of a few hundred to a few thousand
    characters, in name order: ``n`` in all."""
    from pydoc_data.topics import topics as all_topics

    more = [k for k, v in sorted(all_topics.items()) if k not in TOPICS and 300 <= len(v) <= 4000]
    return (TOPICS + more)[:n]


def config(tmp: Path, base: str, rounds: int, probes: int, n_topics: int = len(TOPICS),
           docs: Path | None = None) -> Path:
    root = Path(__file__).resolve().parents[2]
    rubric = root / "configs" / "rubrics" / "taste.yaml"
    docs = docs or tmp / "docs"
    if not docs.is_dir():
        materialize(docs, topics(n_topics))
    models = {r: {"model": f"openai/{m}", "api_base": base, "cache": False}
              for r, m in (("generator", "gen"), ("sut", "sut"), ("judge", "judge"), ("optimizer", "opt"))}
    cfg = {"name": "bench-workers", "seed": 0, "workdir": str(tmp / "work"), "corpus": {"path": str(docs)},
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


PREPARED = ("probes", "chroma", "bm25")  # what the prepared run leaves for the timed ones (``prepare``)


def prepare(tmp: Path, probes: int, n_topics: int) -> Path:
    """A one-round tune in one process, untimed, against the same scripted models answering at once (no
    latency: the replies, so the probes, are the same): it synthesizes the probes and embeds the corpus for
    the base chunking and every setting stage 1 screens. Its work dir's probes and indexes are copied into
    each timed run's (as a team's probe set and chroma server would hold them), so the timed runs measure
    the rounds, the part workers can speed up, not probe synthesis or embedding, which no worker shares."""
    with scripted.ScriptedServer(latency=0.0, reply=scripted.role_reply) as server:
        run(tmp, server, 1, probes, 0, n_topics, docs=tmp / "docs")
    return tmp


def run(tmp: Path, server: scripted.ScriptedServer, rounds: int, probes: int, workers: int,
        n_topics: int = len(TOPICS), docs: Path | None = None, prepared: Path | None = None) -> dict[str, Any]:
    path = config(tmp, server.base, rounds, probes, n_topics, docs)
    if prepared is not None:
        for name in PREPARED:
            if (prepared / "work" / name).exists():
                shutil.copytree(prepared / "work" / name, tmp / "work" / name, dirs_exist_ok=True)
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
            "calls_served": server.requests - before,
            # the tune's own count (its ledger: workers' reports included), less the probe calls it read back
            "calls_counted": _counted(tmp / "work" / "mlflow.db", prepared is not None),
            "stages": _stages(tmp / "work" / "mlflow.db")}


def _counted(db: Path, reused_probes: bool) -> int | None:
    total = _stage_seconds(db, ("calls/total",))
    probes = _stage_seconds(db, ("calls/probes",)) or 0.0
    return None if total is None else int(total - (probes if reused_probes else 0))


def _stages(db: Path) -> dict[str, float]:
    """The tune's wall time per stage (its ``time/<stage>`` stats)."""
    import sqlite3

    if not db.is_file():
        return {}
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT key, value FROM latest_metrics WHERE key LIKE 'time/%'").fetchall()
    return {k.split("/", 1)[1]: round(v, 1) for k, v in rows}


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
    ap.add_argument("--latency", type=float, default=1.0, help="seconds the endpoint sleeps per call")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--probes", type=int, default=300)
    ap.add_argument("--topics", type=int, default=50, help="Language Reference topics in the corpus (at most 50)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to time")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep each run's work dir and logs under this folder")
    ap.add_argument("--no-prepare", dest="prepare", action="store_false",
                    help="synthesize the probes and embed the corpus in every timed run")
    ap.add_argument("--prepared", type=Path, default=None,
                    help="reuse this earlier bench's prepared folder (<keep>/prepared; same --topics and --probes)")
    a = ap.parse_args()
    server = scripted.ScriptedServer(latency=a.latency, reply=scripted.role_reply).start()
    results = []
    with tempfile.TemporaryDirectory(prefix="selftune-workerbench-") as t:
        root = a.keep if a.keep is not None else Path(t)
        try:
            prepared = None
            if a.prepared is not None:  # an earlier bench's (same topics and probes): reused, not made again
                prepared = a.prepared
            elif a.prepare:
                shutil.rmtree(root / "prepared", ignore_errors=True)
                (root / "prepared").mkdir(parents=True)
                t0 = time.monotonic()
                prepared = prepare(root / "prepared", a.probes, a.topics)
                print(f"prepared probes and indexes in {time.monotonic() - t0:.1f} s (not timed)", flush=True)
            for n in (int(x) for x in a.workers.split(",")):
                tmp = root / f"workers-{n}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                r = run(tmp, server, a.rounds, a.probes, n, a.topics,
                        docs=prepared / "docs" if prepared else None, prepared=prepared)
                results.append(r)
                print(json.dumps(r), flush=True)
        finally:
            server.close()
    one = next((r for r in results if r["workers"] == 0), None)
    for r in results:
        r["speedup_vs_one_process"] = round(one["seconds"] / r["seconds"], 2) if one else None
        r["speedup_after_probes"] = (round(one["after_probes_seconds"] / r["after_probes_seconds"], 2)
                                     if one and one["after_probes_seconds"] and r["after_probes_seconds"] else None)
    summary = {"latency_s": a.latency, "rounds": a.rounds, "probes": a.probes, "topics": a.topics,
               "prepared": a.prepare, "runs": results}
    print("workers | wall s | probes s | after probes s | rounds | from workers | calls served | calls counted | "
          "speed-up | after probes")
    for r in results:
        print(f"{r['workers']:>7} | {r['seconds']:>6} | {r['probes_seconds']!s:>8} | "
              f"{r['after_probes_seconds']!s:>14} | {r['rounds']:>6} | {r['from_workers']:>12} | "
              f"{r['calls_served']:>12} | {r['calls_counted']!s:>13} | "
              f"{r['speedup_vs_one_process']!s:>8} | {r['speedup_after_probes']}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
