"""``make bench``: the speed-up of ``models.<role>.concurrency`` on a split of at least 40 items.

Every role is a served model (``openai/stub`` with ``api_base``) on ``selftune.scripted``: a real
OpenAI-compatible HTTP server on 127.0.0.1 whose every reply is written after ``time.sleep(latency)``
in its own handler thread. That sleep is how the fixed per-call latency is produced: it stands for a
hosted provider's round trip, costs no CPU, and so gives the same figure on a busy machine (the
client's own work, retrieval and scoring, is small beside it at the default 0.25 s).

The same probes (probe synthesis, then a validation split of ``--items`` items: an answer and a judge
call per item) run once with ``concurrency: 1`` and once with ``--concurrency``, each in a fresh work
directory with the response cache off. Reported: wall time of each, the speed-up, and whether the
two runs gave identical probes and judgments (they must). Exit code 1 when they differ or when the
split's speed-up is below ``--min-speedup``.

    python -m selftune.concbench [--items 48] [--latency 0.25] [--concurrency 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOPICS = ["assert", "pass", "break", "continue", "del", "return", "global", "raise", "import", "while", "for", "if"]


def _config(tmp: Path, base: str, concurrency: int, count: int) -> Path:
    import yaml

    root = Path(__file__).resolve().parents[2]
    rubric = root / "configs" / "rubrics" / "taste.yaml"
    spec = {"model": "openai/stub", "api_base": base, "cache": False, "concurrency": concurrency}
    cfg = {"name": "concbench", "seed": 0, "workdir": str(tmp / "work"), "corpus": {"path": str(tmp.parent / "docs")},
           "rubric": str(rubric), "probes": {"count": count, "split": {"train": 0.05, "val": 0.9, "test": 0.05}},
           "models": {r: spec for r in ("generator", "sut", "judge", "optimizer")},
           "sut": {"params": {"instructions": {"type": "text", "initial": "Answer from the context."},
                              "top_k": {"type": "int", "low": 1, "high": 4, "initial": 3},
                              "chunk_size": {"type": "choice", "choices": [500], "initial": 500},
                              "chunk_overlap": {"type": "choice", "choices": [100], "initial": 100}}}}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def one(tmp: Path, latency: float, concurrency: int, count: int) -> dict[str, Any]:
    from .config import initial_params, load_config
    from .loop import Session
    from .runtime import setup
    from .scripted import ScriptedServer

    with ScriptedServer(latency=latency) as server:
        cfg = load_config(_config(tmp, server.base, concurrency, count))
        setup(cfg.workdir)
        session = Session(cfg)
        try:
            t0 = time.perf_counter()
            probes, _ = session.probes(lambda it, **_: it)
            t1 = time.perf_counter()
            ev = session.evaluate(initial_params(cfg), probes, "val", lambda it, **_: it)
            t2 = time.perf_counter()
        finally:
            session.close()
        return {"concurrency": concurrency, "probes": len(probes), "val_items": len(ev.judgments),
                "probe_seconds": t1 - t0, "split_seconds": t2 - t1, "requests": server.requests,
                "max_inflight": server.max_inflight, "valid": sum(j.valid for j in ev.judgments),
                "_probes": [p.model_dump() for p in probes],
                "_judgments": [j.model_dump(exclude={"answer": {"seconds"}}) for j in ev.judgments]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=48, help="validation items (at least 40)")
    ap.add_argument("--latency", type=float, default=0.25, help="seconds the endpoint sleeps before each reply")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--min-speedup", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.items < 40:
        ap.error("--items must be at least 40")
    from .demo_corpus import materialize

    count = int(args.items / 0.9) + 2  # the val share of the split is 0.9
    with tempfile.TemporaryDirectory(prefix="selftune-concbench-") as d:
        materialize(Path(d) / "docs", TOPICS)
        seq = one(Path(d) / "seq", args.latency, 1, count)
        par = one(Path(d) / "par", args.latency, args.concurrency, count)
    same = seq.pop("_probes") == par.pop("_probes") and seq.pop("_judgments") == par.pop("_judgments")
    out = {"latency_seconds": args.latency, "sequential": seq, "concurrent": par, "identical_results": same,
           "split_speedup": seq["split_seconds"] / par["split_seconds"],
           "probe_speedup": seq["probe_seconds"] / par["probe_seconds"]}
    print(f"concurrency bench: {seq['val_items']} validation items, {args.latency:g} s per call (endpoint sleep)")
    for r in (seq, par):
        print(f"  concurrency {r['concurrency']}: probes {r['probe_seconds']:.1f} s ({r['probes']}), split "
              f"{r['split_seconds']:.1f} s, {r['requests']} requests, at most {r['max_inflight']} at once")
    print(f"  speed-up: split x{out['split_speedup']:.2f}, probe synthesis x{out['probe_speedup']:.2f}; "
          f"identical results: {same}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2), encoding="utf-8")
    ok = same and seq["val_items"] >= 40 and out["split_speedup"] >= args.min_speedup
    if not ok:
        print("concurrency bench: FAILED (results differ, too few items, or speed-up below "
              f"{args.min_speedup:g})", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
