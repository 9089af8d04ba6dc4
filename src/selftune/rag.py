"""The built-in system under test: a DSPy module that retrieves ``top_k`` chunks (dense, BM25 or both
fused) and answers under tunable ``instructions``, generation settings and few-shot demonstrations.

Params: ``instructions``, ``top_k``, ``chunk_size``, ``chunk_overlap`` (required); optional, each
absent = today's behaviour: ``hybrid_weight`` (0 dense only .. 1 BM25 only), ``demos`` (how many
demonstrations from the pool set by ``set_demos``), and the generation settings ``max_tokens``,
``temperature``, ``frequency_penalty``, ``presence_penalty`` (any model) and ``repeat_penalty``
(the local llama.cpp model only).

Contract (any system under test): ``answer(probe, params) -> Answer``. A per-probe failure is
returned as ``Answer(error=...)``; only systemic failures raise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dspy

from .index import Index
from .lm import Role, with_extensions
from .records import Answer, Chunk, Frozen, Judgment, Params, Probe, Split

RETRIEVAL_KEYS = ("top_k", "chunk_size", "chunk_overlap", "hybrid_weight")
# Generation settings DSPy carries to any model as LM kwargs (canonical lm15 Config fields).
GENERATION_KEYS = ("max_tokens", "temperature", "frequency_penalty", "presence_penalty")
DEMO_CONTEXT_CHARS = 300  # a demo's context is a short window: prompt evaluation dominates a small model's cost


class AnswerFromContext(dspy.Signature):
    """Answer the question using only the context."""

    context: str = dspy.InputField(desc="retrieved passages, most relevant first")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Demo(Frozen):
    """A worked example shown to the system under test: a train item it answered well."""

    probe_id: str
    split: Split
    question: str
    context: str
    answer: str


def format_contexts(chunks: list[Chunk] | tuple[Chunk, ...]) -> str:
    return "\n\n".join(f"[{i + 1}] ({c.doc}) {c.text.strip()}" for i, c in enumerate(chunks))


def make_demos(judgments: list[Judgment], item_score: Callable[[Judgment], float | None], limit: int,
               max_context_chars: int = DEMO_CONTEXT_CHARS) -> list[Demo]:
    """Up to ``limit`` demos from the best-scoring *train* items (by ``item_score``, ties by probe id):
    items that failed, were flagged or scored None are never chosen, nor a question already chosen.
    A demo's context is one retrieved chunk (the one holding the probe's source span, if any) cut to
    a window of ``max_context_chars`` around that span."""
    scored = [(v, j) for j in judgments if j.answer.probe.split == "train" and j.answer.error is None
              and not j.flags and j.answer.text.strip() and j.answer.contexts and (v := item_score(j)) is not None]
    out: list[Demo] = []
    for _, j in sorted(scored, key=lambda vj: (-vj[0], vj[1].answer.probe.id)):
        p = j.answer.probe
        if len(out) >= limit:
            break
        if any(d.question == p.question for d in out):
            continue
        out.append(Demo(probe_id=p.id, split=p.split, question=p.question, answer=j.answer.text.strip(),
                        context=_demo_context(p, j.answer.contexts, max_context_chars)))
    return out


def _demo_context(probe: Probe, contexts: tuple[Chunk, ...], limit: int) -> str:
    holding = [c for c in contexts if c.overlaps(probe.source_doc, probe.source_start, probe.source_end)]
    chunk, text = (holding or list(contexts))[0], (holding or list(contexts))[0].text
    if len(text) > limit:
        # centre the window on the source span when the chunk holds it, else keep the chunk's start
        mid = limit // 2
        if holding:
            mid = (max(probe.source_start, chunk.start) + min(probe.source_end, chunk.end)) // 2 - chunk.start
        lo = max(0, min(mid - limit // 2, len(text) - limit))
        cut = text[lo:lo + limit]
        if lo > 0 and " " in cut:  # whole words only
            cut = cut[cut.index(" ") + 1:]
        if lo + limit < len(text) and " " in cut:
            cut = cut[:cut.rindex(" ")]
        text = cut
    return format_contexts([chunk.model_copy(update={"text": text})])
def prompt_messages(adapter: dspy.Adapter, instructions: str, question: str,
                    chunks: list[Chunk] | tuple[Chunk, ...]) -> list[dict[str, Any]]:
    """The chat messages ``RAG`` sends its model for this question, rendered again by the same signature
    and adapter (no model call): what a trace shows as the generation's prompt."""
    signature = AnswerFromContext.with_instructions(instructions)
    return adapter.format(signature, demos=[], inputs={"context": format_contexts(chunks), "question": question})


