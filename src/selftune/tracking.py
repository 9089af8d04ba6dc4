"""MLflow: a parent run per tune, a child run per evaluated candidate, tables, best.yaml, report.

It observes the loop (``loop.Observer``) through an explicit ``MlflowClient``: no fluent active-run
stack, so nothing leaks between tunes or tests. Every child run is finished as soon as its round is,
so an interrupted tune leaves its finished rounds intact; the parent is then marked KILLED/FAILED.
No secret is ever logged: only model ids and the *names* of key variables are part of the config.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from .config import Config
from .records import Evaluation, Probe, Round
from .rubric import Rubric
from .traces import TraceLogger, sources_for

PARAM_MAX = 500


def judgments_frame(ev: Evaluation) -> pd.DataFrame:
    """One row per probe: question, answer, contexts, every criterion's score and rationale."""
    rows = []
    for j in ev.judgments:
        a, p = j.answer, j.answer.probe
        row: dict[str, Any] = {
            "probe_id": p.id, "split": ev.split, "kind": p.kind, "persona": p.persona or "none",
            "question": p.question, "reference": p.reference or "", "reference_origin": p.reference_origin,
            "answer": a.text, "error": a.error or "", "contexts": json.dumps([c.text for c in a.contexts]),
            "context_ids": json.dumps([c.id for c in a.contexts]), "overall": j.overall,
            "capped_by": ",".join(j.capped_by), "seconds": round(a.seconds, 3),
        }
        for name, s in j.scores.items():
            row[f"{name}/score"] = s.value
            row[f"{name}/status"] = s.status
            row[f"{name}/rationale"] = s.rationale
            row[f"{name}/flags"] = ",".join(s.flags)
            for member, raw in s.by_judge.items():  # a judge panel: each member's raw score
                row[f"{name}/{member}"] = raw
        rows.append(row)
    return pd.DataFrame(rows)


def eval_metrics(ev: Evaluation, criteria: list[str]) -> dict[str, float]:
    """Per-split metrics; none for a split this candidate did not answer (e.g. train when not promoted)."""
    out: dict[str, float] = {}
    if not ev.judgments:
        return out
    if (o := ev.overall()) is not None:
        out[f"{ev.split}/overall"] = o
    for name in criteria:
        if (m := ev.criterion_mean(name)) is not None:
            out[f"{ev.split}/{name}"] = m
    out[f"{ev.split}/valid_rate"] = ev.valid_rate()
    for k, v in ev.counts().items():
        out[f"{ev.split}/n_{k}"] = float(v)
    return out


