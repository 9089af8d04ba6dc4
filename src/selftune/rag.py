"""The built-in system under test: a DSPy module that retrieves ``top_k`` chunks from chromadb and
answers under tunable ``instructions``. Params: instructions, top_k, chunk_size, chunk_overlap.

Contract (any system under test): ``answer(probe, params) -> Answer``. A per-probe failure is
returned as ``Answer(error=...)``; only systemic failures raise.
"""

from __future__ import annotations

import time
from typing import Any

import dspy

from .index import Index
from .lm import Role
from .records import Answer, Chunk, Params, Probe


class AnswerFromContext(dspy.Signature):
    """Answer the question using only the context."""

    context: str = dspy.InputField(desc="retrieved passages, most relevant first")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def format_contexts(chunks: list[Chunk] | tuple[Chunk, ...]) -> str:
    return "\n\n".join(f"[{i + 1}] ({c.doc}) {c.text.strip()}" for i, c in enumerate(chunks))


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

    def forward(self, question: str, params: Params) -> dspy.Prediction:
        chunks = self.index.search(question, int(params["top_k"]), int(params["chunk_size"]), int(params["chunk_overlap"]))
        signature = AnswerFromContext.with_instructions(str(params["instructions"]))
        with self.role.context():
            pred = dspy.Predict(signature)(context=format_contexts(chunks), question=question)
        return dspy.Prediction(answer=str(pred.answer).strip(), contexts=chunks)

    def answer(self, probe: Probe, params: Params) -> Answer:
        t0 = time.perf_counter()
        try:
            pred = self(question=probe.question, params=params)
        except Exception as err:  # per-probe failure: recorded on the item, never scored
            return Answer(probe=probe, error=f"{type(err).__name__}: {err}"[:500], seconds=time.perf_counter() - t0)
        return Answer(probe=probe, text=pred.answer, contexts=tuple(pred.contexts), seconds=time.perf_counter() - t0)


def load_system(ref: str) -> Any:
    """Resolve ``module:attr`` to a system under test (an object with ``answer(probe, params)``)."""
    import importlib

    module, _, attr = ref.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if isinstance(obj, type) else obj
