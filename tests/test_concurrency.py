"""Concurrency (``models.<role>.concurrency``) gives a sequential run's results: the same probes, the
same judgments in the same order, the same requests (prompts, fence tokens, hence cache keys), the
same ledger. Every role is a served model on a real OpenAI-compatible server on 127.0.0.1
(``selftune.scripted``), called through the real ``ServedEngine`` / ``dspy.LM`` path. Not timed:
the server counts how many requests it handled at once. (The speed-up is measured by ``make bench``.)"""

import json
from collections import Counter

import pytest

from conftest import ROOT, no_progress, write_config
from selftune.config import initial_params, load_config
from selftune.errors import InputError
from selftune.loop import Session
from selftune.scripted import ScriptedServer


def served_models(base: str, concurrency: int, **extra) -> str:
    spec = {"model": "openai/stub", "api_base": base, "cache": False, "concurrency": concurrency, **extra}
    return json.dumps({r: spec for r in ("generator", "sut", "judge", "optimizer")})


def run_split(tmp_path, corpus_dir, concurrency):
    tmp_path.mkdir()
    with ScriptedServer(latency=0.05) as server:
        cfg = load_config(write_config(tmp_path, corpus_dir, models=served_models(server.base, concurrency)))
        session = Session(cfg)
        try:
            probes, stats = session.probes(no_progress)
            before = len(server.bodies)  # the judge's probe call and the probe questions
            ev = session.evaluate(initial_params(cfg), probes, "train", no_progress)
            split_bodies = server.bodies[before:]
        finally:
            session.close()
        ledger = session.ledger
        return {"probes": probes, "stats": stats, "ev": ev, "bodies": server.bodies, "split": split_bodies,
                "inflight": server.max_inflight, "by_role": dict(ledger.by_role),
                "tokens": {r: s.tokens for r, s in ledger.spend.items()}}


def _plain(ev):
    return [j.model_dump(exclude={"answer": {"seconds"}}) for j in ev.judgments]


def test_concurrent_answers_judgments_and_probes_equal_the_sequential_run(tmp_path, corpus_dir):
    seq = run_split(tmp_path / "seq", corpus_dir, 1)
    par = run_split(tmp_path / "par", corpus_dir, 8)
    assert seq["inflight"] == 1 and par["inflight"] > 1  # the pools did overlap calls; one at a time did not
    assert par["probes"] == seq["probes"] and par["stats"] == seq["stats"]
    assert len(seq["ev"].judgments) >= 3
    assert _plain(par["ev"]) == _plain(seq["ev"])  # same items, same order, same scores and rationales
    # the same requests (prompts with their fence tokens: the cache keys), each as often
    key = lambda b: json.dumps(b, sort_keys=True)  # noqa: E731
    assert Counter(map(key, par["bodies"])) == Counter(map(key, seq["bodies"]))
    # and the split's judge requests were sent in item order when one at a time
    judged = [b for b in seq["split"] if b.get("response_format")]
    assert len(judged) == len(seq["ev"].judgments)
    assert par["by_role"] == seq["by_role"] and par["tokens"] == seq["tokens"] and sum(seq["tokens"].values()) > 0


LABELS = ROOT / "datasets/labels/pyref-labels.jsonl"


def monitor_run(tmp_path, corpus_dir, concurrency):
    """Judge monitoring on served models: test-retest after a baseline, a swap test of a candidate against
    it, and kappa with human labels (``judge.trust.labels``). Returns its outcomes, the monitoring requests
    and, per check, the most requests the server had in flight."""
    from selftune.trust import Monitor

    tmp_path.mkdir()
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(LABELS.read_text(encoding="utf-8").splitlines(keepends=True)[:10]), encoding="utf-8")
    with ScriptedServer(latency=0.05) as server:
        cfg = load_config(write_config(tmp_path, corpus_dir, models=served_models(server.base, concurrency),
                                       judge=f"{{retest_sample: 6, swap_sample: 6, trust: {{labels: {labels}}}}}"))
        session = Session(cfg)
        try:
            probes, _ = session.probes(no_progress)
            params = initial_params(cfg)
            base = [session.evaluate(params, probes, split, no_progress) for split in ("train", "val")]
            cand = session.evaluate({**params, "top_k": 1}, probes, "val", no_progress)
            monitor = Monitor(session.rubric, session.judge, cfg.judge, cfg.seed)
            before, inflight, out = server.requests, {}, {}
            for check, run in (("retest", lambda: monitor.retest(base)),
                               ("compared", lambda: monitor.compare(cand, base[1], cfg.judge.swap_sample)),
                               ("kappa", monitor.calibrate)):
                server.max_inflight = 0
                out[check] = run()
                inflight[check] = server.max_inflight
            return {**out, "stats": dict(monitor.stats), "bodies": server.bodies[before:], "inflight": inflight,
                    "labelled": [json.loads(line)["answer"] for line in labels.read_text().splitlines()]}
        finally:
            session.close()


def test_judge_monitoring_runs_in_the_judges_pool_with_the_sequential_outcomes(tmp_path, corpus_dir):
    seq = monitor_run(tmp_path / "seq", corpus_dir, 1)
    par = monitor_run(tmp_path / "par", corpus_dir, 8)
    checks = ("retest", "compared", "kappa")
    # test-retest, swap and label calls overlapped, each check on its own; one at a time did not
    assert all(seq["inflight"][c] == 1 and par["inflight"][c] > 1 for c in checks), (seq["inflight"], par["inflight"])
    assert seq["retest"]["retest/n"] >= 3 and seq["compared"]["n"] >= 2 and seq["kappa"]["kappa/grounded/n"] == 10
    assert all(par[c] == seq[c] for c in checks) and par["stats"] == seq["stats"]
    # the same requests (fence tokens, hence cache keys), each as often; one at a time, in item order
    key = lambda b: json.dumps(b, sort_keys=True)  # noqa: E731
    assert Counter(map(key, par["bodies"])) == Counter(map(key, seq["bodies"]))
    pair = [b for b in seq["bodies"] if "winner" in json.dumps(b.get("response_format"))]
    labelled = seq["bodies"][-len(seq["labelled"]):]
    assert len(pair) == 2 * seq["compared"]["n"]
    assert len(seq["bodies"]) == len(pair) + seq["retest"]["retest/n"] + len(labelled)
    assert all(json.dumps(answer[:40])[1:-1] in json.dumps(b) for answer, b in zip(seq["labelled"], labelled))


def test_the_local_model_stays_serialized(tmp_path, corpus_dir):
    with pytest.raises(InputError, match=r"models.judge.concurrency: expected 1 .* llama.cpp runs one call at a time"):
        load_config(write_config(tmp_path, corpus_dir, models="{judge: {model: local, concurrency: 4}}"))
    cfg = load_config(write_config(tmp_path, corpus_dir, models="{judge: {model: local}, sut: {model: openai/x}}"))
    assert cfg.models.judge.workers() == 1 and cfg.models.sut.workers() == 8


def test_local_threads_are_configurable(tmp_path, corpus_dir):
    from selftune.lm import Models

    cfg = load_config(write_config(tmp_path, corpus_dir, models="{local: {threads: 1}}"))
    assert cfg.models.local.threads == 1 and Models(cfg).engines.threads == 1
    with pytest.raises(InputError, match=r"models.local.threads"):
        load_config(write_config(tmp_path, corpus_dir, models="{local: {threads: 0}}"))
