"""The one place the data flows: probes -> rounds -> promotion -> held-out test report.

Tracking observes the loop through the ``Observer`` protocol; this module never imports mlflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import probes as P
from .config import Config, initial_params
from .corpus import Corpus, chunk_corpus, load_corpus
from .gate import decide, gain, min_detectable_effect, paired_diffs
from .index import Embedder, Index
from .judge import Judge, has_unscored
from .lm import CallLedger, Models, check_credentials
from .optimize import Optimizer
from .parallel import run_ordered
from .rag import RAG, load_system
from .objective import Objective, checks_only
from .records import Evaluation, GateDecision, Judgment, Params, Probe, Round, Split
from .rubric import Rubric, load_rubric
from .spend import Forecast, combine, per_item, total
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
        self.mined_file: Path | None = None  # the probes mined in earlier tunes of this probe set (``probes``)
        self.reused_ids: set[str] = set()
        if cfg.probes.file is not None:  # a bad line is a clear error now, not after minutes of synthesis
            P.load_user_probes(cfg.probes.file)
        self.corpus: Corpus = load_corpus(cfg.corpus.path, cfg.corpus.glob, cfg.source or "config",
                                          cfg.corpus.follow_symlinks, cfg.corpus.max_file_mb)
        self.embedder = Embedder(cfg.embedder)
        self.index = Index(self.corpus, self.embedder, cfg.workdir / "chroma", server=cfg.index.server)
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

    def complete(self, ev: Evaluation, probes: list[Probe], progress: Progress) -> Evaluation:
        """``ev`` with every item scored by the judge model: the items it skipped (a monitoring sample
        was judged) are judged now. Answers and the sample's judgments come from the response cache."""
        if not has_unscored_items(ev):
            return ev
        return self.evaluate(ev.params, probes, ev.split, progress, limit=len(ev.judgments))

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
        """Synthesize (or reuse, if the same corpus/generator/seed/mix made them before) and split; then
        the human references a person gave (``selftune feedback``) replace the extractive ones."""
        from . import probe_kinds as K
        from .feedback import apply_human_references

        cfg = self.cfg
        gen = cfg.models.generator
        # Your own probes are part of the key: editing the file makes new splits.
        user_file = "-u" + hashlib.sha256(cfg.probes.file.read_bytes()).hexdigest()[:8] if cfg.probes.file else ""
        shape = json.dumps({"mix": cfg.probes.mix, "personas": [p.model_dump() for p in cfg.probes.personas],
                            "dedup": cfg.probes.dedup_similarity}, sort_keys=True)
        mix = "-m" + hashlib.sha256(shape.encode()).hexdigest()[:8]
        key = (f"{self.corpus.digest}-{gen.model.replace('/', '_')}-{cfg.probes.count}-{cfg.seed}"
               f"-{cfg.probes.split.train}-{cfg.probes.split.val}-{cfg.probes.split.test}-v{P.SYNTH_VERSION}{mix}"
               f"{user_file}")
        cache = cfg.workdir / "probes" / f"{key}.jsonl"
        # how they were made (the synthesis stats, the split check, the calls it took), kept beside them:
        # the calls are counted again when the probes are reused (as the ledger counts a cached call), so a
        # rerun or a resumed tune spends its budget and reports its calls and stats as the first did
        made_by = cache.with_suffix(".stats.json")
        params = initial_params(cfg)
        ledger, before = self.ledger, self.ledger.by_stage.get("probes", 0)
        if cache.is_file():
            probes = P.load_jsonl(cache)
            stats: dict[str, Any] = json.loads(made_by.read_text(encoding="utf-8")) if made_by.is_file() else {}
            reused = int(stats.pop("calls", 0))
            ledger.by_stage["probes"] = before + reused
            ledger.recount("generator", reused)  # the generator's calls, read back
            stats["probes_reused"] = str(cache.name)
        else:
            base = chunk_corpus(self.corpus, int(params.get("chunk_size", 800)), int(params.get("chunk_overlap", 0)))
            synth, stats = K.make_probes(base, self.corpus.docs, self.models.role("generator"), cfg.probes.mix,
                                         cfg.probes.count, cfg.seed, cfg.probes.count * cfg.probes.max_attempts_factor,
                                         cfg.probes.personas, self.embedder.encode,
                                         progress=lambda it: progress(it, desc="probes", total=cfg.probes.count))
            user = P.load_user_probes(cfg.probes.file) if cfg.probes.file else []
            kept, dups = K.embedding_dedup(synth + user, self.embedder.encode, cfg.probes.dedup_similarity)
            stats["dedup/dropped"] = len(dups)
            if len(kept) < 6:
                raise RuntimeError(f"only {len(kept)} usable probes were synthesized (need >= 6); "
                                   f"stats: {stats}")
            probes, check = K.cross_split(P.assign_splits(kept, cfg.probes.split, cfg.seed), self.embedder.encode,
                                          cfg.probes.dedup_similarity)
            stats.update(check)
            made_by.parent.mkdir(parents=True, exist_ok=True)
            made_by.write_text(json.dumps({**{k: v for k, v in stats.items() if isinstance(v, int | float | str)},
                                           "calls": ledger.by_stage.get("probes", 0) - before}), encoding="utf-8")
            P.save_jsonl(probes, cache)  # last, and whole or not at all: the cache's presence means done
        if len(probes) < 6:
            raise RuntimeError(f"only {len(probes)} usable probes were synthesized (need >= 6); stats: {stats}")
        self.mined_file = cfg.workdir / "probes" / "mined" / f"{key}.jsonl"
        probes, stats["mined/reused"] = self.reuse_mined(probes)
        probes, n_human = apply_human_references(probes, cfg.workdir)
        stats = {**stats, "probes": len(probes), **{f"probes_{s}": sum(p.split == s for p in probes) for s in P.SPLITS}}
        stats["probes_human_reference"] = sum(p.reference_origin == "human" and p.reference is not None
                                              for p in probes)
        stats["feedback/references_applied"] = n_human
        stats.update({f"probes_kind/{k}": sum(p.kind == k for p in probes) for k in sorted({p.kind for p in probes})})
        stats.update(K.coverage(probes, self.corpus.docs))
        return probes, stats

    def reuse_mined(self, probes: list[Probe]) -> tuple[list[Probe], int]:
        """The probes mined in earlier tunes of this probe set (``keep_mined``), as *train* probes first
        among train: never validation or test, and none that near-duplicates a probe of the set (a
        validation or test one above all). Returns (probes, how many were reused)."""
        from . import probe_kinds as K

        self.reused_ids = set()
        if self.mined_file is None or not self.mined_file.is_file():
            return probes, 0
        known = {p.id for p in probes}
        kept = [m.model_copy(update={"split": "train"}) for m in P.load_jsonl(self.mined_file)
                if m.id not in known and m.mined_from]
        _, dups = K.embedding_dedup([*probes, *kept], self.embedder.encode, self.cfg.probes.dedup_similarity)
        dropped = {d for d, _, _ in dups}
        reused = [m for m in kept if m.id not in dropped]
        self.reused_ids = {m.id for m in reused}
        return reused + probes, len(reused)

    def keep_mined(self, mined: list[Probe]) -> None:
        """Keep the probes mined in this tune beside the probe set, for later tunes to reuse (``reuse_mined``)."""
        if self.mined_file is None:
            return
        have = P.load_jsonl(self.mined_file) if self.mined_file.is_file() else []
        ids = {p.id for p in have}
        new = [p for p in mined if p.id not in ids]
        if new:
            self.mined_file.parent.mkdir(parents=True, exist_ok=True)
            P.save_jsonl(have + new, self.mined_file)

    def mine(self, failures: list[Probe], probes: list[Probe], seed: int) -> list[Probe]:
        """Failure mining: one new *train* probe per failed one, of its kind, from the same documents
        (the failed probe's sources). A mined probe near-duplicating any probe (a test or validation one
        above all) is dropped, so validation and test stay frozen and unleaked."""
        from . import probe_kinds as K

        cfg = self.cfg
        params = initial_params(cfg)
        chunks = chunk_corpus(self.corpus, int(params.get("chunk_size", 800)), int(params.get("chunk_overlap", 0)))
        out: list[Probe] = []
        for k, f in enumerate(failures):
            docs = {f.source_doc, *(s.doc for s in f.more_sources)} - {""}
            if not docs or f.kind not in K.GENERATORS:
                continue
            near = [c for c in chunks if c.doc in docs] if f.kind != "comparison" else chunks
            try:
                made, _ = K.make_probes(near, self.corpus.docs, self.models.role("generator"), {f.kind: 1.0}, 1,
                                        seed * 1000 + k, 4, cfg.probes.personas, self.embedder.encode)
            except Exception as err:  # noqa: BLE001 -- mining is best effort; the round goes on
                log.warning("mining near %s failed: %s", f.id, err)
                continue
            known = {p.id for p in probes} | {p.id for p in out}
            made = [m for m in made if m.id not in known]
            if not made:
                continue
            everyone = [*probes, *out]
            _, dups = K.embedding_dedup([*everyone, *made], self.embedder.encode, cfg.probes.dedup_similarity)
            dropped = {d for d, _, _ in dups}
            out += [m.model_copy(update={"split": "train", "mined_from": f.id}) for m in made if m.id not in dropped]
        return out