class MlflowTracker:
    """``resume``: the id of an unfinished tune's parent run to continue (``tune --resume``): the loop
    replays the tune, and each round with a finished child run is checked against it, not logged again."""

    def __init__(self, cfg: Config, resume: str | None = None):
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri())
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        # a tracking server keeps the artifacts where it serves them from (every machine reads the same);
        # a local store keeps them in the workdir
        remote = cfg.tracking_uri().startswith(("http://", "https://"))
        where = None if remote else (cfg.workdir / "mlartifacts").resolve().as_uri()
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            cfg.tracking.experiment, artifact_location=where)
        self.cfg = cfg
        self.parent_id: str | None = None
        self.criteria: list[str] = []
        self.incumbent_val = 0.0
        self.traces: TraceLogger | None = None  # per-item traces (tracking.traces), set up in start()
        self.report_dir: Path | None = None  # where finish() wrote report.html
        self.resume = resume
        self.done: dict[int, Any] = {}  # round index -> the finished child run of a resumed tune

    def start(self, cfg: Config, rubric: Rubric, probes: list[Probe], stats: dict[str, Any]) -> None:
        from . import probes as P

        self.criteria = [c.name for c in rubric.criteria]
        self.incumbent_val = 0.0
        if self.resume is not None:
            self._reattach(self.resume, P.digest(probes))
            if cfg.tracking.traces:
                self.traces = TraceLogger(cfg.tracking_uri(), self.experiment_id, sources_for(cfg, rubric))
            return
        from .resume import start_tags

        tags = {**start_tags(cfg), "selftune.corpus_digest": str(stats.get("corpus_digest", ""))}
        run = self.client.create_run(self.experiment_id, run_name=f"tune-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                     tags={"selftune.kind": "tune", "selftune.config": cfg.name, **tags})
        self.parent_id = pid = run.info.run_id
        params = {"seed": cfg.seed, "corpus": str(cfg.corpus.path), "embedder": cfg.embedder,
                  "rounds": cfg.optimizer.rounds, "probes_hash": P.digest(probes), "rubric": rubric.name,
                  **{f"model.{r}": getattr(cfg.models, r).model for r in ("generator", "sut", "judge", "optimizer")}}
        if cfg.judge.models:  # a panel replaces models.judge
            params["model.judge"] = ", ".join(s.model for s in cfg.judge.models)
            params["judge.aggregate"] = cfg.judge.aggregate
        self.client.log_batch(pid, params=[Param(k, str(v)[:PARAM_MAX]) for k, v in params.items()])
        if cfg.source:
            self.client.log_artifact(pid, str(cfg.source), "config")
        self.client.log_artifact(pid, str(cfg.rubric), "config")
        self.client.log_dict(pid, json.loads(cfg.model_dump_json()), "config/resolved.json")
        self.client.log_dict(pid, stats, "probes/stats.json")
        for split in P.SPLITS:
            part = [p for p in probes if p.split == split]
            self.client.log_text(pid, "".join(p.model_dump_json() + "\n" for p in part), f"probes/{split}.jsonl")
        self._log_probe_inputs(pid, probes)
        if cfg.tracking.traces:
            self.traces = TraceLogger(cfg.tracking_uri(), self.experiment_id, sources_for(cfg, rubric))
            self.traces.datasets(pid, probes, P.digest)

    def _reattach(self, pid: str, probes_hash: str) -> None:
        """Continue the parent run ``pid``: its finished child runs are the rounds to replay; a child
        left unfinished by the stopped process is deleted (its round is run again)."""
        from .errors import InputError

        parent = self.client.get_run(pid)
        if parent.data.params.get("probes_hash") != probes_hash:
            raise InputError(self.cfg.source or "config", "probes", f"the probes differ from those of the tune being "
                                                                    f"resumed (run {pid}); run without --resume")
        children = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pid}'")
        for child in children:
            index = int(child.data.tags.get("selftune.round", -1))
            if child.info.status == "FINISHED" and index >= 0 and index not in self.done:
                self.done[index] = child
            else:
                self.client.delete_run(child.info.run_id)
        self.parent_id = pid
        resumes = int(parent.data.tags.get("selftune.resumes", "0")) + 1
        why = parent.data.tags.get("selftune.aborted", "")
        self.client.update_run(pid, status="RUNNING")
        self.client.log_batch(pid, tags=[RunTag("selftune.resumes", str(resumes)),
                                         RunTag(f"selftune.resume{resumes}", f"after {len(self.done)} finished rounds; "
                                                                             f"stopped by: {why}"[:PARAM_MAX])])
        if why:
            self.client.delete_tag(pid, "selftune.aborted")

    def _replayed(self, rnd: Round) -> None:
        """A round the resumed tune replayed: it must be the one recorded, or the two are not one tune."""
        child = self.done.pop(rnd.index)
        params = {k: str(v)[:PARAM_MAX] for k, v in rnd.params.items()}
        promoted = str(rnd.gate.promote)
        if child.data.params != params or child.data.tags.get("selftune.promoted") != promoted:
            diff = sorted(k for k in set(params) | set(child.data.params) if params.get(k) != child.data.params.get(k))
            raise RuntimeError(f"resume: round {rnd.index} replayed differently from its record (params {diff}, "
                               f"promoted {child.data.tags.get('selftune.promoted')} -> {promoted}); the tune cannot "
                               "be continued: run without --resume to start a new one")

    def _log_probe_inputs(self, run_id: str, probes: list[Probe]) -> None:
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        from . import probes as P

        inputs = []
        for split in P.SPLITS:
            part = [p for p in probes if p.split == split]
            df = pd.DataFrame([{"id": p.id, "question": p.question, "reference": p.reference or ""} for p in part])
            ds = mlflow.data.from_pandas(df, name=f"probes-{split}", digest=P.digest(part))
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)]))
        self.client.log_inputs(run_id, inputs)

    def round(self, rnd: Round) -> None:
        assert self.parent_id is not None
        if rnd.index in self.done:  # replayed by a resumed tune: checked, already logged
            self._replayed(rnd)
            if rnd.gate.promote:
                self.incumbent_val = self._val_of(rnd)
            return
        child = self.client.create_run(self.experiment_id, run_name=f"round-{rnd.index:02d}",
                                       tags={"mlflow.parentRunId": self.parent_id, "selftune.round": str(rnd.index),
                                             "selftune.promoted": str(rnd.gate.promote),
                                             "selftune.pruned": str(rnd.pruned)})
        cid = child.info.run_id
        try:
            params = [Param(k, str(v)[:PARAM_MAX]) for k, v in sorted(rnd.params.items())]
            metrics = {**eval_metrics(rnd.train, self.criteria), **eval_metrics(rnd.val, self.criteria)}
            gate = rnd.gate
            metrics["gate/promoted"] = float(gate.promote)
            metrics["judge/trusted"] = float(rnd.trusted)
            metrics.update({f"judge/{k}": float(v) for k, v in rnd.judge_stats.items()})
            for k in ("delta", "ci_low", "ci_high"):
                if getattr(gate, k) is not None:
                    metrics[f"gate/{k}"] = getattr(gate, k)
            now = int(time.time() * 1000)
            self.client.log_batch(cid, params=params, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                                  tags=[RunTag("selftune.gate", gate.reason[:PARAM_MAX])])
            for k, v in rnd.params.items():
                if isinstance(v, str):
                    self.client.log_text(cid, v, f"params/{k}.txt")
            self.client.log_dict(cid, {"gate": gate.model_dump(), "notes": list(rnd.notes), "params": rnd.params},
                                 "round.json")
            for ev in (rnd.train, rnd.val):
                self.client.log_table(cid, judgments_frame(ev), f"tables/{ev.split}.json")
            if self.traces is not None:
                self.traces.log(cid, f"round-{rnd.index:02d}", rnd.index, [rnd.train, rnd.val])
            self.client.set_terminated(cid, "FINISHED")
        except BaseException:
            self.client.set_terminated(cid, "FAILED")
            raise
        # The parent's per-round history is what the UI draws as the tuning curve.
        if rnd.gate.promote:
            self.incumbent_val = self._val_of(rnd)
        parent = [Metric("candidate/val_overall", self._val_of(rnd), now, rnd.index),
                  Metric("incumbent/val_overall", self.incumbent_val, now, rnd.index),
                  Metric("candidate/val_valid_rate", rnd.val.valid_rate(), now, rnd.index),
                  Metric("judge/trusted", float(rnd.trusted), now, rnd.index)]
        for k in ("retest/flip_rate", "swap/consistency", "swap/round_consistency", "agreement/rate"):
            if k in rnd.judge_stats:
                parent.append(Metric(f"judge/{k}", float(rnd.judge_stats[k]), now, rnd.index))
        self.client.log_batch(self.parent_id, metrics=parent)

    @staticmethod
    def _val_of(rnd: Round) -> float:
        return rnd.val.overall() or 0.0

    def finish(self, result: Any) -> None:
        import yaml

        pid = self.parent_id
        assert pid is not None
        now = int(time.time() * 1000)
        m = {"test/baseline_overall": result.test_baseline.overall() or 0.0,
             "test/best_overall": result.test_best.overall() or 0.0,
             "val/baseline_overall": result.rounds[0].val.overall() or 0.0,
             "val/best_overall": result.best.val.overall() or 0.0,
             "gain/val": result.val_gain, "gain/test": result.test_gain,
             "gap/val_minus_test_gain": result.val_gain - result.test_gain,
             "best_round": float(result.best.index),
             "judge/valid_rate": _valid_rate(result)}
        for name in self.criteria:
            for label, ev in (("baseline", result.test_baseline), ("best", result.test_best)):
                if (v := ev.criterion_mean(name)) is not None:
                    m[f"test/{label}/{name}"] = v
        for (cut, value, split, label), v in by_group(result).items():
            m[f"{cut}/{value}/{split}_{label}"] = v
        top = ("judge/", "checks/", "alarms/", "calls/", "time/", "search/", "gate/", "objective/", "gain/", "rounds/",
               "coverage/", "split_check/", "dedup/", "mined/", "feedback/", "probes_kind/",
               "tokens/", "usd/", "failures/")
        m.update({(k if k.startswith(top) else f"stats/{k}"): float(v) for k, v in result.stats.items()
                  if isinstance(v, (int, float)) and not k.startswith(("judge/swap/round", "judge/retest/flip_rate",
                                                                        "judge/swap/consistency", "judge/trusted"))})
        if "judge/verdict" in result.stats:  # trusted, untrusted or unproven
            self.client.set_tag(pid, "selftune.judge_state", result.stats["judge/verdict"].state)
        if result.stats.get("optimizer/study"):  # the study's name, never the storage URL (it may hold a password)
            self.client.set_tag(pid, "selftune.study", str(result.stats["optimizer/study"])[:PARAM_MAX])
        if result.stats.get("stopped_because"):
            self.client.set_tag(pid, "selftune.stopped_because", str(result.stats["stopped_because"])[:PARAM_MAX])
        if "judge/untrusted_because" in result.stats:
            why = str(result.stats["judge/untrusted_because"])[:PARAM_MAX]
            self.client.set_tag(pid, "selftune.judge_untrusted", why)
        self.client.log_batch(pid, metrics=[Metric(k, float(v), now, 0) for k, v in m.items()])
        self.client.log_text(pid, yaml.safe_dump({"params": result.best.params}, sort_keys=True, allow_unicode=True),
                             "best.yaml")
        self.client.log_table(pid, judgments_frame(result.test_baseline), "tables/test_baseline.json")
        if result.best.index != 0:
            self.client.log_table(pid, judgments_frame(result.test_best), "tables/test_best.json")
        self.client.log_table(pid, rounds_frame(result.rounds), "tables/rounds.json")
        if result.stats.get("mined"):
            self.client.log_text(pid, "".join(p.model_dump_json() + "\n" for p in result.stats["mined"]),
                                 "probes/mined.jsonl")
        if self.traces is not None:
            self.traces.log(pid, "test-baseline", None, [result.test_baseline])
            if result.best.index != 0:
                self.traces.log(pid, "test-best", None, [result.test_best])
            self.client.log_batch(pid, metrics=[Metric(k, float(v), now, 0) for k, v in (
                ("traces/items", self.traces.items), ("traces/seconds", self.traces.seconds),
                ("traces/failed", self.traces.failed))])
        text = report(result)
        self.client.log_text(pid, text, "report.md")
        from .report_html import write_report

        try:
            self.report_dir = write_report(result, text, self.cfg.workdir / "report", self.client, pid)
        except Exception as err:  # noqa: BLE001 -- the tune's results are logged; say the page failed
            logging.getLogger(__name__).warning("report.html not written: %s: %s", type(err).__name__, err)
            self.client.set_tag(pid, "selftune.report_error", f"{type(err).__name__}: {err}"[:PARAM_MAX])
        self.client.set_terminated(pid, "FINISHED")

    def abort(self, reason: str) -> None:
        if self.parent_id is None:
            return
        self.client.set_tag(self.parent_id, "selftune.aborted", reason[:PARAM_MAX])
        status = "KILLED" if reason.startswith(("KeyboardInterrupt", "Terminated")) else "FAILED"
        self.client.set_terminated(self.parent_id, status)


