"""``kind: ragas`` criteria: a ragas 0.4 metric by name, computed by ragas itself.

LLM metrics (faithfulness, answer relevancy, context precision/recall) run on the configured judge
model through a small ``InstructorBaseRagasLLM`` adapter over the judge's ``dspy.LM``; on the
embedded model every reply is constrained to the metric's response schema (a llama.cpp grammar), so
it always parses. Answer relevancy embeds with the same sentence-transformers model as the index.
Non-LLM metrics (string similarity, BLEU, ROUGE, chrF, exact match, string presence, and the
non-LLM context precision/recall against the probe's reference) need no model at all.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import types
from typing import Any

from .records import Answer, Score

LLM_METRICS = ("faithfulness", "answer_relevancy", "context_precision", "context_recall")
STRING_METRICS = ("exact_match", "string_presence", "non_llm_string_similarity", "bleu_score", "rouge_score",
                  "chrf_score")
CONTEXT_METRICS = ("non_llm_context_precision", "non_llm_context_recall")
METRICS = LLM_METRICS + STRING_METRICS + CONTEXT_METRICS


def import_ragas() -> Any:
    """``import ragas``, offline and without telemetry. ragas 0.4.3 imports
    ``langchain_community.chat_models.vertexai``, which langchain-community 0.4 removed (ragas issues
    #2745, #2995); it is only used in an isinstance list, so an empty stand-in is enough."""
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
    try:
        import langchain_community.chat_models.vertexai  # noqa: F401
    except ImportError:
        stub = types.ModuleType("langchain_community.chat_models.vertexai")
        stub.ChatVertexAI = type("ChatVertexAI", (), {})  # type: ignore[attr-defined]
        sys.modules[stub.__name__] = stub
    import ragas

    return ragas


def bounded(schema: Any, max_chars: int = 160, max_items: int = 6) -> Any:
    """The schema with every string and array bounded, so a small model's constrained reply closes
    within ``max_tokens`` (unbounded, SmolLM2 writes one "reason" until it is cut off)."""
    if isinstance(schema, list):
        return [bounded(x, max_chars, max_items) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v, max_chars, max_items) for k, v in schema.items()}
    if out.get("type") == "string" and "enum" not in out:
        out.setdefault("maxLength", max_chars)
    if out.get("type") == "array":  # an empty list makes some ragas metrics NaN
        out.setdefault("maxItems", max_items)
        out.setdefault("minItems", 1)
    return out


def _value(result: Any) -> float:
    return float(getattr(result, "value", result))


