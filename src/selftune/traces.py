"""Every judged item as an MLflow trace with its scores as assessments; probe splits as evaluation datasets.

Traces are built *after* a split is judged, from the frozen records (``Judgment`` -> ``Answer`` ->
``Probe``), so the loop's hot path is untouched. They are written through an explicit
``TracingClient(uri)``: one ``start_trace`` per item (its assessments ride along in the same call) and
one ``log_spans`` per split. No global tracer provider, active run or tracking URI is used, so two tunes
(or tests) in one process never write into each other's stores, and a remote ``mlflow server`` receives
the same calls over REST.

One trace per item, named ``item``; its inputs ``{"question"}`` and outputs ``{"answer"}`` are what the
Traces table shows as request and response:

- ``retrieve`` (RETRIEVER): the query and retrieval params; out: the chunks as documents in rank
  order (chunk id, doc, character span, rank, similarity score when the index gave one);
- ``generate`` (CHAT_MODEL): the prompt as the built-in RAG renders it for its model (``render``),
  else the instructions and the question; out: the answer (or the error);
- ``judge`` (EVALUATOR): overall, capped_by, attack flags; one child per LLM group, ragas metric or
  check, with each criterion's value, raw score, status, rationale, flags and panel scores.

Assessments on the trace: one feedback per scored criterion (LLM criteria and ragas LLM metrics from an
``LLM_JUDGE`` source named by the judge model(s), checks and string metrics from ``CODE``), an invalid
score as a feedback *error* (never a 0), ``overall`` with the caps and flags in its rationale, and the
probe's reference as the expectation ``expected_response`` (``HUMAN`` for a human reference). ``n/a``
scores are shown in the judging span only. Flags and caps are also trace tags. Assessments sit on the
trace, not on spans, so the trace's first view shows every score with its rationale.

Times: ``Answer.seconds`` (retrieval + generation) is the only duration the records hold. The items of a
split are laid end to end, ending when the split is logged; ``generate`` spans the answer's seconds,
``retrieve`` and the judging spans are instants (their own time is not recorded).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .records import Answer, Evaluation, Judgment, Params, Probe, Score
from .rubric import CheckCriterion, LLMCriterion, RagasCriterion, Rubric

# The render of a prompt for an answer under params: chat messages, or None when unknown.
Render = Callable[[Answer, Params], list[dict[str, Any]] | None]
PREVIEW = 1000


@dataclass(frozen=True)
class Where:
    """Where a split's traces go and what they belong to."""

    experiment_id: str
    run_id: str  # the round's child run (train/val) or the parent run (test)
    label: str  # "round-03", "test-baseline", ...
    round: int | None = None


@dataclass(frozen=True)
class Sources:
    """Who scored what: the judge model ids and how the SUT's prompt is rendered."""

    rubric: Rubric
    judge: str  # the judge model id, or the panel "a, b (mean)"
    sut: str
    render: Render | None = None

    def source(self, name: str) -> tuple[str, str]:
        from .ragas_metrics import LLM_METRICS

        c = next((c for c in self.rubric.criteria if c.name == name), None)
        if isinstance(c, LLMCriterion):
            return "LLM_JUDGE", self.judge
        if isinstance(c, RagasCriterion):
            return ("LLM_JUDGE", f"ragas:{c.metric} ({self.judge})") if c.metric in LLM_METRICS \
                else ("CODE", f"ragas:{c.metric}")
        if isinstance(c, CheckCriterion):
            return "CODE", f"check:{c.check.type}"
        return "CODE", "selftune"