def _valid_rate(result: Any) -> float:
    """The judge's valid-score rate: over its model-scored criteria (the trust monitor's counts, items
    with an answer), or over every criterion when no model scores any."""
    judged = [(v, result.stats.get(k[:-len("rate")] + "n", 0.0)) for k, v in result.stats.items()
              if k.startswith("judge/valid/") and k.endswith("/rate")]
    if judged and sum(n for _, n in judged):
        return sum(v * n for v, n in judged) / sum(n for _, n in judged)
    evs = [e for r in result.rounds for e in (r.train, r.val)] + [result.test_baseline, result.test_best]
    ok = sum(e.counts()["scores_ok"] for e in evs)
    bad = sum(e.counts()["scores_invalid"] for e in evs)
    return ok / (ok + bad) if ok + bad else 0.0


def rounds_frame(rounds: list[Round]) -> pd.DataFrame:
    rows = []
    for r in rounds:
        row = {"round": r.index, "train": r.train.overall(), "val": r.val.overall(), "n_val": len(r.val.judgments),
               "promoted": r.gate.promote,
               "incumbent": r.incumbent_index, "gate": r.gate.reason, "notes": "; ".join(r.notes)}
        row.update({k: v for k, v in r.params.items() if not isinstance(v, str)})
        rows.append(row)
    return pd.DataFrame(rows)