class RagasScorer:
    """Scores ragas criteria. ``role`` (the judge's) is needed only for LLM metrics, ``embedder`` only
    for answer relevancy; both are wrapped on first use."""

    def __init__(self, role: Any = None, embedder: Any = None, max_tokens: int = 384):
        self.role, self.embedder, self.max_tokens = role, embedder, max_tokens
        self._metrics: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}

    def _llm(self) -> Any:
        import_ragas()
        from ragas.llms.base import InstructorBaseRagasLLM

        role, max_tokens = self.role, self.max_tokens
        lock = threading.Lock()  # one in-process model: calls are serialized

        class JudgeLLM(InstructorBaseRagasLLM):
            def generate(self, prompt: str, response_model: Any) -> Any:
                from .lm import ask_json

                schema = response_model.model_json_schema()
                schema = bounded(schema) if role.local else schema
                with lock:
                    obj, text = ask_json(role, "Reply with one JSON object.", [("user", prompt)], schema,
                                         max_tokens=max_tokens)
                if obj is None:
                    raise ValueError(f"no JSON object in the judge's reply: {text[:160]!r}")
                return response_model.model_validate(obj)

            async def agenerate(self, prompt: str, response_model: Any) -> Any:
                return await asyncio.to_thread(self.generate, prompt, response_model)

        return JudgeLLM()

    def _embeddings(self) -> Any:
        import_ragas()
        from ragas.embeddings.base import BaseRagasEmbedding

        embedder = self.embedder

        class IndexEmbeddings(BaseRagasEmbedding):
            def embed_text(self, text: str, **kw: Any) -> list[float]:
                return embedder.encode([text])[0]

            async def aembed_text(self, text: str, **kw: Any) -> list[float]:
                return self.embed_text(text)

            def embed_texts(self, texts: list[str], **kw: Any) -> list[list[float]]:
                return embedder.encode(list(texts))

        return IndexEmbeddings()

    def metric(self, name: str, options: dict[str, Any]) -> Any:
        key = (name, tuple(sorted(options.items())))
        if key in self._metrics:
            return self._metrics[key]
        import_ragas()
        from ragas.metrics import collections as rc

        if name in LLM_METRICS and self.role is None:
            raise ValueError(f"ragas metric {name} needs a judge model")
        if name == "faithfulness":
            m = rc.Faithfulness(llm=self._llm())
        elif name == "answer_relevancy":
            if self.embedder is None:
                raise ValueError("ragas answer_relevancy needs an embedder")
            m = rc.AnswerRelevancy(llm=self._llm(), embeddings=self._embeddings(), **options)
        elif name == "context_precision":
            m = rc.ContextPrecision(llm=self._llm())
        elif name == "context_recall":
            m = rc.ContextRecall(llm=self._llm())
        elif name == "exact_match":
            m = rc.ExactMatch()
        elif name == "string_presence":
            m = rc.StringPresence()
        elif name == "non_llm_string_similarity":
            m = rc.NonLLMStringSimilarity(**options)
        elif name == "bleu_score":
            m = rc.BleuScore(**options)
        elif name == "rouge_score":
            m = rc.RougeScore(**options)
        elif name == "chrf_score":
            m = rc.CHRFScore(**options)
        elif name == "non_llm_context_precision":
            from ragas.metrics._context_precision import NonLLMContextPrecisionWithReference

            m = NonLLMContextPrecisionWithReference(**options)
        elif name == "non_llm_context_recall":
            from ragas.metrics._context_recall import NonLLMContextRecall

            m = NonLLMContextRecall(**options)
        else:  # pragma: no cover - the rubric schema allows only METRICS
            raise ValueError(f"unknown ragas metric {name}")
        self._metrics[key] = m
        return m

    def score(self, metric: str, options: dict[str, Any], answer: Answer) -> Score:
        p = answer.probe
        contexts = [c.text for c in answer.contexts]
        needs_ref = metric in ("context_precision", "context_recall", *STRING_METRICS, *CONTEXT_METRICS)
        if needs_ref and not p.reference:
            return Score(status="n/a", rationale=f"ragas {metric} needs a reference answer")
        if metric in ("faithfulness", "context_precision", "context_recall", *CONTEXT_METRICS) and not contexts:
            return Score(status="n/a", rationale=f"ragas {metric} needs retrieved contexts")
        try:
            m = self.metric(metric, options)
            if metric == "faithfulness":
                r = m.score(user_input=p.question, response=answer.text, retrieved_contexts=contexts)
            elif metric == "answer_relevancy":
                r = m.score(user_input=p.question, response=answer.text)
            elif metric in ("context_precision", "context_recall"):
                r = m.score(user_input=p.question, reference=p.reference, retrieved_contexts=contexts)
            elif metric in STRING_METRICS:
                r = m.score(reference=p.reference, response=answer.text)
            else:
                from ragas.dataset_schema import SingleTurnSample

                r = m.single_turn_score(SingleTurnSample(retrieved_contexts=contexts, reference_contexts=[p.reference]))
            v = _value(r)
        except Exception as err:  # the item is invalid, never 0
            return Score(status="invalid", rationale=f"ragas {metric} failed: {type(err).__name__}: {err}"[:300])
        if math.isnan(v):
            return Score(status="invalid", rationale=f"ragas {metric} returned NaN")
        v = min(1.0, max(0.0, v))
        return Score(value=v, raw=v, rationale=f"ragas {metric} = {v:.3f}")