@dataclass
class Workers:
    """``tune --workers N``: stage-2 candidates evaluated by worker processes through the shared study
    (``workers.py``). ``config``: spawn ``n`` local ``selftune worker CONFIG`` processes (None: workers
    are started elsewhere); ``n``: also how far ahead of the gate they may evaluate."""

    n: int
    config: Path | None = None


def tune(session: Session, rounds: int, observer: Observer, progress: Progress,
         workers: Workers | None = None) -> TuneResult:
    """``run_tune`` with the spend caps of the config checked before every LM call (``spend.Caps``) and
    the ledger as DSPy's usage tracker (tokens and dollars of every billed call, by role)."""
    import dspy

    from .spend import Caps

    session.ledger.limit(Caps.of(session.cfg))
    with dspy.context(usage_tracker=session.ledger):
        return run_tune(session, rounds, observer, progress, workers)


def run_tune(session: Session, rounds: int, observer: Observer, progress: Progress,
             workers: Workers | None = None) -> TuneResult:
    """Probes -> baseline -> stage 1 (retrieval screened on the cheap objective, no LM call) -> per
    round: proposal, validation answers on growing slices (a clearly losing candidate is pruned),
    judgments, trust verdict, objective, gate -> the held-out test, touched once at the end to report.
    ``rounds`` caps the candidates; ``optimizer.budget.calls`` may end the tune sooner."""
    cfg, rubric, cap, spec = session.cfg, session.rubric, session.judge.flag_cap, session.cfg.optimizer
    ledger = session.ledger
    started = time.perf_counter()
    storage = study = None
    if workers is not None and spec.storage is None:
        from .studies import default_storage

        spec = spec.model_copy(update={"storage": default_storage(cfg)})
    if spec.storage is not None:  # a lasting study, shared by every process with this config (studies.py)
        from .studies import open_storage, study_name

        storage = open_storage(spec.storage, cfg.source.resolve().parent if cfg.source else None, spec.heartbeat)
        study = study_name(cfg, session.corpus.digest)
    pool = None
    if workers is not None:
        from .workers import Pool

        assert storage is not None and study is not None
        pool = Pool(storage, study, workers.n)
        if workers.config is not None:  # started now: their start-up overlaps the probes and the baseline
            pool.spawn(workers.config, workers.n, cfg.workdir)
    ledger.stage = "probes"
    try:
        probes, stats = session.probes(progress)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    if study is not None:
        stats["optimizer/study"] = study
    stats["index_collections_built_before_rounds"] = len(session.index.built)
    stats["corpus_skipped"] = len(session.corpus.skipped)
    stats["corpus_digest"] = session.corpus.digest  # tagged on the run: a resume checks the documents
    if session.corpus.skipped:
        stats["corpus_skipped_because"] = session.corpus.skipped_summary()
    observer.start(cfg, rubric, probes, stats)
    if (pid := getattr(observer, "parent_id", None)) is not None:  # a resumed tune reads what it spent before
        ledger.persist(cfg.workdir / "spend" / f"{pid}.json")
    n_val = sum(p.split == "val" for p in probes)
    plan = getattr(progress, "plan", None)  # an overall bar (runtime.TuneProgress) learns the tune's size
    if plan is not None:
        n_train = sum(p.split == "train" for p in probes)
        n_train = min(n_train, spec.train_items) if spec.train_items else n_train
        plan(n_train + (rounds + 1) * n_val + 2 * sum(p.split == "test" for p in probes))
    # The optimizer is built from train/val material only: it is never handed a test probe.
    optimizer = Optimizer(cfg.sut.params, rubric, session.models.role("optimizer"), spec, cfg.seed,
                          cheap=session.retrieval_objective([p for p in probes if p.split != "test"]),
                          storage=storage, study=study)
    # GEPA's minibatches (hosted optimizer model): train probes only; LLM scores only where they count
    optimizer.evaluate_train = lambda ps, items: list(session.evaluate(
        ps, items, "train", progress, llm_items=0 if objective.kind == "checks" else None).judgments)
    monitor = Monitor(rubric, session.judge, cfg.judge, cfg.seed)
    pairwise_mode = cfg.judge.mode == "pairwise" and bool(rubric.llm_criteria())
    stop_reason = ""
    try:
        params = initial_params(cfg)
        ledger.stage = "baseline"
        base_from = ledger.mark("baseline/start")
        # The judge model has proven nothing yet (its position consistency is measured from round 1 on),
        # so its scores cannot count: it scores a monitoring sample, completed once it earns trust.
        sample = cfg.judge.monitor_sample if monitor.model_scored and not pairwise_mode else None
        base_train = session.evaluate(params, probes, "train", progress, limit=spec.train_items, llm_items=sample)
        val_started = time.perf_counter()  # the validation pace, the index build (done by train) left out
        base = Round(index=0, params=params, train=base_train,
                     val=session.evaluate(params, probes, "val", progress, llm_items=sample),
                     gate=GateDecision(promote=True, reason="baseline"), incumbent_index=0)
        base_secs = (time.perf_counter() - val_started) / max(len(base.val.judgments), 1)
        # what the baseline cost per item answered and judged: the forecast of a candidate and of the test
        forecast = Forecast(per_item=per_item(base_from, ledger.mark("baseline/end"),
                                              len(base.train.judgments) + len(base.val.judgments)))
        ledger.stage = "judge monitoring"
        monitor.observe([base.train, base.val])
        monitor.retest([base.train, base.val])
        monitor.calibrate()
        verdict = monitor.verdict()
        trusted = verdict.trusted
        _say_trust(verdict)
        objective = objective_for(rubric, verdict, cfg.judge.mode, cap)
        if objective.kind != "checks":  # trusted at once (e.g. only ragas metrics to prove): score every item
            base = base.model_copy(update={"train": session.complete(base.train, probes, progress),
                                           "val": session.complete(base.val, probes, progress)})
        optimizer.steer(objective)
        session.set_demos(base.train, objective)
        base = base.model_copy(update={"judge_stats": dict(monitor.stats), "trusted": trusted})
        history = [base]
        observer.round(base)
        n_test = sum(p.split == "test" for p in probes)
        setting = lambda ps: tuple(sorted((k, repr(v)) for k, v in ps.items() if k not in optimizer.text))  # noqa: E731
        # the time budget's estimates of the next round and of the held-out test, from measured paces
        pace = Pace(n_val, n_test, setting(base.params), base_secs, n_train=spec.train_items)
        if pool is not None:  # what a worker needs (train probes for stage 1's cheap scores); never a test probe
            pool.publish(probes=[p.model_dump(mode="json") for p in probes if p.split != "test"],
                         demos=[d.model_dump(mode="json") for d in getattr(session.sut, "demo_pool", [])])
            _publish(pool, optimizer, objective, base, cfg)
            pool.publish(ready=True)
        ahead: dict[int, Any] = {}  # round -> a job queued ahead of its turn (workers.Job), against pool.base
        mined_from: set[str] = set()
        mined_docs: dict[str, int] = {}
        for i in range(1, rounds + 1):
            coming = 0  # candidates workers are evaluating now: their spend is still to come
            if pool is not None:  # what the workers spent counts in the tune's caps and report
                ledger.others(pool.spend())
                coming = pool.in_flight()
            spent = ledger.mark(f"round/{i}/start")  # (a replayed round's as it was the first time)
            if why := ledger.caps.reached(total(spent), spent):  # a cap reached during the last candidate
                stop_reason = f"{why} after {i - 1} candidates"
                log.warning("%s", stop_reason)
                break
            # no candidate starts that would leave too little of a cap for the held-out test (nor would with
            # the ones the workers hold)
            if why := ledger.caps.forecast(spent, combine({}, forecast.candidate(n_val), 1 + coming),
                                           forecast.test(n_test)):
                stop_reason = f"{why}, so it stopped after {i - 1} candidates"
                log.warning("%s", stop_reason)
                break
            if spec.budget.minutes is not None:
                inc_key = setting(next(r for r in history if r.index == history[-1].incumbent_index).params)
                keeps = optimizer.keeps_settings(history)
                if why := _out_of_time(started, spec.budget.minutes, pace.next_round(inc_key, keeps),
                                       pace.test(inc_key, keeps), i - 1):
                    stop_reason = why
                    log.info("%s", stop_reason)
                    break
            round_started, screened = time.perf_counter(), optimizer.screen_seconds
            incumbent = next(r for r in history if r.index == history[-1].incumbent_index)
            if cfg.probes.mine:  # new train probes near the incumbent's failures, answered by the next incumbent
                ledger.stage = "mining"
                worst = sorted((j for j in incumbent.train.judgments if j.overall is not None and j.overall < 1.0
                                and j.answer.probe.id not in mined_from), key=lambda j: j.overall or 0.0)
                failures = [j.answer.probe for j in worst[:cfg.probes.mine]]
                mined_from.update(p.id for p in failures)
                new = session.mine(failures, probes, cfg.seed + i)
                for p in new:
                    doc = p.source_doc or (p.more_sources[0].doc if p.more_sources else "?")
                    mined_docs[doc] = mined_docs.get(doc, 0) + 1
                probes = new + probes  # first among train: the next train minibatch answers them
                stats["mined/probes"] = stats.get("mined/probes", 0) + len(new)
                stats["mined/failures_used"] = len(mined_from)
            ledger.stage = "optimizer"
            # below the trust bar the judge model scores only a monitoring sample: its scores cannot count
            llm_items = cfg.judge.monitor_sample if objective.kind == "checks" else None
            reported = None
            timed_out: list[str] = []  # why the time budget stopped this candidate midway
            # why it is the last candidate: it fits only without the train minibatch a promotion answers
            # (for the rewrites after it, and none comes), so it is answered to its end but none follows
            last: list[str] = []

            def own(ps: Params, llm: int | None) -> Evaluation:
                """Validation answered here, on growing slices: pruned as losing, or stopped past the time
                budget."""
                val_started = time.perf_counter()

                def stop(js: list[Judgment]) -> bool:
                    if optimizer.checkpoint(js, incumbent.val, cfg.gate):
                        return True
                    if spec.budget.minutes is None:
                        return False
                    left, secs = val_pace(js, time.perf_counter() - val_started, llm, n_val)
                    if why := _out_of_time_midway(started, spec.budget.minutes, pace, len(js), secs, left):
                        if not _out_of_time_midway(started, spec.budget.minutes, pace, len(js), secs, left,
                                                   train=False):
                            last[:] = [why]
                            return False
                        timed_out.append(why)
                        return True
                    return False

                ev = session.evaluate(ps, probes, "val", progress, llm_items=llm, steps=spec.slices, stop=stop)
                if len(ev.judgments) == n_val:
                    pace.evaluated(setting(ps), (time.perf_counter() - val_started) / max(n_val, 1))
                return ev

            if pool is not None:  # workers.py: a worker's report, or a candidate the tune evaluates itself
                reported, cand, notes = _pooled(pool, ahead, i, rounds, history, optimizer, session, own, llm_items)
            else:
                cand, notes = optimizer.propose(history)
            if reported is not None:
                val = reported.val
            else:
                ledger.stage = "stage 2"
                val = own(cand, llm_items)
            empty = Evaluation(params=cand, split="train", judgments=())
            if len(val.judgments) < n_val:  # pruned (or stopped by the time budget): recorded, never promoted
                monitor.observe([val])
                rnd = Round(index=i, params=cand, train=empty, val=val, incumbent_index=incumbent.index,
                            gate=GateDecision(promote=False, reason=(timed_out or [optimizer.pruned_reason])[0]),
                            notes=notes, judge_stats=dict(monitor.stats), trusted=trusted, pruned=True)
                history.append(rnd)
                observer.round(rnd)
                pace.took(setting(cand), _took(round_started, screened, optimizer), full=False)
                forecast.candidates.append(combine(ledger.mark(f"round/{i}/end"), spent, -1))
                if timed_out:
                    stop_reason = f"{timed_out[0]}, so it stopped after {i} candidates (the last one unfinished)"
                    log.info("%s", stop_reason)
                    break
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
            if objective.kind == "rubric":  # the judge's scores count now: both sides scored on every item
                val = session.complete(val, probes, progress)
                if has_unscored_items(incumbent.val):
                    incumbent = incumbent.model_copy(update={"val": session.complete(incumbent.val, probes, progress)})
                    history[[r.index for r in history].index(incumbent.index)] = incumbent
            optimizer.steer(objective)
            judged_on = objective.with_prefs(compared.get("prefs", {})) if objective.kind == "pairwise" else objective
            gate = decide(val, incumbent.val, judged_on, cfg.gate, cfg.seed + i)
            train = empty
            if gate.promote and not last:  # its train failures feed the next rewrites (a worker answers none)
                ledger.stage = "stage 2"
                train = session.evaluate(cand, probes, "train", progress, limit=spec.train_items, llm_items=llm_items)
            stats_now = {**monitor.stats, **({"swap/round_consistency": compared["consistency"]}
                                             if compared.get("consistency") is not None else {})}
            rnd = Round(index=i, params=cand, train=train, val=val, gate=gate,
                        incumbent_index=i if gate.promote else incumbent.index, notes=notes,
                        judge_stats=stats_now, trusted=trusted)
            history.append(rnd)
            observer.round(rnd)
            pace.took(setting(cand), _took(round_started, screened, optimizer))
            forecast.candidates.append(combine(ledger.mark(f"round/{i}/end"), spent, -1))
            if last:  # no room for another candidate: the held-out test next
                stop_reason = (f"time budget: candidate {i} was answered to its end as the last one, its train "
                               f"minibatch skipped ({last[0].removeprefix('time budget: stopped ')} with it), "
                               f"so it stopped after {i} candidates")
                log.info("%s", stop_reason)
                break
            if pool is not None:  # draws ahead: no more than the search turns left to gate them
                turns = sum(optimizer.search_turn(history, k) for k in range(i + 1, rounds + 1))
                _publish(pool, optimizer, objective, history[rnd.incumbent_index], cfg, min(pool.ahead, turns))
        if pool is not None:  # workers stop now (each finishes the candidate in hand) while the tune tests
            for job in ahead.values():
                pool.cancel(job)
            pool.stop()
        optimizer.settle(history)
        best = next(r for r in history if r.index == history[-1].incumbent_index)
        # The held-out split is touched only here, after every choice is made, and only to report.
        ledger.stage = "test"
        llm_items = cfg.judge.monitor_sample if objective.kind == "checks" else None
        test_base = session.evaluate(base.params, probes, "test", progress, llm_items=llm_items)
        test_best = test_base if best.index == 0 else session.evaluate(best.params, probes, "test", progress,
                                                                        llm_items=llm_items)
        if pool is not None:  # the local workers have finished the candidates in hand: all they spent counts
            pool.close()
            ledger.others(pool.spend())
        if cfg.probes.mine:
            stats.setdefault("mined/probes", 0)
            stats["mined/from"] = ", ".join(f"{d} {n}" for d, n in sorted(mined_docs.items(), key=lambda t: -t[1]))
            stats["mined/kinds"] = ", ".join(sorted({p.kind for p in probes if p.mined_from}))
            # the probes mined in this tune: logged as probes/mined.jsonl, kept for later tunes of this probe set
            stats["mined"] = [p for p in probes if p.mined_from and p.id not in session.reused_ids]
            session.keep_mined(stats["mined"])
        stats["index_collections_built"] = len(session.index.built)
        stats["bm25_indexes_built"] = len(session.index.bm25.built) if hasattr(session.index, "bm25") else 0
        stats["texts_embedded"] = session.embedder.encoded
        stats.update({f"judge/{k}": v for k, v in monitor.stats.items()})
        stats["judge/trusted"] = float(trusted)
        stats.update(_evidence(history, best, test_base, test_best, objective, checks_only(rubric, cap), cfg, n_val,
                               bool(monitor.model_scored)))
        stats.update({f"calls/{k.replace(' ', '_')}": v for k, v in ledger.by_stage.items()})
        stats["calls/total"] = ledger.total
        stats.update({f"time/{k.replace(' ', '_')}": round(v, 1) for k, v in ledger.seconds_by_stage.items()})
        if spec.budget.calls is not None:
            stats["calls/budget"] = spec.budget.calls
        stats.update(_spend_stats(ledger))
        stats.update({f"search/{k}": v for k, v in optimizer.ledger().items()})
        moves = history[1:]
        stats["rounds/search"] = sum(any(n.startswith("search") for n in r.notes) for r in moves)
        stats["rounds/rewrite"] = len(moves) - stats["rounds/search"]
        stats["rounds/pruned"] = sum(r.pruned for r in moves)
        if pool is not None:  # candidates evaluated by workers (the search ledger counts this process's only)
            stats["rounds/from_workers"] = sum(any(n.endswith("(a worker's)") or n.startswith("evaluated by worker")
                                                   for n in r.notes) for r in moves)
            stats["rounds/stale_dropped"] = pool.dropped
        stats["rounds/promoted"] = sum(r.gate.promote for r in moves)
        stats.update({f"alarms/{k}": v for k, v in optimizer.alarms.items()})
        if stop_reason:
            stats["stopped_because"] = stop_reason
        stats["judge/verdict"] = verdict  # the report's trust table
        if not trusted:
            stats["judge/untrusted_because"] = f"{verdict.state}: " + "; ".join(verdict.reasons)
        result = TuneResult(rounds=history, best=best, test_baseline=test_base, test_best=test_best, stats=stats)
    except BaseException as err:
        if pool is not None:
            try:
                pool.close()
            except Exception as closing:  # noqa: BLE001 -- the first error is the one to raise
                log.warning("could not stop the workers: %s", closing)
        try:
            optimizer.settle(None)  # a candidate in hand goes back to a lasting study, never half-counted
        except Exception as closing:  # noqa: BLE001 -- the first error is the one to raise
            log.warning("could not close the search's open trial: %s", closing)
        observer.abort(f"{type(err).__name__}: {err}")
        raise
    try:
        observer.finish(result)
    finally:  # told to stop before the test: they exit while the tune reports
        if pool is not None:
            pool.close()
    return result


