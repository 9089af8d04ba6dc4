"""``make bench``: the speed and memory targets, measured on the real embedded models.

Two tunes of one config in a fresh work directory, each in its own process (as two ``make tune``
would be): the first builds everything (probes, indexes, LM calls), the second must re-embed no chunk.
Reported per run: wall time, peak RSS, collections built, texts embedded, judge valid rate, and the
time of each round. Exit code 1 when a target is missed:

- first tune within ``--max-minutes`` (the whole-loop issue: 20 minutes on 2 cores);
- the rerun builds no index collection (every chunk embedding is reused);
- at least ``--min-valid`` of the judge's scores valid.

    python -m selftune.bench configs/rag.yaml [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _child(config: str, workdir: str, out: str) -> None:
    """One tune in this process; its figures are written to ``out`` as JSON."""
    from .runtime import progress, setup
    from .config import load_config

    cfg = load_config(config).model_copy(update={"workdir": Path(workdir)})
    setup(cfg.workdir)
    from .loop import Session, tune
    from .tracking import MlflowTracker, report

    class Timed:
        """Forwards to MLflow and timestamps each round."""

        def __init__(self, inner: MlflowTracker):
            self.inner, self.marks = inner, []
            self.t0 = time.perf_counter()

        def start(self, *a: Any) -> None:
            self.marks.append(("probes+setup", time.perf_counter() - self.t0))
            self.inner.start(*a)

        def round(self, rnd: Any) -> None:
            self.marks.append((f"round {rnd.index}", time.perf_counter() - self.t0))
            self.inner.round(rnd)

        def finish(self, result: Any) -> None:
            self.marks.append(("test split", time.perf_counter() - self.t0))
            self.inner.finish(result)

        def abort(self, reason: str) -> None:
            self.inner.abort(reason)

    t0 = time.perf_counter()
    session = Session(cfg)
    observer = Timed(MlflowTracker(cfg))
    try:
        result = tune(session, cfg.optimizer.rounds, observer, progress)
    finally:
        session.close()
    seconds = time.perf_counter() - t0
    print(report(result), file=sys.stderr)
    evs = [e for r in result.rounds for e in (r.train, r.val)] + [result.test_baseline, result.test_best]
    ok = sum(e.counts()["scores_ok"] for e in evs)
    invalid = sum(e.counts()["scores_invalid"] for e in evs)
    items = sum(len(e.judgments) for e in evs)
    marks, prev = [], 0.0
    for name, at in observer.marks:
        marks.append({"stage": name, "seconds": round(at - prev, 1)})
        prev = at
    Path(out).write_text(json.dumps({
        "seconds": round(seconds, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "items_judged": items, "seconds_per_item": round(seconds / max(items, 1), 2),
        "valid_rate": ok / (ok + invalid) if ok + invalid else 0.0, "stages": marks,
        "index_collections_built": result.stats.get("index_collections_built"),
        "texts_embedded": result.stats.get("texts_embedded"), "mlflow_run": observer.inner.parent_id,
        "rounds": len(result.rounds) - 1, "probes": result.stats.get("probes"),
    }, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="selftune.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--workdir", help="fresh work directory (default: a new temporary one)")
    ap.add_argument("--out", default="bench.json", help="where to write the figures (JSON)")
    ap.add_argument("--max-minutes", type=float, default=20.0)
    ap.add_argument("--min-valid", type=float, default=0.95)
    ap.add_argument("--child", nargs=2, metavar=("WORKDIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.config, *args.child)
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="selftune-bench-")).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        ap.error(f"--workdir {workdir} is not empty; the first run must start cold")
    runs = {}
    for name in ("first", "rerun"):
        out = workdir / f"{name}.json"
        print(f"[bench] {name} tune of {args.config} in {workdir} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "selftune.bench", args.config, "--child", str(workdir), str(out)],
                              env={**os.environ, "DSPY_CACHEDIR": str(workdir / "dspy_cache")})
        if proc.returncode != 0:
            print(f"[bench] {name} tune failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        runs[name] = {**json.loads(out.read_text()), "process_seconds": round(time.perf_counter() - t, 1)}
    first, rerun = runs["first"], runs["rerun"]
    checks = {
        f"first tune <= {args.max_minutes:g} min": first["process_seconds"] <= args.max_minutes * 60,
        "rerun builds no index collection": rerun["index_collections_built"] == 0,
        f"valid rate >= {args.min_valid:g}": min(first["valid_rate"], rerun["valid_rate"]) >= args.min_valid,
    }
    result = {"config": args.config, "workdir": str(workdir), "cpus": os.cpu_count(), "runs": runs,
              "targets": {k: bool(v) for k, v in checks.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for name, r in runs.items():
        print(f"{name:6s} {r['process_seconds']:7.1f} s  peak RSS {r['peak_rss_mb']} MB  items {r['items_judged']} "
              f"({r['seconds_per_item']} s/item)  collections built {r['index_collections_built']}  "
              f"texts embedded {r['texts_embedded']}  valid {r['valid_rate']:.3f}")
        print("       " + "  ".join(f"{s['stage']}: {s['seconds']} s" for s in r["stages"]))
    for k, v in checks.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    print(f"figures: {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
