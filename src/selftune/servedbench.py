"""``make bench``: the same short tune in-process and against the served embedded model, like for like.

The served run's four roles are ``openai/smollm2-135m`` ids with ``api_base`` and ``api_key_env``
against llama-cpp-python's own OpenAI-compatible server (``selftune.llamaserver``) on 127.0.0.1; the
in-process run's roles are ``local`` (the same GGUF in the tune's process). Everything else is the
same: the demo corpus's ``--topics`` documents, ``--probes`` probes, ``--rounds`` rounds, the default
config's temperatures and token budgets, llama.cpp threads (2), context (4096) and seed, each in a fresh
work directory (empty response cache) and run as the CLI runs it, one after the other (the server is
started only for its own run, so the two never share the cores). ``repeat_penalty`` is left out of the
search space of both: a served sut is refused that llama.cpp knob (``config.py``).

Reported per run: wall time (process start to exit, model load included), the tune's own LM-call count
and wall-time line, and the judge's valid-score rate; and the served/in-process time ratio. Exit code 1
when either tune fails.

    python -m selftune.servedbench [--probes 12] [--rounds 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOPICS = ["assert", "pass", "break", "continue", "del", "return", "global", "raise"]
KEY_ENV = "SELFTUNE_SERVEDBENCH_KEY"
THREADS = 2


def _config(tmp: Path, docs: Path, probes: int, rounds: int, base: str | None) -> Path:
    import yaml

    root = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((root / "configs" / "rag.yaml").read_text(encoding="utf-8"))
    cfg.update(workdir=str(tmp / "work"), rubric=str(root / "configs" / "rubrics" / "taste.yaml"),
               corpus={"path": str(docs)}, probes={"count": probes})
    cfg["sut"]["params"].pop("repeat_penalty", None)
    cfg["optimizer"]["rounds"] = rounds
    cfg["optimizer"]["budget"] = {"calls": 100000}  # the rounds decide, not the time budget
    for role, spec in cfg["models"].items():
        if base is not None:
            cfg["models"][role] = {**spec, "model": "openai/smollm2-135m", "api_base": base, "api_key_env": KEY_ENV}
    cfg["models"]["local"] = {"threads": THREADS}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _run(name: str, path: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "selftune.cli", "tune", str(path)], env=env, cwd=path.parent,
                         capture_output=True, text=True, timeout=7200)
    seconds = time.monotonic() - t0
    (path.parent / "tune.out").write_text(run.stdout, encoding="utf-8")
    (path.parent / "tune.err").write_text(run.stderr, encoding="utf-8")
    calls = re.search(r"LM calls: (\d+)", run.stdout)
    wall = re.search(r"^- wall time: (.*)$", run.stdout, re.M)
    valid = re.search(r"judge valid-score rate: ([0-9.]+)", run.stdout)
    rounds = re.findall(r"^\|\s+(\d+) \|", run.stdout, re.M)
    return {"run": name, "rc": run.returncode, "seconds": seconds, "lm_calls": int(calls[1]) if calls else None,
            "rounds": len(rounds), "wall_line": wall[1] if wall else None,
            "judge_valid_rate": float(valid[1]) if valid else None,
            "stderr_tail": run.stderr[-1500:] if run.returncode else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probes", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from .demo_corpus import materialize
    from .llamaserver import LlamaServer

    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("DSPY_CACHEDIR", None)  # the CLI puts the response cache in each (fresh) workdir
    with tempfile.TemporaryDirectory(prefix="selftune-servedbench-") as d:
        docs = Path(d) / "docs"
        materialize(docs, TOPICS)
        local = _run("in-process", _config(Path(d) / "local", docs, args.probes, args.rounds, None), env)
        key = "sk-bench-" + secrets.token_hex(12)
        t0 = time.monotonic()
        with LlamaServer(Path(d) / "server.log", key, threads=THREADS) as base:
            up = time.monotonic() - t0
            served = _run("served", _config(Path(d) / "served", docs, args.probes, args.rounds, base),
                          {**env, KEY_ENV: key})
    served["server_start_seconds"] = up
    ratio = served["seconds"] / local["seconds"] if local["seconds"] else None
    out = {"probes": args.probes, "rounds": args.rounds, "threads": THREADS, "in_process": local, "served": served,
           "served_over_in_process": ratio}
    print(f"served vs in-process: the same tune ({args.probes} probes, {args.rounds} round(s), {THREADS} llama.cpp "
          "threads, fresh workdirs), one after the other")
    for r in (local, served):
        print(f"  {r['run']}: {r['seconds']:.1f} s, rc {r['rc']}, {r['rounds']} rounds in the report, "
              f"{r['lm_calls']} LM calls, judge valid rate {r['judge_valid_rate']}; {r['wall_line']}")
    print(f"  served server start-up {up:.1f} s (not in the served time); served / in-process: "
          + (f"x{ratio:.2f}" if ratio else "n/a"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2), encoding="utf-8")
    ok = local["rc"] == 0 and served["rc"] == 0
    if not ok:
        print("served bench: FAILED (a tune exited non-zero)\n" + local["stderr_tail"] + served["stderr_tail"],
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