def _publish(pool: Any, optimizer: Optimizer, objective: Objective, incumbent: Round, cfg: Config,
             ahead: int | None = None) -> None:
    """What workers evaluate next: the incumbent's params (``base``: which round it is), the objective, the
    search study it names, whether stage-2 draws have begun (before stage 1's best is gated, a draw
    against the baseline would likely be stale)."""
    optimizer.search._open()
    pool.publish(incumbent=dict(incumbent.params), search_study=optimizer.search.study_name,
                 base=f"{pool.epoch}:{incumbent.index}", draws=optimizer.drawing(),
                 ahead=pool.ahead if ahead is None else ahead,
                 objective={"kind": "checks" if objective.kind == "checks" else "rubric",
                            "criteria": sorted(objective.criteria)},
                 llm_items=cfg.judge.monitor_sample if objective.kind == "checks" else None)


def _pooled(pool: Any, ahead: dict[int, Any], i: int, rounds: int, history: list[Round], optimizer: Optimizer,
            session: Session, own: Callable[[Params, int | None], Evaluation],
            llm_items: int | None) -> tuple[Any, Params, tuple[str, ...]]:
    """Round ``i`` with workers: (a report to gate, its params, notes), or (None, params, notes) of a
    stage-2 draw the tune evaluates itself (none is coming from a worker).

    - A stage-2 turn takes the lowest-numbered draw a worker reported against the current incumbent
      (``Pool.next``).
    - Any other candidate (stage 1's best, a lever, a rewrite) is proposed by the tune and queued as a
      job; a worker evaluates it, or the tune does when none has taken it by the time it waits.
    - While round ``i``, a draw, is evaluated elsewhere, the next round, when it is a rewrite, is proposed
      now against the same incumbent and queued too: if round ``i`` is promoted, that job is stale and is
      cancelled at its turn (``ahead``), never gated against the new incumbent; its round is proposed
      again.

    ``own`` evaluates a job the tune takes itself as it evaluates its own candidates: on growing slices,
    pruned when clearly losing or stopped by the time budget (a worker answers the whole split)."""
    job = ahead.pop(i, None)
    if job is not None and job.base != pool.base:  # proposed against an incumbent since replaced
        pool.cancel(job)
        session.ledger.stage = "optimizer"
        job = None
    draw = job is None and optimizer.stage2_turn(history)
    if job is None and not draw:
        cand, notes = optimizer.propose(history)
        if optimizer.holds_draw() or not pool.takes_jobs:  # a draw of the tune's own (stage 1's best was
            return None, cand, notes                      # the incumbent's), or no heartbeat: evaluated here
        job = pool.submit(i, cand, notes, llm_items)
    # ahead only past a draw: stage 1's best and a lever are moves made because they should win, and a
    # promotion makes the rewrite proposed ahead stale (its proposal's time lost)
    if draw and pool.takes_jobs and i < rounds and i + 1 not in ahead and optimizer.rewrite_turn(history, i + 1):
        session.ledger.stage = "optimizer"
        nxt, nxt_notes = optimizer.propose(history, index=i + 1)
        ahead[i + 1] = pool.submit(i + 1, nxt, nxt_notes, llm_items)
    session.ledger.stage = "workers"
    waited = time.perf_counter()
    if draw:
        reported = pool.next()
        # the draws still wanted: no more than the search turns after this one (said at once, so that no
        # worker starts a draw no round will gate)
        pool.publish(ahead=min(pool.ahead, sum(optimizer.search_turn(history, k) for k in range(i + 1, rounds + 1))))
        if reported is None:  # none coming against this incumbent: the tune draws one itself
            log.info("round %d: no draw coming from a worker (%.1f s): the tune draws one", i,
                     time.perf_counter() - waited)
            cand, notes = optimizer.propose(history)
            return None, cand, notes
        log.info("round %d: stage 2 trial %d from worker %s (waited %.1f s)", i, reported.number, reported.worker,
                 time.perf_counter() - waited)
        return reported, reported.params, (f"search: stage 2 trial {reported.number} (a worker's)",)
    assert job is not None
    reported = pool.result(job, own)
    log.info("round %d: job %d evaluated by %s (%.1f s)", i, reported.number,
             f"worker {reported.worker}" if reported.worker else "the tune", time.perf_counter() - waited)
    who = (f"evaluated by worker {reported.worker} (job {reported.number})",) if reported.worker else ()
    return reported, job.params, job.notes + who


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
    # pooled within comparisons: a candidate's own mean gain is the effect, not noise, so each
    # comparison's squared deviations are taken from its own mean (SD = sqrt(sum SS_k / sum (n_k - 1))).
    # A large gain is also a spread: a lever that mends a quarter of the answers moves those items by
    # ~0.6 and leaves the rest, so its items' gains scatter by ~0.25 around its mean. What decides
    # whether the gate sees a *small* gain is the spread of comparisons with small gains, so the figure
    # rests on the comparisons whose |mean gain| is below the minimum detectable effect of them all
    # (the effects whose detection is in question); the all-comparison figure is logged beside it.
    by_index = {r.index: r for r in history}
    comparisons = []  # (mean gain, sum of squares about it, degrees of freedom)
    for k in range(1, len(history)):
        d = paired_diffs(history[k].val, by_index[history[k - 1].incumbent_index].val, objective)
        if len(d) >= 2:
            m = statistics.fmean(d)
            comparisons.append((m, sum((x - m) ** 2 for x in d), len(d) - 1))

    def pooled(cs: list[tuple[float, float, int]]) -> float:
        return (sum(c[1] for c in cs) / sum(c[2] for c in cs)) ** 0.5

    if comparisons:
        sd_all = pooled(comparisons)
        mde_all = min_detectable_effect(sd_all, n_val, cfg.gate.confidence)
        small = [c for c in comparisons if mde_all is not None and abs(c[0]) < mde_all] or comparisons
        sd = pooled(small)
        out.update({"gate/paired_sd": sd, "gate/paired_sd_all": sd_all, "gate/comparisons": len(comparisons),
                    "gate/comparisons_small": len(small)})
        if mde_all is not None:
            out["gate/min_detectable_effect_all"] = mde_all
            out["gate/min_detectable_effect"] = min_detectable_effect(sd, n_val, cfg.gate.confidence)
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