class _Builder:
    """Spans of one trace on a private OpenTelemetry provider (never the global one)."""

    def __init__(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        self.tracer = TracerProvider(resource=Resource({"service.name": "selftune"})).get_tracer("selftune")
        self.raw: dict[str, Any] = {}  # MLflow span id -> its OpenTelemetry span (a child's parent context)

    def span(self, trace_id: str | None, name: str, kind: str, start: int, parent: Any = None) -> Any:
        from mlflow.entities import LiveSpan
        from mlflow.tracing.utils import generate_trace_id_v3
        from opentelemetry import trace as otel

        ctx = otel.set_span_in_context(self.raw[parent.span_id]) if parent is not None else None
        raw = self.tracer.start_span(name, context=ctx, start_time=start)
        span = LiveSpan(raw, trace_id or generate_trace_id_v3(raw), kind)
        self.raw[span.span_id] = raw
        return span


def item_trace(b: _Builder, j: Judgment, params: Params, where: Where, src: Sources, start: int) -> tuple[Any, list]:
    """(TraceInfo with assessments, finished spans) of one judged item, starting at ``start`` ns."""
    from mlflow.entities import SpanType

    a, p = j.answer, j.answer.probe
    end = start + _item_ns(j)
    root = b.span(None, "item", SpanType.CHAIN, start)
    tid = root.trace_id
    root.set_inputs({"question": p.question})
    root.set_attributes({"probe_id": p.id, "split": p.split, "run": where.label})

    ret = b.span(tid, "retrieve", SpanType.RETRIEVER, start, root)
    ret.set_inputs({"query": p.question, **{k: v for k, v in params.items() if not isinstance(v, str)}})
    ret.end(outputs=[_document(c, rank) for rank, c in enumerate(a.contexts, 1)], end_time_ns=start)

    gen = b.span(tid, "generate", SpanType.CHAT_MODEL, start, root)
    messages = src.render(a, params) if src.render is not None and a.error is None else None
    gen.set_inputs({"messages": messages} if messages else
                   {"instructions": params.get("instructions", ""), "question": p.question,
                    "note": "the rendered prompt of this system under test is not recorded"})
    gen.set_attributes({"model": src.sut, "seconds": round(a.seconds, 3)})
    if a.error is not None:
        gen.end(outputs={"error": a.error}, status="ERROR", end_time_ns=end)
    else:
        gen.end(outputs={"choices": [{"message": {"role": "assistant", "content": a.text}}]}, end_time_ns=end)

    jud = b.span(tid, "judge", SpanType.EVALUATOR, end, root)
    jud.set_inputs({"question": p.question, "answer": a.text, "reference": p.reference})
    judge_spans = [_criteria_span(b, tid, jud, names, j, end) for names in _groups(src.rubric, j)]
    jud.end(outputs={"overall": j.overall, "capped_by": list(j.capped_by), "flags": list(j.flags)}, end_time_ns=end)
    root.end(outputs={"answer": a.text} if a.error is None else {"error": a.error},
             status="OK" if a.error is None else "ERROR", end_time_ns=end)

    spans = [s.to_immutable_span() for s in (root, ret, gen, jud, *judge_spans)]
    info = _info(tid, j, where, src, start, end, _assessments(j, where, src))
    return info, spans


def _document(c: Any, rank: int) -> dict[str, Any]:
    meta = {"doc_uri": c.doc, "chunk_id": c.id, "rank": rank, "start": c.start, "end": c.end}
    if c.score is not None:
        meta["score"] = round(c.score, 4)
    return {"id": c.id, "page_content": c.text, "metadata": meta}


def _groups(rubric: Rubric, j: Judgment) -> list[list[str]]:
    """Criteria as judged: an LLM group together, every other criterion on its own."""
    out = [[c.name for c in g] for g in rubric.llm_groups()]
    out += [[c.name] for c in rubric.criteria if not isinstance(c, LLMCriterion)]
    return [[n for n in names if n in j.scores] for names in out if any(n in j.scores for n in names)]


def _criteria_span(b: _Builder, tid: str, parent: Any, names: list[str], j: Judgment, t: int) -> Any:
    from mlflow.entities import SpanType

    s = b.span(tid, names[0] if len(names) == 1 else "+".join(names), SpanType.EVALUATOR, t, parent)
    s.set_inputs({"criteria": names})
    s.end(outputs={n: _score_dict(j.scores[n]) for n in names}, end_time_ns=t)
    return s


def _score_dict(s: Score) -> dict[str, Any]:
    return {"value": s.value, "raw": s.raw, "status": s.status, "rationale": s.rationale,
            "flags": list(s.flags), **({"by_judge": s.by_judge} if s.by_judge else {})}


def _assessments(j: Judgment, where: Where, src: Sources) -> list[Any]:
    from mlflow.entities import AssessmentError, AssessmentSource, Expectation, Feedback
    from mlflow.tracing.constant import AssessmentMetadataKey

    run = {AssessmentMetadataKey.SOURCE_RUN_ID: where.run_id}
    out: list[Any] = []
    for name, s in j.scores.items():
        if s.status == "n/a":
            continue
        kind, sid = src.source(name)
        meta = {**run, "status": s.status, "raw": "" if s.raw is None else f"{s.raw:g}",
                **({"flags": ",".join(s.flags)} if s.flags else {}),
                **({"by_judge": json.dumps(s.by_judge)} if s.by_judge else {})}
        err = AssessmentError(error_code="INVALID_SCORE", error_message=s.rationale or "invalid") \
            if s.status == "invalid" else None
        value = None if err or s.value is None else round(s.value, 4)  # the exact value is in the span
        out.append(Feedback(name=name, value=value, error=err, rationale=s.rationale or None,
                            source=AssessmentSource(kind, sid), metadata=meta))
    notes = ([f"capped by {', '.join(j.capped_by)}"] if j.capped_by else []) + \
        ([f"flagged: {', '.join(j.flags)}"] if j.flags else [])
    if j.overall is None:
        why = j.answer.error or "an invalid criterion score"
        out.append(Feedback(name="overall", error=AssessmentError(error_code="INVALID_ITEM", error_message=why),
                            source=AssessmentSource("CODE", "selftune.rubric"), metadata=run))
    else:
        why = "; ".join(notes) or "weighted mean of the criterion scores"
        out.append(Feedback(name="overall", value=round(j.overall, 4), rationale=why,
                            source=AssessmentSource("CODE", "selftune.rubric"),
                            metadata={**run, "capped_by": ",".join(j.capped_by), "flags": ",".join(j.flags)}))
    p = j.answer.probe
    if p.reference:
        human = p.reference_origin == "human"
        out.append(Expectation(name="expected_response", value=p.reference, metadata=run, source=AssessmentSource(
            "HUMAN" if human else "CODE", ("selftune.feedback" if p.extractive_reference else "probes.file") if human
            else "source sentence")))
    if p.source_doc:
        out.append(Expectation(name="expected_source", value={"doc": p.source_doc, "start": p.source_start,
                                                              "end": p.source_end, "answerable": p.answerable},
                               metadata=run, source=AssessmentSource("CODE", "probe synthesis")))
    return out


def _info(tid: str, j: Judgment, where: Where, src: Sources, start: int, end: int, assessments: list[Any]) -> Any:
    from mlflow.entities import TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.constant import TRACE_SCHEMA_VERSION, TRACE_SCHEMA_VERSION_KEY, TraceMetadataKey, TraceTagKey

    a, p = j.answer, j.answer.probe
    tags = {TraceTagKey.TRACE_NAME: "item", "selftune.split": p.split, "selftune.run": where.label,
            "selftune.probe_id": p.id, "selftune.valid": str(j.valid).lower(), "selftune.kind": p.kind,
            "selftune.persona": p.persona or "none"}
    if where.round is not None:
        tags["selftune.round"] = str(where.round)
    if j.flags:
        tags["selftune.flags"] = ",".join(j.flags)
    if j.capped_by:
        tags["selftune.capped_by"] = ",".join(j.capped_by)
    meta = {TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION), TraceMetadataKey.SOURCE_RUN: where.run_id,
            TraceMetadataKey.INPUTS: json.dumps({"question": p.question})[:PREVIEW],
            TraceMetadataKey.OUTPUTS: json.dumps({"answer": a.text})[:PREVIEW]}
    return TraceInfo(trace_id=tid, trace_location=TraceLocation.from_experiment_id(where.experiment_id),
                     request_time=start // 1_000_000, execution_duration=(end - start) // 1_000_000,
                     state=TraceState.OK if a.error is None else TraceState.ERROR,
                     request_preview=p.question[:PREVIEW], response_preview=(a.text or a.error or "")[:PREVIEW],
                     trace_metadata=meta, tags=tags, assessments=assessments)


