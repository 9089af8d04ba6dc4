"""The one place the data flows: probes -> rounds -> promotion -> held-out test report.

Tracking observes the loop through the ``Observer`` protocol; this module never imports mlflow.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import probes as P
from .config import Config, initial_params
from .corpus import Corpus, chunk_corpus, load_corpus
from .gate import decide
from .index import Embedder, Index
from .judge import Judge
from .lm import Models, check_credentials
from .optimize import Optimizer
from .rag import RAG, load_system
from .objective import checks_only
from .records import Evaluation, GateDecision, Params, Probe, Round, Split
from .rubric import Rubric, load_rubric
from .trust import Monitor, objective_for

log = logging.getLogger(__name__)
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
        self.corpus: Corpus = load_corpus(cfg.corpus.path, cfg.corpus.glob, cfg.source or "config")
        self.embedder = Embedder(cfg.embedder)
        self.index = Index(self.corpus, self.embedder, cfg.workdir / "chroma")
        self.models = models or Models(cfg)
        self.sut = (RAG(self.index, self.models.role("sut")) if cfg.sut.system == "builtin"
                    else load_system(cfg.sut.system))
        judges = self.models.judges() if self.rubric.needs_judge_model() else None
        self.judge = Judge(self.rubric, judges, seed=cfg.seed, method=cfg.judge.method,
                           flag_cap=cfg.judge.flag_cap, embedder=self.embedder, aggregate=cfg.judge.aggregate)

    def close(self) -> None:
        if isinstance(self.models, Models):
            self.models.close()

    def evaluate(self, params: Params, probes: list[Probe], split: Split, progress: Progress) -> Evaluation:
        """Answer and judge every probe. Per-item failures are recorded; all failing raises."""
        items = [p for p in probes if p.split == split]
        judgments = []
        for p in progress(items, desc=f"{split:5s}", leave=False):
            judgments.append(self.judge.judge(self.sut.answer(p, params)))
        ev = Evaluation(params=params, split=split, judgments=tuple(judgments))
        if items and all(j.answer.error for j in judgments):
            raise RuntimeError(f"every {split} item failed; first error: {judgments[0].answer.error}")
        return ev

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
                raise RuntimeError(f"only {len(synth + user)} usable probes were synthesized (need >= 6); stats: {stats}")
            probes = P.assign_splits(synth + user, cfg.probes.split, cfg.seed)
            P.save_jsonl(probes, cache)
        if len(probes) < 6:
            raise RuntimeError(f"only {len(probes)} usable probes were synthesized (need >= 6); stats: {stats}")
        stats = {**stats, "probes": len(probes), **{f"probes_{s}": sum(p.split == s for p in probes) for s in P.SPLITS}}
        return probes, stats


def tune(session: Session, rounds: int, observer: Observer, progress: Progress) -> TuneResult:
    """Probes -> baseline -> per round: proposal, answers, judgments, trust verdict, objective, gate
    -> the held-out test, touched once at the end to report."""
    cfg, rubric, cap = session.cfg, session.rubric, session.judge.flag_cap
    probes, stats = session.probes(progress)
    plan = getattr(progress, "plan", None)  # an overall bar (runtime.TuneProgress) learns the tune's size
    if plan is not None:
        plan({s: sum(p.split == s for p in probes) for s in P.SPLITS}, rounds)
    stats["index_collections_built_before_rounds"] = len(session.index.built)
    observer.start(cfg, rubric, probes, stats)
    # The optimizer is built from train/val material only: it is never handed a Probe list.
    optimizer = Optimizer(cfg.sut.params, rubric, session.models.role("optimizer"), cfg.optimizer, cfg.seed)
    monitor = Monitor(rubric, session.judge, cfg.judge, cfg.seed)
    pairwise_mode = cfg.judge.mode == "pairwise" and bool(rubric.llm_criteria())
    try:
        params = initial_params(cfg)
        base = Round(index=0, params=params, train=session.evaluate(params, probes, "train", progress),
                     val=session.evaluate(params, probes, "val", progress),
                     gate=GateDecision(promote=True, reason="baseline"), incumbent_index=0)
        monitor.observe([base.train, base.val])
        monitor.retest([base.train, base.val])
        trusted, why = monitor.verdict()
        _say_trust(trusted, why)
        objective = objective_for(rubric, trusted, why, cfg.judge.mode, cap)
        optimizer.steer(objective)
        base = base.model_copy(update={"judge_stats": dict(monitor.stats), "trusted": trusted})
        history = [base]
        observer.round(base)
        for i in range(1, rounds + 1):
            cand, notes = optimizer.propose(history)
            incumbent = next(r for r in history if r.index == history[-1].incumbent_index)
            train = session.evaluate(cand, probes, "train", progress)
            val = session.evaluate(cand, probes, "val", progress)
            # pairwise: every validation probe compared (the promotion signal); else a swap-test sample
            compared = monitor.compare(val, incumbent.val, None if pairwise_mode else cfg.judge.swap_sample)
            monitor.observe([train, val])
            was_trusted = trusted
            trusted, why = monitor.verdict()
            if trusted != was_trusted:
                _say_trust(trusted, why)
            objective = objective_for(rubric, trusted, why, cfg.judge.mode, cap)
            optimizer.steer(objective)
            judged_on = objective.with_prefs(compared.get("prefs", {})) if objective.kind == "pairwise" else objective
            gate = decide(val, incumbent.val, judged_on, cfg.gate, cfg.seed + i)
            stats_now = {**monitor.stats, **({"swap/round_consistency": compared["consistency"]}
                                             if compared.get("consistency") is not None else {})}
            rnd = Round(index=i, params=cand, train=train, val=val, gate=gate,
                        incumbent_index=i if gate.promote else incumbent.index, notes=notes,
                        judge_stats=stats_now, trusted=trusted)
            history.append(rnd)
            observer.round(rnd)
        best = next(r for r in history if r.index == history[-1].incumbent_index)
        # The held-out split is touched only here, after every choice is made, and only to report.
        test_base = session.evaluate(base.params, probes, "test", progress)
        test_best = test_base if best.index == 0 else session.evaluate(best.params, probes, "test", progress)
        stats["index_collections_built"] = len(session.index.built)
        stats["texts_embedded"] = session.embedder.encoded
        stats.update({f"judge/{k}": v for k, v in monitor.stats.items()})
        stats["judge/trusted"] = float(trusted)
        checks = checks_only(rubric, cap)
        if monitor.model_scored and checks.criteria:
            # the same gains on the checks alone: the signal promotion used when the judge was untrusted
            for key, ev in (("val_baseline", base.val), ("val_best", best.val),
                            ("test_baseline", test_base), ("test_best", test_best)):
                if (v := checks.mean(ev)) is not None:
                    stats[f"checks/{key}"] = v
        if not trusted:
            stats["judge/untrusted_because"] = "; ".join(why)
        result = TuneResult(rounds=history, best=best, test_baseline=test_base, test_best=test_best, stats=stats)
    except BaseException as err:
        observer.abort(f"{type(err).__name__}: {err}")
        raise
    observer.finish(result)
    return result


def _say_trust(trusted: bool, why: list[str]) -> None:
    if trusted:
        log.info("judge within the trust bar")
    else:
        log.warning("JUDGE BELOW THE TRUST BAR (%s): promoting on deterministic criteria only", "; ".join(why))


def write_best(path: Path, params: Params) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"params": params}, sort_keys=True, allow_unicode=True), encoding="utf-8")


def eval_rows(ev: Evaluation) -> list[dict[str, Any]]:
    """``selftune eval``'s output: per question, the answer, its contexts and every score."""
    return [{"question": j.answer.probe.question, "answer": j.answer.text,
             "contexts": [c.text for c in j.answer.contexts], "error": j.answer.error, "overall": j.overall,
             "scores": {n: {"score": s.value, "raw": s.raw, "status": s.status, "rationale": s.rationale}
                        for n, s in j.scores.items()}} for j in ev.judgments]