def _took(round_started: float, screened: float, optimizer: Optimizer) -> float:
    """A round's wall time, less stage 1's screen if it ran in it (a one-off no later round repeats)."""
    return time.perf_counter() - round_started - (optimizer.screen_seconds - screened)


class Pace:
    """What ``optimizer.budget.minutes`` expects of the next round and of the held-out test, from what
    the tune has measured: each full evaluation's seconds per validation item, keyed by the candidate's
    non-text params (its retrieval and generation settings), and each round's wall time (stage 1's
    one-off screen left out), keyed the same way."""

    def __init__(self, n_val: int, n_test: int, base_key: Any, base_secs: float, n_train: int = 0):
        self.n_val, self.n_test, self.base_secs, self.latest = n_val, n_test, base_secs, base_secs
        self.n_train = n_train
        self.item: dict[Any, float] = {base_key: base_secs}
        self.rounds: list[tuple[Any, float]] = []
        self.overhead: list[float] = []  # a full round's seconds beyond its validation answers, per item
        self._val_secs: float | None = None

    def evaluated(self, key: Any, secs_per_item: float) -> None:
        self.item[key] = self.latest = secs_per_item
        self._val_secs = secs_per_item * self.n_val

    def took(self, key: Any, secs: float, full: bool = True) -> None:
        """A round's wall time; a full one's (``full``: evaluated on the whole validation split) time
        beyond its validation answers (judge monitoring, the train minibatch, the proposal) is kept as
        a share of its pace, so a slower candidate's is expected slower in proportion."""
        self.rounds.append((key, secs))
        if full and self._val_secs:
            self.overhead.append(max(0.0, secs - self._val_secs) / (self._val_secs / self.n_val))
        self._val_secs = None

    def midway(self, secs_per_item: float, val_left: float, train: bool = True) -> float:
        """What a candidate still needs if it is promoted, from its first validation items: the rest of
        validation (``val_left`` seconds, ``val_pace``), the rest of its round (monitoring, its train
        minibatch: the largest measured share of a round beyond validation, else the train minibatch
        alone) and the held-out test with it as the best, the baseline at its own pace; ``secs_per_item``
        is its pace over the whole split. ``train=False``: as the last candidate, whose train minibatch
        (answered only for the rewrites after it) is skipped."""
        rest = max(self.overhead) if self.overhead else float(self.n_train)
        if not train:
            rest = max(0.0, rest - self.n_train)
        return val_left + secs_per_item * rest + (self.base_secs + secs_per_item) * self.n_test

    def next_round(self, incumbent: Any, keeps: bool) -> float:
        """A rewrite (``keeps``: the incumbent's settings) takes what a round with those settings took;
        anything else (a search draw, a lever) may be as slow as the slowest round so far."""
        same = [s for k, s in self.rounds if k == incumbent] if keeps else []
        if same:
            return max(same)
        return max(s for _, s in self.rounds) if self.rounds else self.latest * self.n_val

    def test(self, incumbent: Any, keeps: bool) -> float:
        """The held-out test answers the baseline (at its own pace) and the best: the incumbent, or the
        next candidate if it is promoted (a rewrite answers at the incumbent's pace; a search draw at
        the latest full candidate's, a longer context making it slower than the baseline)."""
        mine = self.item.get(incumbent, self.latest)
        return (self.base_secs + (mine if keeps else max(mine, self.latest))) * self.n_test