def _item_ns(j: Judgment) -> int:
    return max(int(j.answer.seconds * 1e9), 1_000)


def _duration(ev: Evaluation) -> int:
    return sum(_item_ns(j) for j in ev.judgments)


def log_evaluation(uri: str, ev: Evaluation, where: Where, src: Sources, now_ns: int | None = None) -> list[str]:
    """Log one trace per judged item of ``ev``; returns the trace ids in item order.

    The items are laid end to end by their answer seconds, the last ending at ``now_ns``. Raises what the
    store raises (the caller decides whether a failed trace upload may stop a tune)."""
    from mlflow.tracing.client import TracingClient

    client = TracingClient(uri)
    b = _Builder()  # one per split: its span map lives as long as the split's spans
    t = (now_ns or time.time_ns()) - _duration(ev)
    infos, spans = [], []
    for j in ev.judgments:
        info, item_spans = item_trace(b, j, ev.params, where, src, t)
        t += _item_ns(j)
        infos.append(info)
        spans += item_spans
    for info in infos:
        client.start_trace(info)
    if spans:
        client.log_spans(where.experiment_id, spans)
    return [i.trace_id for i in infos]


class TraceLogger:
    """What ``MlflowTracker`` calls: one trace per judged item of each evaluated split, the probe datasets.

    Failure policy: tracing observes, it never stops a tune. A failed upload is logged as a warning,
    counted (``failed``) and reported on the run (tag ``selftune.traces_error``), never swallowed silently.
    ``seconds`` is the wall time spent here (building and uploading traces, the datasets): the tracing
    overhead of the tune, since the loop waits for it.
    """

    def __init__(self, uri: str, experiment_id: str, src: Sources):
        self.uri, self.experiment_id, self.src = uri, experiment_id, src
        self.ids: dict[str, list[str]] = {}  # run label -> trace ids
        self.seconds, self.items, self.failed = 0.0, 0, 0

    def log(self, run_id: str, label: str, round_: int | None, evs: list[Evaluation]) -> None:
        import logging

        from mlflow import MlflowClient

        t0 = time.perf_counter()
        try:
            where = Where(self.experiment_id, run_id, label, round_)
            end = time.time_ns() - sum(_duration(ev) for ev in evs)  # the splits one after the other
            for ev in evs:
                end += _duration(ev)
                self.ids.setdefault(label, []).extend(log_evaluation(self.uri, ev, where, self.src, end))
                self.items += len(ev.judgments)
        except Exception as err:  # noqa: BLE001 -- observability must not end a tune; recorded below
            self.failed += 1
            logging.getLogger(__name__).warning("traces of %s not logged: %s: %s", label, type(err).__name__, err)
            MlflowClient(self.uri).set_tag(run_id, "selftune.traces_error", f"{type(err).__name__}: {err}"[:500])
        finally:
            self.seconds += time.perf_counter() - t0

    def datasets(self, run_id: str, probes: list[Probe], digest: Callable[[list[Probe]], str]) -> dict[str, str]:
        """The probe splits as evaluation datasets, their ids tagged on ``run_id``; {} where unsupported."""
        import logging

        from mlflow import MlflowClient

        from .probe_datasets import log_probe_datasets

        t0 = time.perf_counter()
        try:
            ids = log_probe_datasets(self.uri, self.experiment_id, probes, digest)
        except Exception as err:  # noqa: BLE001 -- e.g. a store without evaluation datasets: inputs remain
            logging.getLogger(__name__).warning("probe splits not logged as evaluation datasets: %s", err)
            return {}
        finally:
            self.seconds += time.perf_counter() - t0
        MlflowClient(self.uri).set_tag(run_id, "selftune.datasets", json.dumps(ids))
        return ids


def sources_for(cfg: Any, rubric: Rubric) -> Sources:
    """Judge and SUT ids from the config; the built-in RAG's prompt rendered with its role's adapter."""
    specs = cfg.judge_specs()
    judge = specs[0].model if len(specs) == 1 else f"{', '.join(s.model for s in specs)} ({cfg.judge.aggregate})"
    render: Render | None = None
    if cfg.sut.system == "builtin":
        import dspy

        from .lm import LeanAdapter
        from .rag import prompt_messages

        adapter = LeanAdapter() if cfg.models.sut.model == "local" else dspy.ChatAdapter()

        def render(a: Answer, params: Params) -> list[dict[str, Any]]:
            return prompt_messages(adapter, str(params.get("instructions", "")), a.probe.question, a.contexts)
    return Sources(rubric=rubric, judge=judge, sut=cfg.models.sut.model, render=render)
