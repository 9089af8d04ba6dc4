"""The one place the data flows: probes -> rounds -> promotion -> held-out test report.

Tracking observes the loop through the ``Observer`` protocol; this module never imports mlflow.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import probes as P
from .config import Config, initial_params
from .corpus import Corpus, chunk_corpus, load_corpus
from .gate import decide, gain, min_detectable_effect, paired_diffs
from .index import Embedder, Index
from .judge import Judge
from .lm import CallLedger, Models, check_credentials
from .optimize import Optimizer
from .parallel import run_ordered
from .rag import RAG, load_system
from .objective import Objective, checks_only
from .records import Evaluation, GateDecision, Judgment, Params, Probe, Round, Split
from .rubric import Rubric, load_rubric
from .trust import Monitor, Verdict, objective_for, preflight

log = logging.getLogger(__name__)
DEMO_POOL = 8  # train items kept as few-shot demonstrations (the `demos` param picks from them)
Progress = Callable[..., Iterable[Any]]


class Observer(Protocol):
    def start(self, cfg: Config, rubric: Rubric, probes: list[Probe], stats: dict[str, Any]) -> None: ...
    def round(self, rnd: Round) -> None: ...
    def finish(self, result: TuneResult) -> None: ...
    def abort(self, reason: str) -> None: ...


@dataclass
class TuneResult:
    rounds: list[Round]
    best: Round
    test_baseline: Evaluation
    test_best: Evaluation
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def val_gain(self) -> float:
        return (self.best.val.overall() or 0.0) - (self.rounds[0].val.overall() or 0.0)

    @property
    def test_gain(self) -> float:
        return (self.test_best.overall() or 0.0) - (self.test_baseline.overall() or 0.0)


class Session:
    """The parts of one run, built once: corpus, index, models, system under test, judge."""

    def __init__(self, cfg: Config, models: Models | None = None):
        check_credentials(cfg)
        self.cfg = cfg
        self.rubric = load_rubric(cfg.rubric)
        if cfg.probes.file is not None:  # a bad line is a clear error now, not after minutes of synthesis
            P.load_user_probes(cfg.probes.file)
        self.corpus: Corpus = load_corpus(cfg.corpus.path, cfg.corpus.glob, cfg.source or "config",
                                          cfg.corpus.follow_symlinks, cfg.corpus.max_file_mb)
        self.embedder = Embedder(cfg.embedder)
        self.index = Index(self.corpus, self.embedder, cfg.workdir / "chroma")
        self.models = models or Models(cfg)
        self.sut = (RAG(self.index, self.models.role("sut")) if cfg.sut.system == "builtin"
                    else load_system(cfg.sut.system))
        judges = self.models.judges() if self.rubric.needs_judge_model() else None
        if not isinstance(self.models, Models):  # built elsewhere (a test's fakes): count their calls too
            named = [(n, self.models.role(n)) for n in ("generator", "sut", "optimizer")]
            named += [("judge" if i == 0 else f"judge{i + 1}", r) for i, r in enumerate(judges or [])]
            for name, role in named:
                self.ledger.attach(role, name)
        self.judge = Judge(self.rubric, judges, seed=cfg.seed, method=cfg.judge.method,
                           flag_cap=cfg.judge.flag_cap, embedder=self.embedder, aggregate=cfg.judge.aggregate)
        try:  # a judge that cannot score (or unreadable trust labels) stops the run before any work
            preflight(self.judge, cfg)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if isinstance(self.models, Models):
            self.models.close()

    @property
    def ledger(self) -> CallLedger:
        """The LM-call ledger (a fresh one when the models were handed in without one, as in tests)."""
        if not hasattr(self.models, "ledger"):
            self.models.ledger = CallLedger()  # type: ignore[union-attr]
        return self.models.ledger  # type: ignore[union-attr]

    def retrieval_objective(self, probes: list[Probe]) -> Callable[[Params], float | None] | None:
        """Stage 1's cheap objective for the built-in pipeline, no LM call (questions embedded once): the
        mean of hit@k (the share of probes whose known source is among the ``top_k`` chunks: the
        rubric's retrieval check itself) and the mean reciprocal rank of the source in the whole ranking
        (how well a chunking and fusion rank it, whatever k)."""
        if not isinstance(self.sut, RAG):
            return None
        from .retrieval import DEPTH, retrieval_scores

        usable = [p for p in probes if p.source_doc]

        def score(setting: Params) -> float | None:
            if not usable:
                return None
            hit = retrieval_scores(self.index, usable, setting).get("hit")
            mrr = retrieval_scores(self.index, usable, {**setting, "top_k": DEPTH}).get("mrr")
            return None if hit is None or mrr is None else (float(hit) + float(mrr)) / 2

        return score

    def set_demos(self, train: Evaluation, objective: Objective) -> None:
        """Few-shot demonstrations for the built-in pipeline's ``demos`` param: the best train items
        of the baseline on ``objective`` (fixed for the tune, so every candidate sees the same pool)."""
        if isinstance(self.sut, RAG) and "demos" in self.cfg.sut.params:
            from .rag import make_demos

            self.sut.set_demos(make_demos(list(train.judgments), objective.item, DEMO_POOL))

    def evaluate(self, params: Params, probes: list[Probe], split: Split, progress: Progress,
                 limit: int | None = None, llm_items: int | None = None,
                 stop: Callable[[list[Judgment]], bool] | None = None, steps: Sequence[int] = ()) -> Evaluation:
        """Answer and judge the probes of ``split`` in their fixed order (the first ``limit`` only, if
        given). ``llm_items``: only the first that many are scored by the judge model (a monitoring
        sample). ``stop`` is asked after each of ``steps`` items; True ends the evaluation there (the
        candidate was pruned). Per-item failures are recorded; all failing raises.

        Concurrency: the items run in batches, the answers of a batch in a pool of the SUT role's
        ``concurrency`` (the built-in pipeline only; a system of your own answers one item at a time),
        then its judgments in a pool of the judge's. A batch never crosses a step, every judge fence token
        is drawn in item order before the batch is judged (``Judge.reserve``), and results are collected
        in item order, so the evaluation (order, prompts, cache keys, seeds) is the sequential one.

        A role whose calls fail (after their retries) on more than its ``max_failed_share`` of the items
        stops the tune (``spend.TuneStopped``), as soon as that share is certain to be exceeded."""
        import dspy

        items = [p for p in probes if p.split == split][:limit]
        ledger = self.ledger
        sut_workers = self.models.role("sut").concurrency if isinstance(self.sut, RAG) else 1
        judge_workers = self.judge.concurrency
        size = max(sut_workers, judge_workers)
        bounds = sorted({k for k in steps if 0 < k < len(items)} | {len(items)}) if stop is not None else [len(items)]
        ticks = iter(progress(items, desc=f"{split:5s}", leave=False))
        failed: dict[str, int] = {}

        def answer(p: Probe) -> tuple[Any, set[str]]:
            ledger.item()
            return self.sut.answer(p, params), ledger.failed_roles()

        def grade(job: tuple[Any, list[str], bool]) -> tuple[Judgment, set[str]]:
            ledger.item()
            return self.judge.judge(job[0], llm=job[2], tokens=job[1]), ledger.failed_roles()

        judgments: list[Judgment] = []
        start = 0
        with dspy.context(usage_tracker=ledger):  # tokens and dollars of each billed call, by role
            while start < len(items):
                end = min(start + size, next(b for b in bounds if b > start))
                answered = run_ordered(answer, items[start:end], sut_workers)
                llm = [llm_items is None or k < llm_items for k in range(start, end)]
                jobs = [(a, self.judge.reserve(a, use), use) for (a, _), use in zip(answered, llm)]  # item order
                graded = run_ordered(grade, jobs, judge_workers)
                for (_, seen_answering), (j, seen_judging) in zip(answered, graded):
                    judgments.append(j)
                    next(ticks, None)
                    for role in seen_answering | seen_judging:
                        failed[role] = failed.get(role, 0) + 1
                self._check_failures(failed, len(items), split)
                start = end
                if stop is not None and len(judgments) in steps and len(judgments) < len(items) and stop(judgments):
                    break
        next(ticks, None)  # a progress bar counts an item when asked for the next one: count the last
        ev = Evaluation(params=params, split=split, judgments=tuple(judgments))
        if judgments and all(j.answer.error for j in judgments):
            raise RuntimeError(f"every {split} item failed; first error: {judgments[0].answer.error}")
        return ev

    def _check_failures(self, failed: dict[str, int], n_items: int, split: str) -> None:
        """Stop the tune when a role's failed items exceed its ``max_failed_share`` of the split."""
        from .spend import TuneStopped

        for role, n in failed.items():
            share = self._failed_share(role)
            if n > share * n_items:
                raise TuneStopped(f"{role} calls failed on {n} of {n_items} {split} items (more than "
                                  f"max_failed_share {share:g}, after retries); last error: "
                                  f"{self.ledger.errors.get(role, '?')}"[:400])

    def _failed_share(self, role: str) -> float:
        """The ``max_failed_share`` of the role named ``role`` (0.5 for a role this session did not build)."""
        roles = [self.models.role("sut")] + list(self.judge.panel.roles if self.judge.panel else [])
        return next((r.max_failed_share for r in roles if r.name == role and hasattr(r, "max_failed_share")), 0.5)

    def probes(self, progress: Progress) -> tuple[list[Probe], dict[str, Any]]:
        """Synthesize (or reuse, if the same corpus/generator/seed made them before) and split."""
        cfg = self.cfg
        gen = cfg.models.generator
        # Your own probes are part of the key: editing the file makes new splits.
        user_file = "-u" + hashlib.sha256(cfg.probes.file.read_bytes()).hexdigest()[:8] if cfg.probes.file else ""
        key = (f"{self.corpus.digest}-{gen.model.replace('/', '_')}-{cfg.probes.count}-{cfg.seed}"
               f"-{cfg.probes.split.train}-{cfg.probes.split.val}-{cfg.probes.split.test}-v{P.SYNTH_VERSION}{user_file}")
        cache = cfg.workdir / "probes" / f"{key}.jsonl"
        params = initial_params(cfg)
        if cache.is_file():
            probes = P.load_jsonl(cache)
            stats: dict[str, Any] = {"probes_reused": str(cache.name)}
        else:
            base = chunk_corpus(self.corpus, int(params.get("chunk_size", 800)), int(params.get("chunk_overlap", 0)))
            synth, stats = P.synthesize(base, self.models.role("generator"), cfg.probes.count, cfg.seed,
                                        cfg.probes.count * cfg.probes.max_attempts_factor,
                                        progress=lambda it: progress(it, desc="probes", total=cfg.probes.count))
            user = P.load_user_probes(cfg.probes.file) if cfg.probes.file else []
            if len(synth + user) < 6:
                raise RuntimeError(f"only {len(synth + user)} usable probes were synthesized (need >= 6); "
                                   f"stats: {stats}")
            probes = P.assign_splits(synth + user, cfg.probes.split, cfg.seed)
            P.save_jsonl(probes, cache)
        if len(probes) < 6:
            raise RuntimeError(f"only {len(probes)} usable probes were synthesized (need >= 6); stats: {stats}")
        stats = {**stats, "probes": len(probes), **{f"probes_{s}": sum(p.split == s for p in probes) for s in P.SPLITS}}
        return probes, stats


def tune(session: Session, rounds: int, observer: Observer, progress: Progress) -> TuneResult:
    """``run_tune`` with the spend caps of the config checked before every LM call (``spend.Caps``) and
    the ledger as DSPy's usage tracker (tokens and dollars of every billed call, by role)."""
    import dspy

    from .spend import Caps

    session.ledger.limit(Caps.of(session.cfg))
    with dspy.context(usage_tracker=session.ledger):
        return run_tune(session, rounds, observer, progress)


def run_tune(session: Session, rounds: int, observer: Observer, progress: Progress) -> TuneResult:
    """Probes -> baseline -> stage 1 (retrieval screened on the cheap objective, no LM call) -> per
    round: proposal, validation answers on growing slices (a clearly losing candidate is pruned),
    judgments, trust verdict, objective, gate -> the held-out test, touched once at the end to report.
    ``rounds`` caps the candidates; ``optimizer.budget.calls`` may end the tune sooner."""
    cfg, rubric, cap, spec = session.cfg, session.rubric, session.judge.flag_cap, session.cfg.optimizer
    ledger = session.ledger
    ledger.stage = "probes"
    probes, stats = session.probes(progress)
    stats["index_collections_built_before_rounds"] = len(session.index.built)
    stats["corpus_skipped"] = len(session.corpus.skipped)
    if session.corpus.skipped:
        stats["corpus_skipped_because"] = session.corpus.skipped_summary()
    observer.start(cfg, rubric, probes, stats)
    n_val = sum(p.split == "val" for p in probes)
    plan = getattr(progress, "plan", None)  # an overall bar (runtime.TuneProgress) learns the tune's size
    if plan is not None:
        n_train = sum(p.split == "train" for p in probes)
        n_train = min(n_train, spec.train_items) if spec.train_items else n_train
        plan(n_train + (rounds + 1) * n_val + 2 * sum(p.split == "test" for p in probes))
    # The optimizer is built from train/val material only: it is never handed a test probe.
    optimizer = Optimizer(cfg.sut.params, rubric, session.models.role("optimizer"), spec, cfg.seed,
                          cheap=session.retrieval_objective([p for p in probes if p.split != "test"]))
    # GEPA's minibatches (hosted optimizer model): train probes only; LLM scores only where they count
    optimizer.evaluate_train = lambda ps, items: list(session.evaluate(
        ps, items, "train", progress, llm_items=0 if objective.kind == "checks" else None).judgments)
    monitor = Monitor(rubric, session.judge, cfg.judge, cfg.seed)
    pairwise_mode = cfg.judge.mode == "pairwise" and bool(rubric.llm_criteria())
    stop_reason = ""
    try:
        params = initial_params(cfg)
        ledger.stage = "baseline"
        base = Round(index=0, params=params, train=session.evaluate(params, probes, "train", progress,
                                                                     limit=spec.train_items),
                     val=session.evaluate(params, probes, "val", progress),
                     gate=GateDecision(promote=True, reason="baseline"), incumbent_index=0)
        ledger.stage = "judge monitoring"
        monitor.observe([base.train, base.val])
        monitor.retest([base.train, base.val])
        monitor.calibrate()
        verdict = monitor.verdict()
        trusted = verdict.trusted
        _say_trust(verdict)
        objective = objective_for(rubric, verdict, cfg.judge.mode, cap)
        optimizer.steer(objective)
        session.set_demos(base.train, objective)
        base = base.model_copy(update={"judge_stats": dict(monitor.stats), "trusted": trusted})
        history = [base]
        observer.round(base)
        for i in range(1, rounds + 1):
            if ledger.exhausted:  # a cap reached during the last candidate: it finished, no new one starts
                stop_reason = f"{ledger.exhausted} after {i - 1} candidates"
                log.warning("%s", stop_reason)
                break
            ledger.stage = "optimizer"
            cand, notes = optimizer.propose(history)
            incumbent = next(r for r in history if r.index == history[-1].incumbent_index)
            # below the trust bar the judge model scores only a monitoring sample: its scores cannot count
            llm_items = cfg.judge.monitor_sample if objective.kind == "checks" else None
            ledger.stage = "stage 2"
            val = session.evaluate(cand, probes, "val", progress, llm_items=llm_items, steps=spec.slices,
                                   stop=lambda js: optimizer.checkpoint(js, incumbent.val, cfg.gate))
            empty = Evaluation(params=cand, split="train", judgments=())
            if len(val.judgments) < n_val:  # pruned: recorded, never compared or promoted
                monitor.observe([val])
                rnd = Round(index=i, params=cand, train=empty, val=val, incumbent_index=incumbent.index,
                            gate=GateDecision(promote=False, reason=optimizer.pruned_reason),
                            notes=notes, judge_stats=dict(monitor.stats), trusted=trusted, pruned=True)
                history.append(rnd)
                observer.round(rnd)
                continue
            ledger.stage = "judge monitoring"
            # pairwise: every validation probe compared (the promotion signal); else a swap-test sample
            compared = monitor.compare(val, incumbent.val, None if pairwise_mode else cfg.judge.swap_sample)
            monitor.observe([val])
            was = verdict.state
            verdict = monitor.verdict()
            trusted = verdict.trusted
            if verdict.state != was:
                _say_trust(verdict)
            objective = objective_for(rubric, verdict, cfg.judge.mode, cap)
            optimizer.steer(objective)
            judged_on = objective.with_prefs(compared.get("prefs", {})) if objective.kind == "pairwise" else objective
            gate = decide(val, incumbent.val, judged_on, cfg.gate, cfg.seed + i)
            train = empty
            if gate.promote:  # the new incumbent's train failures feed the next rewrites
                ledger.stage = "stage 2"
                train = session.evaluate(cand, probes, "train", progress, limit=spec.train_items, llm_items=llm_items)
            stats_now = {**monitor.stats, **({"swap/round_consistency": compared["consistency"]}
                                             if compared.get("consistency") is not None else {})}
            rnd = Round(index=i, params=cand, train=train, val=val, gate=gate,
                        incumbent_index=i if gate.promote else incumbent.index, notes=notes,
                        judge_stats=stats_now, trusted=trusted)
            history.append(rnd)
            observer.round(rnd)
        best = next(r for r in history if r.index == history[-1].incumbent_index)
        # The held-out split is touched only here, after every choice is made, and only to report.
        ledger.stage = "test"
        llm_items = cfg.judge.monitor_sample if objective.kind == "checks" else None
        test_base = session.evaluate(base.params, probes, "test", progress, llm_items=llm_items)
        test_best = test_base if best.index == 0 else session.evaluate(best.params, probes, "test", progress,
                                                                        llm_items=llm_items)
        stats["index_collections_built"] = len(session.index.built)
        stats["bm25_indexes_built"] = len(session.index.bm25.built) if hasattr(session.index, "bm25") else 0
        stats["texts_embedded"] = session.embedder.encoded
        stats.update({f"judge/{k}": v for k, v in monitor.stats.items()})
        stats["judge/trusted"] = float(trusted)
        stats.update(_evidence(history, best, test_base, test_best, objective, checks_only(rubric, cap), cfg, n_val,
                               bool(monitor.model_scored)))
        stats.update({f"calls/{k.replace(' ', '_')}": v for k, v in ledger.by_stage.items()})
        stats["calls/total"] = ledger.total
        if spec.budget.calls is not None:
            stats["calls/budget"] = spec.budget.calls
        stats.update(_spend_stats(ledger))
        stats.update({f"search/{k}": v for k, v in optimizer.ledger().items()})
        moves = history[1:]
        stats["rounds/search"] = sum(any(n.startswith("search") for n in r.notes) for r in moves)
        stats["rounds/rewrite"] = len(moves) - stats["rounds/search"]
        stats["rounds/pruned"] = sum(r.pruned for r in moves)
        stats["rounds/promoted"] = sum(r.gate.promote for r in moves)
        stats.update({f"alarms/{k}": v for k, v in optimizer.alarms.items()})
        if stop_reason:
            stats["stopped_because"] = stop_reason
        stats["judge/verdict"] = verdict  # the report's trust table
        if not trusted:
            stats["judge/untrusted_because"] = f"{verdict.state}: " + "; ".join(verdict.reasons)
        result = TuneResult(rounds=history, best=best, test_baseline=test_base, test_best=test_best, stats=stats)
    except BaseException as err:
        observer.abort(f"{type(err).__name__}: {err}")
        raise
    observer.finish(result)
    return result


def _spend_stats(ledger: CallLedger) -> dict[str, Any]:
    """What each role spent (``calls/role/<role>``, ``tokens/<role>``, ``usd/<role>``) and in all, and the
    calls that failed after their retries (``failures/<role>``)."""
    out: dict[str, Any] = {}
    for role, s in sorted(ledger.spend.items()):
        out.update({f"calls/role/{role}": s.calls, f"tokens/{role}": s.tokens, f"usd/{role}": s.usd})
    total = ledger.totals()
    out.update({"tokens/total": total.tokens, "usd/total": total.usd})
    out.update({f"failures/{role}": n for role, n in sorted(ledger.failed.items())})
    return out


def _evidence(history: list[Round], best: Round, test_base: Evaluation, test_best: Evaluation,
              objective: Objective, checks: Objective, cfg: Config, n_val: int, model_scored: bool) -> dict[str, Any]:
    """The proof of a tune: the best's gain over the baseline with its paired-bootstrap interval on
    validation (tuned on) and on the held-out test (never shown), on the objective that decided and on
    the checks alone; and the validation split's minimum detectable effect at the gate's confidence,
    from the spread of the paired gains measured this tune."""
    import statistics

    base = history[0]
    out: dict[str, Any] = {"gain/objective": objective.kind}
    pairs = [("val", base.val, best.val), ("test", test_base, test_best)]
    for on, obj in (("", objective), ("checks/", checks)) if model_scored and checks.criteria else (("", objective),):
        for split, a, b in pairs:
            g = gain(b, a, obj, cfg.gate, cfg.seed) if best.index else None
            if g is not None:
                out.update({f"{on}gain/{split}_{k}": v for k, v in g.items()})
            for label, ev in (("baseline", a), ("best", b)):
                if (v := obj.mean(ev)) is not None:
                    out[f"{on or 'objective/'}{split}_{label}"] = v
    # the paired gains of every candidate over the incumbent it faced (pruned ones on the items they reached)
    by_index = {r.index: r for r in history}
    diffs = []
    for k in range(1, len(history)):
        diffs += paired_diffs(history[k].val, by_index[history[k - 1].incumbent_index].val, objective)
    if len(diffs) >= 2:
        sd = statistics.stdev(diffs)
        out["gate/paired_sd"] = sd
        if (mde := min_detectable_effect(sd, n_val, cfg.gate.confidence)) is not None:
            out["gate/min_detectable_effect"] = mde
    out["gate/n_val"] = n_val
    return out


def _say_trust(verdict: Verdict) -> None:
    why = "; ".join(verdict.reasons)
    if verdict.trusted:
        log.info("judge within the trust bar")
    elif verdict.state == "unproven":
        log.warning("judge unproven (%s): promoting on deterministic criteria only until it is measured", why)
    else:
        log.warning("JUDGE BELOW THE TRUST BAR (%s): promoting on deterministic criteria only", why)


def write_best(path: Path, params: Params, demos: list[Any] | None = None) -> None:
    """The promoted params (``eval --params best``) and, beside them, the demonstration pool they were
    tuned with (``<name>.demos.jsonl``), so ``demos`` means the same prompt in ``eval``."""
    import json

    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"params": params}, sort_keys=True, allow_unicode=True), encoding="utf-8")
    pool = path.with_suffix(".demos.jsonl")
    if demos:
        pool.write_text("".join(json.dumps(d.model_dump(), ensure_ascii=False) + "\n" for d in demos), encoding="utf-8")
    elif pool.exists():
        pool.unlink()


def load_demos(session: Session, params_path: Path) -> None:
    """Hand ``eval`` the demonstration pool saved beside a params file, if there is one."""
    import json

    pool = params_path.with_suffix(".demos.jsonl")
    if isinstance(session.sut, RAG) and pool.is_file():
        from .rag import Demo

        session.sut.set_demos([Demo(**json.loads(line)) for line in pool.read_text(encoding="utf-8").splitlines()
                               if line.strip()])


def eval_rows(ev: Evaluation) -> list[dict[str, Any]]:
    """``selftune eval``'s output: per question, the answer, its contexts and every score."""
    return [{"question": j.answer.probe.question, "answer": j.answer.text,
             "contexts": [c.text for c in j.answer.contexts], "error": j.answer.error, "overall": j.overall,
             "scores": {n: {"score": s.value, "raw": s.raw, "status": s.status, "rationale": s.rationale}
                        for n, s in j.scores.items()}} for j in ev.judgments]