def val_pace(judgments: Sequence[Judgment], elapsed: float, llm_items: int | None, n_val: int) -> tuple[float, float]:
    """From a candidate's first validation items (answered and judged in ``elapsed`` seconds): the seconds
    the rest of the split needs, and its pace per item over the whole split. Below the trust bar only the
    first ``llm_items`` items are scored by the judge model (the monitoring sample), so the first slice is
    slower than the rest: the rest is paced by the answers' own seconds, and the slice's time beyond its
    answers (the judge's, the checks') is charged per judged item to the sample items still to come (per
    item to every item, when none was judged)."""
    k = len(judgments)
    answers = sum(j.answer.seconds or 0.0 for j in judgments)
    extra = max(0.0, elapsed - answers)
    judged = k if llm_items is None else min(llm_items, k)
    sample = n_val if llm_items is None else min(llm_items, n_val)
    left = (n_val - k) * answers / k + (max(0, sample - judged) * extra / judged if judged else (n_val - k) * extra / k)
    return left, (elapsed + left) / n_val


def _out_of_time_midway(started: float, minutes: float, pace: Pace, done_items: int, secs: float,
                        val_left: float, train: bool = True) -> str:
    """Why a candidate is stopped after ``done_items`` validation items (empty if it goes on): at the
    pace it answered them (``val_pace``: ``val_left`` seconds to the end of validation, ``secs`` per item
    over the whole split), the rest of its round and the held-out test would end past
    ``optimizer.budget.minutes`` (Optuna's ``timeout`` asked at each pruning step: a round slower than
    any before it, e.g. a longer context, is caught on its first slice, not after it has run)."""
    elapsed = time.perf_counter() - started
    need = pace.midway(secs, val_left, train)
    if elapsed + need <= minutes * 60:
        return ""
    return (f"time budget: stopped after {done_items} of {pace.n_val} validation items: at {secs:.1f} s per item "
            f"the rest of the round and the held-out test (~{need / 60:.1f} min) would end at "
            f"{(elapsed + need) / 60:.1f} of {minutes:g} min")


def _out_of_time(started: float, minutes: float, round_est: float, test_secs: float, done: int) -> str:
    """Why no further candidate fits in ``optimizer.budget.minutes`` (empty if one does): the next
    round's estimate plus the held-out test's (``Pace``)."""
    elapsed = time.perf_counter() - started
    if elapsed + round_est + test_secs <= minutes * 60:
        return ""
    return (f"time budget: {elapsed / 60:.1f} of {minutes:g} min used; another candidate (~{round_est / 60:.1f} "
            f"min) and the held-out test (~{test_secs / 60:.1f} min) would not fit, so it stopped after {done} "
            "candidates")


def has_unscored_items(ev: Evaluation) -> bool:
    return any(has_unscored(j) for j in ev.judgments)


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