def by_group(result: Any) -> dict[tuple[str, str, str, str], float]:
    """Mean overall per probe kind and per persona: {(``kind``|``persona``, value, split, baseline|best): mean}
    on validation and the held-out test."""
    out: dict[tuple[str, str, str, str], float] = {}
    evs = (("val", "baseline", result.rounds[0].val), ("val", "best", result.best.val),
           ("test", "baseline", result.test_baseline), ("test", "best", result.test_best))
    for cut in ("kind", "persona"):
        for split, label, ev in evs:
            groups: dict[str, list[float]] = {}
            for j in ev.judgments:
                if j.overall is not None:
                    key = getattr(j.answer.probe, cut) or "none"
                    groups.setdefault(key, []).append(j.overall)
            for key, vals in groups.items():
                out[(cut, key, split, label)] = sum(vals) / len(vals)
    return out


def group_lines(result: Any) -> list[str]:
    """The report's tables: score per probe kind and per persona (validation and test, baseline -> best,
    with the item counts), then the probes' quality: duplicates, the cross-split check, coverage."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    g = by_group(result)
    lines: list[str] = []
    for cut in ("kind", "persona"):
        values = sorted({k[1] for k in g if k[0] == cut})
        if not values or (cut == "persona" and values == ["none"]):
            continue
        count = {(s, v): sum((getattr(j.answer.probe, cut) or "none") == v for j in ev.judgments)
                 for s, ev in (("val", result.rounds[0].val), ("test", result.test_baseline)) for v in values}
        lines += ["", f"## Scores per probe {cut}", "",
                  f"| {cut} | val n | val baseline | val best | test n | test baseline | test best |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {v} | {count[('val', v)]} | {fmt(g.get((cut, v, 'val', 'baseline')))} | "
                  f"{fmt(g.get((cut, v, 'val', 'best')))} | {count[('test', v)]} | "
                  f"{fmt(g.get((cut, v, 'test', 'baseline')))} | {fmt(g.get((cut, v, 'test', 'best')))} |"
                  for v in values]
    st = result.stats
    lines += ["", "## Probes", ""]
    kinds = {k.split("/", 1)[1]: int(v) for k, v in st.items() if k.startswith("probes_kind/")}
    if kinds:
        lines.append("- probes per kind: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    if "dedup/dropped" in st:
        lines.append(f"- near-duplicates dropped (cosine >= {st.get('split_check/threshold', 0):.2f}, "
                     f"all-MiniLM-L6-v2): {int(st['dedup/dropped'])}")
    if "split_check/compared" in st:
        lines.append(f"- cross-split check: {int(st['split_check/compared'])} train/validation probes against "
                     f"{int(st['split_check/test'])} test probes; {int(st['split_check/dropped'])} near-duplicates "
                     f"of a test probe dropped; highest similarity left {st['split_check/max_similarity']:.3f}")
    if "coverage/docs_total" in st:
        per = sorted({k.split("/")[1] for k in st if k.startswith("coverage/") and k.count("/") == 2})
        lines.append(f"- coverage (of {int(st['coverage/docs_total'])} documents, "
                     f"{int(st['coverage/sections_total'])} sections): " + "; ".join(
                         f"{k} {int(st[f'coverage/{k}/docs'])} documents, {int(st[f'coverage/{k}/sections'])} "
                         "sections" for k in (["all"] + [k for k in per if k != "all"])))
    lines.append(f"- probes with a human reference: {int(st.get('probes_human_reference', 0))}"
                 + (f" ({int(st['feedback/references_applied'])} from `selftune feedback`)"
                    if st.get("feedback/references_applied") else ""))
    if "mined/probes" in st:
        lines.append(f"- failure mining: {int(st['mined/probes'])} train probes made near the incumbent's failures"
                     + (f" from {int(st.get('mined/failures_used', 0))} failures; documents: {st['mined/from']}"
                        if st.get("mined/from") else ""))
    if st.get("mined/reused"):
        lines.append(f"- mined probes reused: {int(st['mined/reused'])} train probes mined in earlier tunes of this "
                     "probe set")
    return lines


def report(result: Any) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# selftune report", "", rounds_frame(result.rounds).to_markdown(index=False) if _has_tabulate()
             else rounds_frame(result.rounds).to_string(index=False), "",
             f"- best round: {result.best.index}",
             f"- validation: baseline {fmt(result.rounds[0].val.overall())} -> best {fmt(result.best.val.overall())} "
             f"(gain {result.val_gain:+.3f}, tuned on)",
             f"- held-out test: baseline {fmt(result.test_baseline.overall())} -> "
             f"best {fmt(result.test_best.overall())} "
             f"(gain {result.test_gain:+.3f}, never seen by the optimizer)",
             f"- gap (val gain - test gain): {result.val_gain - result.test_gain:+.3f}",
             f"- judge valid-score rate: {_valid_rate(result):.3f}"]
    st = result.stats
    rel = [f"{label} {st[key]:.2f}" for key, label in (
        ("judge/retest/flip_rate", "test-retest flip rate"), ("judge/retest/score_sd", "score SD"),
        ("judge/swap/consistency", "swap consistency"), ("judge/agreement/rate", "judge panel agreement"))
        if key in st]
    rel += [f"{k.split('/')[-1]} length corr {v:+.2f}" for k, v in st.items() if k.startswith("judge/length_corr/")]
    if rel:
        lines.append("- judge reliability: " + ", ".join(rel))
    if all(f"checks/{k}" in st for k in ("val_baseline", "val_best", "test_baseline", "test_best")):
        lines.append(f"- on the deterministic criteria alone: validation {st['checks/val_baseline']:.3f} -> "
                     f"{st['checks/val_best']:.3f}, held-out test {st['checks/test_baseline']:.3f} -> "
                     f"{st['checks/test_best']:.3f}")
    if st.get("corpus_skipped"):
        lines.append(f"- corpus: {st['corpus_skipped_because']}")
    lines += _evidence_lines(st)
    verdict = st.get("judge/verdict")  # trust.Verdict: every trust figure beside its threshold
    state = verdict.state if verdict is not None else "untrusted"
    if st.get("judge/trusted") == 0.0 and state == "unproven":
        lines.append(f"- JUDGE UNPROVEN ({'; '.join(verdict.reasons)}): promotion used deterministic criteria only")
    elif st.get("judge/trusted") == 0.0:
        lines.append(f"- JUDGE BELOW THE TRUST BAR ({st.get('judge/untrusted_because', '')}): "
                     "promotion used deterministic criteria only")
    elif "judge/trusted" in st:
        lines.append("- judge within the trust bar: its scores counted for promotion")
    lines += group_lines(result)
    if verdict is not None and verdict.figures:
        lines += ["", f"## Judge trust bar: {state}", "", *verdict.table()]
    return "\n".join(lines) + "\n"


def _evidence_lines(st: dict[str, Any]) -> list[str]:
    """The proof of a tune: each gain with its interval, the smallest gain the gate can see, where the
    LM calls went, and the reward-hacking alarms."""
    out = []
    for on, what in (("", f"on the objective that decided ({st.get('gain/objective', '?')})"),
                     ("checks/", "on the deterministic criteria alone")):
        parts = [f"{split} {st[f'{on}gain/{split}_gain']:+.3f} [{st[f'{on}gain/{split}_low']:+.3f}, "
                 f"{st[f'{on}gain/{split}_high']:+.3f}] (n={int(st[f'{on}gain/{split}_n'])})"
                 for split in ("val", "test") if f"{on}gain/{split}_gain" in st]
        if parts:
            out.append(f"- best over baseline {what}, paired-bootstrap interval: " + "; ".join(parts))
    if "gate/min_detectable_effect" in st:
        out.append(f"- minimum detectable effect of the validation split: {st['gate/min_detectable_effect']:.3f} "
                   f"(n={int(st['gate/n_val'])}, 80% power at the gate's confidence; paired SD "
                   f"{st['gate/paired_sd']:.3f} pooled within the {int(st['gate/comparisons_small'])} of "
                   f"{int(st['gate/comparisons'])} comparisons whose gain was smaller than that of them all: "
                   f"{st['gate/min_detectable_effect_all']:.3f} at paired SD {st['gate/paired_sd_all']:.3f})")
    calls = {k.split("/", 1)[1]: int(v) for k, v in st.items() if k.startswith("calls/") and k not in
             ("calls/total", "calls/budget") and not k.startswith("calls/role/")}
    if calls:
        budget = f" of a budget of {int(st['calls/budget'])}" if "calls/budget" in st else ""
        screened = int(st.get("search/stage1_settings_screened", 0))
        out.append(f"- LM calls: {int(st.get('calls/total', sum(calls.values())))}{budget}: "
                   + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in calls.items())
                   + f"; stage 1 screened {screened} retrieval settings with no LM call")
    secs = {k.split("/", 1)[1].replace("_", " "): v for k, v in st.items() if k.startswith("time/")}
    if secs:
        out.append(f"- wall time: {sum(secs.values()) / 60:.1f} min: "
                   + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items()))
    spent = sorted(k.split("/", 2)[2] for k in st if k.startswith("calls/role/"))
    if spent:
        out.append("- spend by role: " + "; ".join(
            f"{r} {int(st[f'calls/role/{r}'])} calls, {int(st.get(f'tokens/{r}', 0))} tokens, "
            f"${float(st.get(f'usd/{r}', 0.0)):.4f}" + (f", {int(st[f'failures/{r}'])} failed" if f"failures/{r}" in st
                                                        else "") for r in spent)
                   + f"; total {int(st.get('tokens/total', 0))} tokens, ${float(st.get('usd/total', 0.0)):.4f} "
                     "(tokens and dollars of billed calls: a cache hit is free)")
    if "rounds/search" in st:
        out.append(f"- candidates: {int(st['rounds/search'])} search moves, {int(st['rounds/rewrite'])} rewrites; "
                   f"{int(st['rounds/pruned'])} pruned early, {int(st['rounds/promoted'])} promoted; "
                   f"{int(st.get('search/carried', 0))} retrieval settings carried from stage 1")
    alarms = {k.split("/", 1)[1]: int(v) for k, v in st.items() if k.startswith("alarms/")}
    out.append("- reward-hacking alarms on proposals: " + (", ".join(f"{k} {v}" for k, v in alarms.items())
                                                            if alarms else "none"))
    if st.get("stopped_because"):
        out.append(f"- stopped: {st['stopped_because']}")
    return out


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


def write_local(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def log_calibration(uri: str, experiment: str, rubric: Path, labels: Path, result: dict[str, Any], text: str) -> str:
    """One MLflow run per ``selftune calibrate``: the agreement figures as metrics (with interval ends),
    the rubric, and the report as JSON and text. Returns the run id."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"calibrate-{rubric.stem}", tags={"selftune.kind": "calibrate"})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    parts = [("calibrate", result["all"])]
    if "align" in result:
        parts += [("align/before", result["align"]["before"]), ("align/after", result["align"]["after"])]
    parts += [(f"member/{name}", agg) for name, agg in result.get("members", {}).items()]
    metrics += [Metric(f"panel/{k}", float(v), now, 0) for k, v in result.get("panel_agreement", {}).items()]
    for prefix, agg in parts:
        for name, a in agg.items():
            for key in ("kappa", "spearman", "exact_agreement"):
                if a[key] is not None:
                    metrics.append(Metric(f"{prefix}/{name}/{key}", float(a[key]), now, 0))
            for key in ("kappa_ci95", "spearman_ci95"):
                lo, hi = a[key]
                if lo is not None:
                    metrics += [Metric(f"{prefix}/{name}/{key}_low", float(lo), now, 0),
                                Metric(f"{prefix}/{name}/{key}_high", float(hi), now, 0)]
            metrics.append(Metric(f"{prefix}/{name}/n", float(a["n"]), now, 0))
    pair_parts = [("pairs", result.get("pairs", {}))]
    if "pairs_before" in result.get("align", {}):
        pair_parts += [("align/pairs_before", result["align"]["pairs_before"]),
                       ("align/pairs_after", result["align"]["pairs_after"])]
    for prefix, agg in pair_parts:  # how often the judge prefers a person's edit
        for name, a in agg.items():
            metrics += [Metric(f"{prefix}/{name}/{key}", float(a[key]), now, 0)
                        for key in ("agreement", "n", "prefers_edit", "ties", "prefers_original")
                        if a[key] is not None]
    client.log_batch(rid, metrics=metrics)
    client.log_param(rid, "labels", str(labels))
    if result.get("feedback_pairs"):
        client.log_param(rid, "feedback_pairs", str(result["feedback_pairs"]))
    client.log_param(rid, "rubric", str(rubric))
    client.log_artifact(rid, str(rubric), "config")
    client.log_dict(rid, result, "agreement.json")
    client.log_text(rid, text, "agreement.txt")
    client.set_terminated(rid, "FINISHED")
    return rid
