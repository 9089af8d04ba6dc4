"""``make bench``: the speed and memory targets, measured on the real embedded models.

Three tunes of one config in a fresh work directory, each in its own process (as ``make tune``
would be): the first builds everything (probes, indexes, LM calls), the second must re-embed no chunk,
the third starts from a deliberately weak pipeline (``top_k: 1, chunk_size: 300, chunk_overlap: 0``,
instructions "Reply to the user.") on the same probes and must recover. Reported per run: wall time,
peak RSS, collections built, texts embedded, judge valid rate, probes, LM calls by stage, the time of
each round, and the gains with their intervals. Exit code 1 when a target is missed:

- first tune within ``--max-minutes`` (20 minutes on 2 cores) with at least 120 probes, 40 of them
  validation, and a minimum detectable effect of the validation split of at most 0.05;
- the rerun builds no index collection (every chunk embedding is reused);
- at least ``--min-valid`` of the judge's scores valid;
- the weak start promotes a candidate, and its held-out test gain on the deterministic criteria has a
  90% paired-bootstrap interval above 0.

The search strategy itself is measured without any LM on real peer data: ``python -m
selftune.gridbench`` (also run by ``make bench``).

    python -m selftune.bench configs/rag.yaml [--workdir DIR] [--out FILE] [--only first|weak]
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


WEAK = {"top_k": 1, "chunk_size": 300, "chunk_overlap": 0, "instructions": "Reply to the user."}


def weak_start(cfg: Any) -> Any:
    """The config with a deliberately weak starting pipeline (the params it names that exist)."""
    params = {n: s.model_copy(update={"initial": WEAK[n]}) if n in WEAK else s for n, s in cfg.sut.params.items()}
    return cfg.model_copy(update={"name": f"{cfg.name}-weak", "sut": cfg.sut.model_copy(update={"params": params})})


def _child(config: str, workdir: str, out: str, weak: bool = False) -> None:
    """One tune in this process; its figures are written to ``out`` as JSON."""
    from .config import load_config
    from .runtime import progress, setup

    cfg = load_config(config).model_copy(update={"workdir": Path(workdir)})
    if weak:
        cfg = weak_start(cfg)
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
        "probes_val": result.stats.get("probes_val"), "promoted": sum(r.gate.promote for r in result.rounds[1:]),
        "pruned": sum(r.pruned for r in result.rounds), "report": report(result),
        "figures": {k: v for k, v in result.stats.items() if isinstance(v, (int, float))
                    and k.startswith(("gain/", "checks/gain/", "gate/", "calls/", "search/", "alarms/", "rounds/"))},
    }, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="selftune.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--workdir", help="fresh work directory (default: a new temporary one)")
    ap.add_argument("--out", default="bench.json", help="where to write the figures (JSON)")
    ap.add_argument("--max-minutes", type=float, default=20.0)
    ap.add_argument("--min-valid", type=float, default=0.95)
    ap.add_argument("--child", nargs=2, metavar=("WORKDIR", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--weak", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-weak", action="store_true", help="skip the weak-start tune")
    ap.add_argument("--only", choices=("first", "weak"), help="run this one tune alone (its targets only)")
    args = ap.parse_args(argv)
    if args.child:
        _child(args.config, *args.child, weak=args.weak)
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="selftune-bench-")).resolve()
    if args.only != "weak" and workdir.exists() and any(workdir.iterdir()):
        ap.error(f"--workdir {workdir} is not empty; the first run must start cold")
    # --only weak may reuse a first run's workdir (probes, indexes, cached calls), as it does in the full bench
    runs = {}
    names = (args.only,) if args.only else ("first", "rerun", "weak")[: 2 if args.skip_weak else 3]
    for name in names:
        out = workdir / f"{name}.json"
        print(f"[bench] {name} tune of {args.config} in {workdir} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "selftune.bench", args.config, "--child", str(workdir), str(out),
                               *(["--weak"] if name == "weak" else [])],
                              env={**os.environ, "DSPY_CACHEDIR": str(workdir / "dspy_cache")})
        if proc.returncode != 0:
            print(f"[bench] {name} tune failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        runs[name] = {**json.loads(out.read_text()), "process_seconds": round(time.perf_counter() - t, 1)}
    checks: dict[str, bool] = {}
    if "first" in runs:
        first = runs["first"]
        mde = first["figures"].get("gate/min_detectable_effect")
        checks[f"first tune <= {args.max_minutes:g} min"] = first["process_seconds"] <= args.max_minutes * 60
        checks["first tune: >= 120 probes, >= 40 validation"] = ((first["probes"] or 0) >= 120
                                                                and (first["probes_val"] or 0) >= 40)
        checks["first tune: minimum detectable effect <= 0.05 (at the spread of small-gain comparisons)"] = (
            mde is not None and mde <= 0.05)
        print(f"[bench] first tune: minimum detectable effect {mde}, over all comparisons "
              f"{first['figures'].get('gate/min_detectable_effect_all')}", file=sys.stderr)
    if "rerun" in runs:
        checks["rerun builds no index collection"] = runs["rerun"]["index_collections_built"] == 0
    checks[f"valid rate >= {args.min_valid:g}"] = min(r["valid_rate"] for r in runs.values()) >= args.min_valid
    if "weak" in runs:
        weak = runs["weak"]["figures"]
        checks["weak start promotes a candidate"] = runs["weak"]["promoted"] >= 1
        checks["weak start: test gain on the checks, 90% interval above 0"] = weak.get("checks/gain/test_low", -1) > 0
    result = {"config": args.config, "workdir": str(workdir), "cpus": os.cpu_count(), "runs": runs,
              "targets": {k: bool(v) for k, v in checks.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for name, r in runs.items():
        print(f"{name:6s} {r['process_seconds']:7.1f} s  peak RSS {r['peak_rss_mb']} MB  items {r['items_judged']} "
              f"({r['seconds_per_item']} s/item)  collections built {r['index_collections_built']}  "
              f"texts embedded {r['texts_embedded']}  valid {r['valid_rate']:.3f}")
        print("       " + "  ".join(f"{s['stage']}: {s['seconds']} s" for s in r["stages"]))
        print("       probes {probes} (val {probes_val}), promoted {promoted}, pruned {pruned}".format(**r))
        print("       " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in sorted(r["figures"].items())))
    for k, v in checks.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    print(f"figures: {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