class RAG(dspy.Module):
    def __init__(self, index: Index, role: Role):
        super().__init__()
        self.index, self.role = index, role
        self.generate = dspy.Predict(AnswerFromContext)
        self.demo_pool: list[Demo] = []
        self._lms: dict[float, dspy.LM] = {}

    def set_demos(self, pool: list[Demo]) -> None:
        """The demonstrations ``params["demos"]`` draws from, best first: every probe is shown the first
        ``demos`` of them, skipping the probe itself (by id or identical question). The same demos for
        every probe keep the prompt prefix fixed, so llama.cpp reuses its KV cache across items and a
        candidate's demos are one thing the gate can compare. Train items only."""
        bad = [d.probe_id for d in pool if d.split != "train"]
        if bad:
            raise ValueError(f"demos must come from the train split; got non-train probes {bad}")
        self.demo_pool = list(pool)

    def demos_for(self, probe_id: str | None, question: str, n: int) -> list[Demo]:
        chosen = [d for d in self.demo_pool if d.probe_id != probe_id and d.question != question][:n]
        if len(chosen) < n:
            raise ValueError(f"demos={n} but the demo pool holds {len(chosen)} usable train items (set_demos)")
        return chosen

    def _lm(self, params: Params) -> dspy.LM:
        """The role's LM, or a copy carrying llama.cpp's ``repeat_penalty`` (1.0, the default, is none)."""
        rp = float(params.get("repeat_penalty", 1.0))
        if rp == 1.0:
            return self.role.lm
        if not self.role.local:
            raise ValueError("repeat_penalty is llama.cpp's; "
                             "use frequency_penalty / presence_penalty on a hosted model")
        if rp not in self._lms:
            self._lms[rp] = with_extensions(self.role.lm, repeat_penalty=rp)
        return self._lms[rp]

    def forward(self, question: str, params: Params, probe_id: str | None = None) -> dspy.Prediction:
        chunks = self.index.search(question, int(params["top_k"]), int(params["chunk_size"]),
                                   int(params["chunk_overlap"]), weight=float(params.get("hybrid_weight", 0.0)))
        predict = dspy.Predict(AnswerFromContext.with_instructions(str(params["instructions"])))
        predict.demos = [dspy.Example(context=d.context, question=d.question, answer=d.answer)
                         for d in self.demos_for(probe_id, question, int(params.get("demos", 0)))]
        config: dict[str, Any] = {k: params[k] for k in GENERATION_KEYS if k in params}
        with dspy.context(lm=self._lm(params), adapter=self.role.adapter):
            pred = predict(context=format_contexts(chunks), question=question, config=config)
        return dspy.Prediction(answer=str(pred.answer).strip(), contexts=chunks)

    def answer(self, probe: Probe, params: Params) -> Answer:
        t0 = time.perf_counter()
        try:
            pred = self(question=probe.question, params=params, probe_id=probe.id)
        except Exception as err:  # per-probe failure: recorded on the item, never scored
            return Answer(probe=probe, error=f"{type(err).__name__}: {err}"[:500], seconds=time.perf_counter() - t0)
        return Answer(probe=probe, text=pred.answer, contexts=tuple(pred.contexts), seconds=time.perf_counter() - t0)


def load_system(ref: str) -> Any:
    """Resolve ``module:attr`` to a system under test (an object with ``answer(probe, params)``)."""
    import importlib

    module, _, attr = ref.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if isinstance(obj, type) else obj
